"""LoRA on embedding tables and output heads, saved with PEFT's defaults (the continued-pretraining
target list ``[..., "embed_tokens", "lm_head"]``): exact vs PEFT per row, merged in place and in checkpoints,
on untied and tied bases."""

from __future__ import annotations

import pytest
from conftest import make_peft_lora, random_ids
from peft_checks import check_served_like_peft
from test_tied import tied_llama  # noqa: F401  (the module fixture)

CASES = [
    ("tiny_llama", ["q_proj", "v_proj", "embed_tokens", "lm_head"]),
    ("tied_llama", ["q_proj", "embed_tokens", "lm_head"]),
    ("tiny_llama", ["embed_tokens"]),
    ("tiny_gpt2", ["c_attn", "wte"]),
]


@pytest.mark.parametrize("base_name, targets", CASES, ids=["llama-cpt", "tied-llama-cpt", "llama-embed", "gpt2-wte"])
def test_lora_on_embeddings_equals_peft(base_name, targets, request, tmp_path):
    base = request.getfixturevalue(base_name)
    adapter = make_peft_lora(base, tmp_path / "cpt", seed=7, target_modules=targets)
    check_served_like_peft(base, adapter, random_ids(batch=3), tmp_path)
