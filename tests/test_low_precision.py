"""bf16/fp16 inputs: fp32 accumulation must beat plain PyTorch computing in the same dtype.

Criterion (Cut Cross-Entropy's): ``|ours - fp64| <= |torch in the same dtype - fp64| + tol``, per term and
per gradient, with ``tol`` one unit of the dtype's rounding of the result (outputs are returned in it).
"""
import pytest
import torch

import dropreg
from checks import TERMS, _leaves, _terms_and_grads, make_problem, run_dropreg, run_oracle


def same_dtype_terms(problem, dtype, coef_r, coef_i):
    """docs/math.md's formulas computed entirely in ``dtype``: what a plain PyTorch user would get."""
    leaves = _leaves(problem, dtype)
    h, w = leaves[0], leaves[1]
    logits = h @ w.T + (leaves[2] if len(leaves) == 3 else 0)
    target = problem.target
    ce = torch.logsumexp(logits, -1) - logits.gather(1, target[:, None]).squeeze(1)
    probs = torch.softmax(logits, -1)
    mu = probs @ w
    quad = (h * h * (probs @ (w * w) - mu * mu)).sum(-1)
    sign = (problem.signs.to(dtype) * h * (mu - w[target])).sum(-1)
    terms = [t.sum() / target.numel() for t in (ce, coef_r * quad, coef_i * sign)]
    return leaves, terms


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("logit_scale", [1.0, 30.0], ids=["typical", "peaked"])
def test_fp32_accumulation_beats_same_dtype(backend, dtype, logit_scale):
    problem = make_problem(lead=(16,), d=32, vocab=37, logit_scale=logit_scale, dtype=dtype, p=0.3)
    ours, cotangent = run_dropreg(problem, dtype, backend)
    oracle = run_oracle(problem, cotangent)
    leaves, terms = same_dtype_terms(problem, dtype, *dropreg.default_coefficients(0.3))
    naive = _terms_and_grads(terms, leaves, cotangent)
    unit = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    (ov, og), (nv, ng), (rv, rg) = ours, naive, oracle
    for name in TERMS:
        pairs = [(name, ov[name], nv[name], rv[name])]
        pairs += [(f"d{name}/d{leaf}", a, b, c) for leaf, a, b, c in
                  zip(("input", "weight", "bias"), og[name], ng[name], rg[name])]
        for label, a, b, c in pairs:
            ours_err = float((a - c).abs().max())
            naive_err = float((b - c).abs().max())
            tol = unit * float(c.abs().max()) + 1e-6
            assert ours_err <= naive_err + tol, f"{label}: ours {ours_err:.3e} vs same-dtype {naive_err:.3e}"
