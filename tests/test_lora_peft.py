"""LoRA logits agree with PEFT (the reference) for every supported PEFT option, unmerged and merged."""

from __future__ import annotations

import pytest
import torch
from conftest import make_peft_lora, peft_logits, random_ids

import adaptkit as ak
from adaptkit.errors import UnsupportedAdapterError

VARIANTS = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "patterns": {"rank_pattern": {"v_proj": 2, "c_fc": 2}, "alpha_pattern": {"down_proj": 3, "c_attn": 5}},
    "dora": {"use_dora": True},
    "lora_bias": {"lora_bias": True},
    "modules_to_save": {"modules_to_save": ["lm_head"]},
    "regex_targets": {"target_modules": r".*\.(q_proj|c_attn)"},
    "layers_to_transform": {"layers_to_transform": [1]},
}


@pytest.fixture(scope="module")
def ids():
    return random_ids(batch=3, length=9)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lora_matches_peft(causal_base, tmp_path, ids, variant):
    adapter = make_peft_lora(causal_base, tmp_path / "lora", seed=3, **VARIANTS[variant])
    expected = peft_logits(causal_base, adapter, ids)
    engine = ak.Engine.from_pretrained(causal_base)
    base_logits = engine.logits(ids)
    engine.add_adapter("a", adapter)
    got = engine.logits(ids, adapters=["a"] * ids.shape[0])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (base_logits - expected).abs().max() > 1e-2  # the adapter really changes the output

    if variant == "lora_bias" and "llama" in str(causal_base):
        # Llama projections have no bias: PEFT refuses this merge too; adaptkit says so and changes nothing
        with pytest.raises(UnsupportedAdapterError, match="lora_bias"):
            engine.merge("a")
        torch.testing.assert_close(engine.logits(ids, adapters="a"), expected, atol=1e-4, rtol=0)
        return
    engine.merge("a")
    torch.testing.assert_close(engine.logits(ids, adapters="a"), expected, atol=1e-4, rtol=0)
    engine.unmerge()
    torch.testing.assert_close(engine.logits(ids), base_logits, atol=0, rtol=0)


def test_gpt2_fan_in_fan_out_is_read_from_config(tiny_gpt2, tmp_path, ids):
    """GPT-2's Conv1D stores [in, out]; the LoRA factors are the usual [r, in] / [out, r]."""
    adapter = make_peft_lora(tiny_gpt2, tmp_path / "lora", seed=5, target_modules=["c_attn", "c_proj"])
    engine = ak.Engine.from_pretrained(tiny_gpt2)
    info = engine.add_adapter("a", adapter)
    assert info.details["targets"] == ["c_attn", "c_proj"]
    torch.testing.assert_close(engine.logits(ids, adapters="a"), peft_logits(tiny_gpt2, adapter, ids), atol=1e-4, rtol=0)


def test_bert_encoder_lora_matches_peft_and_merges(tiny_bert, tmp_path):
    """Encoders: LoRA on BERT's query/value equals PEFT; the merged checkpoint loads with plain transformers."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForMaskedLM

    def hf():
        return AutoModelForMaskedLM.from_pretrained(str(tiny_bert), attn_implementation="eager").eval()

    model = get_peft_model(hf(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    model.save_pretrained(str(tmp_path / "lora"))
    ids = random_ids(seed=1)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding, as encoders use
    reference = PeftModel.from_pretrained(hf(), str(tmp_path / "lora")).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
    engine = ak.Engine.from_pretrained(tiny_bert)
    engine.add_adapter("a", tmp_path / "lora")
    torch.testing.assert_close(engine.logits(ids, mask, adapters="a"), expected, atol=1e-4, rtol=0)

    out = ak.merge_checkpoint(tiny_bert, [tmp_path / "lora"], tmp_path / "merged", progress=False)
    with torch.no_grad():
        merged = AutoModelForMaskedLM.from_pretrained(str(out), attn_implementation="eager").eval()
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-4, rtol=0)
