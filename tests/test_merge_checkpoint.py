"""Streaming merge into a standalone checkpoint that plain transformers loads."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_hf, make_peft_lora, peft_logits, random_ids

import adaptkit as ak
from adaptkit.demo import build_tiny_model
from adaptkit.errors import OutputExistsError


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("sharded") / "base", "llama", max_shard_size="100KB")


def _plain_logits(folder, ids):
    with torch.no_grad():
        return load_hf(folder)(input_ids=ids).logits


@pytest.mark.parametrize("variant", [{}, {"use_dora": True}, {"modules_to_save": ["lm_head"]}])
def test_merged_checkpoint_equals_peft_merge_and_unload(causal_base, tmp_path, variant):
    adapter = make_peft_lora(causal_base, tmp_path / "lora", seed=11, **variant)
    out = ak.merge_checkpoint(causal_base, [adapter], tmp_path / "merged", progress=False)
    ids = random_ids(seed=12)
    expected = peft_logits(causal_base, adapter, ids, merge=True)
    torch.testing.assert_close(_plain_logits(out, ids), expected, atol=1e-4, rtol=0)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert not any(p.name.startswith(".merged") for p in tmp_path.iterdir())  # no temporary folder left


def test_sharded_base_gives_sharded_output(sharded_llama, tmp_path):
    shards = sorted(sharded_llama.glob("model-*.safetensors"))
    assert len(shards) > 1, "fixture must be sharded"
    adapter = make_peft_lora(sharded_llama, tmp_path / "lora", seed=13)
    out = ak.merge_checkpoint(sharded_llama, [adapter], tmp_path / "merged", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(shards)
    ids = random_ids(seed=14)
    expected = peft_logits(sharded_llama, adapter, ids, merge=True)
    torch.testing.assert_close(_plain_logits(out, ids), expected, atol=1e-4, rtol=0)


def test_weighted_merge_matches_peft_deltas_and_engine_mix(tiny_llama, tmp_path):
    """0.7 * dA - 0.3 * dB: reference built from PEFT's own per-layer get_delta_weight."""
    from peft import PeftModel

    a = make_peft_lora(tiny_llama, tmp_path / "a", seed=21)
    b = make_peft_lora(tiny_llama, tmp_path / "b", seed=22, r=8, use_rslora=True, target_modules=["q_proj", "o_proj"])
    out = ak.merge_checkpoint(tiny_llama, [a, b], tmp_path / "merged", weights=[0.7, -0.3], progress=False)

    reference = load_hf(tiny_llama)
    peft_model = PeftModel.from_pretrained(load_hf(tiny_llama), str(a), adapter_name="a")
    peft_model.load_adapter(str(b), adapter_name="b")
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "lora_A"):
                weight = reference.get_submodule(name).weight
                for adapter_name, w in (("a", 0.7), ("b", -0.3)):
                    if adapter_name in module.lora_A:
                        weight += w * module.get_delta_weight(adapter_name)
    ids = random_ids(seed=23)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    torch.testing.assert_close(_plain_logits(out, ids), expected, atol=1e-4, rtol=0)

    engine = ak.Engine.from_pretrained(tiny_llama)
    engine.add_adapter("a", a)
    engine.add_adapter("b", b)
    torch.testing.assert_close(engine.logits(ids, adapters=ak.Mix({"a": 0.7, "b": -0.3})), expected, atol=1e-4, rtol=0)


def test_output_dtype_and_record(tiny_llama, tmp_path):
    adapter = make_peft_lora(tiny_llama, tmp_path / "lora", seed=31)
    out = ak.merge_checkpoint(tiny_llama, [adapter], tmp_path / "merged", dtype="bfloat16", progress=False)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    record = json.loads((out / "adaptkit_merge.json").read_text())["adaptkit_merge"]
    assert record["weights"] == [1.0] and record["method"] == "linear"


def test_existing_output_needs_force_and_failure_writes_nothing(tiny_llama, tmp_path, monkeypatch):
    adapter = make_peft_lora(tiny_llama, tmp_path / "lora", seed=41)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="--force"):
        ak.merge_checkpoint(tiny_llama, [adapter], out, progress=False)
    assert (out / "keep.txt").read_text() == "user data"

    import adaptkit.formats.checkpoint as checkpoint

    def broken_save(tensors, path):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_shard", broken_save)
    from adaptkit.errors import OutputWriteError

    with pytest.raises(OutputWriteError, match="disk full; nothing was written"):
        ak.merge_checkpoint(tiny_llama, [adapter], out, force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora", "merged"]  # temp folder removed
    assert (out / "keep.txt").read_text() == "user data"  # the old output is intact
    monkeypatch.undo()
    ak.merge_checkpoint(tiny_llama, [adapter], out, force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
