"""Engine behaviour: per-row routing in one forward, exact merge/unmerge, switching, generation."""

from __future__ import annotations

import pytest
import torch
from conftest import load_hf, make_peft_lora, random_ids

import adaptkit as ak
from adaptkit.errors import EngineStateError, InvalidArgumentError, UnknownAdapterError
from adaptkit.inject import WRAPPERS


@pytest.fixture(scope="module")
def adapters(causal_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    a = make_peft_lora(causal_base, root / "a", seed=1)
    b = make_peft_lora(causal_base, root / "b", seed=2, r=8, use_rslora=True, modules_to_save=["lm_head"])
    return a, b


@pytest.fixture()
def engine(causal_base, adapters):
    eng = ak.Engine.from_pretrained(causal_base)
    eng.add_adapter("a", adapters[0])
    eng.add_adapter("b", adapters[1])
    return eng


def test_mixed_batch_equals_rows_alone(engine):
    ids = random_ids(batch=4, length=10, seed=7)
    rows = [None, "a", "b", "a"]
    batch = engine.logits(ids, adapters=rows)
    for i, row in enumerate(rows):
        alone = engine.logits(ids[i : i + 1], adapters=[row])
        torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-5, rtol=0)
    assert (batch[1] - batch[0]).abs().max() > 1e-2 and (batch[2] - batch[1]).abs().max() > 1e-2


def test_left_padded_batch_equals_rows_alone(engine):
    """Left padding: position ids count real tokens, so a padded row equals the same tokens alone."""
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]
    from adaptkit.generation import left_pad

    ids, mask = left_pad(prompts, 0, "cpu")
    rows = ["a", "b", None]
    batch = engine.logits(ids, mask, adapters=rows)
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        alone = engine.logits(torch.tensor([prompt]), adapters=[row])
        torch.testing.assert_close(batch[i : i + 1, -len(prompt) :], alone, atol=1e-5, rtol=0)


def test_mix_weight_scales_a_lora(engine, causal_base):
    """Mix({"a": 0.7}) equals the same LoRA loaded with scale=0.7 (its delta times 0.7)."""
    ids = random_ids(seed=3)
    mix = engine.logits(ids, adapters=ak.Mix({"a": 0.7}))
    # weight 0.7 on a single LoRA equals scaling its alpha by 0.7
    scaled = ak.Engine.from_pretrained(causal_base)
    scaled.add_adapter("a", engine.adapters["a"].source, scale=0.7)
    torch.testing.assert_close(mix, scaled.logits(ids, adapters="a"), atol=1e-5, rtol=0)


def test_merge_unmerge_is_bit_exact(engine):
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    ids = random_ids(seed=4)
    unmerged = engine.logits(ids, adapters="b")
    engine.merge("b")
    assert engine.merged == "b"
    torch.testing.assert_close(engine.logits(ids, adapters="b"), unmerged, atol=1e-4, rtol=0)
    with pytest.raises(EngineStateError, match="merged"):
        engine.logits(ids, adapters=["a", "b"])
    with pytest.raises(EngineStateError):
        engine.merge("a")
    engine.unmerge()
    after = engine.model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    # a tied lm_head (GPT-2) is tied again after unmerge
    model = engine.model
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_default_adapter_switch_copies_no_weights(engine):
    ids = random_ids(seed=5)
    pointers = {k: v.data_ptr() for k, v in engine.model.state_dict().items()}
    engine.set_default_adapter("a")
    via_default = engine.logits(ids)
    torch.testing.assert_close(via_default, engine.logits(ids, adapters="a"), atol=0, rtol=0)
    engine.set_default_adapter(None)
    assert pointers == {k: v.data_ptr() for k, v in engine.model.state_dict().items()}


def test_remove_adapter_restores_plain_modules(causal_base, adapters):
    engine = ak.Engine.from_pretrained(causal_base)
    ids = random_ids(seed=6)
    base = engine.logits(ids)
    engine.add_adapter("a", adapters[0])
    engine.add_adapter("b", adapters[1])
    engine.remove_adapter("a")
    engine.remove_adapter("b")
    assert not any(isinstance(m, WRAPPERS) for m in engine.model.modules())
    torch.testing.assert_close(engine.logits(ids), base, atol=0, rtol=0)
    with pytest.raises(UnknownAdapterError, match="loaded adapters: none"):
        engine.logits(ids, adapters="a")


def test_bad_routing_arguments(engine):
    ids = random_ids(batch=2)
    with pytest.raises(InvalidArgumentError, match="2 rows"):
        engine.logits(ids, adapters=["a", "b", None])
    with pytest.raises(UnknownAdapterError, match="'zzz'.*a, b"):
        engine.logits(ids, adapters=["zzz", None])
    with pytest.raises(InvalidArgumentError):
        engine.add_adapter("bad.name", engine.adapters["a"].source)
    with pytest.raises(InvalidArgumentError, match="reserved"):
        engine.add_adapter("train", engine.adapters["a"].source)
    assert list(engine.adapters) == ["a", "b"]


def test_generate_matches_transformers_and_batches(engine, causal_base, adapters):
    """Greedy generation equals HF generate (base) and PEFT generate (adapter); batching changes nothing."""
    from peft import PeftModel

    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    new = 12
    batched = engine.generate_ids(prompts, adapters=[None, "a"], max_new_tokens=new, eos_token_id=-1)
    alone = [engine.generate_ids([p], adapters=[r], max_new_tokens=new, eos_token_id=-1)[0]
             for p, r in zip(prompts, [None, "a"])]
    assert batched == alone
    hf = load_hf(causal_base)
    peft_model = PeftModel.from_pretrained(load_hf(causal_base), str(adapters[0])).eval()
    for model, prompt, got in ((hf, prompts[0], batched[0]), (peft_model, prompts[1], batched[1])):
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == got


def test_sampling_is_seeded_and_top_k_1_is_greedy(engine):
    prompts = [[5, 6, 7], [8, 9]]
    greedy = engine.generate_ids(prompts, adapters=["a", "b"], max_new_tokens=8, eos_token_id=-1)
    top1 = engine.generate_ids(prompts, adapters=["a", "b"], max_new_tokens=8, temperature=1.0, top_k=1,
                               seed=0, eos_token_id=-1)
    assert top1 == greedy
    s1 = engine.generate_ids(prompts, adapters=["a", "b"], max_new_tokens=8, temperature=1.5, top_p=0.9, seed=11)
    s2 = engine.generate_ids(prompts, adapters=["a", "b"], max_new_tokens=8, temperature=1.5, top_p=0.9, seed=11)
    assert s1 == s2
    with pytest.raises(InvalidArgumentError, match="top_p"):
        engine.generate_ids(prompts, max_new_tokens=2, top_p=0.0)


def test_generate_text_with_tokenizer(engine):
    texts = engine.generate(["SELECT name", "the quick"], adapters=["a", None], max_new_tokens=5)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    ids = engine.tokenizer("SELECT name")["input_ids"]
    expected = engine.generate_ids([ids], adapters=["a"], max_new_tokens=5)[0]
    assert texts[0] == engine.tokenizer.decode(expected, skip_special_tokens=True)
