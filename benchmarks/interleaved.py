"""Forward+backward time of several methods at one shape, interleaved in one process: every round runs each
method once (in an order rotated per round), so drifts of a noisy machine hit all methods alike, and each round
gives every method's ratio to a reference measured within seconds of it.

vocab_scaling.py runs each (method, shape) in its own subprocess for clean peak memory; its medians are taken
minutes apart. Use this script when the question is "which of these is faster at this shape" and the answer is a
few percent. Peak memory is not measured here (all methods' inputs are alive at once).

    python benchmarks/interleaved.py --family ce --rows 2048 --dim 512 --vocab 32768 --threads 2 \
        --rounds 10 --out docs/benchmarks/ce_only_interleaved

Writes ``rounds.csv`` (one row per round and method) and ``results.md`` (median seconds, ratio to the floor, and
the median over rounds of each method's time divided by the reference's). The floor is the compute-bound limit:
the method's multiply-adds (methods.floor_seconds) at the rate of the fastest ``--gemm-size`` cube matmul, one of
which is timed in every round beside the methods.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import torch

from methods import (FLOOR_MULTIPLE, METHODS, SQUARE_GEMM, available_methods, floor_seconds, make_inputs,
                     square_gemm_rate)
from vocab_scaling import describe_run

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="ce", choices=sorted(FLOOR_MULTIPLE))
    parser.add_argument("--methods", type=lambda s: s.split(","), default=None,
                        help="comma-separated (default: the family's methods that run here)")
    parser.add_argument("--reference", default=None, help="ratios are to this method (default: the first)")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--gemm-size", type=int, default=4096,
                        help="the floor's rate is that of a gemm-size cube matmul, timed once per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each method first")
    parser.add_argument("--out", default=None, help="folder for rounds.csv and results.md (default: print only)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 1:
        parser.error("--rounds and --warmup must be >= 1")
    args.methods = args.methods or available_methods(args.device, args.family)
    unknown = [m for m in args.methods if m not in METHODS or m == SQUARE_GEMM]
    if unknown:
        parser.error(f"unknown methods: {unknown}")
    args.reference = args.reference or args.methods[0]
    if args.reference not in args.methods:
        parser.error(f"--reference {args.reference!r} is not among --methods")
    return args


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    _sync(device)
    begin = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - begin


def measure(args):
    """``{method: [seconds per round]}``, the square matmul of the floor under ``SQUARE_GEMM``; each method has its
    own inputs (same seed), built and warmed first."""
    runs = {}
    for method in args.methods:
        inputs = make_inputs(args.rows, args.dim, args.vocab, DTYPES[args.dtype], args.device)
        runs[method] = METHODS[method](*inputs)[1]
    size = args.gemm_size
    runs[SQUARE_GEMM] = METHODS[SQUARE_GEMM](*make_inputs(size, size, size, DTYPES[args.dtype], args.device))[0]
    for run in runs.values():
        for _ in range(args.warmup):
            run()
    names = list(runs)
    times = {name: [] for name in names}
    for r in range(args.rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(runs[name], args.device))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{m} {times[m][-1]:.3f}" for m in names),
              file=sys.stderr, flush=True)
    return times


def flop_rate(args, times) -> float:
    """FLOP/s of the fastest square matmul of the rounds: the rate the machine showed it can reach."""
    return square_gemm_rate(args.gemm_size, min(times[SQUARE_GEMM]))


def summary_rows(args, times):
    """Per method: median s, median of (s / floor) over rounds, median of (s / reference s) over rounds."""
    rate = flop_rate(args, times)
    rows = []
    for method in args.methods:
        seconds = times[method]
        floor = floor_seconds(method, args.family, "forward_backward", args.rows, args.dim, args.vocab, rate)
        rows.append(dict(
            method=method, median_s=statistics.median(seconds), min_s=min(seconds), max_s=max(seconds),
            floor_ratio=statistics.median(seconds) / floor,
            to_reference=statistics.median(s / ref for s, ref in zip(seconds, times[args.reference])),
            faster_rounds=sum(ref < s for s, ref in zip(seconds, times[args.reference])),
        ))
    return rows


def write_outputs(args, times, rows):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rounds.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["round", "method", "seconds"])
        for method in times:
            for r, seconds in enumerate(times[method]):
                writer.writerow([r, method, f"{seconds:.9f}"])
    multiple = FLOOR_MULTIPLE[args.family]["forward_backward"]
    rate = flop_rate(args, times)
    lines = [
        f"# Interleaved forward+backward, family {args.family}: N={args.rows}, d={args.dim}, V={args.vocab}, "
        f"{args.dtype}, {args.device}",
        "",
        f"{describe_run(args)}, {torch.get_num_threads()} threads",
        "",
        f"{args.rounds} rounds after {args.warmup} warm-up calls per method; each round runs every method once, "
        "in an order rotated per round. Floor: the compute-bound limit, the method's multiply-adds "
        f"({multiple}·N·V·d for the {args.family} family, 3 for cross entropy alone) at {rate / 1e9:.1f} GFLOP/s, "
        f"the fastest of the rounds' {args.gemm_size}-cube {args.dtype} matmuls (median "
        f"{square_gemm_rate(args.gemm_size, statistics.median(times[SQUARE_GEMM])) / 1e9:.1f} GFLOP/s); `/ floor` is the "
        f"median time over it. `/ {args.reference}`: median over rounds of the "
        f"method's time divided by {args.reference}'s in that round; `{args.reference} faster`: rounds in which "
        f"{args.reference} took less time.",
        "",
        f"| method | median s | min s | max s | / floor | / {args.reference} | {args.reference} faster |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['method']} | {row['median_s']:.3f} | {row['min_s']:.3f} | {row['max_s']:.3f} "
                     f"| {row['floor_ratio']:.2f} | {row['to_reference']:.3f} | {row['faster_rounds']}/{args.rounds} |")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    times = measure(args)
    rows = summary_rows(args, times)
    if args.out:
        print("\n".join(write_outputs(args, times, rows)))
    else:
        for row in rows:
            print(row)


if __name__ == "__main__":
    sys.exit(main())
