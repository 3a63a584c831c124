"""The adapter kinds an engine serves: per kind, how it attaches to a model, detaches (also the rollback of
a failed attach) and describes itself (what ``Engine.adapters`` and ``adaptkit inspect`` show). A new kind
adds one entry to :data:`KIND_HANDLERS`."""

from __future__ import annotations

from adaptkit import heads, inject, prefix_cache, sites
from adaptkit.adapters.bottleneck import bottleneck_details
from adaptkit.adapters.fusion import fusion_details
from adaptkit.adapters.lora import RESIDUAL_INITS, LoraAdapter, TokenRows
from adaptkit.adapters.pet import pet_details
from adaptkit.adapters.prefix import prefix_details
from adaptkit.adapters.prompt import prompt_details


def lora_details(adapter: LoraAdapter) -> dict:
    cfg = adapter.config
    ranks = sorted(set(adapter.ranks().values()))
    details = {
        "ranks": ranks,
        "alpha": cfg.alpha,
        "targets": sorted({m.rpartition(".")[2] for m in adapter.layers}),
        "modules": len(adapter.layers),
        "dora": cfg.use_dora,
        "rslora": cfg.use_rslora,
        "modules_to_save": sorted(adapter.saved_modules),
    }
    # every other option in use, so that inspect names all of them
    used = {"lora_bias": cfg.lora_bias, "fan_in_fan_out": cfg.fan_in_fan_out, "rank_pattern": dict(cfg.rank_pattern),
            "alpha_pattern": dict(cfg.alpha_pattern), "layers_to_transform": cfg.layers_to_transform,
            "exclude_modules": cfg.exclude_modules}
    details.update({k: v for k, v in used.items() if v})
    if adapter.peft_type != "LORA":
        details["peft_type"] = adapter.peft_type
    if adapter.trained_biases:
        details["trained_biases"] = sorted(adapter.trained_biases)
    embeddings = sorted(m for m, w in adapter.layers.items() if getattr(w, "embedding", False)
                        and not isinstance(w, TokenRows))
    if embeddings:
        details["embedding_layers"] = embeddings
    token_rows = {m: w.rank for m, w in adapter.layers.items() if isinstance(w, TokenRows)}
    if token_rows:
        details["trainable_token_indices"] = token_rows
    if adapter.base_weights:
        details["saved_base_layers"] = sorted(adapter.base_weights)
    if cfg.init_lora_weights in RESIDUAL_INITS:
        state = "folded in: rank doubled" if adapter.residual_folded else "recomputed from the base when loaded"
        details["init_lora_weights"] = (f"{cfg.init_lora_weights} (PEFT subtracts s*B0*A0 from the base at load; "
                                        f"{state}, exact)")
    elif cfg.init_lora_weights is not True:
        details["init_lora_weights"] = f"{cfg.init_lora_weights} (sets A and B only: nothing to do at load)"
    return details


# kind -> (attach, detach, details)
KIND_HANDLERS = {
    "lora": (inject.attach_lora, inject.detach_lora, lora_details),
    "bottleneck": (sites.attach_bottleneck, sites.detach_bottleneck, bottleneck_details),
    "fusion": (sites.attach_fusion, sites.detach_fusion, fusion_details),
    "prefix": (prefix_cache.attach_prefix, prefix_cache.detach_prefix, prefix_details),
    "prompt": (prefix_cache.attach_prompt, prefix_cache.detach_prompt, prompt_details),
    "pet": (heads.attach_pet, heads.detach_pet, pet_details),
}


def details_of(adapter) -> dict:
    """Kind-specific facts of an adapter, as shown by ``Engine.adapters`` and ``adaptkit inspect``."""
    return KIND_HANDLERS[adapter.kind][2](adapter)
