"""The methods the benchmarks compare. Each builder returns ``(forward, forward_backward)`` closures.

All regularized methods compute CE + explicit + implicit with p=0.1 (docs/math.md's default coefficients)
and reduction "mean"; ``F.linear_cross_entropy`` is CE only (what a regularizer-free run costs), and
``square-gemm`` is one large matmul (run at N = d = V = the benchmark's ``--gemm-size``): its rate times a method's
multiply-add count is that method's floor, the compute-bound limit (:func:`floor_seconds`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import dropreg

P = 0.1
EXPLICIT_COEF, IMPLICIT_COEF = dropreg.default_coefficients(P)
SOFTCAP = 30.0  # Gemma 2's final-logit cap, for the capped-head methods


def make_inputs(rows, dim, vocab, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) / math.sqrt(dim)).to(device=device, dtype=dtype)
    weight.requires_grad_()
    target = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    signs = (torch.randint(0, 2, (rows, dim), generator=gen) * 2 - 1).to(device=device, dtype=dtype)
    return hidden, weight, target, signs


def _clear(*tensors):
    for t in tensors:
        t.grad = None


def _closures(loss_fn, hidden, weight):
    def forward():
        with torch.no_grad():
            return loss_fn()

    def forward_backward():
        _clear(hidden, weight)
        loss = loss_fn()
        loss.backward()
        return loss

    return forward, forward_backward


def dropreg_method(backend, **options):
    """dropreg's fused loss with p=P and the given signs; ``options`` (e.g. ``explicit=False, implicit=False``)
    switch terms off."""
    def build(hidden, weight, target, signs):
        return _closures(lambda: dropreg.linear_cross_entropy(hidden, weight, target, p=P, signs=signs,
                                                              backend=backend, **options).loss, hidden, weight)
    return build


def naive_loss(hidden, weight, target, signs):
    """Materialized logits + autograd of docs/math.md's formulas: what a plain PyTorch user writes."""
    logits = hidden @ weight.T
    ce = F.cross_entropy(logits, target)
    probs = torch.softmax(logits, dim=-1)
    mu = probs @ weight
    var = probs @ (weight * weight) - mu * mu
    explicit = EXPLICIT_COEF * (hidden * hidden * var).sum(-1).mean()
    implicit = IMPLICIT_COEF * (signs * hidden * (mu - weight[target])).sum(-1).mean()
    return ce + explicit + implicit


def build_naive(hidden, weight, target, signs):
    return _closures(lambda: naive_loss(hidden, weight, target, signs), hidden, weight)


def build_naive_compiled(hidden, weight, target, signs):
    compiled = torch.compile(naive_loss)
    return _closures(lambda: compiled(hidden, weight, target, signs), hidden, weight)


def paper_loss(hidden, weight, target, signs):
    """The authors' approach: the explicit term from one label sampled from the softmax and double backprop
    (``jreg_sample_logit``), the implicit term as a random-sign first-order Taylor term (``taylor_fo``)."""
    rows = hidden.shape[0]
    logits = hidden @ weight.T
    ce = F.cross_entropy(logits, target)
    sampled = torch.multinomial(torch.softmax(logits.detach().float(), dim=-1), 1).squeeze(1)
    (grad_sampled,) = torch.autograd.grad(F.cross_entropy(logits, sampled, reduction="sum"), hidden,
                                          create_graph=True)
    explicit = EXPLICIT_COEF * (hidden * grad_sampled).pow(2).sum() / rows
    (grad_target,) = torch.autograd.grad(ce * rows, hidden, create_graph=True)
    implicit = IMPLICIT_COEF * (signs * hidden * grad_target).sum() / rows
    return ce + explicit + implicit


def build_paper(hidden, weight, target, signs):
    def forward():  # the double-backprop terms need a graph even for the value
        return paper_loss(hidden, weight, target, signs).detach()

    def forward_backward():
        _clear(hidden, weight)
        loss = paper_loss(hidden, weight, target, signs)
        loss.backward()
        return loss

    return forward, forward_backward


def build_linear_cross_entropy(hidden, weight, target, signs):
    return _closures(lambda: F.linear_cross_entropy(hidden, weight, target), hidden, weight)


def build_linear_cross_entropy_chunked(hidden, weight, target, signs):
    """torch's chunked implementation (``options=LinearCrossEntropyOptions()``, its "auto" picks): it also forms
    the gradients in the forward."""
    options = torch.nn.LinearCrossEntropyOptions()
    return _closures(lambda: F.linear_cross_entropy(hidden, weight, target, options=options), hidden, weight)


def build_ce_naive(hidden, weight, target, signs):
    return _closures(lambda: F.cross_entropy(hidden @ weight.T, target), hidden, weight)


def build_ce_naive_softcap(hidden, weight, target, signs):
    """A capped head as Gemma 2's Hugging Face code computes it: materialized logits, capped, then F.cross_entropy."""
    return _closures(lambda: F.cross_entropy(SOFTCAP * torch.tanh(hidden @ weight.T / SOFTCAP), target), hidden,
                     weight)


def build_cce(impl, **options):
    """Cut Cross-Entropy's ``linear_cross_entropy`` (apple/ml-cross-entropy); an optional package."""
    def build(hidden, weight, target, signs):
        from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy

        return _closures(lambda: cce_linear_cross_entropy(hidden, weight, target, impl=impl, **options), hidden,
                         weight)
    return build


def build_liger(hidden, weight, target, signs):
    """Liger-Kernel's fused linear cross entropy (an optional package; CUDA only)."""
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss()

    def loss():
        out = loss_fn(weight, hidden, target)
        out = out[0] if isinstance(out, tuple) else out
        return getattr(out, "loss", out)

    return _closures(loss, hidden, weight)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def cce_installed() -> bool:
    try:
        import cut_cross_entropy  # noqa: F401
    except ImportError:
        return False
    return True


def build_gemm(hidden, weight, target, signs):
    h, w_t = hidden.detach(), weight.detach().T.contiguous()

    def matmul():
        return h @ w_t

    return matmul, None


def _second_pass(hidden, signs):
    """A second "dropout pass" of the same hidden states: a fixed 10% perturbation."""
    return (hidden.detach() * (1 + 0.1 * signs)).requires_grad_()


def rdrop_dropreg_method(backend):
    def build(hidden, weight, target, signs):
        hidden2 = _second_pass(hidden, signs)
        return _closures(lambda: dropreg.rdrop_linear_cross_entropy(hidden, hidden2, weight, target,
                                                                    backend=backend).loss, hidden, weight)
    return build


def rdrop_naive_loss(hidden1, hidden2, weight, target, alpha=1.0):
    """R-Drop as its authors write it: two materialized log-softmaxes and F.kl_div both ways."""
    log_p1 = torch.log_softmax(hidden1 @ weight.T, dim=-1)
    log_p2 = torch.log_softmax(hidden2 @ weight.T, dim=-1)
    ce = F.nll_loss(log_p1, target) + F.nll_loss(log_p2, target)
    kl = (F.kl_div(log_p1, log_p2.exp(), reduction="none").sum(-1)
          + F.kl_div(log_p2, log_p1.exp(), reduction="none").sum(-1)).mean() / 2
    return ce + alpha * kl


def build_rdrop_naive(hidden, weight, target, signs):
    hidden2 = _second_pass(hidden, signs)
    return _closures(lambda: rdrop_naive_loss(hidden, hidden2, weight, target), hidden, weight)


SQUARE_GEMM = "square-gemm"  # the method whose rate sets the floor

# Per family: the multiply-adds (in units of N*V*d) of a fused forward and forward+backward (docs/math.md: 3 and
# 10 for dropreg, 2 and 8 for R-Drop); at a large matmul's rate they give the compute-bound limit, the floor.
FLOOR_MULTIPLE = {
    "dropreg": {"forward": 3, "forward_backward": 10},
    "rdrop": {"forward": 2, "forward_backward": 8},
    "ce": {"forward": 1, "forward_backward": 3},  # cross entropy alone, gradients formed in the forward
}
BASELINES = {"dropreg": ("naive", "paper"), "rdrop": ("rdrop-naive",),
             "ce": ("F.linear_cross_entropy-chunked", "F.linear_cross_entropy", "cce-torch_compile", "cce-cce", "liger",
                    "ce-naive")}

CE_METHODS = {
    "ce-dropreg-cpu": dropreg_method("cpu", explicit=False, implicit=False),
    "ce-dropreg-torch": dropreg_method("torch", explicit=False, implicit=False),
    "ce-dropreg-triton": dropreg_method("triton", explicit=False, implicit=False),
    "ce-dropreg-chunked": dropreg_method("chunked", explicit=False, implicit=False),
    # a capped head (Gemma 2's softcap 30), and with label smoothing on it (docs/math.md 3.6, 3.7)
    "ce-dropreg-cpu-softcap": dropreg_method("cpu", explicit=False, implicit=False, softcap=SOFTCAP),
    "ce-dropreg-cpu-softcap-smoothing": dropreg_method("cpu", explicit=False, implicit=False, softcap=SOFTCAP,
                                                       label_smoothing=0.1),
    "ce-naive-softcap": build_ce_naive_softcap,
    "cce-torch_compile-softcap": build_cce("torch_compile", softcap=SOFTCAP),
    "liger": build_liger,
    "ce-naive": build_ce_naive,
    "F.linear_cross_entropy-chunked": build_linear_cross_entropy_chunked,
    "cce-torch_compile": build_cce("torch_compile"),
    "cce-cce": build_cce("cce"),
}

RDROP_METHODS = {
    "rdrop-dropreg-cpu": rdrop_dropreg_method("cpu"),
    "rdrop-dropreg-torch": rdrop_dropreg_method("torch"),
    "rdrop-dropreg-triton": rdrop_dropreg_method("triton"),
    "rdrop-dropreg-chunked": rdrop_dropreg_method("chunked"),
    "rdrop-naive": build_rdrop_naive,
}

METHODS = {
    "dropreg-cpu": dropreg_method("cpu"),
    "dropreg-torch": dropreg_method("torch"),
    "dropreg-triton": dropreg_method("triton"),
    "dropreg-chunked": dropreg_method("chunked"),
    "dropreg-cpu-softcap": dropreg_method("cpu", softcap=SOFTCAP),
    "dropreg-cpu-softcap-smoothing": dropreg_method("cpu", softcap=SOFTCAP, label_smoothing=0.1),
    "naive": build_naive,
    "naive-compiled": build_naive_compiled,
    "paper": build_paper,
    "F.linear_cross_entropy": build_linear_cross_entropy,
    SQUARE_GEMM: build_gemm,  # the floor's rate: run with rows = dim = vocab
}


METHODS.update(RDROP_METHODS)
METHODS.update(CE_METHODS)


def square_gemm_rate(size: int, seconds: float) -> float:
    """FLOP/s of one ``size``-cube matmul that took ``seconds``."""
    return 2.0 * size**3 / seconds


def method_family(method: str, family: str) -> str:
    """The family whose multiply-add count bounds ``method``: a cross-entropy-only method is held to cross
    entropy's 3 NVd even in the dropreg family's runs (it does less work than the regularized loss)."""
    if method in CE_METHODS or method.startswith("F.linear_cross_entropy"):
        return "ce"
    if method in RDROP_METHODS:
        return "rdrop"
    return family


def floor_seconds(method: str, family: str, mode: str, rows: int, dim: int, vocab: int, flop_rate: float) -> float:
    """The compute-bound limit: ``method``'s multiply-adds at ``flop_rate`` (FLOP/s, a large matmul's)."""
    return FLOOR_MULTIPLE[method_family(method, family)][mode] * 2.0 * rows * dim * vocab / flop_rate


def _backend_runs_here(backend: str, device: str) -> bool:
    from dropreg import cpu

    if backend not in dropreg.available_backends():
        return False
    if backend == "cpu":
        return device == "cpu" and cpu.is_available()
    return backend not in ("triton", "chunked") or device == "cuda"  # the GPU paths (tests run them on CPU)


def available_methods(device: str, family: str = "dropreg"):
    """The family's methods that can run on ``device``, dropreg's own first."""
    prefix = {"dropreg": "dropreg-", "rdrop": "rdrop-dropreg-", "ce": "ce-dropreg-"}[family]
    ours = [f"{prefix}{b}" for b in ("cpu", "torch", "chunked", "triton") if _backend_runs_here(b, device)]
    if family == "rdrop":
        return ours + ["rdrop-naive"]
    if family == "ce":
        cce = ["cce-torch_compile"] + (["cce-cce"] if device == "cuda" else []) if cce_installed() else []
        liger = ["liger"] if device == "cuda" and _installed("liger_kernel") else []
        torch_ce = (["F.linear_cross_entropy-chunked", "F.linear_cross_entropy"]
                    if hasattr(torch.nn.functional, "linear_cross_entropy") else [])  # older torch has none
        return ours + [*torch_ce, *cce, *liger, "ce-naive"]
    torch_ce = ["F.linear_cross_entropy"] if hasattr(torch.nn.functional, "linear_cross_entropy") else []
    return ours + ["naive", "naive-compiled", "paper", *torch_ce]
