"""Numerical policy shared by every backend (docs/math.md, "Numerics"): one definition, imported everywhere."""
from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Every backend accumulates in fp32 whatever the input dtype, or in fp64 when the inputs are fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32
