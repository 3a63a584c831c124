"""Bottleneck adapters on model types without a table entry: a block whose two norms and sub-blocks the
live model shows to compute ``x + attn(norm1(x))`` then ``+ mlp(norm2(.))`` takes AdapterHub's pre-LN
placement. The discovered placement on a Llama equals the table's (which equals AdapterHub's fixtures,
test_bottleneck.py); SmolLM3 and Qwen3-MoE serve them per row; blocks that measure otherwise (OLMo 3's
post-norms, Phi's parallel block) are refused by name."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids
from model_zoo import tiny_model
from peft_checks import save_random_base

import adaptkit as ak
from adaptkit.demo import random_bottleneck
from adaptkit.errors import BaseModelError


def test_the_discovered_placement_on_a_llama_is_the_tables(tiny_llama, monkeypatch):
    from adaptkit import arch, measured

    adapters = [random_bottleneck(tiny_llama, "a", seed=1), random_bottleneck(tiny_llama, "b", parallel=True, seed=2)]
    ids = random_ids(batch=3)
    table = ak.Engine.from_pretrained(tiny_llama)
    for name, adapter in zip("ab", adapters):
        table.add_adapter(name, adapter)
    expected = table.logits(ids, adapters=["a", "b", None])
    for module in (arch, measured):  # llama as a type nobody listed
        monkeypatch.setattr(module, "has_table_entry", lambda model_type: False)
    monkeypatch.setattr(arch, "BOTTLENECK_MODEL_TYPES", set())
    discovered = ak.Engine.from_pretrained(tiny_llama)
    assert discovered.base.facts.pre_ln_measured and discovered.base.facts.spec.mlp_norm == "post_attention_layernorm"
    for name, adapter in zip("ab", adapters):
        discovered.add_adapter(name, adapter)
    torch.testing.assert_close(discovered.logits(ids, adapters=["a", "b", None]), expected, atol=1e-5, rtol=0)


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
