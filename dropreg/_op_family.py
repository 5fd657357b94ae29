"""The registered fused-op families, C++ (``dropreg::``) and Triton (``dropreg_triton::``): one backend wrapper
(:class:`OpFamily`: loading, availability, the dispatch functions) and one autograd registration for both.

Both families have the same schemas (csrc/dropreg.cpp):

* ``linear_ce_forward(input, weight, bias?, target, signs?, int seed, bool need_explicit, bool need_implicit)
  -> (ce, quadratic, sign_term, lse, mu, var)`` and ``linear_ce_backward(grad_ce, grad_quadratic, grad_sign_term,
  grad_mu?, input, ..., bool[3] output_mask)``;
* ``rdrop_forward(input1, input2, weight, bias?, target) -> (ce1, ce2, kl, lse, expected_d)`` and
  ``rdrop_backward(..., bool[4] output_mask)``.

lse, var and expected_d are saved statistics, not differentiable outputs: their gradients are ignored. mu is
differentiable (``grad_mu``): z_loss's terms depend on it (docs/math.md 3.5).
Backward ops return an empty tensor for every gradient that ``output_mask`` switches off.

Names used for docs/math.md's quantities in every backend (Python, Triton, C++), per row n:

* ``s`` / ``probs``: softmax(z); ``lse``: logsumexp(z); ``mass``: sum_v s_v as rounded for a dot.
* ``mu = W^T s`` (d), ``m2 = (W*W)^T s`` (d), ``var = m2 - mu*mu`` (d).
* ``q = h*h``, ``u = sigma*h`` (sigma: ``signs``), ``g_ce``, ``g_r = gR' = gR c_R``, ``g_i = gI' = gI c_I``.
* ``g_r_q = gR' q``, ``g_i_u = gI' u``, ``T_vec = T = gI' u - 2 gR' q mu`` (d).
* ``T_stack = [T | gR' q]`` (2d; T alone without the explicit term).
* ``t = T W^T + gR' q (W*W)^T``: the row-varying part of gR' r_v + gI' a_v (one value per vocabulary entry).
* ``row_const = g_ce + gR' q.(mu^2 - var) - gI' mu.u``: the rest, constant along the row, so that the logit
  gradient is ``G = s * (row_const + t) - g_ce [v = y]``.
* ``st_T_stack = S^T [T | gR' q]`` (per vocabulary entry, 2d): grad_W's modulation terms.
* R-Drop: ``D = z1 - z2``, ``expected_d = E_p[D]`` per pass.
* A softcapped head (docs/math.md 3.6): ``softcap``; per logit ``c = dz/draw``, ``z2``, ``z3`` (higher
  derivatives), ``phi = c^2 + z2``, ``psi = c phi + 2 c z2 + z3``; per row ``M1 = E_s[c W]`` (in mu's place),
  ``M2 = E_s[phi W*W]``, ``Q = gR' q`` (the capped ``g_r_q``), ``amount`` (what G loses at the target).
* Label smoothing on a capped head (3.7): ``omega = (eps / V) w`` per class, ``S = sum_v omega_v z_v`` per row
  (``smoothing_sum``).
* A vocabulary slice: ``owned`` (per row, whether the slice holds the row's class), ``safe`` (the class's index in
  the slice, 0 where not owned), ``picked`` (per-row values only the owning slice gives, summed over slices).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from ._policy import accumulation_dtype


def int64_seed(seed: int) -> int:
    """The schemas' int is int64; the stream's key is the same 64 bits read as unsigned."""
    return seed - 2**64 if seed >= 2**63 else seed


def uint64_seed(seed: int) -> int:
    return seed % 2**64


class BackendUnavailable(RuntimeError):
    """An op family that cannot run in this process (build failed, package or device missing)."""


def _no_requirement_missing() -> Optional[BaseException]:
    return None


def _any_device(tensor: torch.Tensor) -> None:
    return None


class OpFamily:
    """One family of registered ops, ``torch.ops.<namespace>.*``, as a backend of dropreg/_dispatch.py.

    ``load()`` makes the ops callable (a JIT build, a lazy import) or raises :class:`BackendUnavailable`
    with the underlying error as its cause; a failure is remembered and re-raised, never retried.
    ``missing_requirement()`` returns why the family cannot run in this process at all (e.g. no device), or
    None. ``check_device(tensor)`` raises ValueError, naming the argument, for tensors it cannot run on.
    ``contiguous_operands``: whether input and weight are made contiguous here (the Triton ops take strided
    operands and copy only what tensor descriptors cannot read).
    """

    def __init__(self, namespace: str, load: Callable[[], None], *,
                 missing_requirement: Callable[[], Optional[BaseException]] = _no_requirement_missing,
                 check_device: Callable[[torch.Tensor], None] = _any_device, contiguous_operands: bool = True):
        self.namespace = namespace
        self._load = load
        self._missing_requirement = missing_requirement
        self._check_device = check_device
        self._contiguous_operands = contiguous_operands
        self._loaded = False
        self._failure: Optional[BackendUnavailable] = None

    def load(self) -> None:
        if self._loaded:
            return
        if self._failure is not None:
            raise BackendUnavailable(str(self._failure)) from self._failure.__cause__
        try:
            self._load()
        except BackendUnavailable as failure:
            self._failure = failure
            raise
        self._loaded = True

    def is_available(self) -> bool:
        if self._missing_requirement() is not None:
            return False
        try:
            self.load()
        except BackendUnavailable:
            return False
        return True

    def unavailable_reason(self) -> Optional[BaseException]:
        if self._failure is not None:
            return self._failure.__cause__ or self._failure
        return self._missing_requirement()

    def _ops(self):
        return getattr(torch.ops, self.namespace)

    def _operand(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.contiguous() if self._contiguous_operands else tensor

    def linear_ce(self, input, weight, bias, target, signs, seed, need_explicit, need_implicit):
        """Per-row ``(ce, quadratic, sign_term, mu)`` from ``linear_ce_forward`` (see dropreg/_dispatch.py)."""
        self._check_device(input)
        self.load()
        if signs is not None:
            signs = signs.to(accumulation_dtype(input.dtype)).contiguous()
        out = self._ops().linear_ce_forward(
            self._operand(input), self._operand(weight), None if bias is None else bias.contiguous(),
            target.contiguous(), signs, int64_seed(seed), need_explicit, need_implicit)
        return out[0], out[1], out[2], (out[4] if need_explicit or need_implicit else None)

    def rdrop(self, input1, input2, weight, bias, target):
        """Per-row ``(ce1, ce2, kl)`` from ``rdrop_forward`` (see dropreg/_dispatch.py)."""
        self._check_device(input1)
        self.load()
        out = self._ops().rdrop_forward(self._operand(input1), self._operand(input2), self._operand(weight),
                                        None if bias is None else bias.contiguous(), target.contiguous())
        return out[0], out[1], out[2]


CE_AND_Z_LOSS_MESSAGE = ("dropreg: cross entropy and z_loss were fused in the CE-only path, which keeps the "
                         "gradient of their sum only: back-propagate them with equal weights (out.loss), or pass "
                         "return_lse=True to take the per-row path")


def combined_upstream(grad_loss, has_z):
    """The one scalar that scales the CE-only path's saved gradients: the upstream of ``[ce, z_loss]``'s first
    part, which must equal the second's when a z-loss was fused in (checked without a host sync)."""
    if has_z:
        torch._assert_async(grad_loss[0] == grad_loss[1], CE_AND_Z_LOSS_MESSAGE)
    return grad_loss[0]


def gradients_wanted(*tensors) -> tuple[bool, ...]:
    """Which of ``tensors`` (None allowed) a backward will ask a gradient of, as decided now, in the forward."""
    enabled = torch.is_grad_enabled()
    return tuple(enabled and t is not None and t.requires_grad for t in tensors)


DOUBLE_BACKWARD_MESSAGE = ("double backward through dropreg's fused ops is not implemented; for Hessian-vector "
                           "products use dropreg.diagnostics (finite differences of fused gradients) or "
                           "backend='reference'")


def first_order_only(backward):
    """Decorates an autograd.Function's hand-written backward: it runs without recording a graph and, when the
    caller asked for one (``create_graph=True``), its results carry a node that raises if differentiated.
    Unlike ``once_differentiable``, this holds even when the upstream gradients do not require grad, so a
    second derivative is never silently missing a term."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            results = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return results
        results = results if isinstance(results, tuple) else (results,)
        refuse = torch._C._functions.DelayedError(f"dropreg: {DOUBLE_BACKWARD_MESSAGE}".encode(), len(results))
        # The refusing node must lie on the path to the Function's inputs, or autograd would prune it: link
        # each result to them through a zero.
        linked = [t for t in ctx.saved_tensors if t is not None and t.requires_grad]
        link = sum((t.reshape(-1)[:1].sum() * 0 for t in linked), torch.zeros(()))

        def differentiable_alias(result):
            if result is None:
                return None
            alias = result.detach() + link.to(result.dtype)
            return alias if alias.requires_grad else alias.requires_grad_(True)

        return refuse(*[differentiable_alias(r) for r in results])
    return wrapper


def refuse_double_backward(backward_op: str) -> None:
    """Differentiating a fused op's backward (a Hessian-vector product, a gradient penalty) is not implemented:
    without an autograd kernel torch would silently return zeros, so the backward op gets one that raises."""
    def backward(ctx, *grads):
        raise RuntimeError(f"{backward_op}: {DOUBLE_BACKWARD_MESSAGE}")

    torch.library.register_autograd(backward_op, backward)


def register_linear_ce_autograd(forward_op: str, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        input, weight, bias, target, signs, seed, need_explicit, need_implicit = inputs
        _, _, _, lse, mu, var = output
        ctx.save_for_backward(input, weight, bias, target, signs, lse, mu, var)
        ctx.options = (seed, need_explicit, need_implicit, bias is not None)

    def backward(ctx, grad_ce, grad_quadratic, grad_sign_term, _grad_lse, grad_mu, _grad_var):
        input, weight, bias, target, signs, lse, mu, var = ctx.saved_tensors
        seed, need_explicit, need_implicit, has_bias = ctx.options
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
        grads = [torch.zeros_like(lse) if g is None else g.contiguous()
                 for g in (grad_ce, grad_quadratic, grad_sign_term)]
        if grad_mu is not None and (grad_mu.numel() == 0 or not (need_explicit or need_implicit)):
            grad_mu = None
        grad_mu = None if grad_mu is None else grad_mu.contiguous()
        grad_h, grad_w, grad_b = backward_op(*grads, grad_mu, input, weight, bias, target, signs, seed, lse, mu, var,
                                             need_explicit, need_implicit, mask)
        return (grad_h if mask[0] else None, grad_w if mask[1] else None, grad_b if mask[2] else None,
                None, None, None, None, None)

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
    refuse_double_backward(forward_op.replace("_forward", "_backward"))


def register_rdrop_autograd(forward_op: str, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        input1, input2, weight, bias, target = inputs
        ctx.save_for_backward(input1, input2, weight, bias, target, output[3], output[4])
        ctx.has_bias = bias is not None

    def backward(ctx, grad_ce1, grad_ce2, grad_kl, _grad_lse, _grad_expected):
        input1, input2, weight, bias, target, lse, expected_d = ctx.saved_tensors
        mask = [*ctx.needs_input_grad[:3], ctx.has_bias and ctx.needs_input_grad[3]]
        grads = [torch.zeros_like(lse[0]) if g is None else g.contiguous() for g in (grad_ce1, grad_ce2, grad_kl)]
        out = backward_op(*grads, input1, input2, weight, bias, target, lse, expected_d, mask)
        return (*(g if wanted else None for g, wanted in zip(out, mask)), None)

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
    refuse_double_backward(forward_op.replace("_forward", "_backward"))
