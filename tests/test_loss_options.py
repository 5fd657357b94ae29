"""Class weights and label smoothing (F.cross_entropy's ``weight`` and ``label_smoothing``) on every backend,
against the float64 oracle, whose row loss is F.cross_entropy's with those options (docs/math.md 3.4)."""
import pytest
import torch
import torch.nn.functional as F

import dropreg
from checks import assert_close_to_oracle, make_problem, run_dropreg, run_oracle

V = 13


def _class_weight():
    return torch.rand(V, dtype=torch.float64) * 2 + 0.1


OPTIONS = {
    "weight": lambda: dict(weight=_class_weight()),
    "smoothing": lambda: dict(label_smoothing=0.2),
    "both": lambda: dict(weight=_class_weight(), label_smoothing=0.35),
    "full-smoothing": lambda: dict(label_smoothing=1.0),
}
TERMS = {
    "all-terms": dict(),
    "ce-only": dict(explicit=False, implicit=False),
    "implicit-only": dict(explicit=False),
}


@pytest.mark.parametrize("terms", list(TERMS))
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_oracle(backend, option, terms, reduction):
    problem = make_problem(lead=(2, 3), d=4, vocab=V, ignore=(1,), reduction=reduction, **OPTIONS[option](),
                           **TERMS[terms])
    ours, cotangent = run_dropreg(problem, torch.float64, backend)
    assert_close_to_oracle(ours, run_oracle(problem, cotangent), torch.float64, problem)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_float32_and_no_bias(backend, dtype, bias):
    problem = make_problem(lead=(7,), d=3, vocab=V, bias=bias, dtype=dtype, p=0.3, ignore=(0, 4),
                           weight=_class_weight(), label_smoothing=0.1)
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
])
def test_bad_options_are_clear_errors(kwargs, error, message):
    h, w, y = torch.randn(4, 3), torch.randn(V, 3), torch.randint(0, V, (4,))
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        dropreg.linear_cross_entropy(h, w, y, **kwargs)
