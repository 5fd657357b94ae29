"""One training step of a small LSTM language model with dropout's regularizers at every site, against vocabulary size.

    python benchmarks/sites_step.py            # V in {10k, 33k, 131k, 262k}, N=512 tokens, d=256 (~10 min, 2 cores)
    python benchmarks/sites_step.py --quick    # tiny sizes (CI smoke run)
    python benchmarks/sites_step.py --interleaved --vocabs 10000,33278,131072 --rounds 8
        # the regularized step against the dropout step, alternating in one process: median per-round ratio

Methods, one forward + backward + optimizer-free step each, same model and data:

* ``dropreg``: the sites (embedding output, LSTM output = head input) are ``dropreg.DropoutSite``; the loss is
  ``linear_cross_entropy(..., p=0, sites=sites, site_p=ps).loss``, the one call (both terms at both sites, one
  sampled label, the head input a sampled site): streamed head, no N x V tensor.
* ``dropreg-blocks``: the same terms from the building blocks, ``linear_cross_entropy(...).ce +
  site_regularizers(...)`` (two trips over the vocabulary).
* ``authors``: the approach of Wei, Kakade & Ma's code: materialized logits, one label sampled with
  ``torch.multinomial`` from the softmax, ``g_x`` by ``autograd.grad(create_graph=True)`` of the summed cross
  entropy, explicit ``sum (x g_x(y_hat))^2`` and implicit ``sum sigma x g_x(y)``, then backward (double backprop
  through the N x V logits).
* ``dropout``: plain ``nn.Dropout`` at the same sites and materialized cross entropy (what the regularizers
  replace; the cheapest step, for scale).

Each case runs in its own subprocess (peak memory is clean); time is the median after one warm-up, memory the
peak RSS above the post-setup size (benchmarks/run_case.py's helpers). Results: --out (default
benchmarks/results/sites): results.csv, results.md, time_vs_vocab.png, memory_vs_vocab.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

METHODS = ("dropreg", "dropreg-blocks", "authors", "dropout")
DEFAULT_VOCABS = [10000, 33278, 131072, 262144]
QUICK = dict(rows=64, dim=32, vocabs=[500, 2000], repeats=1)


def build_case(method: str, batch: int, bptt: int, dim: int, vocab: int, p: float):
    """The model, the data and a step() closure for one method."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    import dropreg

    torch.manual_seed(0)
    site = (lambda: nn.Dropout(p)) if method == "dropout" else (lambda: dropreg.DropoutSite(p))

    class LSTMLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.embed_site = site()
            self.lstm = nn.LSTM(dim, dim, batch_first=True)
            self.output_site = site()
            self.head = nn.Linear(dim, vocab)

        def forward(self, ids):
            out, _ = self.lstm(self.embed_site(self.embed(ids)))
            return self.output_site(out)

    model = LSTMLM()
    ids = torch.randint(0, vocab, (batch, bptt))
    target = torch.randint(0, vocab, (batch, bptt))
    kappa = p / (1 - p)

    def step_dropreg():
        model.zero_grad(set_to_none=True)
        hidden = model(ids)
        sites, ps = dropreg.DropoutSite.collect(model)
        dropreg.linear_cross_entropy(hidden, model.head.weight, target, linear_bias=model.head.bias, p=0.0,
                                     sites=sites, site_p=ps, seed=1).loss.backward()

    def step_dropreg_blocks():
        model.zero_grad(set_to_none=True)
        hidden = model(ids)
        sites, ps = dropreg.DropoutSite.collect(model)
        ce = dropreg.linear_cross_entropy(hidden, model.head.weight, target, linear_bias=model.head.bias,
                                          explicit=False, implicit=False).ce
        reg = dropreg.site_regularizers(hidden, model.head.weight, target, sites, linear_bias=model.head.bias,
                                        p=ps, seed=1)
        (ce + reg.explicit + reg.implicit).backward()

    def step_authors():
        model.zero_grad(set_to_none=True)
        hidden = model(ids)
        sites, _ = dropreg.DropoutSite.collect(model)
        logits = model.head(hidden).reshape(-1, vocab)
        flat_target = target.reshape(-1)
        ce = F.cross_entropy(logits, flat_target)
        with torch.no_grad():
            sampled = torch.multinomial(torch.softmax(logits, dim=-1), 1).squeeze(1)
        explicit_grads = torch.autograd.grad(F.cross_entropy(logits, sampled, reduction="sum"), sites,
                                             create_graph=True)
        implicit_grads = torch.autograd.grad(F.cross_entropy(logits, flat_target, reduction="sum"), sites,
                                             create_graph=True)
        explicit = sum(((x * g) ** 2).sum() for x, g in zip(sites, explicit_grads)) * kappa / 2
        implicit = sum((torch.randint(0, 2, x.shape).to(x.dtype) * 2 - 1).mul(x * g).sum()
                       for x, g in zip(sites, implicit_grads)) * kappa**0.5
        (ce + (explicit + implicit) / flat_target.numel()).backward()

    def step_dropout():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model.head(model(ids)).reshape(-1, vocab), target.reshape(-1)).backward()

    model.train()
    return {"dropreg": step_dropreg, "dropreg-blocks": step_dropreg_blocks, "authors": step_authors,
            "dropout": step_dropout}[method]


def run_case(args) -> dict:
    """Runs in the subprocess: time and peak memory of one (method, V)."""
    import torch

    from run_case import _reset_peak_rss, _status_kib, time_runs

    if args.threads:
        torch.set_num_threads(args.threads)
    result = dict(method=args.method, vocab=args.vocab, rows=args.batch * args.bptt, dim=args.dim,
                  threads=torch.get_num_threads())
    step = build_case(args.method, args.batch, args.bptt, args.dim, args.vocab, args.p)
    base = _status_kib("VmRSS") * 1024
    cap = _status_kib("VmSize") * 1024 + args.mem_limit_mib * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    _reset_peak_rss()
    try:
        seconds, repeats = time_runs(step, args.repeats, "cpu", args.time_budget_s)
    except (RuntimeError, MemoryError) as error:
        return dict(result, status="oom" if "allocate" in str(error) else "error", error=str(error)[:300])
    return dict(result, status="ok", seconds=seconds, repeats=repeats,
                peak_mib=(_status_kib("VmHWM") * 1024 - base) / 2**20)


def run_interleaved(args) -> dict:
    """Runs in the subprocess: ``--pair``'s two methods alternate, one step each per round, after a warm-up; returns
    each round's seconds and the median of the per-round ratios (first / second)."""
    import statistics
    import time

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    first, second = args.pair
    steps = {m: build_case(m, args.batch, args.bptt, args.dim, args.vocab, args.p) for m in (first, second)}
    for step in steps.values():
        step()
    rounds = []
    for index in range(args.rounds):
        seconds = {}
        for method in ((first, second) if index % 2 == 0 else (second, first)):
            begin = time.perf_counter()
            steps[method]()
            seconds[method] = time.perf_counter() - begin
        rounds.append(seconds)
    ratios = [r[first] / r[second] for r in rounds]
    return dict(vocab=args.vocab, first=first, second=second, rows=args.batch * args.bptt, dim=args.dim,
                threads=torch.get_num_threads(), first_median_s=statistics.median(r[first] for r in rounds),
                second_median_s=statistics.median(r[second] for r in rounds), ratio=statistics.median(ratios),
                ratio_min=min(ratios), ratio_max=max(ratios), rounds=len(rounds))


def write_interleaved(rows: list[dict], out: str, header: str) -> None:
    os.makedirs(out, exist_ok=True)
    fields = ["vocab", "first", "second", "rows", "dim", "threads", "first_median_s", "second_median_s", "ratio",
              "ratio_min", "ratio_max", "rounds"]
    with open(os.path.join(out, "interleaved.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [header, "", "| V | step | s (median) | dropout step s (median) | median per-round ratio | range |",
             "|---:|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['vocab']} | {r['first']} | {r['first_median_s']:.3f} | {r['second_median_s']:.3f} | "
                     f"{r['ratio']:.2f}x | {r['ratio_min']:.2f}-{r['ratio_max']:.2f} |")
    with open(os.path.join(out, "interleaved.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def write_results(rows: list[dict], out: str, header: str) -> None:
    os.makedirs(out, exist_ok=True)
    fields = ["method", "vocab", "rows", "dim", "threads", "status", "seconds", "repeats", "peak_mib"]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    by_key = {(r["method"], r["vocab"]): r for r in rows}
    lines = [header, "", "| V | method | step s | speed-up over authors | peak MiB | memory / authors' |", "|---:|---|---:|---:|---:|---:|"]
    for vocab in sorted({r["vocab"] for r in rows}):
        authors = by_key.get(("authors", vocab), {})
        for method in METHODS:
            r = by_key.get((method, vocab))
            if r is None:
                continue
            if r["status"] != "ok":
                lines.append(f"| {vocab} | {method} | {r['status']} | | | |")
                continue
            speed = f"{authors['seconds'] / r['seconds']:.2f}x" if authors.get("status") == "ok" else ""
            memory = f"{r['peak_mib'] / authors['peak_mib']:.3f}x" if authors.get("status") == "ok" else ""
            lines.append(f"| {vocab} | {method} | {r['seconds']:.3f} | {speed} | {r['peak_mib']:.0f} | {memory} |")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    for key, label, name in (("seconds", "step time (s)", "time_vs_vocab.png"),
                             ("peak_mib", "peak memory above inputs (MiB)", "memory_vs_vocab.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in METHODS:
            points = sorted((r["vocab"], r[key]) for r in rows if r["method"] == method and r["status"] == "ok")
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel(label)
        ax.set_title("LSTM LM step, regularizers at every site")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=120)
        plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--bptt", type=int, default=32)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--vocabs", type=lambda s: [int(v) for v in s.split(",")], default=None,
                        help=f"comma-separated V values (default {DEFAULT_VOCABS}; --quick: {QUICK['vocabs']})")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    parser.add_argument("--p", type=float, default=0.4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--mem-limit-mib", type=int, default=16384)
    parser.add_argument("--time-budget-s", type=float, default=60.0)
    parser.add_argument("--timeout-s", type=float, default=900)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "sites"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--interleaved", action="store_true",
                        help="time the regularized step against the dropout step, alternating in one process")
    parser.add_argument("--rounds", type=int, default=8, help="--interleaved: rounds (one step of each per round)")
    parser.add_argument("--pair", type=lambda s: s.split(","), default=["dropreg", "dropout"],
                        help="--interleaved: the two methods, the ratio is first / second")
    parser.add_argument("--case", action="store_true", help=argparse.SUPPRESS)  # internal: run one case
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_interleaved(args) if args.interleaved else run_case(args)))
        return 0
    if args.quick:
        args.batch, args.bptt = 4, QUICK["rows"] // 4
        args.dim, args.repeats = QUICK["dim"], QUICK["repeats"]
    if args.vocabs is None:  # an explicit --vocabs wins over --quick's sizes
        args.vocabs = QUICK["vocabs"] if args.quick else DEFAULT_VOCABS
    if args.interleaved:
        return interleaved_main(args)
    rows = []
    for vocab in args.vocabs:
        for method in args.methods:
            command = [sys.executable, os.path.abspath(__file__), "--case", "--method", method, "--vocab", str(vocab),
                       "--batch", str(args.batch), "--bptt", str(args.bptt), "--dim", str(args.dim), "--p", str(args.p),
                       "--repeats", str(args.repeats), "--mem-limit-mib", str(args.mem_limit_mib),
                       "--time-budget-s", str(args.time_budget_s)] + (["--threads", str(args.threads)] if args.threads else [])
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s)
                result = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else \
                    dict(method=method, vocab=vocab, status="error", error=done.stderr[-300:])
            except subprocess.TimeoutExpired:
                result = dict(method=method, vocab=vocab, status="timeout")
            rows.append(result)
            print(f"V={vocab:>7} {method:>8}: {result.get('status')} "
                  f"{result.get('seconds', float('nan')):.3f} s {result.get('peak_mib', float('nan')):.0f} MiB", flush=True)
    import torch
    header = (f"LSTM LM training step, N={args.batch * args.bptt} tokens (batch {args.batch} x bptt {args.bptt}), "
              f"d={args.dim}, p={args.p} at 2 sites, fp32, torch {torch.__version__}, {torch.get_num_threads()} "
              f"threads, {platform.processor() or platform.machine()}; `python benchmarks/sites_step.py"
              f"{' --quick' if args.quick else ''}`")
    write_results(rows, args.out, header)
    print(open(os.path.join(args.out, "results.md")).read())
    failed = [r for r in rows if r["status"] == "error"]
    for r in failed:  # an out-of-memory or timeout is a result; an error is a broken benchmark
        print(f"V={r['vocab']} {r['method']} failed:\n{r.get('error', '')}", file=sys.stderr)
    return 1 if failed else 0


def interleaved_main(args) -> int:
    import torch
    rows = []
    for vocab in args.vocabs:
        command = [sys.executable, os.path.abspath(__file__), "--case", "--interleaved", "--vocab", str(vocab),
                   "--pair", ",".join(args.pair), "--rounds", str(args.rounds), "--batch", str(args.batch),
                   "--bptt", str(args.bptt), "--dim", str(args.dim), "--p", str(args.p)] + \
            (["--threads", str(args.threads)] if args.threads else [])
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"V={vocab:>7}: {r['first']} {r['first_median_s']:.3f} s, {r['second']} {r['second_median_s']:.3f} s, "
              f"ratio {r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})", flush=True)
    header = (f"{args.pair[0]} step against {args.pair[1]} step, alternating in one process ({args.rounds} rounds "
              f"after a warm-up), LSTM LM, N={args.batch * args.bptt} tokens, d={args.dim}, p={args.p} at 2 sites "
              f"(embedding output, head input), fp32, torch {torch.__version__}, {args.threads or torch.get_num_threads()} "
              f"threads; `python benchmarks/sites_step.py --interleaved --vocabs "
              f"{','.join(map(str, args.vocabs))} --rounds {args.rounds}`")
    write_interleaved(rows, args.out, header)
    print(open(os.path.join(args.out, "interleaved.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
