"""One left-padded batch mixing prefix, prompt, LoRA + prefix/prompt and bare rows: each row as if alone."""

from __future__ import annotations

import pytest
import torch
from conftest import load_hf, make_peft_lora
from virtual_helpers import load_peft, make_peft_virtual

import adaptkit as ak
from adaptkit.errors import UnsupportedAdapterError
from adaptkit.generation import left_pad

ROWS = ["prefix_a", "prompt_b", None, ak.Stack("lora_c", "prefix_a")]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19], [20, 21, 22, 23]]


@pytest.fixture(scope="module")
def paths(causal_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("virtual-batch")
    return {
        "prefix_a": make_peft_virtual(causal_base, root / "a", "prefix", seed=1, num_virtual_tokens=5),
        "prompt_b": make_peft_virtual(causal_base, root / "b", "prompt", seed=2, num_virtual_tokens=3),
        "lora_c": make_peft_lora(causal_base, root / "c", seed=3),
    }


@pytest.fixture(scope="module")
def engine(causal_base, paths):
    eng = ak.Engine.from_pretrained(causal_base)
    for name, path in paths.items():
        eng.add_adapter(name, path)
    return eng


def test_left_padded_batch_equals_rows_alone(engine):
    ids, mask = left_pad(PROMPTS, 0, "cpu")
    batch = engine.logits(ids, mask, adapters=ROWS)
    assert batch.shape[:2] == ids.shape
    for i, (prompt, row) in enumerate(zip(PROMPTS, ROWS)):
        alone = engine.logits(torch.tensor([prompt]), adapters=[row])
        torch.testing.assert_close(batch[i : i + 1, -len(prompt) :], alone, atol=1e-5, rtol=0)
    prefix_only = engine.logits(torch.tensor([PROMPTS[3]]), adapters="prefix_a")
    assert (batch[3, -len(PROMPTS[3]) :] - prefix_only[0]).abs().max() > 1e-2  # the LoRA acts too


def test_lora_plus_prefix_equals_peft_pieces(engine, causal_base, paths):
    """Stack(LoRA, prefix) = PEFT's merged LoRA model fed PEFT's own prefix cache (positions after the prefix)."""
    merged = load_peft(causal_base, paths["lora_c"]).merge_and_unload()
    prefix_model = load_peft(causal_base, paths["prefix_a"], model=load_hf(causal_base))
    ids = torch.tensor([PROMPTS[3]])
    n_virtual, seq = 5, ids.shape[1]
    with torch.no_grad():
        cache = prefix_model.get_prompt(batch_size=1)
        expected = merged(input_ids=ids, attention_mask=torch.ones(1, n_virtual + seq, dtype=torch.long),
                          position_ids=torch.arange(n_virtual, n_virtual + seq)[None], past_key_values=cache).logits
    torch.testing.assert_close(engine.logits(ids, adapters=ak.Stack("lora_c", "prefix_a")), expected, atol=1e-4, rtol=0)


def test_prompt_with_lora_in_a_batch(engine):
    rows = [ak.Stack("lora_c", "prompt_b"), "prompt_b", "lora_c", ak.Stack("lora_c", "prefix_a")]
    ids, mask = left_pad(PROMPTS, 0, "cpu")
    batch = engine.logits(ids, mask, adapters=rows)
    engine.prompt_as_cache = False
    try:
        prepended = engine.logits(ids, mask, adapters=rows)
    finally:
        engine.prompt_as_cache = True
    for i, (prompt, row) in enumerate(zip(PROMPTS, rows)):  # padding positions hold no defined value
        real = slice(-len(prompt), None)
        torch.testing.assert_close(batch[i, real], prepended[i, real], atol=1e-4, rtol=0)
        alone = engine.logits(torch.tensor([prompt]), adapters=[row])
        torch.testing.assert_close(batch[i : i + 1, -len(prompt) :], alone, atol=1e-5, rtol=0)


def test_greedy_batch_equals_rows_alone(engine):
    batch = engine.generate_ids(PROMPTS, adapters=ROWS, max_new_tokens=12, eos_token_id=-1)
    alone = [engine.generate_ids([p], adapters=[r], max_new_tokens=12, eos_token_id=-1)[0] for p, r in zip(PROMPTS, ROWS)]
    assert batch == alone
    assert len({tuple(t) for t in batch}) == len(batch)


def test_sampling_batch_draws_from_each_rows_own_distribution(engine):
    """Top-k sampling: each drawn token is among the k best of that row's own logits (computed alone)."""
    top_k = 3
    batch = engine.generate_ids(PROMPTS, adapters=ROWS, max_new_tokens=8, temperature=0.9, top_k=top_k, seed=4,
                                eos_token_id=-1)
    assert batch == engine.generate_ids(PROMPTS, adapters=ROWS, max_new_tokens=8, temperature=0.9, top_k=top_k,
                                        seed=4, eos_token_id=-1)
    for prompt, row, tokens in zip(PROMPTS, ROWS, batch):
        sequence = torch.tensor([prompt + tokens])
        logits = engine.logits(sequence, adapters=[row])[0, len(prompt) - 1 : -1]
        best = logits.topk(top_k, dim=-1).indices
        assert all(t in best[step].tolist() for step, t in enumerate(tokens))


def test_eos_stops_each_row(engine):
    greedy = engine.generate_ids(PROMPTS, adapters=ROWS, max_new_tokens=6, eos_token_id=-1)
    eos = greedy[1][2]  # the third token of the prompt_b row
    stopped = engine.generate_ids(PROMPTS, adapters=ROWS, max_new_tokens=6, eos_token_id=eos)
    assert stopped[1] == greedy[1][: greedy[1].index(eos) + 1]
    for row, tokens in enumerate(stopped):
        expected = greedy[row][: greedy[row].index(eos) + 1] if eos in greedy[row] else greedy[row]
        assert tokens == expected


@pytest.mark.parametrize(
    "entry, message",
    [
        (ak.Stack("prefix_a", "prompt_b"), "a row can use one"),
        (ak.Mix({"prefix_a": 0.5}), "cannot be weighted"),
    ],
)
def test_unservable_rows_are_refused(engine, entry, message):
    with pytest.raises(UnsupportedAdapterError, match=message):
        engine.logits(torch.tensor([PROMPTS[0]]), adapters=[entry])
