"""``adaptkit`` command line: thin parse -> validate -> run over the public API.

Heavy imports (torch, transformers) happen inside the commands, so ``adaptkit --help`` is fast.
Any :class:`~adaptkit.errors.AdaptkitError` is printed as one ``error:`` line, exit status 1.
"""

from __future__ import annotations

import sys

import click


class _Group(click.Group):
    """Turns adaptkit errors into one line on stderr and a non-zero exit, without a traceback."""

    def invoke(self, ctx):
        from adaptkit.errors import AdaptkitError

        try:
            return super().invoke(ctx)
        except AdaptkitError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


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


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adaptkit")
def main():
    """adaptkit: load, route, merge, serve and export parameter-efficient adapters."""


@main.command()
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(), help="Output folder (a standalone checkpoint).")
@click.option("--weights", default=None, help="Comma-separated weight per adapter, e.g. 0.7,0.3.")
@click.option("--method", default="linear", show_default=True, help="Combination method.")
@click.option("--dtype", default=None, help="Output dtype: float32, float16 or bfloat16 (default: as stored).")
@click.option("--verify", is_flag=True, help="Compare merged vs unmerged logits on a probe and print the max difference.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def merge(base, adapters, out, weights, method, dtype, verify, force, quiet):
    """Merge LoRA ADAPTERS into BASE, shard by shard, into a checkpoint plain transformers loads."""
    import adaptkit as ak

    weight_list = _float_list(weights)
    path = ak.merge_checkpoint(base, list(adapters), out, weights=weight_list, dtype=dtype, method=method,
                               force=force, progress=not quiet)
    click.echo(f"wrote {path}")
    if verify:
        from adaptkit.export import verify_merged_checkpoint

        diff = verify_merged_checkpoint(base, list(adapters), path, weights=weight_list)
        click.echo(f"verify: max abs logit difference merged vs unmerged = {diff:.3e}")


@main.command()
@click.argument("adapter", type=click.Path())
@click.option("--base", default=None, type=click.Path(), help="Check compatibility with this base model folder.")
def inspect(adapter, base):
    """Kind, ranks, targets, parameter count and size of ADAPTER (and whether it fits BASE)."""
    from adaptkit.describe import describe_adapter

    lines, compatible = describe_adapter(adapter, base)
    for line in lines:
        click.echo(line)
    if not compatible:
        sys.exit(1)


@main.command()
@click.argument("base", type=click.Path())
@click.option("--adapter", "adapter_specs", multiple=True, help="NAME=PATH of an adapter to load (repeatable).")
@click.option("--use", "use", default=None, help="Adapter to generate with (default: the first --adapter; 'base' for none).")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt text (repeatable: one batch).")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--temperature", default=0.0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--top-k", default=0, show_default=True)
@click.option("--seed", default=None, type=int)
@click.option("--dtype", default="float32", show_default=True)
def generate(base, adapter_specs, use, prompts, max_new_tokens, temperature, top_p, top_k, seed, dtype):
    """Generate from BASE with an adapter."""
    import adaptkit as ak

    engine = ak.Engine.from_pretrained(base, dtype=dtype)
    pairs = _named_paths(adapter_specs)
    for name, path in pairs:
        engine.add_adapter(name, path)
    if use == "base":
        use = None
    elif use is None and pairs:
        use = pairs[0][0]
    outputs = engine.generate(list(prompts), adapters=[use] * len(prompts), max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    for prompt, text in zip(prompts, outputs):
        click.echo(f"{prompt}{text}")


@main.command()
@click.option("--workdir", default=None, type=click.Path(), help="Keep the demo files here (default: a temp folder).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def demo(workdir, quiet):
    """Build a tiny model and two LoRAs locally, route, generate, merge and verify (no downloads)."""
    from adaptkit.demo import run_demo

    for line in run_demo(workdir, progress=not quiet):
        click.echo(line)


if __name__ == "__main__":
    main()
