"""Vocabulary-parallel LM heads over ``torch.distributed`` (docs/math.md, section 12).

Each rank holds a contiguous slice of the head's rows (slices in rank order, sizes may differ); ``input`` and the
global ``target`` are the same on every rank. Every term is a merge of per-slice online states (6.2): each rank
streams its own slice with the chunked PyTorch code of :mod:`dropreg.streamed` (or, with ``backend="cpu"``, the C++
kernels), the per-row states are all-reduced (one MAX of the running maxima, one SUM of the rescaled sums), and
every rank finishes the identical result. In the
backward each rank sweeps its slice again: its ``grad_W`` (and ``grad_b``) is its own, and the partial
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
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import softcap, streamed
from ._op_family import first_order_only
from ._policy import accumulation_dtype
from .loss_options import ClassValues

# How long the handshake waits for every rank. A rank that did not pass process_group (or never calls) is only
# noticed when this expires.
HANDSHAKE_TIMEOUT_S = 60.0

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_OPS = ("linear_cross_entropy", "explicit_regularizer", "rdrop_linear_cross_entropy", "softmax_mean",
        "sample_targets", "site_regularizers")
_HEADER_FIELDS = ("op", "failed", "rows", "dim", "slice", "bias", "dtype", "requires_grad", "options",
                  "seed_lo", "seed_hi", "class_min", "class_max", "target_sum", "input_sum")


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


def _log(phase: str, tensor: Tensor) -> None:
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
        _log(phase, tensor)
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def localize(self, classes: Tensor) -> tuple[Tensor, Tensor]:
        """``(classes - offset, owned)``: the local row index, valid where ``owned``."""
        local = classes - self.offset
        return local, (local >= 0) & (local < self.size)


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
        _log("handshake", mine)
        work = dist.all_gather(gathered, mine, group=self.group, async_op=True)
        try:
            work.wait(timeout=datetime.timedelta(seconds=HANDSHAKE_TIMEOUT_S))
        except RuntimeError as error:
            raise RuntimeError(
                f"dropreg.{self.op}(process_group=...): rank {rank} got no answer from every rank of the group "
                f"within {HANDSHAKE_TIMEOUT_S:g} s. Every rank must make the same dropreg call with process_group "
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


# Which backends can do the local slice's work, per op: "torch" (the streamed PyTorch code, any device) and
# "chunked" (the GPU path's driver, any device) everywhere but sampling; "cpu" (the C++ kernels) where its ops
# return per-row states that merge across slices.
_LOCAL_BACKENDS = {"linear_cross_entropy": ("torch", "chunked", "cpu"),
                   "explicit_regularizer": ("torch", "chunked", "cpu"),
                   "rdrop_linear_cross_entropy": ("torch", "chunked", "cpu"), "softmax_mean": ("torch", "chunked", "cpu"),
                   "sample_targets": ("torch",), "site_regularizers": ("torch", "chunked")}


def check_backend(op: str, backend: str, device: torch.device) -> str:
    """The backend that does this rank's local work: ``"auto"`` is ``"chunked"`` for CUDA tensors (where it is
    the fast path) when the op has it, else ``"torch"``."""
    allowed = _LOCAL_BACKENDS[op]
    if backend == "auto":
        return "chunked" if device.type == "cuda" and "chunked" in allowed else "torch"
    if backend not in allowed:
        raise ValueError(f"backend: with process_group, {op} runs its local slice on {' or '.join(map(repr, allowed))} "
                         f"(or 'auto'); got {backend!r}")
    if backend == "cpu":
        from . import cpu
        if device.type != "cpu" or not cpu.FAMILY.is_available():
            raise ValueError(f"backend: 'cpu' needs CPU tensors and the C++ kernels (reason: "
                             f"{cpu.FAMILY.unavailable_reason() if device.type == 'cpu' else device})")
    return backend


# ---------------------------------------------------------------------------------------------- the sharded ops


@dataclass(frozen=True)
class SliceDriver:
    """The PyTorch functions that do a slice's local work, with dropreg.streamed's signatures: the streamed driver
    ("torch") or the chunked one ("chunked", dropreg/chunked.py). ``blocks(h, weight)`` is the call's block plan;
    ``top_class(h, modulated)`` the buffer in which the chunked driver's forward records each row's dominant class of
    the slice for its backward (None: not needed)."""
    blocks: object
    partial_statistics: object
    terms_backward: object
    rdrop_partial_statistics: object
    rdrop_backward: object
    softmax_mean_backward: object
    top_class: object = lambda h, modulated: None

    def top_class_args(self, top_class) -> dict:
        return {} if top_class is None else {"top_class": top_class}


def slice_driver(local_backend: str) -> SliceDriver:
    if local_backend == "chunked":
        from . import chunked

        return SliceDriver(lambda h, w: chunked.default_chunks(h.shape[0], w.shape[0], h.dtype, h.device),
                           chunked.partial_statistics, chunked.terms_backward, chunked.rdrop_partial_statistics,
                           chunked.rdrop_backward, chunked.softmax_mean_backward, chunked.top_class_buffer)
    return SliceDriver(lambda h, w: streamed.default_blocks(h.shape[0], w.shape[0]), streamed.partial_statistics,
                       streamed.terms_backward, streamed.rdrop_partial_statistics, streamed.rdrop_backward,
                       streamed.softmax_mean_backward)


def _merge_maxima(shard: Shard, row_max: Tensor) -> tuple[Tensor, Tensor]:
    """The global running max of each row and this slice's rescale factor ``exp(m_local - shift)``."""
    global_max = shard.all_reduce(row_max.clone(), dist.ReduceOp.MAX, "forward")
    shift = streamed._logit_shift(global_max)
    return global_max, torch.exp(row_max - shift)  # a slice whose logits are all -inf gets factor 0


def _owned_pick(owned: Tensor, value: Tensor) -> Tensor:
    return torch.where(owned, value, torch.zeros_like(value))


def _owned_target_terms(shard, h, weight, bias, target, signs, acc):
    """The target's pieces that only the slice owning it can give (zero elsewhere, so a SUM merges them): the
    target logit and, with signs, ``(sigma * h) . W[target]``. Returns them with the localized targets."""
    local_target, owned = shard.localize(target)
    safe = torch.where(owned, local_target, torch.zeros_like(local_target))
    hc = h.to(acc)
    picked = [_owned_pick(owned, streamed.target_logit(hc, weight, bias, safe, acc))]
    u = None
    if signs is not None:
        u = signs * hc
        picked.append(_owned_pick(owned, (u * weight[safe].to(acc)).sum(1)))
    return local_target, owned, safe, hc, u, picked


class ShardedTerms(torch.autograd.Function):
    """Per-row ``(ce, quadratic, sign_term, mu)`` of :func:`dropreg.streamed.streamed_terms`, for a sliced head (mu
    None when neither dropout term is on)."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, signs, need_explicit, need_implicit, shard, driver):
        acc = accumulation_dtype(h.dtype)
        dim = h.shape[1]
        row_block, vocab_chunk = driver.blocks(h, weight)
        need_mu = need_explicit or need_implicit
        top_class = driver.top_class(h, need_mu)
        row_max, exp_sum, moments = driver.partial_statistics(
            h, weight, bias, need_mu=need_mu, need_m2=need_explicit, row_block=row_block, vocab_chunk=vocab_chunk,
            **driver.top_class_args(top_class))
        local_target, owned, safe, hc, u, picked = _owned_target_terms(shard, h, weight, bias, target, signs, acc)
        global_max, rescale = _merge_maxima(shard, row_max)
        packed = torch.cat([(exp_sum * rescale)[:, None], moments * rescale[:, None], torch.stack(picked, 1)], 1)
        shard.all_reduce(packed, dist.ReduceOp.SUM, "forward")
        n_moments = moments.shape[1]
        lse, mu, m2 = streamed.finish_statistics(global_max, packed[:, 0], packed[:, 1:1 + n_moments], dim,
                                                 need_mu=need_mu, need_m2=need_explicit)
        ce = lse - packed[:, 1 + n_moments]
        var, quadratic = streamed.explicit_quadratic(hc, mu, m2, ce, need_explicit)
        sign_term = torch.zeros_like(ce)
        if need_implicit:
            sign_term = (u * mu).sum(1) - packed[:, 2 + n_moments]
        ctx.save_for_backward(h, weight, bias, local_target, owned, signs, lse, mu, var, top_class)
        ctx.options = (need_explicit, need_implicit, row_block, vocab_chunk, shard, driver)
        return ce, quadratic, sign_term, mu

    @staticmethod
    @first_order_only
    def backward(ctx, grad_ce, grad_quadratic, grad_sign_term, grad_mu):
        h, weight, bias, local_target, owned, signs, lse, mu, var, top_class = ctx.saved_tensors
        need_explicit, need_implicit, row_block, vocab_chunk, shard, driver = ctx.options
        zero = torch.zeros_like(lse)
        grads = [zero if g is None else g for g in (grad_ce, grad_quadratic, grad_sign_term)]
        grad_h_vocab, grad_h_rows, grad_w, grad_b = driver.terms_backward(
            h, weight, bias, local_target, signs, lse, mu, var, *grads, need_explicit, need_implicit, row_block,
            vocab_chunk, ctx.needs_input_grad[:3], owns_target=owned, grad_mu=grad_mu,
            **driver.top_class_args(top_class))
        grad_h = None
        if grad_h_vocab is not None:
            grad_h = (shard.all_reduce(grad_h_vocab, dist.ReduceOp.SUM, "backward") + grad_h_rows).to(h.dtype)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None)


def sharded_terms(shard: Shard, input, weight, bias, target, signs, seed, need_explicit, need_implicit,
                  local_backend="torch"):
    """Per-row ``(ce, quadratic, sign_term, mu)`` for a sliced head; ``target`` holds global classes."""
    signs = streamed.implicit_signs(input, signs, seed, need_implicit)
    if local_backend == "cpu":
        return CppShardedTerms.apply(input, weight, bias, target, signs, need_explicit, need_implicit, shard)
    return ShardedTerms.apply(input, weight, bias, target, signs, need_explicit, need_implicit, shard,
                              slice_driver(local_backend))


def _softcap_args(softcap_value) -> dict:
    return {} if softcap_value is None else {"softcap": softcap_value}  # only the streamed driver takes a cap


class ShardedRDrop(torch.autograd.Function):
    """Per-row ``(ce1, ce2, kl)`` of :func:`dropreg.streamed.streamed_rdrop`, for a sliced head."""

    @staticmethod
    def forward(ctx, h1, h2, weight, bias, target, shard, driver, softcap_value):
        acc = accumulation_dtype(h1.dtype)
        row_block, vocab_chunk = driver.blocks(h1, weight)
        row_max, exp_sum, weighted_d = driver.rdrop_partial_statistics(h1, h2, weight, bias, row_block, vocab_chunk,
                                                                       **_softcap_args(softcap_value))
        local_target, owned = shard.localize(target)
        safe = torch.where(owned, local_target, torch.zeros_like(local_target))
        picked = torch.stack([_owned_pick(owned, streamed.capped_logits(
            streamed.target_logit(h.to(acc), weight, bias, safe, acc), softcap_value)[0]) for h in (h1, h2)])
        global_max, rescale = _merge_maxima(shard, row_max)
        packed = shard.all_reduce(torch.cat([exp_sum * rescale, weighted_d * rescale, picked]), dist.ReduceOp.SUM,
                                  "forward")
        exp_sum, weighted_d, target_logit = packed[0:2], packed[2:4], packed[4:6]
        lse = streamed._logit_shift(global_max) + exp_sum.log()
        expected_d = weighted_d / exp_sum
        ce1, ce2 = lse[0] - target_logit[0], lse[1] - target_logit[1]
        kl = 0.5 * (expected_d[0] - expected_d[1])
        sweep_target = torch.where(owned, local_target, torch.full_like(local_target, -1))  # -1: no correction
        ctx.save_for_backward(h1, h2, weight, bias, sweep_target, lse, expected_d)
        ctx.options = (row_block, vocab_chunk, shard, driver, softcap_value)
        return ce1, ce2, kl

    @staticmethod
    @first_order_only
    def backward(ctx, grad_ce1, grad_ce2, grad_kl):
        h1, h2, weight, bias, sweep_target, lse, expected_d = ctx.saved_tensors
        row_block, vocab_chunk, shard, driver, softcap_value = ctx.options
        want_h1, want_h2 = ctx.needs_input_grad[:2]
        zero = torch.zeros_like(lse[0])
        grads = [zero if g is None else g for g in (grad_ce1, grad_ce2, grad_kl)]
        grad_h, grad_w, grad_b = driver.rdrop_backward(h1, h2, weight, bias, sweep_target, lse, expected_d, *grads,
                                                       row_block, vocab_chunk, ctx.needs_input_grad[:4],
                                                       **_softcap_args(softcap_value))
        if want_h1 or want_h2:
            shard.all_reduce(grad_h, dist.ReduceOp.SUM, "backward")
        return (grad_h[0].to(h1.dtype) if want_h1 else None, grad_h[1].to(h2.dtype) if want_h2 else None,
                None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def sharded_rdrop(shard: Shard, input1, input2, weight, bias, target, local_backend="torch", softcap_value=None):
    """Per-row ``(ce1, ce2, kl)`` for a sliced head; with a softcap every local backend streams the slice with the
    PyTorch driver (as in one process, where each backend's capped R-Drop is the streamed one)."""
    if softcap_value is not None:
        return ShardedRDrop.apply(input1, input2, weight, bias, target, shard, slice_driver("torch"),
                                  float(softcap_value))
    if local_backend == "cpu":
        return CppShardedRDrop.apply(input1, input2, weight, bias, target, shard)
    return ShardedRDrop.apply(input1, input2, weight, bias, target, shard, slice_driver(local_backend), None)


class ShardedSoftmaxMean(torch.autograd.Function):
    """``mu = W^T softmax(z)`` of :func:`dropreg.streamed.streamed_softmax_mean`, for a sliced head."""

    @staticmethod
    def forward(ctx, h, weight, bias, shard, driver):
        row_block, vocab_chunk = driver.blocks(h, weight)
        top_class = driver.top_class(h, True)
        row_max, exp_sum, moments = driver.partial_statistics(h, weight, bias, need_mu=True, need_m2=False,
                                                              row_block=row_block, vocab_chunk=vocab_chunk,
                                                              **driver.top_class_args(top_class))
        global_max, rescale = _merge_maxima(shard, row_max)
        packed = shard.all_reduce(torch.cat([(exp_sum * rescale)[:, None], moments * rescale[:, None]], 1),
                                  dist.ReduceOp.SUM, "forward")
        lse, mu, _ = streamed.finish_statistics(global_max, packed[:, 0], packed[:, 1:], h.shape[1], need_mu=True,
                                                need_m2=False)
        ctx.save_for_backward(h, weight, bias, lse, mu, top_class)
        ctx.options = (row_block, vocab_chunk, shard, driver)
        return mu

    @staticmethod
    @first_order_only
    def backward(ctx, grad_mu):
        h, weight, bias, lse, mu, top_class = ctx.saved_tensors
        row_block, vocab_chunk, shard, driver = ctx.options
        grad_h, grad_w, grad_b = driver.softmax_mean_backward(h, weight, bias, lse, mu, grad_mu, row_block,
                                                              vocab_chunk, ctx.needs_input_grad[:3],
                                                              **driver.top_class_args(top_class))
        if grad_h is not None:
            grad_h = shard.all_reduce(grad_h, dist.ReduceOp.SUM, "backward").to(h.dtype)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None)


def sharded_softmax_mean(shard: Shard, input, weight, bias, local_backend="torch"):
    if local_backend == "cpu":
        return CppShardedSoftmaxMean.apply(input, weight, bias, shard)
    return ShardedSoftmaxMean.apply(input, weight, bias, shard, slice_driver(local_backend))


@torch.no_grad()
def sharded_sample_targets(shard: Shard, input, weight, bias, samples, seed):
    """Gumbel-max over the full vocabulary: each rank scores its own classes (noise keyed by global class), then
    an all-reduce of the best score and one of the lowest class reaching it (ties go to the lowest class)."""
    best, drawn = streamed.gumbel_max(input, weight, bias, samples, seed, class_offset=shard.offset)
    global_best = shard.all_reduce(best.clone(), dist.ReduceOp.MAX, "forward")
    candidate = torch.where(best == global_best, drawn, torch.full_like(drawn, shard.vocab))
    return shard.all_reduce(candidate, dist.ReduceOp.MIN, "forward")


class _SumOverSlices(torch.autograd.Function):
    """A SUM all-reduce of per-slice parts into a value every rank holds. Its backward is the identity: every rank
    back-propagates the same upstream gradient (the module's assumption), and each slice's part is all of its own
    contribution to the sum."""

    @staticmethod
    def forward(ctx, part, shard):
        return shard.all_reduce(part.contiguous().clone(), dist.ReduceOp.SUM, "forward")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _InputOfSlices(torch.autograd.Function):
    """The identity on a tensor every rank holds alike (the input h) that feeds a per-slice part: the backward sums
    the slices' gradients of it (a SUM all-reduce), so every rank gets the full gradient."""

    @staticmethod
    def forward(ctx, value, shard):
        ctx.shard = shard
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return ctx.shard.all_reduce(grad.contiguous().clone(), dist.ReduceOp.SUM, "backward"), None


def sum_over_slices(shard: Shard, parts: list) -> list:
    """Each tensor summed over the slices, in one all-reduce (flattened and packed; the tensors share a dtype)."""
    if not parts:
        return []
    total = _SumOverSlices.apply(torch.cat([p.reshape(-1) for p in parts]), shard)
    return [chunk.view(p.shape) for chunk, p in zip(total.split([p.numel() for p in parts]), parts)]


def at_global_classes(shard: Shard, per_class: list, classes: Tensor, dtype=None) -> list:
    """Each (V_slice,) or (V_slice, k) tensor's entries at global ``classes`` (N,): the owning slice contributes each
    row, one all-reduce completes them all (``dtype``: the packed dtype, default the tensors' own). Differentiable;
    the backward is local (each slice's owned rows take their part)."""
    local, owned = shard.localize(classes)
    safe = torch.where(owned, local, torch.zeros_like(local))
    parts = []
    for values in per_class:
        rows = values[safe].reshape(classes.shape[0], -1)
        rows = rows if dtype is None else rows.to(dtype)
        parts.append(torch.where(owned[:, None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device)))
    if not parts:
        return []
    widths = [p.shape[1] for p in parts]
    (packed,) = sum_over_slices(shard, [torch.cat(parts, 1)])
    return [chunk.reshape(classes.shape + values.shape[1:])
            for chunk, values in zip(packed.split(widths, 1), per_class)]


class ShardedClassValues(ClassValues):
    """:class:`dropreg.loss_options.ClassValues` of a vocabulary-parallel head: ``weight``, ``bias`` and the class
    weights are this rank's slice; the rows' target values come from the owning slices and the class sums from all
    of them, one all-reduce each (``N (d + 2)`` and ``d + 2`` numbers at most)."""

    def __init__(self, shard: Shard, *args):
        super().__init__(*args)
        self.shard = shard

    def _at_targets(self, per_class: list) -> list:
        return at_global_classes(self.shard, per_class, self.target, self.acc)

    def _over_all_classes(self, sums: list) -> list:
        return sum_over_slices(self.shard, sums)

    def slice_input(self, h: Tensor) -> Tensor:
        return _InputOfSlices.apply(h, self.shard)

    @property
    def classes(self) -> int:
        return self.shard.vocab


class ShardedHead:
    """The every-site building blocks of :mod:`dropreg.sites` on a sliced head."""

    def __init__(self, shard: Shard, local_backend: str = "torch"):
        self.shard = shard
        self.local_backend = local_backend

    def softmax_mean(self, input, weight, bias):
        return sharded_softmax_mean(self.shard, input, weight, bias, self.local_backend)

    def sample_targets(self, input, weight, bias, samples, seed):
        return sharded_sample_targets(self.shard, input, weight, bias, samples, seed)

    def weight_rows(self, weight, classes):
        return at_global_classes(self.shard, [weight], classes)[0]


# ------------------------------------------------------------------------------- the C++ kernels on a local slice
# The "cpu" ops return the slice's own per-row lse and expectations under its own softmax. Slices merge with
# weights exp(lse_r - m) (docs/math.md 12.1). Their backward takes the global per-row statistics; it is called with
# every target set to the slice's class 0, and the target's terms are then moved to the owning rank in Python.


def _cpu_ops():
    from . import cpu
    cpu.FAMILY.load()
    return torch.ops.dropreg


def _merge_normalized(shard: Shard, lse_r: Tensor, expectations: list, picked: list):
    """Global ``(lse, [E[f] for f], [sum of picked])`` from slice-local ``lse_r`` and ``E_r[f]`` (rows first)."""
    global_max = shard.all_reduce(lse_r.clone(), dist.ReduceOp.MAX, "forward")
    shift = streamed._logit_shift(global_max)
    weight = torch.exp(lse_r - shift)  # 0 for a slice whose logits are all -inf (its expectations are NaN)
    weight_col = weight.unsqueeze(-1)
    parts = [weight_col] + [torch.where(weight_col > 0, weight_col * e, torch.zeros_like(e)) for e in expectations]
    parts += [p.unsqueeze(-1) for p in picked]
    packed = shard.all_reduce(torch.cat(parts, -1), dist.ReduceOp.SUM, "forward")
    total = packed[..., :1]
    lse = shift + total[..., 0].log()
    out, start = [], 1
    for e in expectations:
        out.append(packed[..., start:start + e.shape[-1]] / total)
        start += e.shape[-1]
    return lse, out, [packed[..., start + i] for i in range(len(picked))]


def _move_target_terms(grad_w, grad_b, h, classes, owned, amount):
    """The backward ran with target 0 on every row: give back ``amount * h`` (and ``amount``) to class 0 and take
    them from the owned rows' real classes (grad_W[y] -= amount h, grad_b[y] -= amount)."""
    owned_amount = amount * owned.to(amount.dtype)
    if grad_w is not None:
        grad_w[0] += amount @ h
        grad_w.index_add_(0, classes, -owned_amount[:, None] * h)
    if grad_b is not None:
        grad_b[0] += amount.sum()
        grad_b.index_add_(0, classes, -owned_amount)


class CppShardedTerms(torch.autograd.Function):
    """:class:`ShardedTerms` with the slice's work done by the C++ kernels (``backend="cpu"``)."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, signs, need_explicit, need_implicit, shard):
        ops = _cpu_ops()
        acc = accumulation_dtype(h.dtype)
        h, weight = h.contiguous(), weight.contiguous()
        class_zero = torch.zeros(h.shape[0], dtype=torch.int64, device=h.device)
        _, _, _, lse_r, mu_r, var_r = ops.linear_ce_forward(h, weight, bias, class_zero, signs, 0, need_explicit,
                                                            need_implicit)
        local_target, owned, safe, hc, u, picked = _owned_target_terms(shard, h, weight, bias, target, signs, acc)
        expectations = [mu_r] if need_explicit or need_implicit else []
        if need_explicit:
            expectations.append(var_r + mu_r * mu_r)
        lse, moments, picked = _merge_normalized(shard, lse_r, expectations, picked)
        ce = lse - picked[0]
        quadratic = sign_term = torch.zeros_like(ce)
        mu = moments[0].contiguous() if moments else mu_r
        var = var_r
        if need_explicit:
            var = (moments[1] - mu * mu).contiguous()
            quadratic = (hc * hc * var).sum(1)
        if need_implicit:
            sign_term = (u * mu).sum(1) - picked[1]
        ctx.save_for_backward(h, weight, bias, safe, owned, signs, lse, mu, var)
        ctx.options = (need_explicit, need_implicit, shard)
        return ce, quadratic, sign_term, mu if moments else None

    @staticmethod
    @first_order_only
    def backward(ctx, grad_ce, grad_quadratic, grad_sign_term, grad_mu):
        h, weight, bias, safe, owned, signs, lse, mu, var = ctx.saved_tensors
        need_explicit, need_implicit, shard = ctx.options
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        acc = lse.dtype
        g_ce, g_r, g_i = [torch.zeros_like(lse) if g is None else g.to(acc).contiguous()
                          for g in (grad_ce, grad_quadratic, grad_sign_term)]
        class_zero = torch.zeros_like(safe)
        grad_h, grad_w, grad_b = _cpu_ops().linear_ce_backward(
            g_ce, g_r, g_i, None if grad_mu is None else grad_mu.to(acc).contiguous(), h, weight, bias, class_zero,
            signs, 0, lse, mu, var, need_explicit, need_implicit, [want_h, want_w, want_b and bias is not None])
        hc = h.to(acc)
        owned_col = owned.to(acc)[:, None]
        w_zero, w_target = weight[0].to(acc), weight[safe].to(acc) * owned_col
        grad_w = grad_w.to(acc) if want_w else None
        grad_b = grad_b.to(acc) if want_b and bias is not None else None
        _move_target_terms(grad_w, grad_b, hc, safe, owned, g_ce)
        if need_implicit:
            _move_target_terms(grad_w, None, signs * hc, safe, owned, g_i)
        if want_h:
            # The kernel's grad_input is W^T G + 2 g_R h var + g_I sigma (mu - W[0]), with G's target at class 0.
            per_row = torch.zeros_like(hc)
            if need_explicit:
                per_row += 2 * g_r[:, None] * hc * var
            if need_implicit:
                per_row += g_i[:, None] * signs * mu
            vocab_part = grad_h.to(acc) - per_row + g_ce[:, None] * w_zero - g_ce[:, None] * w_target
            if need_implicit:
                vocab_part += g_i[:, None] * signs * (w_zero - w_target)
            grad_h = (shard.all_reduce(vocab_part, dist.ReduceOp.SUM, "backward") + per_row).to(h.dtype)
        return (grad_h if want_h else None, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None)


class ShardedSoftcapTerms(torch.autograd.Function):
    """Per-row ``(ce, quadratic, sign_term, M1, S)`` of :class:`dropreg.softcap.StreamedSoftcapTerms`, for a sliced
    head: each slice's capped statistics (``passes``: chunked PyTorch or the C++ ops) merge like the uncapped
    moments, the target's pieces come from the slice that owns it (docs/math.md 12.6), and label smoothing's
    ``S`` (``omega``: this slice's weights) is the sum of the slices' parts (3.7)."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, signs, omega, softcap_value, need_explicit, need_implicit, shard,
                passes):
        acc = accumulation_dtype(h.dtype)
        need_m1 = need_explicit or need_implicit
        lse_r, m1_r, m2_r, smoothing_r = passes.statistics(h, weight, bias, softcap_value, need_m1, need_explicit,
                                                           omega)
        local_target, owned = shard.localize(target)
        safe = torch.where(owned, local_target, torch.zeros_like(local_target))
        hc = h.to(acc)
        picked = [streamed.target_logit(hc, weight, bias, safe, acc)]
        picked += [p for p in softcap.target_products(hc, weight[safe].to(acc), signs, need_explicit, need_implicit)
                   if p is not None]
        picked = [_owned_pick(owned, p) for p in picked]
        lse, moments, picked = _merge_normalized(shard, lse_r, [m for m in (m1_r, m2_r) if m is not None],
                                                 picked + ([] if smoothing_r is None else [smoothing_r]))
        smoothing_sum = torch.zeros_like(lse) if smoothing_r is None else picked.pop()
        m1, m2 = (moments + [None, None])[:2]
        q_ww = picked[1] if need_explicit else None
        y = softcap.TargetValues(picked[0], q_ww, picked[-1] if need_implicit else None, softcap_value)
        ctx.save_for_backward(h, weight, bias, safe, owned, signs, omega, lse, m1, m2)
        ctx.options = (softcap_value, y, need_explicit, need_implicit, shard, passes)
        return (*softcap.capped_terms(hc, signs, lse, m1, m2, y, need_explicit, need_implicit), m1, smoothing_sum)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_ce, grad_quadratic, grad_sign_term, grad_m1, grad_smoothing_sum):
        h, weight, bias, safe, owned, signs, omega, lse, m1, m2 = ctx.saved_tensors
        softcap_value, y, need_explicit, need_implicit, shard, passes = ctx.options
        acc = lse.dtype
        hc = h.to(acc)
        upstream = [torch.zeros_like(lse) if g is None else g.to(acc)
                    for g in (grad_ce, grad_quadratic, grad_sign_term)]
        row_const, amount, T_vec, Q, direct_h = softcap.backward_row_terms(hc, signs, m1, m2, y, upstream, grad_m1,
                                                                           need_explicit, need_implicit)
        owned_acc = owned.to(acc)
        # Only the owning slice subtracts at the target (safe is its class 0 elsewhere, with amount 0).
        grad_h, grad_w, grad_b = passes.sweep(h, weight, bias, softcap_value, lse, safe, amount * owned_acc,
                                              row_const, T_vec, Q, ctx.needs_input_grad[:3], omega,
                                              softcap.smoothing_upstream(omega, grad_smoothing_sum, lse))
        # The target row's own terms, on the rows whose target this slice owns.
        to_h, to_w = (g * owned_acc[:, None] for g in softcap.target_row_gradients(
            hc, signs, weight[safe].to(acc), y, upstream, need_explicit, need_implicit))
        if grad_h is not None:
            grad_h = (shard.all_reduce(grad_h + to_h, dist.ReduceOp.SUM, "backward") + direct_h).to(h.dtype)
        if grad_w is not None:
            grad_w = grad_w.index_add(0, safe, to_w).to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None


def sharded_softcap_terms(shard: Shard, input, weight, bias, target, signs, seed, need_explicit, need_implicit,
                          softcap_value, local_backend="torch", smoothing_weights=None):
    """Per-row ``(ce, quadratic, sign_term, M1, S)`` of a softcapped, sliced head (``S`` None without
    ``smoothing_weights``, this slice's); ``target`` holds global classes.
    ``"cpu"`` streams the slice with the C++ passes, ``"torch"`` and ``"chunked"`` with chunked PyTorch (as in one
    process, where the chunked backend's capped head is the streamed one)."""
    signs = streamed.implicit_signs(input, signs, seed, need_implicit)
    if local_backend == "cpu":
        _cpu_ops()
        passes = softcap.CppPasses()
        input, weight = input.contiguous(), weight.contiguous()
        bias = None if bias is None else bias.contiguous()
    else:
        passes = softcap.TorchPasses(*streamed.default_blocks(input.shape[0], weight.shape[0]))
    omega = None if smoothing_weights is None else smoothing_weights.detach().contiguous()
    *terms, smoothing_sum = ShardedSoftcapTerms.apply(input, weight, bias, target.contiguous(), signs, omega,
                                                      float(softcap_value), need_explicit, need_implicit, shard,
                                                      passes)
    return (*terms, None if omega is None else smoothing_sum)


class CppShardedSoftmaxMean(torch.autograd.Function):
    """:class:`ShardedSoftmaxMean` with the slice's work done by the C++ kernels (``backend="cpu"``)."""

    @staticmethod
    def forward(ctx, h, weight, bias, shard):
        h, weight = h.contiguous(), weight.contiguous()
        mu_r, lse_r = _cpu_ops().softmax_mean_forward(h, weight, bias)
        lse, (mu,), _ = _merge_normalized(shard, lse_r, [mu_r], [])
        mu = mu.contiguous()
        ctx.save_for_backward(h, weight, bias, lse, mu)
        ctx.shard = shard
        return mu

    @staticmethod
    @first_order_only
    def backward(ctx, grad_mu):
        h, weight, bias, lse, mu = ctx.saved_tensors
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h, grad_w, grad_b = _cpu_ops().softmax_mean_backward(grad_mu.to(lse.dtype).contiguous(), h, weight,
                                                                  bias, lse, mu,
                                                                  [want_h, want_w, want_b and bias is not None])
        if want_h:  # W^T G only: no per-row part
            grad_h = ctx.shard.all_reduce(grad_h.to(lse.dtype), dist.ReduceOp.SUM, "backward").to(h.dtype)
        return (grad_h if want_h else None, grad_w if want_w else None,
                grad_b if want_b and bias is not None else None, None)


class CppShardedRDrop(torch.autograd.Function):
    """:class:`ShardedRDrop` with the slice's work done by the C++ kernels (``backend="cpu"``)."""

    @staticmethod
    def forward(ctx, h1, h2, weight, bias, target, shard):
        acc = accumulation_dtype(h1.dtype)
        h1, h2, weight = h1.contiguous(), h2.contiguous(), weight.contiguous()
        class_zero = torch.zeros(h1.shape[0], dtype=torch.int64, device=h1.device)
        _, _, _, lse_r, expected_r = _cpu_ops().rdrop_forward(h1, h2, weight, bias, class_zero)
        local_target, owned = shard.localize(target)
        safe = torch.where(owned, local_target, torch.zeros_like(local_target))
        picked = [torch.stack([_owned_pick(owned, streamed.target_logit(h.to(acc), weight, bias, safe, acc))
                               for h in (h1, h2)])]
        # Rows of (2, N): pass i's lse and E_pi[D] merge like any other row.
        lse, (expected_d,), (target_logit,) = _merge_normalized(shard, lse_r, [expected_r.unsqueeze(-1)], picked)
        expected_d = expected_d[..., 0].contiguous()
        ce1, ce2 = lse[0] - target_logit[0], lse[1] - target_logit[1]
        kl = 0.5 * (expected_d[0] - expected_d[1])
        ctx.save_for_backward(h1, h2, weight, bias, safe, owned, lse.contiguous(), expected_d)
        ctx.shard = shard
        return ce1, ce2, kl

    @staticmethod
    @first_order_only
    def backward(ctx, grad_ce1, grad_ce2, grad_kl):
        h1, h2, weight, bias, safe, owned, lse, expected_d = ctx.saved_tensors
        want_h1, want_h2, want_w, want_b = ctx.needs_input_grad[:4]
        acc = lse.dtype
        grads = [torch.zeros_like(lse[0]) if g is None else g.to(acc).contiguous()
                 for g in (grad_ce1, grad_ce2, grad_kl)]
        class_zero = torch.zeros_like(safe)
        grad_h1, grad_h2, grad_w, grad_b = _cpu_ops().rdrop_backward(
            *grads, h1, h2, weight, bias, class_zero, lse, expected_d,
            [want_h1 or want_h2, want_h1 or want_h2, want_w, want_b and bias is not None])
        grad_w = grad_w.to(acc) if want_w else None
        grad_b = grad_b.to(acc) if want_b and bias is not None else None
        owned_col = owned.to(acc)[:, None]
        w_zero, w_target = weight[0].to(acc), weight[safe].to(acc) * owned_col
        grad_h = None
        if want_h1 or want_h2:
            grad_h = torch.stack([g.to(acc) + g_ce[:, None] * (w_zero - w_target)
                                  for g, g_ce in ((grad_h1, grads[0]), (grad_h2, grads[1]))])
            ctx.shard.all_reduce(grad_h, dist.ReduceOp.SUM, "backward")
        for h, g_ce in ((h1, grads[0]), (h2, grads[1])):
            _move_target_terms(grad_w, grad_b, h.to(acc), safe, owned, g_ce)
        return (grad_h[0].to(h1.dtype) if want_h1 else None, grad_h[1].to(h2.dtype) if want_h2 else None,
                None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None)
