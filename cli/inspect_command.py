"""``adaptkit inspect``: what an adapter holds, and whether it fits a base."""

from __future__ import annotations

import sys

import click

from adaptkit.cli.options import device_option


@click.command()
@click.argument("adapter", type=click.Path())
@click.option("--base", default=None, type=click.Path(), help="Check compatibility with this base model folder.")
@click.option("--load", type=click.Choice(["nf4", "bfloat16", "float32"]), default=None,
              help="With --base: load it this way with ADAPTER; print bytes held and peak RSS.")
@device_option
def inspect(adapter, base, load, device):
    """Kind, ranks, targets, parameter count and size of ADAPTER (and whether it fits BASE)."""
    from adaptkit.describe import describe_adapter

    if load is not None and base is None:
        raise click.UsageError("--load needs --base")
    lines, compatible = describe_adapter(adapter, base, load=load, device=device)
    for line in lines:
        click.echo(line)
    if not compatible:
        sys.exit(1)
