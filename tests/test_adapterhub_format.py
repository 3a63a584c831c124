"""The AdapterHub layout: reading every fixture file, the key table both ways, round trips, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from adapterhub_fixtures import (
    ADAPTERHUB,
    FUSION_NAME,
    all_cases_batch,
    arch_info,
    assert_engine_unchanged,
    engine_state,
    expected,
    forward_all_positions,
    load_engine,
    needs_fixtures,
)
from safetensors.torch import load_file, save_file

import adaptkit as ak
from adaptkit.adapters.bottleneck import BottleneckAdapter
from adaptkit.adapters.fusion import FusionAdapter
from adaptkit.errors import AdapterFormatError, AdapterMismatchError, UnsupportedAdapterError
from adaptkit.formats import adapterhub
from adaptkit.formats.detect import read_adapter
from adaptkit.formats.tensors import load_tensor_file

pytestmark = needs_fixtures


def _raw(folder) -> dict[str, torch.Tensor]:
    file = next(p for p in (folder / n for n in adapterhub.WEIGHT_NAMES + adapterhub.FUSION_WEIGHT_NAMES) if p.is_file())
    return load_tensor_file(file)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_reads_every_fixture_adapter(arch):
    info = arch_info(arch)
    sizes = {"seq_bn": 4, "double_seq_bn": 4, "par_bn": 32, "custom": 16, "custom_ln": 8}
    for name, path in info["adapters"].items():
        adapter = read_adapter(ADAPTERHUB / path)
        assert isinstance(adapter, BottleneckAdapter) and adapter.hub_name == name
        assert {layer.bottleneck_size for layer in adapter.sites.values()} == {sizes[name]}
        want_sites = {(i, s) for i in (0, 1) for s in (("mh", "output") if name == "double_seq_bn" else ("output",))}
        assert set(adapter.sites) == want_sites and adapter.base_class == info["model_class"]
        assert adapter.parameter_count == sum(t.numel() for k, t in _raw(ADAPTERHUB / path).items()
                                              if not (adapter.config.ln_before and ".adapter_down.0." in k))
    fusion = read_adapter(ADAPTERHUB / info["fusion"]["dir"])
    assert isinstance(fusion, FusionAdapter) and fusion.adapter_names == ("seq_bn", "custom")
    assert set(fusion.sites) == {(0, "output"), (1, "output")} and fusion.parameter_count == 2 * (3 * 64 * 64 + 2 * 64)


def test_learned_scaling_and_the_shared_layer_norm():
    """custom_ln: learned scaling ([1] per block) and ln_before, whose LayerNorm the .bin holds twice."""
    folder = ADAPTERHUB / arch_info("gpt2")["adapters"]["custom_ln"]
    adapter = read_adapter(folder)
    raw = _raw(folder)
    assert [round(float(adapter.sites[(i, "output")].scaling), 3) for i in (0, 1)] == [0.671, 1.092]
    prefix = "transformer.h.0.output_adapters.adapters.custom_ln."
    norm = adapter.sites[(0, "output")].norm_before
    assert torch.equal(norm.weight, raw[prefix + "adapter_norm_before.weight"])
    assert torch.equal(norm.weight, raw[prefix + "adapter_down.0.weight"])
    assert torch.equal(adapter.sites[(0, "output")].down.weight, raw[prefix + "adapter_down.1.weight"])
    assert norm.eps == 1e-5


def test_head_files_are_ignored():
    folder = ADAPTERHUB / arch_info("llama")["adapters"]["seq_bn"]
    assert (folder / "pytorch_model_head.bin").is_file() and (folder / "head_config.json").is_file()
    assert read_adapter(folder).parameter_count == 2 * (4 * 64 + 4 + 64 * 4 + 64)  # no lm_head [256, 64]


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_key_table_both_ways_reproduces_the_library_files(arch, tmp_path):
    """Writing what was read gives back AdapterHub's own key names and tensors (safetensors, both
    copies of the ln_before LayerNorm), for adapters and for the fusion."""
    info = arch_info(arch)
    for name, path in info["adapters"].items():
        out = adapterhub.write_bottleneck(read_adapter(ADAPTERHUB / path), tmp_path / name)
        original, written = _raw(ADAPTERHUB / path), load_file(str(out / "adapter.safetensors"))
        assert sorted(written) == sorted(original), name
        assert all(torch.equal(written[k], original[k]) for k in original), name
        meta = json.loads((out / "adapter_config.json").read_text())
        ref = json.loads((ADAPTERHUB / path / "adapter_config.json").read_text())
        assert meta["config"] == ref["config"] and {k: meta[k] for k in ref if k != "config"} == {
            k: v for k, v in ref.items() if k != "config"}
    fusion_dir = ADAPTERHUB / info["fusion"]["dir"]
    out = adapterhub.write_fusion(read_adapter(fusion_dir), tmp_path / "seq_bn,custom")
    original, written = _raw(fusion_dir), load_file(str(out / "model_adapter_fusion.safetensors"))
    assert sorted(written) == sorted(original) and all(torch.equal(written[k], original[k]) for k in original)


def test_prefixed_keys_read_the_same_tensors():
    for name, path in arch_info("bert")["adapters_prefixed"].items():
        plain = read_adapter(ADAPTERHUB / arch_info("bert")["adapters"][name])
        prefixed = read_adapter(ADAPTERHUB / path)
        assert set(plain.sites) == set(prefixed.sites)
        for key, layer in plain.sites.items():
            other = prefixed.sites[key].tensors()
            assert all(torch.equal(t, other[f]) for f, t in layer.tensors().items()), (name, key)


def test_legacy_module_names_are_renamed(tmp_path):
    """adapter-transformers' layer_text_task_adapters / attention_text_task_adapters, no version."""
    src = ADAPTERHUB / arch_info("bert")["adapters"]["double_seq_bn"]
    legacy = {k.replace("attention.output.adapters.", "attention.output.attention_text_task_adapters.")
               .replace("layer.0.output.adapters.", "layer.0.output.layer_text_task_adapters.")
               .replace("layer.1.output.adapters.", "layer.1.output.layer_text_lang_adapters."): v
              for k, v in _raw(src).items()}
    assert not any(".adapters." in k for k in legacy)
    (tmp_path / "old").mkdir()
    save_file(legacy, str(tmp_path / "old" / "adapter.safetensors"))
    meta = json.loads((src / "adapter_config.json").read_text())
    del meta["version"]
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(meta))
    old, new = read_adapter(tmp_path / "old"), read_adapter(src)
    assert set(old.sites) == set(new.sites)
    for key, layer in new.sites.items():
        assert all(torch.equal(t, old.sites[key].tensors()[f]) for f, t in layer.tensors().items())


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_save_load_round_trip_gives_identical_outputs(arch, tmp_path):
    """Every adapter and the fusion, written by adaptkit (a save_adapter_setup layout), load into a
    fresh engine and give bit-identical outputs for every fixture case."""
    info = arch_info(arch)
    eng = load_engine(arch)
    fusion = read_adapter(ADAPTERHUB / info["fusion"]["dir"])
    adapters = {name: read_adapter(ADAPTERHUB / path) for name, path in info["adapters"].items()}
    adapterhub.write_fusion_setup(fusion, adapters, tmp_path / "setup")
    for name in info["adapters"]:
        if name not in fusion.adapter_names:
            adapterhub.write_bottleneck(adapters[name], tmp_path / "setup" / name)
    reloaded = ak.Engine.from_pretrained(ADAPTERHUB / info["base"])
    for name in info["adapters"]:
        reloaded.add_adapter(name, tmp_path / "setup" / name)
    reloaded.add_adapter(FUSION_NAME, tmp_path / "setup" / "seq_bn,custom")
    assert json.loads((tmp_path / "setup" / "adapter_setup.json").read_text())["adapter_setup"]["type"] == "Fuse"
    ids, mask, rows, _ = all_cases_batch(arch)
    first = forward_all_positions(eng, ids, mask, rows)
    second = forward_all_positions(reloaded, ids, mask, rows)
    torch.testing.assert_close(second, first, atol=0, rtol=0)


def test_adapter_for_another_hidden_size_is_refused(tmp_path):
    info = arch_info("gpt2")
    src = ADAPTERHUB / info["adapters"]["seq_bn"]
    narrow = {k: (v[:, :32] if k.endswith("adapter_down.0.weight") else v[:32] if "adapter_up" in k else v).contiguous()
              for k, v in _raw(src).items()}
    (tmp_path / "narrow").mkdir()
    save_file(narrow, str(tmp_path / "narrow" / "adapter.safetensors"))
    meta = json.loads((src / "adapter_config.json").read_text())
    meta.update(hidden_size=32, config={**meta["config"], "reduction_factor": 8})
    (tmp_path / "narrow" / "adapter_config.json").write_text(json.dumps(meta))
    eng = load_engine("gpt2", fusion=False)
    ids = expected("gpt2")["input_ids"][:1]
    before = engine_state(eng, ids)
    with pytest.raises(AdapterMismatchError, match="made for hidden size 32, but the base has 64"):
        eng.add_adapter("narrow", tmp_path / "narrow")
    assert_engine_unchanged(eng, before, ids)


def _copy(src, dst, **config_changes):
    shutil.copytree(src, dst)
    meta = json.loads((dst / "adapter_config.json").read_text())
    meta["config"].update(config_changes)
    (dst / "adapter_config.json").write_text(json.dumps(meta))
    return dst


def test_bad_files_raise_clear_errors(tmp_path):
    src = ADAPTERHUB / arch_info("gpt2")["adapters"]["custom"]
    with pytest.raises(UnsupportedAdapterError, match="phm_layer=True .PHM/Compacter"):
        read_adapter(_copy(src, tmp_path / "phm", phm_layer=True))
    with pytest.raises(UnsupportedAdapterError, match="unknown adapter config field shiny=1"):
        read_adapter(_copy(src, tmp_path / "unknown", shiny=1))
    with pytest.raises(UnsupportedAdapterError, match="architecture 'lora' is not supported"):
        read_adapter(_copy(src, tmp_path / "lora", architecture="lora"))
    with pytest.raises(AdapterFormatError, match=r"bottleneck of 16, but reduction_factor 8 of 64 gives 8"):
        read_adapter(_copy(src, tmp_path / "rf", reduction_factor=8))
    with pytest.raises(AdapterFormatError, match=r"missing \['norm_after.bias', 'norm_after.weight'\]"):
        read_adapter(_copy(src, tmp_path / "ln", ln_after=True))
    no_weights = _copy(src, tmp_path / "empty")
    (no_weights / "adapter.safetensors").unlink()
    with pytest.raises(AdapterFormatError, match="no adapter.safetensors or pytorch_adapter.bin"):
        read_adapter(no_weights)
    other = _copy(src, tmp_path / "other_name")
    meta = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**meta, "name": "renamed"}))
    with pytest.raises(AdapterFormatError, match="unexpected key 'transformer.h.0.output_adapters.adapters.custom"):
        read_adapter(other)
    with pytest.raises(AdapterFormatError, match=r"adapter setup \(Fuse\) holding adapters \['custom', 'seq_bn'\]"):
        read_adapter(ADAPTERHUB / arch_info("gpt2")["fusion"]["setup_dir"])
