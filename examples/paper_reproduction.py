"""Small-scale check of the paper's claim: explicit + implicit regularizers can stand in for dropout.

    python examples/prepare_fortunes.py --out data/fortunes
    python examples/paper_reproduction.py --data data/fortunes --out examples/results

A word-level LSTM language model is trained five times with the same model, optimizer, schedule, data
order and seed; only the regularization of the output layer differs (Wei, Kakade & Ma, 2020):

1. none: plain cross entropy;
2. dropout: dropout with probability p on the LSTM output, the input of the output layer;
3. explicit: cross entropy + the explicit regularizer on the un-dropped output (dropreg);
4. implicit: cross entropy + the random-sign implicit term (dropreg);
5. explicit+implicit: both (dropreg).

Runs 3-5 call ``dropreg.linear_cross_entropy`` with the same p (default coefficients kappa/2 and
sqrt(kappa)); runs 1-2 call it with both terms off, so every run goes through the same fused
cross-entropy kernel. ``--data`` takes a folder with train.txt, valid.txt and test.txt (PTB / WikiText-2
layout, one sentence per line); ``--synthetic`` makes a tiny random corpus for smoke tests.
Writes results.csv, results.md and learning_curves.png to --out.
"""
from __future__ import annotations

import argparse
import collections
import csv
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import dropreg

RUNS = {
    "none": dict(dropout=False, explicit=False, implicit=False),
    "dropout": dict(dropout=True, explicit=False, implicit=False),
    "explicit": dict(dropout=False, explicit=True, implicit=False),
    "implicit": dict(dropout=False, explicit=False, implicit=True),
    "explicit+implicit": dict(dropout=False, explicit=True, implicit=True),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="folder with train.txt, valid.txt, test.txt")
    source.add_argument("--synthetic", action="store_true", help="tiny random corpus (smoke test)")
    parser.add_argument("--out", default="examples/results")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {list(RUNS)}")
    parser.add_argument("--p", type=float, default=0.4, help="drop probability (the paper's LSTM value)")
    parser.add_argument("--explicit-coef", type=float, default=None, help="default p / (2 (1 - p))")
    parser.add_argument("--implicit-coef", type=float, default=None, help="default sqrt(p / (1 - p))")
    parser.add_argument("--emb", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train-tokens", type=int, default=60_000,
                        help="use the first N training tokens: small enough to overfit, and quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def load_corpus(args):
    if args.synthetic:
        gen = torch.Generator().manual_seed(args.seed)
        vocab = [f"w{i}" for i in range(60)] + ["<eos>"]
        make = lambda n: torch.randint(0, len(vocab), (n,), generator=gen)  # noqa: E731
        return vocab, make(4000), make(800), make(800)
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


class LSTMLanguageModel(nn.Module):
    def __init__(self, vocab, emb, hidden, layers):
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids, state=None):
        out, state = self.lstm(self.embed(ids), state)
        return out, state  # out: the input of the output layer


def loss_terms(model, hidden, target, run, args):
    if run["dropout"] and model.training:
        hidden = F.dropout(hidden, p=args.p, training=True)
    regularize = model.training and (run["explicit"] or run["implicit"])
    return dropreg.linear_cross_entropy(
        hidden, model.head.weight, target, linear_bias=model.head.bias, p=args.p,
        explicit=regularize and run["explicit"], implicit=regularize and run["implicit"],
        explicit_coef=args.explicit_coef, implicit_coef=args.implicit_coef)


def detach(state):
    return tuple(s.detach() for s in state)


def evaluate(model, data, run, args):
    model.eval()
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for t in range(0, data.shape[1] - 1, args.bptt):
            ids, target = data[:, t:t + args.bptt], data[:, t + 1:t + 1 + args.bptt]
            ids = ids[:, : target.shape[1]]
            hidden, state = model(ids, state)
            total += loss_terms(model, hidden, target, run, args).ce.item() * target.numel()
            count += target.numel()
    return math.exp(total / count)


def train_run(name, data, vocab_size, args, log):
    run = RUNS[name]
    torch.manual_seed(args.seed)  # same initialization, dropout masks and sign seeds for every run
    model = LSTMLanguageModel(vocab_size, args.emb, args.hidden, args.layers)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    train, valid, test = (batchify(d, args.batch) for d in data)
    steps = math.ceil((train.shape[1] - 1) / args.bptt)
    history, best = [], dict(valid=math.inf)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        state, total, count = None, 0.0, 0
        for step, t in enumerate(range(0, train.shape[1] - 1, args.bptt), 1):
            ids, target = train[:, t:t + args.bptt], train[:, t + 1:t + 1 + args.bptt]
            ids = ids[:, : target.shape[1]]
            hidden, state = model(ids, state)
            state = detach(state)
            out = loss_terms(model, hidden, target, run, args)
            optimizer.zero_grad()
            out.loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            total += out.ce.item() * target.numel()
            count += target.numel()
            if sys.stderr.isatty():
                sys.stderr.write(f"\r  {name} epoch {epoch}/{args.epochs} step {step}/{steps} "
                                 f"train ppl {math.exp(total / count):8.2f}")
        train_ppl, valid_ppl = math.exp(total / count), evaluate(model, valid, run, args)
        history.append(dict(run=name, epoch=epoch, train_ppl=train_ppl, valid_ppl=valid_ppl,
                            seconds=time.perf_counter() - start))
        if valid_ppl < best["valid"]:
            best = dict(valid=valid_ppl, epoch=epoch, test=evaluate(model, test, run, args))
        log(f"{name:18s} epoch {epoch:2d}/{args.epochs}: train ppl {train_ppl:8.2f}  valid ppl {valid_ppl:8.2f}  "
            f"({time.perf_counter() - start:6.1f} s)")
    return history, dict(run=name, best_valid_ppl=best["valid"], best_epoch=best["epoch"],
                         test_ppl_at_best=best["test"], final_train_ppl=history[-1]["train_ppl"],
                         final_valid_ppl=history[-1]["valid_ppl"], seconds=time.perf_counter() - start)


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
    lines = [header, "", "| run | best valid ppl | epoch | test ppl at best | final train ppl | final valid ppl | "
             "wall s |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {s['run']} | {s['best_valid_ppl']:.2f} | {s['best_epoch']} | {s['test_ppl_at_best']:.2f} | "
              f"{s['final_train_ppl']:.2f} | {s['final_valid_ppl']:.2f} | {s['seconds']:.0f} |" for s in summaries]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for history in histories:
        epochs = [h["epoch"] for h in history]
        line, = ax.plot(epochs, [h["valid_ppl"] for h in history], marker="o", label=f"{history[0]['run']} (valid)")
        ax.plot(epochs, [h["train_ppl"] for h in history], "--", color=line.get_color(), alpha=0.6)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity (solid: valid, dashed: train)")
    ax.set_title(header, fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "learning_curves.png"), dpi=110)
    plt.close(fig)
    return lines


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.synthetic:
        args.emb, args.hidden, args.layers, args.epochs, args.batch, args.bptt = 16, 16, 1, 2, 4, 10
    unknown = set(args.runs.split(",")) - set(RUNS)
    if unknown:
        raise SystemExit(f"--runs: unknown {sorted(unknown)}; choose from {list(RUNS)}")
    vocab, *data = load_corpus(args)
    header = (f"{'synthetic' if args.synthetic else args.data}: {data[0].numel()} train tokens, V={len(vocab)}, "
              f"{args.layers}x LSTM {args.hidden}, emb {args.emb}, p={args.p}, Adam lr {args.lr}, batch {args.batch}"
              f"x{args.bptt}, {args.epochs} epochs, seed {args.seed}, {torch.get_num_threads()} threads")
    print(header)
    histories, summaries = [], []
    for name in args.runs.split(","):
        history, summary = train_run(name, data, len(vocab), args, log=lambda s: print(s, flush=True))
        histories.append(history)
        summaries.append(summary)
    print("\n".join(write_results(args, histories, summaries, header)))


if __name__ == "__main__":
    main()
