"""Does it reproduce the paper? Dropout against its explicit and implicit regularizers at every site, tested fairly.

    apt-get install -y fortunes && python examples/prepare_fortunes.py --out data/fortunes
    python examples/paper_reproduction.py --stage grid  --out docs/paper_reproduction/v3   # lr grid, one seed
    python examples/paper_reproduction.py --stage sweep --out docs/paper_reproduction/v3   # coefficient sweep
    python examples/paper_reproduction.py --stage main  --out docs/paper_reproduction/v3   # five seeds + diagnostics
    python examples/paper_reproduction.py --quick --out /tmp/smoke      # all three stages, synthetic corpus (CI)

A word-level LSTM language model with tied input and output embeddings (AWD-LSTM's layout: the last LSTM layer
returns the embedding size, the head is the embedding matrix plus a bias), a dropout site after the embedding,
between the LSTM layers and before the head, and a weight-drop site on each LSTM's hidden-to-hidden weights,
all at one ``--p``. Four methods, with the same initialization, data order and
sequence lengths for a given seed:

1. none: plain cross entropy;
2. dropout: ``nn.Dropout(p)`` at every activation site, DropConnect(p) on the hidden-to-hidden weights (one mask
   per forward, AWD-LSTM's weight drop);
3. explicit: no dropout; cross entropy + the explicit regularizer at every site, the weights included (one call,
   ``linear_cross_entropy(..., sites=...)``, one sampled label, coefficient ``scale * kappa / 2``);
4. explicit+implicit: the same plus the random-sign implicit term (coefficient ``scale * sqrt(kappa)``).

Training (every stage): SGD at a constant learning rate (the authors' AWD-LSTM code: constant lr; its optional
decay and averaged-SGD switch are not used), gradient clipping, weight decay 1.2e-6 and AWD-LSTM's random
sequence lengths (``bptt`` with probability 0.95, else ``bptt / 2``, then N(., 5), at least 5, at most
``bptt + 40``, the step's lr scaled by length / bptt). Early stopping: a run stops when validation perplexity has
not improved for ``--patience`` epochs, or at ``--max-epochs``; the checkpoint with the best validation
perplexity is the run's result, and a run that reached the cap with its best epoch last is marked unconverged.

Stages: ``grid`` trains every method at every ``--grid-lrs`` value on ``--grid-seed`` (not one of the main
seeds) and picks each method's lr by best validation perplexity (grid.csv, grid.md); ``sweep`` trains the two
regularized methods at their chosen lr with the coefficients multiplied by each ``--sweep-scales`` value
(sweep.csv, sweep.md; scale 1 is the grid's run); ``main`` trains every method at its chosen lr and the derived
coefficients (scale 1) on ``--seeds``, then measures the diagnostics, and writes results.csv, curves.csv,
diagnostics.csv, results.md (tables, the pre-registered paired comparisons on test perplexity with Holm-adjusted
p-values and Bonferroni-adjusted intervals, and the verdict lines generated from them) and learning_curves.png.

Diagnostics (``dropreg.diagnostics``, exact autograd Hessian-vector products of the plain training loss with
dropout off on the first ``--diagnostic-batches`` training windows): the largest algebraic Hessian eigenvalue
(Lanczos, its residual and convergence recorded) and the Hessian trace (Hutchinson), each at the best-validation
checkpoint and at a matched training loss: per seed, the target is the highest clean training loss (dropout
off, whole training split) among the methods' best checkpoints, and each run is measured at its epoch whose clean
training loss is nearest it. Condensation is measured apart, in Zhang & Xu's setting (examples/condensation.py).

The (method, seed) trainings are independent and go to ``--workers`` processes of ``--threads`` threads each
(two one-thread processes do more steps per second on two cores than one two-thread process).
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
import tempfile
import textwrap
import time

import torch
import torch.nn.functional as F
from torch import nn

import dropreg
from dropreg import diagnostics

RUNS = ("none", "dropout", "explicit", "explicit+implicit")
REGULARIZED = ("explicit", "explicit+implicit")
# fixed before the run: (first, second) means the difference first - second (negative: first is better)
COMPARISONS = (("dropout", "none"), ("explicit+implicit", "none"), ("explicit+implicit", "dropout"),
               ("explicit", "explicit+implicit"))
ALPHA = 0.05
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "fortunes")


def _floats(text, name, parser):
    try:
        values = [float(v) for v in text.split(",") if v]
    except ValueError:
        parser.error(f"{name}: expected comma-separated numbers, got {text!r}")
    if not values or any(not v > 0 for v in values):
        parser.error(f"{name}: expected positive numbers, got {text!r}")
    return values


def seed_list(text, parser):
    """--seeds: at least two distinct integers (a paired test needs two)."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {text!r}")
    if len(set(seeds)) != len(seeds) or len(seeds) < 2:
        parser.error(f"--seeds: expected at least two distinct seeds (a paired test needs them), got {text!r}")
    return seeds


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", default=DEFAULT_DATA,
                        help="folder with train.txt, valid.txt, test.txt (default: the fortunes corpus, %(default)s)")
    source.add_argument("--quick", action="store_true", help="tiny synthetic corpus and model, every stage (CI)")
    parser.add_argument("--stage", choices=["grid", "sweep", "main", "all"], default="all")
    parser.add_argument("--out", default="examples/results")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {list(RUNS)}")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="main stage: comma-separated seeds (at least 2)")
    parser.add_argument("--grid-seed", type=int, default=100, help="the seed of the lr grid and the sweep")
    parser.add_argument("--grid-lrs", default="10,20,40", help="the learning rates tried per method")
    parser.add_argument("--sweep-scales", default="0.5,2", help="coefficient multipliers tried besides 1")
    parser.add_argument("--sweep-runs", default="explicit+implicit", help="the regularized methods the sweep trains")
    parser.add_argument("--lrs", default=None,
                        help="main/sweep: method=lr,... instead of the grid's choice (read from OUT/grid.csv)")
    parser.add_argument("--p", type=float, default=0.4, help="drop probability at every site (the paper's LSTM value)")
    parser.add_argument("--emb", type=int, default=128, help="embedding size (= the last LSTM layer's size: tied)")
    parser.add_argument("--hidden", type=int, default=128, help="the inner LSTM layers' size")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-epochs", type=int, default=30, help="the cap on epochs (every stage)")
    parser.add_argument("--patience", type=int, default=3, help="epochs without a better validation ppl")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--clip", type=float, default=0.25)
    parser.add_argument("--weight-decay", type=float, default=1.2e-6, help="AWD-LSTM's value")
    parser.add_argument("--train-tokens", type=int, default=40_000, help="first N training tokens (small: overfits)")
    parser.add_argument("--diagnostic-batches", type=int, default=2, help="training windows the Hessian is taken on")
    parser.add_argument("--lanczos-iterations", type=int, default=60)
    parser.add_argument("--lanczos-tolerance", type=float, default=1e-2, help="relative residual of the Ritz pair")
    parser.add_argument("--trace-samples", type=int, default=20, help="Hutchinson probes for the trace")
    parser.add_argument("--checkpoints", default=None, help="where per-epoch weights go (default: a temporary folder)")
    parser.add_argument("--workers", type=int, default=2, help="processes training (method, seed) pairs in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = parser.parse_args(argv)
    if args.quick:  # tiny defaults; options given on the command line still win
        parser.set_defaults(data=None, emb=16, hidden=16, layers=2, max_epochs=3, patience=1,
                            batch=4, bptt=10, seeds="0,1", grid_lrs="5,20", sweep_scales="2", diagnostic_batches=1,
                            lanczos_iterations=30, trace_samples=3)
        args = parser.parse_args(argv)
        args.data = None
    args.run_names = args.runs.split(",")
    args.seed_list = seed_list(args.seeds, parser)
    if args.grid_seed in args.seed_list:
        parser.error(f"--grid-seed: {args.grid_seed} is one of --seeds; the lr grid must not see a main seed")
    args.grid_lr_list = _floats(args.grid_lrs, "--grid-lrs", parser)
    args.sweep_scale_list = _floats(args.sweep_scales, "--sweep-scales", parser)
    if set(args.sweep_runs.split(",")) - set(REGULARIZED):
        parser.error(f"--sweep-runs: expected some of {list(REGULARIZED)}, got {args.sweep_runs!r}")
    unknown = set(args.run_names) - set(RUNS)
    if unknown:
        parser.error(f"--runs: unknown {sorted(unknown)}; choose from {list(RUNS)}")
    for name in ("workers", "threads", "max_epochs", "patience", "diagnostic_batches", "lanczos_iterations", "emb",
                 "hidden", "layers", "batch", "bptt", "train_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected at least 1, got {getattr(args, name)}")
    if args.trace_samples < 2:
        parser.error(f"--trace-samples: expected at least 2 (for a standard error), got {args.trace_samples}")
    for name in ("clip", "lanczos_tolerance"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')}: expected a positive number, got {getattr(args, name)}")
    if args.weight_decay < 0:
        parser.error(f"--weight-decay: expected a non-negative number, got {args.weight_decay}")
    if not 0 < args.p < 1:
        parser.error(f"--p: expected a probability in (0, 1), got {args.p}")
    args.lr_override = None
    if args.lrs is not None:
        try:
            args.lr_override = {k: float(v) for k, v in (item.split("=") for item in args.lrs.split(","))}
        except ValueError:
            parser.error(f"--lrs: expected method=lr,..., got {args.lrs!r}")
        if set(args.lr_override) - set(RUNS):
            parser.error(f"--lrs: unknown methods {sorted(set(args.lr_override) - set(RUNS))}")
        if any(not lr > 0 for lr in args.lr_override.values()):
            parser.error(f"--lrs: expected positive learning rates, got {args.lrs!r}")
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
    """Embedding -> site -> LSTM -> site -> ... -> LSTM -> site -> tied head. An activation site is nn.Dropout(p)
    for the "dropout" method and dropreg.DropoutSite(p) (the identity, recorded for the regularizers) otherwise.
    Each LSTM's hidden-to-hidden weight is a weight-drop site: the "dropout" method runs it through one
    DropConnect mask per forward (AWD-LSTM's weight drop, shared by every row and time step); the regularized
    methods pass the weight itself as a site (step_loss)."""

    def __init__(self, vocab, emb, hidden, layers, p, dropout):
        super().__init__()
        self.p, self.weight_drop = p, dropout
        self.embed = nn.Embedding(vocab, emb)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)  # AWD-LSTM's initialization of the tied matrix
        sizes = [emb] + [hidden] * (layers - 1) + [emb]
        self.lstms = nn.ModuleList([nn.LSTM(sizes[i], sizes[i + 1], batch_first=True) for i in range(layers)])
        make_site = (lambda: nn.Dropout(p)) if dropout else (lambda: dropreg.DropoutSite(p))
        self.sites = nn.ModuleList([make_site() for _ in range(layers + 1)])
        self.head_bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, ids, state=None):
        x = self.sites[0](self.embed(ids))
        new_state = []
        for i, lstm in enumerate(self.lstms):
            layer_state = None if state is None else state[i]
            if self.weight_drop and self.training:
                dropped = F.dropout(lstm.weight_hh_l0, self.p)
                x, s = torch.func.functional_call(lstm, {"weight_hh_l0": dropped}, (x, layer_state))
            else:
                x, s = lstm(x, layer_state)
            x = self.sites[i + 1](x)
            new_state.append(tuple(t.detach() for t in s))
        return x, new_state


def step_loss(model, ids, target, state, run, args, seed, scale=1.0):
    """(loss to minimize, cross entropy, next state)."""
    hidden, state = model(ids, state)
    if model.training and run in REGULARIZED:
        # one call: the cross entropy and every site's terms (the head input a sampled site: p=0); the
        # weight-drop sites are the hidden-to-hidden weights themselves (docs/math.md 11: a site is any tensor h
        # depends on; a weight element feeds every row, as weight drop's one mask per forward does)
        sites, ps = dropreg.DropoutSite.collect(model)
        weights = [lstm.weight_hh_l0 for lstm in model.lstms]
        sites, ps = list(sites) + weights, list(ps) + [args.p] * len(weights)
        explicit_coef, implicit_coef = dropreg.default_coefficients(args.p)
        out = dropreg.linear_cross_entropy(hidden, model.embed.weight, target, linear_bias=model.head_bias, p=0.0,
                                           sites=sites, site_p=ps, site_explicit_coef=scale * explicit_coef,
                                           site_implicit_coef=scale * implicit_coef,
                                           implicit=run == "explicit+implicit", seed=seed)
        return out.loss, out.ce, state
    ce = dropreg.linear_cross_entropy(hidden, model.embed.weight, target, linear_bias=model.head_bias,
                                      explicit=False, implicit=False).ce
    return ce, ce, state


def windows(data, bptt, generator=None):
    """(ids, target) windows over the streams: fixed length ``bptt``, or AWD-LSTM's random lengths when a
    generator is given."""
    t = 0
    while t < data.shape[1] - 1:
        length = bptt
        if generator is not None:
            base = bptt if float(torch.rand((), generator=generator)) < 0.95 else bptt / 2
            length = min(max(5, int(base + 5 * float(torch.randn((), generator=generator)))), bptt + 40)
        target = data[:, t + 1:t + 1 + length]
        yield data[:, t:t + target.shape[1]], target
        t += length


def evaluate(model, data, args):
    model.eval()
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for ids, target in windows(data, args.bptt):
            _, ce, state = step_loss(model, ids, target, state, "none", args, 0)
            total += ce.item() * target.numel()
            count += target.numel()
    return total / count  # mean cross entropy (nats); perplexity is its exp


def log(message):
    print(message, file=sys.stderr, flush=True)


def checkpoint_path(args, job, epoch):
    return os.path.join(args.checkpoint_dir, f"{job['stage']}_{job['run']}_seed{job['seed']}_lr{job['lr']:g}_"
                                             f"scale{job['scale']:g}_epoch{epoch}.pt")


def train_one(job, data, vocab_size, args):
    """Train one (method, seed, lr, scale) until early stopping; returns (history, summary)."""
    torch.set_num_threads(args.threads)
    run, seed, lr, scale, max_epochs = job["run"], job["seed"], job["lr"], job["scale"], job["max_epochs"]
    torch.manual_seed(seed)  # same initialization for every method of this seed
    model = EverySiteLSTM(vocab_size, args.emb, args.hidden, args.layers, args.p, dropout=run == "dropout")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    train, valid, test = (batchify(d, args.batch) for d in data)
    history, best, since_best = [], None, 0
    start = time.perf_counter()
    step_seed = seed * 1_000_003
    for epoch in range(1, max_epochs + 1):
        model.train()
        lengths = torch.Generator().manual_seed(seed * 1009 + epoch)  # same windows for every method
        state, total, count = None, 0.0, 0
        for ids, target in windows(train, args.bptt, lengths):
            step_seed += 1
            for group in optimizer.param_groups:  # AWD-LSTM: a step's lr scales with its window's length
                group["lr"] = lr * target.shape[1] / args.bptt
            loss, ce, state = step_loss(model, ids, target, state, run, args, step_seed, scale)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            dropreg.DropoutSite.collect(model)  # forget what the sites recorded (runs without regularizers)
            total += ce.item() * target.numel()
            count += target.numel()
        valid_loss = evaluate(model, valid, args)
        row = dict(stage=job["stage"], run=run, seed=seed, lr=lr, scale=scale, epoch=epoch,
                   train_ppl_with_noise=math.exp(total / count), clean_train_loss=evaluate(model, train, args),
                   valid_ppl=math.exp(valid_loss), seconds=time.perf_counter() - start)
        history.append(row)
        if job["keep_checkpoints"]:
            torch.save(model.state_dict(), checkpoint_path(args, job, epoch))
        if best is None or valid_loss < best["valid_loss"]:
            best, since_best = dict(valid_loss=valid_loss, epoch=epoch,
                                    test_ppl=math.exp(evaluate(model, test, args))), 0
        else:
            since_best += 1
        log(f"{job['stage']:5s} {run:18s} seed {seed} lr {lr:g} scale {scale:g} epoch {epoch:2d}: train ppl (with "
            f"noise) {row['train_ppl_with_noise']:8.2f}  valid ppl {row['valid_ppl']:8.2f}  "
            f"({row['seconds']:6.1f} s)")
        if since_best >= args.patience:
            break
    final_valid = history[-1]["valid_ppl"]
    summary = dict(stage=job["stage"], run=run, seed=seed, lr=lr, scale=scale,
                   best_valid_ppl=math.exp(best["valid_loss"]), test_ppl_at_best=best["test_ppl"],
                   best_epoch=best["epoch"], epochs_run=len(history),
                   stopped="patience" if since_best >= args.patience else "cap",
                   converged=best["epoch"] < len(history), final_valid_ppl=final_valid,
                   final_test_ppl=math.exp(evaluate(model, test, args)),
                   clean_train_loss_at_best=history[best["epoch"] - 1]["clean_train_loss"],
                   seconds=time.perf_counter() - start)
    return history, summary


def measure_curvature(job, data, vocab_size, args):
    """The diagnostics of one saved checkpoint: top algebraic Hessian eigenvalue and trace of the plain
    training loss (dropout off, the first training windows, exact autograd products)."""
    torch.set_num_threads(args.threads)
    model = EverySiteLSTM(vocab_size, args.emb, args.hidden, args.layers, args.p, dropout=False)
    model.load_state_dict(torch.load(checkpoint_path(args, job, job["epoch"])))
    model.eval()
    train = batchify(data[0], args.batch)
    batches = list(windows(train, args.bptt))[: args.diagnostic_batches]
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_fn():  # plain autograd (double backward through nn.LSTM and F.cross_entropy)
        total = 0.0
        for ids, target in batches:
            hidden, _ = model(ids)
            logits = hidden @ model.embed.weight.T + model.head_bias
            total = total + F.cross_entropy(logits.reshape(-1, vocab_size), target.reshape(-1))
        return total / len(batches)

    generator = torch.Generator().manual_seed(job["seed"])
    top = diagnostics.top_hessian_eigenvalue(loss_fn, params, iterations=args.lanczos_iterations,
                                                tolerance=args.lanczos_tolerance, generator=generator)
    trace = diagnostics.hessian_trace(loss_fn, params, samples=args.trace_samples, generator=generator)
    return dict(run=job["run"], seed=job["seed"], checkpoint=job["checkpoint"], epoch=job["epoch"],
                clean_train_loss=job["clean_train_loss"], top_eigenvalue=top.value,
                lanczos_residual=top.residual, lanczos_iterations=top.iterations, lanczos_converged=top.converged,
                trace=trace.value, trace_se=trace.standard_error)


# ---- statistics: Student's t, paired tests, Holm and Bonferroni ----

def t_tail(x, df):
    """P(T > x) for Student's t with ``df`` degrees of freedom and x >= 0, without cancellation:
    ``Gamma((df+1)/2) / (sqrt(pi) Gamma(df/2)) * integral_0^phi sin(u)^(df-1) du`` with
    ``phi = atan(sqrt(df) / x)`` (Simpson's rule on a smooth integrand; exact forms for df = 1 and 2)."""
    if x < 0:
        raise ValueError(f"x: expected a non-negative value, got {x}")
    phi = math.atan2(math.sqrt(df), x)
    steps = 2000
    grid = torch.linspace(0.0, phi, steps + 1, dtype=torch.float64)
    weights = torch.ones(steps + 1, dtype=torch.float64)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    integral = float((weights * torch.sin(grid) ** (df - 1)).sum()) * phi / (3 * steps)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(math.pi)
    return min(0.5, max(0.0, math.exp(log_norm) * integral))


def t_cdf(x, df):
    """Student's t CDF (from :func:`t_tail`, accurate in both tails)."""
    return 1.0 - t_tail(x, df) if x >= 0 else t_tail(-x, df)


def t_quantile(probability, df):
    """Quantile of Student's t for a probability in (0.5, 1): bisection on :func:`t_cdf`."""
    if not 0.5 < probability < 1:
        raise ValueError(f"probability: expected a value in (0.5, 1), got {probability}")
    low, high = 0.0, 1.0
    while t_cdf(high, df) < probability:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < probability else (low, middle)
    return (low + high) / 2


def paired_test(first, second):
    """Paired t test of first - second over seeds: (mean difference, standard error, t, df, two-sided p)."""
    diff = torch.tensor(first, dtype=torch.float64) - torch.tensor(second, dtype=torch.float64)
    n = diff.numel()
    mean, se = float(diff.mean()), float(diff.std()) / math.sqrt(n)
    if se == 0:
        return mean, 0.0, math.copysign(math.inf, mean) if mean else 0.0, n - 1, 0.0 if mean else 1.0
    t = mean / se
    return mean, se, t, n - 1, min(1.0, 2 * t_tail(abs(t), n - 1))


def holm(p_values):
    """Holm's step-down adjustment (family-wise error), in the input order."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def compare(values, comparisons, alpha=ALPHA):
    """values: {method: [one value per seed, seeds in the same order]}. Rows with the paired difference, its
    Bonferroni-adjusted (1 - alpha) interval, raw and Holm-adjusted p, and the generated verdict."""
    comparisons = [c for c in comparisons if c[0] in values and c[1] in values]
    tests = [paired_test(values[a], values[b]) for a, b in comparisons]
    adjusted = holm([t[4] for t in tests])
    rows = []
    for (a, b), (mean, se, t, df, p), p_holm in zip(comparisons, tests, adjusted):
        half = t_quantile(1 - alpha / (2 * len(comparisons)), df) * se
        verdict = (f"{a} lower than {b}" if mean < 0 else f"{a} higher than {b}") if p_holm < alpha else \
            "no difference shown"
        rows.append(dict(first=a, second=b, difference=mean, low=mean - half, high=mean + half, t=t, df=df,
                         p=p, p_holm=p_holm, verdict=verdict))
    return rows


# ---- stages ----

def run_jobs(worker, jobs, data, vocab_size, args):
    if args.workers == 1:
        return [worker(job, data, vocab_size, args) for job in jobs]
    # every job seeds itself, so the results do not depend on which worker runs it or when
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        futures = [pool.submit(worker, job, data, vocab_size, args) for job in jobs]
        return [future.result() for future in futures]


def costliest_first(jobs):  # so that the cheap ones fill the workers' tail
    return sorted(jobs, key=lambda job: -RUNS.index(job["run"]))


def write_csv(path, rows):
    if not rows:
        raise SystemExit(f"{path}: nothing to write (no run matched the options)")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def describe(args, vocab, data):
    source = "synthetic (--quick)" if args.quick else os.path.relpath(args.data)
    return (f"{source}: {data[0].numel()} train tokens, V={len(vocab)}, tied embedding {args.emb}, "
            f"{args.layers}x LSTM ({args.hidden} inner), p={args.p} at {args.layers + 1} activation sites and "
            f"{args.layers} weight-drop sites; SGD constant lr, "
            f"clip {args.clip}, weight decay {args.weight_decay:g}, batch {args.batch}, AWD-LSTM random bptt "
            f"around {args.bptt}; early stopping with patience {args.patience}")


def chosen_lrs(args):
    if args.lr_override is not None:
        return args.lr_override
    path = os.path.join(args.out, "grid.csv")
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: run --stage grid first, or give --lrs method=lr,...")
    best = {}
    for row in read_csv(path):
        if row["run"] not in best or float(row["best_valid_ppl"]) < float(best[row["run"]]["best_valid_ppl"]):
            best[row["run"]] = row
    return {run: float(row["lr"]) for run, row in best.items()}


def stage_grid(args, vocab, data):
    jobs = costliest_first([dict(stage="grid", run=run, seed=args.grid_seed, lr=lr, scale=1.0,
                                 max_epochs=args.max_epochs, keep_checkpoints=False)
                            for run in args.run_names for lr in args.grid_lr_list])
    start = time.perf_counter()
    results = run_jobs(train_one, jobs, data, len(vocab), args)
    summaries = [s for _, s in results]
    write_csv(os.path.join(args.out, "grid.csv"), summaries)
    write_csv(os.path.join(args.out, "grid_curves.csv"), [row for history, _ in results for row in history])
    lrs = chosen_lrs(args) if args.lr_override is None else args.lr_override
    lines = [f"# Learning-rate grid (seed {args.grid_seed}, at most {args.max_epochs} epochs)", "",
             describe(args, vocab, data) + f"; wall time {(time.perf_counter() - start) / 60:.1f} min", "",
             "| method | lr | best valid ppl | best epoch | epochs run | stopped | converged | chosen |",
             "|---|---:|---:|---:|---:|---|---|---|"]
    for s in sorted(summaries, key=lambda s: (RUNS.index(s["run"]), s["lr"])):
        lines.append(f"| {s['run']} | {s['lr']:g} | {s['best_valid_ppl']:.2f} | {s['best_epoch']} | "
                     f"{s['epochs_run']} | {s['stopped']} | {'yes' if s['converged'] else 'no'} | "
                     f"{'**yes**' if lrs.get(s['run']) == s['lr'] else ''} |")
    edges = [run for run, lr in lrs.items() if lr in (min(args.grid_lr_list), max(args.grid_lr_list))]
    if edges:
        lines += ["", f"At the grid's edge: {', '.join(edges)} (the best lr may lie outside the grid)."]
    write_text(os.path.join(args.out, "grid.md"), lines)
    print("\n".join(lines), flush=True)


def stage_sweep(args, vocab, data):
    lrs = chosen_lrs(args)
    runs = [run for run in args.sweep_runs.split(",") if run in args.run_names]
    jobs = costliest_first([dict(stage="sweep", run=run, seed=args.grid_seed, lr=lrs[run], scale=scale,
                                 max_epochs=args.max_epochs, keep_checkpoints=False)
                            for run in runs for scale in args.sweep_scale_list if scale != 1.0])
    start = time.perf_counter()
    results = run_jobs(train_one, jobs, data, len(vocab), args)
    summaries = [s for _, s in results]
    grid_path = os.path.join(args.out, "grid.csv")  # scale 1 at the chosen lr is the grid's run
    ones = [] if not os.path.exists(grid_path) else [
        r for r in read_csv(grid_path) if r["run"] in runs and float(r["lr"]) == lrs[r["run"]]]
    write_csv(os.path.join(args.out, "sweep.csv"), summaries)
    write_csv(os.path.join(args.out, "sweep_curves.csv"), [row for history, _ in results for row in history])
    lines = [f"# Coefficient sweep (seed {args.grid_seed}, each method at its chosen lr, at most "
             f"{args.max_epochs} epochs)", "",
             f"Both coefficients multiplied by the scale (1: the derived kappa/2 and sqrt(kappa), from the grid). "
             f"{describe(args, vocab, data)}; wall time {(time.perf_counter() - start) / 60:.1f} min", "",
             "| method | scale | lr | best valid ppl | best epoch | epochs run | stopped |", "|---|---:|---:|---:|---:|---:|---|"]
    rows = [dict(run=r["run"], scale=1.0, lr=float(r["lr"]), best_valid_ppl=float(r["best_valid_ppl"]),
                 best_epoch=int(r["best_epoch"]), epochs_run=int(r["epochs_run"]), stopped=r["stopped"]) for r in ones]
    rows += summaries
    for s in sorted(rows, key=lambda s: (RUNS.index(s["run"]), s["scale"])):
        lines.append(f"| {s['run']} | {s['scale']:g} | {s['lr']:g} | {s['best_valid_ppl']:.2f} | {s['best_epoch']} | "
                     f"{s['epochs_run']} | {s['stopped']} |")
    lines += ["", "The five-seed runs use the derived coefficients (scale 1), fixed before this sweep."]
    write_text(os.path.join(args.out, "sweep.md"), lines)
    print("\n".join(lines), flush=True)


def matched_checkpoints(histories, summaries):
    """Per seed: the highest clean training loss among the methods' best checkpoints is the target; each run's
    epoch whose clean training loss is nearest it."""
    jobs = []
    for seed in sorted({s["seed"] for s in summaries}):
        rows = [s for s in summaries if s["seed"] == seed]
        target = max(s["clean_train_loss_at_best"] for s in rows)
        for s in rows:
            history = next(h for h in histories if h[0]["run"] == s["run"] and h[0]["seed"] == seed)
            nearest = min(history, key=lambda h: abs(h["clean_train_loss"] - target))
            jobs.append(dict(run=s["run"], seed=seed, checkpoint="matched", epoch=nearest["epoch"],
                             clean_train_loss=nearest["clean_train_loss"], target_loss=target))
    return jobs


def stage_main(args, vocab, data):
    lrs = chosen_lrs(args)
    missing = [run for run in args.run_names if run not in lrs]
    if missing:
        raise SystemExit(f"no learning rate for {missing}: run the grid for them, or give --lrs")
    jobs = costliest_first([dict(stage="main", run=run, seed=seed, lr=lrs[run], scale=1.0,
                                 max_epochs=args.max_epochs, keep_checkpoints=True)
                            for run in args.run_names for seed in args.seed_list])
    start = time.perf_counter()
    results = run_jobs(train_one, jobs, data, len(vocab), args)
    train_minutes = (time.perf_counter() - start) / 60
    histories, summaries = [h for h, _ in results], [s for _, s in results]
    curvature_jobs = [dict(run=s["run"], seed=s["seed"], checkpoint="best", epoch=s["best_epoch"],
                           clean_train_loss=s["clean_train_loss_at_best"], stage="main", lr=s["lr"], scale=1.0)
                      for s in summaries]
    for job in matched_checkpoints(histories, summaries):
        job.update(stage="main", lr=lrs[job["run"]], scale=1.0)
        curvature_jobs.append(job)
    curvature_jobs = costliest_first(curvature_jobs)
    curvature = run_jobs(measure_curvature, curvature_jobs, data, len(vocab), args)
    for row, job in zip(curvature, curvature_jobs):
        row["target_loss"] = job.get("target_loss", "")
    minutes = (time.perf_counter() - start) / 60
    write_csv(os.path.join(args.out, "results.csv"), summaries)
    write_csv(os.path.join(args.out, "curves.csv"), [row for history in histories for row in history])
    write_csv(os.path.join(args.out, "diagnostics.csv"), curvature)
    header = (f"{describe(args, vocab, data)}; seeds {args.seeds}, at most {args.max_epochs} epochs; "
              f"{args.workers} worker(s) x {args.threads} thread(s); wall time {minutes:.1f} min "
              f"({train_minutes:.1f} training)")
    lines = summarize(read_csv(os.path.join(args.out, "results.csv")),
                      read_csv(os.path.join(args.out, "diagnostics.csv")), header)
    write_text(os.path.join(args.out, "results.md"), lines)
    plot_curves(args, histories, header)
    print("\n".join(lines), flush=True)


def write_text(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _mean_sd(values):
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def _per_seed(rows, key):
    """{method: [value per seed, in seed order]} over the seeds every method has."""
    methods = [run for run in RUNS if any(r["run"] == run for r in rows)]
    if not methods:
        return {}, []
    seeds = sorted(set.intersection(*[{int(r["seed"]) for r in rows if r["run"] == m} for m in methods]))
    return {m: [float(next(r[key] for r in rows if r["run"] == m and int(r["seed"]) == s)) for s in seeds]
            for m in methods}, seeds


def comparison_lines(values, unit, what):
    if not values or len(next(iter(values.values()))) < 2:
        return [], [f"({what}: fewer than two seeds with a value for every method, no test)"]
    rows = compare(values, COMPARISONS)
    m = len(rows)
    lines = [f"| comparison ({what}) | mean paired difference | {100 * (1 - ALPHA):.0f}% interval, Bonferroni "
             f"({m} comparisons) | p | Holm-adjusted p | verdict |", "|---|---:|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['first']} − {r['second']} | {r['difference']:+.3g}{unit} | [{r['low']:+.3g}, "
                     f"{r['high']:+.3g}] | {r['p']:.3g} | {r['p_holm']:.3g} | {r['verdict']} |")
    return rows, lines


def summarize(results, curvature, header):
    """results.md's lines, from the rows of results.csv and diagnostics.csv (so the test can regenerate it)."""
    lines = ["# Reproduction v3: results", "", header, "",
             "| method | lr | seeds | test ppl at best valid (mean ± sd) | best valid ppl | best epoch (min–max) "
             "| converged | final valid ppl | final test ppl |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for run in RUNS:
        rows = [r for r in results if r["run"] == run]
        if not rows:
            continue
        test, valid = _mean_sd([r["test_ppl_at_best"] for r in rows]), _mean_sd([r["best_valid_ppl"] for r in rows])
        final_valid, final_test = _mean_sd([r["final_valid_ppl"] for r in rows]), _mean_sd([r["final_test_ppl"] for r in rows])
        epochs = [int(r["best_epoch"]) for r in rows]
        converged = sum(r["converged"] == "True" for r in rows)
        lines.append(f"| {run} | {float(rows[0]['lr']):g} | {len(rows)} | {test[0]:.2f} ± {test[1]:.2f} | "
                     f"{valid[0]:.2f} ± {valid[1]:.2f} | {sum(epochs) / len(epochs):.1f} ({min(epochs)}–{max(epochs)}) | "
                     f"{converged} of {len(rows)} | {final_valid[0]:.2f} | {final_test[0]:.2f} |")
    values, seeds = _per_seed(results, "test_ppl_at_best")
    rows, table = comparison_lines(values, "", "test ppl at the best-validation checkpoint")
    lines += ["", f"Pre-registered comparisons, paired over seeds {seeds} (negative: the first method is better; "
                  f"Holm-adjusted p decides, the Bonferroni interval is the more conservative of the two):",
              ""] + table + ["", "Verdicts (Holm-adjusted p < 0.05 decides; generated from the table above):", ""]
    for r in rows:
        lines.append(f"- {r['first']} − {r['second']}: {r['difference']:+.2f} ppl, interval [{r['low']:+.2f}, "
                     f"{r['high']:+.2f}], adjusted p = {r['p_holm']:.3g}: **{r['verdict']}**.")
    for checkpoint, title in (("best", "at the best-validation checkpoint"),
                              ("matched", "at a matched clean training loss")):
        rows_at = [r for r in curvature if r["checkpoint"] == checkpoint]
        if not rows_at:
            continue
        lines += ["", f"Curvature of the plain training loss {title} (mean ± sd over seeds; Lanczos converged "
                      f"in how many runs; the largest distance of a run's clean training loss from its seed's "
                      f"target):" if checkpoint == "matched" else f"Curvature of the plain training loss {title} "
                      f"(mean ± sd over seeds; Lanczos converged in how many runs):", "",
                  "| method | clean training loss | largest \\|loss − target\\| | top Hessian eigenvalue | "
                  "converged | Hessian trace |", "|---|---:|---:|---:|---:|---:|"]
        for run in RUNS:
            sel = [r for r in rows_at if r["run"] == run]
            if not sel:
                continue
            loss, top, trace = (_mean_sd([r[k] for r in sel]) for k in ("clean_train_loss", "top_eigenvalue", "trace"))
            converged = sum(r["lanczos_converged"] == "True" for r in sel)
            gap = max(abs(float(r["clean_train_loss"]) - float(r["target_loss"])) for r in sel) \
                if checkpoint == "matched" else None
            lines.append(f"| {run} | {loss[0]:.3f} ± {loss[1]:.3f} | {'–' if gap is None else f'{gap:.3f}'} | "
                         f"{top[0]:.4g} ± {top[1]:.2g} | {converged} of {len(sel)} | {trace[0]:.4g} ± {trace[1]:.2g} |")
        # an unconverged Lanczos value does not enter the eigenvalue tests (its seed drops out of them)
        converged_rows = [r for r in rows_at if r["lanczos_converged"] == "True"]
        for key, name, rows_for in (("top_eigenvalue", "top eigenvalue", converged_rows), ("trace", "trace", rows_at)):
            values, _ = _per_seed(rows_for, key)
            _, table = comparison_lines(values, "", f"{name}, {checkpoint}")
            lines += [""] + table
    return lines


def plot_curves(args, histories, header):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = {}
    for history in histories:
        run = history[0]["run"]
        line, = ax.plot([h["epoch"] for h in history], [h["valid_ppl"] for h in history], marker=".",
                        color=colors.get(run), alpha=0.7, label=None if run in colors else run)
        colors[run] = line.get_color()
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation perplexity (one line per seed)")
    ax.set_title("\n".join(textwrap.wrap(header, 120)), fontsize=6)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "learning_curves.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    vocab, *data = load_corpus(args)
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dropreg_checkpoints_") as scratch:
        args.checkpoint_dir = args.checkpoints or scratch
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        print(describe(args, vocab, data), flush=True)
        for stage, function in (("grid", stage_grid), ("sweep", stage_sweep), ("main", stage_main)):
            if args.stage in (stage, "all"):
                function(args, vocab, data)


if __name__ == "__main__":
    main()
