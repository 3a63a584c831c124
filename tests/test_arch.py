"""What adaptkit needs to know about a model's run time is measured from the model, not remembered per
transformers version: the K/V heads and head size each layer caches, and the layers that slide."""

from __future__ import annotations

import pytest
import torch

from adaptkit.generation import sliding_layout
from adaptkit.measured import cached_kv_shapes, facts_of, sliding_windows

SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=128)


def _configs():
    import transformers as t

    return {
        "llama_gqa": t.LlamaConfig(intermediate_size=128, num_key_value_heads=2, **SMALL),
        "gemma3_head_dim": t.Gemma3TextConfig(intermediate_size=128, num_key_value_heads=1, head_dim=24, **SMALL),
        "falcon_40b_layout": t.FalconConfig(new_decoder_architecture=True, num_kv_heads=2, **SMALL),
        "falcon_7b_layout": t.FalconConfig(multi_query=True, **SMALL),
        "gpt2": t.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=128),
        "qwen3_moe": t.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=2,
                                      num_experts=4, num_experts_per_tok=2, head_dim=8, **SMALL),
        "t5": t.T5Config(d_model=64, d_kv=8, d_ff=128, num_layers=2, num_decoder_layers=3, num_heads=4, vocab_size=128),
        "bert": t.BertConfig(intermediate_size=128, **SMALL),
    }


def _model(config):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModel if config.model_type == "bert" \
        else AutoModelForCausalLM
    torch.manual_seed(0)
    return cls.from_config(config).eval()


def _cached_by_a_real_forward(model) -> list[tuple[int, int]]:
    """The reference: a real 5-token forward into a cache (the decoder's self-attention cache of a T5)."""
    from transformers import DynamicCache, EncoderDecoderCache

    from adaptkit.measured import cache_argument

    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "use_cache": True}
    if model.config.is_encoder_decoder:
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        inputs["decoder_input_ids"] = ids
    else:
        cache = DynamicCache()
    with torch.no_grad():
        model(**inputs, **{cache_argument(model): cache})
    cache = getattr(cache, "self_attention_cache", cache)
    assert all(layer.keys.shape[:1] == (2,) and layer.keys.shape[2] == 5 for layer in cache.layers)
    return [(layer.keys.shape[1], layer.keys.shape[3]) for layer in cache.layers]


@pytest.mark.parametrize("name", list(_configs()))
def test_the_kv_layout_is_what_the_model_caches(name):
    """Measured on a meta-device twin; Qwen3-MoE's expert routing has no meta kernel, so it is measured on
    the live model (one token)."""
    model = _model(_configs()[name])
    expected = _cached_by_a_real_forward(model)
    assert list(cached_kv_shapes(model)) == expected
    if name != "qwen3_moe":  # facts need the module layout too
        facts = facts_of(model)
        assert list(facts.kv_layout) == expected and (facts.num_kv_heads, facts.head_dim) == expected[0]
        assert facts_of(model) is facts  # measured once per model


def test_the_falcon_layouts_cache_their_configured_kv_heads():
    """transformers 5.25's Falcon caches ``num_kv_heads`` heads (40B layout) and one (7B layout); 5.24 cached
    every head of the 40B layout. Whichever it does, the measurement follows (the real forward above)."""
    configs = _configs()
    assert facts_of(_model(configs["falcon_7b_layout"])).num_kv_heads == 1
    assert facts_of(_model(configs["falcon_40b_layout"])).num_kv_heads in (2, 4)


def test_which_layers_slide_is_transformers_own_reading_of_the_config():
    import transformers as t

    mistral = t.MistralConfig(intermediate_size=128, sliding_window=4, **SMALL)
    gemma2 = t.Gemma2Config(intermediate_size=128, sliding_window=4, **SMALL)
    qwen2_off = t.Qwen2Config(intermediate_size=128, sliding_window=4, **SMALL)  # use_sliding_window=False
    qwen2_on = t.Qwen2Config(intermediate_size=128, sliding_window=4, use_sliding_window=True, max_window_layers=1,
                             **SMALL)
    assert sliding_windows(mistral) == (4, 4, 4) and sliding_layout(mistral) == (4, None)
    assert sliding_windows(qwen2_off) == (None, None, None) and sliding_layout(qwen2_off) == (None, None)
    assert sliding_layout(qwen2_on) == (4, ["full_attention", "sliding_attention", "sliding_attention"])
    window, types = sliding_layout(gemma2)
    assert window == 4 and types == [t for t in gemma2.layer_types]
