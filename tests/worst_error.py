"""Worst relative error against the float64 oracles, per backend, dtype and op (a report, not a test).

    TRITON_INTERPRET=1 python tests/worst_error.py [--backends reference,torch,cpu,triton] [--problems 12]

Error = max |ours - oracle| / max |oracle| over each value and each gradient, worst over random problems of
the oracle suite's kind (W ~ N(0, 1/d), h ~ N(0, 1), p = 0.3, bias, shapes that span several tiles of the
interpreter's Triton config). Quoted in docs/verification.md; the tests assert tolerances.
"""
import argparse
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before dropreg's Triton kernels are defined
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from checks import _terms_and_grads, make_problem, run_dropreg, run_oracle  # noqa: E402
from test_rdrop import NAMES, authors_terms, make_inputs  # noqa: E402

import dropreg  # noqa: E402

SHAPES = [dict(lead=(5,), d=3, vocab=17), dict(lead=(37,), d=19, vocab=70), dict(lead=(2, 9), d=33, vocab=101)]


def relative(a, b):
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-300) if b.numel() else 0.0


def linear_ce_error(backend, dtype, shape):
    problem = make_problem(**shape, dtype=dtype, p=0.3)
    (ours_v, ours_g), cotangent = run_dropreg(problem, dtype, backend)
    oracle_v, oracle_g = run_oracle(problem, cotangent)
    errors = [relative(ours_v[n], oracle_v[n]) for n in ours_v]
    errors += [relative(a, b) for n in ours_g for a, b in zip(ours_g[n], oracle_g[n])]
    return max(errors)


def rdrop_error(backend, dtype, shape):
    h1, h2, w, b, y = make_inputs(**shape, dtype=dtype)
    leaves64 = [t.clone().requires_grad_() for t in (h1, h2, w, b)]
    terms, _ = authors_terms(*leaves64, y, "none")
    cotangent = torch.randn(y.shape, dtype=torch.float64)
    oracle_v, oracle_g = _terms_and_grads(terms, leaves64, cotangent, NAMES)
    leaves = [t.detach().to(dtype).requires_grad_() for t in leaves64]
    out = dropreg.rdrop_linear_cross_entropy(*leaves[:3], y, linear_bias=leaves[3], reduction="none",
                                             backend=backend)
    ours_v, ours_g = _terms_and_grads(tuple(out)[:3], leaves, cotangent, NAMES)
    errors = [relative(ours_v[n], oracle_v[n]) for n in NAMES]
    errors += [relative(a, c) for n in NAMES for a, c in zip(ours_g[n], oracle_g[n])]
    return max(errors)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=",".join(dropreg.available_backends()))
    parser.add_argument("--problems", type=int, default=12)
    args = parser.parse_args()
    torch.manual_seed(0)
    dtypes = (torch.float64, torch.float32, torch.bfloat16)
    print("| backend | op | float64 | float32 | bfloat16 |\n|---|---|---|---|---|")
    for backend in args.backends.split(","):
        for op, measure in (("linear_cross_entropy", linear_ce_error), ("rdrop", rdrop_error)):
            worst = {dtype: max(measure(backend, dtype, SHAPES[i % len(SHAPES)]) for i in range(args.problems))
                     for dtype in dtypes}
            print(f"| {backend} | {op} | " + " | ".join(f"{worst[t]:.1e}" for t in dtypes) + " |", flush=True)


if __name__ == "__main__":
    main()
