"""The PEFT layout both ways: adaptkit reads what PEFT saves, PEFT loads what adaptkit saves."""

from __future__ import annotations

import pytest
import torch
from conftest import make_peft_lora, peft_logits, random_ids
from safetensors.torch import load_file

import adaptkit as ak
from adaptkit.formats.peft import LORA_FIELD_TO_KEY, LORA_KEY_TABLE, read_lora, split_lora_key, write_lora


def test_key_table_round_trips():
    for suffix, field in LORA_KEY_TABLE.items():
        module, parsed = split_lora_key(f"model.layers.0.self_attn.q_proj.{suffix}")
        assert (module, parsed) == ("model.layers.0.self_attn.q_proj", field)
    for field, suffix in LORA_FIELD_TO_KEY.items():
        assert LORA_KEY_TABLE[suffix] == field


@pytest.mark.parametrize("variant", [{}, {"use_dora": True, "use_rslora": True}, {"modules_to_save": ["lm_head"]}])
def test_rewrite_is_identical_and_peft_loads_it(causal_base, tmp_path, variant):
    original = make_peft_lora(causal_base, tmp_path / "peft", seed=8, **variant)
    rewritten = write_lora(read_lora(original), tmp_path / "adaptkit")
    a = load_file(str(original / "adapter_model.safetensors"))
    b = load_file(str(rewritten / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ids = random_ids(seed=9)
    torch.testing.assert_close(peft_logits(causal_base, rewritten, ids), peft_logits(causal_base, original, ids),
                               atol=0, rtol=0)


def test_adaptkit_built_lora_loads_in_peft_with_same_logits(causal_base, tmp_path):
    from adaptkit.demo import random_lora

    targets = ("c_attn",) if "gpt2" in str(causal_base) else ("q_proj", "o_proj")
    adapter = random_lora(causal_base, targets, r=4, alpha=16, seed=4, fan_in_fan_out="gpt2" in str(causal_base))
    folder = write_lora(adapter, tmp_path / "mine")
    engine = ak.Engine.from_pretrained(causal_base)
    engine.add_adapter("mine", folder)
    ids = random_ids(seed=10)
    torch.testing.assert_close(engine.logits(ids, adapters="mine"), peft_logits(causal_base, folder, ids),
                               atol=1e-4, rtol=0)
