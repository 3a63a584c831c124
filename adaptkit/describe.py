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


def describe_adapter(
    path: str | os.PathLike, base: str | os.PathLike | None = None, load: str | None = None
) -> tuple[list[str], bool]:
    """Lines describing the adapter at ``path``; with ``base``, whether it fits (False = it does not).

    With ``base``, also the base's bytes in 32-bit, 16-bit and NF4 (from shapes); ``load``
    (``nf4``, ``bfloat16``, ``float32``) loads it that way with the adapter and adds measured bytes
    and the process's peak RSS.
    """
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
    return lines + base_memory_lines(base, path, load), True


def base_memory_lines(base: str | os.PathLike, adapter: str | os.PathLike | None = None, load: str | None = None) -> list[str]:
    """The base's bytes in float32 / 16-bit / NF4 (QLoRA: LM head, embeddings, norms in 16-bit)."""
    from adaptkit.qlora import base_memory, measure_load

    sizes = base_memory(base)
    lines = [f"base memory: float32 {_size(sizes['float32'])}, 16-bit {_size(sizes['16-bit'])}, "
             f"NF4 {_size(sizes['nf4'])} (double quant; from shapes)"]
    if load is not None:
        quantize, dtype = (load, "bfloat16") if load == "nf4" else (None, load)
        got = measure_load(base, dtype=dtype, quantize=quantize, adapter=adapter)
        lines.append(f"loaded as {load} with the adapter: {_size(got['model_bytes'])} held, {got['load_s']:.2f} s, "
                     f"peak RSS {_size(got['peak_rss'])} (before loading {_size(got['peak_rss_before'])})")
    return lines


def adapter_details(adapter) -> dict:
    """Kind-specific facts (ranks, alpha, targets, ...) of a loaded adapter."""
    from adaptkit.engine import details_of

    return details_of(adapter)


def check_fits_base(adapter, base: str | os.PathLike) -> None:
    """Raise unless ``adapter`` fits the base folder (built on the meta device: no weights read)."""
    from adaptkit.merge import check_fits_checkpoint

    check_fits_checkpoint([adapter], base)
