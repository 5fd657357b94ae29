"""The block plan a backend's passes run with: how many rows and vocabulary entries one block holds, and the
chunked driver's precision switches. A backend carries one (:meth:`dropreg._dispatch.Backend.with_plan`); every
field left None is chosen per call from the shape, dtype and workspace (docs/math.md 7.2, 7.3).

Tests and tools pick blocks by building a backend with a plan, e.g.
``dropreg.backend("torch").with_plan(BlockPlan(row_block=3, vocab_chunk=5))``, passed as ``backend=``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from ._policy import accumulation_dtype, workspace_bytes, workspace_rows
from .gemm import OperandTypes, operand_types

EPILOGUES = ("torch", "triton")


@dataclass(frozen=True)
class BlockPlan:
    """``row_block``/``vocab_chunk``: the statistics pass's and the gradient sweep's blocks; ``ce_row_block``/
    ``ce_vocab_chunk``: the cross-entropy-only driver's. ``epilogues``: the chunked driver's elementwise kernels,
    "torch" or "triton" (None: Triton's for CUDA tensors accumulated in fp32, PyTorch's elsewhere).
    ``keep_squares``: whether the chunked driver keeps the ``W*W`` operand its forward forms for the backward (a V x d
    tensor in the operand dtype held between them) instead of forming it again; None: when that takes at most the
    workspace (:func:`keeps_squares`). ``keep_top``, ``top_class``, ``scale_squares``: the chunked driver's precision
    measures for narrow operands (docs/math.md 8.4, 7.3); switched off only to measure what each buys."""

    row_block: Optional[int] = None
    vocab_chunk: Optional[int] = None
    ce_row_block: Optional[int] = None
    ce_vocab_chunk: Optional[int] = None
    epilogues: Optional[str] = None
    keep_squares: Optional[bool] = None
    keep_top: bool = True
    top_class: bool = True
    scale_squares: bool = True

    def __post_init__(self):
        for field in ("row_block", "vocab_chunk", "ce_row_block", "ce_vocab_chunk"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool)
                                      or value < 1):
                raise ValueError(f"BlockPlan.{field}: expected a positive int or None, got {value!r}")
        if self.epilogues is not None and self.epilogues not in EPILOGUES:
            raise ValueError(f"BlockPlan.epilogues: expected one of {EPILOGUES} or None, got {self.epilogues!r}")
        for field in ("keep_top", "top_class", "scale_squares"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"BlockPlan.{field}: expected a bool, got {getattr(self, field)!r}")
        if self.keep_squares is not None and not isinstance(self.keep_squares, bool):
            raise TypeError(f"BlockPlan.keep_squares: expected a bool or None, got {self.keep_squares!r}")

    def blocks(self, default: tuple[int, int]) -> tuple[int, int]:
        """``(row_block, vocab_chunk)``: the plan's, each falling back on ``default``'s."""
        return self.row_block or default[0], self.vocab_chunk or default[1]

    def ce_blocks(self, default: tuple[int, int]) -> tuple[int, int]:
        return self.ce_row_block or default[0], self.ce_vocab_chunk or default[1]


DEFAULT_PLAN = BlockPlan()


def keeps_squares(plan: BlockPlan, weight: torch.Tensor, types: OperandTypes) -> bool:
    """Whether the chunked driver keeps its forward's ``W*W`` for the backward: the plan's choice, else when one V x d
    tensor in the operand dtype fits the workspace. Only when both passes take the same operand, unscaled (fp16's
    forward scales its squares, docs/math.md 7.3)."""
    if types.forward != types.backward or types.forward == torch.float16:
        return False
    if plan.keep_squares is not None:
        return plan.keep_squares
    device = "cuda" if weight.device.type == "meta" else weight.device  # meta stands for CUDA (tools/traffic.py)
    return weight.numel() * types.forward.itemsize <= workspace_bytes(device)


# ---------------------------------------------------------------------------------------------------------
# The blocks a plan leaves open, chosen per call (docs/math.md 7.2, 7.3)
# ---------------------------------------------------------------------------------------------------------

DEFAULT_ROW_BLOCK = 1024


TILE_ELEMENTS = 1 << 21  # one R x C fp32 tile is 8 MiB: large enough for GEMM speed, small next to N x V


MIN_VOCAB_CHUNK = 256


def default_blocks(n_rows: int, vocab: int) -> tuple[int, int]:
    row_block = max(1, min(n_rows, DEFAULT_ROW_BLOCK))
    vocab_chunk = max(1, min(vocab, max(MIN_VOCAB_CHUNK, TILE_ELEMENTS // row_block)))
    return row_block, vocab_chunk


CPU_CE_BLOCK_ROWS = 512


def ce_only_blocks(n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """(rows per block, vocabulary chunk) of the CE-only driver: a block's full-vocabulary logits fit the workspace
    (and on a CPU, at most CPU_CE_BLOCK_ROWS rows)."""
    block_rows = workspace_rows(n_rows, vocab, accumulation_dtype(dtype), device)
    if torch.device(device).type == "cpu":
        block_rows = min(block_rows, CPU_CE_BLOCK_ROWS)
    return block_rows, default_blocks(block_rows, vocab)[1]


CHUNK_ALIGN = 256  # chunk widths are multiples of this (whole GEMM and epilogue tiles), except the last


MIN_CHUNK = 1024  # below this the GEMMs get thin; rows are split into blocks instead


def chunk_bytes_per_entry(types: OperandTypes, device: torch.device, stacked_outputs: int = 2) -> int:
    """Workspace bytes per (row, chunk entry): the backward's two fp32 products (Z and t) and ``stacked_outputs``
    operand-dtype epilogue outputs ([G; S]), which outweigh the forward's Z and P. On a CPU :func:`mm` upcasts narrow
    operands, one more accumulation-dtype copy of the epilogue outputs."""
    acc_size = types.acc.itemsize
    per_entry = 2 * acc_size + stacked_outputs * types.backward.itemsize
    if device.type != "cuda" and types.backward != types.acc:
        per_entry += stacked_outputs * acc_size
    return per_entry


def chunk_plan(n_rows: int, vocab: int, bytes_per_entry: int, device: torch.device) -> tuple[int, int]:
    """``(rows per block, vocabulary chunk)``: all rows and the widest multiple of CHUNK_ALIGN entries that fit the
    workspace, or, when fewer than MIN_CHUNK entries would fit, chunks of MIN_CHUNK and as many rows as fit."""
    budget = workspace_bytes(device)
    n_rows, vocab = max(1, n_rows), max(1, vocab)
    chunk = budget // (n_rows * bytes_per_entry)
    if chunk >= vocab:
        return n_rows, vocab
    if chunk >= MIN_CHUNK:
        return n_rows, chunk // CHUNK_ALIGN * CHUNK_ALIGN
    chunk = min(vocab, MIN_CHUNK)
    return max(1, min(n_rows, budget // (chunk * bytes_per_entry))), chunk


def default_chunks(n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """``(rows per block, vocabulary chunk)`` of a call whose plan leaves them open."""
    return chunk_plan(n_rows, vocab, chunk_bytes_per_entry(operand_types(dtype), device), device)


def ce_chunks(n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """The CE-only path's blocks: as many rows as the workspace holds whole logit rows of, and chunks at least
    8 * MIN_CHUNK entries wide (the streamed driver's CPU-sized chunks would make thin GPU products)."""
    block_rows, vocab_chunk = ce_only_blocks(n_rows, vocab, dtype, device)
    return block_rows, max(vocab_chunk, min(vocab, 8 * MIN_CHUNK))
