"""The one place that maps ``backend=`` and the tensors' device to an implementation.

Every backend is a function with the signature of :func:`dropreg.reference.reference_terms`:
``(input, weight, bias, target, signs, seed, need_explicit, need_implicit) -> (ce, quadratic, sign_term)``
on flattened, validated arguments, returning per-row terms without coefficients. Ignored rows arrive
with a zeroed input row and a valid dummy target; the caller masks their outputs.
A new backend registers here and, by its name in ``tests/conftest.py``, gets the whole test suite.
"""
from __future__ import annotations

from typing import Callable

import torch

import warnings

from . import cpu
from .reference import reference_terms
from .streamed import streamed_terms

BackendFn = Callable[..., tuple]

_BACKENDS: dict[str, BackendFn] = {
    "reference": reference_terms,
    "torch": streamed_terms,
    "cpu": cpu.cpu_terms,
}

# Backends that may be missing at run time (a build that failed): "auto" skips them, with a warning.
_AVAILABILITY: dict[str, Callable[[], bool]] = {"cpu": cpu.is_available}
_warned_unavailable: set[str] = set()

# Fastest first, per device type; "auto" takes the first one that is registered.
_AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "torch"),
    "cuda": ("triton", "torch"),
}
_AUTO_FALLBACK = ("torch",)


def available_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def register_backend(name: str, fn: BackendFn) -> None:
    _BACKENDS[name] = fn


def _usable(name: str) -> bool:
    check = _AVAILABILITY.get(name)
    if check is None or check():
        return True
    if name not in _warned_unavailable:
        _warned_unavailable.add(name)
        warnings.warn(f"dropreg: backend {name!r} is unavailable, backend='auto' falls back to a slower one. "
                      f"Reason: {cpu.load_error()}", RuntimeWarning, stacklevel=3)
    return False


def resolve_backend(name: str, device: torch.device) -> tuple[str, BackendFn]:
    """``(name, fn)`` for ``backend=name``; ``"auto"`` picks the fastest registered one for ``device``."""
    if name == "auto":
        for candidate in _AUTO_PREFERENCE.get(device.type, _AUTO_FALLBACK):
            if candidate in _BACKENDS and _usable(candidate):
                return candidate, _BACKENDS[candidate]
        name = _AUTO_FALLBACK[0]
    try:
        return name, _BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"backend: expected 'auto' or one of {sorted(_BACKENDS)}, got {name!r}") from None
