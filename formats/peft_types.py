"""PEFT's other weight-delta methods in PEFT's layout: AdaLoRA, VeRA, LoHa, LoKr and (IA)^3.

Each is read into a :class:`~adaptkit.adapters.lora.LoraAdapter` (``peft_type`` says which): AdaLoRA
and VeRA become plain LoRA factors, LoHa, LoKr and (IA)^3 keep their own weights
(:mod:`adaptkit.adapters.peft_types`). Stored keys, after PEFT's ``base_model.model.`` prefix:

    ADALORA  <module>.lora_A [r, in], .lora_B [out, r], .lora_E [r, 1] (r pruned by rank_pattern), .ranknum (old PEFT)
    VERA     base_model.vera_A [r, in_max], base_model.vera_B [out_max, r] (save_projection),
             <module>.vera_lambda_b [out], .vera_lambda_d [r]
    LOHA     <module>.hada_w1_a [out, r], .hada_w1_b [r, in], .hada_w2_a, .hada_w2_b (.hada_t1/t2: convolutions)
    LOKR     <module>.lokr_w1 or .lokr_w1_a/.lokr_w1_b, .lokr_w2 or .lokr_w2_a/.lokr_w2_b (.lokr_t2: convolutions)
    IA3      <module>.ia3_l [1, in] (feedforward_modules) or [out, 1]

Every config field that changes the outputs is either implemented or refused by name; fields that
only matter when training (dropouts, schedules, inits) are ignored.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from adaptkit.adapters.lora import LoraAdapter, LoraConfig
from adaptkit.adapters.peft_types import (
    IA3Weights,
    LohaWeights,
    LokrWeights,
    adalora_weights,
    vera_weights,
)
from adaptkit.errors import AdapterFormatError, UnsupportedAdapterError
from adaptkit.formats import fields
from adaptkit.formats.peft import (
    CONFIG_NAME,
    WEIGHT_NAMES,
    _strip_prefix,
    lora_adapter_of,
    place_module_tensor,
    read_config,
)
from adaptkit.formats.tensors import first_existing, load_adapter_tensors

PEFT_TYPES = ("ADALORA", "VERA", "LOHA", "LOKR", "IA3")

_COMMON = {"peft_type", "task_type", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
           "auto_mapping"}
_TARGETING = {"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save"}
# per type: the fields adaptkit reads, and those that do not change inference (training schedules,
# dropouts, inits; for AdaLoRA, LoRA options its SVD layers ignore: r, use_rslora, lora_bias, alpha_pattern)
_READ = {
    "ADALORA": _TARGETING | {"init_r", "lora_alpha", "rank_pattern", "bias", "fan_in_fan_out"},
    "VERA": _TARGETING | {"r", "save_projection", "projection_prng_key", "bias", "fan_in_fan_out"},
    "LOHA": _TARGETING | {"r", "alpha", "rank_pattern", "alpha_pattern", "use_effective_conv2d"},
    "LOKR": _TARGETING | {"r", "alpha", "rank_pattern", "alpha_pattern", "use_effective_conv2d", "decompose_both",
                          "decompose_factor"},
    "IA3": _TARGETING | {"feedforward_modules", "fan_in_fan_out"},
}
_NOT_AT_INFERENCE = {
    "ADALORA": {"r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step",
                "lora_dropout", "init_lora_weights", "use_rslora", "lora_bias", "alpha_pattern", "megatron_core",
                "qalora_group_size", "runtime_config"},
    "VERA": {"vera_dropout", "d_initial", "init_weights"},
    "LOHA": {"rank_dropout", "module_dropout", "init_weights"},
    "LOKR": {"rank_dropout", "module_dropout", "rank_dropout_scale", "init_weights"},
    "IA3": {"init_ia3_weights"},
}
# tensor names of one adapted layer, per type
_LAYER_KEYS = {
    "ADALORA": {"lora_A", "lora_B", "lora_E", "ranknum"},
    "VERA": {"vera_lambda_b", "vera_lambda_d"},
    "LOHA": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    "LOKR": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
    "IA3": {"ia3_l"},
}
_VERA_PROJECTIONS = ("vera_A", "vera_B")
_PEFT_ADAPTER_NAME = "default"  # the name PeftModel.from_pretrained loads an adapter under (AdaLoRA's rank_pattern keys)


def _is_empty(value) -> bool:
    return value in (None, False, [], {}, "")


def check_fields(config: dict, path: Path, peft_type: str) -> None:
    """Refuse every set field of ``config`` that adaptkit neither implements nor can ignore at inference."""
    known = _COMMON | _READ[peft_type] | _NOT_AT_INFERENCE[peft_type]
    for key, value in config.items():
        if key not in known and not _is_empty(value):
            raise UnsupportedAdapterError(
                f"{path}: {peft_type} field {key}={value!r} is not supported by adaptkit; re-train without it, or "
                "merge the adapter into the base with PEFT (merge_and_unload) and serve the merged model")
    if "bias" in _READ[peft_type] and config.get("bias", "none") not in (None, "none"):
        raise UnsupportedAdapterError(
            f"{path}: bias={config['bias']!r} (base biases trained with the {peft_type} adapter) is not supported for "
            f"{peft_type}; re-train with bias='none'")


def _lora_config(config: dict, path: Path, peft_type: str) -> LoraConfig:
    """The selection (targets, exclusions, layers, stored modules) and, where the method has them, r and alpha."""
    targets = fields.get_names(config, "target_modules", path, allow_regex=True)
    if targets is None:
        raise AdapterFormatError(f"{path}: target_modules is missing")
    if peft_type == "ADALORA":
        r, alpha = fields.get_int(config, "init_r", path, default=12), fields.get_float(config, "lora_alpha", path, 8)
    elif peft_type == "VERA":
        r = fields.get_int(config, "r", path, default=256)
        alpha = float(r)  # scale 1
    elif peft_type == "IA3":
        r, alpha = 1, 1.0  # no rank: one vector per layer
    else:
        r, alpha = fields.get_int(config, "r", path, default=8), fields.get_float(config, "alpha", path, default=8)
    patterns = peft_type in ("LOHA", "LOKR")
    return LoraConfig(
        r=r, alpha=alpha, target_modules=targets,
        fan_in_fan_out=fields.get_bool(config, "fan_in_fan_out", path),
        rank_pattern=fields.get_pattern(config, "rank_pattern", path, integer=True) if patterns else {},
        alpha_pattern=fields.get_pattern(config, "alpha_pattern", path, integer=False) if patterns else {},
        layers_to_transform=fields.get_ints(config, "layers_to_transform", path),
        layers_pattern=fields.get_names(config, "layers_pattern", path) or None,
        exclude_modules=fields.get_names(config, "exclude_modules", path, allow_regex=True),
        modules_to_save=fields.get_names(config, "modules_to_save", path) or (),
    )


def _need(tensors: dict, names, module: str, where: Path) -> list[torch.Tensor]:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise AdapterFormatError(f"{where}: module {module!r} lacks {', '.join(missing)}; the file is incomplete")
    return [tensors[n] for n in names]


def _refuse_conv(where: Path, module: str, what: str) -> UnsupportedAdapterError:
    return UnsupportedAdapterError(
        f"{where}: {module}: {what}: the adapter acts on a convolution layer, which adaptkit does not serve "
        "(linear layers only); re-train it without convolution targets")


def _shape_error(where: Path, module: str, what: str) -> AdapterFormatError:
    return AdapterFormatError(f"{where}: {module}: {what}; the config does not belong to these weights, or the file "
                              "is corrupt")


# ----------------------------------------------------------------------------- one reader per method
def _adalora_ranks(config: dict, path: Path, init_r: int) -> dict[str, int]:
    """Each pruned module's kept rank from AdaLoRA's saved ``rank_pattern`` ({param name: keep mask}).

    PEFT's ``resize_modules_by_rank_pattern``: the module is the name without its last part (two parts
    when the key still holds the adapter name), the kept rank is the number of true entries.
    """
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise AdapterFormatError(f"{path}: rank_pattern must be an object {{name: [true/false per rank]}}, got {pattern!r}")
    ranks = {}
    for name, mask in pattern.items():
        if not isinstance(mask, list) or not all(isinstance(m, bool) for m in mask) or len(mask) > init_r:
            raise AdapterFormatError(f"{path}: rank_pattern[{name!r}] must be a list of at most init_r={init_r} "
                                     f"true/false values (AdaLoRA's mask of kept ranks), got {mask!r}")
        parts = name.split(".")
        module = ".".join(parts[:-2] if _PEFT_ADAPTER_NAME in name else parts[:-1])
        ranks[module] = sum(mask)
    return ranks


def _adalora_layers(factors: dict, config: dict, path: Path, where: Path) -> dict:
    init_r = fields.get_int(config, "init_r", path, default=12)
    alpha = fields.get_float(config, "lora_alpha", path, default=8)
    ranks = _adalora_ranks(config, path, init_r)
    layers = {}
    for module, tensors in factors.items():
        A, B, E = _need(tensors, ("lora_A", "lora_B", "lora_E"), module, where)
        r = ranks.get(module, init_r)
        if A.ndim != 2 or B.ndim != 2 or tuple(E.shape) not in ((r, 1), (r,)) or A.shape[0] != r or B.shape[1] != r:
            raise _shape_error(where, module, f"lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)} and lora_E "
                                              f"{tuple(E.shape)} are not [r, in], [out, r] and [r, 1] with r={r} (init_r "
                                              "and rank_pattern)")
        if r == 0:
            continue  # every rank pruned: the layer adds exactly zero
        ranknum = float(tensors["ranknum"].reshape(-1)[0]) if "ranknum" in tensors else float(init_r)
        scaling = alpha if alpha > 0 else float(r)  # PEFT: lora_alpha, or the layer's rank when alpha <= 0
        layers[module] = adalora_weights(A, B, E.reshape(r, 1), scaling, ranknum)
    return layers


def _vera_layers(factors: dict, config: dict, path: Path, where: Path, projections: dict) -> dict:
    r = fields.get_int(config, "r", path, default=256)
    if not fields.get_bool(config, "save_projection", path, default=True):
        raise UnsupportedAdapterError(
            f"{path}: save_projection=false: the shared projections vera_A/vera_B are not in the file. PEFT regenerates "
            f"them from projection_prng_key={config.get('projection_prng_key')!r} with shapes taken from the base's "
            "largest adapted layer, which adaptkit does not reproduce. Re-train with VeraConfig(save_projection=True) "
            "(PEFT's default), or merge the adapter into the base with PEFT (merge_and_unload)")
    vera_A, vera_B = (projections.get(name) for name in _VERA_PROJECTIONS)
    if vera_A is None or vera_B is None:
        raise AdapterFormatError(f"{where}: save_projection is true but base_model.vera_A / base_model.vera_B are "
                                 "missing; the file is incomplete")
    if vera_A.ndim != 2 or vera_B.ndim != 2 or vera_A.shape[0] != r or vera_B.shape[1] != r:
        raise _shape_error(where, "base_model", f"vera_A {tuple(vera_A.shape)} and vera_B {tuple(vera_B.shape)} are not "
                                                f"[r, in] and [out, r] with r={r}")
    layers = {}
    for module, tensors in factors.items():
        lambda_b, lambda_d = _need(tensors, ("vera_lambda_b", "vera_lambda_d"), module, where)
        if lambda_d.numel() != r or lambda_b.ndim != 1 or lambda_b.numel() > vera_B.shape[0]:
            raise _shape_error(where, module, f"vera_lambda_d {tuple(lambda_d.shape)} / vera_lambda_b "
                                              f"{tuple(lambda_b.shape)} do not fit r={r} and vera_B {tuple(vera_B.shape)}")
        layers[module] = vera_weights(vera_A, vera_B, lambda_b, lambda_d)
    return layers


def _loha_layers(factors: dict, lora_config: LoraConfig, where: Path) -> dict:
    layers = {}
    for module, tensors in factors.items():
        if "hada_t1" in tensors or "hada_t2" in tensors:
            raise _refuse_conv(where, module, "hada_t1/hada_t2 (LoHa's effective-convolution factors)")
        w1_a, w1_b, w2_a, w2_b = _need(tensors, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), module, where)
        if any(t.ndim != 2 for t in (w1_a, w1_b, w2_a, w2_b)):
            raise _refuse_conv(where, module, "LoHa factors with more than 2 dimensions")
        r = lora_config.rank_for(module)
        if not (w1_a.shape == w2_a.shape and w1_b.shape == w2_b.shape and w1_a.shape[1] == w1_b.shape[0] == r):
            raise _shape_error(where, module, f"hada_w1_a {tuple(w1_a.shape)}, hada_w1_b {tuple(w1_b.shape)}, hada_w2_a "
                                              f"{tuple(w2_a.shape)}, hada_w2_b {tuple(w2_b.shape)} are not [out, r] and "
                                              f"[r, in] with r={r} (rank_pattern included)")
        layers[module] = LohaWeights(w1_a, w1_b, w2_a, w2_b, lora_config.scale_for(module), module)
    return layers


def _lokr_factor(tensors: dict, name: str, module: str, where: Path, r: int) -> tuple[torch.Tensor, ...]:
    """``(w,)`` or ``(w_a, w_b)`` for ``name`` (lokr_w1 / lokr_w2)."""
    if name in tensors:
        parts = (tensors[name],)
    else:
        parts = tuple(_need(tensors, (f"{name}_a", f"{name}_b"), module, where))
        if parts[0].ndim == 2 and parts[1].ndim == 2 and not parts[0].shape[1] == parts[1].shape[0] == r:
            raise _shape_error(where, module, f"{name}_a {tuple(parts[0].shape)} and {name}_b {tuple(parts[1].shape)} "
                                              f"are not [m, r] and [r, n] with r={r} (rank_pattern included)")
    if any(p.ndim != 2 for p in parts):
        raise _refuse_conv(where, module, f"{name} with more than 2 dimensions")
    return parts


def _lokr_layers(factors: dict, lora_config: LoraConfig, where: Path) -> dict:
    layers = {}
    for module, tensors in factors.items():
        if "lokr_t2" in tensors:
            raise _refuse_conv(where, module, "lokr_t2 (LoKr's effective-convolution factor)")
        r = lora_config.rank_for(module)
        w1 = _lokr_factor(tensors, "lokr_w1", module, where, r)
        w2 = _lokr_factor(tensors, "lokr_w2", module, where, r)
        layers[module] = LokrWeights(w1, w2, lora_config.scale_for(module), r, module)
    return layers


def is_feedforward(config: dict, path: Path, module: str) -> bool:
    """PEFT's ``_check_target_module_feedforward``: a regex matches the whole name, a list entry its end."""
    rule = config.get("feedforward_modules")
    if rule is None:
        return False
    if isinstance(rule, str):
        return re.fullmatch(rule, module) is not None
    names = fields.get_names(config, "feedforward_modules", path)
    return any(module.endswith(name) for name in names)


def _ia3_layers(factors: dict, config: dict, path: Path, where: Path) -> dict:
    layers = {}
    for module, tensors in factors.items():
        (vector,) = _need(tensors, ("ia3_l",), module, where)
        if vector.ndim > 2:
            raise _refuse_conv(where, module, f"ia3_l of shape {tuple(vector.shape)}")
        feedforward = is_feedforward(config, path, module)
        fits = vector.ndim == 2 and (vector.shape[0] == 1 if feedforward else vector.shape[1] == 1)
        if not fits:
            expected = "[1, in] (a feedforward module: it scales the input)" if feedforward else \
                "[out, 1] (not in feedforward_modules: it scales the output)"
            raise _shape_error(where, module, f"ia3_l has shape {tuple(vector.shape)} but feedforward_modules makes it "
                                              f"{expected}")
        layers[module] = IA3Weights(vector, feedforward, module)
    return layers


# ----------------------------------------------------------------------------- the reader
def _split_state(state: dict, peft_type: str, lora_config: LoraConfig, where: Path):
    """(per-module layer tensors, VeRA projections, modules_to_save, base-layer tensors) of a PEFT file."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    projections: dict[str, torch.Tensor] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {}
    base_weights: dict[str, dict[str, torch.Tensor]] = {}
    for raw_key, tensor in state.items():
        key = _strip_prefix(raw_key)
        module, _, param = key.rpartition(".")
        if param in _LAYER_KEYS[peft_type]:
            factors.setdefault(module, {})[param] = tensor
            continue
        if peft_type == "VERA" and param in _VERA_PROJECTIONS and module in ("base_model", ""):
            projections[param] = tensor
            continue
        if place_module_tensor(module, param, tensor, lora_config, saved, base_weights):
            continue
        raise AdapterFormatError(f"{where}: unexpected key {raw_key!r} (not a {peft_type} weight nor a modules_to_save "
                                 "entry)")
    return factors, projections, saved, base_weights


def read_peft_type(folder: str | os.PathLike, config: dict | None = None) -> LoraAdapter:
    """Read a PEFT AdaLoRA, VeRA, LoHa, LoKr or (IA)^3 folder into a LoRA-family :class:`LoraAdapter`."""
    folder = Path(folder)
    config = read_config(folder) if config is None else config
    path = folder / CONFIG_NAME
    peft_type = str(config.get("peft_type"))
    if peft_type not in PEFT_TYPES:
        raise UnsupportedAdapterError(f"{path}: peft_type {peft_type!r} is not one of {', '.join(PEFT_TYPES)}")
    check_fields(config, path, peft_type)
    lora_config = _lora_config(config, path, peft_type)
    weight_file = first_existing(folder, WEIGHT_NAMES)
    if weight_file is None:
        raise AdapterFormatError(f"{folder}: no {' or '.join(WEIGHT_NAMES)} beside {CONFIG_NAME}")
    factors, projections, saved, base_weights = _split_state(load_adapter_tensors(weight_file), peft_type,
                                                             lora_config, weight_file)
    if not factors and not saved:
        raise AdapterFormatError(f"{weight_file}: holds no {peft_type} weights")
    if peft_type == "ADALORA":
        layers = _adalora_layers(factors, config, path, weight_file)
    elif peft_type == "VERA":
        layers = _vera_layers(factors, config, path, weight_file, projections)
    elif peft_type == "LOHA":
        layers = _loha_layers(factors, lora_config, weight_file)
    elif peft_type == "LOKR":
        layers = _lokr_layers(factors, lora_config, weight_file)
    else:
        layers = _ia3_layers(factors, config, path, weight_file)
    return lora_adapter_of(folder, config, lora_config, layers, saved_modules=saved, base_weights=base_weights,
                           peft_type=peft_type)
