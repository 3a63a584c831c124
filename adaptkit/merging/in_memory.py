"""Merging into the model transformers loads, for checkpoints the streaming merge cannot address.

The streaming merge (``checkpoint.py``) adds each delta to the checkpoint tensor of the same name. That
needs the checkpoint to store each adapted module's weight under the module's own name. transformers 5
converts some layouts at load and back at save (Qwen3-MoE and Mixtral store one tensor per expert and
projection, their modules hold the experts fused; some attention layers store fused projections); and a
LoRA on parameters (``target_parameters``) adapts the fused tensors only the loaded model has. Such
merges run here: the base loaded whole in float32, every adapter's delta added to the module or
parameter it names, ``save_pretrained`` writing the checkpoint in the base's own stored layout.
Memory is the whole model (the streaming merge holds one shard), so this path is taken only where
it is needed, and it says so in ``adaptkit_merge.json``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from adaptkit import inject
from adaptkit.adapters.lora import LoraAdapter, merged_bias, merged_weight
from adaptkit.errors import UnsupportedAdapterError


def needs_loaded_model(adapters: Sequence[LoraAdapter], shapes: dict,
                       skeleton_modules: Callable[[], dict]) -> str | None:
    """Why these adapters must merge into the loaded model (None: the streaming merge can): parameter
    LoRAs, or an adapted module whose weight the checkpoint stores under another name (``skeleton_modules``:
    the base's modules, built only when a name is missing)."""
    for adapter in adapters:
        if adapter.parameter_factors or adapter.parameter_layers:
            return f"{adapter.source}: LoRA on parameters (target_parameters) adapts tensors the loaded model fuses"
        for module in adapter.layers:
            if f"{module}.weight" not in shapes and module in skeleton_modules():
                return (f"{adapter.source}: {module}.weight is stored in another layout in the checkpoint "
                        "(transformers converts it at load)")
    return None


def merge_into_loaded_model(base: Path, adapters: Sequence[LoraAdapter], weights: Sequence[float], tmp: Path,
                            out_dtype: torch.dtype | None, method, reason: str) -> dict:
    """Merge ``adapters`` (with ``weights``) into ``base`` loaded whole; write the result into ``tmp``.
    Returns what ``adaptkit_merge.json`` records about it."""
    from adaptkit.base import load_base
    from adaptkit.fitting import fit_lora
    from adaptkit.formats.checkpoint import SIDE_FILES

    if not method.is_linear:
        raise UnsupportedAdapterError(f"{reason}; such merges run on the loaded model with method 'linear' only "
                                      f"(not {method.name!r})")
    model = load_base(base, dtype="float32").model
    modules = inject.base_modules(model)
    fitted = [fit_lora(model, adapter) for adapter in adapters]
    for adapter in fitted:
        if adapter.saved_modules:
            raise UnsupportedAdapterError(f"{adapter.source}: modules_to_save cannot be merged on this path ({reason})")
    by_module: dict[str, list] = {}
    for adapter, weight in zip(fitted, weights):
        for module, factors in adapter.layers.items():
            by_module.setdefault(module, []).append((factors, weight))
    _untie_head_if_changed(model, modules, by_module)
    with torch.no_grad():
        for name, contributions in by_module.items():
            module = modules[name]
            new = merged_weight(inject.weight_out_in(module), contributions)
            module.weight.copy_(new.T if inject.stored_transposed(module) else new)
            if any(getattr(f, "lora_B_bias", None) is not None for f, _ in contributions):
                module.bias.copy_(merged_bias(module.bias, contributions))
        for adapter, weight in zip(fitted, weights):
            for key, lora in adapter.parameter_layers.items():
                param = model.get_parameter(key)
                param.add_(lora.delta().to(param.dtype) * weight)
    if out_dtype is not None:
        model.to(out_dtype)
    model.save_pretrained(str(tmp))
    for name in SIDE_FILES:  # the tokenizer; config files are save_pretrained's
        if (base / name).is_file() and not (tmp / name).exists():
            shutil.copy2(base / name, tmp / name)
    return {"loaded_model": reason}


def _untie_head_if_changed(model: torch.nn.Module, modules: dict, by_module: dict) -> None:
    """A tied head and embeddings share one tensor: where an adapter changes one side, the head gets a
    copy of its own first (the merged model computes what the unmerged adapter does)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is not embed.weight:
        return
    names = {id(m): n for n, m in modules.items()}
    if names.get(id(head)) in by_module or names.get(id(embed)) in by_module:
        head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False

