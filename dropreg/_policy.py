"""Numerical and memory policy shared by every backend (docs/math.md, "Numerics" and "Workspace"): one
definition, imported everywhere."""
from __future__ import annotations

import functools
import numbers
import sys

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Every backend accumulates in fp32 whatever the input dtype, or in fp64 when the inputs are fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The largest block of logits a fused op may hold at once (the CE-only path keeps a whole row block's logits
# so that it needs no recompute). A GPU has the memory and needs big blocks for big GEMMs; a CPU does not.
DEFAULT_WORKSPACE_BYTES = {"cuda": 1 << 30}
DEFAULT_CPU_WORKSPACE_BYTES = 256 << 20
MIN_WORKSPACE_BYTES = 1 << 20
_workspace_override: dict[str, int] = {}


def workspace_bytes(device: torch.device | str = "cpu") -> int:
    """The logits workspace, in bytes, that fused ops on ``device``'s type may allocate (never N x V)."""
    kind = torch.device(device).type
    return _workspace_override.get(kind, DEFAULT_WORKSPACE_BYTES.get(kind, DEFAULT_CPU_WORKSPACE_BYTES))


def set_workspace_bytes(size: int | None, device: torch.device | str = "cpu") -> int:
    """Set the logits workspace for ``device``'s type (``None``: back to the default); returns the old value."""
    kind = torch.device(device).type
    previous = workspace_bytes(kind)
    if size is None:
        _workspace_override.pop(kind, None)
        return previous
    if not isinstance(size, numbers.Integral) or isinstance(size, bool):
        raise TypeError(f"size: expected an int number of bytes or None, got {size!r}")
    if size < MIN_WORKSPACE_BYTES:
        raise ValueError(f"size: expected at least {MIN_WORKSPACE_BYTES} bytes (1 MiB), got {size}")
    _workspace_override[kind] = int(size)
    return previous


def workspace_rows(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """How many rows' full-vocabulary logits (in ``dtype``) fit the workspace: at least 1, at most ``rows``."""
    per_row = vocab * dtype.itemsize
    return max(1, min(rows, workspace_bytes(device) // per_row))


def eager_under_compile(fn):
    """``torch.compiler.disable(fn)``: under ``torch.compile`` a graph break, ``fn`` running eagerly. Applied at the
    first call made once ``torch._dynamo`` is loaded: importing it costs about a second, which ``import dropreg``
    should not pay, and nothing can be compiling before it is loaded."""
    disabled = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            if "torch._dynamo" not in sys.modules:
                return fn(*args, **kwargs)
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)
    return wrapper
