"""Human-readable facts about an adapter, and whether it fits a base (``adaptkit inspect``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from adaptkit.errors import AdaptkitError


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        nbytes /= 1024
    return f"{nbytes} B"


def describe_adapter(
    path: str | os.PathLike, base: str | os.PathLike | None = None, load: str | None = None, device: str = "cpu"
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
    if adapter.kind == "lora":
        from adaptkit.lora_stack import stacked_nbytes

        element = next(iter(adapter.layers.values())).lora_A.element_size() if adapter.layers else 4
        stacked, padding = stacked_nbytes(adapter, element)
        lines.append(f"resident for batched serving: {_size(stacked)} in the layers' stacks, of which "
                     f"{_size(padding)} rank padding (ranks pad to a power of two)")
    if base is None:
        return lines, True
    try:
        check_fits_checkpoint([adapter], base)
    except AdaptkitError as exc:
        lines.append(f"compatible with {base}: no ({exc})")
        return lines, False
    lines.append(f"compatible with {base}: yes")
    return lines + base_memory_lines(base, path, load, device), True


def base_memory_lines(base: str | os.PathLike, adapter: str | os.PathLike | None = None, load: str | None = None,
                      device: str = "cpu") -> list[str]:
    """The base's bytes in float32 / 16-bit / NF4 (QLoRA: LM head, embeddings, norms in 16-bit)."""
    sizes = base_memory(base)
    lines = [f"base memory: float32 {_size(sizes['float32'])}, 16-bit {_size(sizes['16-bit'])}, "
             f"NF4 {_size(sizes['nf4'])} (double quant; from shapes)"]
    if load is not None:
        quantize, dtype = (load, "bfloat16") if load == "nf4" else (None, load)
        got = measure_load(base, dtype=dtype, quantize=quantize, adapter=adapter, device=device)
        lines.append(f"loaded as {load} with the adapter: {_size(got['model_bytes'])} held, {got['load_s']:.2f} s, "
                     f"peak RSS {_size(got['peak_rss'])} (before loading {_size(got['peak_rss_before'])})")
    return lines


def adapter_details(adapter) -> dict:
    """Kind-specific facts (ranks, alpha, targets, ...) of a loaded adapter."""
    from adaptkit.kinds import details_of

    return details_of(adapter)


def check_fits_checkpoint(adapters: Sequence, base: str | os.PathLike) -> None:
    """Raise unless every adapter fits the base folder: recorded base, module names and shapes.

    The base is built on the meta device, so no weight is read (except a few embedding rows when an
    adapter records a base fingerprint).
    """
    from adaptkit.adapters.lora import LoraAdapter
    from adaptkit.base import check_made_for, checkpoint_fingerprint, meta_model, read_config
    from adaptkit.formats.checkpoint import open_checkpoint
    from adaptkit.inject import base_modules, check_lora_fits
    from adaptkit.measured import facts_of

    config = read_config(base)
    skeleton = meta_model(base)
    facts = facts_of(skeleton)
    fingerprint = None
    if any(getattr(a, "fingerprint", None) for a in adapters):
        fingerprint = checkpoint_fingerprint(open_checkpoint(base), config)
    modules = base_modules(skeleton)
    for adapter in adapters:
        check_made_for(adapter, facts, fingerprint)
        if isinstance(adapter, LoraAdapter):
            from adaptkit.adapters.peft_types import bind_base_layers, needs_base_layers

            if needs_base_layers(adapter):  # shapes only: the meta-device layers will do
                adapter = bind_base_layers(adapter, modules.get)
            check_lora_fits(modules, adapter, where=str(base))
        elif adapter.kind in ("prefix", "prompt"):
            from adaptkit.adapters.prefix import check_prefix_fits
            from adaptkit.adapters.prompt import check_prompt_fits

            (check_prefix_fits if adapter.kind == "prefix" else check_prompt_fits)(adapter, facts)


# ----------------------------------------------------------------------------- memory
def base_memory(base: str | os.PathLike, double_quant: bool = True, skip_modules: Sequence[str] | None = None) -> dict:
    """Bytes of ``base`` in float32, 16-bit and NF4 (+ compute-dtype modules), from shapes alone."""
    import torch

    from adaptkit import quant
    from adaptkit.base import meta_model, read_config

    read_config(base)
    skeleton = meta_model(base)
    return {
        "float32": quant.estimate_nbytes(skeleton, torch.float32),
        "16-bit": quant.estimate_nbytes(skeleton, torch.bfloat16),
        "nf4": quant.estimate_nbytes(skeleton, torch.bfloat16, "nf4", double_quant, skip_modules),
        "nf4_fp32_compute": quant.estimate_nbytes(skeleton, torch.float32, "nf4", double_quant, skip_modules),
    }


def measure_load(base: str | os.PathLike, dtype: str = "bfloat16", quantize: str | None = None,
                 adapter: str | os.PathLike | None = None, device: str = "cpu", **quantize_options) -> dict:
    """Load ``base`` (and ``adapter``) in this process: seconds, bytes held, peak RSS before and after.

    Peak RSS is the process's high-water mark (``getrusage``), so a fresh process measures one load.
    """
    import time

    from adaptkit import quant
    from adaptkit.engine import Engine

    before = peak_rss_bytes()
    start = time.perf_counter()
    engine = Engine.from_pretrained(base, dtype=dtype, quantize=quantize, device=device, **quantize_options)
    if adapter is not None:
        engine.add_adapter("adapter", adapter)
    seconds = time.perf_counter() - start
    return {"load_s": seconds, "model_bytes": quant.model_nbytes(engine.model),
            "peak_rss_before": before, "peak_rss": peak_rss_bytes()}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux/macOS).

    Linux: ``VmHWM`` of /proc/self/status. ``getrusage``'s ``ru_maxrss`` is not used there: a
    process started with fork + exec inherits its parent's peak (the kernel carries the pre-exec
    high-water mark over), so a benchmark worker would report the parent's RSS.
    """
    import platform
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024
