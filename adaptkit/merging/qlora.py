"""Deploying QLoRA: LoRAs trained on a 4-bit NF4 base, merged without losing accuracy.

Two merges, both from the NF4 base *as loaded* (``quant.dequantize_weight``), whatever layout
bitsandbytes holds after forwards:

- :func:`merge_qlora_checkpoint` (default): ``W' = deq(Q(W)) + sum_i w_i s_i B_i A_i`` in float32,
  written as a standalone 16/32-bit checkpoint, shard by shard. Its logits equal the unmerged QLoRA
  model's up to float rounding: the base the adapter was trained on is kept exactly.
- ``requantize=True``: ``Q(W')`` stays 4-bit (what PEFT's ``merge_and_unload`` does on a 4-bit
  base); NF4's rounding of ``W'`` is added, measured by :func:`qlora_merge_error`.

Also :func:`quantize_base` (save a base in NF4 through transformers' own serialization) and
:func:`base_memory` (bytes in NF4 vs 16-bit, peak RSS).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from adaptkit import quant
from adaptkit.adapters.lora import check_merge_weights, merged_bias, merged_weight
from adaptkit.base import LoadedBase, check_made_for, load_base, parse_dtype
from adaptkit.errors import AdapterMismatchError, InvalidArgumentError, UnsupportedAdapterError
from adaptkit.formats.detect import load_lora_adapters
from adaptkit.inject import base_modules, check_lora_fits
from adaptkit.merging.checkpoint import apply_update, plan_tensor_updates

# what transformers writes beside a 4-bit weight ``<module>.weight`` (bitsandbytes' QuantState.as_dict)
_STATE_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                   ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")


def relative_logit_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """``||other - reference||_F / ||reference||_F`` over all rows, positions and vocabulary."""
    reference, other = reference.double(), other.double()
    return float(torch.linalg.norm(other - reference) / torch.linalg.norm(reference))


def _load_nf4(base, compute_dtype, quantize_options: dict, device: str = "cpu") -> LoadedBase:
    return load_base(base, dtype=compute_dtype, quantize="nf4", quantize_options=quantize_options, device=device)


def _quantized_layers(model) -> dict[str, torch.nn.Module]:
    """Module name (as in the base model) -> its 4-bit layer, looking through adaptkit's wrappers."""
    return {name: m for name, m in base_modules(model).items() if quant.is_quantized(m)}


def _checkpoint_layout(checkpoint, layers: dict, conv1d: set[str]):
    """Map checkpoint keys onto the 4-bit layers.

    Returns ({weight key: module name}, {key: shape in the output}, quant-state keys to drop). A
    base saved in NF4 stores ``weight`` as packed codes plus state keys; in the output every weight
    has its full-precision shape ([out, in]; GPT-2's Conv1D [in, out]).
    """
    from adaptkit.merging.checkpoint import _checkpoint_key

    shapes = checkpoint.keys_and_shapes()
    weight_keys, state_keys = {}, set()
    for name, layer in layers.items():
        key = _checkpoint_key(name, "weight", shapes)
        if key is None:
            raise AdapterMismatchError(f"{checkpoint.folder}: no checkpoint tensor for the 4-bit layer {name}")
        weight_keys[key] = name
        state_keys.update(k for k in (key + s for s in _STATE_SUFFIXES) if k in shapes)
        out_f, in_f = layer.weight.quant_state.shape
        shapes[key] = (in_f, out_f) if name.rpartition(".")[2] in conv1d else (out_f, in_f)
    return weight_keys, {k: v for k, v in shapes.items() if k not in state_keys}, state_keys


def merge_qlora_checkpoint(
    base: str | os.PathLike,
    adapters: Sequence,
    out: str | os.PathLike,
    weights: Sequence[float] | None = None,
    dtype: str | torch.dtype | None = None,
    requantize: bool = False,
    compute_dtype: str | torch.dtype = "float32",
    force: bool = False,
    progress: bool = True,
    loaded: LoadedBase | None = None,
    device: str = "cpu",
    **quantize_options,
) -> Path:
    """Merge LoRAs trained on the NF4-quantized ``base`` into a standalone checkpoint.

    The base is loaded in NF4 the way it was trained (``quantize_options``: ``double_quant``,
    ``skip_modules``; a folder saved in NF4 loads as saved). Each 4-bit weight is dequantized
    (float32) and ``sum_i w_i * s_i B_i A_i`` added; other tensors are copied from the checkpoint.

    Args:
        base: full-precision base folder (quantized here) or a folder saved by :func:`quantize_base`.
        adapters: LoRA folders or loaded LoRAs; ``weights`` one per adapter (default 1).
        dtype: output dtype (default: each tensor's own; a 4-bit weight takes ``compute_dtype``
            when the base has no full-precision copy of it).
        requantize: keep NF4: ``Q(W + dW)`` saved with transformers' 4-bit serialization.
        loaded: an NF4 base already in memory (e.g. ``engine.base`` after serving, with no LoRA
            merged into it in place); its layers are read as loaded, whatever forwards did since.
        device: where the base is loaded and dequantized (``cuda``: bitsandbytes' GPU kernels); the
            merge arithmetic and the output are on the CPU.

    Example:
        >>> merge_qlora_checkpoint("llama-7b", ["qlora-sql"], "merged-sql", dtype="bfloat16")
    """
    adapters = load_lora_adapters(adapters)
    weights = check_merge_weights(adapters, weights)
    for adapter in adapters:
        if adapter.needs_base_residual:
            raise UnsupportedAdapterError(
                f"{adapter.source}: init_lora_weights={adapter.config.init_lora_weights!r} changes the base weights "
                "at load, which on an NF4 base means re-quantizing them; merge it into the 16/32-bit base instead")
    if loaded is None:
        loaded = _load_nf4(base, compute_dtype, quantize_options, device)
    elif loaded.quantize is None or requantize or Path(base).resolve() != loaded.path.resolve():
        raise InvalidArgumentError(
            f"{loaded.path}: loaded= takes the NF4 base loaded from {base}, and not with requantize (which "
            "changes the layers it is given): pass the base path alone instead"
        )
    from adaptkit.adapters.peft_types import bind_base_layers, needs_base_layers

    layer_of = base_modules(loaded.model).get
    adapters = [bind_base_layers(a, layer_of) if needs_base_layers(a) else a for a in adapters]
    for adapter in adapters:
        check_made_for(adapter, loaded.facts, loaded.fingerprint)
        check_lora_fits(base_modules(loaded.model), adapter, where=str(base))
    if requantize:
        return _merge_requantized(loaded, adapters, weights, out, force)
    return _merge_dequantized(Path(base), loaded, adapters, weights, out, dtype, force, progress)


def _merge_dequantized(base: Path, loaded: LoadedBase, adapters, weights, out, dtype, force, progress) -> Path:
    """Stream the checkpoint shard by shard; 4-bit weights come from the loaded layers, dequantized."""
    from tqdm.auto import tqdm

    from adaptkit.formats.checkpoint import (
        atomic_output_dir,
        copy_side_files,
        open_checkpoint,
        write_shards,
    )

    checkpoint = open_checkpoint(base)
    spec = loaded.facts.spec
    layers = _quantized_layers(loaded.model)
    weight_keys, shapes, state_keys = _checkpoint_layout(checkpoint, layers, set(spec.conv1d_modules))
    updates, added = plan_tensor_updates(adapters, weights, shapes, spec, where=str(base))
    out_dtype = None if dtype in (None, "auto") else parse_dtype(dtype)  # auto: as stored

    def merged_shards():  # one input shard in memory at a time
        for _, tensors in checkpoint.iter_shards():
            merged = {}
            for key, tensor in tensors.items():
                if key in state_keys:
                    continue
                if key in weight_keys:
                    stored = tensor.dtype if tensor.is_floating_point() else loaded.dtype  # NF4 folder: codes
                    tensor = quant.dequantize_weight(layers[weight_keys[key]]).cpu()  # [out, in] float32, as loaded
                    if weight_keys[key].rpartition(".")[2] in spec.conv1d_modules:
                        tensor = tensor.T  # Conv1D stores [in, out]
                    target = out_dtype or stored
                else:
                    target = out_dtype if (out_dtype is not None and tensor.is_floating_point()) else tensor.dtype
                new = apply_update(tensor, updates[key]) if key in updates else tensor
                merged[key] = new.to(target).contiguous()
            yield merged

    n_shards = len(checkpoint.shards)
    with atomic_output_dir(out, force=force, inputs=[base, *adapters]) as tmp:
        shards = tqdm(merged_shards(), total=n_shards, desc="merging shards", unit="shard", disable=not progress)
        write_shards(tmp, shards, n_shards, {key: t.to(out_dtype or t.dtype) for key, t in added.items()})
        copy_side_files(base, tmp)
        config = json.loads((tmp / "config.json").read_text())
        config.pop("quantization_config", None)  # the output is a plain 16/32-bit model
        if out_dtype is not None or state_keys:  # from an NF4 folder: weights in the compute dtype
            config["dtype"] = str(out_dtype or loaded.dtype).removeprefix("torch.")
        if added:
            config["tie_word_embeddings"] = False
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        _write_record(tmp, base, loaded, adapters, weights, "dequantize", config.get("dtype"))
    return Path(out)


def _merge_requantized(loaded: LoadedBase, adapters, weights, out, force) -> Path:
    """``Q(deq(Q(W)) + dW)`` into every adapted 4-bit layer of ``loaded`` (a fresh copy), then save NF4."""
    from adaptkit.inject import is_conv1d, weight_out_in

    modules = base_modules(loaded.model)
    per_module: dict[str, list] = {}
    for adapter, w in zip(adapters, weights):
        for name, factors in adapter.layers.items():
            per_module.setdefault(name, []).append((factors, w))
    # every new tensor is computed before any is written: a failure leaves the model as loaded
    new_weights = {name: merged_weight(weight_out_in(modules[name]).cpu(), c) for name, c in per_module.items()}
    new_params = []  # (parameter, value): lora_bias, modules_to_save
    for name, contributions in per_module.items():
        if any(f.lora_B_bias is not None for f, _ in contributions):
            new_params.append((modules[name].bias, merged_bias(modules[name].bias.cpu(), contributions)))
    for adapter in adapters:
        for name, params in adapter.saved_modules.items():
            owned = dict(modules[name].named_parameters())
            new_params += [(owned[p], t.float()) for p, t in params.items()]
    for name, value in new_weights.items():
        module = modules[name]
        value = value.to(module.weight.device)
        if quant.is_quantized(module):
            quant.replace_weight(module, value)
        else:  # a layer kept dense (skip_modules)
            module.weight.data.copy_((value.T if is_conv1d(module) else value).to(module.weight.dtype))
    for param, value in new_params:
        param.data.copy_(value.to(param.device, param.dtype))
    return _save_nf4(loaded, out, force, record=lambda tmp: _write_record(
        tmp, loaded.path, loaded, adapters, weights, "requantize", "nf4"))


def _has_wrappers(loaded: LoadedBase) -> bool:
    from adaptkit.inject import WRAPPERS

    return any(isinstance(m, WRAPPERS) for m in loaded.model.modules())


def _write_record(folder: Path, base, loaded: LoadedBase, adapters, weights, path: str, dtype) -> None:
    qconfig = getattr(loaded.model.config, "quantization_config", None)
    qconfig = qconfig if isinstance(qconfig, dict) else (qconfig.to_dict() if qconfig is not None else {})
    record = {
        "adaptkit_merge": {
            "base": str(base),
            "adapters": [a.source for a in adapters],
            "weights": weights,
            "method": "linear",
            "dtype": dtype,
            "qlora": {"merge": path, "quant_type": qconfig.get("bnb_4bit_quant_type"),
                      "double_quant": qconfig.get("bnb_4bit_use_double_quant")},
        }
    }
    (folder / "adaptkit_merge.json").write_text(json.dumps(record, indent=2))


def _save_nf4(loaded: LoadedBase, out, force: bool, record=None) -> Path:
    """``save_pretrained`` of a 4-bit model (transformers' serialization) + the base's tokenizer files."""
    import shutil

    from adaptkit.formats.checkpoint import SIDE_FILES, atomic_output_dir

    if _has_wrappers(loaded):
        raise InvalidArgumentError("the model has adapters attached; save the base before adding adapters")
    quant.restore_loaded_layout(loaded.model)  # bitsandbytes' own inverse of its CPU layout is lossy
    with atomic_output_dir(out, force=force, inputs=[loaded.path]) as tmp:
        loaded.model.save_pretrained(str(tmp))
        for name in SIDE_FILES:
            if (loaded.path / name).is_file() and not (tmp / name).exists():
                shutil.copy2(loaded.path / name, tmp / name)
        if record is not None:
            record(tmp)
    return Path(out)


def quantize_base(
    base: str | os.PathLike,
    out: str | os.PathLike,
    compute_dtype: str | torch.dtype = "bfloat16",
    force: bool = False,
    device: str = "cpu",
    **quantize_options,
) -> Path:
    """Save ``base`` with its linear layers in NF4, so the 4-bit base can be shipped (quantized on ``device``).

    The folder is transformers' own 4-bit serialization (codes + quant state per weight,
    ``quantization_config`` in config.json): ``from_pretrained(out)`` and
    ``Engine.from_pretrained(out)`` load it in NF4 with the same weights, without re-quantizing.

    Example:
        >>> quantize_base("llama-7b", "llama-7b-nf4", compute_dtype="bfloat16", double_quant=True)
    """
    return _save_nf4(_load_nf4(base, compute_dtype, quantize_options, device), out, force)


def qlora_merge_error(
    base: str | os.PathLike,
    adapters: Sequence,
    merged: str | os.PathLike,
    weights: Sequence[float] | None = None,
    compute_dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    **quantize_options,
) -> float:
    """Relative logit error of a merged checkpoint vs the unmerged QLoRA model, on a fixed probe.

    The reference is ``base`` loaded in NF4 with the adapters applied unmerged (what they were
    trained as); ``merged`` is loaded as saved (16/32-bit, or NF4 when requantized). 4-bit layers
    compute ``x @ deq(W)^T`` in ``compute_dtype`` on both sides (``quant.dequantizing_kernels``, the
    kernel adapters are trained with), so the figure measures the merge, not the CPU's 4-bit kernel.
    """
    from adaptkit.engine import Engine
    from adaptkit.merging.checkpoint import attach_unmerged, probe_ids

    engine = Engine(_load_nf4(base, compute_dtype, quantize_options, device))
    entry = attach_unmerged(engine, adapters, weights)
    ids = probe_ids(engine.base.facts.vocab_size)
    with quant.dequantizing_kernels(engine.model):
        reference = engine.logits(ids, adapters=entry)
    del engine
    other = Engine.from_pretrained(merged, dtype=compute_dtype, device=device)
    with quant.dequantizing_kernels(other.model):
        return relative_logit_error(reference, other.logits(ids))
