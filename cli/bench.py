"""``adaptkit bench``: the latency and memory each adapter adds to a base."""

from __future__ import annotations

import click

from adaptkit.cli.options import nf4_option, quiet_option


def _bench_adapters(values) -> list[str]:
    """``--adapters`` values: comma-separated NAME=PATH or PATH items; a value naming an existing
    path is taken whole (AdapterHub fusion folders are named ``a,b``)."""
    from pathlib import Path

    items = []
    for value in values:
        whole = value.partition("=")[2] if "=" in value else value
        if Path(value).exists() or Path(whole).exists():
            items.append(value)
        else:
            items += [v.strip() for v in value.split(",") if v.strip()]
    return items


@click.command()
@click.argument("base", type=click.Path())
@click.option("--adapters", "adapter_values", multiple=True,
              help="Adapters to measure: comma-separated NAME=PATH or PATH (repeatable). A fusion needs its adapters too.")
@click.option("--batch", default="1,8", show_default=True, help="Comma-separated batch sizes.")
@click.option("--prompt-len", default=128, show_default=True, help="Prompt tokens per row.")
@click.option("--new-tokens", default=32, show_default=True, help="Tokens generated per row (>= 2).")
@nf4_option
@click.option("--dtype", default="float32", show_default=True,
              help="float32, float16, bfloat16 or auto (the checkpoint's); the compute dtype with NF4.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--repeats", default=10, show_default=True, help="Timed rounds (every case once per round).")
@click.option("--warmup", default=2, show_default=True, help="Untimed rounds first.")
@click.option("--threads", default=None, type=int, help="torch CPU threads (default: as set); 1 is steadiest on a busy machine.")
@click.option("--json", "json_path", default=None, type=click.Path(), help="Write the record (every raw sample) here.")
@click.option("--plot", "plot_path", default=None, type=click.Path(), help="Write a PNG bar chart of added latency here.")
@quiet_option
@click.option("--compare", type=click.Choice(["peft"]), default=None, help="Also run the cases PEFT has through PEFT.")
def bench(base, adapter_values, batch, prompt_len, new_tokens, quantize, dtype, device, repeats, warmup, threads,
          json_path, plot_path, compare, quiet):
    """The latency each adapter adds to BASE: prefill, decode, tokens/s, memory, load and switch time.

    \b
    adaptkit bench BASE --adapters sql=adapters/sql,adapters/prefix --batch 1,8 --json bench.json --plot bench.png
    """
    import adaptkit as ak

    try:
        sizes = [int(b) for b in batch.split(",") if b.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"{batch!r}: expected comma-separated integers like 1,8", param_hint="--batch") from exc
    result = ak.bench(base, _bench_adapters(adapter_values), batch=sizes, prompt_len=prompt_len, new_tokens=new_tokens,
                      quantize=quantize, repeats=repeats, warmup=warmup, dtype=dtype, device=device, compare=compare,
                      json_path=json_path, plot_path=plot_path, threads=threads, progress=not quiet)
    click.echo(result.table())
    for label, path in (("record", result.json_path), ("plot", result.plot_path)):
        if path is not None:
            click.echo(f"wrote {label} {path}")
