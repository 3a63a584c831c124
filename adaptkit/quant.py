"""4-bit NF4 bases through bitsandbytes: the only module that imports bitsandbytes."""

from __future__ import annotations

import torch
from torch import nn


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear layer."""
    return type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4")


def from_pretrained_kwargs(quantize: str, compute_dtype: torch.dtype, **options) -> dict:
    from adaptkit.errors import UnsupportedAdapterError

    raise UnsupportedAdapterError(f"quantize={quantize!r} is not available yet")


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    raise NotImplementedError


def snapshot(module: nn.Module):
    raise NotImplementedError


def replace_weight(module: nn.Module, weight: torch.Tensor) -> None:
    raise NotImplementedError


def restore(module: nn.Module, snapshot) -> None:
    raise NotImplementedError
