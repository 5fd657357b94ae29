"""Vocabulary-parallel LM heads over ``torch.distributed`` (docs/math.md, section 12).

Each rank holds a contiguous slice of the head's rows (slices in rank order, sizes may differ); ``input`` and the
global ``target`` are the same on every rank. Every term is a merge of per-slice online states (6.2): each rank
streams its own slice with the chunked PyTorch code of :mod:`dropreg.streamed` (or, with ``backend="cpu"``, the C++
kernels), the per-row states are all-reduced (one MAX of the running maxima, one SUM of the rescaled sums), and
every rank finishes the identical result (dropreg/reducers.py; the ops are dropreg/ops.py's, as in one process). In
the backward each rank sweeps its slice again: its ``grad_W`` (and ``grad_b``) is its own, and the partial
``grad_input`` is all-reduced. Communication is ``O(N d)`` per step, never ``O(N V)``.

Every sharded call starts with a handshake (:func:`checked_call`): one small all-gather of each rank's sizes, dtype,
options and checksums, waited on with a timeout, so a bad call raises the same clear error on every rank instead of
hanging (a rank that never calls is reported by the others when the timeout expires).

The backward assumes every rank back-propagates the same upstream gradients (as when every rank forms the same loss
from the identical outputs) and calls backward in the same order: each backward all-reduces ``grad_input``.
"""
from __future__ import annotations

import contextlib
import datetime
import zlib
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import streamed
from .reducers import LOCAL, Shard, SliceReducer, count_communication, log_payload  # noqa: F401 (re-exported)

# How long the handshake waits for every rank by default. A rank that did not pass process_group (or never calls) is
# only noticed when this expires.
HANDSHAKE_TIMEOUT_S = 60.0
_handshake_timeout_s = HANDSHAKE_TIMEOUT_S


def set_handshake_timeout(seconds: float | None) -> float:
    """How long every sharded call's handshake waits for the other ranks (``None``: back to
    :data:`HANDSHAKE_TIMEOUT_S`); returns the previous value."""
    global _handshake_timeout_s
    previous = _handshake_timeout_s
    if seconds is None:
        seconds = HANDSHAKE_TIMEOUT_S
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"seconds: expected a positive number of seconds or None, got {seconds!r}")
    _handshake_timeout_s = float(seconds)
    return previous

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_OPS = ("linear_cross_entropy", "explicit_regularizer", "rdrop_linear_cross_entropy", "softmax_mean",
        "sample_targets", "site_regularizers")
_HEADER_FIELDS = ("op", "failed", "rows", "dim", "slice", "bias", "dtype", "requires_grad", "options",
                  "seed_lo", "seed_hi", "class_min", "class_max", "target_sum", "input_sum")


# ---------------------------------------------------------------------------------------------- the handshake


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_checksum(tensor: Tensor) -> int:
    """Sum of the elements' bit patterns as integers (wrapping): exact and independent of summation order and
    strides, so equal tensors give equal checksums on every rank and device."""
    if not tensor.numel():
        return 0
    bits = tensor.detach().contiguous().view(_SAME_SIZE_INT[tensor.element_size()])
    return int(bits.sum(dtype=torch.int64))


def _collective_device(group) -> torch.device:
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Call:
    """One sharded call's handshake; see :func:`checked_call`."""

    def __init__(self, group, op: str):
        self.group = group
        self.op = op
        self.sharded = group is not None
        self.shard: Optional[Shard] = None
        self.reducer = LOCAL  # a SliceReducer once the handshake has placed this rank's slice
        self.seed = 0
        self._header: Optional[list[int]] = None
        self._options = ""
        self._class_names = ""

    def describe(self, input: Tensor, weight: Tensor, bias: Optional[Tensor], *, options=(), seed: int = 0,
                 classes=(), target: Optional[Tensor] = None, given=()) -> None:
        """Record what the other ranks must agree with. ``classes``: ``(name, tensor, valid mask or None)`` triples
        whose valid entries must lie in the full vocabulary; ``target`` (if any) must be identical on every rank,
        and so must each tensor of ``given``: ``(name, tensor or None)`` pairs of explicitly passed tensors (signs,
        sampled targets, sites), compared by shape and bit checksum as part of the options."""
        if not self.sharded:
            return
        options = (*options, *(f"{name}: shape {tuple(t.shape)}, bits {_bit_checksum(t):#x}"
                               for name, t in given if t is not None))
        lows, highs = [], []
        for _, values, valid in classes:
            picked = values.reshape(-1) if valid is None else values.reshape(-1)[valid.reshape(-1)]
            if picked.numel():
                lows.append(int(picked.min()))
                highs.append(int(picked.max()))
        low, high = (min(lows), max(highs)) if lows else (0, -1)  # (0, -1): nothing to check
        self._class_names = " or ".join(name for name, _, _ in classes)
        target_sum = 0
        if target is not None and target.numel():
            flat = target.reshape(-1).long()
            target_sum = int((flat * torch.arange(1, flat.numel() + 1, device=flat.device)).sum())
        input_sum = _bit_checksum(input)
        self._options = repr(options)
        self._header = [_OPS.index(self.op), 0, input.reshape(-1, input.shape[-1]).shape[0], input.shape[-1],
                        weight.shape[0], int(bias is not None), _DTYPES.index(input.dtype),
                        int(input.requires_grad), zlib.crc32(self._options.encode()), seed & 0xFFFFFFFF,
                        seed >> 32, low, high, target_sum, input_sum]

    def exchange(self, failure: Optional[BaseException]) -> None:
        header = list(self._header) if self._header is not None and failure is None else \
            [_OPS.index(self.op), 1] + [0] * (len(_HEADER_FIELDS) - 2)
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        mine = torch.tensor(header, dtype=torch.int64, device=_collective_device(self.group))
        gathered = [torch.empty_like(mine) for _ in range(world)]
        log_payload("handshake", mine)
        work = dist.all_gather(gathered, mine, group=self.group, async_op=True)
        try:
            work.wait(timeout=datetime.timedelta(seconds=_handshake_timeout_s))
        except RuntimeError as error:
            raise RuntimeError(
                f"dropreg.{self.op}(process_group=...): rank {rank} got no answer from every rank of the group "
                f"within {_handshake_timeout_s:g} s. Every rank must make the same dropreg call with process_group "
                f"(did a rank pass process_group=None, or call a different function?). Cause: {error}") from None
        table = [dict(zip(_HEADER_FIELDS, row.tolist())) for row in gathered]
        failed = [r for r, row in enumerate(table) if row["failed"]]
        if failed:
            messages = [None] * world
            dist.all_gather_object(messages, None if failure is None else f"{type(failure).__name__}: {failure}",
                                   group=self.group)
            if failure is not None:
                return  # this rank raises its own error
            raise ValueError(f"dropreg.{self.op}(process_group=...): rank {failed[0]} refused its arguments: "
                             f"{messages[failed[0]]}")
        self._check_agreement(table)
        sizes = tuple(row["slice"] for row in table)
        self.shard = Shard(self.group, rank, sizes, sum(sizes[:rank]), sum(sizes))
        self.reducer = SliceReducer(self.shard)
        self.seed = table[0]["seed_lo"] | (table[0]["seed_hi"] << 32)  # seed=None: rank 0's draw

    def _check_agreement(self, table: list[dict]) -> None:
        prefix = f"dropreg.{self.op}(process_group=...)"
        described = {"op": "the function called", "rows": "the number of rows of input",
                     "dim": "d (input's last dimension and linear_weight's columns)",
                     "bias": "whether linear_bias is given", "dtype": "dtype",
                     "requires_grad": "whether input requires grad", "target_sum": "target",
                     "input_sum": "input's values"}
        for field, meaning in described.items():
            values = [row[field] for row in table]
            if len(set(values)) > 1:
                if field == "op":
                    values = [_OPS[v] for v in values]
                elif field == "dtype":
                    values = [str(_DTYPES[v]) for v in values]
                elif field in ("target_sum", "input_sum"):
                    values = ["differs" if v != values[0] else "as rank 0" for v in values]
                listed = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
                raise ValueError(f"{prefix}: every rank must pass the same {meaning}; got {listed}")
        if len({row["options"] for row in table}) > 1:
            options = [None] * len(table)
            dist.all_gather_object(options, self._options, group=self.group)
            listed = "; ".join(f"rank {r}: {o}" for r, o in enumerate(options))
            raise ValueError(f"{prefix}: every rank must pass the same options; got {listed}")
        sizes = [row["slice"] for row in table]
        vocab = sum(sizes)
        checked = [row for row in table if row["class_max"] >= row["class_min"]]
        if checked:
            low = min(row["class_min"] for row in checked)
            high = max(row["class_max"] for row in checked)
            if low < 0 or high >= vocab:
                raise ValueError(f"{prefix}: {self._class_names}: expected global class indices in [0, {vocab}), "
                                 f"the vocabulary formed by the ranks' linear_weight slices (sizes {sizes}), "
                                 f"got {low if low < 0 else high}")


@contextlib.contextmanager
def checked_call(group, op: str):
    """Validate one public call on every rank alike. Inside the block, run the usual local checks and
    :meth:`_Call.describe`; on leaving it the ranks exchange a header, and a local error on any rank, or a
    disagreement between ranks, raises on every rank. Without a group this does nothing."""
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group: expected a torch.distributed.ProcessGroup or None, got "
                        f"{type(group).__name__}")
    call = _Call(group, op)
    if not call.sharded:
        yield call
        return
    try:
        yield call
    except (TypeError, ValueError) as error:
        call.exchange(error)
        raise
    call.exchange(None)


# ---------------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def sharded_sample_targets(reducer: SliceReducer, input, weight, bias, samples, seed):
    """Gumbel-max over the full vocabulary: each rank scores its own classes (noise keyed by global class), then
    an all-reduce of the best score and one of the lowest class reaching it (ties go to the lowest class)."""
    shard = reducer.shard
    best, drawn = streamed.gumbel_max(input, weight, bias, samples, seed, class_offset=shard.offset)
    global_best = shard.all_reduce(best.clone(), dist.ReduceOp.MAX, "forward")
    candidate = torch.where(best == global_best, drawn, torch.full_like(drawn, shard.vocab))
    return shard.all_reduce(candidate, dist.ReduceOp.MIN, "forward")
