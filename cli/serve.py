"""``adaptkit serve``: the OpenAI-compatible HTTP server (one process, or Ray Serve replicas)."""

from __future__ import annotations

import click

from adaptkit.cli.options import _named_paths, device_option, dtype_option, nf4_option


@click.command()
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
@nf4_option
@dtype_option
@device_option
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
