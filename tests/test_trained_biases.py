"""LoRAs trained with base biases (PEFT ``bias="all"`` / ``"lora_only"``): the new biases apply to the
adapter's rows only, exact vs PEFT unmerged, merged in place and in checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import load_hf, make_peft_lora, peft_logits, random_ids

import adaptkit as ak


def biased_lora(base, out, bias, seed=0):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_hf(base), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                     fan_in_fan_out=True, bias=bias))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # the factors and the biases PEFT trains with them
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    model.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases_equal_peft(bias, tiny_gpt2, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = biased_lora(tiny_gpt2, tmp_path / bias, bias)
    other = make_peft_lora(tiny_gpt2, tmp_path / "other", seed=4)
    ids = random_ids(batch=3)
    expected, expected_other = peft_logits(tiny_gpt2, adapter, ids), peft_logits(tiny_gpt2, other, ids)
    engine = ak.Engine.from_pretrained(tiny_gpt2)
    plain = engine.logits(ids)
    engine.add_adapter("biased", adapter)
    engine.add_adapter("other", other)
    torch.testing.assert_close(engine.logits(ids, adapters="biased"), expected, atol=1e-4, rtol=0)
    mixed = engine.logits(ids, adapters=["biased", "other", None])
    torch.testing.assert_close(mixed[0], expected[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(mixed[1], expected_other[1], atol=1e-4, rtol=0)
    torch.testing.assert_close(mixed[2], plain[2], atol=1e-4, rtol=0)
    engine.merge("biased")
    torch.testing.assert_close(engine.logits(ids, adapters="biased"), expected, atol=1e-4, rtol=0)
    engine.unmerge()
    torch.testing.assert_close(engine.logits(ids), plain, atol=0, rtol=0)
    merged = ak.merge_checkpoint(tiny_gpt2, [adapter], tmp_path / "merged", progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-4, rtol=0)
