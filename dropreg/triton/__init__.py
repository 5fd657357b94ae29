"""The ``"triton"`` backend: fused Triton kernels for CUDA GPUs (and for CPU tensors under TRITON_INTERPRET=1).

One file per pass: forward.py (statistics, moments, row terms), backward.py (row preparation, logit
gradient), rdrop.py (R-Drop's two passes), utils.py (shared device helpers and every tile configuration),
ops.py (``torch.library.triton_op`` registration + autograd), compile_report.py (ahead-of-time sm_80/sm_90
compilation report). Triton is imported lazily: importing dropreg never requires it.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .._op_autograd import int64_seed
from ..reference import accumulation_dtype

_import_error: Optional[BaseException] = None


class TritonBackendUnavailable(RuntimeError):
    pass


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _ops():
    global _import_error
    try:
        from . import ops
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != "triton":
            raise  # a bug in dropreg, not a missing package
        _import_error = error
        raise TritonBackendUnavailable(f"dropreg: backend 'triton' needs the triton package: {error}") from error
    return ops


def is_available() -> bool:
    """Triton importable, and either a CUDA GPU or the interpreter."""
    if not (torch.cuda.is_available() or interpreted()):
        return False
    try:
        _ops()
    except TritonBackendUnavailable:
        return False
    return True


def unavailable_reason() -> Optional[BaseException]:
    if _import_error is not None:
        return _import_error
    if not (torch.cuda.is_available() or interpreted()):
        return RuntimeError("no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)")
    return None


def _check_device(tensor: torch.Tensor) -> None:
    if tensor.device.type == "cuda" or (tensor.device.type == "cpu" and interpreted()):
        return
    raise ValueError(f"input: backend 'triton' expects CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
                     f"before dropreg's Triton kernels are first used), got device {tensor.device}")


def triton_terms(input, weight, bias, target, signs, seed, need_explicit, need_implicit):
    """Per-row ``(ce, quadratic, sign_term)`` from the Triton kernels (see dropreg/_dispatch.py)."""
    _check_device(input)
    _ops()
    if signs is not None:
        signs = signs.to(accumulation_dtype(input.dtype)).contiguous()
    out = torch.ops.dropreg_triton.linear_ce_forward(
        input, weight, None if bias is None else bias.contiguous(), target.contiguous(), signs, int64_seed(seed),
        need_explicit, need_implicit)
    return out[0], out[1], out[2]


def triton_rdrop(input1, input2, weight, bias, target):
    """Per-row ``(ce1, ce2, kl)`` from the Triton kernels (see dropreg/_dispatch.py)."""
    _check_device(input1)
    _ops()
    out = torch.ops.dropreg_triton.rdrop_forward(input1, input2, weight, None if bias is None else bias.contiguous(),
                                                 target.contiguous())
    return out[0], out[1], out[2]
