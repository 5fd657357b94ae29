"""``torch.autocast`` for dropreg's public functions: operands cast as ``F.linear`` casts them, dropreg's own fp32
accumulation kept, results in fp32 (as ``F.cross_entropy``'s under autocast)."""
from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from typing import Optional

import torch
from torch import Tensor


def autocast_operands(*tensors: Optional[Tensor]) -> tuple[tuple[Optional[Tensor], ...], Optional[torch.dtype]]:
    """Under ``torch.autocast`` for the tensors' device: cast them to the autocast dtype as ``F.linear`` would
    (float64 stays), and return ``(tensors, torch.float32)``: outputs then come back in fp32, as
    ``F.cross_entropy``'s do under autocast. Otherwise ``(tensors, None)``."""
    first = tensors[0]
    eligible = (torch.float16, torch.bfloat16, torch.float32)
    if (not isinstance(first, Tensor) or first.dtype not in eligible
            or not torch.is_autocast_enabled(first.device.type)):
        return tensors, None
    dtype = torch.get_autocast_dtype(first.device.type)

    def cast(t):
        return t.to(dtype) if isinstance(t, Tensor) and t.dtype in eligible else t
    return tuple(cast(t) for t in tensors), torch.float32


def autocast_aware(*operand_names: str):
    """Decorates a public function so that under ``torch.autocast`` its float operands are cast as ``F.linear`` casts
    them (:func:`autocast_operands`), it runs with autocast off (so dropreg's own fp32 accumulation is kept), and
    its floating outputs come back in fp32. Outside autocast it is a plain call."""
    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            first = args[0] if args else kwargs.get(operand_names[0])  # the first operand comes first
            if not isinstance(first, Tensor) or not torch.is_autocast_enabled(first.device.type):
                return fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            given = [name for name in operand_names if name in bound.arguments]
            cast, out_dtype = autocast_operands(*(bound.arguments[name] for name in given))
            if out_dtype is None:  # float64 operands: autocast leaves them alone, and so do we
                return fn(*args, **kwargs)
            bound.arguments.update(zip(given, cast))
            with results_in(out_dtype), torch.autocast(first.device.type, enabled=False):
                return fn(*bound.args, **bound.kwargs)
        return wrapper
    return decorate


_autocast_results = threading.local()  # the results' dtype while an autocast-aware call runs, else unset/None


@contextlib.contextmanager
def results_in(dtype: Optional[torch.dtype]):
    """Inside, dropreg's functions return their floating results in ``dtype`` (from their fp32/fp64 accumulators,
    not rounded to the operands' dtype first); gradients still come back in the operands' dtypes."""
    previous = getattr(_autocast_results, "dtype", None)
    _autocast_results.dtype = dtype
    try:
        yield
    finally:
        _autocast_results.dtype = previous


def result_dtype(operand_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a tensor result (``softmax_mean``'s mu): the operands', fp32 under autocast."""
    return getattr(_autocast_results, "dtype", None) or operand_dtype


def loss_dtype(operand_dtype: torch.dtype) -> torch.dtype:
    """The dtype of losses and lse: at least fp32 (bf16/fp16 operands give fp32 losses, as Hugging Face's and Cut
    Cross-Entropy's are; a z-loss or a sum of many losses built from them is not rounded to 8 bits)."""
    return torch.promote_types(result_dtype(operand_dtype), torch.float32)
