"""Model types adaptkit knows only by discovery, served: a tiny Qwen3-MoE (LoRA on attention, fused experts
and router through PEFT's target_parameters), a tiny SmolLM3 and a tiny BlenderbotSmall (whose learned
positions count tokens, not position_ids: rows of other lengths or virtual lengths run in forwards of their
own), with mixed adapters (LoRA, expert LoRA, prefix, prompt, base) in one batch and through the
OpenAI-compatible server: every row equals the same request alone, and alone equals PEFT's greedy decoding."""

from __future__ import annotations

import pytest
import torch
from model_zoo import tiny_model
from peft_checks import save_random_base, save_trained
from serve_helpers import check_concurrent_completions

import adaptkit as ak

PROMPTS = ["the quick brown fox jumps over", "SELECT name FROM users", "LoRA adds a low-rank update to linear",
           "0123456789", "adaptkit serves many adapters over one base model", "Prefix"]


@pytest.fixture(scope="module", params=["qwen3_moe", "smollm3", "blenderbot-small"])
def discovered(request, tmp_path_factory):
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp(request.param)
    base = save_random_base(tiny_model(request.param), folder / "base")

    def peft(config, name, seed):
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation="eager")
        return save_trained(get_peft_model(model, config), folder / name, seed=seed, std=0.3)

    paths = {"lora": peft(LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), "lora", 1),
             "prefix": peft(PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), "prefix", 2),
             "prompt": peft(PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "prompt", 3)}
    return base, paths


def _peft_greedy(base, adapter, ids, tokens):
    """PEFT's model decoded greedily by hand (one forward per token over the whole sequence)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    sequence = list(ids)
    with torch.no_grad():
        for _ in range(tokens):
            sequence.append(int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax()))
    return sequence[len(ids):]


def test_alone_equals_peft_and_mixed_rows_equal_alone(discovered):
    base, paths = discovered
    engine = ak.Engine.from_pretrained(base)
    for name, path in paths.items():
        engine.add_adapter(name, path)
    prompts = [engine.encode([p])[0] for p in PROMPTS]
    for name, path in paths.items():
        assert engine.generate_ids([prompts[0]], adapters=[name], max_new_tokens=8, eos_token_id=[])[0] == \
            _peft_greedy(base, path, prompts[0], 8), name
    rows = ["lora", "prefix", "prompt", None, "prefix", "lora"]
    together = engine.generate_ids(prompts, adapters=rows, max_new_tokens=10, eos_token_id=[])
    for prompt, row, got in zip(prompts, rows, together):
        assert got == engine.generate_ids([prompt], adapters=[row], max_new_tokens=10, eos_token_id=[])[0], row


def test_logits_of_padded_and_mixed_rows_equal_each_alone(discovered):
    base, paths = discovered
    engine = ak.Engine.from_pretrained(base)
    for name, path in paths.items():
        engine.add_adapter(name, path)
    ids = torch.tensor([[0, 0, 0, 5, 6, 7], [8, 9, 10, 11, 12, 13], [0, 0, 21, 22, 23, 24], [0, 0, 0, 9, 8, 7]])
    mask = (ids != 0).long()
    rows = ["prefix", None, "prompt", "lora"]
    together = engine.logits(ids, mask, adapters=rows)
    for row, entry in enumerate(rows):
        real = mask[row].bool()
        alone = engine.logits(ids[row:row + 1, real], adapters=[entry])[0]
        torch.testing.assert_close(together[row, real], alone, atol=1e-5, rtol=0)


def test_concurrent_requests_through_the_server(discovered):
    check_concurrent_completions(*discovered, PROMPTS, requests=16, threads=8)
