"""The ``"triton"`` backend: fused Triton kernels for CUDA GPUs (and for CPU tensors under TRITON_INTERPRET=1).

One file per pass: forward.py (statistics, moments, row terms), backward.py (row preparation, logit
gradient), rdrop.py (R-Drop's two passes), utils.py (shared device helpers and every tile configuration),
ops.py (``torch.library.triton_op`` registration + autograd); epilogues.py holds the chunked driver's kernels.
The ahead-of-time sm_80/sm_90 compilation report is tools/compile_report.py. An opt-in backend: ``"auto"`` never
picks it (measured slower than naive PyTorch on the one GPU run). Triton is imported lazily: importing dropreg never requires it. The dispatch
wrappers are the shared :class:`dropreg._op_family.OpFamily`.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .._op_family import BackendUnavailable, OpFamily


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _import_ops() -> None:
    try:
        from . import ops  # noqa: F401  (registers torch.ops.dropreg_triton.*)
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != "triton":
            raise  # a bug in dropreg, not a missing package
        raise BackendUnavailable(f"dropreg: backend 'triton' needs the triton package: {error}") from error


def _missing_device() -> Optional[BaseException]:
    if torch.cuda.is_available() or interpreted():
        return None
    return RuntimeError("no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)")


def _check_device(tensor: torch.Tensor) -> None:
    if tensor.device.type == "cuda" or (tensor.device.type == "cpu" and interpreted()):
        return
    raise ValueError(f"input: backend 'triton' expects CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
                     f"before dropreg's Triton kernels are first used), got device {tensor.device}")


# Tensor descriptors read strided operands in place (ops.py copies only what they cannot read).
FAMILY = OpFamily("dropreg_triton", _import_ops, missing_requirement=_missing_device, check_device=_check_device,
                  contiguous_operands=False)
is_available = FAMILY.is_available
unavailable_reason = FAMILY.unavailable_reason
