"""Vocabulary-scaling benchmark: time and peak memory of every method over a grid of vocabulary sizes.

    python benchmarks/vocab_scaling.py                 # first result: 4 vocabulary sizes, forward+backward
                                                       # (under 5 minutes on 2 CPU cores)
    python benchmarks/vocab_scaling.py --full          # the whole sweep: 7 sizes, forward and forward+backward,
                                                       # torch.compile'd naive method too
    python benchmarks/vocab_scaling.py --quick         # tiny sizes, under a minute (CI runs this)
    python benchmarks/vocab_scaling.py --profile       # torch.profiler trace of one dropreg configuration

Each (method, V, mode) runs in its own subprocess (benchmarks/run_case.py) so its peak memory is clean;
out-of-memory, errors and time-outs are recorded as such. Every time is also given as a ratio to its floor, the
compute-bound limit: the method's multiply-adds (docs/math.md: 10 N·V·d for the regularized forward+backward, 3 for
cross entropy alone, 8 for R-Drop; 3, 1 and 2 for a forward) at the rate of one large square matmul
(``--gemm-size``, the benchmark's dtype and threads) measured in the same run, before and after the cases (the
faster of the two counts). Results land in --out (default benchmarks/results/): results.csv, results.md,
time_vs_vocab.png and memory_vs_vocab.png.
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

# The default run is the first result a user sees: it must finish within 5 minutes on the 2-core machine.
PRESETS = {
    "default": dict(vocabs=[1024, 4096, 16384, 65536], modes=["forward_backward"], repeats=3, compiled=False),
    "full": dict(vocabs=[1024, 4096, 16384, 32768, 65536, 131072, 262144], modes=["forward", "forward_backward"],
                 repeats=3, compiled=True),
    "quick": dict(rows=64, dim=32, vocabs=[512, 4096], modes=["forward", "forward_backward"], repeats=1,
                  compiled=False, gemm_size=256),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024, help="tokens N (default 1024)")
    parser.add_argument("--dim", type=int, default=256, help="hidden size d (default 256)")
    parser.add_argument("--vocabs", type=lambda s: [int(v) for v in s.split(",")], default=None,
                        help="comma-separated vocabulary sizes (default: 1024,4096,16384,65536; with --full "
                             "1024 to 262144)")
    parser.add_argument("--family", default="dropreg", choices=["dropreg", "rdrop", "ce"],
                        help="dropreg: CE + explicit + implicit; rdrop: R-Drop's CE pair + symmetric KL; ce: cross "
                             "entropy alone (Cut Cross-Entropy joins when installed)")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=None,
                        help="comma-separated subset of methods (default: all available; naive-compiled only "
                             "with --full)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--skip-unavailable", action="store_true",
                        help="run the --methods available here and name the others instead of stopping")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case, median (default 3)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--timeout-s", type=float, default=600, help="per case; a slower case is recorded")
    parser.add_argument("--mem-limit-mib", type=int, default=16384, help="per case, above its inputs")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=None,
                        help="comma-separated subset of forward,forward_backward (default: forward_backward; "
                             "with --full both)")
    parser.add_argument("--gemm-size", type=int, default=4096,
                        help="the floor's rate is that of a gemm-size x gemm-size x gemm-size matmul (default 4096)")
    parser.add_argument("--workspace-mib", type=int, default=None,
                        help="dropreg's logits workspace on the benchmark's device (default: dropreg's default)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--full", action="store_true", help="the whole sweep (about 20 minutes on 2 CPU cores)")
    preset.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke run)")
    parser.add_argument("--profile", action="store_true", help="profile one dropreg configuration instead")
    parser.add_argument("--profile-vocab", type=int, default=32768)
    args = parser.parse_args(argv)
    args.preset = "full" if args.full else "quick" if args.quick else "default"
    preset_values = PRESETS[args.preset]
    for key, value in preset_values.items():
        # the tiny shapes of --quick replace the defaults; everything else fills only what was not given
        if getattr(args, key, None) is None or (args.quick and key in ("rows", "dim", "gemm_size")):
            setattr(args, key, value)
    unknown_modes = sorted(set(args.modes) - {"forward", "forward_backward"})
    if unknown_modes:
        parser.error(f"--modes: unknown {unknown_modes}; expected forward and/or forward_backward")
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def select_methods(args):
    from methods import available_methods
    names = available_methods(args.device, args.family)
    if not args.compiled and not args.methods:
        names = [n for n in names if n != "naive-compiled"]  # compiling alone takes minutes per case
    if args.methods:
        unknown = sorted(set(args.methods) - set(names))
        if unknown and not args.skip_unavailable:
            raise SystemExit(f"--methods: unknown or unavailable {unknown}; available: {names}")
        if unknown:  # a peer missing from this machine is recorded, not fatal
            print(f"skipped, unknown or unavailable here: {', '.join(unknown)}", flush=True)
        names = [n for n in names if n in args.methods]
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


def run_case(args, method, vocab, mode, rows=None, dim=None):
    rows, dim = rows or args.rows, dim or args.dim
    command = [sys.executable, os.path.join(HERE, "run_case.py"), "--method", method, "--mode", mode,
               "--rows", str(rows), "--dim", str(dim), "--vocab", str(vocab), "--dtype", args.dtype,
               "--device", args.device, "--repeats", str(args.repeats), "--mem-limit-mib", str(args.mem_limit_mib)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.workspace_mib:
        command += ["--workspace-mib", str(args.workspace_mib)]
    base = dict(method=method, mode=mode, rows=rows, dim=dim, vocab=vocab, dtype=args.dtype,
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


def measure_gemm_rate(args):
    """One ``--gemm-size`` cube matmul in its own subprocess: its row, with ``gflops`` when it ran."""
    from methods import SQUARE_GEMM, square_gemm_rate
    size = args.gemm_size
    result = run_case(args, SQUARE_GEMM, size, "forward", rows=size, dim=size)
    if result.get("status") == "ok":
        result["gflops"] = square_gemm_rate(size, result["seconds"]) / 1e9
    return result


def floor_rate(gemm_runs):
    """FLOP/s of the floor: the fastest square matmul of the run (the rate the machine showed it can reach)."""
    rates = [r["gflops"] for r in gemm_runs if r.get("status") == "ok"]
    if not rates:
        raise SystemExit(f"the square matmul that sets the floor did not run: {gemm_runs}")
    return max(rates) * 1e9


def add_floor_ratios(results, family, flop_rate):
    from methods import floor_seconds
    for r in results:
        if r.get("status") == "ok":
            r["floor_gflops"] = flop_rate / 1e9
            r["floor_seconds"] = floor_seconds(r["method"], family, r["mode"], r["rows"], r["dim"], r["vocab"],
                                               flop_rate)
            r["floor_ratio"] = r["seconds"] / r["floor_seconds"]


def _span(values, fmt):
    values = list(values)
    low, high = fmt.format(min(values)), fmt.format(max(values))
    return low if low == high else f"{low}-{high}"


def wins_and_losses(results, mine, other):
    """One plain sentence: at which V ``mine`` (forward+backward) is faster than ``other``, at which slower."""
    index = {(r["method"], r["vocab"]): r for r in results if r["mode"] == "forward_backward"
             and r.get("status") == "ok"}
    speedups = {v: index[(other, v)]["seconds"] / index[(mine, v)]["seconds"]
                for (method, v) in index if method == mine and (other, v) in index}
    if not speedups:
        return None
    parts = []  # within 2% of each other is timing noise on the 2-core machine: "on par"
    for label, keep in (("faster", lambda s: s >= 1.02), ("slower", lambda s: s <= 0.98),
                        ("on par", lambda s: 0.98 < s < 1.02)):
        vocabs = sorted(v for v, s in speedups.items() if keep(s))
        if vocabs:
            parts.append(f"{label} at V={', '.join(map(str, vocabs))} "
                         f"({_span((speedups[v] for v in vocabs), '{:.2f}')}x {other}'s speed)")
    return f"{mine} vs {other}: " + "; ".join(parts) + "."


def summaries(results, methods, family):
    """Where each dropreg method wins and loses against each baseline, then per V its speed-up, memory and floor
    ratio."""
    from methods import BASELINES
    ours = [m for m in methods if "dropreg-" in m]
    baselines = [b for b in BASELINES[family] if b in methods]
    lines = [line for mine in ours for other in baselines if (line := wins_and_losses(results, mine, other))]
    index = {(r["method"], r["vocab"], r["mode"]): r for r in results}
    if lines:
        lines.append("")
    for vocab in sorted({r["vocab"] for r in results}):
        for mine in ours:
            mine_r = index.get((mine, vocab, "forward_backward"))
            if not mine_r or mine_r.get("status") != "ok":
                continue
            parts = []
            for other in baselines:
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


def floor_description(args, gemm_runs, flop_rate):
    from methods import FLOOR_MULTIPLE
    multiple = FLOOR_MULTIPLE[args.family]
    measured = ", ".join(f"{r['gflops']:.1f}" if r.get("status") == "ok" else r.get("status", "?")
                         for r in gemm_runs)
    return (f"Floor: the compute-bound limit, each method's multiply-adds ({multiple['forward_backward']}·N·V·d for "
            f"the {args.family} family's forward+backward, {multiple['forward']} for its forward; 3 and 1 for a "
            f"cross-entropy-only method) at {flop_rate / 1e9:.1f} GFLOP/s, the faster of two "
            f"{args.gemm_size}x{args.gemm_size}x{args.gemm_size} {args.dtype} matmuls timed in this run, before "
            f"and after the cases ({measured} GFLOP/s).")


def write_outputs(args, results, methods, header, gemm_runs, flop_rate):
    os.makedirs(args.out, exist_ok=True)
    fields = ["method", "mode", "rows", "dim", "vocab", "dtype", "device", "status", "seconds", "floor_seconds",
              "floor_ratio", "floor_gflops", "gflops", "peak_mib", "repeats", "threads", "workspace_mib", "error"]
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(gemm_runs[:1] + results + gemm_runs[1:])
    index = {(r["method"], r["vocab"], r["mode"]): r for r in results}

    def cell(r, key, fmt):
        if r is None:
            return "-"
        if r.get("status") != "ok":
            return r.get("status", "?")
        return fmt.format(r[key]) if key in r else "-"

    columns = [("forward", "seconds", "forward s", "{:.4f}"), ("forward", "floor_ratio", "forward / floor", "{:.2f}"),
               ("forward_backward", "seconds", "fwd+bwd s", "{:.4f}"),
               ("forward_backward", "floor_ratio", "fwd+bwd / floor", "{:.2f}"),
               ("forward_backward", "peak_mib", "fwd+bwd peak MiB", "{:.1f}")]
    columns = [c for c in columns if c[0] in args.modes]
    lines = [f"Measured {header}, {args.preset} run.", "", floor_description(args, gemm_runs, flop_rate), "",
             "| V | method | " + " | ".join(c[2] for c in columns) + " |",
             "|---:|---|" + "---:|" * len(columns)]
    for vocab in args.vocabs:
        for method in methods:
            cells = [cell(index.get((method, vocab, mode)), key, fmt) for mode, key, _, fmt in columns]
            lines.append(f"| {vocab} | {method} | " + " | ".join(cells) + " |")
    lines += ["", *summaries(results, methods, args.family)]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(args, results, methods, header, flop_rate)
    return lines


def plot(args, results, methods, header, flop_rate):
    from methods import FLOOR_MULTIPLE, floor_seconds, method_family
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vocabs = sorted(args.vocabs)
    for key, ylabel, name in (("seconds", "forward+backward time (s)", "time_vs_vocab.png"),
                              ("peak_mib", "forward+backward peak memory (MiB)", "memory_vs_vocab.png")):
        fig, ax = plt.subplots(figsize=(7.5, 5))
        for method in methods:
            points = sorted((r["vocab"], r[key]) for r in results if r["method"] == method
                            and r["mode"] == "forward_backward" and r.get("status") == "ok" and key in r)
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        if key == "seconds":
            # one line per multiply-add count present (a cross-entropy-only baseline has its own, lower one)
            families = sorted({method_family(m, args.family) for m in methods}, key=lambda f: f != args.family)
            for family, style in zip(families, ("k--", "k:", "k-.")):
                limit = [floor_seconds(family, family, "forward_backward", args.rows, args.dim, v, flop_rate)
                         for v in vocabs]
                ax.plot(vocabs, limit, style, label=f"compute-bound limit, {FLOOR_MULTIPLE[family]['forward_backward']}"
                        f"·N·V·d at {flop_rate / 1e9:.0f} GFLOP/s" + ("" if family == args.family else
                                                                     " (cross entropy alone)"))
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
    cases = [(m, v, mode) for v in args.vocabs for m in methods for mode in args.modes]
    progress = Progress(len(cases) + 2)
    progress.step(f"square matmul {args.gemm_size}^3 (the floor's rate)")
    gemm_runs = [measure_gemm_rate(args)]
    results = []
    for method, vocab, mode in cases:
        progress.step(f"V={vocab} {method} {mode}")
        results.append(run_case(args, method, vocab, mode))
    progress.step(f"square matmul {args.gemm_size}^3 again")
    gemm_runs.append(measure_gemm_rate(args))
    progress.close()
    flop_rate = floor_rate(gemm_runs)
    add_floor_ratios(results, args.family, flop_rate)
    header = describe_run(args)
    lines = write_outputs(args, results, methods, header, gemm_runs, flop_rate)
    print("\n".join(lines))
    print(f"\nResults: {args.out}/results.csv, results.md, time_vs_vocab.png, memory_vs_vocab.png")
    failed = [r for r in results if "dropreg-" in r["method"] and r.get("status") != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
