"""Cross entropy alone under "mean"/"sum": the gradients are formed in the forward (docs/math.md, "CE only").

The path is checked against the float64 oracle on the odd shapes, the softmax regimes and ignored rows; against the
per-row path; for its GEMM count (3 NVd, 2 without gradients); for thread counts and row blocks; and as a
registered op (opcheck)."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dropreg
import dropreg.plan
import dropreg.streamed
from conftest import small_blocks, use_backend
from checks import assert_close_to_oracle, assert_loss_close_to_oracle, make_problem, run_dropreg, run_oracle

CE_ONLY = dict(explicit=False, implicit=False)
# "-small-blocks": 3-row blocks and 5-entry vocabulary chunks, so several row blocks and tails are exercised
# (the C++ kernel's vocabulary panels are 2048 wide: test_cpu_thread_counts covers several).
# "chunked-triton": the GPU path's CE-only driver with 3-row blocks, 5-entry chunks and the Triton epilogues.
CE_BACKENDS = ["torch", "torch-small-blocks", "cpu", "cpu-small-blocks", "chunked", "chunked-triton"]
if torch.get_default_device().type == "cuda":  # tests/conftest.py, DROPREG_TEST_DEVICE=cuda: no C++ backend
    CE_BACKENDS = [name for name in CE_BACKENDS if not name.startswith("cpu")]


@pytest.fixture(params=CE_BACKENDS)
def ce_backend(request):
    name = request.param
    if name.endswith("-small-blocks"):
        return dropreg.get_backend(name[: -len("-small-blocks")]).with_plan(small_blocks(3, 5))
    return use_backend(name)


SHAPES = [
    dict(lead=(1,), d=1, vocab=1),
    dict(lead=(1,), d=1, vocab=7),
    dict(lead=(2, 3), d=5, vocab=257),
    dict(lead=(7,), d=3, vocab=600),
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"lead{s['lead']}-d{s['d']}-V{s['vocab']}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_oracle(ce_backend, reduction, dtype, shape, bias):
    problem = make_problem(**shape, bias=bias, dtype=dtype, reduction=reduction, **CE_ONLY)
    ours, cotangent = run_dropreg(problem, dtype, ce_backend)
    assert_close_to_oracle(ours, run_oracle(problem, cotangent), dtype, problem)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignore", [(0, 3), (0, 1, 2, 3, 4, 5, 6)], ids=["some-ignored", "all-ignored"])
def test_ignored_rows(ce_backend, reduction, ignore):
    problem = make_problem(lead=(7,), d=4, vocab=300, ignore=ignore, reduction=reduction, **CE_ONLY)
    ours, cotangent = run_dropreg(problem, torch.float64, ce_backend)
    assert_close_to_oracle(ours, run_oracle(problem, cotangent), torch.float64, problem)
    if len(ignore) == 7:
        values, grads = ours
        assert values["ce"] == 0
        assert all(torch.all(g == 0) for g in grads["ce"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("logit_scale", [1e-3, 30.0, 1e4], ids=["flat", "peaked", "huge-logits"])
def test_softmax_regimes(ce_backend, dtype, logit_scale):
    problem = make_problem(lead=(6,), d=5, vocab=290, logit_scale=logit_scale, dtype=dtype, **CE_ONLY)
    ours, cotangent = run_dropreg(problem, dtype, ce_backend)
    assert all(torch.isfinite(v).all() for v in ours[0].values())
    assert_close_to_oracle(ours, run_oracle(problem, cotangent), dtype, problem)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("options", [dict(z_loss=0.3), dict(z_loss=0.05, weight="random", label_smoothing=0.2)],
                         ids=["z_loss", "z_loss-weight-smoothing"])
@pytest.mark.parametrize("logit_scale", [1.0, 30.0], ids=["typical", "peaked"])
def test_z_loss_fused_matches_oracle(ce_backend, reduction, options, logit_scale):
    """z-loss in the CE-only path (docs/math.md 3.5): the values of ce and z_loss and the gradient of their sum."""
    if options.get("weight") == "random":
        options = dict(options, weight=torch.rand(257, dtype=torch.float64) + 0.5)
    problem = make_problem(lead=(2, 3), d=5, vocab=257, ignore=(2,), logit_scale=logit_scale, reduction=reduction,
                           **options, **CE_ONLY)
    assert_loss_close_to_oracle(problem, torch.float64, ce_backend)


def test_z_loss_fused_needs_equal_upstreams(ce_backend):
    """The fused path keeps the gradient of ce + z_loss only: back-propagating one of them alone is refused."""
    h = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(40, 3, requires_grad=True)
    y = torch.randint(0, 40, (5,))
    out = dropreg.linear_cross_entropy(h, w, y, z_loss=1e-2, backend=ce_backend, **CE_ONLY)
    with pytest.raises(RuntimeError, match="cross entropy and z_loss were fused in the CE-only path"):
        out.ce.backward(retain_graph=True)
    (2 * out.ce + 2 * out.z_loss).backward()  # equal weights: fine
    assert torch.isfinite(w.grad).all()


def _value_and_grads(leaves, y, backend, reduction, upstream=1.0):
    h, w, b = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
    out = dropreg.linear_cross_entropy(h, w, y, linear_bias=b, reduction=reduction, backend=backend, **CE_ONLY)
    loss = out.ce.sum() if reduction == "none" else out.ce
    (loss * upstream).backward()
    return [loss.detach()] + [t.grad for t in (h, w, b)]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_equals_the_per_row_path(ce_backend, reduction):
    """The same numbers as the per-row path (reduction "none", reduced by hand), with a non-unit upstream scalar."""
    h = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(150, 6, dtype=torch.float64, requires_grad=True)  # many chunks of every test plan
    b = torch.randn(150, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 150, (11,))
    y[4] = -100
    fused = _value_and_grads((h, w, b), y, ce_backend, reduction, upstream=-2.5)
    scale = 1.0 if reduction == "sum" else 1.0 / 10
    per_row = _value_and_grads((h, w, b), y, ce_backend, "none", upstream=-2.5 * scale)
    per_row[0] = per_row[0] * scale
    for ours, reference in zip(fused, per_row):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-14)


class CountMultiplyAdds(TorchDispatchMode):
    """Multiply-adds of every matrix product that runs, in-place and out= forms included."""

    PRODUCTS = {"aten::mm": 0, "aten::addmm": 1, "aten::addmm_": 1, "aten::bmm": 0, "aten::baddbmm": 1}

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = self.PRODUCTS.get(func._schema.name)
        if first is not None:
            a, b = args[first], args[first + 1]
            self.total += a.numel() * b.shape[-1]
        return func(*args, **(kwargs or {}))


def _multiply_adds(fn):
    with CountMultiplyAdds() as counter:
        fn()
    return counter.total


@pytest.mark.parametrize("wants", [(True, True, True), (True, False, False), (False, True, True),
                                   (False, False, False)], ids=["all", "input-only", "head-only", "none"])
def test_gemm_count(wants):
    """N V d multiply-adds per GEMM: z, then G W for the input and G^T h for the weight, only for what needs a gradient.
    The per-row path costs 4 GEMMs (z, and its recompute in the backward). Counted on the "torch" backend,
    whose GEMMs are visible to the flop counter."""
    n, d, v = 64, 16, 300
    h = torch.randn(n, d, requires_grad=wants[0])
    w = torch.randn(v, d, requires_grad=wants[1])
    b = torch.randn(v, requires_grad=wants[2])
    y = torch.randint(0, v, (n,))

    def step():
        loss = dropreg.linear_cross_entropy(h, w, y, linear_bias=b, backend="torch", **CE_ONLY).loss
        if loss.requires_grad:
            loss.backward()

    gemms = 1 + wants[0] + wants[1]
    assert _multiply_adds(step) == gemms * n * v * d


def test_no_grad_allocates_no_gradients():
    h = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(40, 3, requires_grad=True)
    y = torch.randint(0, 40, (5,))
    with torch.no_grad():
        for backend in CE_BACKENDS[::2]:
            out = dropreg.linear_cross_entropy(h, w, y, backend=backend, **CE_ONLY)
            assert not out.ce.requires_grad
            torch.testing.assert_close(out.ce, torch.nn.functional.cross_entropy(h @ w.T, y))


@pytest.mark.cpu_only
# The C++ panels are 2048 wide, narrower when there are more threads than panels: 1 thread, V=1100 is one
# panel; 3 threads make 3 panels of both vocabularies; 8 threads 5 and 8 panels of 256 (the last partial).
@pytest.mark.parametrize("vocab", [1100, 4500])
@pytest.mark.parametrize("threads", [1, 3, 8])
def test_cpu_thread_counts(threads, vocab):
    h = torch.randn(50, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(vocab, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, vocab, (50,))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = _value_and_grads((h, w, b), y, "cpu", "mean")
    finally:
        torch.set_num_threads(previous)
    for a, r in zip(ours, _value_and_grads((h, w, b), y, "reference", "mean")):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-13)


def test_bfloat16_gradients_come_back_in_the_parameters_dtype():
    h = torch.randn(9, 8, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(300, 8, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 300, (9,))
    for backend in CE_BACKENDS[::2]:
        h.grad = w.grad = None
        out = dropreg.linear_cross_entropy(h, w, y, backend=backend, **CE_ONLY)
        out.loss.backward()
        assert h.grad.dtype == w.grad.dtype == torch.bfloat16 and out.ce.dtype == torch.float32
        reference = torch.nn.functional.cross_entropy(h.double() @ w.double().T, y)
        assert abs(float(out.ce) - float(reference)) <= 2**-7 * (1 + abs(float(reference)))


@pytest.mark.cpu_only
@pytest.mark.parametrize("mask", [[True, True, True], [False, True, False], [False, False, False]])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(mask, bias):
    dropreg.cpu.load()
    h = torch.randn(9, 4, requires_grad=mask[0])
    w = torch.randn(300, 4, requires_grad=mask[1])
    b = torch.randn(300, requires_grad=mask[2]) if bias else None
    y = torch.randint(0, 300, (9,))
    row_weight = torch.rand(9)
    for z_weight in (None, torch.rand(9)):
        torch.library.opcheck(torch.ops.dropreg.linear_ce_with_grads.default,
                              (h, w, b, y, row_weight, z_weight, 4, mask))


def test_workspace_setting():
    device = torch.device("cpu")
    default = dropreg.workspace_bytes(device)
    previous = dropreg.set_workspace_bytes(8 << 20, device)
    try:
        assert previous == default and dropreg.workspace_bytes(device) == 8 << 20
        assert dropreg.plan.ce_only_blocks(10**6, 2**15, torch.float32, device)[0] == (8 << 20) // 2**17
        assert dropreg.plan.ce_only_blocks(5, 2**15, torch.float32, device)[0] == 5
        assert dropreg.plan.ce_only_blocks(5, 2**40, torch.float32, device)[0] == 1
        with pytest.raises(ValueError, match="size: expected at least"):
            dropreg.set_workspace_bytes(1000, device)
        with pytest.raises(TypeError, match="size: expected an int"):
            dropreg.set_workspace_bytes(1.5e9, device)
    finally:
        dropreg.set_workspace_bytes(None, device)
    assert dropreg.workspace_bytes(device) == default == 256 << 20
    assert dropreg.workspace_bytes("cuda") == 1 << 30
    # The default CPU workspace holds CPU_CE_BLOCK_ROWS rows at V = 2^17; smaller vocabularies stop at the cap,
    # larger ones take what fits. A CUDA device takes all the workspace holds.
    cap = dropreg.plan.CPU_CE_BLOCK_ROWS
    assert [dropreg.plan.ce_only_blocks(10**6, v, torch.float32, device)[0] for v in (2**13, 2**17, 2**18)] == \
        [cap, (256 << 20) // 2**19, (256 << 20) // 2**20] == [512, 512, 256]
    assert dropreg.plan.ce_only_blocks(10**6, 2**15, torch.float32, "cuda")[0] == (1 << 30) // 2**17


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_vocabulary_range_masked_by_minus_inf_bias(backend):
    """A whole C++ panel (and "torch" chunk) of -inf logits drops out of the softmax, as in F.cross_entropy."""
    if backend == "cpu" and torch.get_default_device().type != "cpu":
        pytest.skip("the C++ kernels take CPU tensors")
    v = 4500
    h = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, dtype=torch.float64)
    b[:2048] = float("-inf")
    b[3000:3100] = float("-inf")
    y = torch.randint(2048, 3000, (6,))
    ours = _value_and_grads((h, w, b), y, backend, "mean")
    logits = h.detach() @ w.detach().T + b
    hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    reference = torch.nn.functional.cross_entropy(hh @ ww.T + b, y)
    reference.backward()
    assert torch.isfinite(logits.logsumexp(1)).all()
    torch.testing.assert_close(ours[0], reference.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[1], hh.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[2], ww.grad, rtol=1e-12, atol=1e-12)


# A softcapped head (docs/math.md 3.6) on the CE-only path: the kernels cap the logits in place, and label
# smoothing's S = sum_v omega_v z_v is formed in the same pass (3.7).
CAPPED_OPTIONS = {
    "plain": dict(),
    "z_loss": dict(z_loss=0.2),
    "smoothing": dict(label_smoothing=0.1),
    "weight-smoothing-z_loss": dict(weight="random", label_smoothing=0.3, z_loss=0.05),
}


def _capped_problem(option, vocab, **kwargs):
    options = dict(CAPPED_OPTIONS[option])
    if options.get("weight") == "random":
        options["weight"] = torch.rand(vocab, dtype=torch.float64) + 0.5
    return make_problem(vocab=vocab, **options, **kwargs, **CE_ONLY)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("option", list(CAPPED_OPTIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"lead{s['lead']}-d{s['d']}-V{s['vocab']}")
def test_softcap_matches_oracle(ce_backend, reduction, option, shape):
    """logit_scale 3 with softcap 2 puts entries on tanh's linear and saturated parts; the oracle caps the logits
    before F.cross_entropy. Every value and the gradient of ``.loss`` (the z-loss's is fused into it)."""
    shape = dict(shape)
    problem = _capped_problem(option, shape.pop("vocab"), **shape, logit_scale=3.0, softcap=2.0, reduction=reduction,
                              ignore=(0,) if shape["lead"] != (1,) else ())
    assert_loss_close_to_oracle(problem, torch.float64, ce_backend)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("logit_scale", [1e-3, 30.0, 1e4], ids=["flat", "peaked", "huge-logits"])
def test_softcap_softmax_regimes(ce_backend, dtype, logit_scale):
    """Raw logits of 1e4 saturate tanh (the cap's derivative underflows, the capped softmax is flat across the
    saturated classes); the cap is 10."""
    problem = _capped_problem("weight-smoothing-z_loss", 290, lead=(6,), d=5, logit_scale=logit_scale, dtype=dtype,
                              softcap=10.0)
    assert_loss_close_to_oracle(problem, dtype, ce_backend)


def test_softcap_all_rows_ignored(ce_backend):
    problem = _capped_problem("weight-smoothing-z_loss", 300, lead=(4,), d=3, ignore=(0, 1, 2, 3), softcap=2.0)
    (values, grads), _ = run_dropreg(problem, torch.float64, ce_backend, cotangent=torch.ones(()),
                                     gradients_of="loss")
    assert all(v == 0 for v in values.values())
    assert all(torch.all(g == 0) for g in grads["ce"])


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.cpu_only
@pytest.mark.parametrize("option", ["plain", "weight-smoothing-z_loss"])
def test_softcap_takes_the_fused_op(option):
    """On "cpu" a capped head's cross entropy runs the one CE-only op, not the capped passes of the per-row path."""
    problem = _capped_problem(option, 300, lead=(5,), d=4, softcap=3.0)
    with RecordOps() as ops:
        run_dropreg(problem, torch.float32, "cpu", cotangent=torch.ones(()), gradients_of="loss")
    assert "dropreg::linear_ce_with_grads" in ops.names
    assert not {"dropreg::softcap_statistics", "dropreg::softcap_gradient_sweep"} & ops.names


@pytest.mark.parametrize("capping", [dict(softcap=5.0), dict(softcap=5.0, label_smoothing=0.1, z_loss=1e-3)],
                         ids=["softcap", "softcap-smoothing-z_loss"])
def test_softcap_gemm_count(capping):
    """A capped head costs the uncapped CE-only GEMMs, 3 NVd: the cap and smoothing's sum are elementwise."""
    n, d, v = 64, 16, 300
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    b = torch.randn(v, requires_grad=True)
    y = torch.randint(0, v, (n,))

    def step():
        dropreg.linear_cross_entropy(h, w, y, linear_bias=b, backend="torch", **capping, **CE_ONLY).loss.backward()

    assert _multiply_adds(step) == 3 * n * v * d


def _op_outputs(backend_fn, h, w, b, y, row_weight, z_weight, softcap, omega, smoothing_rows):
    """The CE-only op's four outputs (loss pair, grad_h, grad_w, grad_b), all gradients wanted."""
    if backend_fn == "cpu":
        return torch.ops.dropreg.linear_ce_with_grads(h, w, b, y, row_weight, z_weight, 7, [True, True, True],
                                                      softcap, omega, smoothing_rows)
    return dropreg.streamed.ce_with_grads(h, w, b, y, row_weight, (True, True, True), 7, 5, z_weight,
                                          softcap=softcap, smoothing_weights=omega,
                                          smoothing_row_weight=smoothing_rows)


@pytest.mark.cpu_only
# V=4500 with 3 threads: 3 panels, the last partial; 1 thread, V=1100: one panel. Uncapped smoothing is not a path
# the API takes (it needs no pass over the vocabulary, docs/math.md 3.4) but the op defines it: checked too.
@pytest.mark.parametrize("threads,vocab", [(1, 1100), (3, 4500)], ids=["1-thread", "3-threads"])
@pytest.mark.parametrize("softcap", [None, 2.0], ids=["uncapped", "capped"])
def test_cpu_op_matches_the_streamed_definition(threads, vocab, softcap):
    dropreg.cpu.load()
    h = torch.randn(17, 6, dtype=torch.float64) * 2
    w = torch.randn(vocab, 6, dtype=torch.float64)
    b = torch.randn(vocab, dtype=torch.float64)
    y = torch.randint(0, vocab, (17,))
    row_weight, z_weight, smoothing_rows = torch.rand(17, dtype=torch.float64), torch.rand(17, dtype=torch.float64), \
        torch.rand(17, dtype=torch.float64)
    omega = torch.rand(vocab, dtype=torch.float64) / vocab
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = _op_outputs("cpu", h, w, b, y, row_weight, z_weight, softcap, omega, smoothing_rows)
    finally:
        torch.set_num_threads(previous)
    definition = _op_outputs("torch", h, w, b, y, row_weight, z_weight, softcap, omega, smoothing_rows)
    for a, r in zip(ours, definition):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    # smoothing's part is really there: without it the loss differs by sum_n rs_n S_n
    plain = _op_outputs("cpu", h, w, b, y, row_weight, z_weight, softcap, None, None)
    capped = h @ w.T + b if softcap is None else softcap * torch.tanh((h @ w.T + b) / softcap)
    torch.testing.assert_close(plain[0][0] - ours[0][0], (smoothing_rows * (capped @ omega)).sum(), rtol=1e-10,
                               atol=1e-12)


@pytest.mark.cpu_only
def test_opcheck_softcap_and_smoothing():
    dropreg.cpu.load()
    h = torch.randn(9, 4, requires_grad=True)
    w = torch.randn(300, 4, requires_grad=True)
    b = torch.randn(300, requires_grad=True)
    y = torch.randint(0, 300, (9,))
    for omega, rows in ((None, None), (torch.rand(300) / 300, torch.rand(9))):
        torch.library.opcheck(torch.ops.dropreg.linear_ce_with_grads.default,
                              (h, w, b, y, torch.rand(9), torch.rand(9), 4, [True, True, True], 3.0, omega, rows))


@pytest.mark.cpu_only
@pytest.mark.parametrize("bad,message", [
    (dict(softcap=0.0), "softcap must be > 0"),
    (dict(smoothing_weights=torch.rand(300)), "smoothing_weights and smoothing_row_weight are given together"),
    (dict(smoothing_weights=torch.rand(299), smoothing_row_weight=torch.rand(9)),
     r"smoothing_weights must have shape \(300,\), got"),
    (dict(smoothing_weights=torch.rand(300), smoothing_row_weight=torch.rand(8)),
     r"smoothing_row_weight must have shape \(9,\), got"),
], ids=["softcap", "unpaired", "omega-shape", "rows-shape"])
def test_op_refuses_bad_capping_arguments(bad, message):
    dropreg.cpu.load()
    args = dict(dict(softcap=3.0, smoothing_weights=None, smoothing_row_weight=None), **bad)
    for device in ("cpu", "meta"):  # the C++ kernel and the fake kernel say the same
        h, w, y = torch.randn(9, 4, device=device), torch.randn(300, 4, device=device), torch.zeros(9, dtype=torch.long,
                                                                                                     device=device)
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        with pytest.raises(RuntimeError, match=message):
            torch.ops.dropreg.linear_ce_with_grads(h, w, None, y, torch.ones(9, device=device), None, 4,
                                                   [True, True, False], **moved)
