"""The block plan a backend's passes run with: how many rows and vocabulary entries one block holds, and the
chunked driver's precision switches. A backend carries one (:meth:`dropreg._dispatch.Backend.with_plan`); every
field left None is chosen per call from the shape, dtype and workspace (docs/math.md 7.2, 7.3).

Tests and tools pick blocks by building a backend with a plan, e.g.
``dropreg.backend("torch").with_plan(BlockPlan(row_block=3, vocab_chunk=5))``, passed as ``backend=``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, fields
from typing import Optional

EPILOGUES = ("torch", "triton")


@dataclass(frozen=True)
class BlockPlan:
    """``row_block``/``vocab_chunk``: the statistics pass's and the gradient sweep's blocks; ``ce_row_block``/
    ``ce_vocab_chunk``: the cross-entropy-only driver's. ``epilogues``: the chunked driver's elementwise kernels,
    "torch" or "triton" (None: Triton's for CUDA tensors accumulated in fp32, PyTorch's elsewhere). ``keep_top``,
    ``top_class``, ``scale_squares``: the chunked driver's precision measures for narrow operands (docs/math.md 8.4,
    7.3); switched off only to measure what each buys."""

    row_block: Optional[int] = None
    vocab_chunk: Optional[int] = None
    ce_row_block: Optional[int] = None
    ce_vocab_chunk: Optional[int] = None
    epilogues: Optional[str] = None
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

    def blocks(self, default: tuple[int, int]) -> tuple[int, int]:
        """``(row_block, vocab_chunk)``: the plan's, each falling back on ``default``'s."""
        return self.row_block or default[0], self.vocab_chunk or default[1]

    def ce_blocks(self, default: tuple[int, int]) -> tuple[int, int]:
        return self.ce_row_block or default[0], self.ce_vocab_chunk or default[1]

    def describe(self) -> str:
        given = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name) != f.default]
        return ", ".join(given)


DEFAULT_PLAN = BlockPlan()
