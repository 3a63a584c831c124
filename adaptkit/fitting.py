"""Fitting an adapter to the base it is added to, before it is attached: what PEFT does to the base at load
made part of the adapter (PiSSA/OLoRA residuals, tied token rows, layers bound to their base layer or
parameter, trained biases), and a LoRA rescaled by ``add_adapter(..., scale=)``."""

from __future__ import annotations

import dataclasses

import torch

from adaptkit import inject
from adaptkit.adapters.lora import (
    LoraAdapter,
    TokenRows,
    bind_parameter_factors,
    fold_base_residual,
    fold_trained_biases,
)
from adaptkit.adapters.peft_types import bind_base_layers, needs_base_layers
from adaptkit.errors import AdapterMismatchError, UnsupportedAdapterError


def fit_lora(model: torch.nn.Module, adapter: LoraAdapter) -> LoraAdapter:
    """The LoRA-family adapter with what PEFT does to the base at load made part of it (the base stays as
    loaded, for the other rows): PiSSA/OLoRA residuals, the tied head's token rows, layers bound to their
    base layer ((IA)^3, VeRA) or parameter (target_parameters), trained biases. One walk of the model."""
    modules = inject.base_modules(model)
    if adapter.needs_base_residual:
        adapter = fold_base_residual(adapter, lambda name: _base_weight(modules, name))
    adapter = _with_tied_token_rows(model, adapter, modules)
    if needs_base_layers(adapter):
        adapter = bind_base_layers(adapter, modules.get)
    adapter = bind_parameter_factors(adapter, modules.get)
    if adapter.trained_biases:
        adapter = fold_trained_biases(adapter, lambda m: getattr(modules.get(m), "bias", None),
                                      lambda m: {k: v.detach().cpu() for k, v in modules[m].state_dict().items()})
    return adapter


def _with_tied_token_rows(model: torch.nn.Module, adapter: LoraAdapter, modules: dict) -> LoraAdapter:
    """Where the output head shares the input embeddings' tensor, new token rows of the embeddings
    (``trainable_token_indices``) are the head's rows too, as PEFT ties them."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    embed, head = inject.innermost(embed), head if head is None else inject.innermost(head)
    if head is None or head.weight is not embed.weight:
        return adapter
    names = {id(m): n for n, m in modules.items()}
    rows = adapter.layers.get(names[id(embed)])
    if not isinstance(rows, TokenRows) or names[id(head)] in adapter.layers:
        return adapter
    head_rows = TokenRows(rows.indices, rows.values.data, embedding=False)
    return dataclasses.replace(adapter, layers={**adapter.layers, names[id(head)]: head_rows})


def _base_weight(modules: dict, module_name: str):
    """(the base weight of ``module_name`` as [out, in] float32, whether it is stored [in, out])."""
    from adaptkit import quant

    module = modules.get(module_name)
    if module is None:
        raise AdapterMismatchError(f"{module_name} is not a module of the base")
    if quant.is_quantized(module):
        raise UnsupportedAdapterError(
            f"{module_name} is a 4-bit layer: PEFT's PiSSA/OLoRA inits change the base weight at load, which on "
            "an NF4 base means re-quantizing it; load the base in 16/32-bit, or convert the adapter to a plain "
            "LoRA with PEFT (path_initial_model_for_weight_conversion)")
    return inject.weight_out_in(module), inject.stored_transposed(module)


def rescaled(adapter, scale: float):
    """A copy of the LoRA with every layer's scale multiplied (the caller's object is left as it was,
    so the same object added twice with different scales gives two different adapters)."""
    if not isinstance(adapter, LoraAdapter):
        raise UnsupportedAdapterError(f"scale= is not supported for {adapter.kind} adapters")
    if adapter.parameter_factors or adapter.parameter_layers:
        raise UnsupportedAdapterError(f"{adapter.source}: scale= is not supported with target_parameters")
    layers = {name: w.replaced(scale=w.scale * scale) for name, w in adapter.layers.items()}
    return dataclasses.replace(adapter, layers=layers)
