"""Class weights, label smoothing (F.cross_entropy's ``weight`` and ``label_smoothing``) and z_loss on every backend,
against the float64 oracle, whose row loss is F.cross_entropy's with those options plus ``z_loss * lse^2``
(docs/math.md 3.4, 3.5)."""
import pytest
import torch
import torch.nn.functional as F

import dropreg
import dropreg.cpu
from checks import assert_close_to_oracle, assert_loss_close_to_oracle, make_problem, run_dropreg, run_oracle
from conftest import as_backend

V = 13


def _class_weight():
    return torch.rand(V, dtype=torch.float64) * 2 + 0.1


OPTIONS = {
    "weight": lambda: dict(weight=_class_weight()),
    "smoothing": lambda: dict(label_smoothing=0.2),
    "both": lambda: dict(weight=_class_weight(), label_smoothing=0.35),
    "full-smoothing": lambda: dict(label_smoothing=1.0),
    "z_loss": lambda: dict(z_loss=0.3),
    "z_loss-weight-smoothing": lambda: dict(z_loss=0.05, weight=_class_weight(), label_smoothing=0.2),
}
TERMS = {
    "all-terms": dict(),
    "ce-only": dict(explicit=False, implicit=False),
    "implicit-only": dict(explicit=False),
    "explicit-only": dict(implicit=False),
}


@pytest.mark.parametrize("terms", list(TERMS))
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_oracle(backend, option, terms, reduction):
    problem = make_problem(lead=(2, 3), d=4, vocab=V, ignore=(1,), reduction=reduction, **OPTIONS[option](),
                           **TERMS[terms])
    _assert_matches_oracle(problem, torch.float64, backend)


def _assert_matches_oracle(problem, dtype, backend):
    """Every term and gradient against the oracle; where the CE-only path fused the z-loss in, every value and the
    gradient of ``.loss``."""
    if _fused_ce_and_z_loss(problem, backend):
        assert_loss_close_to_oracle(problem, dtype, backend)
        return
    ours, cotangent = run_dropreg(problem, dtype, backend)
    assert_close_to_oracle(ours, run_oracle(problem, cotangent), dtype, problem)


def _fused_ce_and_z_loss(problem, backend):
    """Whether the call takes the CE-only path with the z-loss fused in: its gradients exist only as a sum."""
    kwargs = problem.kwargs
    implementation = as_backend(backend)
    fused = (implementation.ce_with_grads if kwargs.get("softcap") is None
             else implementation.ce_with_grads_softcap) is not None
    return (fused and kwargs.get("z_loss") and not kwargs.get("explicit", True)
            and not kwargs.get("implicit", True) and kwargs.get("reduction", "mean") != "none")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_float32_and_no_bias(backend, dtype, bias):
    problem = make_problem(lead=(7,), d=3, vocab=V, bias=bias, dtype=dtype, p=0.3, ignore=(0, 4),
                           weight=_class_weight(), label_smoothing=0.1, z_loss=0.2)
    ours, cotangent = run_dropreg(problem, dtype, backend)
    assert_close_to_oracle(ours, run_oracle(problem, cotangent), dtype, problem)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ce_equals_f_cross_entropy(backend, reduction):
    """With both terms off, ``ce`` is F.cross_entropy with the same weight, label_smoothing and ignore_index."""
    h = torch.randn(9, 5, dtype=torch.float64)
    w = torch.randn(V, 5, dtype=torch.float64)
    b = torch.randn(V, dtype=torch.float64)
    y = torch.randint(0, V, (9,))
    y[[2, 5]] = -100
    class_weight = _class_weight()
    ours = dropreg.linear_cross_entropy(h, w, y, linear_bias=b, explicit=False, implicit=False, weight=class_weight,
                                        label_smoothing=0.15, reduction=reduction, backend=backend).ce
    theirs = F.cross_entropy(h @ w.T + b, y, weight=class_weight, label_smoothing=0.15, reduction=reduction)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_all_rows_ignored_gives_zero():
    h = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(V, 3, requires_grad=True)
    y = torch.full((4,), -100)
    out = dropreg.linear_cross_entropy(h, w, y, weight=torch.rand(V) + 0.5, label_smoothing=0.1)
    out.loss.backward()
    assert out.loss == 0 and torch.all(h.grad == 0) and torch.all(w.grad == 0)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(label_smoothing=1.5), ValueError, "label_smoothing: expected a float in [0, 1]"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing: expected a float in [0, 1]"),
    (dict(label_smoothing="0.1"), TypeError, "label_smoothing: expected a float"),
    (dict(weight=torch.ones(V + 1)), ValueError, f"weight: expected shape ({V},)"),
    (dict(weight=torch.ones(V, dtype=torch.long)), TypeError, "weight: expected a floating-point tensor"),
    (dict(weight=[1.0] * V), TypeError, "weight: expected a 1-D tensor of class weights"),
    (dict(weight=torch.full((V,), float("nan"))), ValueError, "weight: expected finite class weights"),
    (dict(z_loss=-1e-4), ValueError, "z_loss: expected a finite, non-negative float"),
    (dict(z_loss=float("inf")), ValueError, "z_loss: expected a finite, non-negative float"),
    (dict(z_loss="1e-4"), TypeError, "z_loss: expected a non-negative float"),
    (dict(return_lse=1), TypeError, "return_lse: expected a bool"),
])
def test_bad_options_are_clear_errors(kwargs, error, message):
    h, w, y = torch.randn(4, 3), torch.randn(V, 3), torch.randint(0, V, (4,))
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        dropreg.linear_cross_entropy(h, w, y, **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_z_loss_and_lse_equal_their_definitions(backend, reduction):
    """``.z_loss`` is ``z_loss * logsumexp(z)^2`` reduced like ``ce`` (ignored rows out), ``return_lse=True`` adds
    the per-row logsumexp (0 on ignored rows) whatever the reduction, and ``.loss`` includes the z-loss."""
    h = torch.randn(3, 4, 5, dtype=torch.float64)
    w = torch.randn(V, 5, dtype=torch.float64)
    b = torch.randn(V, dtype=torch.float64)
    y = torch.randint(0, V, (3, 4))
    y[1, 2] = y[2, 0] = -100
    out, ours_lse = dropreg.linear_cross_entropy(h, w, y, linear_bias=b, z_loss=1e-2, return_lse=True,
                                                 reduction=reduction, backend=backend)
    lse = torch.where(y != -100, torch.logsumexp(h @ w.T + b, -1), torch.zeros(()))
    torch.testing.assert_close(ours_lse, lse, rtol=1e-12, atol=1e-12)
    per_row = 1e-2 * lse**2
    expected = {"none": per_row, "sum": per_row.sum(), "mean": per_row.sum() / (y != -100).sum()}[reduction]
    torch.testing.assert_close(out.z_loss, expected, rtol=1e-12, atol=1e-12)


def test_z_loss_is_zero_when_off():
    h, w, y = torch.randn(4, 3), torch.randn(V, 3), torch.randint(0, V, (4,))
    out = dropreg.linear_cross_entropy(h, w, y)
    assert out.z_loss.shape == () and out.z_loss == 0


def test_lse_gradient_is_softmax(backend):
    """The returned lse is differentiable: d(sum lse)/dz = softmax, so d/dh = mu and d/dW = S^T H."""
    h = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (6,))
    _, lse = dropreg.linear_cross_entropy(h, w, y, explicit=False, implicit=False, return_lse=True,
                                          backend=backend)
    grads = torch.autograd.grad(lse.sum(), (h, w))
    expected = torch.autograd.grad(torch.logsumexp(h @ w.T, -1).sum(), (h, w))
    for ours, theirs in zip(grads, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


SOFTCAP_OPTIONS = {
    "plain": lambda: dict(),
    "z_loss": lambda: dict(z_loss=0.2),
    "weight-z_loss": lambda: dict(weight=_class_weight(), z_loss=0.05),
    # smoothing's capped part is streamed apart (docs/math.md 3.7)
    "smoothing": lambda: dict(label_smoothing=0.1),
    "weight-smoothing-z_loss": lambda: dict(weight=_class_weight(), label_smoothing=0.3, z_loss=0.05),
}


@pytest.mark.parametrize("terms", list(TERMS))
@pytest.mark.parametrize("option", list(SOFTCAP_OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_softcap_matches_oracle(backend, option, terms, reduction):
    """The oracle caps the logits before F.cross_entropy and takes every term by autograd; logit_scale 3 with
    softcap 2 puts rows across tanh's linear and saturated parts."""
    problem = make_problem(lead=(2, 3), d=4, vocab=V, ignore=(1,), reduction=reduction, logit_scale=3.0,
                           softcap=2.0, **SOFTCAP_OPTIONS[option](), **TERMS[terms])
    _assert_matches_oracle(problem, torch.float64, backend)


@pytest.mark.parametrize("shape", [dict(lead=(1,), d=1), dict(lead=(17,), d=1), dict(lead=(1,), d=6)],
                         ids=["N1-d1", "d1", "N1"])
@pytest.mark.parametrize("logit_scale", [1e-3, 1.0, 30.0, 1e4], ids=["flat", "typical", "peaked", "huge"])
def test_softcap_odd_shapes_and_logit_sizes(backend, shape, logit_scale):
    """Flat, peaked and huge raw logits (1e4 saturates tanh: c underflows to 0 and the capped softmax is flat
    across the saturated classes), N=1 and d=1, in float64; the cap is 10."""
    problem = make_problem(**shape, vocab=V, logit_scale=logit_scale, softcap=10.0, z_loss=0.01, p=0.3,
                           label_smoothing=0.1)
    ours, cotangent = run_dropreg(problem, torch.float64, backend)
    assert_close_to_oracle(ours, run_oracle(problem, cotangent), torch.float64, problem)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_softcap_float32_and_no_bias(backend, dtype, bias):
    problem = make_problem(lead=(7,), d=3, vocab=V, bias=bias, dtype=dtype, p=0.3, ignore=(0, 4), logit_scale=4.0,
                           softcap=3.0, weight=_class_weight(), z_loss=0.1, label_smoothing=0.2)
    ours, cotangent = run_dropreg(problem, dtype, backend)
    assert_close_to_oracle(ours, run_oracle(problem, cotangent), dtype, problem)


def test_softcap_ce_equals_capped_f_cross_entropy(backend):
    h = torch.randn(9, 5, dtype=torch.float64)
    w = torch.randn(V, 5, dtype=torch.float64) * 4
    y = torch.randint(0, V, (9,))
    y[3] = -100
    ours = dropreg.linear_cross_entropy(h, w, y, softcap=7.0, backend=backend).ce
    theirs = F.cross_entropy(7.0 * torch.tanh(h @ w.T / 7.0), y)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_a_backend_without_softcap_is_skipped_by_auto_and_refused():
    """A backend built without ``linear_ce_softcap`` (docs/math.md 3.6: every built-in one has it)."""
    import dataclasses
    torch_backend = dropreg.get_backend("torch")
    capless = dataclasses.replace(torch_backend, name="capless", linear_ce_softcap=None)
    device = torch.device("cpu")
    assert dropreg._dispatch.pick_auto([capless, torch_backend], device) is capless
    assert dropreg._dispatch.pick_auto([capless, torch_backend], device, softcap=True) is torch_backend
    assert dropreg._dispatch.pick_auto([capless], device, softcap=True) is None
    h, w, y = torch.randn(4, 3), torch.randn(V, 3), torch.randint(0, V, (4,))
    with pytest.raises(ValueError, match="softcap: backend 'capless' does not implement a softcapped head"):
        dropreg.linear_cross_entropy(h, w, y, softcap=5.0, backend=capless)


def test_softcap_all_rows_ignored_gives_zero(streamed_backend):
    h = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(V, 3, requires_grad=True)
    out = dropreg.linear_cross_entropy(h, w, torch.full((4,), -100), softcap=5.0, z_loss=1e-3,
                                       backend=streamed_backend)
    out.loss.backward()
    assert out.loss == 0 and torch.all(h.grad == 0) and torch.all(w.grad == 0)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(softcap=0.0), ValueError, "softcap: expected a finite, positive float or None"),
    (dict(softcap=-3.0), ValueError, "softcap: expected a finite, positive float or None"),
    (dict(softcap=float("nan")), ValueError, "softcap: expected a finite, positive float or None"),
    (dict(softcap="30"), TypeError, "softcap: expected a positive float or None"),
    (dict(softcap=1e39), ValueError, "softcap: expected a value in fp32's normal range"),  # s tanh(z / s): inf * 0
    (dict(softcap=1e-46), ValueError, "softcap: expected a value in fp32's normal range"),  # rounds to 0 in fp32
])
def test_bad_softcap_is_a_clear_error(kwargs, error, message):
    h, w, y = torch.randn(4, 3), torch.randn(V, 3), torch.randint(0, V, (4,))
    with pytest.raises(error, match=message):
        dropreg.linear_cross_entropy(h, w, y, backend="torch", **kwargs)


@pytest.mark.cpu_only
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("terms", ["all-terms", "implicit-only", "explicit-only", "ce-only"])
def test_cpp_softcap_passes_over_many_tiles(terms, threads):
    """csrc/softcap.cpp with several 256-row blocks and 256-class tiles (N=300, V=700: tails in both) and thread
    counts, against the reference backend in float64 (every term, every gradient, z-loss, class weights and label
    smoothing, whose S the C++ passes form)."""
    h = torch.randn(300, 5, dtype=torch.float64)
    w = torch.randn(700, 5, dtype=torch.float64)
    b = torch.randn(700, dtype=torch.float64)
    y = torch.randint(0, 700, (300,))
    y[::7] = -100
    options = dict(p=0.3, seed=4, softcap=2.5, z_loss=0.01, weight=torch.rand(700, dtype=torch.float64) + 0.5,
                   label_smoothing=0.2, **TERMS[terms])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = {}
        for backend in ("cpu", "reference"):
            leaves = [t.clone().requires_grad_() for t in (h, w, b)]
            out = dropreg.linear_cross_entropy(leaves[0], leaves[1], y, linear_bias=leaves[2], backend=backend,
                                               reduction="none", **options)
            upstream = [torch.randn(300, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
                        for k in range(4)]
            sum((term * g).sum() for term, g in zip(out, upstream)).backward()
            results[backend] = [t.detach() for t in out] + [t.grad for t in leaves]
    finally:
        torch.set_num_threads(previous)
    for ours, reference in zip(results["cpu"], results["reference"]):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.cpu_only
@pytest.mark.parametrize("with_smoothing", [True, False], ids=["smoothing", "no-smoothing"])
@pytest.mark.parametrize("with_terms", [True, False])
def test_cpp_softcap_ops_opcheck(with_terms, with_smoothing):
    dropreg.cpu.load()
    h, w, b = torch.randn(9, 4), torch.randn(300, 4), torch.randn(300)
    y = torch.randint(0, 300, (9,))
    omega, grad_sum = (torch.rand(300) / 300, torch.randn(9)) if with_smoothing else (None, None)
    torch.library.opcheck(torch.ops.dropreg.softcap_statistics.default,
                          (h, w, b, 3.0, with_terms, with_terms, omega))
    lse = torch.ops.dropreg.softcap_statistics(h, w, b, 3.0, False, False, None)[0]
    T_vec, Q = (torch.randn(9, 4), torch.randn(9, 4)) if with_terms else (None, None)
    torch.library.opcheck(torch.ops.dropreg.softcap_gradient_sweep.default,
                          (h, w, b, 3.0, lse, y, torch.randn(9), torch.randn(9), T_vec, Q, omega, grad_sum,
                           [True, True, True]))


@pytest.mark.cpu_only
def test_cpp_softcap_ops_refuse_bad_smoothing_arguments():
    dropreg.cpu.load()
    h, w = torch.randn(3, 2), torch.randn(5, 2)
    with pytest.raises(RuntimeError, match=r"smoothing_weights must have shape \(5,\)"):
        torch.ops.dropreg.softcap_statistics(h, w, None, 3.0, False, False, torch.ones(4))
    lse, zeros = torch.zeros(3), torch.zeros(3)
    with pytest.raises(RuntimeError, match="smoothing_weights need grad_smoothing_sum"):
        torch.ops.dropreg.softcap_gradient_sweep(h, w, None, 3.0, lse, torch.zeros(3, dtype=torch.long), zeros,
                                                 zeros, None, None, torch.ones(5), None, [True, True, False])


@pytest.mark.parametrize("terms", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["both", "explicit", "implicit", "ce-only"])
@pytest.mark.parametrize("with_options", [True, False], ids=["bias+weight", "plain"])
@pytest.mark.parametrize("need_sum", [True, False], ids=["S", "no-S"])
def test_capped_smoothing_sums_gradcheck(terms, with_options, need_sum):
    """docs/math.md 3.7's streamed (S, Sq, Ss) and its hand-written backward, by float64 gradcheck, over 2-row
    blocks and 3-class chunks (tails in both: N=5, V=7); logits across tanh's bend (cap 1.5)."""
    from dropreg.softcap import CappedSmoothingSums
    need_explicit, need_implicit = terms
    gen = torch.Generator().manual_seed(11)
    h = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    w = (2 * torch.randn(7, 3, dtype=torch.float64, generator=gen)).requires_grad_()
    b = torch.randn(7, dtype=torch.float64, generator=gen, requires_grad=True) if with_options else None
    class_weight = torch.rand(7, dtype=torch.float64, generator=gen) + 0.5 if with_options else None
    signs = torch.randint(0, 2, (5, 3), generator=gen).double() * 2 - 1

    omega = 0.3 / 7 * (torch.ones(7, dtype=torch.float64) if class_weight is None else class_weight)

    def sums(h, w, b):
        return CappedSmoothingSums.apply(h, w, b, omega, signs, 1.5, need_sum, need_explicit, need_implicit, (2, 3))
    inputs = (h, w, b) if with_options else (h, w)
    assert torch.autograd.gradcheck(lambda *x: sums(*x) if with_options else sums(*x, None), inputs)
    # and the values: S = sum_v omega_v z_v, Sq = q . K2, Ss = u . K1 on the materialized logits
    raw = h @ w.T + (0 if b is None else b)
    t = torch.tanh(raw / 1.5)
    z, c, z2 = 1.5 * t, 1 - t * t, -2 * t * (1 - t * t) / 1.5
    zeros = torch.zeros(5, dtype=torch.float64)
    expected = [z @ omega if need_sum else zeros,
                (h * h * ((z2 * omega) @ (w * w))).sum(1) if need_explicit else zeros,
                (signs * h * ((c * omega) @ w)).sum(1) if need_implicit else zeros]
    for ours, theirs in zip(sums(h, w, b), expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
