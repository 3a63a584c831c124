"""Base loading: layouts (single, sharded, .bin), dtypes, architecture facts, fingerprints."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_hf, random_ids

import adaptkit as ak
from adaptkit.base import load_base
from adaptkit.demo import build_tiny_model, random_lora
from adaptkit.errors import AdapterMismatchError, BaseModelError, InvalidArgumentError
from adaptkit.formats.peft import write_lora


@pytest.mark.parametrize("arch,family,kv_heads", [("llama", "llama", 2), ("gpt2", "gpt2", 4), ("bert", "bert", 4)])
def test_architecture_facts(arch, family, kv_heads, tiny_llama, tiny_gpt2, tiny_bert):
    base = load_base({"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}[arch])
    facts = base.facts
    assert (facts.family, facts.hidden_size, facts.num_layers, facts.num_heads) == (family, 64, 2, 4)
    assert facts.num_kv_heads == kv_heads and facts.head_dim == 16
    assert facts.spec.is_causal == (arch != "bert")
    assert base.tokenizer is not None


def test_bin_checkpoint_loads_weights_only(tiny_llama, tmp_path):
    """A pytorch_model.bin base (no safetensors) loads through torch.load(weights_only=True)."""
    import shutil

    from safetensors.torch import load_file

    target = tmp_path / "bin_base"
    shutil.copytree(tiny_llama, target)
    state = load_file(str(target / "model.safetensors"))
    (target / "model.safetensors").unlink()
    torch.save(state, target / "pytorch_model.bin")
    ids = random_ids(seed=1)
    expected = ak.Engine.from_pretrained(tiny_llama).logits(ids)
    torch.testing.assert_close(ak.Engine.from_pretrained(target).logits(ids), expected, atol=0, rtol=0)


def test_sharded_base_matches_single_file(tmp_path):
    single = build_tiny_model(tmp_path / "single", "gpt2", seed=3)
    sharded = build_tiny_model(tmp_path / "sharded", "gpt2", seed=3, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    ids = random_ids(seed=2)
    torch.testing.assert_close(ak.Engine.from_pretrained(sharded).logits(ids),
                               ak.Engine.from_pretrained(single).logits(ids), atol=0, rtol=0)


def test_dtypes_and_fingerprint(tiny_llama):
    fp32 = load_base(tiny_llama, dtype="float32")
    bf16 = load_base(tiny_llama, dtype="bf16")
    assert bf16.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert fp32.fingerprint == bf16.fingerprint  # the same base in another dtype is the same base
    ids = random_ids(seed=4)
    with torch.no_grad():
        reference = load_hf(tiny_llama)(input_ids=ids).logits
    got = ak.Engine.from_pretrained(tiny_llama, dtype="bfloat16").logits(ids).float()
    # bf16 keeps ~3 significant digits; logits of this model are O(1)
    torch.testing.assert_close(got, reference, atol=0.1, rtol=0.05)
    with pytest.raises(InvalidArgumentError, match="float8"):
        load_base(tiny_llama, dtype="float8")


def test_fingerprint_catches_a_wrong_base_of_the_same_shape(tiny_llama, tmp_path):
    other = build_tiny_model(tmp_path / "other", "llama", seed=99)
    assert load_base(other).fingerprint != load_base(tiny_llama).fingerprint
    adapter = random_lora(tiny_llama, ("q_proj",), seed=1)
    assert adapter.fingerprint == load_base(tiny_llama).fingerprint
    folder = write_lora(adapter, tmp_path / "lora")
    assert json.loads((folder / "adaptkit.json").read_text())["base_fingerprint"] == adapter.fingerprint
    ak.Engine.from_pretrained(tiny_llama).add_adapter("ok", folder)
    with pytest.raises(AdapterMismatchError, match="made for base"):
        ak.Engine.from_pretrained(other).add_adapter("wrong", folder)
    with pytest.raises(AdapterMismatchError, match="made for base"):
        ak.merge_checkpoint(other, [folder], tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


def test_not_a_model_folder(tmp_path):
    with pytest.raises(BaseModelError, match="config.json"):
        load_base(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(BaseModelError, match="no \\*.safetensors"):
        load_base(tmp_path)
