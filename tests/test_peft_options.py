"""LoRA options that change nothing at inference are accepted (PEFT's output with them equals the plain
LoRA's), built with PEFT's own config classes and compared with PEFT."""

from __future__ import annotations

import pytest
import torch
from conftest import make_peft_lora, peft_logits, random_ids

import adaptkit as ak


def _options():
    from peft import MontecloraConfig, VeloraConfig

    return {"velora": {"velora_config": VeloraConfig()}, "monteclora": {"monteclora_config": MontecloraConfig()},
            "qalora": {"use_qalora": True}, "weight_tying": {"ensure_weight_tying": True}}


@pytest.mark.parametrize("option", ["velora", "monteclora", "qalora", "weight_tying"])
def test_inference_neutral_options_are_served_as_peft_serves_them(option, tiny_llama, tmp_path):
    try:
        adapter = make_peft_lora(tiny_llama, tmp_path / option, seed=3, **_options()[option])
    except (ValueError, TypeError, NotImplementedError) as exc:  # PEFT refuses the option on this base itself
        pytest.skip(f"PEFT cannot build {option} here: {exc}")
    ids = random_ids()
    expected = peft_logits(tiny_llama, adapter, ids)
    engine = ak.Engine.from_pretrained(tiny_llama)
    engine.add_adapter("a", adapter)
    torch.testing.assert_close(engine.logits(ids, adapters="a"), expected, atol=1e-4, rtol=0)
