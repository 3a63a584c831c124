"""``adaptkit export`` group: ``prefix-cache``, ``onnx`` and ``gguf`` artifacts."""

from __future__ import annotations

import click

from adaptkit.cli.options import _float_list, force_option, quiet_option


@click.group()
def export():
    """Standalone artifacts built from an adapter and its base."""


@export.command("prefix-cache")
@click.argument("adapter", type=click.Path())
@click.option("--base", required=True, type=click.Path(), help="Base model folder the K/V are computed on.")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output file, FILE.safetensors.")
@click.option("--dtype", default="float32", show_default=True, help="float32, float16, bfloat16 or auto (the checkpoint's).")
@click.option("--device", default="cpu", show_default=True, help="Where the K/V are computed: cpu, cuda or cuda:N.")
@force_option
def prefix_cache(adapter, base, out, dtype, device, force):
    """Write the per-layer K/V of a prefix or prompt ADAPTER on BASE to one file that loads as an adapter."""
    from adaptkit.export import export_prefix_cache

    path = export_prefix_cache(adapter, base, out, dtype=dtype, force=force, device=device)
    click.echo(f"wrote {path}")


@export.command("onnx")
@click.argument("base", type=click.Path())
@click.option("--adapter", default=None, type=click.Path(), help="Adapter baked in: LoRA merged, prefix/prompt K/V as constants.")
@click.option("-o", "--out", required=True, type=click.Path(),
              help="Output folder (model.onnx + config + tokenizer), or a file ending in .onnx for the graph alone.")
@click.option("--verify", is_flag=True, help="Run prefill + 3 decode steps in onnxruntime vs torch; print the max difference.")
@force_option
def onnx_command(base, adapter, out, verify, force):
    """Write BASE (+ ADAPTER) as one ONNX graph for prefill and decode, with KV-cache inputs and outputs.

    The graph is traced from a float32 copy on the CPU (so it takes no --device or --dtype): it runs
    wherever onnxruntime does, on the execution provider the user picks.
    """
    from adaptkit.export import export_onnx, verify_onnx

    if verify:  # before the export: a missing verifier should not cost the export first
        from adaptkit.formats.onnx import require_onnxruntime

        require_onnxruntime()
    path = export_onnx(base, out, adapter=adapter, force=force)
    click.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    if verify:
        from adaptkit.merging.checkpoint import verify_verdict

        diff = verify_onnx(path, base, adapter)
        click.echo(verify_verdict(diff, 0.0, "float32", what="onnxruntime vs torch (prefill + 3 decode steps)"))


@export.command("gguf")
@click.argument("base", type=click.Path())
@click.option("--adapter", "adapters", multiple=True, type=click.Path(),
              help="LoRA merged into the weights (repeatable: several are merged, see --weights).")
@click.option("--weights", default=None, help="Comma-separated weight per --adapter, e.g. 0.7,0.3.")
@click.option("--method", default="linear", show_default=True, help="How several adapters combine (as adaptkit merge).")
@click.option("--lora-only", "lora_only", default=None, type=click.Path(),
              help="Write this LoRA as a llama.cpp adapter GGUF (llama-server --lora, Ollama ADAPTER) instead of a model.")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output file, NAME.gguf.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f16", show_default=True,
              help="How the weights are stored (1-D tensors stay f32).")
@force_option
@quiet_option
def gguf_command(base, adapters, weights, method, lora_only, out, outtype, force, quiet):
    """Write BASE (+ merged --adapter LoRAs) as one GGUF file for llama.cpp and Ollama, tokenizer included;
    or, with --lora-only, a LoRA as llama.cpp's adapter GGUF for BASE.

    \b
    adaptkit export gguf BASE --adapter adapters/sql -o sql.gguf --outtype q8_0
    adaptkit export gguf BASE -o base.gguf && adaptkit export gguf BASE --lora-only adapters/sql -o sql-lora.gguf
    """
    from adaptkit.merging.gguf import export_gguf, export_lora_gguf

    if lora_only:
        if adapters:
            raise click.UsageError("--lora-only writes one adapter file; drop --adapter")
        path = export_lora_gguf(lora_only, base, out, outtype=outtype, force=force)
    else:
        path, warnings = export_gguf(base, out, adapters=adapters, weights=_float_list(weights), outtype=outtype,
                                     method=method, force=force, progress=not quiet)
        for warning in warnings:
            click.echo(f"warning: {warning}", err=True)
    click.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {outtype})")
