"""Every backend against the float64 autograd oracle: values and gradients of each term."""
import dataclasses

import pytest
import torch

import dropreg
from checks import (_leaves, _terms_and_grads, assert_close_to_oracle, assert_within_rounding, labelled,
                    make_problem, oracle_scales, run_dropreg, run_oracle, strided, summand_floors)
from oracle import oracle_rows

SHAPES = [
    dict(lead=(1,), d=1, vocab=1),  # N=1, d=1, V=1: softmax is exactly one-hot
    dict(lead=(1,), d=1, vocab=7),
    dict(lead=(5,), d=3, vocab=17),  # V not a multiple of the small tile (5)
    dict(lead=(7,), d=6, vocab=23),
    dict(lead=(2, 3), d=4, vocab=13),  # leading dimensions are flattened
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"lead{s['lead']}-d{s['d']}-V{s['vocab']}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_shapes(backend, dtype, shape, bias):
    problem = make_problem(**shape, bias=bias, dtype=dtype)
    ours, cotangent = run_dropreg(problem, dtype, backend)
    assert_close_to_oracle(ours, run_oracle(problem, cotangent), dtype, problem)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore", [(), (0, 3), (0, 1, 2, 3, 4, 5)], ids=["none-ignored", "some-ignored",
                                                                        "all-ignored"])
def test_reductions_and_ignored_rows(backend, reduction, ignore):
    problem = make_problem(lead=(6,), d=4, vocab=9, ignore=ignore, reduction=reduction)
    ours, cotangent = run_dropreg(problem, torch.float64, backend)
    assert_close_to_oracle(ours, run_oracle(problem, cotangent), torch.float64, problem)
    if len(ignore) == 6:
        values, grads = ours
        for name in values:
            assert torch.all(values[name] == 0), name
            assert all(torch.all(g == 0) for g in grads[name]), name


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("ignore_index", [3, -1, 10**6], ids=["a-class", "negative", "beyond-vocab"])
def test_ignore_index_other_than_minus_100(backend, reduction, ignore_index):
    """Rows whose target is ignore_index are out of every term (a class index too: its rows are ignored, the
    class stays in every softmax); the oracle honours the same ignore_index, independently of dropreg."""
    problem = make_problem(lead=(7,), d=4, vocab=9, ignore=(0, 4), reduction=reduction, ignore_index=ignore_index)
    assert int((problem.target == ignore_index).sum()) >= 2
    ours, cotangent = run_dropreg(problem, torch.float64, backend)
    assert_close_to_oracle(ours, run_oracle(problem, cotangent), torch.float64, problem)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("logit_scale", [1e-3, 30.0, 1e4], ids=["flat", "peaked", "huge-logits"])
def test_softmax_regimes(backend, dtype, logit_scale):
    problem = make_problem(lead=(6,), d=5, vocab=19, logit_scale=logit_scale, dtype=dtype)
    ours, cotangent = run_dropreg(problem, dtype, backend)
    values, _ = ours
    assert all(torch.isfinite(v).all() for v in values.values())
    assert_close_to_oracle(ours, run_oracle(problem, cotangent), dtype, problem)


@pytest.mark.parametrize("options", [
    dict(explicit=False), dict(implicit=False), dict(explicit=False, implicit=False),
    dict(p=0.0), dict(p=0.5, explicit_coef=0.3, implicit_coef=2.0), dict(p=0.9),
], ids=["no-explicit", "no-implicit", "ce-only", "p0", "custom-coefs", "p0.9"])
def test_options(backend, options):
    problem = make_problem(lead=(5,), d=4, vocab=12, **options)
    ours, cotangent = run_dropreg(problem, torch.float64, backend)
    assert_close_to_oracle(ours, run_oracle(problem, cotangent), torch.float64, problem)
    values, grads = ours
    for name, flag in (("explicit", "explicit"), ("implicit", "implicit")):
        if options.get(flag) is False or options.get("p") == 0.0:
            assert torch.all(values[name] == 0) and all(torch.all(g == 0) for g in grads[name])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_is_the_oracle_total(backend, reduction):
    """``out.loss`` and its gradients against the sum of the oracle's three terms (not against ce + explicit +
    implicit of the same output, which is how the property is defined)."""
    problem = make_problem(lead=(2, 3), d=4, vocab=9, ignore=(1,), reduction=reduction, p=0.3)
    leaves = _leaves(problem, torch.float64)
    out = dropreg.linear_cross_entropy(leaves[0], leaves[1], problem.target, linear_bias=leaves[2],
                                       signs=problem.signs, backend=backend, **problem.kwargs)
    cotangent = torch.randn(problem.target.shape if reduction == "none" else (), dtype=torch.float64)
    ours = _terms_and_grads([out.loss], leaves, cotangent, ("loss",))
    oracle_values, oracle_grads = run_oracle(problem, cotangent)
    total = (sum(oracle_values.values()), [sum(g) for g in zip(*oracle_grads.values())])
    z_scale, explicit_extra = oracle_scales(problem)
    floors = summand_floors(problem)
    oracle = labelled(({"loss": total[0]}, {"loss": total[1]}), ("loss",))
    for label, value in labelled(ours, ("loss",)).items():
        assert_within_rounding(label, value, oracle[label], torch.float64, z_scale, explicit_extra,
                               floor=floors[label])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_explicit_regularizer_matches_oracle(backend, reduction, bias):
    """``explicit_regularizer`` (no coefficient, every row counted) and its gradients w.r.t. input, weight and
    bias against the oracle's Hessian quadratic form."""
    problem = make_problem(lead=(2, 3), d=4, vocab=9, bias=bias, explicit_coef=1.0)
    leaves = _leaves(problem, torch.float64)
    bias_leaf = leaves[2] if bias else None
    ours = dropreg.explicit_regularizer(leaves[0], leaves[1], linear_bias=bias_leaf, reduction=reduction,
                                        backend=backend)
    d, n_rows = problem.input.shape[-1], problem.target.numel()
    # the quadratic form does not depend on the target: any class index will do
    _, quadratic, _, _ = oracle_rows(leaves[0].reshape(-1, d), leaves[1], bias_leaf,
                                     torch.zeros(n_rows, dtype=torch.long), problem.signs.reshape(-1, d))
    if reduction == "none":
        oracle = quadratic.reshape(problem.target.shape)
    else:
        oracle = quadratic.sum() / (n_rows if reduction == "mean" else 1)
    assert ours.shape == oracle.shape and ours.dtype == torch.float64
    cotangent = torch.randn(oracle.shape, dtype=torch.float64)
    z_scale, explicit_extra = oracle_scales(problem)
    floors = summand_floors(dataclasses.replace(problem, kwargs=dict(problem.kwargs, reduction=reduction)))
    ours_labelled = labelled(_terms_and_grads([ours], leaves, cotangent, ("explicit",)), ("explicit",))
    oracle_labelled = labelled(_terms_and_grads([oracle], leaves, cotangent, ("explicit",)), ("explicit",))
    for label, value in ours_labelled.items():
        assert_within_rounding(label, value, oracle_labelled[label], torch.float64, z_scale, explicit_extra,
                               floor=floors[label])


def _linear_ce_values_and_grads(backend, h, w, b, target, signs, **kwargs):
    leaves = [t.requires_grad_() for t in (h, w, b)]
    out = dropreg.linear_cross_entropy(h, w, target, linear_bias=b, signs=signs, backend=backend, **kwargs)
    weights = torch.linspace(0.5, 1.5, 3, dtype=torch.float64)
    total = sum(wt * term.sum() for wt, term in zip(weights, out))
    return [t.detach() for t in out] + list(torch.autograd.grad(total, leaves))


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_non_contiguous_inputs_equal_contiguous(backend, layout):
    """Input (with leading dimensions), weight and bias as strided views, signs expanded from one row
    (stride 0): the same values and gradients as contiguous copies."""
    problem = make_problem(lead=(3, 4), d=5, vocab=13)
    h, w, b = problem.input, problem.weight, problem.bias
    h_strided = strided(h.reshape(12, 5), layout).view(3, 4, 5) if layout == "transposed" else strided(h, layout)
    signs = problem.signs[0, 0]
    kwargs = dict(p=0.3, reduction="none")
    ours = _linear_ce_values_and_grads(backend, h_strided, strided(w, layout), strided(b, layout),
                                       problem.target, signs.expand(3, 4, 5), **kwargs)
    contiguous = _linear_ce_values_and_grads(backend, h.clone(), w.clone(), b.clone(), problem.target,
                                             signs.expand(3, 4, 5).contiguous(), **kwargs)
    for a, c in zip(ours, contiguous):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12 * float(c.abs().max()))


def test_rounding_floor_is_in_each_quantitys_units():
    """The tolerance's floor is the size of the quantity's summands (checks.summand_floors), not 1: on flat rows
    (W ~ 1e-3 / sqrt(d)) the explicit term is about 1e-7, and a floor of 1 made its float32 tolerance 8.5 times the
    term itself; now a 1% error in it fails, while the exact values pass."""
    torch.manual_seed(0)
    problem = make_problem(lead=(5,), d=4, vocab=11, logit_scale=1e-3, p=0.3)
    values, grads = run_oracle(problem, torch.ones(()))
    assert 0 < float(values["explicit"]) < 1e-6
    assert_close_to_oracle((values, grads), (values, grads), torch.float32, problem)
    for label in ("explicit", "implicit"):
        wrong = dict(values, **{label: values[label] * 1.01})
        with pytest.raises(AssertionError, match=label):
            assert_close_to_oracle((wrong, grads), (values, grads), torch.float32, problem)
