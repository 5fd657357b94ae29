"""How the per-slice results of a head's passes become the head's results: the one place that knows whether the
head is held whole or sliced over the vocabulary (docs/math.md 6.2, 12).

* :data:`LOCAL`: the head is held whole, in one process: every "merge" and "sum" is the identity.
* :class:`SliceReducer`: this rank holds a contiguous slice of the head's rows (a :class:`Shard`); per-row states of
  the slices merge with one MAX and one SUM all-reduce, partial gradients of the shared input are SUM-reduced.

The fused ops (dropreg/ops.py) are written once against this interface; a single process is a head with one slice
and the identity reducer. Communication is ``O(N d)`` per step, never ``O(N V)``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .rows import logit_shift


class CommunicationLog:
    """Payload bytes this rank passed to collectives, by phase ("handshake", "forward", "backward")."""

    def __init__(self):
        self.bytes = {"handshake": 0, "forward": 0, "backward": 0}
        self.calls = {"handshake": 0, "forward": 0, "backward": 0}

    def add(self, phase: str, nbytes: int) -> None:
        self.bytes[phase] += nbytes
        self.calls[phase] += 1


_active_logs: list[CommunicationLog] = []


@contextlib.contextmanager
def count_communication():
    """Inside the block, every collective dropreg issues adds its payload size to the yielded log."""
    log = CommunicationLog()
    _active_logs.append(log)
    try:
        yield log
    finally:
        _active_logs.remove(log)


def log_payload(phase: str, tensor: Tensor) -> None:
    for log in _active_logs:
        log.add(phase, tensor.numel() * tensor.element_size())


@dataclass(frozen=True)
class Shard:
    """This rank's place in the vocabulary: rows ``[offset, offset + size)`` of a head of ``vocab`` rows."""

    group: object
    rank: int
    sizes: tuple
    offset: int
    vocab: int

    @property
    def size(self) -> int:
        return self.sizes[self.rank]

    def all_reduce(self, tensor: Tensor, op, phase: str) -> Tensor:
        log_payload(phase, tensor)
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor


class _LocalReducer:
    """A head held whole: nothing to merge."""

    sliced = False
    group = None

    def localize(self, classes: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """``(index into this slice's rows, owned)``; ``owned`` None: every row's class lies here."""
        return classes, None

    def merge(self, lse: Tensor, expectations: list, picked: list) -> tuple[Tensor, list, list]:
        """Global per-row ``(lse, expectations, picked)`` from this slice's: here they are global already."""
        return lse, expectations, picked

    def merge_moments(self, stats, picked: list) -> tuple:
        """``(lse, mu, var, picked)`` of the head from this slice's :class:`dropreg.rows.SliceStatistics` (``mu``,
        ``var`` None where not computed)."""
        var = stats.var
        if var is None and stats.m2 is not None:
            var = stats.m2 - stats.mu * stats.mu
        return stats.lse, stats.mu, var, picked

    def sum_partial(self, partial: Tensor) -> Tensor:
        """A gradient of the shared input summed over the slices."""
        return partial

    def sum_parts(self, parts: list) -> list:
        """Differentiable sums over the slices of per-slice values (class sums, label smoothing's S)."""
        return parts

    def at_classes(self, per_class: list, classes: Tensor, dtype=None) -> list:
        """Each (V,) or (V, k) tensor's entries at ``classes`` (N,), differentiable."""
        return [values[classes] if dtype is None else values[classes].to(dtype) for values in per_class]

    def slice_input(self, h: Tensor) -> Tensor:
        """``h`` as it enters a part computed from this slice's classes (a sliced head sums the slices' gradients)."""
        return h

    def classes(self, weight: Tensor) -> int:
        """The number of classes of the whole head."""
        return weight.shape[0]

    def class_offset(self) -> int:
        return 0


LOCAL = _LocalReducer()


class SliceReducer(_LocalReducer):
    """A head sliced over the vocabulary across the ranks of ``shard.group``."""

    sliced = True

    def __init__(self, shard: Shard):
        self.shard = shard
        self.group = shard.group

    def localize(self, classes: Tensor) -> tuple[Tensor, Tensor]:
        local = classes - self.shard.offset
        owned = (local >= 0) & (local < self.shard.size)
        return torch.where(owned, local, torch.zeros_like(local)), owned

    def merge(self, lse: Tensor, expectations: list, picked: list) -> tuple[Tensor, list, list]:
        """Slices merge with weights ``exp(lse_r - max)`` (docs/math.md 12.1): one MAX, one packed SUM. ``picked``
        (per row, zero on the slices that do not own it) are summed in the same collective."""
        shard = self.shard
        global_max = shard.all_reduce(lse.clone(), dist.ReduceOp.MAX, "forward")
        shift = logit_shift(global_max)
        weight = torch.exp(lse - shift)  # 0 for a slice whose logits are all -inf (its expectations are NaN)
        weight_col = weight.unsqueeze(-1)
        parts = [weight_col] + [torch.where(weight_col > 0, weight_col * e, torch.zeros_like(e)) for e in expectations]
        parts += [p.unsqueeze(-1) for p in picked]
        packed = shard.all_reduce(torch.cat(parts, -1), dist.ReduceOp.SUM, "forward")
        total = packed[..., :1]
        merged_lse = shift + total[..., 0].log()
        out, start = [], 1
        for e in expectations:
            out.append(packed[..., start:start + e.shape[-1]] / total)
            start += e.shape[-1]
        return merged_lse, out, [packed[..., start + i] for i in range(len(picked))]

    def merge_moments(self, stats, picked: list) -> tuple:
        m2 = stats.m2 if stats.var is None else stats.var + stats.mu * stats.mu
        lse, moments, picked = self.merge(stats.lse, [m for m in (stats.mu, m2) if m is not None], picked)
        mu, m2 = (moments + [None, None])[:2]
        return lse, mu, (None if m2 is None else m2 - mu * mu), picked

    def sum_partial(self, partial: Tensor) -> Tensor:
        return self.shard.all_reduce(partial, dist.ReduceOp.SUM, "backward")

    def sum_parts(self, parts: list) -> list:
        if not parts:
            return []
        total = _SliceCollective.apply(torch.cat([p.reshape(-1) for p in parts]), self.shard, True)
        return [chunk.view(p.shape) for chunk, p in zip(total.split([p.numel() for p in parts]), parts)]

    def at_classes(self, per_class: list, classes: Tensor, dtype=None) -> list:
        """The owning slice contributes each row, one all-reduce completes them all (``dtype``: the packed dtype,
        default the tensors' own); the backward is local (each slice's owned rows take their part)."""
        safe, owned = self.localize(classes)
        parts = []
        for values in per_class:
            rows = values[safe].reshape(classes.shape[0], -1)
            rows = rows if dtype is None else rows.to(dtype)
            parts.append(torch.where(owned[:, None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device)))
        if not parts:
            return []
        widths = [p.shape[1] for p in parts]
        (packed,) = self.sum_parts([torch.cat(parts, 1)])
        return [chunk.reshape(classes.shape + values.shape[1:])
                for chunk, values in zip(packed.split(widths, 1), per_class)]

    def slice_input(self, h: Tensor) -> Tensor:
        return _SliceCollective.apply(h, self.shard, False)

    def classes(self, weight: Tensor) -> int:
        return self.shard.vocab

    def class_offset(self) -> int:
        return self.shard.offset


class _SliceCollective(torch.autograd.Function):
    """The conjugate pair of a sliced head's collectives. ``sum_in_forward``: a SUM all-reduce of per-slice parts
    into a value every rank holds, whose backward is the identity (every rank back-propagates the same upstream
    gradient, and each slice's part is all of its own contribution). Otherwise the identity on a value every rank
    holds alike (the input h) that feeds a per-slice part, whose backward sums the slices' gradients of it."""

    @staticmethod
    def forward(ctx, value, shard, sum_in_forward):
        ctx.shard, ctx.sum_in_forward = shard, sum_in_forward
        if sum_in_forward:
            return shard.all_reduce(value.contiguous().clone(), dist.ReduceOp.SUM, "forward")
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        if ctx.sum_in_forward:
            return grad, None, None
        return ctx.shard.all_reduce(grad.contiguous().clone(), dist.ReduceOp.SUM, "backward"), None, None
