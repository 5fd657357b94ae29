"""The GPU call's first check (benchmarks/gpu_session.sh, PART smoke and PART compile): does the default CUDA path run
at the LM shape and agree with the materialized computation?

    python benchmarks/gpu_smoke.py [--rows 8192 --dim 4096 --vocab 128256] [--compile]

fp32 inputs, both terms with fixed signs, forward+backward through ``backend="chunked"`` and through the formulas of
docs/math.md materialized in fp32 (N x V tensors): every output finite, and the largest relative error of the three
terms and of the input's gradient printed and held to 1e-3 (both sides accumulate in fp32; the chunked GEMMs may use
tf32 if the user allows it, which this script does not). ``--compile``: the same step under ``torch.compile``
against the eager one. Exit status 1 on a failed check.
"""
import argparse
import sys
import time

import torch

import dropreg

TOLERANCE = 1e-3


def materialized(h, w, target, signs, p):
    coef_r, coef_i = dropreg.default_coefficients(p)
    logits = h @ w.T
    probs = torch.softmax(logits, dim=-1)
    mu = probs @ w
    var = probs @ (w * w) - mu * mu
    ce = torch.logsumexp(logits, -1) - logits.gather(1, target[:, None]).squeeze(1)
    return ce.mean(), coef_r * (h * h * var).sum(-1).mean(), coef_i * (signs * h * (mu - w[target])).sum(-1).mean()


def fused(h, w, target, signs, p):
    out = dropreg.linear_cross_entropy(h, w, target, p=p, signs=signs, backend="chunked")
    return out.ce, out.explicit, out.implicit


def step(fn, h, w, target, signs, p):
    leaf = h.detach().clone().requires_grad_()
    terms = fn(leaf, w, target, signs, p)
    sum(terms).backward()
    torch.cuda.synchronize()
    return [t.detach() for t in terms], leaf.grad


def relative(ours, theirs):
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--compile", action="store_true", help="torch.compile's step against the eager one")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(args.rows, args.dim, device="cuda", generator=gen)
    w = torch.randn(args.vocab, args.dim, device="cuda", generator=gen) / args.dim ** 0.5
    target = torch.randint(0, args.vocab, (args.rows,), device="cuda", generator=gen)
    signs = torch.randint(0, 2, (args.rows, args.dim), device="cuda", generator=gen).float() * 2 - 1
    p = 0.1
    start = time.perf_counter()
    if args.compile:
        reference = step(fused, h, w, target, signs, p)
        label, ours = "torch.compile(chunked) vs eager chunked", step(torch.compile(fused), h, w, target, signs, p)
    else:
        ours = step(fused, h, w, target, signs, p)
        label, reference = "chunked vs materialized fp32", step(materialized, h, w, target, signs, p)
    (terms, grad), (ref_terms, ref_grad) = ours, reference
    errors = {name: relative(a, b) for name, a, b in zip(("ce", "explicit", "implicit"), terms, ref_terms)}
    errors["grad_input"] = relative(grad, ref_grad)
    finite = all(bool(torch.isfinite(t).all()) for t in (*terms, grad))
    print(f"{label}, N={args.rows} d={args.dim} V={args.vocab} fp32, {time.perf_counter() - start:.1f} s: finite "
          f"{finite}; largest relative error " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
          + f"; peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    ok = finite and max(errors.values()) <= TOLERANCE
    print("PASS" if ok else f"FAIL (tolerance {TOLERANCE:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
