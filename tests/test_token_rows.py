"""``trainable_token_indices`` (PEFT's TrainableTokens beside a LoRA): new rows of the embedding table
(and of the output head tied to it) for the adapter's rows only; exact vs PEFT unmerged, merged in
place and in checkpoints."""

from __future__ import annotations

import pytest
from conftest import load_hf, random_ids
from peft_checks import check_served_like_peft, save_trained
from test_tied import tied_llama  # noqa: F401  (the module fixture)


def token_lora(base, out, seed=0):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_hf(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                     trainable_token_indices=[5, 9, 17, 40]))
    return save_trained(model, out, seed)


@pytest.mark.parametrize("base_name", ["tiny_llama", "tied_llama"])
def test_trainable_tokens_equal_peft(base_name, request, tmp_path):
    base = request.getfixturevalue(base_name)
    ids = random_ids(batch=3)
    ids[:, 2] = 9  # the changed rows are read
    ids[1, 4] = 40
    check_served_like_peft(base, token_lora(base, tmp_path / "tokens"), ids, tmp_path)


def test_inspect_names_the_options_in_use(tiny_llama, tiny_gpt2, tmp_path):
    from click.testing import CliRunner
    from test_trained_biases import biased_lora

    from adaptkit.cli.main import main

    tokens = token_lora(tiny_llama, tmp_path / "tokens")
    shown = CliRunner().invoke(main, ["inspect", str(tokens), "--base", str(tiny_llama)])
    assert shown.exit_code == 0 and "trainable_token_indices: {'model.embed_tokens': 4}" in shown.output, shown.output
    biased = biased_lora(tiny_gpt2, tmp_path / "biased", "all")
    shown = CliRunner().invoke(main, ["inspect", str(biased)])
    assert shown.exit_code == 0 and "trained_biases: [" in shown.output and "ln_f" in shown.output, shown.output
