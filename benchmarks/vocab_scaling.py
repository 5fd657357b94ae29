"""Vocabulary-scaling benchmark: time and peak memory of every method over a grid of vocabulary sizes.

    python benchmarks/vocab_scaling.py                 # default sweep (17 minutes on 2 CPU cores, measured
                                                       # in a fresh clone with pip install included)
    python benchmarks/vocab_scaling.py --quick         # tiny sizes, under a minute (CI runs this)
    python benchmarks/vocab_scaling.py --profile       # torch.profiler trace of one dropreg configuration

Each (method, V, mode) runs in its own subprocess (benchmarks/run_case.py) so its peak memory is clean;
out-of-memory, errors and time-outs are recorded as such. Every time is also given as a ratio to the GEMM
floor measured in the same run: 10 x one (N x d) @ (d x V) matmul for forward+backward and 3 x for the
forward (docs/math.md's multiply-add counts). Results land in --out (default benchmarks/results/): results.csv,
results.md, time_vs_vocab.png and memory_vs_vocab.png.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

DEFAULT_VOCABS = [1024, 4096, 16384, 32768, 65536, 131072, 262144]
QUICK = dict(rows=64, dim=32, vocabs=[512, 4096], repeats=1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024, help="tokens N (default 1024)")
    parser.add_argument("--dim", type=int, default=256, help="hidden size d (default 256)")
    parser.add_argument("--vocabs", type=lambda s: [int(v) for v in s.split(",")], default=DEFAULT_VOCABS,
                        help="comma-separated vocabulary sizes")
    parser.add_argument("--family", default="dropreg", choices=["dropreg", "rdrop", "ce"],
                        help="dropreg: CE + explicit + implicit; rdrop: R-Drop's CE pair + symmetric KL; ce: cross "
                             "entropy alone (3-GEMM floor; Cut Cross-Entropy joins when installed)")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=None,
                        help="comma-separated subset of methods (default: all available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--timeout-s", type=float, default=600, help="per case; a slower case is recorded")
    parser.add_argument("--mem-limit-mib", type=int, default=16384, help="per case, above its inputs")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=["forward", "forward_backward"],
                        help="comma-separated subset of forward,forward_backward")
    parser.add_argument("--workspace-mib", type=int, default=None,
                        help="dropreg's logits workspace on the benchmark's device (default: dropreg's default)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke run)")
    parser.add_argument("--profile", action="store_true", help="profile one dropreg configuration instead")
    parser.add_argument("--profile-vocab", type=int, default=32768)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def select_methods(args):
    from methods import available_methods
    names = available_methods(args.device, args.family)
    if args.quick:
        names = [n for n in names if n != "naive-compiled"]  # compiling alone takes longer than --quick allows
    if args.methods:
        unknown = sorted(set(args.methods) - set(names))
        if unknown:
            raise SystemExit(f"--methods: unknown or unavailable {unknown}; available: {names}")
        names = [n for n in names if n in args.methods] + (["gemm"] if "gemm" not in args.methods else [])
    return names


class Progress:
    def __init__(self, total):
        self.total, self.done, self.tty = total, 0, sys.stderr.isatty()

    def step(self, label):
        self.done += 1
        filled = int(30 * self.done / self.total)
        line = f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {label}"
        sys.stderr.write(("\r" + line.ljust(100)) if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self):
        if self.tty:
            sys.stderr.write("\n")


def run_case(args, method, vocab, mode):
    command = [sys.executable, os.path.join(HERE, "run_case.py"), "--method", method, "--mode", mode,
               "--rows", str(args.rows), "--dim", str(args.dim), "--vocab", str(vocab), "--dtype", args.dtype,
               "--device", args.device, "--repeats", str(args.repeats), "--mem-limit-mib", str(args.mem_limit_mib)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.workspace_mib:
        command += ["--workspace-mib", str(args.workspace_mib)]
    base = dict(method=method, mode=mode, rows=args.rows, dim=args.dim, vocab=vocab, dtype=args.dtype,
                device=args.device, workspace_mib=args.workspace_mib)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        return dict(base, status="timeout")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        killed = done.returncode < 0
        tail = (done.stderr.strip().splitlines() or [""])[-1][:300]
        return dict(base, status="killed" if killed else "error", error=tail)
    return json.loads(lines[-1])


def add_floor_ratios(results, family):
    from methods import FLOOR_MULTIPLE
    gemm = {r["vocab"]: r["seconds"] for r in results if r["method"] == "gemm" and r.get("status") == "ok"}
    for r in results:
        if r.get("status") == "ok" and r["method"] != "gemm" and r["vocab"] in gemm:
            r["floor_seconds"] = FLOOR_MULTIPLE[family][r["mode"]] * gemm[r["vocab"]]
            r["floor_ratio"] = r["seconds"] / r["floor_seconds"]


def summaries(results, methods, family):
    from methods import BASELINES
    lines = []
    ours = [m for m in methods if "dropreg-" in m]
    index = {(r["method"], r["vocab"], r["mode"]): r for r in results}
    for vocab in sorted({r["vocab"] for r in results}):
        for mine in ours:
            mine_r = index.get((mine, vocab, "forward_backward"))
            if not mine_r or mine_r.get("status") != "ok":
                continue
            parts = []
            for other in BASELINES[family]:
                r = index.get((other, vocab, "forward_backward"))
                if r and r.get("status") == "ok":
                    parts.append(f"vs {other}: {r['seconds'] / mine_r['seconds']:.2f}x speed-up, "
                                 f"{mine_r['peak_mib'] / max(r['peak_mib'], 1e-9):.3f}x memory")
                elif r:
                    parts.append(f"{other}: {r.get('status')}")
            ratio = f", {mine_r['floor_ratio']:.2f}x floor" if "floor_ratio" in mine_r else ""
            lines.append(f"V={vocab}: {mine}{ratio}: " + ("; ".join(parts) or "no baseline ran"))
    return lines


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def describe_run(args):
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu}, {os.cpu_count()} cores"
    return (f"{datetime.date.today().isoformat()}, commit {_git_commit()}, {device}, torch {torch.__version__}, "
            f"{args.family}, N={args.rows}, d={args.dim}, {args.dtype}")


def write_outputs(args, results, methods, header):
    os.makedirs(args.out, exist_ok=True)
    fields = ["method", "mode", "rows", "dim", "vocab", "dtype", "device", "status", "seconds", "floor_seconds",
              "floor_ratio", "peak_mib", "repeats", "threads", "workspace_mib", "error"]
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    index = {(r["method"], r["vocab"], r["mode"]): r for r in results}
    from methods import FLOOR_MULTIPLE
    floor = FLOOR_MULTIPLE[args.family]["forward_backward"]

    def cell(r, key, fmt):
        if r is None:
            return "-"
        if r.get("status") != "ok":
            return r.get("status", "?")
        return fmt.format(r[key]) if key in r else "-"

    lines = [f"Measured {header}.", "",
             "| V | method | forward s | fwd+bwd s | fwd+bwd / floor | fwd+bwd peak MiB |",
             "|---:|---|---:|---:|---:|---:|"]
    for vocab in sorted({r["vocab"] for r in results}):
        for method in methods:
            fwd, both = index.get((method, vocab, "forward")), index.get((method, vocab, "forward_backward"))
            if method == "gemm":
                lines.append(f"| {vocab} | gemm: one N×d×V matmul (floor = {floor}×) | "
                             f"{cell(fwd, 'seconds', '{:.4f}')} | | | |")
                continue
            lines.append(f"| {vocab} | {method} | {cell(fwd, 'seconds', '{:.4f}')} | {cell(both, 'seconds', '{:.4f}')} "
                         f"| {cell(both, 'floor_ratio', '{:.2f}')} | {cell(both, 'peak_mib', '{:.1f}')} |")
    lines += ["", *summaries(results, methods, args.family)]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(args, results, methods, header)
    return lines


def plot(args, results, methods, header):
    from methods import FLOOR_MULTIPLE
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, ylabel, name in (("seconds", "forward+backward time (s)", "time_vs_vocab.png"),
                              ("peak_mib", "forward+backward peak memory (MiB)", "memory_vs_vocab.png")):
        fig, ax = plt.subplots(figsize=(7.5, 5))
        for method in methods:
            mode = "forward" if method == "gemm" else "forward_backward"
            points = sorted((r["vocab"], r[key]) for r in results if r["method"] == method and r["mode"] == mode
                            and r.get("status") == "ok" and key in r)
            if method == "gemm":
                if key != "seconds" or not points:
                    continue
                multiple = FLOOR_MULTIPLE[args.family]["forward_backward"]
                label = f"GEMM floor ({multiple} × N·d·V matmul)"
                points = [(v, multiple * s) for v, s in points]
                ax.plot(*zip(*points), "k--", label=label)
                continue
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel(ylabel)
        ax.set_title(header, fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, name), dpi=110)
        plt.close(fig)


def profile(args):
    import torch
    from torch.profiler import ProfilerActivity

    from methods import dropreg_method, make_inputs
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = make_inputs(args.rows, args.dim, args.profile_vocab, getattr(torch, args.dtype), args.device)
    _, forward_backward = dropreg_method("auto")(*inputs)
    forward_backward()  # warm-up (and the one-time JIT build, if any)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        forward_backward()
    os.makedirs(args.out, exist_ok=True)
    trace = os.path.join(args.out, f"trace_N{args.rows}_d{args.dim}_V{args.profile_vocab}.json")
    prof.export_chrome_trace(trace)
    sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15))
    print(f"Chrome trace: {trace} (open in chrome://tracing or https://ui.perfetto.dev)")


def main(argv=None):
    args = parse_args(argv)
    if args.profile:
        return profile(args)
    methods = select_methods(args)
    cases = [(m, v, mode) for v in args.vocabs for m in methods
             for mode in (("forward",) if m == "gemm" else args.modes)]
    progress = Progress(len(cases))
    results = []
    for method, vocab, mode in cases:
        progress.step(f"V={vocab} {method} {mode}")
        results.append(run_case(args, method, vocab, mode))
    progress.close()
    add_floor_ratios(results, args.family)
    header = describe_run(args)
    lines = write_outputs(args, results, methods, header)
    print("\n".join(lines))
    print(f"\nResults: {args.out}/results.csv, results.md, time_vs_vocab.png, memory_vs_vocab.png")
    failed = [r for r in results if "dropreg-" in r["method"] and r.get("status") != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
