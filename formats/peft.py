"""The Hugging Face PEFT layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Key names in PEFT files look like
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. adaptkit's in-memory names
are the base module name (``model.layers.0.self_attn.q_proj``) and a field of
:class:`~adaptkit.adapters.lora.LoraWeights`. Every rename lives in ``LORA_KEY_TABLE``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from adaptkit.adapters.lora import LoraAdapter, LoraConfig, LoraWeights, TokenRows
from adaptkit.arch import family_of_class
from adaptkit.errors import AdapterFormatError, UnsupportedAdapterError
from adaptkit.formats import fields
from adaptkit.formats.tensors import first_existing, load_adapter_tensors

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
KEY_PREFIX = "base_model.model."
ADAPTKIT_META = "adaptkit.json"  # beside a PEFT folder: adaptkit's extra facts (base fingerprint)

# PEFT key suffix -> LoraWeights field. The first entry of a field is the one adaptkit writes.
LORA_KEY_TABLE: dict[str, str] = {
    "lora_A.weight": "lora_A",
    "lora_B.weight": "lora_B",
    "lora_B.bias": "lora_B_bias",
    "lora_magnitude_vector": "magnitude",
    "lora_magnitude_vector.weight": "magnitude",  # PEFT < 0.14
    "lora_embedding_A": "lora_A",  # a LoRA on an embedding table: A [r, vocab], B [dim, r]
    "lora_embedding_B": "lora_B",
}
LORA_FIELD_TO_KEY = {field: key for key, field in reversed(LORA_KEY_TABLE.items())}

# LoRA config fields: those adaptkit implements, and those that only matter when training.
_LORA_FIELDS = {
    "r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "fan_in_fan_out", "lora_bias",
    "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "exclude_modules",
    "modules_to_save", "bias", "init_lora_weights", "trainable_token_indices", "ensure_weight_tying",
    "target_parameters",
}
_TRAINING_ONLY = {
    "peft_type", "task_type", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "lora_dropout", "loftq_config", "auto_mapping", "megatron_core", "qalora_group_size",
    "eva_config", "corda_config", "astra_config", "runtime_config", "lora_ga_config",
    # (inits whose load re-run changes the base are refused through init_lora_weights instead)
    # training-time techniques whose saved adapters compute exactly as plain LoRA (PEFT's outputs are
    # bit-identical without them): VeLoRA's activation compression, MonteCLoRA's sampling (off in eval),
    # QA-LoRA's input pooling (it acts on GPTQ-quantized bases only; adaptkit loads no GPTQ base)
    "velora_config", "monteclora_config", "use_qalora",
}
# option -> the tensors it saves beside the factors that inference never reads
_TRAINING_STATE = {"velora_config": "lora_velora_", "monteclora_config": "lora_monteclora_"}
# Fields whose non-empty value changes the forward pass in a way adaptkit does not implement.
_UNSUPPORTED_WHEN_SET = {
    "layer_replication", "alora_invocation_tokens",
    "megatron_config", "use_bdlora", "arrow_config", "kasa_config",
}

PEFT_TYPES = {"LORA": "lora", "PREFIX_TUNING": "prefix", "P_TUNING": "ptuning", "PROMPT_TUNING": "prompt"}


def read_config(folder: Path) -> dict:
    """``adapter_config.json`` of a folder, with errors that say what is wrong."""
    path = folder / CONFIG_NAME
    if not folder.exists():
        raise AdapterFormatError(f"{folder}: no such adapter folder")
    if not path.is_file():
        raise AdapterFormatError(f"{folder}: no {CONFIG_NAME}; an adapter folder needs its config beside the weights")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object")
    return config


def is_peft_config(config: dict) -> bool:
    return "peft_type" in config


def _check_fields(config: dict, path: Path) -> None:
    for key, value in config.items():
        if key in _LORA_FIELDS or key in _TRAINING_ONLY:
            continue
        if key in _UNSUPPORTED_WHEN_SET:
            if value in (None, False, [], {}, ""):
                continue
            raise UnsupportedAdapterError(
                f"{path}: {key}={value!r} is not supported by adaptkit; re-train without it or merge with PEFT first"
            )
        if value in (None, False, [], {}, ""):
            continue
        raise UnsupportedAdapterError(f"{path}: unknown LoRA field {key}={value!r}; adaptkit does not implement it")
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise UnsupportedAdapterError(f"{path}: bias={config['bias']!r} is not one of PEFT's none, all, lora_only")


def _init_lora_weights(config: dict, path: Path) -> bool | str:
    """``init_lora_weights``: PEFT re-runs it at load, and some inits change the base weights then."""
    from adaptkit.adapters.lora import PLAIN_INITS, RESIDUAL_INITS

    value = config.get("init_lora_weights", True)
    if value in PLAIN_INITS or value in RESIDUAL_INITS:
        return value
    if isinstance(value, str) and value.startswith(("pissa_niter_", "corda", "loftq", "lora_ga", "astra")):
        raise UnsupportedAdapterError(
            f"{path}: init_lora_weights={value!r}: PEFT changes the base weights when it loads this adapter, from a "
            "randomized SVD, calibration data or quantization that cannot be recomputed exactly here. Convert it to a "
            "plain LoRA with PEFT: keep the adapter as initialised (model.save_pretrained('init') before training), "
            "then model.save_pretrained(OUT, path_initial_model_for_weight_conversion='init'); adaptkit serves OUT "
            "exactly")
    raise UnsupportedAdapterError(f"{path}: init_lora_weights={value!r} is not an init adaptkit knows; known: "
                                  f"{', '.join(map(str, PLAIN_INITS + RESIDUAL_INITS))}")


def lora_config_from_peft(config: dict, path: Path) -> LoraConfig:
    """Build a :class:`LoraConfig` from a PEFT LoRA config dict."""
    _check_fields(config, path)
    targets = fields.get_names(config, "target_modules", path, allow_regex=True)
    parameters = tuple(fields.get_names(config, "target_parameters", path) or ())
    if targets is None and not parameters:
        raise AdapterFormatError(f"{path}: target_modules is missing")
    pattern = fields.get_names(config, "layers_pattern", path)
    return LoraConfig(
        r=fields.get_int(config, "r", path),
        alpha=fields.get_float(config, "lora_alpha", path, default=8),
        target_modules=targets or (),
        target_parameters=parameters,
        use_rslora=fields.get_bool(config, "use_rslora", path),
        use_dora=fields.get_bool(config, "use_dora", path),
        fan_in_fan_out=fields.get_bool(config, "fan_in_fan_out", path),
        lora_bias=fields.get_bool(config, "lora_bias", path),
        rank_pattern=fields.get_pattern(config, "rank_pattern", path, integer=True),
        alpha_pattern=fields.get_pattern(config, "alpha_pattern", path, integer=False),
        layers_to_transform=fields.get_ints(config, "layers_to_transform", path),
        layers_pattern=pattern or None,
        exclude_modules=fields.get_names(config, "exclude_modules", path, allow_regex=True),
        modules_to_save=fields.get_names(config, "modules_to_save", path) or (),
        init_lora_weights=_init_lora_weights(config, path),
    )


def place_module_tensor(module: str, param: str, tensor: torch.Tensor, lora_config: LoraConfig, saved: dict,
                        base_weights: dict, adapted: frozenset[str] = frozenset(), tied: bool = False) -> bool:
    """File a key that is not an adapter weight: a targeted layer's own tensor (PEFT saves those of
    embedding and output layers, ``.base_layer.``) or a ``modules_to_save`` entry. False: it is neither.

    ``adapted``: the modules the file holds LoRA factors for (targeted, whatever the config lists: with
    ``ensure_weight_tying`` PEFT adapts the tied partner of a targeted embedding or head too). ``tied``:
    ``ensure_weight_tying`` is set, so a stored module's tied partner is stored beside it (PEFT 0.22 saves
    ``lm_head.weight`` with a saved ``embed_tokens``); its module is checked against the base at load."""
    layer = module.removesuffix(".base_layer")
    if layer != module and (lora_config.targets(layer) or layer in adapted):
        base_weights.setdefault(layer, {})[param] = tensor
        return True
    module = module.replace(".modules_to_save.default", "")
    if lora_config.saves_module(module) or (tied and layer == module):
        saved.setdefault(module, {})[param] = tensor
        return True
    return False


TOKEN_ROWS_KEY = ".token_adapter.trainable_tokens_delta"  # PEFT's TrainableTokens: the new rows themselves


def _token_indices(field, module: str, path: Path) -> list[int]:
    """The token ids of ``module``'s trainable rows: a list (the input embeddings), or {module suffix: list}."""
    if isinstance(field, dict):
        field = next((ids for name, ids in field.items() if module == name or module.endswith("." + name)), None)
    if not isinstance(field, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in field):
        raise AdapterFormatError(f"{path}: trainable_token_indices has no list of token ids for {module}")
    return field


def split_lora_key(key: str) -> tuple[str, str] | None:
    """``model.layers.0.q_proj.lora_A.weight`` -> (``model.layers.0.q_proj``, ``lora_A``)."""
    for suffix, field in LORA_KEY_TABLE.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], field
    return None


def _strip_prefix(key: str) -> str:
    return key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else key


def read_lora(folder: str | os.PathLike, config: dict | None = None) -> LoraAdapter:
    """Read a PEFT LoRA folder into a :class:`LoraAdapter` (tensors on CPU, as stored)."""
    folder = Path(folder)
    config = read_config(folder) if config is None else config
    cfg_path = folder / CONFIG_NAME
    lora_config = lora_config_from_peft(config, cfg_path)
    weight_file = first_existing(folder, WEIGHT_NAMES)
    if weight_file is None:
        raise AdapterFormatError(f"{folder}: no {' or '.join(WEIGHT_NAMES)} beside {CONFIG_NAME}")
    state = load_adapter_tensors(weight_file)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {}
    base_weights: dict[str, dict[str, torch.Tensor]] = {}
    embedding_layers: set[str] = set()
    trained_biases: dict[str, torch.Tensor] = {}
    token_rows: dict[str, torch.Tensor] = {}
    parameter_factors: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    adapted = frozenset(split[0] for split in map(split_lora_key, map(_strip_prefix, state)) if split is not None)
    tied = fields.get_bool(config, "ensure_weight_tying", cfg_path)
    for raw_key, tensor in state.items():
        key = _strip_prefix(raw_key)
        if any(f".{state_key}" in key for option, state_key in _TRAINING_STATE.items() if config.get(option)):
            continue  # what a training-time option keeps for its backward pass or sampler: unused at inference
        if key.endswith(TOKEN_ROWS_KEY):
            token_rows[key[: -len(TOKEN_ROWS_KEY)]] = tensor
            continue
        split = split_lora_key(key)
        if split is not None and lora_config.target_parameters and not lora_config.targets(split[0]):
            owner, depth = split[0], 0  # a targeted parameter's module; PEFT nests one wrapper per parameter
            while owner.endswith(".base_layer"):
                owner, depth = owner.removesuffix(".base_layer"), depth + 1
            parameter_factors.setdefault(owner, {}).setdefault(depth, {})[split[1]] = tensor
            continue
        if split is not None:
            module, field = split
            if ".lora_embedding_" in key:
                embedding_layers.add(module)
            factors.setdefault(module, {})[field] = tensor
            continue
        module, _, param = key.rpartition(".")
        trains_biases = config.get("bias", "none") != "none"
        if trains_biases and param == "bias" and not lora_config.saves_module(module.removesuffix(".base_layer")):
            trained_biases[module.removesuffix(".base_layer")] = tensor  # PEFT bias="all" / "lora_only"
            continue
        if place_module_tensor(module, param, tensor, lora_config, saved, base_weights, adapted, tied):
            continue
        raise AdapterFormatError(f"{weight_file}: unexpected key {raw_key!r} (not a LoRA factor nor a modules_to_save entry)")
    if not factors and not saved and not parameter_factors:
        raise AdapterFormatError(f"{weight_file}: holds no LoRA weights")
    for owner, by_depth in parameter_factors.items():
        for depth, pair in by_depth.items():
            if set(pair) != {"lora_A", "lora_B"}:
                raise AdapterFormatError(f"{weight_file}: {owner}{'.base_layer' * depth} lacks lora_A or lora_B")
            by_depth[depth] = (pair["lora_A"], pair["lora_B"])
    layers = {}
    for module, tensors in factors.items():
        if "lora_A" not in tensors or "lora_B" not in tensors:
            raise AdapterFormatError(f"{weight_file}: module {module!r} lacks lora_A or lora_B")
        a, b = tensors["lora_A"], tensors["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterFormatError(
                f"{weight_file}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not [r, in] and [out, r]"
            )
        if a.shape[0] != lora_config.rank_for(module):
            raise AdapterFormatError(
                f"{weight_file}: {module}: the factors have rank {a.shape[0]} but {cfg_path} says r="
                f"{lora_config.rank_for(module)} (rank_pattern included); the config does not belong to these weights"
            )
        if lora_config.use_dora and "magnitude" not in tensors:
            raise AdapterFormatError(f"{weight_file}: {module}: use_dora is set but lora_magnitude_vector is missing")
        layers[module] = LoraWeights(
            a, b, lora_config.scale_for(module), lora_B_bias=tensors.get("lora_B_bias"), magnitude=tensors.get("magnitude"),
            embedding=module in embedding_layers)
    for module, values in token_rows.items():
        if module in layers:
            raise UnsupportedAdapterError(f"{weight_file}: {module} has both LoRA factors and trainable token rows; "
                                          "merge one of them into the base with PEFT first")
        indices = _token_indices(config.get("trainable_token_indices"), module, cfg_path)
        if len(indices) != values.shape[0]:
            raise AdapterFormatError(f"{weight_file}: {module}: {values.shape[0]} trainable token rows but {cfg_path} "
                                     f"lists {len(indices)} trainable_token_indices")
        layers[module] = TokenRows(torch.tensor(indices), values, embedding=True)
    return lora_adapter_of(folder, config, lora_config, layers, saved_modules=saved, base_weights=base_weights,
                           trained_biases=trained_biases, parameter_factors=parameter_factors)


def lora_adapter_of(folder: Path, config: dict, lora_config: LoraConfig, layers: dict, **parts) -> LoraAdapter:
    """The :class:`LoraAdapter` read from a PEFT ``folder``: its layers and ``parts`` (saved modules, ...),
    with what the folder records (the base fingerprint beside it, the base class in ``auto_mapping``)."""
    return LoraAdapter(config=lora_config, layers=layers, fingerprint=read_adaptkit_meta(folder).get("base_fingerprint"),
                       source=str(folder), base_class=(config.get("auto_mapping") or {}).get("base_model_class"),
                       **parts)


def read_adaptkit_meta(folder: Path) -> dict:
    path = folder / ADAPTKIT_META
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"{path}: not valid JSON ({exc})") from exc


def lora_config_to_peft(config: LoraConfig, base_class: str | None = None) -> dict:
    """The PEFT ``adapter_config.json`` dict of a :class:`LoraConfig`."""
    targets = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
    out = {
        "peft_type": "LORA",
        "task_type": task_type_for(base_class),
        "r": config.r,
        "lora_alpha": config.alpha,
        "target_modules": targets,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "fan_in_fan_out": config.fan_in_fan_out,
        "lora_bias": config.lora_bias,
        "bias": "none",
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "layers_to_transform": list(config.layers_to_transform) if config.layers_to_transform else None,
        "layers_pattern": list(config.layers_pattern) if config.layers_pattern else None,
        "modules_to_save": list(config.modules_to_save) or None,
        "lora_dropout": 0.0,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    if config.init_lora_weights not in (True, False):  # PEFT re-runs it at load: keep it (pissa, olora, ...)
        out["init_lora_weights"] = config.init_lora_weights
    if base_class:
        out["auto_mapping"] = {"base_model_class": base_class, "parent_library": "transformers"}
    return out


def lora_state_dict(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """The PEFT-named tensors of a LoRA (inverse of the reading in :func:`read_lora`)."""
    state = {}
    for module, weights in adapter.layers.items():
        for field in ("lora_A", "lora_B", "lora_B_bias", "magnitude"):
            tensor = getattr(weights, field)
            if tensor is not None:
                key = LORA_FIELD_TO_KEY[field]
                if weights.embedding and field in ("lora_A", "lora_B"):
                    key = f"lora_embedding_{field[-1]}"
                state[f"{KEY_PREFIX}{module}.{key}"] = tensor.detach().contiguous().cpu()
    for module, params in adapter.saved_modules.items():
        for param, tensor in params.items():
            state[f"{KEY_PREFIX}{module}.{param}"] = tensor.detach().contiguous().cpu()
    return state


def write_lora(adapter: LoraAdapter, folder: str | os.PathLike) -> Path:
    """Write a LoRA in the PEFT layout into an existing (normally temporary) folder."""
    folder = Path(folder)
    if adapter.residual_folded:
        raise UnsupportedAdapterError(
            f"{adapter.source or 'adapter'}: its factors carry the base residual of init_lora_weights="
            f"{adapter.config.init_lora_weights!r} (folded at load); write the adapter as it was read instead")
    if adapter.trained_biases or any(not isinstance(w, LoraWeights) for w in adapter.layers.values()):
        raise UnsupportedAdapterError(
            f"{adapter.source or 'adapter'}: trained biases, token rows and other PEFT methods' weights are read "
            "from PEFT's files, not written by adaptkit; save such an adapter with PEFT")
    folder.mkdir(parents=True, exist_ok=True)
    config = lora_config_to_peft(adapter.config, adapter.base_class)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(lora_state_dict(adapter), str(folder / WEIGHT_NAMES[0]), metadata={"format": "pt"})
    if adapter.fingerprint:
        (folder / ADAPTKIT_META).write_text(json.dumps({"base_fingerprint": adapter.fingerprint}, indent=2))
    return folder


def add_peft_head(folder: Path, module: str, state: dict, task: str, prompt_learning: bool) -> None:
    """Add a trained task head to a PEFT folder as PEFT saves one (``task_type`` SEQ_CLS / TOKEN_CLS,
    ``modules_to_save``; its tensors beside the adapter's)."""
    from safetensors.torch import load_file

    config = json.loads((folder / CONFIG_NAME).read_text())
    config["task_type"] = {"seq-cls": "SEQ_CLS", "token-cls": "TOKEN_CLS"}[task]
    config["modules_to_save"] = [module]
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    tensors = load_file(str(folder / WEIGHT_NAMES[0]))
    prefix = "base_model." if prompt_learning else KEY_PREFIX
    tensors.update({f"{prefix}{module}.{param}": t.detach().cpu().contiguous() for param, t in state.items()})
    save_file(tensors, str(folder / WEIGHT_NAMES[0]), metadata={"format": "pt"})


def task_type_for(base_class: str | None) -> str | None:
    """PEFT's ``task_type`` for an adapter of this base class: CAUSAL_LM, SEQ_2_SEQ_LM (T5, BART), or None
    for encoders (PEFT's causal-LM wrapper refuses them; a trained head sets SEQ_CLS / TOKEN_CLS)."""
    family = family_of_class(base_class) if base_class else None
    return {"bert": None, "t5": "SEQ_2_SEQ_LM", "bart": "SEQ_2_SEQ_LM"}.get(family, "CAUSAL_LM")
