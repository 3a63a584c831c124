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
