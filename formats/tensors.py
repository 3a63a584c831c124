"""Safe tensor-file reading: safetensors first, ``.bin`` only through ``torch.load(weights_only=True)``."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from adaptkit.errors import AdapterFormatError


def load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one ``.safetensors`` or ``.bin`` file, never unpickling arbitrary objects."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as exc:
        kind = "safetensors" if path.suffix == ".safetensors" else "weights-only torch"
        raise AdapterFormatError(
            f"{path}: not a readable {kind} file ({exc}); re-save the adapter or re-download the file"
        ) from exc
    except Exception as exc:  # pickle.UnpicklingError from weights_only refusing an object
        raise AdapterFormatError(
            f"{path}: refused to load ({type(exc).__name__}: {exc}); only plain tensor dicts are accepted"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterFormatError(f"{path}: expected a flat {{name: tensor}} dict")
    return state


def load_adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    """:func:`load_tensor_file` of an adapter's weights, each checked floating point and finite."""
    from adaptkit.formats.fields import check_tensor

    return {key: check_tensor(tensor, key, path) for key, tensor in load_tensor_file(path).items()}


def first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    """The first of ``names`` that exists in ``folder`` (so safetensors wins over .bin)."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None
