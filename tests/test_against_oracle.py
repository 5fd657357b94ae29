"""Every backend against the float64 autograd oracle: values and gradients of each term."""
import pytest
import torch

from checks import assert_close_to_oracle, make_problem, run_dropreg, run_oracle

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


def test_default_coefficients_follow_math_md():
    import dropreg
    explicit, implicit = dropreg.default_coefficients(0.2)
    kappa = 0.2 / 0.8
    assert explicit == pytest.approx(kappa / 2) and implicit == pytest.approx(kappa**0.5)
