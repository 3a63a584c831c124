"""Prompt tuning on Gemma 2 (sliding-window layers interleaved with full ones) with at least as many
virtual tokens as the window: the virtual tokens' K/V are computed with every position kept, and the
model's own sliding masks decide what the real tokens see, as in PEFT's prepended sequence."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids

import adaptkit as ak


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    from transformers import AutoModelForCausalLM, Gemma2Config

    from adaptkit.demo import build_tokenizer

    folder = tmp_path_factory.mktemp("gemma2") / "base"
    config = Gemma2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                          sliding_window=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    build_tokenizer().save_pretrained(str(folder))
    return folder


def _load(base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation="eager").eval()


@pytest.mark.parametrize("virtual_tokens", [3, 4, 6])
def test_gemma2_prompt_tuning_with_a_prompt_as_long_as_the_window(gemma2, virtual_tokens, tmp_path):
    from peft import PeftModel, PromptTuningConfig, get_peft_model

    model = get_peft_model(_load(gemma2), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens))
    with torch.no_grad():
        for param in model.prompt_encoder.parameters():
            param.normal_(0, 1.0, generator=torch.Generator().manual_seed(virtual_tokens))
    model.save_pretrained(str(tmp_path / "prompt"))
    ids = random_ids(batch=3, length=10)
    reference = PeftModel.from_pretrained(_load(gemma2), str(tmp_path / "prompt")).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits[:, virtual_tokens:]
        plain = _load(gemma2)(input_ids=ids).logits
    engine = ak.Engine.from_pretrained(gemma2)
    engine.add_adapter("prompt", tmp_path / "prompt")
    torch.testing.assert_close(engine.logits(ids, adapters="prompt"), expected, atol=1e-4, rtol=0)
    mixed = engine.logits(ids, adapters=["prompt", None, "prompt"])
    torch.testing.assert_close(mixed[[0, 2]], expected[[0, 2]], atol=1e-4, rtol=0)
    torch.testing.assert_close(mixed[1], plain[1], atol=1e-4, rtol=0)
