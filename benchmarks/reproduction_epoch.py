"""Training-epoch time of the reproduction's model (examples/paper_reproduction.py) with the regularizers at every
site against its dropout run, alternating in one process.

    python benchmarks/reproduction_epoch.py --rounds 2 --out docs/benchmarks/reproduction_epoch

Each round trains one epoch of each run from the same initialization (the script's defaults: 2x LSTM 128, p=0.4 at
3 sites, batch 32x35, the first 60000 training tokens of data/fortunes, SGD); the ratio is the median of the
per-round ratios. Validation and diagnostics are not timed. Writes epochs.csv and results.md.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import statistics
import sys
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example():
    spec = importlib.util.spec_from_file_location("paper_reproduction",
                                                  os.path.join(ROOT, "examples", "paper_reproduction.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_epoch(example, run, args, data, vocab_size) -> float:
    import dropreg
    torch.manual_seed(0)
    model = example.EverySiteLSTM(vocab_size, args.emb, args.hidden, args.layers, args.p, dropout=run == "dropout")
    optimizer = torch.optim.SGD(model.parameters(), lr=20.0)  # the time of an epoch does not depend on it
    train = example.batchify(data, args.batch)
    model.train()
    state, step_seed = None, 0
    start = time.perf_counter()
    for ids, target in example.windows(train, args.bptt):
        step_seed += 1
        loss, _, state = example.step_loss(model, ids, target, state, run, args, step_seed)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        dropreg.DropoutSite.collect(model)
    return time.perf_counter() - start


def main(argv=None) -> int:
    example = load_example()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default="explicit+implicit,dropout", help="the regularized run, then the baseline")
    parser.add_argument("--out", default=None)
    args, rest = parser.parse_known_args(argv)
    settings = example.parse_args(["--seeds", "0,1"] + rest)  # the reproduction's own defaults and data
    torch.set_num_threads(args.threads)
    vocab, train, _, _ = example.load_corpus(settings)
    first, second = args.runs.split(",")
    rows = []
    for index in range(args.rounds):
        order = (first, second) if index % 2 == 0 else (second, first)
        seconds = {run: train_epoch(example, run, settings, train, len(vocab)) for run in order}
        rows.append(dict(round=index, **{f"{run}_s": s for run, s in seconds.items()},
                         ratio=seconds[first] / seconds[second]))
        print(f"round {index}: {first} {seconds[first]:.1f} s, {second} {seconds[second]:.1f} s, "
              f"ratio {rows[-1]['ratio']:.2f}", flush=True)
    ratio = statistics.median(r["ratio"] for r in rows)
    summary = (f"One training epoch of the reproduction's model ({train.numel()} tokens, V={len(vocab)}, "
               f"{settings.layers}x LSTM {settings.hidden}, p={settings.p} at {settings.layers + 1} sites, batch "
               f"{settings.batch}x{settings.bptt}, {args.threads} threads, torch {torch.__version__}): {first} "
               f"{statistics.median(r[f'{first}_s'] for r in rows):.1f} s, {second} "
               f"{statistics.median(r[f'{second}_s'] for r in rows):.1f} s, median per-round ratio {ratio:.2f} "
               f"({args.rounds} rounds, alternating); `python benchmarks/reproduction_epoch.py --rounds "
               f"{args.rounds}`")
    print(summary)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "epochs.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(summary + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
