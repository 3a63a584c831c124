"""Human-readable facts about an adapter, and whether it fits a base (``adaptkit inspect``)."""

from __future__ import annotations

import os

from adaptkit.errors import AdaptkitError


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        nbytes /= 1024
    return f"{nbytes} B"


def describe_adapter(path: str | os.PathLike, base: str | os.PathLike | None = None) -> tuple[list[str], bool]:
    """Lines describing the adapter at ``path``; with ``base``, whether it fits (False = it does not)."""
    from adaptkit.formats.detect import read_adapter

    adapter = read_adapter(path)
    lines = [f"adapter: {path}", f"kind: {adapter.kind}"]
    lines += [f"{key}: {value}" for key, value in adapter_details(adapter).items()]
    lines += [f"parameters: {adapter.parameter_count:,}", f"size: {_size(adapter.nbytes)}"]
    if base is None:
        return lines, True
    try:
        check_fits_base(adapter, base)
    except AdaptkitError as exc:
        lines.append(f"compatible with {base}: no ({exc})")
        return lines, False
    lines.append(f"compatible with {base}: yes")
    return lines, True


def adapter_details(adapter) -> dict:
    """Kind-specific facts (ranks, alpha, targets, ...) of a loaded adapter."""
    from adaptkit.engine import details_of

    return details_of(adapter)


def check_fits_base(adapter, base: str | os.PathLike) -> None:
    """Raise unless ``adapter`` fits the base folder (built on the meta device: no weights read)."""
    from adaptkit.arch import facts_from_config
    from adaptkit.base import check_made_for, meta_model, read_config
    from adaptkit.formats.checkpoint import open_checkpoint
    from adaptkit.inject import base_modules, check_lora_fits
    from adaptkit.merge import checkpoint_fingerprint

    config = read_config(base)
    facts = facts_from_config(config)
    fingerprint = checkpoint_fingerprint(open_checkpoint(base), config) if adapter.fingerprint else None
    check_made_for(adapter, facts, fingerprint)
    if adapter.kind == "lora":
        check_lora_fits(base_modules(meta_model(base)), adapter, where=str(base))
