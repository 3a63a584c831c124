"""Bad input: one clear AdaptkitError naming the file/key/value; nothing written; engine unchanged."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import make_peft_lora, random_ids

import adaptkit as ak
from adaptkit.cli.main import main
from adaptkit.demo import build_tiny_model
from adaptkit.errors import (
    AdapterFormatError,
    AdapterMismatchError,
    AdaptkitError,
    UnsupportedAdapterError,
)


@pytest.fixture(scope="module")
def good(tiny_llama, tmp_path_factory):
    return make_peft_lora(tiny_llama, tmp_path_factory.mktemp("good") / "lora", seed=1)


def _broken_copy(good, tmp_path, name):
    target = tmp_path / name
    shutil.copytree(good, target)
    return target


def _missing_config(good, tmp_path):
    path = _broken_copy(good, tmp_path, "no_config")
    (path / "adapter_config.json").unlink()
    return path


def _corrupt_weights(good, tmp_path):
    path = _broken_copy(good, tmp_path, "corrupt")
    (path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return path


def _unknown_peft_type(good, tmp_path):
    path = _broken_copy(good, tmp_path, "unknown_type")
    config = json.loads((path / "adapter_config.json").read_text())
    config["peft_type"] = "VERA_PLUS"
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def _targets_nothing(good, tmp_path):
    path = _broken_copy(good, tmp_path, "targets_nothing")
    config = json.loads((path / "adapter_config.json").read_text())
    config["target_modules"] = ["no_such_proj"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def _other_size(good, tmp_path):
    wide = build_tiny_model(tmp_path / "wide_base", "llama", hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    return make_peft_lora(wide, tmp_path / "wide_lora", seed=2, target_modules=["q_proj", "v_proj"])


def _other_arch(good, tmp_path):
    gpt2 = build_tiny_model(tmp_path / "gpt2_base", "gpt2")
    return make_peft_lora(gpt2, tmp_path / "gpt2_lora", seed=3)


CASES = {
    "missing adapter_config.json": (_missing_config, AdapterFormatError, "adapter_config.json"),
    "corrupt safetensors": (_corrupt_weights, AdapterFormatError, "adapter_model.safetensors"),
    "unknown peft_type": (_unknown_peft_type, UnsupportedAdapterError, "VERA_PLUS"),
    "targets match nothing": (_targets_nothing, AdapterMismatchError, "no_such_proj"),
    "shapes do not match the base": (_other_size, AdapterMismatchError, "96"),
    "made for another architecture": (_other_arch, AdapterMismatchError, "GPT2LMHeadModel"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_adapter_is_a_clear_error_and_engine_is_unchanged(case, good, tiny_llama, tmp_path):
    make, error, needle = CASES[case]
    path = make(good, tmp_path)
    engine = ak.Engine.from_pretrained(tiny_llama)
    engine.add_adapter("good", good)
    ids = random_ids(seed=9)
    before = engine.logits(ids, adapters=["good", None])
    modules_before = [type(m).__name__ for m in engine.model.modules()]
    with pytest.raises(error, match=needle):
        engine.add_adapter("bad", path)
    assert list(engine.adapters) == ["good"]
    assert [type(m).__name__ for m in engine.model.modules()] == modules_before
    torch.testing.assert_close(engine.logits(ids, adapters=["good", None]), before, atol=0, rtol=0)

    # the CLI says the same in one line, exits non-zero, and writes nothing
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", str(tiny_llama), str(path), "-o", str(out)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output
    assert not out.exists()
    assert not any(p.name.startswith(".merged") for p in tmp_path.iterdir())


def test_existing_output_without_force_is_refused(good, tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(main, ["merge", str(tiny_llama), str(good), "-o", str(out)])
    assert result.exit_code == 1 and "already exists" in result.output and "--force" in result.output
    assert list(out.iterdir()) == []


def test_bin_adapter_is_read_weights_only(good, tiny_llama, tmp_path):
    """A .bin adapter loads through torch.load(weights_only=True); a pickle with code is refused."""
    from safetensors.torch import load_file

    path = _broken_copy(good, tmp_path, "bin")
    state = load_file(str(path / "adapter_model.safetensors"))
    (path / "adapter_model.safetensors").unlink()
    torch.save(state, path / "adapter_model.bin")
    engine = ak.Engine.from_pretrained(tiny_llama)
    engine.add_adapter("bin", path)
    engine.add_adapter("safe", good)
    ids = random_ids(seed=10)
    torch.testing.assert_close(engine.logits(ids, adapters="bin"), engine.logits(ids, adapters="safe"), atol=0, rtol=0)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, path / "adapter_model.bin")
    with pytest.raises(AdaptkitError, match="adapter_model.bin"):
        ak.Engine.from_pretrained(tiny_llama).add_adapter("evil", path)


def test_unsupported_peft_field_is_not_ignored(good, tmp_path, tiny_llama):
    path = _broken_copy(good, tmp_path, "replication")
    config = json.loads((path / "adapter_config.json").read_text())
    config["layer_replication"] = [[0, 2]]
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedAdapterError, match="layer_replication"):
        ak.Engine.from_pretrained(tiny_llama).add_adapter("x", path)


def test_missing_base_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["generate", str(tmp_path / "nope"), "--prompt", "hi"])
    assert result.exit_code == 1 and "config.json" in result.output
