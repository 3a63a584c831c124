"""adaptkit's prefix-cache file: the K/V a prefix or prompt adapter puts in every layer, in one safetensors file.

Written by ``adaptkit export prefix-cache``; the engine loads it directly as a prefix adapter::

    keys, values        [L, H_kv, P, D] each
    metadata            format, base_fingerprint, base_class, method, num_layers, num_kv_heads,
                        head_dim, num_virtual_tokens (all strings, as safetensors stores them)

A prompt's cache (``method = prompt_cache``) holds K/V computed on one base: it only loads there.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from adaptkit.adapters.prefix import PrefixAdapter, PrefixConfig
from adaptkit.errors import AdapterFormatError
from adaptkit.formats.checkpoint import atomic_output_file
from adaptkit.formats.fields import check_tensor

FORMAT = "adaptkit-prefix-cache"
VERSION = "1"
TENSOR_KEYS = ("keys", "values")
_SIZES = ("num_virtual_tokens", "num_layers", "num_kv_heads", "head_dim")


def is_prefix_file(path: Path) -> bool:
    """A single ``.safetensors`` file (not a folder): the only adapter adaptkit stores as one file."""
    return path.is_file() and path.suffix == ".safetensors"


def read_prefix_file(path: str | os.PathLike) -> PrefixAdapter:
    """Read a prefix-cache file into a :class:`PrefixAdapter` (tensors on CPU, as stored)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = handle.metadata() or {}
            names = set(handle.keys())
            tensors = {k: check_tensor(handle.get_tensor(k), k, path) for k in TENSOR_KEYS if k in names}
    except (SafetensorError, OSError) as exc:
        raise AdapterFormatError(f"{path}: not a readable safetensors file ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise AdapterFormatError(
            f"{path}: metadata format is {meta.get('format')!r}, not {FORMAT!r}; a single .safetensors adapter must "
            "be written by `adaptkit export prefix-cache` (PEFT adapters are folders)"
        )
    if meta.get("version") != VERSION:
        raise AdapterFormatError(f"{path}: prefix-cache version {meta.get('version')!r}; this adaptkit reads {VERSION}")
    missing = [k for k in TENSOR_KEYS if k not in tensors]
    if missing or names - set(TENSOR_KEYS):
        raise AdapterFormatError(
            f"{path}: expected exactly the tensors {list(TENSOR_KEYS)}, found {sorted(names)}"
        )
    try:
        sizes = {k: int(meta[k]) for k in _SIZES}
    except (KeyError, ValueError) as exc:
        raise AdapterFormatError(f"{path}: metadata {exc} is missing or not an integer") from exc
    config = PrefixConfig(**sizes, method=meta.get("method", "p_tuning_v2"))
    expected = (config.num_layers, config.num_kv_heads, config.num_virtual_tokens, config.head_dim)
    for key in TENSOR_KEYS:
        if tuple(tensors[key].shape) != expected:
            raise AdapterFormatError(
                f"{path}: {key} has shape {tuple(tensors[key].shape)}, but its metadata says "
                f"[layers, kv heads, virtual tokens, head_dim] = {list(expected)}"
            )
    return PrefixAdapter(
        config=config,
        keys=tensors["keys"],
        values=tensors["values"],
        fingerprint=meta.get("base_fingerprint") or None,
        source=str(path),
        base_class=meta.get("base_class") or None,
    )


def write_prefix_file(adapter: PrefixAdapter, path: str | os.PathLike, force: bool = False) -> Path:
    """Write ``adapter``'s K/V and sizes to ``path`` atomically (a temporary file, then a rename)."""
    path = Path(path)
    cfg = adapter.config
    meta = {"format": FORMAT, "version": VERSION, "method": cfg.method,
            "base_fingerprint": adapter.fingerprint or "", "base_class": adapter.base_class or ""}
    meta.update({k: str(getattr(cfg, k)) for k in _SIZES})
    tensors = {"keys": adapter.keys.detach().contiguous().cpu(), "values": adapter.values.detach().contiguous().cpu()}
    with atomic_output_file(path, force=force) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path
