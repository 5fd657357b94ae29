"""Precision of the explicit term with bf16 GEMM operands (docs/math.md 8.4), measured on the chunked driver itself.

For flat, confident and saturated rows (the top probability's median near 1/V, 0.99 and 1), bf16 inputs, truth in
float64 on the same bf16 values: the median relative error and the maximum error over the cancellation scale
``sum_j h_j^2 m2_j`` of the per-row quadratic form ``sum_j h_j^2 var_j``, for

* naive bf16 PyTorch (materialized logits, softmax and moments in bf16);
* the chunked driver with the probabilities rounded to bf16 (the exact dominant entry switched off);
* the chunked driver as shipped (each row's dominant entry made exact in fp32 after the last chunk).

The driver runs on CPU tensors, where its products see exactly the GPU's operand rounding (dropreg/gemm.py).

    python benchmarks/precision_confident_rows.py > docs/benchmarks/precision/confident_rows.md
"""
import argparse
import math

import torch

import dropreg
import dropreg.chunked as chunked


def problem(kind, n_rows, dim, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(vocab, dim, generator=gen) / math.sqrt(dim)).bfloat16()
    if kind == "flat":
        h = 0.3 * torch.randn(n_rows, dim, generator=gen)
    else:  # each row's own class dominates by a margin
        margin = {"confident": 14.0, "saturated": 40.0}[kind]
        own = torch.randint(0, vocab, (n_rows,), generator=gen)
        h = margin * w[own].float() / w[own].float().norm(dim=1, keepdim=True) ** 2
        h = h + 0.3 * torch.randn(n_rows, dim, generator=gen)
    return h.bfloat16(), w


def chunked_quadratic(h, w, keep_top, chunk):
    _, _, var = chunked.chunked_statistics(h, w, None, need_mu=True, need_m2=True, row_block=h.shape[0],
                                           vocab_chunk=chunk, epilogues=chunked.TorchEpilogues, keep_top=keep_top)
    return (h.float() ** 2 * var).sum(1).double()


def naive_quadratic(h, w):
    probs = torch.softmax(h @ w.T, dim=-1)
    mu = probs @ w
    return (h * h * (probs @ (w * w) - mu * mu)).sum(-1).double()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"N={args.rows}, d={args.dim}, V={args.vocab}, chunks of {args.chunk}, bf16 inputs, seed {args.seed}; "
          f"truth: float64 on the same bf16 values (`python benchmarks/precision_confident_rows.py`).\n")
    print("| rows | top probability (median) | statistic | naive bf16 | P in bf16 | dominant entry exact (shipped) |")
    print("|---|---:|---|---:|---:|---:|")
    for kind in ("flat", "confident", "saturated"):
        h, w = problem(kind, args.rows, args.dim, args.vocab, args.seed)
        hd, wd = h.double(), w.double()
        truth = dropreg.explicit_regularizer(hd, wd, reduction="none", backend="reference")
        probs = torch.softmax(hd @ wd.T, dim=1)
        scale = (hd * hd * (probs @ (wd * wd))).sum(1)
        top = probs.amax(dim=1).median().item()
        columns = [naive_quadratic(h, w), chunked_quadratic(h, w, False, args.chunk),
                   chunked_quadratic(h, w, True, args.chunk)]
        median = [((c - truth).abs() / truth.abs()).median().item() for c in columns]
        worst = [((c - truth).abs() / scale).max().item() for c in columns]
        print(f"| {kind} | {top:.4f} | median relative error | " + " | ".join(f"{e:.1e}" for e in median) + " |")
        print(f"| {kind} | | max error / scale | " + " | ".join(f"{e:.1e}" for e in worst) + " |")


if __name__ == "__main__":
    main()
