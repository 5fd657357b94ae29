"""The small loops and views every chunked PyTorch pass is built from: spans of rows or classes, a chunk of the
head's rows in the accumulation dtype, its logits, the online softmax over chunks (docs/math.md 6.1) and the
target correction of a logit gradient chunk."""
from __future__ import annotations

import torch

from .rows import logit_shift


def spans(total: int, step: int):
    for start in range(0, total, step):
        yield start, min(start + step, total)


def weight_chunk(weight, bias, v0, v1, acc, with_squares):
    w = weight[v0:v1].to(acc)
    stacked = torch.cat([w, w * w], dim=1) if with_squares else w
    b = None if bias is None else bias[v0:v1].to(acc)
    return w, stacked, b


def chunk_logits(h, w, b):
    return h @ w.T if b is None else torch.addmm(b, h, w.T)


class OnlineSoftmax:
    """Per-row running max and sum of exp over vocabulary chunks: docs/math.md's online merge."""

    def __init__(self, rows, dtype, device):
        self.max = torch.full((rows,), float("-inf"), dtype=dtype, device=device)
        self.sum = torch.zeros(rows, dtype=dtype, device=device)

    def absorb(self, logits):
        """Exponentiate ``logits`` in place, shifted by the new running max, and add them to the sum.

        Returns the per-row factor that rescales whatever was accumulated from earlier chunks."""
        new_max = torch.maximum(self.max, logits.amax(dim=1))
        shift = logit_shift(new_max)
        rescale = torch.exp(self.max - shift)
        logits.sub_(shift[:, None]).exp_()
        self.sum = self.sum * rescale + logits.sum(dim=1)
        self.max = new_max
        return rescale

    def lse(self):
        return logit_shift(self.max) + self.sum.log()


def subtract_at_target(g_logits, target, v0, v1, amount):
    """g_logits[i, target[i] - v0] -= amount[i] for the rows whose target lies in [v0, v1)."""
    in_chunk = (target >= v0) & (target < v1)
    g_logits.scatter_add_(1, (target - v0).clamp(0, v1 - v0 - 1)[:, None],
                          torch.where(in_chunk, -amount, torch.zeros_like(amount))[:, None])


def gradient_buffers(wants, n_rows: int, vocab: int, dim: int, dtype, device):
    """Zeroed ``(grad_h (N, d), grad_w (V, d), grad_b (V,))`` for a sweep to accumulate into, None where not wanted."""
    want_h, want_w, want_b = wants
    return (torch.zeros(n_rows, dim, dtype=dtype, device=device) if want_h else None,
            torch.zeros(vocab, dim, dtype=dtype, device=device) if want_w else None,
            torch.zeros(vocab, dtype=dtype, device=device) if want_b else None)
