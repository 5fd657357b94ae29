"""Build a word-level language-modelling corpus from Debian's `fortunes` package (PTB/WikiText layout).

    apt-get install -y fortunes
    python examples/prepare_fortunes.py --out data/fortunes

Why this corpus: it is real English prose (quotations, jokes, short stories, definitions, poems) that
installs from a package registry this machine reaches, ~450k words, about the size of a small PTB
subset, and varied enough that a small LSTM overfits it within minutes, which the experiment needs. The
WordNet glosses (`wordnet-base`) were the other candidate; their definitional style is far more
repetitive than text a language model is usually trained on.

Each fortune (the text between '%' lines) becomes one line: lower-cased words and punctuation tokens.
Fortunes are shuffled with a fixed seed and split 80/10/10 into train/valid/test; the vocabulary is the
--vocab most frequent training tokens, the rest become <unk>. Writes train.txt, valid.txt, test.txt and
vocab.txt (one token per line, most frequent first).
"""
import argparse
import collections
import os
import random
import re

TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[.,!?;:\"()-]")
SKIP = {"ascii-art"}  # pictures, not text


def read_fortunes(folder):
    fortunes = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name in SKIP or "." in name or os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            fortunes += [chunk for chunk in re.split(r"^%$", f.read(), flags=re.M) if chunk.strip()]
    return fortunes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="/usr/share/games/fortunes")
    parser.add_argument("--out", default="data/fortunes")
    parser.add_argument("--vocab", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not os.path.isdir(args.source):
        raise SystemExit(f"--source {args.source} not found: run `apt-get install -y fortunes` first")
    lines = [" ".join(TOKEN.findall(text.lower())) for text in read_fortunes(args.source)]
    lines = [line for line in lines if line]
    random.Random(args.seed).shuffle(lines)
    n_valid = n_test = len(lines) // 10
    splits = {"valid": lines[:n_valid], "test": lines[n_valid:n_valid + n_test], "train": lines[n_valid + n_test:]}
    counts = collections.Counter(tok for line in splits["train"] for tok in line.split())
    vocab = [tok for tok, _ in counts.most_common(args.vocab - 2)] + ["<unk>", "<eos>"]
    known = set(vocab)
    os.makedirs(args.out, exist_ok=True)
    for split, split_lines in splits.items():
        with open(os.path.join(args.out, f"{split}.txt"), "w") as f:
            for line in split_lines:
                f.write(" ".join(tok if tok in known else "<unk>" for tok in line.split()) + "\n")
    with open(os.path.join(args.out, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    sizes = {k: sum(len(line.split()) + 1 for line in v) for k, v in splits.items()}
    print(f"{len(lines)} fortunes; tokens (with <eos>): {sizes}; vocabulary {len(vocab)} -> {args.out}")


if __name__ == "__main__":
    main()
