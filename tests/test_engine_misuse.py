"""Engine misuse: a typed, one-line error naming the value, never an IndexError from deep inside torch."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import random_ids

import adaptkit as ak
from adaptkit.cli.main import main
from adaptkit.demo import random_lora
from adaptkit.errors import InvalidArgumentError


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return ak.Engine.from_pretrained(tiny_llama)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "2", None, True])
def test_scale_must_be_a_finite_number(engine, tiny_llama, scale):
    with pytest.raises(InvalidArgumentError, match="scale must be a finite number"):
        engine.add_adapter("s", random_lora(tiny_llama), scale=scale)
    assert "s" not in engine.adapters


def test_the_same_adapter_object_twice_with_another_scale(tiny_llama):
    engine = ak.Engine.from_pretrained(tiny_llama)
    adapter = random_lora(tiny_llama, seed=3)
    ids = random_ids(seed=1)
    engine.add_adapter("one", adapter)
    first = engine.logits(ids, adapters="one")
    engine.add_adapter("two", adapter, scale=2.0)
    assert torch.equal(engine.logits(ids, adapters="one"), first)  # the first one is not rescaled
    assert (engine.logits(ids, adapters="two") - first).abs().max() > 1e-3
    assert all(w.scale == adapter.config.scale_for(n) for n, w in adapter.layers.items())  # caller's object intact


@pytest.mark.parametrize("ids, mask, message", [
    ([[5, 6, 320]], None, r"token id 320 is outside the vocabulary \[0, 320\)"),
    ([[5, -1, 6]], None, "token id -1 is outside the vocabulary"),
    ([[5.0, 6.0]], None, "must be integer token ids"),
    ([[True, False]], None, "must be integer token ids"),
    ([[5, 6, 7]], [[1, 1]], r"attention_mask has shape \(1, 2\) but input_ids has \(1, 3\)"),
    ([[]], None, "at least one token"),
    ([[[5, 6]]], None, r"must be \[batch, seq\]"),
    ([[5, 6], [7]], None, "input_ids must be a"),
])
def test_bad_batches(engine, ids, mask, message):
    with pytest.raises(InvalidArgumentError, match=message):
        engine.logits(ids, mask)


def test_generation_past_the_context_is_refused(tiny_gpt2, tiny_llama):
    gpt2 = ak.Engine.from_pretrained(tiny_gpt2)  # n_positions 256: beyond it GPT-2 has no position embedding
    with pytest.raises(InvalidArgumentError, match="context is 256 tokens; the request needs 260"):
        gpt2.generate_ids([[5] * 250], max_new_tokens=10)
    with pytest.raises(InvalidArgumentError, match="outside the vocabulary"):
        gpt2.generate_ids([[5, 9999]], max_new_tokens=2)
    result = CliRunner().invoke(main, ["generate", str(tiny_llama), "--prompt", "hello", "--max-new-tokens", "5000"])
    assert result.exit_code == 1 and "context is 256 tokens" in result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_a_device_this_torch_lacks(tiny_llama):
    with pytest.raises(InvalidArgumentError, match="'cuda'.*use --device cpu"):
        ak.Engine.from_pretrained(tiny_llama, device="cuda")
    with pytest.raises(InvalidArgumentError, match="not a device name"):
        ak.Engine.from_pretrained(tiny_llama, device="gpu0")
    result = CliRunner().invoke(main, ["bench", str(tiny_llama), "--device", "cuda", "--repeats", "1"])
    assert result.exit_code == 1 and result.output.startswith("error: ") and result.output.count("\n") == 1


def test_onnx_verify_without_onnxruntime(tiny_llama, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    result = CliRunner().invoke(main, ["export", "onnx", str(tiny_llama), "-o", str(tmp_path / "m.onnx"), "--verify"])
    assert result.exit_code == 1 and "needs onnxruntime; pip install onnxruntime" in result.output
    assert not (tmp_path / "m.onnx").exists()
    assert result.output.count("\n") == 1


def test_names_mixes_and_an_adapter_for_a_deeper_base(engine, tiny_llama, tmp_path):
    """``training`` (a Module attribute) is a reserved name; NaN Mix weights are refused; a LoRA made for a
    4-layer model of the same family on this 2-layer base is an AdapterMismatchError, not a rollback crash."""
    from adaptkit.demo import build_tiny_model
    from adaptkit.errors import AdapterMismatchError

    with pytest.raises(InvalidArgumentError, match="'training' is reserved"):
        engine.add_adapter("training", random_lora(tiny_llama))
    with pytest.raises(InvalidArgumentError, match="Mix weight of 'a' is nan"):
        ak.Mix({"a": float("nan")})
    deeper = build_tiny_model(tmp_path / "deeper", "llama", num_hidden_layers=4)
    foreign = random_lora(deeper, seed=1)
    foreign.fingerprint = None  # as a PEFT adapter from elsewhere: only the shapes and names can tell
    with pytest.raises(AdapterMismatchError, match="does not exist"):
        engine.add_adapter("deep", foreign)
    assert engine.adapters == {}
