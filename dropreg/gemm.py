"""The large products of the chunked driver (docs/math.md 7.3): operands in a stated dtype, results in the
accumulation dtype.

On CUDA a bf16/fp16 product runs on cuBLAS with fp32 accumulation and an fp32 result (``out_dtype``), fp32 and
fp64 products as torch runs them (tf32 when ``torch.backends.cuda.matmul.allow_tf32``). On a CPU, where bf16
matmuls are slow and ``out_dtype`` is refused, the rounded operands are upcast first: a product of two bf16
values is exact in fp32, so the result is what the tensor cores form, up to the order of the additions. Tests on
CPU tensors therefore see the GPU's operand rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ._policy import accumulation_dtype


@dataclass(frozen=True)
class OperandTypes:
    """The dtypes of one call's products.

    ``forward``: operands of the forward GEMMs (``z = H W^T`` and the moments ``P [W | W*W]``); ``backward``:
    of the backward ones (the recomputed z, ``[T | gR' q] [W | W*W]^T``, ``G W``, ``[G; S]^T [H; T]``, ``S^T gR' q``).
    ``keep_top``: the forward keeps each row's largest probability of a chunk out of the rounded operand and adds
    it in the accumulation dtype (docs/math.md 8.4); needed whenever ``forward`` is narrower than ``acc``."""
    acc: torch.dtype
    forward: torch.dtype
    backward: torch.dtype

    @property
    def keep_top(self) -> bool:
        return self.forward != self.acc


def operand_types(dtype: torch.dtype) -> OperandTypes:
    """bf16: bf16 operands everywhere (its exponent range is fp32's). fp16: fp16 operands in the forward only;
    the backward's operands (the logit gradient G ~ g_ce s, T ~ gR' q mu, both scaled by 1/N) underflow fp16's
    5-bit exponent, so they stay fp32. fp32 and fp64: their own dtype."""
    acc = accumulation_dtype(dtype)
    if dtype == torch.bfloat16:
        return OperandTypes(acc, dtype, dtype)
    if dtype == torch.float16:
        return OperandTypes(acc, dtype, acc)
    return OperandTypes(acc, acc, acc)


_CUDA_ADDMM_OUT_DTYPE: dict[int, bool] = {}  # per device index: does addmm(..., out_dtype=, out=self) work?


def _cuda_accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out += a @ b`` with narrow a, b and an fp32 ``out``, in one cuBLAS call where this torch allows an fp32
    ``self`` with narrow operands (newer releases), else through a temporary product."""
    index = out.device.index or 0
    if _CUDA_ADDMM_OUT_DTYPE.get(index, True):
        try:
            return torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        except RuntimeError:  # "self and mat2 must have the same dtype" in older releases: remember, fall back
            _CUDA_ADDMM_OUT_DTYPE[index] = False
    return out.add_(torch.mm(a, b, out_dtype=out.dtype))


def mm(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype, *, out: Optional[torch.Tensor] = None,
       accumulate: bool = False) -> torch.Tensor:
    """``a @ b`` (a, b of one dtype) in ``acc``; into ``out`` when given (``out += a @ b`` when ``accumulate``)."""
    if a.dtype != acc and a.device.type in ("cuda", "meta"):  # meta tensors stand for CUDA ones (tools/traffic.py)
        if out is None:
            return torch.mm(a, b, out_dtype=acc)
        if accumulate:
            return _cuda_accumulate(out, a, b)
        return torch.mm(a, b, out_dtype=acc, out=out)
    a, b = a.to(acc), b.to(acc)
    if out is None:
        return a @ b
    if accumulate:
        return out.addmm_(a, b)
    return torch.mm(a, b, out=out)


def as_operand(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to a GEMM operand dtype (no copy when it already is one)."""
    return t if t.dtype == dtype else t.to(dtype)
