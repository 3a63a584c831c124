"""A LoRA merged into a live model's weights in place, and taken out again (``Engine.merge`` / ``unmerge``).

Every new tensor is computed before any is written, so a failure leaves the weights untouched; the
originals are kept aside, so :func:`restore` puts them back bit for bit (never a subtraction). Tied
weights (a head sharing the input embeddings' tensor) get their own merged tensor; NF4 layers are
re-quantized (``quant.replace_weight``) and restored from a snapshot.
"""

from __future__ import annotations

import torch

from adaptkit import inject
from adaptkit.adapters.lora import LoraAdapter, merged_bias, merged_weight
from adaptkit.errors import UnsupportedAdapterError


def merge(model: torch.nn.Module, name: str, adapter: LoraAdapter, backup: list) -> None:
    """Write ``adapter`` (attached as ``name``) into ``model``'s weights; each original goes to ``backup``
    as (module, parameter name, original) before it is replaced."""
    from adaptkit import quant

    writes = []  # (module, param name, new value)
    for module_name in adapter.layers:
        layer = inject.wrapper_at(model, module_name, (inject.LoraLinear, inject.LoraEmbedding))
        base_layer, factors = inject.innermost(layer), layer.lora[name]
        new = merged_weight(inject.weight_out_in(base_layer), [(factors, 1.0)])
        writes.append((base_layer, "weight", new.T if inject.stored_transposed(base_layer) else new))
        if factors.lora_B_bias is not None:
            if base_layer.bias is None:
                raise UnsupportedAdapterError(
                    f"{module_name}: lora_bias cannot be merged into a layer without a bias (serve it unmerged)"
                )
            writes.append((base_layer, "bias", merged_bias(base_layer.bias, [(factors, 1.0)])))
    for key in adapter.parameter_layers:
        owner, _, param_name = key.rpartition(".")
        wrapper = inject.wrapper_at(model, owner, inject.ParamLoraModule)
        param = inject.innermost(wrapper).get_parameter(param_name)
        writes.append((inject.innermost(wrapper), param_name, param + wrapper.lora[name][param_name].delta().to(param.dtype)))
    for module_name in adapter.saved_modules:
        switched = inject.wrapper_at(model, module_name, inject.SwitchedModule)
        for param_name, value in switched.replacements[name].named_parameters():
            writes.append((inject.innermost(switched), param_name, value))
    shared = _shared_parameters(model)
    for module, param_name, value in writes:
        if not isinstance(value, torch.nn.Parameter) and id(module.get_parameter(param_name)) in shared:
            # a weight tied to another module's (an lm_head tied to the input embeddings): the merged
            # head gets its own tensor, the embeddings keep theirs; unmerge puts the shared one back
            value = torch.nn.Parameter(value.to(module.get_parameter(param_name).dtype), requires_grad=False)
        if isinstance(value, torch.nn.Parameter):
            # a stored module (modules_to_save) replaces the parameter object, which also unties
            # it from a tied embedding; unmerge puts the original object back
            owner_name, _, leaf = param_name.rpartition(".")
            owner = module
            for part in owner_name.split(".") if owner_name else ():  # through wrappers (a LoRA layer in it)
                owner = getattr(inject.innermost(owner), part)
            owner = inject.innermost(owner)
            backup.append((owner, leaf, getattr(owner, leaf)))
            setattr(owner, leaf, torch.nn.Parameter(value.detach().clone(), requires_grad=False))
            continue
        if param_name == "weight" and quant.is_quantized(module):
            backup.append((module, param_name, quant.snapshot(module)))
            quant.replace_weight(module, value)
            continue
        param = module.get_parameter(param_name)
        backup.append((module, param_name, param.detach().clone()))
        param.data.copy_(value.to(param.dtype))


def restore(backup: list) -> None:
    """Put back what :func:`merge` replaced, last first; ``backup`` is emptied by the caller."""
    from adaptkit import quant

    for module, param_name, original in reversed(backup):
        if isinstance(original, torch.nn.Parameter):
            setattr(module, param_name, original)
        elif param_name == "weight" and quant.is_quantized(module):
            quant.restore(module, original)
        else:
            module.get_parameter(param_name).data.copy_(original)


def _shared_parameters(model: torch.nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (tied weights)."""
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}
