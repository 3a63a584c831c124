"""LoRAs trained with base biases (PEFT ``bias="all"`` / ``"lora_only"``): the new biases apply to the
adapter's rows only, exact vs PEFT unmerged, merged in place and in checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import load_hf, random_ids
from peft_checks import check_served_like_peft


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
    check_served_like_peft(tiny_gpt2, biased_lora(tiny_gpt2, tmp_path / bias, bias), random_ids(batch=3), tmp_path)
