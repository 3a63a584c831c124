"""PiSSA and OLoRA adapters saved with plain ``save_pretrained``: PEFT re-runs the init when it loads
them and subtracts ``s B0 A0`` from the base; adaptkit recomputes that residual exactly (as extra rank,
so other rows keep the base). Inits that cannot be recomputed are refused with PEFT's conversion."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import lora_targets, peft_logits, random_ids

import adaptkit as ak
from adaptkit.cli.main import main
from adaptkit.errors import UnsupportedAdapterError


def peft_init_lora(base, out, init, seed=0, **config):
    """A LoRA made as PEFT's PiSSA/OLoRA docs show: LoraConfig(init_lora_weights=...), trained
    (here: randomised), saved with plain save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config.setdefault("target_modules", lora_targets(base))
    if "gpt2" in str(base):
        config.setdefault("fan_in_fan_out", True)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)  # a few steps of "training"
    model.save_pretrained(str(out))
    return out


CASES = [
    ("llama", "pissa", {}),
    ("llama", "olora", {}),
    ("llama", "pissa", {"use_dora": True}),
    ("gpt2", "pissa", {}),
]


@pytest.mark.parametrize("arch, init, extra", CASES, ids=[f"{a}-{i}{'-dora' if e else ''}" for a, i, e in CASES])
def test_residual_inits_equal_peft(arch, init, extra, request, tmp_path):
    base = request.getfixturevalue(f"tiny_{arch}")
    adapter = peft_init_lora(base, tmp_path / "adapter", init, **extra)
    ids = random_ids()
    expected = peft_logits(base, adapter, ids)
    plain_base = ak.Engine.from_pretrained(base).logits(ids)
    assert (expected - plain_base).abs().max() > 1e-2  # the init's residual matters
    engine = ak.Engine.from_pretrained(base)
    engine.add_adapter("pissa", adapter)
    torch.testing.assert_close(engine.logits(ids, adapters="pissa"), expected, atol=1e-4, rtol=0)
    # per row: the base row keeps the unchanged base, the adapter's row gets PEFT's output
    mixed = engine.logits(ids, adapters=[None, "pissa"])
    torch.testing.assert_close(mixed[0], plain_base[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(mixed[1], expected[1], atol=1e-4, rtol=0)
    engine.merge("pissa")
    torch.testing.assert_close(engine.logits(ids, adapters="pissa"), expected, atol=1e-4, rtol=0)
    engine.unmerge()
    merged = ak.merge_checkpoint(base, [adapter], tmp_path / "merged", progress=False)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-4, rtol=0)


def test_inspect_names_the_init(tiny_llama, tmp_path):
    adapter = peft_init_lora(tiny_llama, tmp_path / "pissa", "pissa")
    result = CliRunner().invoke(main, ["inspect", str(adapter), "--base", str(tiny_llama)])
    assert result.exit_code == 0, result.output
    assert "init_lora_weights: pissa" in result.output and "recomputed" in result.output


@pytest.mark.parametrize("init", ["pissa_niter_4", "corda", "loftq", "lora_ga", "astra"])
def test_inits_that_cannot_be_recomputed_are_refused_with_the_conversion(init, tiny_llama, tmp_path):
    import json

    adapter = peft_init_lora(tiny_llama, tmp_path / "a", "pissa_niter_4")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["init_lora_weights"] = init
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    engine = ak.Engine.from_pretrained(tiny_llama)
    with pytest.raises(UnsupportedAdapterError, match=f"init_lora_weights='{init}'.*path_initial_model_for_weight"):
        engine.add_adapter("x", adapter)
    assert engine.adapters == {}


def test_a_residual_init_cannot_be_combined_without_its_base(tiny_llama, tmp_path):
    a = peft_init_lora(tiny_llama, tmp_path / "a", "pissa")
    b = peft_init_lora(tiny_llama, tmp_path / "b", "olora", seed=1)
    with pytest.raises(UnsupportedAdapterError, match="merge_checkpoint instead"):
        ak.combine_adapters([a, b], out=tmp_path / "c", progress=False)


def test_residual_inits_are_refused_on_an_nf4_base(tiny_llama, tmp_path, cpu_layout):
    """PEFT's PiSSA/OLoRA load re-quantizes a 4-bit base; adaptkit refuses it by name, in both CPU layouts
    of bitsandbytes' 4-bit weights, and leaves the engine (and the output folder) as they were."""
    adapter = peft_init_lora(tiny_llama, tmp_path / "pissa", "pissa")
    engine = ak.Engine.from_pretrained(tiny_llama, quantize="nf4", compute_dtype="float32")
    ids = random_ids()
    before = engine.logits(ids)  # (the repacked layout is built on this first no-grad forward)
    with pytest.raises(UnsupportedAdapterError, match="4-bit layer: PEFT's PiSSA/OLoRA inits change the base weight"):
        engine.add_adapter("pissa", adapter)
    assert engine.adapters == {}
    torch.testing.assert_close(engine.logits(ids), before, atol=0, rtol=0)
    with pytest.raises(UnsupportedAdapterError, match="on an NF4 base means re-quantizing"):
        ak.merge_qlora_checkpoint(tiny_llama, [adapter], tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()
