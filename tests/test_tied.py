"""Tied bases (the output head shares the input embeddings' tensor): a LoRA on the head or a stored
embedding changes one side only, unmerged (as PEFT computes it), merged in place and in checkpoints
(where adaptkit unties and writes the head; PEFT's own merge_and_unload does not)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import make_peft_lora, peft_logits, random_ids

import adaptkit as ak
from adaptkit.cli.main import main


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    from adaptkit.demo import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tied") / "base", "llama", tie_word_embeddings=True)


CASES = [
    ("tied_llama", {"target_modules": ["q_proj", "lm_head"]}),
    ("tied_llama", {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]}),
    ("tiny_gpt2", {"target_modules": ["c_attn"], "modules_to_save": ["wte"]}),
    ("tiny_gpt2", {"target_modules": ["c_attn", "lm_head"], "fan_in_fan_out": False}),
    # PEFT 0.22's ensure_weight_tying: what is trained on one side of the tie acts on both, and both are saved
    ("tied_llama", {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"], "ensure_weight_tying": True}),
    ("tied_llama", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"], "ensure_weight_tying": True}),
    ("tied_llama", {"target_modules": ["q_proj", "embed_tokens"], "ensure_weight_tying": True}),
    ("tied_llama", {"target_modules": ["q_proj", "lm_head"], "ensure_weight_tying": True}),
]


@pytest.mark.parametrize("base_name, config", CASES, ids=["llama-lora-head", "llama-save-embed", "gpt2-save-wte",
                                                         "gpt2-lora-head", "tying-save-embed", "tying-save-head",
                                                         "tying-lora-embed", "tying-lora-head"])
def test_tied_bases_merge_to_what_the_unmerged_adapter_computes(base_name, config, request, tmp_path):
    from transformers import AutoModelForCausalLM

    base = request.getfixturevalue(base_name)
    assert json.loads((base / "config.json").read_text()).get("tie_word_embeddings", True)
    if "fan_in_fan_out" in config:  # GPT-2's lm_head is an nn.Linear: no fan_in_fan_out there
        config = {**config, "target_modules": ["lm_head"]}
    adapter = make_peft_lora(base, tmp_path / "adapter", seed=5, **config)
    ids = random_ids()
    expected = peft_logits(base, adapter, ids)
    engine = ak.Engine.from_pretrained(base)
    engine.add_adapter("a", adapter)
    torch.testing.assert_close(engine.logits(ids, adapters="a"), expected, atol=1e-4, rtol=0)
    before = engine.logits(ids)
    mixed = engine.logits(ids, adapters=["a", None])  # the base row keeps the shared tensor as it was
    torch.testing.assert_close(mixed[0], expected[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(mixed[1], before[1], atol=1e-4, rtol=0)
    engine.merge("a")
    torch.testing.assert_close(engine.logits(ids, adapters="a"), expected, atol=1e-4, rtol=0)
    engine.unmerge()
    torch.testing.assert_close(engine.logits(ids), before, atol=0, rtol=0)  # the shared tensor came back intact
    result = CliRunner().invoke(main, ["merge", str(base), str(adapter), "-o", str(tmp_path / "merged"), "-q"])
    assert result.exit_code == 0, result.output
    assert "untied: " in result.output
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-4, rtol=0)


def test_stored_base_layer_weights_must_be_the_bases(tied_llama, tmp_path):
    """PEFT saves a targeted output layer's own weights and loads them over the base: a different one is
    another base, refused by name (engine and merge alike), nothing loaded or written."""
    from safetensors.torch import load_file, save_file

    from adaptkit.errors import UnsupportedAdapterError

    adapter = make_peft_lora(tied_llama, tmp_path / "adapter", seed=5, target_modules=["q_proj", "lm_head"])
    path = adapter / "adapter_model.safetensors"
    state = load_file(str(path))
    key = next(k for k in state if k.endswith("lm_head.base_layer.weight"))
    state[key] = state[key] + 0.5
    save_file(state, str(path))
    engine = ak.Engine.from_pretrained(tied_llama)
    with pytest.raises(UnsupportedAdapterError, match=r"lm_head.base_layer.weight.*max difference 0.5"):
        engine.add_adapter("a", adapter)
    assert engine.adapters == {}
    with pytest.raises(UnsupportedAdapterError, match=r"lm_head.base_layer.weight"):
        ak.merge_checkpoint(tied_llama, [adapter], tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()
