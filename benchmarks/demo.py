"""Demo: the three terms and their gradients at a realistic LM-head shape, with timing and peak memory.

    python benchmarks/demo.py [--rows 2048] [--dim 512] [--vocab 32768] [--backend auto]

Times are medians of ``--repeats`` runs after one warm-up, on this machine's threads. The GEMM floor is
10 x the median time of one (N x d) @ (d x V) matmul measured in the same run (MATH.md: fused
forward+backward costs 10 N V d multiply-adds). Peak memory is the growth of the process's peak RSS
over the run, next to the size the materialized N x V fp32 logits alone would need.
"""
import argparse
import resource
import statistics
import time

import torch

import dropreg
from dropreg._dispatch import resolve_backend


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_seconds(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048, help="tokens N")
    parser.add_argument("--dim", type=int, default=512, help="hidden size d")
    parser.add_argument("--vocab", type=int, default=32768, help="vocabulary size V")
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    n, d, v = args.rows, args.dim, args.vocab
    hidden = torch.randn(n, d, requires_grad=True)
    weight = (torch.randn(v, d) / d**0.5).requires_grad_()
    target = torch.randint(0, v, (n,))
    backend_name, _ = resolve_backend(args.backend, hidden.device)
    baseline_rss = peak_rss_mib()

    def forward():
        with torch.no_grad():
            return dropreg.linear_cross_entropy(hidden, weight, target, p=args.p, seed=0, backend=args.backend)

    def forward_backward():
        hidden.grad = weight.grad = None
        out = dropreg.linear_cross_entropy(hidden, weight, target, p=args.p, seed=0, backend=args.backend)
        out.loss.backward()
        return out

    fwd = median_seconds(forward, args.repeats)
    fwd_bwd = median_seconds(forward_backward, args.repeats)
    out = forward_backward()
    peak_growth = peak_rss_mib() - baseline_rss
    rhs = weight.detach().T.contiguous()
    gemm = median_seconds(lambda: hidden.detach() @ rhs, args.repeats)

    print(f"dropreg {dropreg.__version__} | backend={backend_name} | N={n} d={d} V={v} fp32 p={args.p} | "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"  ce       = {out.ce.item():.6f}")
    print(f"  explicit = {out.explicit.item():.6f}   (coef {dropreg.default_coefficients(args.p)[0]:.4f})")
    print(f"  implicit = {out.implicit.item():+.6f}   (coef {dropreg.default_coefficients(args.p)[1]:.4f}, seed 0)")
    print(f"  |grad input| = {hidden.grad.norm().item():.4f}   |grad weight| = {weight.grad.norm().item():.4f}")
    floor = 10 * gemm
    print(f"  forward          {fwd:8.3f} s")
    print(f"  forward+backward {fwd_bwd:8.3f} s   = {fwd_bwd / floor:.2f} x the 10-NVd GEMM floor "
          f"({floor:.3f} s; one N x d x V matmul {gemm:.3f} s = {2 * n * d * v / gemm / 1e9:.0f} GFLOP/s)")
    print(f"  peak RSS growth  {peak_growth:8.1f} MiB   (materialized fp32 logits alone: {n * v * 4 / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
