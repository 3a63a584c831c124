"""Bottleneck adapters wherever the blocks measure pre-LN: a block whose two norms and sub-blocks the live
model shows to compute ``x + attn(norm1(x))`` then ``+ mlp(norm2(.))`` takes AdapterHub's pre-LN placement
(on Llama and GPT-2 that placement equals AdapterHub's fixtures, test_bottleneck.py). The layouts adaptkit
once kept in a table are what discovery finds; SmolLM3 and Qwen3-MoE serve bottlenecks per row; blocks that
measure otherwise (OLMo 3's post-norms, Phi's parallel block, Granite's scaled residuals) are refused by
name."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids
from model_zoo import tiny_model
from peft_checks import save_random_base

import adaptkit as ak
from adaptkit.demo import random_bottleneck
from adaptkit.errors import BaseModelError

# the layouts adaptkit's table held before discovery (block list, attention, FFN, pre-LN norms, Conv1D layers,
# embedding), as transformers names them: discovery must find each (BERT's post-LN sites stay written down)
FORMER_TABLE = {
    "llama": ("model.layers", "self_attn", "mlp", "input_layernorm", "post_attention_layernorm", (),
              "model.embed_tokens.weight"),
    "gpt2": ("transformer.h", "attn", "mlp", "ln_1", "ln_2", ("c_attn", "c_fc", "c_proj"), "transformer.wte.weight"),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp", "input_layernorm", "post_attention_layernorm", (),
                 "gpt_neox.embed_in.weight"),
    "falcon": ("transformer.h", "self_attention", "mlp", None, None, (), "transformer.word_embeddings.weight"),
    "opt": ("model.decoder.layers", "self_attn", "", "self_attn_layer_norm", "final_layer_norm", (),
            "model.decoder.embed_tokens.weight"),
    "t5": ("decoder.block", "", "", None, None, (), "shared.weight"),
    "bart": ("model.decoder.layers", "self_attn", "", None, None, (),
             "model.shared.weight"),
    "bert": ("encoder.layer", "attention.output", "output", None, None, (), "embeddings.word_embeddings.weight"),
}


@pytest.mark.parametrize("model_type", list(FORMER_TABLE))
def test_discovery_finds_the_layouts_the_table_held(model_type):
    from transformers import AutoConfig

    from adaptkit.arch import facts_from_config

    # the type's default config, as its published checkpoints name their class (the skeleton is on meta)
    architecture = {"t5": "T5ForConditionalGeneration", "bart": "BartForConditionalGeneration", "bert": "BertModel"}
    config = AutoConfig.for_model(model_type, architectures=[architecture.get(model_type, "")] if
                                  model_type in architecture else None)
    spec = facts_from_config(config).spec
    assert (spec.layers_paths[0], spec.attention, spec.mlp, spec.attention_norm, spec.mlp_norm,
            spec.conv1d_modules) == FORMER_TABLE[model_type][:6]
    assert FORMER_TABLE[model_type][6] in spec.embedding_keys  # its own name, or one tied to it (BART's shared)
    assert spec.is_seq2seq == (model_type in ("t5", "bart"))


@pytest.mark.parametrize("model_type", ["smollm3", "qwen3_moe"])
def test_measured_pre_ln_types_serve_bottlenecks_per_row(model_type, tmp_path):
    base = save_random_base(tiny_model(model_type), tmp_path / "base")
    engine = ak.Engine.from_pretrained(base)
    engine.add_adapter("a", random_bottleneck(base, "a", seed=1, std=0.5))
    ids = random_ids(batch=3)
    alone = engine.logits(ids, adapters="a")
    plain = engine.logits(ids)
    assert (alone - plain).abs().max() > 1e-3  # the adapter changes the output
    mixed = engine.logits(ids, adapters=["a", None, "a"])
    torch.testing.assert_close(mixed[0], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], plain[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["olmo3", "phi"])
def test_blocks_that_measure_otherwise_are_refused_by_name(model_type, tmp_path):
    base = save_random_base(tiny_model(model_type), tmp_path / "base")
    engine = ak.Engine.from_pretrained(base)
    with pytest.raises(BaseModelError, match=f"not supported on '{model_type}'.*measured"):
        engine.add_adapter("a", random_bottleneck(base, "a", seed=1))
    assert engine.adapters == {}
