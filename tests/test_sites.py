"""Every-site regularizers against the authors' formulation on materialized float64 logits, plus the building
blocks: softmax_mean (gradcheck), sample_targets (exact draws, the same on every backend), DropoutSite."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropreg
from conftest import BACKENDS
from checks import assert_ignore_index_acts_as_minus_100, seeded_generator
from dropreg.sites import sample_targets, site_regularizers, softmax_mean


# ---- the authors' formulation (cwein3/dropout-analytical), float64, materialized -------------------------
def authors_terms(head_input, weight, bias, target, sites, sampled, signs, explicit_coefs, implicit_coefs,
                  ignore_index=-100, reduction="mean"):
    """g_x(t) = d(sum of per-row CE(t)) / dx by autograd with create_graph on the materialized logits;
    explicit = sum_k c_e * mean over draws of sum (x g_x(y_hat))^2, implicit = sum_k c_i * sum sigma x g_x(y)."""
    d = head_input.shape[-1]
    logits = head_input.reshape(-1, d) @ weight.T + (0 if bias is None else bias)
    flat_target = target.reshape(-1)
    valid = flat_target != ignore_index

    def site_grads(classes):
        ce_sum = F.cross_entropy(logits[valid], classes[valid], reduction="sum")
        return torch.autograd.grad(ce_sum, sites, create_graph=True)

    implicit = sum(c * (s * x * g).sum() for c, s, x, g in zip(implicit_coefs, signs, sites,
                                                                 site_grads(flat_target.clamp(min=0))))
    explicit = 0
    for draw in sampled.reshape(sampled.shape[0], -1):
        explicit = explicit + sum(c * ((x * g) ** 2).sum() for c, x, g in zip(explicit_coefs, sites, site_grads(draw)))
    explicit = explicit / sampled.shape[0]
    count = max(int(valid.sum()), 1) if reduction == "mean" else 1
    return explicit / count, implicit / count


class TinyMLP(nn.Module):
    def __init__(self, vocab, dim):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)
        self.sites = nn.ModuleList([dropreg.DropoutSite(0.3), dropreg.DropoutSite(0.1)])

    def forward(self, ids):
        x = self.sites[0](self.embed(ids))
        return self.sites[1](torch.tanh(self.body(x)))


class TinyLSTM(nn.Module):
    def __init__(self, vocab, dim):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, vocab)
        self.sites = nn.ModuleList([dropreg.DropoutSite(0.4), dropreg.DropoutSite(0.25)])

    def forward(self, ids):
        out, _ = self.lstm(self.sites[0](self.embed(ids)))
        return self.sites[1](out)


def _step(model, ids, target, backend, sampled, signs, fused=False, **kwargs):
    """Our terms and every parameter's gradient of (explicit + 2 * implicit): from site_regularizers, or with
    ``fused`` from the one call linear_cross_entropy(..., p=0, sites=...)."""
    model.zero_grad()
    hidden = model(ids)
    sites, ps = dropreg.DropoutSite.collect(model)
    if fused:
        reg = dropreg.linear_cross_entropy(hidden, model.head.weight, target, linear_bias=model.head.bias, p=0.0,
                                           sites=sites, site_p=ps, sampled_targets=sampled, site_signs=signs,
                                           backend=backend, **kwargs)
    else:
        reg = site_regularizers(hidden, model.head.weight, target, sites, linear_bias=model.head.bias, p=ps,
                                sampled_targets=sampled, signs=signs, backend=backend, **kwargs)
    (reg.explicit + 2 * reg.implicit).backward()
    return reg, {name: p.grad.clone() for name, p in model.named_parameters()}, ps


def _authors_step(model, ids, target, sampled, signs, ps, reduction="mean", explicit_scale=1.0):
    """The authors' terms and gradients; ``ps`` None: the sites' own p."""
    model.zero_grad()
    hidden = model(ids)
    sites, site_ps = dropreg.DropoutSite.collect(model)
    ps = site_ps if ps is None else ps
    coefs = [dropreg.default_coefficients(p) for p in ps]
    explicit, implicit = authors_terms(hidden, model.head.weight, model.head.bias, target, sites, sampled, signs,
                                       [explicit_scale * c[0] for c in coefs], [c[1] for c in coefs],
                                       reduction=reduction)
    (explicit + 2 * implicit).backward()
    return (explicit, implicit), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("model_class", [TinyMLP, TinyLSTM])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_the_authors_formulation(backend, model_class, reduction):
    vocab, dim = 13, 5
    model = model_class(vocab, dim).double()
    ids = torch.randint(0, vocab, (2, 4))
    target = torch.randint(0, vocab, (2, 4))
    target[0, 1] = target[1, 3] = -100
    sampled = torch.randint(0, vocab, (3, 2, 4))
    signs = [torch.randint(0, 2, (2, 4, dim)).double() * 2 - 1 for _ in range(2)]
    theirs, their_grads = _authors_step(model, ids, target, sampled, signs, None, reduction)
    assert abs(theirs[0].item()) > 1e-6 and abs(theirs[1].item()) > 1e-6  # both terms are exercised
    for fused in (False, True):  # site_regularizers, and the one call linear_cross_entropy(sites=...)
        ours, our_grads, _ = _step(model, ids, target, backend, sampled, signs, fused=fused, reduction=reduction)
        torch.testing.assert_close(ours.explicit, theirs[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours.implicit, theirs[1], rtol=1e-10, atol=1e-12)
        for name in their_grads:
            torch.testing.assert_close(our_grads[name], their_grads[name], rtol=1e-10, atol=1e-12, msg=name)
    logits = model.head(model(ids)).reshape(-1, vocab)
    dropreg.DropoutSite.collect(model)
    torch.testing.assert_close(ours.ce, F.cross_entropy(logits, target.reshape(-1), reduction=reduction),
                               rtol=1e-10, atol=1e-12)


def test_a_weight_as_a_site_matches_the_authors_formulation(backend):
    """AWD-LSTM's weight drop as a site: the LSTM's hidden-to-hidden weight itself (docs/math.md 11.1, 11.4), beside
    the two recorded activations, in the one call; terms and every parameter's gradient as the authors' form."""
    vocab, dim = 13, 5
    model = TinyLSTM(vocab, dim).double()
    generator = seeded_generator(21)
    ids, target = torch.randint(0, vocab, (2, 4), generator=generator), torch.randint(0, vocab, (2, 4), generator=generator)
    sampled = torch.randint(0, vocab, (2, 2, 4), generator=generator)
    weight = model.lstm.weight_hh_l0
    signs = [torch.randint(0, 2, (2, 4, dim), generator=generator).double() * 2 - 1 for _ in range(2)]
    signs.append(torch.randint(0, 2, tuple(weight.shape), generator=generator).double() * 2 - 1)
    ps = [0.4, 0.25, 0.3]
    coefs = [dropreg.default_coefficients(p) for p in ps]
    results = []
    for ours in (False, True):
        model.zero_grad()
        hidden = model(ids)
        sites = list(dropreg.DropoutSite.collect(model)[0]) + [weight]
        if ours:
            out = dropreg.linear_cross_entropy(hidden, model.head.weight, target, linear_bias=model.head.bias, p=0.0,
                                               sites=sites, site_p=ps, sampled_targets=sampled, site_signs=signs,
                                               backend=backend)
            terms = out.explicit, out.implicit
        else:
            terms = authors_terms(hidden, model.head.weight, model.head.bias, target, sites, sampled, signs,
                                  [c[0] for c in coefs], [c[1] for c in coefs])
        (terms[0] + 2 * terms[1]).backward()
        results.append((terms, {name: p.grad.clone() for name, p in model.named_parameters()}))
    (theirs, their_grads), (ours, our_grads) = results
    assert abs(theirs[0].item()) > 1e-6 and abs(theirs[1].item()) > 1e-6
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-10, atol=1e-12)
    for name in their_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_head_input_as_a_site_with_custom_coefficients(backend):
    vocab, dim = 9, 4
    model = TinyMLP(vocab, dim).double()
    ids = torch.randint(0, vocab, (6,))
    target = torch.randint(0, vocab, (6,))
    sampled = torch.randint(0, vocab, (2, 6))
    hidden = model(ids)
    sites, _ = dropreg.DropoutSite.collect(model)
    sites = sites + [hidden]
    signs = [torch.randint(0, 2, s.shape).double() * 2 - 1 for s in sites]
    reg = site_regularizers(hidden, model.head.weight, target, sites, linear_bias=model.head.bias,
                            p=[0.1, 0.2, 0.3], explicit_coef=[0.5, 0.0, 1.5], implicit_coef=0.7,
                            sampled_targets=sampled, signs=signs, backend=backend)
    explicit, implicit = authors_terms(hidden, model.head.weight, model.head.bias, target, sites, sampled, signs,
                                       [0.5, 0.0, 1.5], [0.7] * 3)
    torch.testing.assert_close(reg.explicit, explicit, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(reg.implicit, implicit, rtol=1e-10, atol=1e-12)


def test_float32_matches_float64_within_rounding(backend):
    vocab, dim = 17, 6
    model = TinyLSTM(vocab, dim).double()
    ids = torch.randint(0, vocab, (3, 5))
    target = torch.randint(0, vocab, (3, 5))
    sampled = torch.randint(0, vocab, (2, 3, 5))
    signs = [torch.randint(0, 2, (3, 5, dim)).double() * 2 - 1 for _ in range(2)]
    ref, ref_grads, _ = _step(model, ids, target, "reference", sampled, signs)
    model32 = model.float()
    ours, our_grads, _ = _step(model32, ids, target, backend, sampled, [s.float() for s in signs])
    # fp32 rounding through two LSTM backward passes: relative errors of a few 1e-6, far below a wrong term.
    for a, b in zip(ours, ref):
        assert abs(a.item() - b.item()) <= 1e-5 * (abs(b.item()) + 1e-3)
    for name in ref_grads:
        scale = float(ref_grads[name].abs().max()) + 1e-3
        assert float((our_grads[name].double() - ref_grads[name]).abs().max()) <= 2e-5 * scale, name


# ---- the sampled explicit term estimates the exact Gauss-Newton form --------------------------------------
def test_sampled_explicit_term_is_unbiased_for_the_gauss_newton_form():
    """Average of the one-draw estimate over 400 seeded draws vs x_j^2 (J^T (diag s - s s^T) J)_jj computed
    from the exact Jacobian. Seeded (deterministic); with a fresh seed the 5-standard-error bound would fail
    with probability about 6e-7 (normal approximation of a 400-draw mean)."""
    generator = seeded_generator(1234)
    vocab, dim, rows = 7, 3, 4
    x = torch.randn(rows, dim, dtype=torch.float64, generator=generator, requires_grad=True)
    body = torch.randn(dim, dim, dtype=torch.float64, generator=generator)
    weight = torch.randn(vocab, dim, dtype=torch.float64, generator=generator)
    bias = torch.randn(vocab, dtype=torch.float64, generator=generator)
    target = torch.randint(0, vocab, (rows,), generator=generator)

    def network(inp):
        return torch.tanh(inp @ body.T)

    hidden = network(x)
    draws = sample_targets(hidden, weight, linear_bias=bias, samples=400, seed=99)
    per_draw = torch.stack([site_regularizers(hidden, weight, target, [x], linear_bias=bias, p=0.3,
                                              implicit=False, sampled_targets=draw[None],
                                              reduction="sum").explicit.detach() for draw in draws])
    exact = 0.0
    for n in range(rows):
        jac = torch.autograd.functional.jacobian(network, x[n].detach())
        s = torch.softmax(weight @ hidden[n].detach() + bias, dim=0)
        gauss_newton = jac.T @ weight.T @ (torch.diag(s) - torch.outer(s, s)) @ weight @ jac
        exact += float((x[n].detach() ** 2 * gauss_newton.diagonal()).sum())
    exact *= dropreg.default_coefficients(0.3)[0]
    standard_error = float(per_draw.std()) / math.sqrt(len(per_draw))
    assert abs(float(per_draw.mean()) - exact) < 5 * standard_error, (float(per_draw.mean()), exact, standard_error)
    # samples=400 in one call averages the same draws
    together = site_regularizers(hidden, weight, target, [x], linear_bias=bias, p=0.3, implicit=False,
                                 samples=400, seed=99, reduction="sum").explicit
    torch.testing.assert_close(together.detach(), per_draw.mean(), rtol=1e-10, atol=0)


# ---- softmax_mean ---------------------------------------------------------------------------------------
# "chunked-triton" differs from "chunked" only by its epilogues, which tests/test_chunked.py compares with the PyTorch
# ones entry by entry: gradcheck's float64 runs of them under the interpreter would repeat the driver's check.
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "chunked-triton"], indirect=True)
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 3, 17), (7, 6, 23)], ids=lambda s: "N{}-d{}-V{}".format(*s))
def test_softmax_mean_gradcheck(backend, shape):
    n, d, v = shape
    h = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: softmax_mean(a[0], a[1], linear_bias=a[2], backend=backend),
                                    (h, w, b))
    probs = torch.softmax(h @ w.T + b, dim=-1)
    torch.testing.assert_close(softmax_mean(h, w, linear_bias=b, backend=backend), probs @ w, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("logit_scale", [1e-3, 30.0, 1e4], ids=["flat", "peaked", "huge-logits"])
def test_softmax_mean_float32_and_regimes(backend, logit_scale):
    h = torch.randn(2, 4, 5, dtype=torch.float64)
    w = torch.randn(19, 5, dtype=torch.float64) * logit_scale / 5**0.5
    b = torch.randn(19, dtype=torch.float64) * logit_scale
    exact = torch.softmax(h @ w.T + b, dim=-1) @ w
    ours = softmax_mean(h.float(), w.float(), linear_bias=b.float(), backend=backend)
    assert ours.shape == h.shape and ours.dtype == torch.float32
    # fp32 softmax error grows with |z| (rounding of z - lse); the mean is a convex combination of W's rows.
    z_scale = 1 + float((h @ w.T + b).abs().max())
    tol = 16 * 2.0**-23 * z_scale * float(w.abs().max())
    assert float((ours.double() - exact).abs().max()) <= tol


# ---- sample_targets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sample_targets_identical_on_every_backend_and_tiling(backend, dtype):
    h = torch.randn(3, 7, 4, dtype=dtype)
    w = torch.randn(41, 4, dtype=dtype)
    b = torch.randn(41, dtype=dtype)
    seed = int(torch.randint(0, 2**62, ()))
    ours = sample_targets(h, w, linear_bias=b, samples=5, seed=seed, backend=backend)
    reference = sample_targets(h, w, linear_bias=b, samples=5, seed=seed, backend="reference")
    assert ours.shape == (5, 3, 7) and ours.dtype == torch.int64
    assert torch.equal(ours, reference)


def test_sample_targets_and_softmax_mean_across_vocabulary_tiles(backend):
    """V=700 spans three of the C++ kernels' 256-entry vocabulary tiles (the last one partial) and many of the
    streamed backends' chunks; flat softmaxes put most draws beyond the first tile, where a wrong tile offset
    would show."""
    h = torch.randn(9, 6, dtype=torch.float64) * 0.05
    w = torch.randn(700, 6, dtype=torch.float64)
    b = torch.randn(700, dtype=torch.float64) * 0.05
    seed = int(torch.randint(0, 2**62, ()))
    reference = sample_targets(h, w, linear_bias=b, samples=4, seed=seed, backend="reference")
    assert (reference >= 256).float().mean() > 0.3
    assert torch.equal(sample_targets(h, w, linear_bias=b, samples=4, seed=seed, backend=backend), reference)
    exact = torch.softmax(h @ w.T + b, dim=-1) @ w
    torch.testing.assert_close(softmax_mean(h, w, linear_bias=b, backend=backend), exact, rtol=1e-12, atol=1e-12)


def test_sample_targets_follow_the_softmax():
    """Chi-square goodness of fit: 6000 rows with the same logits (independent draws: each row has its own
    Philox counters). Seeded; the threshold 40.0 with 7 degrees of freedom has a false-failure rate of about
    7e-7 for a fresh seed."""
    h = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64).expand(6000, 3).contiguous()
    w = torch.randn(8, 3, dtype=torch.float64, generator=seeded_generator(5))
    b = torch.tensor([0.0, 0.5, -1.0, 2.0, 0.1, -0.3, float("-inf"), 1.0], dtype=torch.float64)
    drawn = sample_targets(h, w, linear_bias=b, samples=1, seed=2024)[0]
    counts = torch.bincount(drawn, minlength=8).double()
    expected = torch.softmax(h[0] @ w.T + b, dim=0) * len(drawn)
    assert counts[6] == 0  # -inf bias masks the class
    live = expected > 0
    chi2 = float(((counts[live] - expected[live]) ** 2 / expected[live]).sum())
    assert chi2 < 40.0, (chi2, counts, expected)


def test_sample_targets_seeds_and_stream_separation():
    h, w = torch.randn(50, 3, dtype=torch.float64), torch.randn(30, 3, dtype=torch.float64)
    first = sample_targets(h, w, samples=2, seed=7)
    assert torch.equal(first, sample_targets(h, w, samples=2, seed=7))
    assert not torch.equal(first[0], first[1])  # draws differ
    assert not torch.equal(first, sample_targets(h, w, samples=2, seed=8))
    torch.manual_seed(3)
    a = sample_targets(h, w)
    torch.manual_seed(3)
    assert torch.equal(a, sample_targets(h, w))  # seed=None follows torch.manual_seed


# ---- errors ---------------------------------------------------------------------------------------------
def _site_problem():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    hidden = torch.tanh(x)
    w = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 6, (4,))
    return x, hidden, w, y


@pytest.mark.parametrize("override,error,argument", [
    (dict(reduction="none"), ValueError, "reduction"),
    (dict(sites=[]), TypeError, "sites"),
    (dict(sites=[torch.randn(4, 3, dtype=torch.float64)]), ValueError, r"sites\[0\]"),
    (dict(sites=[torch.randn(4, 3, dtype=torch.float64, requires_grad=True)]), ValueError, r"sites\[0\]"),
    (dict(p=[0.1, 0.2]), ValueError, "p"),
    (dict(p=1.0), ValueError, "p"),
    (dict(explicit_coef=[-1.0]), ValueError, r"explicit_coef\[0\]"),
    (dict(samples=0), ValueError, "samples"),
    (dict(sampled_targets=torch.full((1, 4), 6)), ValueError, "sampled_targets"),
    (dict(sampled_targets=torch.zeros(1, 5, dtype=torch.long)), ValueError, "sampled_targets"),
    (dict(signs=[torch.full((4, 3), 0.5)]), ValueError, r"signs\[0\]"),
    (dict(signs=[]), TypeError, "signs"),
    (dict(target=torch.full((4,), 9)), ValueError, "target"),
])
def test_site_regularizers_bad_input_names_the_argument(override, error, argument):
    x, hidden, w, y = _site_problem()
    args = dict(sites=[x], target=y)
    args.update(override)
    with pytest.raises(error, match=rf"^{argument}"):
        site_regularizers(hidden, w, args.pop("target"), args.pop("sites"), seed=0, **args)


def test_head_input_must_require_grad():
    x, hidden, w, y = _site_problem()
    with pytest.raises(ValueError, match="^head_input"):
        site_regularizers(hidden.detach(), w, y, [x], seed=0)


def test_sample_targets_bad_input():
    h, w = torch.randn(3, 2), torch.randn(5, 2)
    with pytest.raises(ValueError, match="^input"):
        sample_targets(torch.full((3, 2), float("nan")), w, seed=0)
    with pytest.raises(ValueError, match="^linear_bias"):
        sample_targets(h, w, linear_bias=torch.full((5,), float("inf")), seed=0)
    with pytest.raises(TypeError, match="^samples"):
        sample_targets(h, w, samples=1.5, seed=0)
    with pytest.raises(ValueError, match="^linear_bias: every class is masked"):
        sample_targets(h, w, linear_bias=torch.full((5,), float("-inf")), seed=0)
    with pytest.raises(ValueError, match="^input"):
        softmax_mean(torch.randn(3, 4), w)


def test_sample_targets_refuses_rows_whose_logits_can_overflow(backend):
    """A row whose logits can leave fp32's range has no defined Gumbel-max draw: refused, naming the row; the same
    row scaled to logits near 1e37 (in range) is drawn, and identically on every backend."""
    h, w = torch.randn(4, 8), torch.randn(50, 8) * 1e18
    h[2] *= 1e20
    with pytest.raises(ValueError, match="^input: the logits of row 2 can reach"):
        sample_targets(h, w, seed=0, backend=backend)
    h[2] /= 1e4
    drawn = sample_targets(h, w, seed=0, backend=backend)
    assert torch.equal(drawn, sample_targets(h, w, seed=0, backend="torch"))


def test_all_ignored_rows_give_zero_and_zero_gradients(backend):
    x, hidden, w, y = _site_problem()
    reg = site_regularizers(hidden, w, torch.full_like(y, -100), [x], seed=1, backend=backend)
    (reg.explicit + reg.implicit).backward()
    assert reg.explicit == 0 and reg.implicit == 0 and torch.all(x.grad == 0)


# ---- DropoutSite ----------------------------------------------------------------------------------------
def test_dropout_site_records_only_when_training():
    model = TinyMLP(7, 3)
    ids = torch.randint(0, 7, (5,))
    model(ids)
    sites, ps = dropreg.DropoutSite.collect(model)
    assert len(sites) == 2 and ps == [0.3, 0.1]
    assert dropreg.DropoutSite.collect(model) == ([], [])  # collect forgets
    model.eval()
    model(ids)
    assert dropreg.DropoutSite.collect(model) == ([], [])
    with pytest.raises(ValueError, match="^p:"):
        dropreg.DropoutSite(1.5)


def test_training_step_with_sites_reduces_the_regularized_loss():
    torch.manual_seed(0)
    model = TinyLSTM(11, 6)
    ids = torch.randint(0, 11, (4, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        hidden = model(ids)
        sites, ps = dropreg.DropoutSite.collect(model)
        ce = dropreg.linear_cross_entropy(hidden, model.head.weight, ids, linear_bias=model.head.bias,
                                          explicit=False, implicit=False).ce
        reg = site_regularizers(hidden, model.head.weight, ids, sites, linear_bias=model.head.bias, p=ps,
                                implicit=False, seed=1)
        loss = ce + reg.explicit
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_every_site_page_example(capsys):
    import os
    import re
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "sites.md")) as f:
        page = f.read()
    code = re.search(r"```python\n(.+?)```", page, flags=re.S).group(1)
    exec(compile(code, "docs/sites.md (every dropout site)", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in printed] == ["step 0", "step 1", "step 2"]
    first, last = (float(line.split()[3]) for line in (printed[0], printed[-1]))
    assert last < first  # the cross entropy falls over three SGD steps on one batch


def test_site_signs_follow_the_stated_stream():
    """signs=None: site k uses Philox sign stream k + 1 of seed over its flattened elements (docs/math.md 11.4)."""
    from dropreg.signs import philox_signs
    x1 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    x2 = torch.tanh(x1 @ torch.randn(4, 4, dtype=torch.float64))
    hidden = x2 * 2.0
    w = torch.randn(9, 4, dtype=torch.float64)
    y = torch.randint(0, 9, (3,))
    seed = int(torch.randint(0, 2**62, ()))
    implicit = site_regularizers(hidden, w, y, [x1, x2], seed=seed, explicit=False).implicit
    signs = [philox_signs(seed, 1, x.numel(), stream=k + 1, dtype=torch.float64).reshape(x.shape)
             for k, x in enumerate((x1, x2))]
    stated = site_regularizers(hidden, w, y, [x1, x2], signs=signs, explicit=False).implicit
    torch.testing.assert_close(implicit, stated, rtol=0, atol=0)
    assert not torch.equal(signs[0].reshape(-1)[:12], philox_signs(seed, 1, 12, dtype=torch.float64).reshape(-1))


def test_gumbel_noise_follows_the_stated_stream():
    """Known answers from the definition (docs/math.md 11.3): word v % 4 of Philox at counter (v // 4, n, k, 1),
    u = (word + 1/2) / 2^32, g = -log(-log u). philox4x32 itself is checked against Random123's vectors."""
    from dropreg.signs import gumbel_noise, philox4x32
    for seed, sample, row, v in ((0, 0, 0, 0), (2**64 - 1, 3, 12345, 77), (2**40 + 5, 1, 2**31 + 7, 4099)):
        words = philox4x32(tuple(torch.tensor([c], dtype=torch.int64) for c in (v // 4, row % 2**32, sample, 1)),
                           seed)
        u = (int(words[v % 4]) + 0.5) / 2**32
        expected = -math.log(-math.log(u))
        got = gumbel_noise(seed, sample, torch.tensor([row]), v, v + 1)
        assert float(got) == pytest.approx(expected, rel=1e-15, abs=1e-15)


@pytest.mark.parametrize("ignore_index", [2, -1])
def test_custom_ignore_index_acts_as_minus_100(backend, ignore_index):
    x, _, w, y = _site_problem()
    y[[1, 3]] = ignore_index

    def run(target, index):  # a fresh graph from x per call: site_regularizers differentiates through it
        reg = site_regularizers(torch.tanh(x), w, target, [x], seed=3, ignore_index=index, backend=backend)
        return reg.explicit.reshape(1), reg.implicit.reshape(1)
    assert_ignore_index_acts_as_minus_100(run, y, ignore_index, [x])
