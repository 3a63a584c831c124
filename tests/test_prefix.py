"""Prefix tuning and P-tuning v2: PEFT files load, logits and greedy tokens equal PEFT's, K/V export."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_ids
from virtual_helpers import (
    load_peft,
    make_peft_virtual,
    peft_greedy,
    peft_real_logits,
    peft_virtual_model,
    save_encoder_checkpoint,
)

import adaptkit as ak
from adaptkit.adapters.prefix import PrefixAdapter, PrefixConfig
from adaptkit.errors import AdapterFormatError, AdapterMismatchError, OutputExistsError
from adaptkit.formats.detect import read_adapter
from adaptkit.formats.peft_prompt import write_prefix


@pytest.fixture(scope="module")
def prefixes(causal_base, tmp_path_factory):
    """P-tuning v2 (K/V trained directly) and prefix tuning (MLP reparameterisation), made by PEFT."""
    root = tmp_path_factory.mktemp("prefix")
    return {
        "prefix": make_peft_virtual(causal_base, root / "prefix", "prefix", seed=1, num_virtual_tokens=5),
        "prefix_mlp": make_peft_virtual(causal_base, root / "prefix_mlp", "prefix_mlp", seed=2, num_virtual_tokens=3),
    }


@pytest.fixture(scope="module")
def engine(causal_base, prefixes):
    eng = ak.Engine.from_pretrained(causal_base)
    for name, path in prefixes.items():
        eng.add_adapter(name, path)
    return eng


@pytest.mark.parametrize("method", ["prefix", "prefix_mlp"])
def test_logits_equal_peft(engine, causal_base, prefixes, method):
    ids = random_ids(batch=2, length=9, seed=3)
    expected = peft_real_logits(load_peft(causal_base, prefixes[method]), ids)
    got = engine.logits(ids, adapters=method)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (got - engine.logits(ids)).abs().max() > 1e-2  # the prefix changes the output


def test_details_and_kinds(engine, causal_base):
    info = engine.adapters["prefix_mlp"]
    facts = engine.base.facts
    assert info.kind == "prefix" and info.details["method"] == "prefix_tuning"
    assert engine.adapters["prefix"].details["method"] == "p_tuning_v2"
    assert (info.details["layers"], info.details["kv_heads"], info.details["head_dim"]) == (
        facts.num_layers, facts.num_kv_heads, facts.head_dim)
    assert info.params == 2 * facts.num_layers * facts.num_kv_heads * 3 * facts.head_dim


def test_mlp_reparameterisation_folded_at_load(causal_base, prefixes, tmp_path):
    """A checkpoint carrying the prefix MLP (not its output) is folded once at load: logits equal PEFT running it."""
    model = peft_virtual_model(causal_base, "prefix_mlp", seed=5, num_virtual_tokens=4)
    model.peft_config["default"].inference_mode = False  # PEFT runs the MLP on every forward
    ids = random_ids(batch=2, length=8, seed=4)
    expected = peft_real_logits(model, ids)
    model.save_pretrained(str(tmp_path / "folded"))
    unfolded = save_encoder_checkpoint(model, tmp_path / "folded", tmp_path / "unfolded")
    adapter = read_adapter(unfolded)
    stored = read_adapter(tmp_path / "folded")
    torch.testing.assert_close(adapter.keys, stored.keys, atol=1e-5, rtol=0)
    eng = ak.Engine.from_pretrained(causal_base)
    eng.add_adapter("p", adapter)
    torch.testing.assert_close(eng.logits(ids, adapters="p"), expected, atol=1e-4, rtol=0)


def test_greedy_tokens_equal_peft(engine, causal_base, prefixes):
    """20 greedy tokens (P-tuning v2 shares this runtime: only how the K/V were trained differs)."""
    prompt = random_ids(batch=1, length=6, seed=11)[0].tolist()
    expected = peft_greedy(load_peft(causal_base, prefixes["prefix_mlp"]), prompt, 20)
    got = engine.generate_ids([prompt], adapters="prefix_mlp", max_new_tokens=20, eos_token_id=-1)[0]
    assert got == expected
    assert got != engine.generate_ids([prompt], max_new_tokens=20, eos_token_id=-1)[0]


def test_written_by_adaptkit_loads_in_peft(engine, causal_base, prefixes, tmp_path):
    adapter = read_adapter(prefixes["prefix_mlp"])
    out = write_prefix(adapter, tmp_path / "written")
    again = read_adapter(out)
    assert again.config == adapter.config
    torch.testing.assert_close(again.keys, adapter.keys, atol=0, rtol=0)
    ids = random_ids(batch=2, length=7, seed=8)
    torch.testing.assert_close(peft_real_logits(load_peft(causal_base, out), ids),
                               engine.logits(ids, adapters="prefix_mlp"), atol=1e-4, rtol=0)


def _shifted(facts, field: str) -> PrefixConfig:
    sizes = {"num_layers": facts.num_layers, "num_kv_heads": facts.num_kv_heads, "head_dim": facts.head_dim}
    sizes[field] += 1
    return PrefixConfig(num_virtual_tokens=3, **sizes)


@pytest.mark.parametrize("field", ["num_layers", "num_kv_heads", "head_dim"])
def test_mismatched_prefix_rejected_engine_unchanged(engine, tmp_path, field):
    cfg = _shifted(engine.base.facts, field)
    shape = (cfg.num_layers, cfg.num_kv_heads, cfg.num_virtual_tokens, cfg.head_dim)
    bad = write_prefix(PrefixAdapter(cfg, torch.randn(shape), torch.randn(shape)), tmp_path / "bad")
    ids = random_ids(seed=2)
    before_logits, before = engine.logits(ids, adapters="prefix"), engine.adapters
    with pytest.raises(AdapterMismatchError) as err:
        engine.add_adapter("bad", bad)
    message = str(err.value)
    assert str(bad) in message and f"{cfg.num_layers} layers x {cfg.num_kv_heads} KV heads x head_dim {cfg.head_dim}" in message
    assert engine.adapters == before
    torch.testing.assert_close(engine.logits(ids, adapters="prefix"), before_logits, atol=0, rtol=0)


def test_tensor_shape_not_matching_config_is_a_format_error(prefixes, tmp_path):
    folder = tmp_path / "edited"
    folder.mkdir()
    config = json.loads((prefixes["prefix"] / "adapter_config.json").read_text())
    config["num_layers"] += 1
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes((prefixes["prefix"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterFormatError, match=r"adapter_model.safetensors: prompt_embeddings has shape"):
        read_adapter(folder)


def test_export_prefix_cache_file_loads_as_adapter(engine, causal_base, prefixes, tmp_path):
    from click.testing import CliRunner

    from adaptkit.cli.main import main

    out = tmp_path / "prefix.safetensors"
    args = ["export", "prefix-cache", str(prefixes["prefix_mlp"]), "--base", str(causal_base), "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["prefix.safetensors"]  # no temporary file left behind
    from safetensors import safe_open

    with safe_open(str(out), "pt") as handle:
        meta = handle.metadata()
    facts = engine.base.facts
    assert meta["base_fingerprint"] == engine.base.fingerprint
    assert (int(meta["num_layers"]), int(meta["num_kv_heads"]), int(meta["head_dim"]), int(meta["num_virtual_tokens"])) \
        == (facts.num_layers, facts.num_kv_heads, facts.head_dim, 3)
    eng = ak.Engine.from_pretrained(causal_base)
    eng.add_adapter("file", out)
    ids = random_ids(seed=6)
    torch.testing.assert_close(eng.logits(ids, adapters="file"), engine.logits(ids, adapters="prefix_mlp"),
                               atol=1e-6, rtol=0)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "exists" in again.output
    with pytest.raises(OutputExistsError):
        ak_export(prefixes["prefix_mlp"], causal_base, out)


def ak_export(adapter, base, out, **kwargs):
    from adaptkit.export import export_prefix_cache

    return export_prefix_cache(adapter, base, out, **kwargs)


def test_prefix_cache_file_refused_on_another_base(tiny_llama, tiny_gpt2, tmp_path):
    source = make_peft_virtual(tiny_llama, tmp_path / "p", "prefix", seed=3, num_virtual_tokens=2)
    out = ak_export(source, tiny_llama, tmp_path / "llama.safetensors")
    eng = ak.Engine.from_pretrained(tiny_gpt2)
    with pytest.raises(AdapterMismatchError, match="llama.safetensors: made for base llama-"):
        eng.add_adapter("x", out)
    assert eng.adapters == {}


def test_inspect_says_whether_a_prefix_fits(tiny_llama, tiny_gpt2, tmp_path):
    """The tiny Llama has 2 KV heads, the tiny GPT-2 has 4: ``adaptkit inspect --base`` says so."""
    from click.testing import CliRunner

    from adaptkit.cli.main import main

    source = make_peft_virtual(tiny_llama, tmp_path / "p", "prefix", seed=3, num_virtual_tokens=2)
    fits = CliRunner().invoke(main, ["inspect", str(source), "--base", str(tiny_llama)])
    assert fits.exit_code == 0 and "kind: prefix" in fits.output and "virtual_tokens: 2" in fits.output
    other = CliRunner().invoke(main, ["inspect", str(source), "--base", str(tiny_gpt2)])
    assert other.exit_code == 1
    assert "2 layers x 2 KV heads x head_dim 16, but the base (gpt2) caches 2 layers x 4 KV heads" in other.output
