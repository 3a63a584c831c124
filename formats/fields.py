"""Typed reads of config fields and checks of stored tensors, shared by every format's reader.

Each check names the file, the key, what was expected and the value found, so a bad adapter is one
clear :class:`AdapterFormatError` instead of a traceback (or, worse, a silently different adapter).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from adaptkit.errors import AdapterFormatError

MAX_RANK = 65536  # far beyond any published adapter; a larger r is a corrupt config


def _bad(path: Path | str, key: str, expected: str, value) -> AdapterFormatError:
    return AdapterFormatError(f"{path}: {key} must be {expected}, got {value!r}; fix the config or re-save the adapter")


def get_int(config: Mapping, key: str, path: Path | str, default=None, minimum: int = 1, maximum: int = MAX_RANK) -> int:
    """An integer field within [minimum, maximum] (a bool or float is not an integer here)."""
    value = config.get(key, default)
    if value is None:
        raise AdapterFormatError(f"{path}: {key} is missing; the adapter's config must give it")
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise _bad(path, key, f"an integer in [{minimum}, {maximum}]", value)
    return value


def get_float(config: Mapping, key: str, path: Path | str, default=None) -> float:
    """A finite number field."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(path, key, "a finite number", value)
    return float(value)


def get_bool(config: Mapping, key: str, path: Path, default: bool = False) -> bool:
    """A true/false field (the string "false" is not false by accident: it is refused)."""
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(path, key, "true or false", value)
    return value


def get_names(config: Mapping, key: str, path: Path, allow_regex: bool = False) -> tuple[str, ...] | str | None:
    """A list of names (or, with ``allow_regex``, one string); None when absent."""
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        if allow_regex:
            return value
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _bad(path, key, "a list of names" + (" or a regex string" if allow_regex else ""), value)
    return tuple(value)


def get_ints(config: Mapping, key: str, path: Path) -> tuple[int, ...] | None:
    """A list of non-negative integers (one integer is a list of one); None when absent or empty."""
    value = config.get(key)
    if value is None or value == []:
        return None
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                         for v in items):
        raise _bad(path, key, "a list of layer indices (integers >= 0)", value)
    return tuple(items)


def get_pattern(config: Mapping, key: str, path: Path, integer: bool) -> dict:
    """``rank_pattern`` / ``alpha_pattern``: {module pattern: value}."""
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise _bad(path, key, "an object {module pattern: value}", value)
    for pattern in value:
        (get_int if integer else get_float)(value, pattern, f"{path}: {key}")
    return dict(value)


def check_tensor(tensor: torch.Tensor, name: str, path: Path) -> torch.Tensor:
    """A stored adapter tensor must be floating point and finite (NaN/inf weights compute garbage)."""
    if not tensor.is_floating_point():
        raise AdapterFormatError(f"{path}: {name} is stored as {tensor.dtype}; adapter weights must be floating point "
                                 "(the file is corrupt or was written by something else)")
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise AdapterFormatError(f"{path}: {name} holds {bad} non-finite values (NaN or inf); the adapter is broken "
                                 "(a diverged training run?) and would compute NaN logits")
    return tensor
