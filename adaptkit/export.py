"""Standalone artifacts, each checked against the unmerged engine: merged checkpoints, ONNX graphs
with a KV cache (:func:`export_onnx`, :func:`verify_onnx`; the graph itself is built in
``formats/onnx.py``), and prefix-cache files."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from adaptkit.engine import Engine


def export_prefix_cache(
    adapter, base: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32", force: bool = False,
    device: str = "cpu",
) -> Path:
    """Write the K/V a prefix or prompt ``adapter`` puts in every layer of ``base`` to one safetensors file.

    A prompt's K/V are computed by running the base once on its virtual tokens. The file records
    the base fingerprint, layers, KV heads, head_dim and virtual tokens, and loads directly as an
    adapter on that base: ``Engine.add_adapter("name", "cache.safetensors")``. Written atomically.

    Example:
        >>> export_prefix_cache("adapters/prompt", "tiny-llama", "prompt.safetensors")
    """
    from adaptkit.errors import InvalidArgumentError, OutputExistsError
    from adaptkit.formats.detect import read_adapter
    from adaptkit.formats.prefix_file import write_prefix_file
    from adaptkit.prefix_cache import prefix_cache_for

    out = Path(out)
    if out.suffix != ".safetensors":
        raise InvalidArgumentError(f"{out}: a prefix cache is one .safetensors file; name it {out.stem}.safetensors")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass force=True (CLI: --force) to replace it")
    loaded = read_adapter(adapter) if isinstance(adapter, (str, os.PathLike)) else adapter
    engine = Engine.from_pretrained(base, dtype=dtype, device=device)
    engine.add_adapter("export", loaded)
    return write_prefix_file(prefix_cache_for(loaded, engine.model, engine.base.fingerprint), out, force=force)


def _onnx_ready_engine(base: str | os.PathLike, adapter):
    """An fp32 engine with ``adapter`` in its exportable form: (engine, prefix K/V or None, routed name or None).

    A LoRA is merged into the weights (the graph is the bare base's: no added latency); a prefix or
    prompt adapter becomes its per-layer K/V (baked in as constants); any other kind the engine
    serves is traced with every row routed to it.
    """
    from adaptkit.errors import UnsupportedAdapterError
    from adaptkit.formats.detect import read_adapter

    engine = Engine.from_pretrained(base, dtype="float32")
    if not engine.base.facts.spec.is_causal:
        raise UnsupportedAdapterError(
            f"{base} is a {engine.base.facts.model_type} encoder; ONNX export here writes causal LMs with a KV cache"
        )
    if adapter is None:
        return engine, None, None
    loaded = read_adapter(adapter) if isinstance(adapter, (str, os.PathLike)) else adapter
    engine.add_adapter("export", loaded)
    if loaded.kind == "lora":
        engine.merge("export")
        return engine, None, None
    if loaded.kind in ("prefix", "prompt"):
        from adaptkit.prefix_cache import prefix_cache_for

        cache = prefix_cache_for(loaded, engine.model)
        return engine, (cache.keys, cache.values), None
    return engine, None, "export"


def export_onnx(
    base: str | os.PathLike, out: str | os.PathLike, adapter=None, force: bool = False, opset: int | None = None
) -> Path:
    """Write ``base`` (with one adapter baked in) as an ONNX causal LM with KV-cache inputs and outputs.

    One graph serves prefill (empty past) and decode; the inputs/outputs are listed in
    :mod:`adaptkit.formats.onnx`. A LoRA is merged into the weights; a prefix/prompt adapter's K/V
    become constants. Float32; written atomically. Check it with :func:`verify_onnx`.

    ``out`` is a folder (the layout Optimum and ONNX Runtime GenAI users expect): ``model.onnx``
    with the base's ``config.json``, ``generation_config.json`` and tokenizer files beside it, so
    onnxruntime alone can run it. An ``out`` ending in ``.onnx`` writes the graph file alone.
    Returns the path of the graph.

    Example:
        >>> export_onnx("tiny-llama", "sql-onnx/", adapter="adapters/sql")   # sql-onnx/model.onnx + tokenizer
    """
    from adaptkit.formats.checkpoint import atomic_output_dir, copy_side_files
    from adaptkit.formats.onnx import OPSET, write_onnx
    from adaptkit.routing import route_rows, use_plan

    out = Path(out)
    if out.exists() and not force:
        from adaptkit.errors import OutputExistsError

        raise OutputExistsError(f"{out} already exists; choose another output or pass --force to replace it")
    engine, prefix, routed = _onnx_ready_engine(base, adapter)
    plan = route_rows([routed]) if routed else None  # one entry: every row of any batch uses it
    with use_plan(plan) if plan is not None else contextlib.nullcontext():
        if out.suffix == ".onnx":
            return write_onnx(engine.model, engine.base.facts, out, prefix=prefix, opset=opset or OPSET, force=force)
        with atomic_output_dir(out, force=force, inputs=[base, adapter]) as tmp:
            write_onnx(engine.model, engine.base.facts, tmp / ONNX_NAME, prefix=prefix, opset=opset or OPSET)
            copy_side_files(Path(base), tmp)
    return out / ONNX_NAME


ONNX_NAME = "model.onnx"  # the graph's name inside an exported folder (Optimum's)


def onnx_graph(path: str | os.PathLike) -> Path:
    """The graph file of an export: ``path`` itself, or ``path/model.onnx`` for a folder."""
    path = Path(path)
    return path / ONNX_NAME if path.is_dir() else path


def verify_onnx(
    onnx_path: str | os.PathLike, base: str | os.PathLike, adapter=None, steps: int = 3, seed: int = 0
) -> float:
    """Max abs logit difference, ONNX Runtime (with its KV cache) vs the adaptkit engine (no cache).

    A left-padded batch of two prompts is prefilled, then ``steps`` greedy tokens are decoded one at a
    time; every step's logits are compared with the engine's full forward over the whole sequence,
    with the adapter served unmerged.
    """
    import numpy as np

    from adaptkit.formats.onnx import empty_past, run_step, session
    from adaptkit.generation import left_pad, positions_from_mask

    engine = Engine.from_pretrained(base, dtype="float32")
    entry = None
    if adapter is not None:
        engine.add_adapter("a", adapter)
        entry = "a"
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, engine.base.facts.vocab_size, (n,), generator=gen).tolist() for n in (7, 4)]
    ids, mask = left_pad(prompts, 0, "cpu")
    sess = session(onnx_graph(onnx_path))
    step_ids, positions, past = ids, positions_from_mask(mask), empty_past(sess, len(prompts))
    worst = 0.0
    for _ in range(steps + 1):
        logits, past = run_step(sess, step_ids.numpy(), mask.numpy(), positions.numpy(), past)
        expected = engine.logits(ids, mask, adapters=entry)[:, -step_ids.shape[1] :]
        worst = max(worst, float(np.abs(logits - expected.numpy()).max()))
        token = expected[:, -1].argmax(-1, keepdim=True)
        ids, step_ids = torch.cat([ids, token], dim=1), token
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        positions = positions[:, -1:] + 1
    return worst

