"""R-Drop's fused loss against the authors' formulation (F.kl_div on materialized log-softmaxes)."""
import pytest
import torch
import torch.nn.functional as F

import dropreg
from checks import (COTANGENT_BOUND, _terms_and_grads, assert_beats_same_dtype, assert_ignore_index_acts_as_minus_100,
                    assert_within_rounding, labelled, strided)

NAMES = ("ce1", "ce2", "kl")
NAMES_AND_LOSS = NAMES + ("loss",)
LEAVES = ("input1", "input2", "weight", "bias")


def make_inputs(lead=(5,), d=4, vocab=11, bias=True, ignore=(), logit_scale=1.0, dtype=torch.float64,
                close=False):
    def rounded(t):
        return t.to(dtype).to(torch.float64)
    h1 = rounded(torch.randn(*lead, d, dtype=torch.float64))
    noise = 0.01 if close else 1.0  # close: two dropout passes of one hidden state differ a little
    h2 = rounded(h1 + noise * torch.randn_like(h1))
    w = rounded(torch.randn(vocab, d, dtype=torch.float64) * logit_scale / d**0.5)
    b = rounded(torch.randn(vocab, dtype=torch.float64)) if bias else None
    y = torch.randint(0, vocab, lead)
    for i in ignore:
        y.view(-1)[i] = -100
    return h1, h2, w, b, y


def softcapped(z, softcap):
    """Gemma 2's final-logit softcapping, written here independently of dropreg."""
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def authors_terms(h1, h2, w, b, y, reduction, softcap=None):
    """Float64 oracle the way the R-Drop authors compute it: kl_div both ways on log-softmaxes, halved (of the
    capped logits with ``softcap``). Returns the terms and the raw logits of pass 1 (rounding grows with their
    size, capped or not: tests/checks.py)."""
    d = h1.shape[-1]
    raw1 = h1.reshape(-1, d) @ w.T + (0 if b is None else b)
    z1 = softcapped(raw1, softcap)
    z2 = softcapped(h2.reshape(-1, d) @ w.T + (0 if b is None else b), softcap)
    lp1, lp2 = F.log_softmax(z1, -1), F.log_softmax(z2, -1)
    flat_y = y.reshape(-1)
    valid = flat_y != -100
    ce1 = F.cross_entropy(z1, flat_y, reduction="none")
    ce2 = F.cross_entropy(z2, flat_y, reduction="none")
    # The authors pass probabilities as the target; log_target=True is the same KL, and its gradient stays
    # finite where a probability underflows to 0 (there the probability form's gradient is 0 * inf = NaN).
    p_loss = F.kl_div(lp1, lp2, reduction="none", log_target=True).sum(-1)  # KL(p2 || p1)
    q_loss = F.kl_div(lp2, lp1, reduction="none", log_target=True).sum(-1)  # KL(p1 || p2)
    kl = torch.where(valid, (p_loss + q_loss) / 2, 0.0)
    terms = [torch.where(valid, ce1, 0.0), torch.where(valid, ce2, 0.0), kl]
    if reduction == "none":
        return [t.reshape(y.shape) for t in terms], raw1.detach()
    total = [t.sum() for t in terms]
    return ([t / max(int(valid.sum()), 1) for t in total] if reduction == "mean" else total), raw1.detach()


def _max_abs(t):
    return float(t.abs().max()) if t.numel() else 0.0


def rdrop_floors(h1, h2, w, y, reduction):
    """checks.summand_floors for R-Drop's labels: its terms are in logit units (1), and a logit gradient's rounding
    (eps * z_scale, relative to a probability's size 1) reaches the input gradients through W and the weight
    gradients through h, even where the oracle gradient is exactly 0: with huge logits every row can be one-hot with
    one argmax in both passes, and the backward's recomputed logits round differently from the forward's. Scaled by
    what reaches one row from upstream (1/n for "mean", the cotangent bound for "none") and, for the weight and bias,
    by the row count."""
    rows = max(int((y != -100).sum()), 1)
    per_row = {"mean": 1.0 / rows, "sum": 1.0, "none": COTANGENT_BOUND}[reduction]
    through = {"input1": _max_abs(w) * per_row, "input2": _max_abs(w) * per_row,
               "weight": max(_max_abs(h1), _max_abs(h2)) * per_row * rows, "bias": per_row * rows}
    value = {"mean": 1.0, "sum": float(rows), "none": 1.0}[reduction]
    return lambda label: through[label.split("/d")[1]] if "/" in label else value


def compare(backend, dtype, inputs, reduction="mean", factor=8.0, alpha=1.0, softcap=None):
    """dropreg's ce1, ce2, kl and ``loss`` (with ``alpha``), values and gradients, against the authors' float64
    terms; the oracle loss is ``ce1 + ce2 + alpha * kl`` of those independently computed terms."""
    h1, h2, w, b, y = inputs
    leaves64 = [t.clone().requires_grad_() for t in (h1, h2, w) + ((b,) if b is not None else ())]
    oracle_terms, logits = authors_terms(*leaves64[:3], leaves64[3] if b is not None else None, y, reduction,
                                         softcap)
    oracle_terms.append(oracle_terms[0] + oracle_terms[1] + alpha * oracle_terms[2])
    cotangent = torch.randn(y.shape, dtype=torch.float64)
    oracle = _terms_and_grads(oracle_terms, leaves64, cotangent, NAMES_AND_LOSS)
    leaves = [t.detach().to(dtype).requires_grad_() for t in leaves64]
    out = dropreg.rdrop_linear_cross_entropy(leaves[0], leaves[1], leaves[2], y,
                                             linear_bias=leaves[3] if b is not None else None,
                                             reduction=reduction, alpha=alpha, softcap=softcap, backend=backend)
    ours = _terms_and_grads(tuple(out), leaves, cotangent, NAMES_AND_LOSS)
    z_scale = 1.0 + float(logits.abs().max()) if logits.numel() else 1.0
    floor = rdrop_floors(h1, h2, w, y, reduction)
    oracle_labelled = labelled(oracle, NAMES_AND_LOSS, LEAVES)
    for label, value in labelled(ours, NAMES_AND_LOSS, LEAVES).items():
        assert_within_rounding(label, value, oracle_labelled[label], dtype, z_scale, 0.0, factor, floor=floor(label))
    return out


SHAPES = [dict(lead=(1,), d=1, vocab=1), dict(lead=(1,), d=1, vocab=9), dict(lead=(5,), d=3, vocab=17),
          dict(lead=(2, 3), d=4, vocab=13), dict(lead=(7,), d=6, vocab=23, close=True)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_against_authors_oracle(backend, dtype, shape, bias):
    compare(backend, dtype, make_inputs(**shape, bias=bias, dtype=dtype))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore", [(), (1, 4), (0, 1, 2, 3, 4, 5)], ids=["none", "some", "all"])
def test_reductions_and_ignored_rows(backend, reduction, ignore):
    out = compare(backend, torch.float64, make_inputs(lead=(6,), ignore=ignore), reduction=reduction)
    if len(ignore) == 6:
        assert all(torch.all(t == 0) for t in out)


@pytest.mark.parametrize("logit_scale", [30.0, 1e4], ids=["peaked", "huge-logits"])
def test_peaked_and_huge_logits(backend, logit_scale):
    out = compare(backend, torch.float32, make_inputs(lead=(6,), d=5, vocab=19, logit_scale=logit_scale,
                                                      dtype=torch.float32))
    assert all(torch.isfinite(t).all() for t in out)


def test_identical_inputs_give_zero_kl_and_zero_kl_gradients(backend):
    h1, _, w, b, y = make_inputs(lead=(6,), d=5, vocab=40)
    h = h1.clone().requires_grad_()
    w = w.clone().requires_grad_()
    out = dropreg.rdrop_linear_cross_entropy(h, h, w, y, linear_bias=b, backend=backend, reduction="none")
    assert torch.all(out.kl == 0)
    grads = torch.autograd.grad(out.kl.sum(), (h, w))
    assert all(torch.all(g == 0) for g in grads)


def test_swapping_inputs_leaves_kl_unchanged(backend):
    h1, h2, w, b, y = make_inputs(lead=(8,), d=4, vocab=30)
    a = dropreg.rdrop_linear_cross_entropy(h1, h2, w, y, linear_bias=b, backend=backend, reduction="none")
    c = dropreg.rdrop_linear_cross_entropy(h2, h1, w, y, linear_bias=b, backend=backend, reduction="none")
    torch.testing.assert_close(a.kl, c.kl, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.ce1, c.ce2)
    assert torch.all(a.kl >= 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("logit_scale", [0.1, 1.0, 30.0], ids=["flat", "typical", "peaked"])
def test_low_precision_beats_same_dtype(backend, dtype, logit_scale):
    """Each term and each gradient against float64, with the criterion of checks.assert_beats_same_dtype:
    "same dtype" is the authors' formulation run in ``dtype`` end to end."""
    h1, h2, w, b, y = make_inputs(lead=(16,), d=32, vocab=37, dtype=dtype, logit_scale=logit_scale)
    cotangent = torch.randn((), dtype=torch.float64)

    def authors(leaves):
        return authors_terms(*leaves, y, "mean")[0]

    def fused(leaves):
        out = dropreg.rdrop_linear_cross_entropy(*leaves[:3], y, linear_bias=leaves[3], backend=backend)
        assert all(t.dtype == torch.float32 for t in out)  # fp32 losses from bf16/fp16 inputs
        return tuple(out)[:3]

    def run(run_dtype, terms_of):
        leaves = [t.to(run_dtype).requires_grad_() for t in (h1, h2, w, b)]
        return labelled(_terms_and_grads(terms_of(leaves), leaves, cotangent, NAMES), NAMES, LEAVES)

    oracle, same_dtype, ours = run(torch.float64, authors), run(dtype, authors), run(dtype, fused)
    for label in oracle:
        assert_beats_same_dtype(label, ours[label], same_dtype[label], oracle[label], dtype)


def _rdrop_values_and_grads(backend, h1, h2, w, b, y):
    leaves = [t.requires_grad_() for t in (h1, h2, w, b)]
    out = dropreg.rdrop_linear_cross_entropy(h1, h2, w, y, linear_bias=b, alpha=0.7, reduction="none",
                                             backend=backend)
    total = (out.ce1 + 2 * out.ce2 + 3 * out.kl).sum()
    return [t.detach() for t in out] + list(torch.autograd.grad(total, leaves))


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_non_contiguous_inputs_equal_contiguous(backend, layout):
    h1, h2, w, b, y = make_inputs(lead=(6,), d=5, vocab=23)
    ours = _rdrop_values_and_grads(backend, *(strided(t, layout) for t in (h1, h2, w, b)), y)
    contiguous = _rdrop_values_and_grads(backend, *(t.clone() for t in (h1, h2, w, b)), y)
    for a, c in zip(ours, contiguous):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12 * float(c.abs().max()))


def test_gradcheck(backend):
    h1, h2, w, b, y = make_inputs(lead=(4,), d=3, vocab=7, ignore=(2,))
    leaves = [t.clone().requires_grad_() for t in (h1, h2, w, b)]

    def fn(a, c, w, b):
        out = dropreg.rdrop_linear_cross_entropy(a, c, w, y, linear_bias=b, alpha=0.7, reduction="none",
                                                 backend=backend)
        return out.ce1, out.ce2, out.kl, out.loss

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_with_alpha_against_authors_oracle(backend, reduction):
    # out.loss and its gradients against ce1 + ce2 + alpha * kl built from F.cross_entropy and F.kl_div
    compare(backend, torch.float64, make_inputs(lead=(6,), ignore=(2,)), reduction=reduction, alpha=4.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_softcap_against_authors_oracle(backend, dtype, shape, reduction):
    """Both passes' logits capped (softcap 1.5 bends logits of size ~2) before the cross entropies and the KL."""
    compare(backend, dtype, make_inputs(**shape, logit_scale=3.0, dtype=dtype, ignore=(0,) if shape["lead"] != (1,)
                                        else ()), reduction=reduction, alpha=0.6, softcap=1.5)


@pytest.mark.parametrize("logit_scale", [30.0, 1e4], ids=["peaked", "huge-logits"])
def test_softcap_saturated_logits(backend, logit_scale):
    """Raw logits far beyond the cap: tanh saturates, every capped logit is within [-cap, cap], and the
    gradients (scaled by 1 - tanh^2, about 0 there) stay finite and match the oracle."""
    out = compare(backend, torch.float32, make_inputs(lead=(6,), d=5, vocab=19, logit_scale=logit_scale,
                                                      dtype=torch.float32), softcap=5.0)
    assert all(torch.isfinite(t).all() for t in out)


def test_softcap_gradcheck(backend):
    h1, h2, w, b, y = make_inputs(lead=(4,), d=3, vocab=7, ignore=(2,), logit_scale=2.0)
    leaves = [t.clone().requires_grad_() for t in (h1, h2, w, b)]

    def fn(a, c, w, b):
        out = dropreg.rdrop_linear_cross_entropy(a, c, w, y, linear_bias=b, alpha=0.7, reduction="none",
                                                 softcap=1.2, z_loss=0.1, backend=backend)
        return out.ce1, out.ce2, out.kl, out.loss

    assert torch.autograd.gradcheck(fn, leaves)


def test_softcap_identical_inputs_give_zero_kl(backend):
    h1, _, w, b, y = make_inputs(lead=(6,), d=5, vocab=40, logit_scale=4.0)
    h = h1.clone().requires_grad_()
    out = dropreg.rdrop_linear_cross_entropy(h, h, w, y, linear_bias=b, softcap=2.0, backend=backend,
                                             reduction="none")
    assert torch.all(out.kl == 0)
    assert torch.all(torch.autograd.grad(out.kl.sum(), h)[0] == 0)


@pytest.mark.parametrize("override,error,argument", [
    (dict(input2=torch.randn(5, 3, dtype=torch.float64)), ValueError, "input2"),
    (dict(input2=torch.randn(5, 4, dtype=torch.float32)), TypeError, "input2"),
    (dict(input1=torch.randn(5, 3, dtype=torch.float64)), ValueError, "input1"),
    (dict(alpha=-1.0), ValueError, "alpha"),
    (dict(target=torch.full((5,), 11)), ValueError, "target"),
    (dict(reduction="batchmean"), ValueError, "reduction"),
    (dict(backend="gpu"), ValueError, "backend"),
])
def test_bad_input(override, error, argument):
    h1, h2, w, b, y = make_inputs()
    args = dict(input1=h1, input2=h2, linear_weight=w, target=y)
    kwargs = {k: v for k, v in override.items() if k not in args}
    args.update({k: v for k, v in override.items() if k in args})
    with pytest.raises(error, match=rf"^{argument}:"):
        dropreg.rdrop_linear_cross_entropy(args["input1"], args["input2"], args["linear_weight"], args["target"],
                                           **kwargs)


def test_training_step_from_the_usage_page():
    torch.manual_seed(0)
    embed = torch.nn.Embedding(50, 16)
    body = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Dropout(0.3))
    lm_head = torch.nn.Linear(16, 50, bias=False)
    params = [*embed.parameters(), *body.parameters(), *lm_head.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.5)
    loss_fn = dropreg.RDropLoss(alpha=1.0, shift_labels=True)
    input_ids = torch.randint(0, 50, (4, 12))
    losses = []
    for _ in range(20):
        hidden1 = body(embed(input_ids))  # dropout on: two passes, two masks
        hidden2 = body(embed(input_ids))
        out = loss_fn(hidden1, hidden2, lm_head.weight, input_ids)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        assert out.kl > 0
    assert losses[-1] < losses[0]


RDROP_OPTIONS = {
    "weight": lambda v: dict(weight=torch.rand(v, dtype=torch.float64) * 2 + 0.1),
    "smoothing": lambda v: dict(label_smoothing=0.2),
    "z_loss": lambda v: dict(z_loss=0.3),
    "all": lambda v: dict(weight=torch.rand(v, dtype=torch.float64) + 0.5, label_smoothing=0.1, z_loss=0.05),
    "softcap+weight+z_loss": lambda v: dict(weight=torch.rand(v, dtype=torch.float64) + 0.5, z_loss=0.2, softcap=1.0),
    "softcap+all": lambda v: dict(weight=torch.rand(v, dtype=torch.float64) + 0.5, label_smoothing=0.3, z_loss=0.1,
                                  softcap=1.5),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(RDROP_OPTIONS))
def test_loss_options_against_oracle(backend, option, reduction):
    """Class weights, smoothing and z-loss act on each pass's cross entropy as F.cross_entropy's options (plus
    ``z_loss * lse^2``); the KL takes none, and its "mean" counts rows while the cross entropies' divides by the
    sum of ``w_y``."""
    vocab = 13
    options = RDROP_OPTIONS[option](vocab)
    h1, h2, w, b, y = make_inputs(lead=(2, 3), d=4, vocab=vocab, ignore=(1, 4))
    leaves64 = [t.clone().requires_grad_() for t in (h1, h2, w, b)]
    softcap = options.get("softcap")
    (kl_terms, logits) = authors_terms(*leaves64, y, "none", softcap)
    kl_rows = kl_terms[2].reshape(-1)
    flat_y = y.reshape(-1)
    valid = flat_y != -100
    class_weight = options.get("weight")
    ce_rows, z_rows = [], torch.zeros(flat_y.shape, dtype=torch.float64)
    for h in leaves64[:2]:
        z = softcapped(h.reshape(-1, 4) @ leaves64[2].T + leaves64[3], softcap)
        ce_rows.append(F.cross_entropy(z, flat_y, weight=class_weight, reduction="none",
                                       label_smoothing=options.get("label_smoothing", 0.0)))
        z_rows = z_rows + options.get("z_loss", 0.0) * torch.where(valid, torch.logsumexp(z, -1), 0.0) ** 2
    if reduction == "none":
        terms = [t.reshape(y.shape) for t in (*ce_rows, kl_rows, z_rows)]
    else:
        ce_count = (class_weight[flat_y[valid]].sum() if class_weight is not None else valid.sum()).double()
        kl_count = valid.sum().double()
        if reduction == "sum":
            ce_count = kl_count = 1.0
        terms = [ce_rows[0].sum() / ce_count, ce_rows[1].sum() / ce_count, kl_rows.sum() / kl_count,
                 z_rows.sum() / ce_count]
    ce1, ce2, kl, z_term = terms
    oracle_terms = [ce1, ce2, kl, ce1 + ce2 + 0.7 * kl + z_term, z_term]
    names = NAMES_AND_LOSS + ("z_loss",)
    cotangent = torch.randn(y.shape, dtype=torch.float64)
    oracle = _terms_and_grads(oracle_terms, leaves64, cotangent, names)
    leaves = [t.detach().clone().requires_grad_() for t in leaves64]
    out = dropreg.rdrop_linear_cross_entropy(leaves[0], leaves[1], leaves[2], y, linear_bias=leaves[3], alpha=0.7,
                                             reduction=reduction, backend=backend, **options)
    ours = _terms_and_grads(tuple(out), leaves, cotangent, names)
    z_scale = 1.0 + float(logits.abs().max())
    floor = rdrop_floors(h1, h2, w, y, reduction)
    oracle_labelled = labelled(oracle, names, LEAVES)
    for label, value in labelled(ours, names, LEAVES).items():
        assert_within_rounding(label, value, oracle_labelled[label], torch.float64, z_scale, floor=floor(label))


def test_bad_softcap_is_a_clear_error():
    h, w, y = torch.randn(4, 3), torch.randn(7, 3), torch.randint(0, 7, (4,))
    with pytest.raises(ValueError, match="softcap: expected a finite, positive float or None"):
        dropreg.rdrop_linear_cross_entropy(h, h, w, y, softcap=-1.0)
    with pytest.raises(ValueError, match="z_loss: expected a finite, non-negative float"):
        dropreg.rdrop_linear_cross_entropy(h, h, w, y, z_loss=-1.0)


@pytest.mark.parametrize("ignore_index", [3, -1])
def test_custom_ignore_index_acts_as_minus_100(backend, ignore_index):
    h1, h2, w, b, y = make_inputs(lead=(6,), d=4, vocab=9)
    y[[0, 4]] = ignore_index
    leaves = [t.clone().requires_grad_() for t in (h1, h2, w, b)]

    def run(target, index):
        out = dropreg.rdrop_linear_cross_entropy(*leaves[:3], target, linear_bias=leaves[3], ignore_index=index,
                                                 reduction="none", backend=backend)
        return out.ce1, out.ce2, out.kl
    assert_ignore_index_acts_as_minus_100(run, y, ignore_index, leaves)
    module = dropreg.RDropLoss(ignore_index=ignore_index, backend=backend)
    assert_ignore_index_acts_as_minus_100(
        lambda target, index: (module if index != -100 else dropreg.RDropLoss(backend=backend))(
            *leaves[:3], target, leaves[3]).loss.reshape(1), y, ignore_index, leaves)
