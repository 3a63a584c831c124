"""Per-method training setup: build the adapter the engine runs and make its parameters trainable.

Every setup attaches its adapter with the engine's own handlers (``Engine.add_adapter``: LoRA layers
through ``inject.py``, bottleneck and fusion sites through ``sites.py``) and flips ``requires_grad``
on the adapter's own tensors, so the forward that is trained is the forward that is served. The
prefix and prompt families, which the runtime holds folded, are set up in ``virtual.py``.

``METHODS`` maps a method name to its setup; unknown names are rejected with the sorted list.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adaptkit.adapters.bottleneck import BottleneckAdapter, BottleneckConfig, BottleneckLayer
from adaptkit.adapters.fusion import FusionAdapter, FusionConfig, FusionLayer
from adaptkit.adapters.lora import LoraAdapter, LoraConfig, LoraWeights
from adaptkit.adapters.pet import PetAdapter
from adaptkit.compositions import Fuse
from adaptkit.errors import InvalidArgumentError
from adaptkit.inject import base_modules, is_conv1d, linear_shape
from adaptkit.training.setup import MethodSetup, SetupContext, base_class_of
from adaptkit.training.virtual import setup_ppt, setup_prefix, setup_prompt, setup_ptuning, setup_ptuning2

# ----------------------------------------------------------------------------- LoRA family
QUERY_VALUE = ("q", "v", "q_proj", "v_proj", "query", "value", "query_proj", "value_proj")  # PEFT's default: the query and value projections
FUSED_QKV = ("c_attn", "query_key_value", "qkv_proj", "qkv", "wqkv", "w_pack", "in_proj")  # or the fused one holding them


def default_targets(model: nn.Module, facts) -> tuple[str, ...]:
    """The LoRA targets when none are named, as PEFT defaults: the query and value projections of the
    model's blocks (found by their leaf names; a hybrid's attention blocks may not be its first), else the
    fused projection holding them."""
    from adaptkit.arch import decoder_layers

    _, blocks = decoder_layers(model, facts.spec)
    leaves = {name.rpartition(".")[2] for name, module in blocks.named_modules() if linear_shape(module) is not None}
    for wanted in (QUERY_VALUE, FUSED_QKV):  # names as PEFT writes them, matched whatever their case
        found = tuple(leaf for leaf in sorted(leaves) if leaf.lower() in wanted)
        if found:
            return found
    raise InvalidArgumentError(f"the {facts.model_type} base's blocks have no query/value projection to target by "
                               f"default (linear layers: {', '.join(sorted(leaves)) or 'none'}); name --targets")


def _new_lora(ctx: SetupContext, r: int, alpha: float, targets, rslora: bool) -> LoraAdapter:
    """A LoRA on every targeted linear layer, PEFT's init: ``A ~ kaiming_uniform(a=sqrt(5))``, ``B = 0``."""
    engine = ctx.engine
    targets = tuple(targets or default_targets(engine.model, engine.base.facts))
    modules = {n: m for n, m in base_modules(engine.model).items() if linear_shape(m) is not None}
    conv1d = any(is_conv1d(m) for m in modules.values())
    config = LoraConfig(r=int(r), alpha=float(alpha), target_modules=targets, use_rslora=bool(rslora),
                        fan_in_fan_out=conv1d)
    layers = {}
    for name, module in modules.items():
        if not config.targets(name):
            continue
        out_features, in_features = linear_shape(module)
        a = torch.empty(config.rank_for(name), in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        layers[name] = LoraWeights(a, torch.zeros(out_features, a.shape[0]), config.scale_for(name))
    if not layers:
        known = sorted({n.rpartition(".")[2] for n in modules})
        raise InvalidArgumentError(f"LoRA targets {list(targets)} match no linear layer of the base; known: {known}")
    return LoraAdapter(config, layers, fingerprint=engine.base.fingerprint, base_class=base_class_of(ctx))


def _attach_trainable_lora(ctx: SetupContext, adapter: LoraAdapter) -> nn.Module:
    for weights in adapter.layers.values():  # before attaching: trainable factors stay on the exact path
        weights.lora_A.requires_grad_(True)
        weights.lora_B.requires_grad_(True)
    ctx.engine.add_adapter(ctx.name, adapter)
    return nn.ModuleList(adapter.layers[name] for name in sorted(adapter.layers))


def setup_lora(ctx: SetupContext, r: int = 8, alpha: float = 16, targets=None, rslora: bool = False) -> MethodSetup:
    """LoRA: ``y = W x + (alpha/r) B A x`` on ``targets``; only ``A`` and ``B`` train."""
    from adaptkit.formats.peft import write_lora

    adapter = _new_lora(ctx, r, alpha, targets, rslora)
    trainable = _attach_trainable_lora(ctx, adapter)
    options = {"r": int(r), "alpha": float(alpha), "targets": sorted(adapter.config.target_modules), "rslora": rslora}
    return MethodSetup(trainable, ctx.name, lambda folder: write_lora(adapter, folder), options)


def setup_qlora(ctx: SetupContext, r: int = 8, alpha: float = 16, targets=None, rslora: bool = False) -> MethodSetup:
    """QLoRA: LoRA on the NF4 base; paged 8-bit AdamW on CUDA (``quant.training_optimizer``), else AdamW."""
    from adaptkit import quant

    setup = setup_lora(ctx, r, alpha, targets, rslora)
    setup.make_optimizer = quant.training_optimizer
    return setup


# ----------------------------------------------------------------------------- bottleneck family
BOTTLENECK_PRESETS = {  # AdapterHub's SeqBnConfig, DoubleSeqBnConfig and ParBnConfig
    "pfeiffer": dict(reduction_factor=16),
    "houlsby": dict(mh_adapter=True, output_adapter=True, reduction_factor=16, non_linearity="swish",
                    original_ln_before=False),
    "parallel": dict(reduction_factor=2, is_parallel=True, scaling=4.0, original_ln_before=False,
                     residual_before_ln=False),
}


def _bottleneck_tensors(config: BottleneckConfig, hidden: int, d: int) -> dict[str, torch.Tensor]:
    """AdapterHub's init: series ``bert`` (weights N(0, 0.02)); parallel ``mam_adapter`` (down kaiming, up 0)."""
    down, up = torch.empty(d, hidden), torch.empty(hidden, d)
    if config.is_parallel:
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        nn.init.zeros_(up)
    else:
        nn.init.normal_(down, std=0.02)
        nn.init.normal_(up, std=0.02)
    return {"down.weight": down, "down.bias": torch.zeros(d), "up.weight": up, "up.bias": torch.zeros(hidden)}


def setup_bottleneck(ctx: SetupContext, architecture: str = "pfeiffer", reduction_factor: float | None = None) -> MethodSetup:
    """Bottleneck adapters after attention and/or the FFN of every block (Houlsby, Pfeiffer, parallel)."""
    from adaptkit.formats.adapterhub import write_bottleneck

    if architecture not in BOTTLENECK_PRESETS:
        raise InvalidArgumentError(f"bottleneck architecture {architecture!r} is unknown; known: "
                                   f"{', '.join(sorted(BOTTLENECK_PRESETS))}")
    fields = dict(BOTTLENECK_PRESETS[architecture])
    if reduction_factor is not None:
        fields["reduction_factor"] = float(reduction_factor)
    config = BottleneckConfig(**fields)
    facts = ctx.engine.base.facts
    sites = {}
    for layer in range(facts.num_layers):
        for site in ("mh",) * config.mh_adapter + ("output",) * config.output_adapter:
            tensors = _bottleneck_tensors(config, facts.hidden_size, config.bottleneck_size(facts.hidden_size, layer))
            sites[(layer, site)] = BottleneckLayer(config, tensors)
    adapter = BottleneckAdapter(config, sites, hub_name=ctx.hub_name, fingerprint=ctx.engine.base.fingerprint,
                                base_class=base_class_of(ctx))
    ctx.engine.add_adapter(ctx.name, adapter)
    trainable = nn.ModuleList(sites[key] for key in sorted(sites))
    trainable.requires_grad_(True)
    options = {"architecture": architecture, "reduction_factor": config.reduction_factor}
    return MethodSetup(trainable, ctx.name, lambda folder: write_bottleneck(adapter, folder), options)


def _named_paths(adapters) -> dict[str, str]:
    if isinstance(adapters, dict):
        return {str(k): str(v) for k, v in adapters.items()}
    items = adapters.split(",") if isinstance(adapters, str) else list(adapters or ())
    pairs = {}
    for item in (str(i).strip() for i in items):
        if item:
            name, sep, path = item.partition("=")
            pairs[name if sep else Path(item).name] = path if sep else item
    return pairs


def setup_fusion(ctx: SetupContext, adapters=None) -> MethodSetup:
    """AdapterFusion over already trained bottleneck ``adapters`` (name=path, frozen); only the fusion
    layers train. Init as AdapterHub's: query/key N(0, 0.02), value the identity."""
    from adaptkit.formats.adapterhub import write_fusion
    from adaptkit.formats.detect import read_adapter

    paths = _named_paths(adapters)
    if len(paths) < 2:
        raise InvalidArgumentError("fusion needs at least two trained bottleneck adapters: adapters='a=path,b=path'")
    sites = set()
    for name, path in paths.items():
        adapter = read_adapter(path)
        if adapter.kind != "bottleneck":
            raise InvalidArgumentError(f"{path}: a {adapter.kind} adapter; fusion combines bottleneck adapters")
        ctx.engine.add_adapter(name, adapter)
        sites |= set(adapter.sites)
    hidden = ctx.engine.base.facts.hidden_size
    layers = {}
    for key in sorted(sites):
        query, key_w = (nn.init.normal_(torch.empty(hidden, hidden), std=0.02) for _ in range(2))
        layers[key] = FusionLayer(FusionConfig(), {"query.weight": query, "query.bias": torch.zeros(hidden),
                                                   "key.weight": key_w, "key.bias": torch.zeros(hidden),
                                                   "value.weight": torch.eye(hidden)})
    names = tuple(paths)
    fusion = FusionAdapter(FusionConfig(), names, layers, hub_name=",".join(names),
                           fingerprint=ctx.engine.base.fingerprint, base_class=base_class_of(ctx))
    ctx.engine.add_adapter(ctx.name, fusion)
    trainable = nn.ModuleList(layers[key] for key in sorted(layers))
    trainable.requires_grad_(True)
    return MethodSetup(trainable, Fuse(*names), lambda folder: write_fusion(fusion, folder), {"adapters": paths})


# ----------------------------------------------------------------------------- PET
def setup_pet(ctx: SetupContext, train: str = "lora", r: int = 8, alpha: float = 16, targets=None,
              rslora: bool = False) -> MethodSetup:
    """PET: classification through a pattern and verbalizer, fine-tuning a LoRA (``train="lora"``)
    or every weight of the model (``train="full"``, saved as a model of its own under ``model/``)."""
    from adaptkit.base import fingerprint_of
    from adaptkit.formats.pet import write_pet

    objective, engine = ctx.objective, ctx.engine
    if objective.kind != "classification":
        raise InvalidArgumentError(f"pet trains on {{\"text\", \"label\"}} rows, not {objective.kind} rows")
    if train == "lora":
        lora = _new_lora(ctx, r, alpha, targets, rslora)
        trainable, entry = _attach_trainable_lora(ctx, lora), ctx.name
        options = {"train": train, "r": int(r), "alpha": float(alpha), "targets": sorted(lora.config.target_modules)}
    elif train == "full":
        lora, trainable, entry = None, engine.model, None
        engine.model.requires_grad_(True)
        options = {"train": train}
    else:
        raise InvalidArgumentError(f"pet train={train!r} is unknown; known: full, lora")

    def save(folder: Path) -> None:
        fingerprint = engine.base.fingerprint
        if lora is None:  # the weights changed: the saved model is a base of its own
            engine.model.save_pretrained(str(folder / "model"))
            engine.tokenizer.save_pretrained(str(folder / "model"))
            fingerprint = fingerprint_of(engine.base.facts, engine.model.get_input_embeddings().weight)
        write_pet(PetAdapter(objective.pet, objective.scoring, lora, fingerprint=fingerprint,
                             base_class=base_class_of(ctx)), folder)

    return MethodSetup(trainable, entry, save, options)


@dataclass(frozen=True)
class Method:
    """A training method: its setup, the default learning rate, and how the base is loaded."""

    setup: Callable[..., MethodSetup]
    lr: float
    quantize: str | None = None


METHODS: dict[str, Method] = {
    "bottleneck": Method(setup_bottleneck, 1e-3),
    "fusion": Method(setup_fusion, 5e-4),
    "lora": Method(setup_lora, 2e-4),
    "pet": Method(setup_pet, 1e-4),
    "ppt": Method(setup_ppt, 3e-2),
    "prefix": Method(setup_prefix, 1e-2),
    "prompt": Method(setup_prompt, 3e-2),
    "ptuning": Method(setup_ptuning, 1e-3),
    "ptuning2": Method(setup_ptuning2, 1e-2),
    "qlora": Method(setup_qlora, 2e-4, quantize="nf4"),
}


def method_named(name: str) -> Method:
    if name not in METHODS:
        raise InvalidArgumentError(f"training method {name!r} is unknown; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def setup_method(name: str, ctx: SetupContext, options: dict) -> MethodSetup:
    """Run ``name``'s setup with ``options``; an option it does not take is an error naming those it does."""
    setup = method_named(name).setup
    accepted = [p for p in inspect.signature(setup).parameters if p != "ctx" and not p.startswith("_")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise InvalidArgumentError(f"method {name!r} does not take {', '.join(unknown)}; it takes "
                                   f"{', '.join(accepted) or 'no options'}")
    return setup(ctx, **options)
