"""bf16/fp16 inputs: every backend, each term and each gradient against float64, no worse than plain PyTorch
computing in the same dtype (criterion and constants: checks.assert_beats_same_dtype)."""
import pytest
import torch

import dropreg
from checks import (TERMS, _leaves, _terms_and_grads, assert_beats_same_dtype, labelled, make_problem, run_dropreg,
                    run_oracle)

P = 0.3


def same_dtype_rows(problem, dtype):
    """docs/math.md's materialized formulas run entirely in ``dtype`` (no upcast), per row: what a plain PyTorch
    user would get."""
    coef_r, coef_i = dropreg.default_coefficients(P)
    leaves = _leaves(problem, dtype)
    h, w = leaves[0], leaves[1]
    logits = h @ w.T + (leaves[2] if len(leaves) == 3 else 0)
    target = problem.target
    ce = torch.logsumexp(logits, -1) - logits.gather(1, target[:, None]).squeeze(1)
    probs = torch.softmax(logits, -1)
    mu = probs @ w
    quad = (h * h * (probs @ (w * w) - mu * mu)).sum(-1)
    sign = (problem.signs.to(dtype) * h * (mu - w[target])).sum(-1)
    return leaves, (ce, coef_r * quad, coef_i * sign, 0 * ce)  # z_loss is off


def same_dtype_terms(problem, dtype):
    """:func:`same_dtype_rows` under the "mean" reduction (no ignored rows)."""
    leaves, rows = same_dtype_rows(problem, dtype)
    return leaves, [t.sum() / problem.target.numel() for t in rows]


def check_against_same_dtype(problem, dtype, backend, oracle_backend=None):
    """``oracle_backend=None``: the autograd oracle; ``"reference"``: docs/math.md's closed forms in float64 (checked
    against that oracle by test_against_oracle.py), for shapes where a Hessian per row would take minutes."""
    ours, cotangent = run_dropreg(problem, dtype, backend)
    if oracle_backend is None:
        oracle = labelled(run_oracle(problem, cotangent))
    else:
        oracle = labelled(run_dropreg(problem, torch.float64, oracle_backend, cotangent)[0])
    leaves, terms = same_dtype_terms(problem, dtype)
    same_dtype = labelled(_terms_and_grads(terms, leaves, cotangent))
    ours = labelled(ours)
    # a term's rounding errs per row: its scale is the mean of |row| (checks.assert_beats_same_dtype)
    row_scale = {name: float(rows.detach().abs().mean())
                 for name, rows in zip(TERMS, same_dtype_rows(problem, torch.float64)[1])}
    for label in oracle:
        assert_beats_same_dtype(label, ours[label], same_dtype[label], oracle[label], dtype,
                                scale=row_scale.get(label))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("logit_scale", [0.1, 1.0, 30.0], ids=["flat", "typical", "peaked"])
def test_each_term_and_gradient_beats_same_dtype(backend, dtype, logit_scale):
    # flat: s_max within about e^0.4 of 1/V; peaked: s_max near 1 on most rows, where var = m2 - mu^2 cancels
    problem = make_problem(lead=(16,), d=32, vocab=37, logit_scale=logit_scale, dtype=dtype, p=P)
    check_against_same_dtype(problem, dtype, backend)


@pytest.mark.cpu_only
@pytest.mark.parametrize("logit_scale", [1.0, 30.0], ids=["typical", "peaked"])
def test_cpu_multi_tile_bf16_beats_same_dtype(logit_scale):
    # The C++ tiles are 256 rows x 256 vocabulary entries: N=300, V=600 gives 2 row blocks and 3 vocabulary
    # tiles, both with tails, so the bf16 upcast and the online merge across tiles are exercised.
    problem = make_problem(lead=(300,), d=8, vocab=600, logit_scale=logit_scale, dtype=torch.bfloat16, p=P)
    check_against_same_dtype(problem, torch.bfloat16, "cpu", oracle_backend="reference")
