"""What several commands share: option value parsers and the click options whose help text is the same."""

from __future__ import annotations

import click

# Only options declared identically (help text included) in several commands live here: where a command's
# help says something of its own (merge's --device, train's --force, ...), it keeps its own @click.option.
force_option = click.option("--force", is_flag=True, help="Replace OUT if it exists.")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
device_option = click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
dtype_option = click.option("--dtype", default="float32", show_default=True,
                            help="float32, bfloat16, float16 or auto (the checkpoint's).")
nf4_option = click.option("--quantize", type=click.Choice(["nf4"]), default=None, help="Load BASE in 4-bit NF4 (QLoRA).")


def _float_list(value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: expected comma-separated numbers like 0.7,0.3") from exc


def _named_paths(values) -> list[tuple[str, str]]:
    """``name=path`` or bare ``path`` (name = folder name) -> [(name, path)]."""
    from pathlib import Path

    pairs = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            name, sep, path = item.partition("=")
            if not sep:
                name, path = Path(item).name, item
            pairs.append((name, path))
    return pairs

