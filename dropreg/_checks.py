"""Argument checks shared by the public functions: each raises a TypeError or ValueError that names the argument
and says what was expected (never a crash deeper down, never silent garbage)."""
from __future__ import annotations

import math
import numbers
import sys
from typing import Optional

import torch
from torch import Tensor

from .signs import draw_seed


REDUCTIONS = ("mean", "sum", "none")


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def checking_values() -> bool:
    # Value checks read tensor data (a host sync); they cannot run inside a torch.compile graph.
    return not torch.compiler.is_compiling()


def is_dtensor(value) -> bool:
    # No DTensor can exist unless its module was imported: skip the import otherwise.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and not torch.compiler.is_compiling() and isinstance(value, module.DTensor)


def check_not_dtensor(name: str, value) -> None:
    if is_dtensor(value):
        raise TypeError(f"{name}: DTensor inputs are not supported yet; pass this rank's local tensor "
                        f"({name}.to_local()) and, for a head sharded over the vocabulary, process_group= "
                        f"(docs/vocab_parallel.md)")


def check_float_tensor(name: str, value, ndim: Optional[int] = None) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    check_not_dtensor(name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), got dtype {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(value.shape)}")


def check_same_device_and_dtype(input: Tensor, others: dict, input_name: str = "input") -> None:
    for name, value in others.items():
        if value is None:
            continue
        if value.device != input.device:
            raise ValueError(f"{name}: expected a tensor on {input_name}'s device {input.device}, "
                             f"got device {value.device}")
        if value.dtype != input.dtype:
            raise TypeError(f"{name}: expected {input_name}'s dtype {input.dtype}, got dtype {value.dtype}")


def check_head(input, linear_weight, linear_bias, name: str = "input") -> tuple[int, int]:
    check_float_tensor(name, input)
    if input.dim() < 1:
        raise ValueError(f"{name}: expected shape (..., d), got a 0-D tensor")
    check_float_tensor("linear_weight", linear_weight, ndim=2)
    vocab, dim = linear_weight.shape
    if vocab < 1 or dim < 1:
        raise ValueError(f"linear_weight: expected shape (V, d) with V >= 1 and d >= 1, "
                         f"got {tuple(linear_weight.shape)}")
    if input.shape[-1] != dim:
        raise ValueError(f"{name}: expected last dimension d={dim} to match linear_weight of shape "
                         f"{tuple(linear_weight.shape)}, got {name} shape {tuple(input.shape)}")
    if linear_bias is not None:
        check_float_tensor("linear_bias", linear_bias)
        if tuple(linear_bias.shape) != (vocab,):
            raise ValueError(f"linear_bias: expected shape ({vocab},) to match linear_weight, "
                             f"got {tuple(linear_bias.shape)}")
    check_same_device_and_dtype(input, {"linear_weight": linear_weight, "linear_bias": linear_bias}, name)
    return vocab, dim


def check_same_shape_device_dtype(name: str, value, reference_name: str, reference: Tensor) -> None:
    check_float_tensor(name, value)
    if value.shape != reference.shape:
        raise ValueError(f"{name}: expected {reference_name}'s shape {tuple(reference.shape)}, "
                         f"got {tuple(value.shape)}")
    check_same_device_and_dtype(reference, {name: value}, reference_name)


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")


def check_target(target, input: Tensor, vocab: int, ignore_index: int, input_name: str = "input") -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"target: expected a torch.Tensor, got {type(target).__name__}")
    check_not_dtensor("target", target)
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target: expected a tensor of class indices of an integer dtype (int64, int32, uint8, ...), "
                        f"got dtype {target.dtype}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target: expected shape {tuple(input.shape[:-1])} ({input_name}.shape[:-1]), "
                         f"got {tuple(target.shape)}")
    if target.device != input.device:
        raise ValueError(f"target: expected a tensor on {input_name}'s device {input.device}, got {target.device}")
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index: expected an int64 value (target's class indices), got {ignore_index}")
    if vocab is not None and checking_values() and target.numel():  # None: the ranks check the range together
        bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
        if bool(bad.any()):
            raise ValueError(f"target: expected class indices in [0, {vocab}) or ignore_index={ignore_index}, "
                             f"got {int(target[bad][0])}")


def check_probability(p, name: str = "p") -> float:
    if not isinstance(p, numbers.Real) or isinstance(p, bool):
        raise TypeError(f"{name}: expected a float in [0, 1), got {p!r}")
    if not (0.0 <= float(p) < 1.0):
        raise ValueError(f"{name}: expected a drop probability in [0, 1), got {p!r}")
    return float(p)


def check_coefficient(name: str, value, default: float) -> float:
    if value is None:
        return default
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a non-negative float or None, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}: expected a finite, non-negative float, got {value!r}")
    return float(value)


def check_softcap(softcap) -> Optional[float]:
    if softcap is None:
        return None
    if not isinstance(softcap, numbers.Real) or isinstance(softcap, bool):
        raise TypeError(f"softcap: expected a positive float or None, got {softcap!r}")
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap: expected a finite, positive float or None, got {softcap!r}")
    if not SOFTCAP_RANGE[0] <= softcap <= SOFTCAP_RANGE[1]:  # the kernels compute the cap in fp32
        raise ValueError(f"softcap: expected a value in fp32's normal range [{SOFTCAP_RANGE[0]:.3g}, "
                         f"{SOFTCAP_RANGE[1]:.3g}], got {softcap!r}")
    return float(softcap)


SOFTCAP_RANGE = (torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max)


def check_seed(seed) -> int:
    if seed is None:
        return draw_seed()
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"seed: expected an int in [0, 2**64) or None, got {seed!r}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed: expected an int in [0, 2**64), got {seed}")
    return int(seed)


def checked_seed(seed, needed: bool) -> int:
    """The seed a call uses: checked whenever given (also where nothing is drawn), drawn from torch's generator
    when needed and not given, 0 when not needed."""
    if seed is not None or needed:
        seed = check_seed(seed)
    return seed if needed else 0


def check_signs_type(signs) -> None:
    if not isinstance(signs, Tensor):
        raise TypeError(f"signs: expected a torch.Tensor of +-1 or None, got {type(signs).__name__}")


def flatten_signs(signs, input: Tensor) -> Tensor:
    check_signs_type(signs)
    if signs.device != input.device:
        raise ValueError(f"signs: expected a tensor on input's device {input.device}, got {signs.device}")
    if signs.dtype == torch.bool or signs.dtype.is_complex:
        raise TypeError(f"signs: expected a real tensor of +-1 values, got dtype {signs.dtype}")
    try:
        expanded = signs.expand(input.shape)
    except RuntimeError:
        raise ValueError(f"signs: expected a shape broadcastable to input's {tuple(input.shape)}, "
                         f"got {tuple(signs.shape)}") from None
    if checking_values() and signs.numel() and not bool(((signs == 1) | (signs == -1)).all()):
        raise ValueError("signs: expected every value to be +1 or -1")
    return expanded.reshape(-1, input.shape[-1])


def default_coefficients(p: float) -> tuple[float, float]:
    """docs/math.md's defaults: ``explicit_coef = p / (2 (1-p))`` and ``implicit_coef = sqrt(p / (1-p))``."""
    p = check_probability(p)
    kappa = p / (1.0 - p)
    return kappa / 2.0, math.sqrt(kappa)
