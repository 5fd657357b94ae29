"""Does it reproduce the paper? Dropout against its explicit and implicit regularizers at every site, over seeds.

    apt-get install -y fortunes && python examples/prepare_fortunes.py --out data/fortunes
    python examples/paper_reproduction.py --out docs/paper_reproduction/every_site   # ~55 min on 2 cores
    python examples/paper_reproduction.py --quick --out /tmp/smoke      # synthetic corpus, CI smoke run

A word-level LSTM language model (embedding, stacked single-layer LSTMs, tied nothing) with a dropout site
after the embedding, between LSTM layers and before the output layer (Wei, Kakade & Ma's AWD-style placement,
without weight drop). Four runs per seed, with the same initialization and data order for a given seed:

1. none: plain cross entropy;
2. dropout: ``nn.Dropout(p)`` at every site;
3. explicit: no dropout; cross entropy + the explicit regularizer at every site (one call,
   ``linear_cross_entropy(..., sites=...)``, one sampled label, coefficient kappa/2);
4. explicit+implicit: the same plus the random-sign implicit term (coefficient sqrt(kappa)).

SGD with gradient clipping as the paper (learning rate divided by 4 when validation stops improving, and after
each of ``--decay-epochs`` so that runs that keep improving also anneal within the short budget; Adam with
``--optimizer adam``). Per run: mean +- sd over seeds of the best validation perplexity and the test perplexity
at that epoch, Welch t 95% intervals of the differences against "none" and "dropout", learning curves with
+-1 sd bands, and diagnostics of the final parameters (``dropreg.diagnostics``): the top Hessian eigenvalue and
the Hessian trace of the plain training loss (dropout off) on fixed training batches, and condensation of the
first LSTM layer's input weights (pairwise |cos| of its units' input weight vectors, fraction above 0.9).
``--data`` takes a folder with train.txt, valid.txt, test.txt (PTB / WikiText-2 layout); the default is the
fortunes corpus that examples/prepare_fortunes.py writes. The (run, seed) trainings are independent and go to
``--workers`` processes of ``--threads`` threads each: for a model this small, two one-thread processes on two
cores do more steps per second than one two-thread process (most of a step is many small LSTM kernels).
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import math
import multiprocessing
import os
import sys
import textwrap
import time

import torch
import torch.nn.functional as F
from torch import nn

import dropreg
from dropreg import diagnostics

RUNS = ("none", "dropout", "explicit", "explicit+implicit")
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "fortunes")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", default=DEFAULT_DATA,
                        help="folder with train.txt, valid.txt, test.txt (default: the fortunes corpus, %(default)s)")
    source.add_argument("--quick", action="store_true", help="tiny synthetic corpus and model (CI smoke run)")
    parser.add_argument("--out", default="examples/results")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {list(RUNS)}")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (at least 2)")
    parser.add_argument("--p", type=float, default=0.4, help="drop probability at every site (the paper's LSTM value)")
    parser.add_argument("--emb", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--decay-epochs", default="",
                        help="SGD: also divide the learning rate by 4 after these epochs (comma-separated; default none)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--lr", type=float, default=None, help="default 20 (SGD) or 3e-3 (Adam)")
    parser.add_argument("--clip", type=float, default=0.25)
    parser.add_argument("--train-tokens", type=int, default=60_000, help="first N training tokens (small: overfits)")
    parser.add_argument("--diagnostic-batches", type=int, default=2, help="training batches the Hessian is taken on")
    parser.add_argument("--eigen-iterations", type=int, default=20, help="power iterations for the top eigenvalue")
    parser.add_argument("--trace-samples", type=int, default=10, help="Hutchinson probes for the trace")
    parser.add_argument("--workers", type=int, default=2, help="processes training (run, seed) pairs in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = parser.parse_args(argv)
    if args.quick:  # tiny defaults; options given on the command line still win
        parser.set_defaults(data=None, emb=16, hidden=16, layers=2, epochs=2, batch=4, bptt=10, seeds="0,1",
                            diagnostic_batches=1, eigen_iterations=3, trace_samples=2)
        args = parser.parse_args(argv)
        args.data = None
    if args.lr is None:
        args.lr = 20.0 if args.optimizer == "sgd" else 3e-3
    args.run_names = args.runs.split(",")
    args.decay_epoch_list = [int(e) for e in args.decay_epochs.split(",") if e]
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    unknown = set(args.run_names) - set(RUNS)
    if unknown:
        parser.error(f"--runs: unknown {sorted(unknown)}; choose from {list(RUNS)}")
    if len(args.seed_list) < 2:
        parser.error("--seeds: at least two seeds (a standard deviation needs them)")
    if args.workers < 1 or args.threads < 1:
        parser.error("--workers and --threads: expected at least 1")
    if args.data is not None and not all(os.path.isfile(os.path.join(args.data, f"{split}.txt"))
                                         for split in ("train", "valid", "test")):
        parser.error(f"--data: {args.data} lacks train.txt, valid.txt and test.txt; make the default corpus with "
                     f"'apt-get install -y fortunes && python examples/prepare_fortunes.py --out data/fortunes' "
                     f"or pass a PTB / WikiText-2 folder")
    return args


def load_corpus(args):
    if args.quick:
        gen = torch.Generator().manual_seed(1234)
        vocab = [f"w{i}" for i in range(60)] + ["<eos>"]
        make = lambda n: torch.randint(0, len(vocab), (n,), generator=gen)  # noqa: E731
        return vocab, make(1200), make(300), make(300)
    splits = {}
    for split in ("train", "valid", "test"):
        with open(os.path.join(args.data, f"{split}.txt")) as f:
            splits[split] = [tok for line in f for tok in line.split() + ["<eos>"]]
    counts = collections.Counter(splits["train"])
    vocab = sorted(counts, key=lambda t: (-counts[t], t))
    if "<unk>" not in counts:
        vocab.append("<unk>")
    index = {tok: i for i, tok in enumerate(vocab)}
    unk = index["<unk>"]
    tensors = [torch.tensor([index.get(tok, unk) for tok in splits[s]]) for s in ("train", "valid", "test")]
    tensors[0] = tensors[0][: args.train_tokens]
    return vocab, *tensors


def batchify(ids, batch):
    n = ids.numel() // batch
    return ids[: n * batch].view(batch, n)  # (batch, time): each row a contiguous stream


class EverySiteLSTM(nn.Module):
    """Embedding -> site -> LSTM -> site -> ... -> LSTM -> site -> head. A site is nn.Dropout(p) for the
    "dropout" run and dropreg.DropoutSite(p) (the identity, recorded for the regularizers) otherwise."""

    def __init__(self, vocab, emb, hidden, layers, p, dropout):
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        self.lstms = nn.ModuleList([nn.LSTM(emb if i == 0 else hidden, hidden, batch_first=True)
                                    for i in range(layers)])
        make_site = (lambda: nn.Dropout(p)) if dropout else (lambda: dropreg.DropoutSite(p))
        self.sites = nn.ModuleList([make_site() for _ in range(layers + 1)])
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids, state=None):
        x = self.sites[0](self.embed(ids))
        new_state = []
        for i, lstm in enumerate(self.lstms):
            x, s = lstm(x, None if state is None else state[i])
            x = self.sites[i + 1](x)
            new_state.append(tuple(t.detach() for t in s))
        return x, new_state


def step_loss(model, ids, target, state, run, args, seed):
    hidden, state = model(ids, state)
    if model.training and run in ("explicit", "explicit+implicit"):
        # one call: the cross entropy and every site's terms (the head input a sampled site: p=0)
        sites, ps = dropreg.DropoutSite.collect(model)
        out = dropreg.linear_cross_entropy(hidden, model.head.weight, target, linear_bias=model.head.bias, p=0.0,
                                           sites=sites, site_p=ps, implicit=run == "explicit+implicit", seed=seed)
        return out.loss, out.ce, state
    ce = dropreg.linear_cross_entropy(hidden, model.head.weight, target, linear_bias=model.head.bias,
                                      explicit=False, implicit=False).ce
    return ce, ce, state


def windows(data, bptt):
    for t in range(0, data.shape[1] - 1, bptt):
        target = data[:, t + 1:t + 1 + bptt]
        yield data[:, t:t + target.shape[1]], target


def evaluate(model, data, args):
    model.eval()
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for ids, target in windows(data, args.bptt):
            _, ce, state = step_loss(model, ids, target, state, "none", args, 0)
            total += ce.item() * target.numel()
            count += target.numel()
    return math.exp(total / count)


def final_diagnostics(model, train, args, seed):
    """Flatness of the plain training loss (dropout off) on the first batches, and condensation."""
    model.eval()
    batches = list(windows(train, args.bptt))[: args.diagnostic_batches]
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_fn():
        return sum(step_loss(model, ids, target, None, "none", args, 0)[1] for ids, target in batches) / len(batches)

    generator = torch.Generator().manual_seed(seed)
    top = diagnostics.top_hessian_eigenvalue(loss_fn, params, iterations=args.eigen_iterations,
                                                tolerance=1e-3, generator=generator)
    trace = diagnostics.hessian_trace(loss_fn, params, samples=args.trace_samples, generator=generator)
    first_layer = model.lstms[0].weight_ih_l0  # (4 hidden, emb): one input weight vector per gate unit
    condensed = diagnostics.condensation(first_layer, threshold=0.9)
    return dict(top_eigenvalue=top.value, trace=trace.value, trace_se=trace.standard_error,
                condensation=condensed.fraction_above, median_abs_cos=float(condensed.abs_cosines.median()))


def log(message):
    print(message, file=sys.stderr, flush=True)


def train_one(run, seed, data, vocab_size, args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(seed)  # same initialization and data order for every run of this seed
    model = EverySiteLSTM(vocab_size, args.emb, args.hidden, args.layers, args.p, dropout=run == "dropout")
    optimizer = (torch.optim.SGD(model.parameters(), lr=args.lr) if args.optimizer == "sgd"
                 else torch.optim.Adam(model.parameters(), lr=args.lr))
    train, valid, test = (batchify(d, args.batch) for d in data)
    history, best = [], dict(valid=math.inf, epoch=0, test=math.nan)
    start = time.perf_counter()
    step_seed = seed * 1_000_003
    for epoch in range(1, args.epochs + 1):
        model.train()
        state, total, count = None, 0.0, 0
        for ids, target in windows(train, args.bptt):
            step_seed += 1
            loss, ce, state = step_loss(model, ids, target, state, run, args, step_seed)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            dropreg.DropoutSite.collect(model)  # forget what the sites recorded (runs without regularizers)
            total += ce.item() * target.numel()
            count += target.numel()
        train_ppl, valid_ppl = math.exp(total / count), evaluate(model, valid, args)
        history.append(dict(run=run, seed=seed, epoch=epoch, train_ppl=train_ppl, valid_ppl=valid_ppl,
                            lr=optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - start))
        improved = valid_ppl < best["valid"]
        if improved:
            best = dict(valid=valid_ppl, epoch=epoch, test=evaluate(model, test, args))
        if args.optimizer == "sgd" and (not improved or epoch in args.decay_epoch_list):
            for group in optimizer.param_groups:
                group["lr"] /= 4.0
        log(f"{run:18s} seed {seed} epoch {epoch:2d}/{args.epochs}: train ppl {train_ppl:8.2f}  "
            f"valid ppl {valid_ppl:8.2f}  ({time.perf_counter() - start:6.1f} s)")
    summary = dict(run=run, seed=seed, best_valid_ppl=best["valid"], best_epoch=best["epoch"],
                   test_ppl_at_best=best["test"], final_train_ppl=history[-1]["train_ppl"],
                   seconds=time.perf_counter() - start)
    summary.update(final_diagnostics(model, train, args, seed))
    return history, summary


def t_quantile(probability, df):
    """Quantile of Student's t with (fractional) ``df`` degrees of freedom: bisection on the CDF, which is
    integrated numerically from the density (Simpson's rule; accurate to ~1e-8 for the df of a few seeds)."""
    df = torch.tensor(float(df), dtype=torch.float64)
    log_norm = torch.lgamma((df + 1) / 2) - torch.lgamma(df / 2) - 0.5 * torch.log(df * math.pi)

    def cdf(x):
        grid = torch.linspace(0.0, x, 4001, dtype=torch.float64)
        density = torch.exp(log_norm - (df + 1) / 2 * torch.log1p(grid * grid / df))
        weights = torch.ones(4001, dtype=torch.float64)
        weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
        return 0.5 + float((weights * density).sum()) * x / (3 * 4000)

    low, high = 0.0, 1.0
    while cdf(high) < probability:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < probability else (low, middle)
    return (low + high) / 2


def welch_interval(a, b, confidence=0.95):
    """mean(a) - mean(b) and its Welch t interval (unequal variances, Welch-Satterthwaite df)."""
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    va, vb = a.var() / len(a), b.var() / len(b)
    diff, se = float(a.mean() - b.mean()), float((va + vb).sqrt())
    if se == 0:
        return diff, diff, diff
    df = float((va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)))
    half = t_quantile(0.5 + confidence / 2, df) * se
    return diff, diff - half, diff + half


def _mean_sd(values):
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def summarize(summaries, runs):
    """Markdown lines: the table, the comparisons and the diagnostics."""
    by_run = {run: [s for s in summaries if s["run"] == run] for run in runs}
    lines = ["| run | seeds | best valid ppl (mean +- sd) | test ppl at best | best epoch | wall s per run |",
             "|---|---:|---:|---:|---:|---:|"]
    for run, rows in by_run.items():
        valid, test = _mean_sd([r["best_valid_ppl"] for r in rows]), _mean_sd([r["test_ppl_at_best"] for r in rows])
        lines.append(f"| {run} | {len(rows)} | {valid[0]:.2f} +- {valid[1]:.2f} | {test[0]:.2f} +- {test[1]:.2f} | "
                     f"{_mean_sd([r['best_epoch'] for r in rows])[0]:.1f} | "
                     f"{_mean_sd([r['seconds'] for r in rows])[0]:.0f} |")
    lines += ["", "Differences of mean best validation perplexity (negative: the first run is better), with 95% "
              "Welch t intervals over seeds:", ""]
    for baseline in ("none", "dropout"):
        for run in runs:
            if run == baseline or baseline not in by_run:
                continue
            diff, low, high = welch_interval([r["best_valid_ppl"] for r in by_run[run]],
                                                   [r["best_valid_ppl"] for r in by_run[baseline]])
            verdict = "better" if high < 0 else "worse" if low > 0 else "no measurable difference"
            lines.append(f"- {run} - {baseline}: {diff:+.2f} ppl [{low:+.2f}, {high:+.2f}]: {verdict}")
    lines += ["", "Diagnostics at the final parameters (plain training loss, dropout off; mean +- sd over seeds):", "",
              "| run | top Hessian eigenvalue | Hessian trace | condensation: share of |cos| > 0.9 | median |cos| |",
              "|---|---:|---:|---:|---:|"]
    for run, rows in by_run.items():
        cells = [_mean_sd([r[key] for r in rows]) for key in ("top_eigenvalue", "trace", "condensation",
                                                               "median_abs_cos")]
        lines.append(f"| {run} | {cells[0][0]:.3g} +- {cells[0][1]:.2g} | {cells[1][0]:.3g} +- {cells[1][1]:.2g} | "
                     f"{cells[2][0]:.4f} +- {cells[2][1]:.4f} | {cells[3][0]:.3f} |")
    return lines


def write_results(args, histories, summaries, header):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summaries[0]))
        writer.writeheader()
        writer.writerows(summaries)
    with open(os.path.join(args.out, "curves.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(histories[0][0]))
        writer.writeheader()
        for history in histories:
            writer.writerows(history)
    lines = [header, ""] + summarize(summaries, args.run_names)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return lines
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for run in args.run_names:
        curves = torch.tensor([[h["valid_ppl"] for h in history] for history in histories if history[0]["run"] == run],
                              dtype=torch.float64)
        epochs = list(range(1, curves.shape[1] + 1))
        mean, sd = curves.mean(0), curves.std(0)
        line, = ax.plot(epochs, mean, marker="o", label=run)
        ax.fill_between(epochs, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation perplexity (mean +- 1 sd over seeds)")
    ax.set_title("\n".join(textwrap.wrap(header, 120)), fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "learning_curves.png"), dpi=110)
    plt.close(fig)
    return lines


def main(argv=None):
    args = parse_args(argv)
    vocab, *data = load_corpus(args)
    header = (f"{'synthetic (--quick)' if args.quick else os.path.relpath(args.data)}: {data[0].numel()} train tokens, V={len(vocab)}, "
              f"{args.layers}x LSTM {args.hidden}, emb {args.emb}, p={args.p} at {args.layers + 1} sites, "
              f"{args.optimizer} lr {args.lr} clip {args.clip}"
              f"{' (/4 on plateau' + (f' and after epochs {args.decay_epochs}' if args.decay_epochs else '') + ')' if args.optimizer == 'sgd' else ''}, batch {args.batch}x{args.bptt}, {args.epochs} epochs, "
              f"seeds {args.seeds}, {args.workers} worker(s) x {args.threads} thread(s)")
    print(header, flush=True)
    # the costliest runs first, so that the cheap ones fill the workers' tail
    cost_order = sorted(args.run_names, key=lambda run: -RUNS.index(run))
    jobs = [(run, seed) for run in cost_order for seed in args.seed_list]
    start = time.perf_counter()
    if args.workers == 1:
        results = [train_one(run, seed, data, len(vocab), args) for run, seed in jobs]
    else:  # every job seeds itself, so the results do not depend on which worker runs it or when
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context) as pool:
            futures = [pool.submit(train_one, run, seed, data, len(vocab), args) for run, seed in jobs]
            results = [future.result() for future in futures]
    histories, summaries = [history for history, _ in results], [summary for _, summary in results]
    for summary in summaries:
        print(f"{summary['run']:18s} seed {summary['seed']}: best valid ppl {summary['best_valid_ppl']:.2f} (epoch "
              f"{summary['best_epoch']}), test {summary['test_ppl_at_best']:.2f}, {summary['seconds']:.0f} s")
    header += f"; total wall time {(time.perf_counter() - start) / 60:.1f} min"
    print("\n".join(write_results(args, histories, summaries, header)))


if __name__ == "__main__":
    main()
