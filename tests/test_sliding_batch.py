"""Sliding-window models in batches: Mistral (every layer slides) and Gemma 2 (sliding and full layers
interleaved), with windows smaller than the sequences. The window is applied from positions, so padding
and rows joining a running batch never take window slots: every row equals the same request alone, and
alone equals plain transformers."""

from __future__ import annotations

import pytest
import torch
from peft_checks import save_random_base
from serve_helpers import check_concurrent_completions

import adaptkit as ak
from adaptkit.demo import random_lora, random_prefix, random_prompt
from adaptkit.formats.peft import write_lora
from adaptkit.formats.peft_prompt import write_prefix, write_prompt

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              sliding_window=4)


@pytest.fixture(scope="module", params=["mistral", "gemma2"])
def sliding(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM, Gemma2Config, MistralConfig

    config = MistralConfig(**COMMON) if request.param == "mistral" else Gemma2Config(head_dim=16, **COMMON)
    torch.manual_seed(0)
    folder = save_random_base(AutoModelForCausalLM.from_config(config), tmp_path_factory.mktemp(request.param) / "base")
    adapters = folder.parent / "adapters"
    paths = {"lora": write_lora(random_lora(folder, ("q_proj", "v_proj"), seed=1), adapters / "lora"),
             "prefix": write_prefix(random_prefix(folder, num_virtual_tokens=3, seed=2), adapters / "prefix"),
             "prompt": write_prompt(random_prompt(folder, num_virtual_tokens=5, seed=3), adapters / "prompt")}
    return folder, paths


PROMPTS = ["the quick brown fox jumps over", "SELECT name FROM users", "LoRA adds a low-rank update to linear",
           "0123456789", "adaptkit serves many adapters over one base model", "Prefix"]


def test_alone_equals_plain_transformers(sliding):
    from transformers import AutoModelForCausalLM

    base, _ = sliding
    engine = ak.Engine.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation="eager").eval()
    for prompt in PROMPTS[:3]:
        ids = engine.encode([prompt])[0]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        assert engine.generate_ids([ids], max_new_tokens=12, eos_token_id=[])[0] == out[0, len(ids):].tolist()


def test_mixed_batches_equal_each_row_alone(sliding):
    base, paths = sliding
    engine = ak.Engine.from_pretrained(base)
    for name, path in paths.items():
        engine.add_adapter(name, path)
    rows = ["lora", "prefix", "prompt", None, "prefix", "lora"]
    prompts = [engine.encode([p])[0] for p in PROMPTS]
    together = engine.generate_ids(prompts, adapters=rows, max_new_tokens=12, eos_token_id=[])
    for prompt, row, got in zip(prompts, rows, together):
        assert got == engine.generate_ids([prompt], adapters=[row], max_new_tokens=12, eos_token_id=[])[0], row
    ids = torch.tensor([prompts[0]] * 4)
    logits = engine.logits(ids, adapters=["lora", "prefix", "prompt", None])
    for i, row in enumerate(["lora", "prefix", "prompt", None]):
        torch.testing.assert_close(logits[i], engine.logits(ids[i:i + 1], adapters=[row])[0], atol=1e-4, rtol=0)


def test_32_concurrent_requests_through_the_server(sliding):
    check_concurrent_completions(*sliding, PROMPTS, requests=32, threads=16)
