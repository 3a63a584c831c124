"""Tiny random configs for every model type of the installed transformers, built from each type's own
default config with its sizes shrunk (no hand-written config per type). Used by the architecture sweep."""

from __future__ import annotations

import torch

# config fields that size a model, and the tiny value each gets (where the config has the field)
TINY = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "embed_dim": 64, "dim": 64, "model_dim": 64,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "d_ff": 128, "ffn_hidden_size": 128,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "expert_intermediate_size": 32,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4,
    "num_key_value_heads": 2, "n_kv_heads": 2, "num_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 16, "kv_channels": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "q_lora_rank": 32, "kv_lora_rank": 32,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_k": 2, "num_shared_experts": 1, "n_shared_experts": 1,
    "vocab_size": 320, "max_position_embeddings": 512, "n_positions": 512, "seq_length": 512,
    "sliding_window": 512, "attention_chunk_size": 512,
}
SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def causal_lm_types() -> list[str]:
    """Every model type transformers maps to a causal-LM class, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(model_type: str):
    """The type's default config with every size field made tiny; layer lists resized to 2 layers."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name, value in TINY.items():
        if name in text.to_dict() and isinstance(text.to_dict()[name], int) and text.to_dict()[name] is not None:
            setattr(text, name, value)
    for name, value in SPECIAL_IDS.items():
        if hasattr(text, name):
            setattr(text, name, value)
    layers = getattr(text, "num_hidden_layers", 2)
    for name, value in list(text.to_dict().items()):
        if isinstance(value, list) and len(value) > layers and name.endswith(("layer_types", "_layers_block_type")):
            setattr(text, name, value[:layers])
    return config


MAX_PARAMETERS = 5_000_000  # a size field the shrinking missed: not tiny, not built


def tiny_model(model_type: str, seed: int = 0):
    """A tiny random causal LM of ``model_type`` (float32, eval), or raises what building it raised."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    size = sum(p.numel() for p in skeleton.parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"{model_type}: {size:,} parameters after shrinking; a size field is not in TINY")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    return model.eval()
