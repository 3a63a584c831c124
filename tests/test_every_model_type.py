"""Every causal-LM model type of the installed transformers, as PEFT serves it: a tiny random model built
from the type's own default config (sizes shrunk, tests/model_zoo.py), a PEFT LoRA on every linear layer
("all-linear", which on mixture-of-experts types also targets the fused experts and the router through
``target_parameters``), then adaptkit: unmerged equal to PEFT, rows mixed with base rows equal each row
alone, and the merged checkpoint loaded by plain transformers equal to PEFT's merge_and_unload. A type is skipped only where
transformers cannot build or run its tiny model or PEFT itself refuses the LoRA, with the reason; adaptkit
refusing or differing fails. ``python tests/model_zoo.py`` writes the table in docs/model-support.md."""

from __future__ import annotations

import pytest
from model_zoo import causal_lm_types, check_lora_type

import adaptkit as ak  # noqa: F401  (imported before the sweep so that its import cost is not a type's)


@pytest.mark.parametrize("model_type", causal_lm_types())
def test_lora_on_every_causal_lm_type_equals_peft(model_type, tmp_path):
    result = check_lora_type(model_type, tmp_path)
    if result.skipped:
        pytest.skip(result.skipped)
    assert result.changed > 1e-3, "the LoRA changes the output"
    assert result.unmerged < 1e-4, result
    assert result.mixed < 1e-5, result
    assert result.checkpoint < 1e-4, result
    if isinstance(result.bottleneck, str):  # refused by name where the blocks do not measure pre-LN
        assert result.bottleneck.startswith("refused: ") and "not supported on" in result.bottleneck, result.bottleneck
    else:
        assert result.bottleneck[0] > 1e-3 and result.bottleneck[1] < 1e-5, result.bottleneck
    for kind, found in result.virtual.items():  # prompt and prefix tuning, where PEFT runs them
        if isinstance(found, str):
            assert found.startswith(("PEFT cannot", "refused: ")), found
            assert "refused" not in found or any(w in found for w in ("state", "different shapes", "no key/value")), found
            continue
        assert found[0] < 1e-4 and found[1] < 1e-5, (kind, found)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_expert_lora_through_target_parameters_equals_peft(model_type, tmp_path):
    """PEFT's ``target_parameters`` LoRA on the fused experts (``mlp.experts.gate_up_proj`` and ``down_proj``,
    gpt-oss's with their biases beside them), with attention LoRA: unmerged equal to PEFT, rows mixed with
    base rows equal each alone, merged in place and into a checkpoint (plain transformers) equal to PEFT's
    merge, unmerged back to the base."""
    import torch
    from model_zoo import tiny_model
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft_checks import save_random_base, save_trained
    from transformers import AutoModelForCausalLM

    base = save_random_base(tiny_model(model_type), tmp_path / "base")

    def load():
        return AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation="eager").eval()

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    adapter = save_trained(get_peft_model(load(), config), tmp_path / "lora", std=0.1)
    ids = torch.randint(3, 300, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = load()(input_ids=ids).logits
        expected = PeftModel.from_pretrained(load(), str(adapter)).eval()(input_ids=ids).logits
        peft_merged = PeftModel.from_pretrained(load(), str(adapter)).merge_and_unload().eval()(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-2  # the experts' LoRA changes the output
    engine = ak.Engine.from_pretrained(base)
    engine.add_adapter("experts", adapter)
    alone = engine.logits(ids, adapters="experts")
    torch.testing.assert_close(alone, expected, atol=1e-4, rtol=0)
    mixed = engine.logits(ids, adapters=["experts", None, "experts"])
    torch.testing.assert_close(mixed[[0, 2]], alone[[0, 2]], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], plain[1], atol=1e-5, rtol=0)
    engine.merge("experts")  # in place, into the fused expert weights
    torch.testing.assert_close(engine.logits(ids, adapters="experts"), peft_merged, atol=1e-4, rtol=0)
    engine.unmerge()
    torch.testing.assert_close(engine.logits(ids), plain, atol=1e-4, rtol=0)
    merged = ak.merge_checkpoint(base, [adapter], tmp_path / "merged", progress=False)
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32, attn_implementation="eager")
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, peft_merged, atol=1e-4, rtol=0)
