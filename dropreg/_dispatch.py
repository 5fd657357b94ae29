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

import dataclasses
import functools
import warnings
from dataclasses import KW_ONLY, dataclass
from typing import Callable, Optional

import torch

from . import cpu, cpu_ops, ops
from . import triton as triton_backend
from .chunked import ChunkedPasses
from .cpp_passes import CppPasses
from .plan import DEFAULT_PLAN, BlockPlan
from .reducers import LOCAL
from .reference import (reference_rdrop, reference_sample_targets, reference_softcap_terms, reference_softmax_mean,
                        reference_terms)
from .streamed import StreamedPasses

# The public ops that a vocabulary-parallel head (process_group=) runs, by the name the handshake knows them by.
SLICE_OPS = ("linear_cross_entropy", "explicit_regularizer", "rdrop_linear_cross_entropy", "softmax_mean",
             "sample_targets", "site_regularizers")


@dataclass(frozen=True)
class Backend:
    """One row of the dispatch table: the backend contract's functions (module docstring). Those of a backend built
    on passes (dropreg/ops.py) take ``reducer=`` too, and run the ops of ``slice_ops`` on a vocabulary slice.
    ``with_plan(plan)`` gives the same backend with another :class:`dropreg.plan.BlockPlan`."""
    name: str
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
    slice_ops: tuple = ()
    plan: BlockPlan = DEFAULT_PLAN
    build: Optional[Callable[[BlockPlan], "Backend"]] = None

    def with_plan(self, plan: BlockPlan) -> "Backend":
        """This backend with ``plan`` (a :class:`dropreg.plan.BlockPlan`) instead of its own."""
        if not isinstance(plan, BlockPlan):
            raise TypeError(f"plan: expected a dropreg.BlockPlan, got {type(plan).__name__}")
        if self.build is None:
            raise ValueError(f"backend {self.name!r} takes no block plan (those that do: "
                             f"{sorted(n for n, b in _BACKENDS.items() if b.build is not None)})")
        return self.build(plan)


def _on_passes(passes, *, slice_ops, ce_with_grads=None, ce_with_grads_softcap=None, **kwargs) -> Backend:
    """A backend whose fused ops are dropreg/ops.py's over ``passes`` (which carries the plan)."""
    bind = functools.partial
    return Backend(passes.name, bind(ops.linear_ce, passes), bind(ops.rdrop, passes),
                   bind(ops.softmax_mean, passes), passes.sample_targets,
                   ce_with_grads=ce_with_grads or bind(ops.ce_with_grads, passes),
                   linear_ce_softcap=bind(ops.linear_ce_softcap, passes), rdrop_softcap=bind(ops.rdrop, passes),
                   ce_with_grads_softcap=ce_with_grads_softcap or bind(ops.ce_with_grads, passes),
                   slice_ops=slice_ops, plan=passes.plan, **kwargs)


def _whole_head_op(registered, sliced):
    """The registered op for a head held whole (dropreg/cpu_ops.py: ``torch.compile(fullgraph=True)`` traces it),
    the passes' op on a vocabulary slice."""
    def run(*args, reducer=LOCAL):
        return registered(*args) if reducer is LOCAL else sliced(*args, reducer=reducer)
    return run


def torch_backend(plan: BlockPlan = DEFAULT_PLAN) -> Backend:
    return _on_passes(StreamedPasses(plan), slice_ops=SLICE_OPS, build=torch_backend)


def chunked_backend(plan: BlockPlan = DEFAULT_PLAN) -> Backend:
    return _on_passes(ChunkedPasses(plan), slice_ops=tuple(op for op in SLICE_OPS if op != "sample_targets"),
                      build=chunked_backend)


def cpu_backend(plan: BlockPlan = DEFAULT_PLAN) -> Backend:
    passes = CppPasses(plan)
    on_passes = _on_passes(passes, slice_ops=SLICE_OPS[:4], build=cpu_backend,
                           ce_with_grads=functools.partial(cpu.cpu_ce_with_grads, block_rows=plan.ce_row_block),
                           ce_with_grads_softcap=functools.partial(cpu.cpu_ce_with_grads_softcap,
                                                                   block_rows=plan.ce_row_block),
                           is_available=cpu.FAMILY.is_available, unavailable_reason=cpu.FAMILY.unavailable_reason)
    return dataclasses.replace(on_passes, linear_ce=_whole_head_op(cpu.FAMILY.linear_ce, on_passes.linear_ce),
                               rdrop=_whole_head_op(cpu.FAMILY.rdrop, on_passes.rdrop),
                               softmax_mean=_whole_head_op(cpu_ops.softmax_mean, on_passes.softmax_mean))


_TORCH = torch_backend()
_BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", reference_terms, reference_rdrop, reference_softmax_mean,
                         reference_sample_targets, linear_ce_softcap=reference_softcap_terms,
                         rdrop_softcap=reference_rdrop),
    "torch": _TORCH,
    "cpu": cpu_backend(),
    # The GPU path (docs/math.md 7.3): cuBLAS GEMMs per vocabulary chunk, Triton epilogues on CUDA (PyTorch ones on
    # other devices, where it is tested). Sampling and the softcapped head run the streamed PyTorch passes.
    "chunked": chunked_backend(),
    # The first GPU kernels: one program per (row block, vocabulary block), gradients summed with atomics. Kept
    # until a GPU run compares them with "chunked" (docs/gpu.md, "The GPU backend"). Its capped head, cross entropy
    # alone included, runs the streamed PyTorch passes.
    "triton": Backend("triton", triton_backend.FAMILY.linear_ce, triton_backend.FAMILY.rdrop, _TORCH.softmax_mean,
                      _TORCH.sample_targets, is_available=triton_backend.FAMILY.is_available,
                      unavailable_reason=triton_backend.FAMILY.unavailable_reason,
                      linear_ce_softcap=_TORCH.linear_ce_softcap, rdrop_softcap=_TORCH.rdrop_softcap,
                      ce_with_grads_softcap=_TORCH.ce_with_grads_softcap),
}


def get_backend(name: str) -> Backend:
    """The registered backend ``name`` (see :func:`available_backends`), e.g. to give it a block plan:
    ``get_backend("torch").with_plan(BlockPlan(row_block=256))``, passed as ``backend=``."""
    check_backend_name(name)
    if name == "auto":
        raise ValueError("backend: 'auto' is chosen per call; name a registered backend")
    return _BACKENDS[name]


# Fastest first, per device type; "auto" takes the first registered and available one. The one-pass "triton"
# backend is opt-in only: the one GPU run measured it 8.3x slower than naive PyTorch (docs/gpu.md, "The GPU backend").
_AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "torch"),
    "cuda": ("chunked", "torch"),
}
_AUTO_FALLBACK = ("torch",)
_warned_unavailable: set[str] = set()


def available_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def _usable(backend: Backend) -> bool:
    if backend.is_available():
        return True
    if backend.name not in _warned_unavailable:  # never fall back silently
        _warned_unavailable.add(backend.name)
        warnings.warn(f"dropreg: backend {backend.name!r} is unavailable, backend='auto' falls back to a slower one. "
                      f"Reason: {backend.unavailable_reason()}", RuntimeWarning, stacklevel=5)
    return False


def pick_auto(candidates, device: torch.device, *, softcap: bool = False, op: str = "linear_ce") -> Optional[Backend]:
    """The first of ``candidates`` (backends, fastest first) that is usable, deterministic on ``device`` when
    ``torch.use_deterministic_algorithms(True)`` is set and implements ``op`` on a softcapped head when ``softcap``;
    None if none is."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    for backend in candidates:
        if deterministic and not _deterministic_here(backend.name, device):
            continue
        if _supports(backend, softcap, op) and _usable(backend):
            return backend
    return None


# Backends whose results may vary from run to run on a device type: the Triton kernels add into grad_input and
# grad_weight with atomics on a GPU (the interpreter runs programs one after another, so CPU tensors are exempt).
_NONDETERMINISTIC: dict[str, tuple[str, ...]] = {"triton": ("cuda",)}


def _deterministic_here(name: str, device: torch.device) -> bool:
    return device.type not in _NONDETERMINISTIC.get(name, ())


def _supports(backend: Backend, softcap: bool, op: str) -> bool:
    return not softcap or getattr(backend, f"{op}_softcap") is not None


def check_backend_name(name) -> None:
    """``backend=``: "auto", a registered backend's name or a :class:`Backend` (whether it runs on a given device is
    resolve_backend's)."""
    if isinstance(name, Backend):
        return
    if not isinstance(name, str) or (name != "auto" and name not in _BACKENDS):
        raise ValueError(f"backend: expected 'auto' or one of {sorted(_BACKENDS)}, got {name!r}")


def resolve_backend(name, device: torch.device, *, softcap: bool = False,
                    op: str = "linear_ce") -> tuple[str, Backend]:
    """``(name, backend)`` for ``backend=name`` (a name or a :class:`Backend`); ``"auto"`` picks the fastest usable
    one for ``device`` (that implements ``op``, "linear_ce" or "rdrop", on a softcapped head, when ``softcap``).

    Under ``torch.use_deterministic_algorithms(True)``, ``"auto"`` skips backends that are not deterministic on
    ``device`` and naming one raises, as torch does for its own nondeterministic ops."""
    check_backend_name(name)
    deterministic = torch.are_deterministic_algorithms_enabled()
    if isinstance(name, Backend):
        backend, name = name, name.name
    elif name == "auto":
        preference = _AUTO_PREFERENCE.get(device.type, _AUTO_FALLBACK)
        backend = pick_auto([_BACKENDS[n] for n in preference if n in _BACKENDS], device, softcap=softcap, op=op)
        if backend is not None:
            return backend.name, backend
        name = _AUTO_FALLBACK[0]
        backend = _BACKENDS[name]
    else:
        backend = _BACKENDS[name]
    if not _supports(backend, softcap, op):
        supported = sorted(n for n, b in _BACKENDS.items() if _supports(b, True, op))
        raise ValueError(f"softcap: backend {name!r} does not implement a softcapped head yet; use backend='auto' or "
                         f"one of {supported}")
    if deterministic and not _deterministic_here(name, device):
        message = (f"backend: {name!r} is not deterministic on {device.type} tensors (its kernels accumulate "
                   f"gradients with atomic adds), and torch.use_deterministic_algorithms(True) is set; use "
                   f"backend='torch' or 'auto' (which then picks 'torch')")
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(message)
        warnings.warn(message, UserWarning, stacklevel=3)  # warn_only=True: as torch does for its own ops
    return name, backend


def chosen_backend(device="cpu", *, op: str = "linear_cross_entropy", softcap: bool = False,
                   sliced: bool = False) -> str:
    """The name of the backend that ``backend="auto"`` runs for ``op`` (a public function's name, e.g.
    ``"rdrop_linear_cross_entropy"``) on tensors of ``device``, here and now: it accounts for a failed C++ build,
    ``torch.use_deterministic_algorithms`` and, with ``softcap=True``, backends without a capped head;
    ``sliced=True``: for a vocabulary slice (``process_group=``). ``dropreg.chosen_backend("cuda")`` is
    ``"chunked"``."""
    if op not in SLICE_OPS:
        raise ValueError(f"op: expected one of {list(SLICE_OPS)}, got {op!r}")
    device = torch.device(device)
    if sliced:
        return resolve_slice_backend(op, "auto", device).name
    return resolve_backend("auto", device, softcap=softcap,
                           op="rdrop" if op == "rdrop_linear_cross_entropy" else "linear_ce")[0]


def resolve_slice_backend(op: str, name, device: torch.device) -> Backend:
    """The backend that does this rank's work on its vocabulary slice for the public ``op`` (one of
    :data:`SLICE_OPS`): ``"auto"`` is ``"chunked"`` for CUDA tensors (where it is the fast path) when it runs ``op``
    on a slice, else ``"torch"``."""
    check_backend_name(name)
    allowed = [n for n, b in _BACKENDS.items() if op in b.slice_ops]
    if name == "auto":
        return _BACKENDS["chunked" if device.type == "cuda" and "chunked" in allowed else "torch"]
    backend = name if isinstance(name, Backend) else _BACKENDS[name]
    if op not in backend.slice_ops:
        raise ValueError(f"backend: with process_group, {op} runs its local slice on {' or '.join(map(repr, allowed))} "
                         f"(or 'auto'); got {backend.name!r}")
    if backend.name == "cpu" and (device.type != "cpu" or not backend.is_available()):
        raise ValueError(f"backend: 'cpu' needs CPU tensors and the C++ kernels (reason: "
                         f"{backend.unavailable_reason() if device.type == 'cpu' else device})")
    return backend
