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
    from adaptkit.merge import check_fits_checkpoint

    check_fits_checkpoint([adapter], base)
