"""The one place that maps ``backend=`` and the tensors' device to an implementation.

A backend provides one function per fused op, on flattened, validated arguments, returning per-row
terms without coefficients (the caller applies coefficients, masks ignored rows and reduces):

* ``linear_ce(input, weight, bias, target, signs, seed, need_explicit, need_implicit)
  -> (ce, quadratic, sign_term, mu)``, as :func:`dropreg.reference.reference_terms`: mu (None unless a term is
  needed) is differentiable too, for the loss options built on it (docs/math.md 3.5);
* ``rdrop(input1, input2, weight, bias, target) -> (ce1, ce2, kl)``, as
  :func:`dropreg.reference.reference_rdrop`;
* ``softmax_mean(input, weight, bias) -> mu`` (differentiable), as
  :func:`dropreg.reference.reference_softmax_mean`;
* ``sample_targets(input, weight, bias, samples, seed) -> (samples, N) int64``, as
  :func:`dropreg.reference.reference_sample_targets`;
* optionally ``linear_ce_softcap(input, weight, bias, target, signs, seed, need_explicit, need_implicit, softcap,
  smoothing_weights=None)`` (returning ``linear_ce``'s four and label smoothing's ``S``, docs/math.md 3.7)
  and ``rdrop_softcap(input1, input2, weight, bias, target, softcap)``: ``linear_ce`` and ``rdrop`` for a softcapped
  head (docs/math.md 3.6, 9.4); a backend without one refuses ``softcap=`` on that op, and ``"auto"`` skips it
  then;
* optionally ``ce_with_grads(input, weight, bias, target, row_weight, z_weight=None)
  -> [sum_i row_weight_i ce_i, sum_i z_weight_i lse_i^2]`` (shape (2,), differentiable as a sum), for cross
  entropy alone (z-loss included) under a "mean"/"sum" reduction: it forms the gradients during the forward
  (3 NVd instead of 4, docs/math.md "CE only"). A backend without it gets the per-row path;
* optionally ``ce_with_grads_softcap(input, weight, bias, target, row_weight, z_weight, softcap,
  smoothing_weights=None, smoothing_row_weight=None)``: ``ce_with_grads`` of a softcapped head, whose first output
  also subtracts label smoothing's ``sum_i smoothing_row_weight_i S_i`` when ``smoothing_weights`` (omega, docs/math.md
  3.7) are given. A backend without it takes a capped head's per-row path.

Ignored rows arrive with zeroed input rows and a valid dummy target. A new backend is added to ``_BACKENDS`` here and,
by its name in ``tests/conftest.py``, gets the whole test suite.
"""
from __future__ import annotations

import warnings
from dataclasses import KW_ONLY, dataclass
from typing import Callable, Optional

import torch

from . import chunked, cpu
from . import triton as triton_backend
from .reference import (reference_rdrop, reference_sample_targets, reference_softcap_terms, reference_softmax_mean,
                        reference_terms)
from .softcap import cpu_softcap_terms, streamed_softcap_terms
from .streamed import (streamed_ce_with_grads, streamed_ce_with_grads_softcap, streamed_rdrop, streamed_sample_targets,
                       streamed_softmax_mean, streamed_terms)


@dataclass(frozen=True)
class Backend:
    linear_ce: Callable[..., tuple]
    rdrop: Callable[..., tuple]
    softmax_mean: Callable[..., torch.Tensor]
    sample_targets: Callable[..., torch.Tensor]
    _: KW_ONLY  # the optional parts are named at construction: a positional slip would bind the wrong callable
    ce_with_grads: Optional[Callable[..., torch.Tensor]] = None
    is_available: Callable[[], bool] = lambda: True
    unavailable_reason: Callable[[], Optional[BaseException]] = lambda: None
    linear_ce_softcap: Optional[Callable[..., tuple]] = None
    rdrop_softcap: Optional[Callable[..., tuple]] = None
    ce_with_grads_softcap: Optional[Callable[..., torch.Tensor]] = None


_BACKENDS: dict[str, Backend] = {
    "reference": Backend(reference_terms, reference_rdrop, reference_softmax_mean, reference_sample_targets,
                         linear_ce_softcap=reference_softcap_terms, rdrop_softcap=reference_rdrop),
    "torch": Backend(streamed_terms, streamed_rdrop, streamed_softmax_mean, streamed_sample_targets,
                     ce_with_grads=streamed_ce_with_grads, linear_ce_softcap=streamed_softcap_terms,
                     rdrop_softcap=streamed_rdrop, ce_with_grads_softcap=streamed_ce_with_grads_softcap),
    "cpu": Backend(cpu.FAMILY.linear_ce, cpu.FAMILY.rdrop, cpu.cpu_softmax_mean, cpu.cpu_sample_targets,
                   ce_with_grads=cpu.cpu_ce_with_grads, is_available=cpu.FAMILY.is_available,
                   unavailable_reason=cpu.FAMILY.unavailable_reason, linear_ce_softcap=cpu_softcap_terms,
                   rdrop_softcap=streamed_rdrop, ce_with_grads_softcap=cpu.cpu_ce_with_grads_softcap),
    # The GPU path (docs/math.md 7.3): cuBLAS GEMMs per vocabulary chunk, Triton epilogues on CUDA (PyTorch ones on
    # other devices, where it is tested). Sampling and the softcapped head run the streamed PyTorch drivers.
    "chunked": Backend(chunked.chunked_terms, chunked.chunked_rdrop, chunked.chunked_softmax_mean,
                       streamed_sample_targets, ce_with_grads=chunked.chunked_ce_with_grads,
                       linear_ce_softcap=streamed_softcap_terms, rdrop_softcap=streamed_rdrop,
                       ce_with_grads_softcap=streamed_ce_with_grads_softcap),
    # The first GPU kernels: one program per (row block, vocabulary block), gradients summed with atomics. Kept
    # until a GPU run compares them with "chunked" (README, "The GPU backend"). Its capped head, cross entropy
    # alone included, runs the streamed PyTorch drivers.
    "triton": Backend(triton_backend.FAMILY.linear_ce, triton_backend.FAMILY.rdrop, streamed_softmax_mean,
                      streamed_sample_targets, is_available=triton_backend.FAMILY.is_available,
                      unavailable_reason=triton_backend.FAMILY.unavailable_reason,
                      linear_ce_softcap=streamed_softcap_terms, rdrop_softcap=streamed_rdrop,
                      ce_with_grads_softcap=streamed_ce_with_grads_softcap),
}

# Fastest first, per device type; "auto" takes the first registered and available one.
_AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "torch"),
    "cuda": ("chunked", "triton", "torch"),
}
_AUTO_FALLBACK = ("torch",)
_warned_unavailable: set[str] = set()


def available_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def _usable(name: str) -> bool:
    backend = _BACKENDS[name]
    if backend.is_available():
        return True
    if name not in _warned_unavailable:  # never fall back silently
        _warned_unavailable.add(name)
        warnings.warn(f"dropreg: backend {name!r} is unavailable, backend='auto' falls back to a slower one. "
                      f"Reason: {backend.unavailable_reason()}", RuntimeWarning, stacklevel=4)
    return False


# Backends whose results may vary from run to run on a device type: the Triton kernels add into grad_input and
# grad_weight with atomics on a GPU (the interpreter runs programs one after another, so CPU tensors are exempt).
_NONDETERMINISTIC: dict[str, tuple[str, ...]] = {"triton": ("cuda",)}


def _deterministic_here(name: str, device: torch.device) -> bool:
    return device.type not in _NONDETERMINISTIC.get(name, ())


def _supports(name: str, softcap: bool, op: str) -> bool:
    return not softcap or getattr(_BACKENDS[name], f"{op}_softcap") is not None


def check_backend_name(name) -> None:
    """``backend=``: "auto" or a registered backend's name (whether it runs on a given device is resolve_backend's)."""
    if not isinstance(name, str) or (name != "auto" and name not in _BACKENDS):
        raise ValueError(f"backend: expected 'auto' or one of {sorted(_BACKENDS)}, got {name!r}")


def resolve_backend(name: str, device: torch.device, *, softcap: bool = False,
                    op: str = "linear_ce") -> tuple[str, Backend]:
    """``(name, backend)`` for ``backend=name``; ``"auto"`` picks the fastest usable one for ``device``
    (that implements ``op``, "linear_ce" or "rdrop", on a softcapped head, when ``softcap``).

    Under ``torch.use_deterministic_algorithms(True)``, ``"auto"`` skips backends that are not deterministic on
    ``device`` and naming one raises, as torch does for its own nondeterministic ops."""
    check_backend_name(name)
    deterministic = torch.are_deterministic_algorithms_enabled()
    if name == "auto":
        for candidate in _AUTO_PREFERENCE.get(device.type, _AUTO_FALLBACK):
            if deterministic and not _deterministic_here(candidate, device):
                continue
            if candidate in _BACKENDS and _supports(candidate, softcap, op) and _usable(candidate):
                return candidate, _BACKENDS[candidate]
        name = _AUTO_FALLBACK[0]
    if name not in _BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {sorted(_BACKENDS)}, got {name!r}")
    if not _supports(name, softcap, op):
        supported = sorted(n for n in _BACKENDS if _supports(n, True, op))
        raise ValueError(f"softcap: backend {name!r} does not implement a softcapped head yet; use backend='auto' or "
                         f"one of {supported}")
    if deterministic and not _deterministic_here(name, device):
        message = (f"backend: {name!r} is not deterministic on {device.type} tensors (its kernels accumulate "
                   f"gradients with atomic adds), and torch.use_deterministic_algorithms(True) is set; use "
                   f"backend='torch' or 'auto' (which then picks 'torch')")
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(message)
        warnings.warn(message, UserWarning, stacklevel=3)  # warn_only=True: as torch does for its own ops
    return name, _BACKENDS[name]
