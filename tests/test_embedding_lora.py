"""LoRA on embedding tables and output heads, saved with PEFT's defaults (the continued-pretraining
target list ``[..., "embed_tokens", "lm_head"]``): exact vs PEFT per row, merged in place and in checkpoints,
on untied and tied bases."""

from __future__ import annotations

import pytest
import torch
from conftest import make_peft_lora, peft_logits, random_ids
from test_tied import tied_llama  # noqa: F401  (the module fixture)

import adaptkit as ak

CASES = [
    ("tiny_llama", ["q_proj", "v_proj", "embed_tokens", "lm_head"]),
    ("tied_llama", ["q_proj", "embed_tokens", "lm_head"]),
    ("tiny_llama", ["embed_tokens"]),
    ("tiny_gpt2", ["c_attn", "wte"]),
]


@pytest.mark.parametrize("base_name, targets", CASES, ids=["llama-cpt", "tied-llama-cpt", "llama-embed", "gpt2-wte"])
def test_lora_on_embeddings_equals_peft(base_name, targets, request, tmp_path):
    from transformers import AutoModelForCausalLM

    base = request.getfixturevalue(base_name)
    adapter = make_peft_lora(base, tmp_path / "cpt", seed=7, target_modules=targets)
    other = make_peft_lora(base, tmp_path / "other", seed=8)
    ids = random_ids(batch=3)
    expected = peft_logits(base, adapter, ids)
    expected_other = peft_logits(base, other, ids)
    engine = ak.Engine.from_pretrained(base)
    plain = engine.logits(ids)
    assert (expected - plain).abs().max() > 1e-2
    engine.add_adapter("cpt", adapter)
    engine.add_adapter("other", other)
    torch.testing.assert_close(engine.logits(ids, adapters="cpt"), expected, atol=1e-4, rtol=0)
    mixed = engine.logits(ids, adapters=["cpt", "other", None])
    torch.testing.assert_close(mixed[0], expected[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(mixed[1], expected_other[1], atol=1e-4, rtol=0)
    torch.testing.assert_close(mixed[2], plain[2], atol=1e-4, rtol=0)
    engine.merge("cpt")
    torch.testing.assert_close(engine.logits(ids, adapters="cpt"), expected, atol=1e-4, rtol=0)
    engine.unmerge()
    torch.testing.assert_close(engine.logits(ids), plain, atol=0, rtol=0)
    merged = ak.merge_checkpoint(base, [adapter], tmp_path / "merged", progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-4, rtol=0)
