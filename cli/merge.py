"""``adaptkit merge``, ``quantize`` and ``extract``: checkpoints and LoRAs written from weights."""

from __future__ import annotations

import click

from adaptkit.cli.options import _float_list, device_option, force_option, quiet_option


@click.command()
@click.argument("base", required=False, type=click.Path())
@click.argument("adapters", nargs=-1, required=False, type=click.Path())
@click.option("-o", "--out", default=None, type=click.Path(), help="Output folder (a standalone checkpoint).")
@click.option("--weights", default=None, help="Comma-separated weight per adapter, e.g. 0.7,0.3.")
@click.option("--method", default="linear", show_default=True,
              help="linear (= task_arithmetic), svd, ties, dare_linear, dare_ties, magnitude_prune.")
@click.option("--density", default=None, type=float, help="ties, dare_*, magnitude_prune: fraction of each delta kept, in (0, 1].")
@click.option("--seed", default=None, type=int, help="dare_*: seed of the drop masks (default 0).")
@click.option("--rank", default=None, type=int,
              help="svd: target rank; with --into-adapter, the rank ties/dare/magnitude_prune results are factored at.")
@click.option("--into-adapter", "into_adapter", default=None, type=click.Path(),
              help="Combine the LoRAs (all positional arguments; no base) into one LoRA folder instead.")
@click.option("--recipe", default=None, type=click.Path(),
              help="Read the whole merge from a YAML/JSON recipe file (no positional arguments).")
@click.option("--dtype", default=None, help="Output dtype: float32, float16, bfloat16 or auto (default, auto: as stored).")
@click.option("--verify", is_flag=True, help="Compare merged vs unmerged logits on a probe and print the max difference.")
@force_option
@quiet_option
@click.option("--quantize", type=click.Choice(["nf4"]), default=None,
              help="QLoRA: load BASE in NF4 as the adapters were trained, merge into the dequantized weights.")
@click.option("--requantize", is_flag=True, help="With --quantize: keep NF4 in OUT and print the error it adds.")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True, help="With --quantize: QLoRA double quantization.")
@click.option("--skip-modules", default=None, help="With --quantize: comma-separated modules kept unquantized.")
@click.option("--device", default="cpu", show_default=True,
              help="Where --quantize loads the NF4 base and --verify runs the models: cpu, cuda or cuda:N.")
def merge(base, adapters, out, weights, method, density, seed, rank, into_adapter, recipe, dtype, verify, force, quiet,
          quantize, requantize, double_quant, skip_modules, device):
    """Merge LoRA ADAPTERS into BASE, shard by shard, into a checkpoint plain transformers loads.

    \b
    adaptkit merge BASE A B -o OUT [--method ties --density 0.5]   into the base
    adaptkit merge A B --into-adapter OUT [--weights 0.7,0.3]      into one LoRA (no base)
    adaptkit merge --recipe merge.yaml                             everything from a recipe file
    """
    import adaptkit as ak

    weight_list = _float_list(weights)
    method_params = dict(density=density, seed=seed, rank=rank)
    checkpoint_only = {"-o": out, "--dtype": dtype, "--verify": verify, "--quantize": quantize, "--requantize": requantize}
    if recipe is not None:
        given = {"BASE/ADAPTERS": base or adapters, "--into-adapter": into_adapter, "--weights": weights,
                 "--method": method != "linear", **{f"--{k}": v is not None for k, v in method_params.items()},
                 **{k: v for k, v in checkpoint_only.items() if k != "-o"}}
        if any(given.values()):
            raise click.UsageError(f"--recipe describes the whole merge; drop {', '.join(k for k, v in given.items() if v)}")
        _merge_recipe(recipe, force, quiet, out)
        return
    if into_adapter is not None:
        if any(checkpoint_only.values()):
            used = ", ".join(k for k, v in checkpoint_only.items() if v)
            raise click.UsageError(f"--into-adapter writes a LoRA; drop {used} (options for checkpoints)")
        paths = [p for p in (base, *adapters) if p]
        if len(paths) < 2:
            raise click.UsageError("--into-adapter needs at least two adapters: adaptkit merge A B --into-adapter OUT")
        result = ak.combine_adapters(paths, weight_list, method, out=into_adapter, force=force, progress=not quiet,
                                     **method_params)
        _echo_combined(result)
        return
    if not base or not adapters or out is None:
        raise click.UsageError("give BASE, at least one ADAPTER and -o OUT (or --into-adapter OUT, or --recipe FILE)")
    if quantize or requantize:
        if any(v is not None for v in method_params.values()):
            raise click.UsageError("--quantize merges with --method linear, which takes no --density/--seed/--rank")
        _merge_qlora(base, list(adapters), out, weight_list, method, dtype, verify, force, quiet, requantize,
                     device=device, double_quant=double_quant, skip_modules=skip_modules)
        return
    path = ak.merge_checkpoint(base, list(adapters), out, weights=weight_list, dtype=dtype, method=method,
                               force=force, progress=not quiet, **method_params)
    click.echo(f"wrote {path}")
    _echo_merge_energy(path)
    if verify and method not in ("linear", "task_arithmetic"):
        click.echo(f"verify: skipped; the unmerged reference (ak.Mix) equals method 'linear' only, not {method!r}")
    elif verify:
        from adaptkit.merging.checkpoint import storage_rounding, verify_merged_checkpoint, verify_verdict

        diff = verify_merged_checkpoint(base, list(adapters), path, weights=weight_list, device=device)
        click.echo(verify_verdict(diff, storage_rounding(base, dtype, device=device), dtype))


def _echo_combined(result) -> None:
    """What ``merge --into-adapter`` made, with the energy kept per module when it is not exact."""
    ranks = sorted({w.rank for w in result.adapter.layers.values()})
    click.echo(f"wrote {result.path}: {len(result.adapter.layers)} modules, ranks {ranks}, method {result.method!r}")
    if result.exact:
        click.echo("exact: the adapter's deltas equal the combination (nothing truncated)")
        return
    click.echo("energy kept (share of ||combined delta||_F^2 in the written rank):")
    for module, energy in result.energy.items():
        click.echo(f"  {module}: {energy:.4f}")
    click.echo(f"  lowest {min(result.energy.values()):.4f}")


def _echo_merge_energy(path) -> None:
    """``svd`` merges record the energy kept per tensor in adaptkit_merge.json; print it."""
    import json
    from pathlib import Path

    record = json.loads((Path(path) / "adaptkit_merge.json").read_text()).get("adaptkit_merge", {})
    if record.get("untied"):
        click.echo(f"untied: {record['untied']}")
    energy = record.get("energy_kept")
    if energy:
        click.echo("energy kept per tensor (share of ||combined delta||_F^2):")
        for key, value in energy.items():
            click.echo(f"  {key}: {value:.4f}")


def _merge_recipe(path, force: bool, quiet: bool, out=None) -> None:
    from adaptkit.merging.recipe import load_recipe, run_recipe

    recipe = load_recipe(path, out=out)
    result = run_recipe(recipe, force=force, progress=not quiet)
    if recipe.into == "adapter":
        _echo_combined(result)
    else:
        click.echo(f"wrote {result}")
        _echo_merge_energy(result)


def _merge_qlora(base, adapters, out, weights, method, dtype, verify, force, quiet, requantize, device="cpu",
                 **quantize_options):
    """``merge --quantize nf4``: dequantize path (16/32-bit output), or ``--requantize`` (NF4 output)."""
    import adaptkit as ak
    from adaptkit.errors import InvalidArgumentError

    if method != "linear":
        raise InvalidArgumentError(f"--quantize merges with --method linear only (got {method!r})")
    if requantize and dtype is not None:
        raise InvalidArgumentError("--requantize writes NF4; drop --dtype (it sets a 16/32-bit output dtype)")
    path = ak.merge_qlora_checkpoint(base, adapters, out, weights=weights, dtype=dtype, requantize=requantize,
                                     force=force, progress=not quiet, device=device, **quantize_options)
    click.echo(f"wrote {path}" + (" (NF4)" if requantize else ""))
    if requantize or verify:
        from adaptkit.merging.qlora import qlora_merge_error

        error = qlora_merge_error(base, adapters, path, weights=weights, device=device, **quantize_options)
        what = "added by re-quantizing" if requantize else "merged vs unmerged QLoRA"
        click.echo(f"relative logit error {what}: {error:.3e} (||merged - unmerged|| / ||unmerged|| on a probe)")


@click.command()
@click.argument("base", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(), help="Output folder (transformers' 4-bit format).")
@click.option("--compute-dtype", default="bfloat16", show_default=True, help="dtype of matmuls and unquantized modules.")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True, help="QLoRA double quantization.")
@click.option("--skip-modules", default=None, help="Comma-separated modules kept unquantized (besides the LM head).")
@force_option
@device_option
def quantize(base, out, compute_dtype, double_quant, skip_modules, force, device):
    """Save BASE with its linear layers in 4-bit NF4 (bitsandbytes), to ship the QLoRA base."""
    import adaptkit as ak
    from adaptkit.describe import base_memory

    path = ak.quantize_base(base, out, compute_dtype=compute_dtype, force=force, double_quant=double_quant,
                            skip_modules=skip_modules, device=device)
    sizes = base_memory(base, double_quant=double_quant, skip_modules=skip_modules)
    click.echo(f"wrote {path}: NF4 {_mib(sizes['nf4'])} MiB vs 16-bit {_mib(sizes['16-bit'])} MiB")


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f}"


@click.command()
@click.argument("finetuned", type=click.Path())
@click.option("--base", required=True, type=click.Path(), help="The base model FINETUNED was fine-tuned from.")
@click.option("--rank", required=True, type=int, help="LoRA rank (capped per layer at min(out, in)).")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output LoRA folder (PEFT layout).")
@click.option("--targets", default=None, help="Comma-separated module names, e.g. q_proj,v_proj (default: every linear layer of the blocks).")
@force_option
@quiet_option
def extract(finetuned, base, rank, out, targets, force, quiet):
    """Extract a rank-R LoRA from FINETUNED - BASE (truncated SVD per layer), streaming shard by shard."""
    from adaptkit.merging.extract import extract_lora

    target_list = [t.strip() for t in targets.split(",") if t.strip()] if targets else None
    res = extract_lora(finetuned, base, rank, out=out, targets=target_list, force=force, progress=not quiet)
    click.echo(f"wrote {res.path}: {len(res.adapter.layers)} modules, rank {rank}")
    click.echo("energy kept per layer (share of ||W_ft - W_base||_F^2):")
    for module, energy in res.energy.items():
        click.echo(f"  {module}: {energy:.4f} (rank {res.adapter.layers[module].rank})")
    click.echo(f"  lowest {min(res.energy.values()):.4f}")
    if res.unchanged:
        click.echo(f"unchanged (left out): {', '.join(res.unchanged)}")
    if res.other_changes:
        click.echo("changed outside the targets, not carried by a LoRA (relative difference):")
        for key, diff in res.other_changes.items():
            click.echo(f"  {key}: {diff:.3e}")
