"""The largest number of tokens per step each method runs at (issue 16's "scale" target): forward+backward at a
fixed V and d, doubling N from ``--start`` until the method runs out of memory (or fails), one fresh subprocess
per case (benchmarks/run_case.py).

    python benchmarks/max_tokens.py --device cuda --dtype bfloat16 --dim 4096 --vocab 128256 \\
        --methods dropreg-chunked,naive,liger --out docs/gpu/h200/max_tokens.csv
"""
import argparse
import csv
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run(args, method, rows):
    command = [sys.executable, os.path.join(HERE, "run_case.py"), "--method", method, "--mode", "forward_backward",
               "--rows", str(rows), "--dim", str(args.dim), "--vocab", str(args.vocab), "--dtype", args.dtype,
               "--device", args.device, "--repeats", "1", "--mem-limit-mib", str(args.mem_limit_mib)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        return dict(method=method, rows=rows, status="timeout")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return dict(method=method, rows=rows, status="error",
                    error=(done.stderr.strip().splitlines() or [""])[-1][:300])
    return json.loads(lines[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", type=lambda s: s.split(","), required=True)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--start", type=int, default=8192)
    parser.add_argument("--max-rows", type=int, default=1 << 21)
    parser.add_argument("--timeout-s", type=float, default=180)
    parser.add_argument("--mem-limit-mib", type=int, default=1 << 20)
    parser.add_argument("--out", required=True, help="CSV file")
    args = parser.parse_args(argv)
    results, largest = [], {}
    for method in args.methods:
        rows = args.start
        while rows <= args.max_rows:
            result = run(args, method, rows)
            results.append(result)
            print(json.dumps(result), flush=True)
            if result.get("status") != "ok":
                break
            largest[method] = rows
            rows *= 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "rows", "status", "seconds", "peak_mib", "error"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    print("| method | largest N that ran (V=%d, d=%d, %s) |" % (args.vocab, args.dim, args.dtype))
    print("|---|---:|")
    for method in args.methods:
        print(f"| {method} | {largest.get(method, '< %d' % args.start)} |")


if __name__ == "__main__":
    sys.exit(main())
