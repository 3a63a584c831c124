"""The AdapterHub layout (``adapters`` / ``adapter-transformers``): bottleneck adapters and AdapterFusion.

An adapter folder holds ``adapter_config.json`` (the adapter config under ``"config"``, plus
``name``, ``model_class``, ``model_type``, ``hidden_size``, ``version``) and ``adapter.safetensors``
or ``pytorch_adapter.bin``. Keys look like ``transformer.h.3.output_adapters.adapters.<name>.
adapter_up.weight``; the model prefix (``bert.``, ``transformer.``, ``model.``) is optional. Head
files (``head_config.json``, ``pytorch_model_head.bin``) are never read.

A fusion folder (named ``a,b``) holds ``adapter_fusion_config.json`` and
``model_adapter_fusion.safetensors``, keys ``<site path>.adapter_fusion_layer.a,b.<param>``.
``save_adapter_setup`` puts it beside the fused adapters' folders and ``adapter_setup.json``.

Every rename between these names and adaptkit's lives in the tables below.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from adaptkit.adapters.bottleneck import BottleneckAdapter, BottleneckConfig, BottleneckLayer, SiteKey
from adaptkit.adapters.fusion import FusionAdapter, FusionConfig, FusionLayer
from adaptkit.arch import family_of, family_of_class
from adaptkit.errors import AdapterFormatError, AdaptkitError, BaseModelError, UnsupportedAdapterError
from adaptkit.formats import fields as checked
from adaptkit.formats.tensors import first_existing, load_adapter_tensors

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter.safetensors", "pytorch_adapter.bin")  # safetensors wins, as in the library
FUSION_CONFIG_NAME = "adapter_fusion_config.json"
FUSION_WEIGHT_NAMES = ("model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin")
SETUP_NAME = "adapter_setup.json"
VERSION = "adapters.1.3.0"  # the library version whose layout and semantics adaptkit follows

# Site module inside block i (AdapterHub's name) -> adaptkit site, per layout family.
SITE_TABLE = {
    "bert": {"attention.output": "mh", "output": "output"},
    "gpt2": {"attention_adapters": "mh", "output_adapters": "output"},
    "llama": {"attention_adapters": "mh", "output_adapters": "output"},
}
BLOCK_PATHS = {"bert": "encoder.layer", "gpt2": "h", "llama": "layers"}  # below the model prefix
MODEL_PREFIXES = {"bert": ("bert.", "roberta."), "gpt2": ("transformer.",), "llama": ("model.",)}
# adapter-transformers' old module names, renamed on load as the library does.
LEGACY_RENAMES = {
    "attention_text_task_adapters": "adapters", "layer_text_task_adapters": "adapters",
    "attention_text_lang_adapters": "adapters", "layer_text_lang_adapters": "adapters",
    "invertible_lang_adapters": "invertible_adapters",
}
# AdapterHub parameter -> BottleneckLayer field. With ln_before the LayerNorm is element 0 of the
# adapter_down sequence (so the down Linear is element 1) and is also stored as adapter_norm_before.
_SHARED_PARAMS = {
    "adapter_up.weight": "up.weight", "adapter_up.bias": "up.bias",
    "adapter_norm_after.weight": "norm_after.weight", "adapter_norm_after.bias": "norm_after.bias",
    "scaling": "scaling", "gate.weight": "gate.weight", "gate.bias": "gate.bias",
}
PARAM_TABLE = {  # keyed by ln_before
    False: {"adapter_down.0.weight": "down.weight", "adapter_down.0.bias": "down.bias", **_SHARED_PARAMS},
    True: {
        "adapter_norm_before.weight": "norm_before.weight", "adapter_norm_before.bias": "norm_before.bias",
        "adapter_down.0.weight": "norm_before.weight", "adapter_down.0.bias": "norm_before.bias",
        "adapter_down.1.weight": "down.weight", "adapter_down.1.bias": "down.bias", **_SHARED_PARAMS,
    },
}
FUSION_PARAMS = ("query.weight", "query.bias", "key.weight", "key.bias", "value.weight")  # same names in memory

# Config fields: implemented (BottleneckConfig), training-only or unused, and unsupported when set.
_CONFIG_FIELDS = {
    "mh_adapter", "output_adapter", "reduction_factor", "non_linearity", "original_ln_before", "original_ln_after",
    "residual_before_ln", "adapter_residual_before_ln", "ln_before", "ln_after", "is_parallel", "scaling",
    "use_gating", "leave_out",
}
_TRAINING_ONLY = {
    "dropout", "init_weights", "init_weights_seed", "stochastic_depth", "inv_adapter_reduction_factor",
    "hypercomplex_nonlinearity", "factorized_phm_W", "factorized_phm_rule", "learn_phm", "phm_bias", "phm_c_init",
    "phm_dim", "phm_init_range", "phm_rank", "shared_W_phm", "shared_phm_rule", "architecture",
}
_UNSUPPORTED_WHEN_SET = {"phm_layer": "PHM/Compacter layers", "inv_adapter": "invertible adapters",
                         "cross_adapter": "cross-attention adapters"}
_FUSION_TRAINING_ONLY = {"regularization", "value_initialized", "dropout_prob"}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object")
    return data


def is_adapterhub_config(config: dict) -> bool:
    """An AdapterHub ``adapter_config.json``: the adapter config sits under ``"config"``."""
    return isinstance(config.get("config"), dict) and "peft_type" not in config


def _family(meta: dict, path: Path) -> str:
    try:
        if meta.get("model_type"):
            return family_of(str(meta["model_type"]))
    except BaseModelError as exc:
        raise UnsupportedAdapterError(f"{path}: {exc}") from exc
    family = family_of_class(str(meta.get("model_class") or ""))
    if family is None:
        raise AdapterFormatError(f"{path}: neither model_type nor model_class names a supported architecture")
    return family


def bottleneck_config_from_hub(config: dict, path: Path) -> BottleneckConfig:
    """A :class:`BottleneckConfig` from the ``"config"`` block of an AdapterHub adapter."""
    if config.get("architecture") not in (None, "bottleneck"):
        raise UnsupportedAdapterError(
            f"{path}: AdapterHub architecture {config['architecture']!r} is not supported; adaptkit reads "
            "bottleneck adapters from AdapterHub (use the PEFT format for LoRA and prefix tuning)"
        )
    for key, value in config.items():
        if key in _UNSUPPORTED_WHEN_SET and value not in (None, False):
            raise UnsupportedAdapterError(f"{path}: {key}={value!r} ({_UNSUPPORTED_WHEN_SET[key]}) is not supported")
        if key not in _CONFIG_FIELDS | _TRAINING_ONLY | set(_UNSUPPORTED_WHEN_SET) and value not in (None, False, [], {}):
            raise UnsupportedAdapterError(f"{path}: unknown adapter config field {key}={value!r}; adaptkit does not implement it")
    fields = {k: config[k] for k in _CONFIG_FIELDS if k in config}
    if isinstance(fields.get("scaling"), (int, float)) and not isinstance(fields["scaling"], bool):
        fields["scaling"] = float(fields["scaling"])
    fields["leave_out"] = checked.get_ints(config, "leave_out", path) or ()
    try:
        return BottleneckConfig(**fields)
    except (AdaptkitError, TypeError) as exc:
        raise UnsupportedAdapterError(f"{path}: {exc}") from exc


def bottleneck_config_to_hub(config: BottleneckConfig) -> dict:
    """The full AdapterHub ``"config"`` block of a :class:`BottleneckConfig`."""
    rf = config.reduction_factor
    return {
        "mh_adapter": config.mh_adapter, "output_adapter": config.output_adapter,
        "reduction_factor": dict(rf) if isinstance(rf, dict) else rf, "non_linearity": config.non_linearity,
        "original_ln_before": config.original_ln_before, "original_ln_after": config.original_ln_after,
        "residual_before_ln": config.residual_before_ln, "adapter_residual_before_ln": config.adapter_residual_before_ln,
        "ln_before": config.ln_before, "ln_after": config.ln_after, "is_parallel": config.is_parallel,
        "scaling": config.scaling, "use_gating": config.use_gating, "leave_out": list(config.leave_out),
        "dropout": 0.0, "stochastic_depth": 0.0, "init_weights": "mam_adapter" if config.is_parallel else "bert",
        "init_weights_seed": None, "inv_adapter": None, "inv_adapter_reduction_factor": None, "cross_adapter": False,
        "phm_layer": False, "phm_dim": 4, "phm_rank": 1, "phm_bias": True, "phm_c_init": "normal",
        "phm_init_range": 0.0001, "learn_phm": True, "shared_W_phm": False, "shared_phm_rule": True,
        "factorized_phm_W": True, "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform",
    }


def _site_of(module_path: str, family: str) -> SiteKey | None:
    """``bert.encoder.layer.3.attention.output`` -> (3, "mh"); None when it is no adapter site."""
    for prefix in MODEL_PREFIXES[family]:
        if module_path.startswith(prefix):
            module_path = module_path[len(prefix) :]
            break
    match = re.fullmatch(rf"{re.escape(BLOCK_PATHS[family])}\.(\d+)\.(.+)", module_path)
    if match is None or match.group(2) not in SITE_TABLE[family]:
        return None
    return int(match.group(1)), SITE_TABLE[family][match.group(2)]


def _rename_legacy(key: str) -> str:
    for old, new in LEGACY_RENAMES.items():
        key = key.replace(f".{old}.", f".{new}.")
    return key


def _tensors_by_site(weight_file: Path, family: str, marker: str, table: dict[str, str]) -> dict[SiteKey, dict]:
    """``{site: {field: tensor}}`` of every key ``<site path><marker><param>`` in the file."""
    by_site: dict[SiteKey, dict[str, torch.Tensor]] = {}
    for raw_key, tensor in load_adapter_tensors(weight_file).items():
        key = _rename_legacy(raw_key)
        if ".invertible_adapters." in key:
            raise UnsupportedAdapterError(f"{weight_file}: {raw_key}: invertible adapters are not supported")
        module, sep, param = key.partition(marker)
        site = _site_of(module, family) if sep else None
        if site is None or param not in table:
            raise AdapterFormatError(
                f"{weight_file}: unexpected key {raw_key!r}; expected '<{BLOCK_PATHS[family]}.i>.<site>{marker}<param>' "
                f"with site in {sorted(SITE_TABLE[family])} and param in {sorted(table)}"
            )
        fields = by_site.setdefault(site, {})
        field = table[param]
        if field in fields and not torch.equal(fields[field], tensor):
            raise AdapterFormatError(f"{weight_file}: {raw_key} differs from the other copy of {field} (shared LayerNorm)")
        fields[field] = tensor
    if not by_site:
        raise AdapterFormatError(f"{weight_file}: holds no tensors for {marker.strip('.')!r}")
    return by_site


def read_bottleneck(folder: str | os.PathLike, meta: dict | None = None) -> BottleneckAdapter:
    """Read an AdapterHub bottleneck adapter folder (tensors on CPU, as stored)."""
    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    meta = _read_json(cfg_path) if meta is None else meta
    if not is_adapterhub_config(meta):
        raise AdapterFormatError(f"{cfg_path}: no \"config\" block; not an AdapterHub adapter config")
    name = meta.get("name")
    if not name:
        raise AdapterFormatError(f"{cfg_path}: \"name\" is missing; it is the adapter name inside the weight keys")
    config = bottleneck_config_from_hub(meta["config"], cfg_path)
    family = _family(meta, cfg_path)
    weight_file = first_existing(folder, WEIGHT_NAMES)
    if weight_file is None:
        raise AdapterFormatError(f"{folder}: no {' or '.join(WEIGHT_NAMES)} beside {CONFIG_NAME}")
    by_site = _tensors_by_site(weight_file, family, f".adapters.{name}.", PARAM_TABLE[config.ln_before])
    hidden = meta.get("hidden_size")
    sites = {}
    for site, tensors in sorted(by_site.items()):
        layer = BottleneckLayer(config, tensors, where=f"{weight_file}: block {site[0]} site {site[1]!r}")
        expected = config.bottleneck_size(layer.hidden_size, site[0])
        if hidden is not None and layer.hidden_size != hidden:
            raise AdapterFormatError(f"{weight_file}: tensors are {layer.hidden_size} wide but hidden_size is {hidden}")
        if layer.bottleneck_size != expected:
            raise AdapterFormatError(
                f"{weight_file}: block {site[0]} site {site[1]!r} has a bottleneck of {layer.bottleneck_size}, but "
                f"reduction_factor {config.reduction_factor!r} of {layer.hidden_size} gives {expected}"
            )
        sites[site] = layer
    return BottleneckAdapter(config=config, sites=sites, hub_name=str(name), source=str(folder),
                             base_class=meta.get("model_class"), hub_meta=_hub_meta(meta))


def _hub_meta(meta: dict) -> dict:
    return {k: meta[k] for k in ("model_name", "model_type", "version") if k in meta}


def fusion_config_from_hub(config: dict, path: Path) -> FusionConfig:
    known = {"query", "key", "value", "value_before_softmax", "residual_before", "query_before_ln", "temperature"}
    unknown = {k: v for k, v in config.items() if k not in known | _FUSION_TRAINING_ONLY and v not in (None, False)}
    if unknown:
        raise UnsupportedAdapterError(f"{path}: unknown fusion config field(s) {unknown}; adaptkit does not implement them")
    fields = {k: bool(config[k]) for k in known - {"temperature"} if k in config}
    return FusionConfig(**fields, temperature=1.0)  # AdapterHub's annealed T, see adapters/fusion.py


def read_fusion(folder: str | os.PathLike) -> FusionAdapter:
    """Read an AdapterHub fusion folder (``a,b/`` with ``adapter_fusion_config.json``)."""
    folder = Path(folder)
    cfg_path = folder / FUSION_CONFIG_NAME
    meta = _read_json(cfg_path)
    names = meta.get("adapter_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise AdapterFormatError(f"{cfg_path}: adapter_names must be the list of fused adapter names")
    hub_name = str(meta.get("name") or ",".join(names))
    config = fusion_config_from_hub(meta.get("config") or {}, cfg_path)
    weight_file = first_existing(folder, FUSION_WEIGHT_NAMES)
    if weight_file is None:
        raise AdapterFormatError(f"{folder}: no {' or '.join(FUSION_WEIGHT_NAMES)} beside {FUSION_CONFIG_NAME}")
    table = {p: p for p in FUSION_PARAMS}
    by_site = _tensors_by_site(weight_file, _family(meta, cfg_path), f".adapter_fusion_layer.{hub_name}.", table)
    sites = {site: FusionLayer(config, t, where=f"{weight_file}: block {site[0]} site {site[1]!r}")
             for site, t in sorted(by_site.items())}
    return FusionAdapter(config=config, adapter_names=tuple(names), sites=sites, hub_name=hub_name, source=str(folder),
                         base_class=meta.get("model_class"), hub_meta=_hub_meta(meta))


def setup_error(folder: Path) -> AdapterFormatError:
    """The error for an ``adapter_setup.json`` folder: it holds several adapters, loaded one by one."""
    setup = _read_json(folder / SETUP_NAME)
    parts = sorted(p.name for p in folder.iterdir() if p.is_dir())
    fusions = [p for p in parts if (folder / p / FUSION_CONFIG_NAME).is_file()]
    adapters = [p for p in parts if p not in fusions]
    return AdapterFormatError(
        f"{folder} is an AdapterHub adapter setup ({(setup.get('adapter_setup') or {}).get('type', 'setup')}) "
        f"holding adapters {adapters} and fusion(s) {fusions}; load each folder with add_adapter, the adapters "
        f"first (eng.add_adapter('{adapters[0] if adapters else 'a'}', '{folder}/{adapters[0] if adapters else 'a'}'))"
    )


# ---------------------------------------------------------------------- writing
def _key_prefix(family: str, base_class: str | None, model_type: str | None) -> str:
    """The state-dict prefix of the class that saves: none for a bare ``XxxModel`` (AdapterHub's rule)."""
    cls = base_class or ""
    if cls.endswith("Model") and not any(s in cls for s in ("Head", "Adapter", "With", "For")):
        return ""
    if family == "bert":
        return "roberta." if (model_type == "roberta" or cls.startswith("Roberta")) else "bert."
    return MODEL_PREFIXES[family][0]


def _site_path(prefix: str, family: str, site: SiteKey) -> str:
    module = {v: k for k, v in SITE_TABLE[family].items()}[site[1]]
    return f"{prefix}{BLOCK_PATHS[family]}.{site[0]}.{module}"


def _write_meta(adapter, family: str) -> dict:
    return {"hidden_size": adapter.hidden_size, "model_class": adapter.base_class,
            "model_name": adapter.hub_meta.get("model_name"),
            "model_type": adapter.hub_meta.get("model_type") or family, "version": VERSION}


def _writer_family(adapter) -> str:
    family = family_of_class(adapter.base_class or "")
    if family is None:
        raise AdapterFormatError(
            f"{adapter.source or adapter.kind}: base_class {adapter.base_class!r} names no supported architecture; "
            "set it to the transformers class the adapter is for (e.g. 'LlamaForCausalLM')"
        )
    return family


def write_bottleneck(adapter: BottleneckAdapter, folder: str | os.PathLike) -> Path:
    """Write a bottleneck adapter in the AdapterHub layout (``adapter.safetensors``)."""
    folder = Path(folder)
    family = _writer_family(adapter)
    prefix = _key_prefix(family, adapter.base_class, adapter.hub_meta.get("model_type"))
    hub_of = {}  # field -> every AdapterHub param name for it (the ln_before LayerNorm has two)
    for param, field in PARAM_TABLE[adapter.config.ln_before].items():
        hub_of.setdefault(field, []).append(param)
    state = {}
    for site, layer in sorted(adapter.sites.items()):
        base = f"{_site_path(prefix, family, site)}.adapters.{adapter.hub_name}"
        for field, tensor in layer.tensors().items():
            for param in hub_of[field]:
                state[f"{base}.{param}"] = tensor.detach().to("cpu").contiguous().clone()
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"config": bottleneck_config_to_hub(adapter.config), **_write_meta(adapter, family), "name": adapter.hub_name}
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
    save_file(state, str(folder / WEIGHT_NAMES[0]), metadata={"format": "pt"})
    return folder


def write_fusion(fusion: FusionAdapter, folder: str | os.PathLike) -> Path:
    """Write a fusion in the AdapterHub layout; name it ``",".join(adapter_names)`` to match the library."""
    folder = Path(folder)
    family = _writer_family(fusion)
    prefix = _key_prefix(family, fusion.base_class, fusion.hub_meta.get("model_type"))
    name = ",".join(fusion.adapter_names)
    state = {
        f"{_site_path(prefix, family, site)}.adapter_fusion_layer.{name}.{param}": t.detach().to("cpu").contiguous()
        for site, layer in sorted(fusion.sites.items()) for param, t in layer.tensors().items()
    }
    cfg = fusion.config
    config = {"query": cfg.query, "key": cfg.key, "value": cfg.value, "value_before_softmax": cfg.value_before_softmax,
              "residual_before": cfg.residual_before, "query_before_ln": cfg.query_before_ln, "temperature": False,
              "regularization": False, "value_initialized": False, "dropout_prob": None}
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"adapter_names": list(fusion.adapter_names), "config": config, **_write_meta(fusion, family), "name": name}
    (folder / FUSION_CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
    save_file(state, str(folder / FUSION_WEIGHT_NAMES[0]), metadata={"format": "pt"})
    return folder


def write_fusion_setup(fusion: FusionAdapter, adapters: dict[str, BottleneckAdapter], folder: str | os.PathLike) -> Path:
    """Write ``adapter_setup.json``, each fused adapter in ``folder/<name>`` and the fusion in
    ``folder/<a,b>``, as the library's ``save_adapter_setup`` lays out a Fuse."""
    folder = Path(folder)
    missing = [n for n in fusion.adapter_names if n not in adapters]
    if missing:
        raise AdapterFormatError(f"write_fusion_setup: the fused adapters {missing} were not given")
    for name in fusion.adapter_names:  # the library finds fused adapters by the name inside their files
        write_bottleneck(dataclasses.replace(adapters[name], hub_name=name), folder / name)
    write_fusion(fusion, folder / ",".join(fusion.adapter_names))
    children = [{"type": "single", "children": [n]} for n in fusion.adapter_names]
    setup = {"adapter_setup": {"type": "Fuse", "children": children}, "head_setup": None, "version": VERSION}
    (folder / SETUP_NAME).write_text(json.dumps(setup, indent=2))
    return folder
