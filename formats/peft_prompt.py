"""PEFT's prompt-learning layouts (PREFIX_TUNING, P_TUNING, PROMPT_TUNING): ``adapter_config.json`` and one
tensor, the folded prefix K/V or soft prompt; a training checkpoint's reparameterisation folded once.
The LoRA layout and what both share are ``formats/peft.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from adaptkit.adapters.prefix import (
    PrefixAdapter,
    PrefixConfig,
    flat_from_prefix,
    fold_prefix_mlp,
    prefix_from_flat,
)
from adaptkit.adapters.prompt import PromptAdapter, PromptConfig, fold_lstm_encoder, fold_mlp_encoder
from adaptkit.errors import AdapterFormatError, UnsupportedAdapterError
from adaptkit.formats import fields
from adaptkit.formats.peft import (
    _TRAINING_ONLY,
    ADAPTKIT_META,
    CONFIG_NAME,
    WEIGHT_NAMES,
    read_adaptkit_meta,
    read_config,
    task_type_for,
)
from adaptkit.formats.tensors import first_existing, load_adapter_tensors

# PREFIX_TUNING, P_TUNING and PROMPT_TUNING files hold one tensor, the folded result: PEFT saves its
# encoder's output, never the encoder. A training checkpoint (adaptkit's own form) may carry the
# reparameterisation instead, under PEFT's module names (the adapter name after ``prompt_encoder.``
# is optional); it is folded here, once. Renames, file key -> what it is:
PROMPT_KEY_TABLE: dict[str, str] = {
    "prompt_embeddings": "folded: prefix K/V [P, L*2*H_kv*D], or soft prompt [P, hidden]",
    "prompt_encoder.embedding.weight": "encoder input (prompt tuning, P-tuning v2: the folded tensor itself)",
    "prompt_encoder.transform.{0,2}.{weight,bias}": "prefix tuning MLP: Linear, Tanh, Linear",
    "prompt_encoder.mlp_head.{i}.{weight,bias}": "P-tuning MLP head: Linear (ReLU Linear)*",
    "prompt_encoder.lstm_head.*": "P-tuning bidirectional LSTM (torch.nn.LSTM parameter names)",
}
PROMPT_EMBEDDINGS_KEY = "prompt_embeddings"
_ENCODER_MODULES = ("embedding", "transform", "mlp_head", "lstm_head")
_PROMPT_FIELDS = {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                  "num_layers", "modules_to_save"}
_PROMPT_TYPE_FIELDS = {
    "PREFIX_TUNING": {"encoder_hidden_size", "prefix_projection", "init_weights"},
    "P_TUNING": {"encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout"},
    "PROMPT_TUNING": {"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"},
}


def _check_prompt_config(config: dict, path: Path) -> None:
    peft_type = config["peft_type"]
    own = _PROMPT_FIELDS | _PROMPT_TYPE_FIELDS[peft_type]
    for key, value in config.items():
        if key in own or key in _TRAINING_ONLY or value in (None, False, [], {}, ""):
            continue
        raise UnsupportedAdapterError(f"{path}: unknown {peft_type} field {key}={value!r}; adaptkit does not implement it")
    submodules = config.get("num_transformer_submodules") or 1
    if submodules not in (1, 2):
        raise UnsupportedAdapterError(f"{path}: num_transformer_submodules={submodules}: PEFT writes 1 (decoders, "
                                      "encoders) or 2 (encoder-decoders)")


def _positive_int(config: dict, key: str, path: Path) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterFormatError(f"{path}: {key} must be a positive integer, got {value!r}")
    return value


def _prompt_tensors(folder: Path, saves=()) -> tuple[Path, torch.Tensor | None, dict[str, torch.Tensor], dict]:
    """(weight file, ``prompt_embeddings`` or None, encoder tensors by name below ``prompt_encoder.``,
    ``modules_to_save`` entries {module: {param: tensor}}: a task head trained with the prompt)."""
    weight_file = first_existing(folder, WEIGHT_NAMES)
    if weight_file is None:
        raise AdapterFormatError(f"{folder}: no {' or '.join(WEIGHT_NAMES)} beside {CONFIG_NAME}")
    folded, encoder, saved = None, {}, {}
    for key, tensor in load_adapter_tensors(weight_file).items():
        parts = key.split(".")
        if key == PROMPT_EMBEDDINGS_KEY:
            folded = tensor
            continue
        name = key.removeprefix("base_model.").replace(".modules_to_save.default", "")
        module = next((m for m in saves if name.startswith(m + ".")), None)
        if key.startswith("base_model.") and module is not None:
            saved.setdefault(module, {})[name[len(module) + 1:]] = tensor
            continue
        if parts[0] == "prompt_encoder" and len(parts) > 2 and parts[1] not in _ENCODER_MODULES:
            parts = parts[:1] + parts[2:]  # drop the adapter name (prompt_encoder.default.embedding.weight)
        if parts[0] != "prompt_encoder" or len(parts) < 3 or parts[1] not in _ENCODER_MODULES:
            raise AdapterFormatError(
                f"{weight_file}: unexpected key {key!r}; expected {PROMPT_EMBEDDINGS_KEY!r} or prompt_encoder.* tensors"
            )
        encoder[".".join(parts[1:])] = tensor
    if folded is None and "embedding.weight" not in encoder:
        raise AdapterFormatError(f"{weight_file}: no {PROMPT_EMBEDDINGS_KEY!r} tensor (nor a prompt encoder to fold)")
    return weight_file, folded, encoder, saved


def _linears(encoder: dict, module: str, weight_file: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    indices = sorted({int(k.split(".")[1]) for k in encoder if k.startswith(module + ".")})
    try:
        return [(encoder[f"{module}.{i}.weight"], encoder[f"{module}.{i}.bias"]) for i in indices]
    except KeyError as exc:
        raise AdapterFormatError(f"{weight_file}: prompt_encoder.{exc.args[0]} is missing") from exc


def _fold(peft_type: str, folded, encoder: dict, weight_file: Path) -> torch.Tensor:
    """The final tensor; from the encoder when the file carries one (and then equal to any stored result)."""
    if not encoder:
        return folded
    inputs = encoder.get("embedding.weight")
    if inputs is None:
        raise AdapterFormatError(f"{weight_file}: prompt_encoder.embedding.weight is missing")
    lstm = {k.split(".", 1)[1]: v for k, v in encoder.items() if k.startswith("lstm_head.")}
    if peft_type == "PREFIX_TUNING" and any(k.startswith("transform.") for k in encoder):
        (w1, b1), (w2, b2) = _linears(encoder, "transform", weight_file)
        result = fold_prefix_mlp(inputs, w1, b1, w2, b2)
    elif peft_type == "P_TUNING" and lstm:
        result = fold_lstm_encoder(inputs, lstm, _linears(encoder, "mlp_head", weight_file))
    elif peft_type == "P_TUNING":
        if not any(k.startswith("mlp_head.") for k in encoder):
            raise AdapterFormatError(f"{weight_file}: a P_TUNING encoder needs prompt_encoder.mlp_head.* tensors")
        result = fold_mlp_encoder(inputs, _linears(encoder, "mlp_head", weight_file))
    else:
        result = inputs.float()
    if folded is not None and (folded.shape != result.shape or not torch.allclose(folded.float(), result, atol=1e-4)):
        raise AdapterFormatError(
            f"{weight_file}: {PROMPT_EMBEDDINGS_KEY} disagrees with the prompt encoder stored beside it; "
            "keep only one of them"
        )
    return result if folded is None else folded


def read_prefix(folder: str | os.PathLike, config: dict | None = None) -> PrefixAdapter:
    """Read a PEFT PREFIX_TUNING folder (prefix tuning / P-tuning v2) into a :class:`PrefixAdapter`."""
    folder = Path(folder)
    config = read_config(folder) if config is None else config
    cfg_path = folder / CONFIG_NAME
    _check_prompt_config(config, cfg_path)
    tokens, layers = _positive_int(config, "num_virtual_tokens", cfg_path), _positive_int(config, "num_layers", cfg_path)
    heads, token_dim = _positive_int(config, "num_attention_heads", cfg_path), _positive_int(config, "token_dim", cfg_path)
    if token_dim % heads:
        raise AdapterFormatError(
            f"{cfg_path}: token_dim {token_dim} is not a multiple of num_attention_heads {heads} "
            "(for prefix tuning they are KV heads x head_dim and KV heads)"
        )
    meta = read_adaptkit_meta(folder)
    method = meta.get("method") or ("prefix_tuning" if config.get("prefix_projection") else "p_tuning_v2")
    prefix_config = PrefixConfig(tokens, layers, heads, token_dim // heads, method=method)
    saves = tuple(fields.get_names(config, "modules_to_save", cfg_path) or ())
    weight_file, folded, encoder, saved = _prompt_tensors(folder, saves)
    flat = _fold("PREFIX_TUNING", folded, encoder, weight_file)
    if tuple(flat.shape) != (tokens, prefix_config.flat_width):
        raise AdapterFormatError(
            f"{weight_file}: {PROMPT_EMBEDDINGS_KEY} has shape {tuple(flat.shape)}, but {cfg_path} says "
            f"[num_virtual_tokens, num_layers*2*token_dim] = [{tokens}, {prefix_config.flat_width}]"
        )
    keys, values = prefix_from_flat(flat, prefix_config)
    return PrefixAdapter(prefix_config, keys, values, fingerprint=meta.get("base_fingerprint"), source=str(folder),
                         base_class=(config.get("auto_mapping") or {}).get("base_model_class"), saved_modules=saved)


def read_prompt(folder: str | os.PathLike, config: dict | None = None) -> PromptAdapter:
    """Read a PEFT PROMPT_TUNING (prompt tuning, PPT) or P_TUNING folder into a :class:`PromptAdapter`."""
    folder = Path(folder)
    config = read_config(folder) if config is None else config
    cfg_path = folder / CONFIG_NAME
    _check_prompt_config(config, cfg_path)
    peft_type = config["peft_type"]
    tokens, token_dim = _positive_int(config, "num_virtual_tokens", cfg_path), _positive_int(config, "token_dim", cfg_path)
    meta = read_adaptkit_meta(folder)
    if peft_type == "P_TUNING":
        method, encoder_type = "p_tuning", str(config.get("encoder_reparameterization_type") or "MLP").lower()
    else:
        method, encoder_type = meta.get("method") or "prompt_tuning", None
    prompt_config = PromptConfig(tokens, token_dim, method=method, encoder=encoder_type)
    saves = tuple(fields.get_names(config, "modules_to_save", cfg_path) or ())
    weight_file, folded, encoder, saved = _prompt_tensors(folder, saves)
    embeddings = _fold(peft_type, folded, encoder, weight_file)
    if (config.get("num_transformer_submodules") or 1) == 2:
        # an encoder-decoder's prompt: PEFT stores 2P rows and prepends the first P to the encoder's input
        embeddings = embeddings[:tokens]
    if tuple(embeddings.shape) != (tokens, token_dim):
        raise AdapterFormatError(
            f"{weight_file}: {PROMPT_EMBEDDINGS_KEY} has shape {tuple(embeddings.shape)}, but {cfg_path} says "
            f"[num_virtual_tokens, token_dim] = [{tokens}, {token_dim}]"
        )
    return PromptAdapter(prompt_config, embeddings, fingerprint=meta.get("base_fingerprint"), source=str(folder),
                         base_class=(config.get("auto_mapping") or {}).get("base_model_class"), saved_modules=saved)


def _write_prompt_learning(folder, config: dict, tensor: torch.Tensor, adapter) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    task_type = task_type_for(adapter.base_class)
    submodules = 2 if task_type == "SEQ_2_SEQ_LM" else 1
    if submodules == 2 and config["peft_type"] != "PREFIX_TUNING":
        tensor = torch.cat([tensor, tensor])  # PEFT's 2P rows; its forward and generate read the first P
    config.update({"task_type": task_type or "CAUSAL_LM", "num_transformer_submodules": submodules,
                   "inference_mode": True, "base_model_name_or_path": None, "modules_to_save": None})
    if adapter.base_class:
        config["auto_mapping"] = {"base_model_class": adapter.base_class, "parent_library": "transformers"}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    state = {PROMPT_EMBEDDINGS_KEY: tensor.detach().contiguous().cpu()}
    save_file(state, str(folder / WEIGHT_NAMES[0]), metadata={"format": "pt"})
    meta = {"method": adapter.config.method}
    if adapter.fingerprint:
        meta["base_fingerprint"] = adapter.fingerprint
    (folder / ADAPTKIT_META).write_text(json.dumps(meta, indent=2))
    return folder


def write_prefix(adapter: PrefixAdapter, folder: str | os.PathLike) -> Path:
    """Write a prefix as PEFT PREFIX_TUNING (the folded K/V; PEFT serves it as is)."""
    cfg = adapter.config
    config = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": cfg.num_virtual_tokens, "num_layers": cfg.num_layers,
              "num_attention_heads": cfg.num_kv_heads, "token_dim": cfg.token_dim, "encoder_hidden_size": cfg.token_dim,
              "prefix_projection": False}
    return _write_prompt_learning(folder, config, flat_from_prefix(adapter.keys, adapter.values), adapter)


def write_prompt(adapter: PromptAdapter, folder: str | os.PathLike) -> Path:
    """Write a soft prompt as PEFT PROMPT_TUNING (P_TUNING for P-tuning, its encoder already folded)."""
    cfg = adapter.config
    config = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": cfg.num_virtual_tokens, "token_dim": cfg.token_dim,
              "prompt_tuning_init": "RANDOM"}
    if cfg.method == "p_tuning":
        config = {"peft_type": "P_TUNING", "num_virtual_tokens": cfg.num_virtual_tokens, "token_dim": cfg.token_dim,
                  "encoder_reparameterization_type": (cfg.encoder or "mlp").upper()}
    return _write_prompt_learning(folder, config, adapter.embeddings, adapter)


def write_prompt_encoder(adapter, encoder: dict[str, torch.Tensor], folder: str | os.PathLike, **config_fields) -> Path:
    """adaptkit's training form of a prefix or P-tuning adapter: its PEFT config (updated with
    ``config_fields``, e.g. ``prefix_projection``) and the *unfolded* encoder, keys ``prompt_encoder.<name>``
    (``PROMPT_KEY_TABLE``), instead of the folded tensor. :func:`read_prefix` / :func:`read_prompt` fold
    it at load; PEFT itself reads the folded form that :func:`write_prefix` / :func:`write_prompt` write.
    """
    folder = write_prefix(adapter, folder) if isinstance(adapter, PrefixAdapter) else write_prompt(adapter, folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    config.update(config_fields)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    state = {f"prompt_encoder.{name}": tensor.detach().contiguous().cpu() for name, tensor in encoder.items()}
    save_file(state, str(folder / WEIGHT_NAMES[0]), metadata={"format": "pt"})
    return folder
