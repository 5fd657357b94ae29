"""Does dropout condense hidden units' input weights? Zhang & Xu's setting: a two-layer network, small
initialization, long training, dropout against none, over seeds.

    python examples/condensation.py --out docs/paper_reproduction/v3/condensation
    python examples/condensation.py --quick --out /tmp/condensation                 # CI smoke run

A two-layer tanh network ``f(x) = sum_k a_k tanh(w_k . x + b_k)`` of ``--width`` units fits ``--points``
samples of a teacher with three units in ``--dim`` input dimensions by full-batch gradient descent on the mean
squared error (plain GD, as the gradient flow Zhang & Xu analyse: Adam's sign-like first steps would move every
small weight by about the lr and align all units at once, an optimizer artifact).
Each unit's input weight is ``(w_k, b_k)``, one block per unit, as Zhang & Xu define it. Every parameter starts
from ``N(0, width^(-2 gamma))`` (``gamma`` from ``--gammas``: 2 is small, the regime where condensation is
reported; 0.5 the usual scale). "dropout" multiplies the hidden activations by Bernoulli(1 - p) / (1 - p) at
every step; "none" trains the same initialization on the same data. Condensation: the share of unit pairs whose
input weights have ``|cos| > 0.9`` (``dropreg.diagnostics.condensation``), at initialization and after training,
over all units and over the units whose input weight grew to at least 10% of the largest one's norm; the paired
tests over seeds are dropout - none on both shares for each gamma, Holm-adjusted over all of them.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from paper_reproduction import ALPHA, holm, paired_test, seed_list, t_quantile, write_text  # noqa: E402

from dropreg import diagnostics  # noqa: E402

METHODS = ("none", "dropout")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/results/condensation")
    parser.add_argument("--quick", action="store_true", help="a few hundred steps, two seeds (CI smoke run)")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--gammas", default="2,0.5", help="initialization N(0, width^(-2 gamma)), one run per value")
    parser.add_argument("--width", type=int, default=200)
    parser.add_argument("--dim", type=int, default=5)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--steps", type=int, default=40_000)
    parser.add_argument("--lr", type=float, default=0.05, help="gradient descent's step")
    parser.add_argument("--p", type=float, default=0.2, help="drop probability of the hidden units")
    parser.add_argument("--threshold", type=float, default=0.9)
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(seeds="0,1", steps=300, width=20)
        args = parser.parse_args(argv)
    args.seed_list = seed_list(args.seeds, parser)
    try:
        args.gamma_list = [float(g) for g in args.gammas.split(",")]
    except ValueError:
        parser.error(f"--gammas: expected comma-separated numbers, got {args.gammas!r}")
    if not args.lr > 0:
        parser.error(f"--lr: expected a positive number, got {args.lr}")
    if not 0 < args.p < 1:
        parser.error(f"--p: expected a probability in (0, 1), got {args.p}")
    for name in ("width", "dim", "points", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected at least 1, got {getattr(args, name)}")
    return args


def teacher_data(args, seed):
    generator = torch.Generator().manual_seed(10_000 + seed)
    x = torch.randn(2 * args.points, args.dim, generator=generator)
    directions = torch.randn(3, args.dim + 1, generator=generator)
    y = torch.tanh(torch.cat([x, torch.ones(len(x), 1)], 1) @ directions.T).sum(1, keepdim=True)
    return x[: args.points], y[: args.points], x[args.points:], y[args.points:]


def input_weights(w, b):
    return torch.cat([w, b[:, None]], 1)  # (units, dim + 1): a unit's input weight includes its bias


def train(args, method, gamma, seed):
    x, y, x_test, y_test = teacher_data(args, seed)
    generator = torch.Generator().manual_seed(seed)
    std = args.width ** -gamma
    w, b, a = (torch.randn(*shape, generator=generator).mul_(std).requires_grad_()
               for shape in ((args.width, args.dim), (args.width,), (1, args.width)))
    at_init = diagnostics.condensation(input_weights(w, b), threshold=args.threshold).fraction_above
    optimizer = torch.optim.SGD([w, b, a], lr=args.lr)  # full batch: gradient descent
    masks = torch.Generator().manual_seed(20_000 + seed)
    for _ in range(args.steps):
        hidden = torch.tanh(x @ w.T + b)
        if method == "dropout":
            keep = torch.rand(hidden.shape, generator=masks) >= args.p
            hidden = hidden * keep / (1 - args.p)
        loss = (hidden @ a.T - y).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predict = lambda inputs: torch.tanh(inputs @ w.T + b) @ a.T  # noqa: E731
        train_mse, test_mse = float((predict(x) - y).pow(2).mean()), float((predict(x_test) - y_test).pow(2).mean())
    weights = input_weights(w, b).detach()
    final = diagnostics.condensation(weights, threshold=args.threshold)
    norms = weights.norm(dim=1)
    grown = norms >= 0.1 * norms.max()  # units that carry the function (small-init units that never grew do not)
    among_grown = diagnostics.condensation(weights[grown], threshold=args.threshold).fraction_above \
        if int(grown.sum()) >= 2 else math.nan
    return dict(method=method, gamma=gamma, seed=seed, condensed_at_init=at_init,
                condensed=final.fraction_above, median_abs_cos=float(final.abs_cosines.median()),
                grown_units=int(grown.sum()), condensed_grown=among_grown,
                train_mse=train_mse, test_mse=test_mse)


def summarize(rows, args, header):
    lines = ["# Condensation: dropout against none, two-layer tanh network", "", header, "",
             "| init gamma | method | seeds | share of pairs with \\|cos\\| > 0.9 at init | after training "
             "(mean ± sd) | median \\|cos\\| | units with norm >= 10% of the largest | their share of pairs "
             "> 0.9 | train MSE | test MSE |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for gamma in args.gamma_list:
        for method in METHODS:
            sel = [r for r in rows if float(r["gamma"]) == gamma and r["method"] == method]
            mean = lambda key: sum(float(r[key]) for r in sel) / len(sel)  # noqa: E731
            sd = math.sqrt(sum((float(r["condensed"]) - mean("condensed")) ** 2 for r in sel) / (len(sel) - 1))
            lines.append(f"| {gamma:g} | {method} | {len(sel)} | {mean('condensed_at_init'):.3f} | "
                         f"{mean('condensed'):.3f} ± {sd:.3f} | {mean('median_abs_cos'):.3f} | "
                         f"{mean('grown_units'):.1f} | {mean('condensed_grown'):.3f} | "
                         f"{mean('train_mse'):.2e} | {mean('test_mse'):.2e} |")
    tests = []  # fixed in advance: per gamma, the share over all units and over the grown units
    for gamma in args.gamma_list:
        for key, what in (("condensed", "all units"), ("condensed_grown", "grown units")):
            share = {(r["method"], int(r["seed"])): float(r[key]) for r in rows if float(r["gamma"]) == gamma}
            seeds = sorted(s for m, s in share if m == "dropout" and ("none", s) in share
                           and not math.isnan(share["dropout", s]) and not math.isnan(share["none", s]))
            tests.append((gamma, what, paired_test([share["dropout", s] for s in seeds],
                                                   [share["none", s] for s in seeds])))
    adjusted = holm([t[4] for _, _, t in tests])
    lines += ["", f"Dropout − none on the share of pairs with |cos| > {args.threshold}, paired over seeds; Holm-adjusted "
                  f"p over the {len(tests)} tests decides; {100 * (1 - ALPHA):.0f}% intervals Bonferroni-adjusted "
                  f"(the more conservative of the two):", "",
              "| init gamma | units | difference | interval | p | Holm-adjusted p | verdict |",
              "|---:|---|---:|---|---:|---:|---|"]
    for (gamma, what, (mean, se, t, df, p)), p_holm in zip(tests, adjusted):
        half = t_quantile(1 - ALPHA / (2 * len(tests)), df) * se
        verdict = ("dropout condenses more" if mean > 0 else "dropout condenses less") if p_holm < ALPHA else \
            "no difference shown"
        lines.append(f"| {gamma:g} | {what} | {mean:+.3f} | [{mean - half:+.3f}, {mean + half:+.3f}] | {p:.3g} | "
                     f"{p_holm:.3g} | {verdict} |")
    return lines


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for gamma in args.gamma_list:
        for seed in args.seed_list:
            for method in METHODS:  # same initialization, data and mask stream per seed
                rows.append(train(args, method, gamma, seed))
                print(f"gamma {gamma:g} seed {seed} {method:8s}: condensed {rows[-1]['condensed']:.3f} "
                      f"(init {rows[-1]['condensed_at_init']:.3f}), train MSE {rows[-1]['train_mse']:.2e}, "
                      f"test MSE {rows[-1]['test_mse']:.2e}", file=sys.stderr, flush=True)
    header = (f"two-layer tanh network, width {args.width}, input dim {args.dim} (+ bias), {args.points} training points of a three-unit "
              f"tanh teacher, gradient descent lr {args.lr:g}, {args.steps} full-batch steps, dropout p = {args.p} on the hidden "
              f"units, seeds {args.seeds}")
    path = os.path.join(args.out, "condensation.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(path) as f:
        lines = summarize(list(csv.DictReader(f)), args, header)
    write_text(os.path.join(args.out, "results.md"), lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
