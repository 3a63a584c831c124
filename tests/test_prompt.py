"""Prompt tuning, P-tuning (MLP/LSTM encoder folded at load) and PPT: equal to PEFT, served as a K/V cache."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_peft_lora, random_ids
from virtual_helpers import (
    load_peft,
    make_peft_virtual,
    peft_greedy,
    peft_real_logits,
    peft_virtual_model,
    save_encoder_checkpoint,
)

import adaptkit as ak
from adaptkit.adapters.prompt import PromptAdapter, PromptConfig
from adaptkit.errors import AdapterMismatchError, UnsupportedAdapterError
from adaptkit.formats.detect import read_adapter
from adaptkit.formats.peft_prompt import write_prompt
from adaptkit.prefix_cache import prompt_kv

METHODS = ["prompt", "ptuning_mlp", "ptuning_lstm"]


@pytest.fixture(scope="module")
def prompts(causal_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt")
    made = {m: make_peft_virtual(causal_base, root / m, m, seed=i, num_virtual_tokens=4 + i)
            for i, m in enumerate(METHODS)}
    made["lora"] = make_peft_lora(causal_base, root / "lora", seed=3)
    return made


@pytest.fixture(scope="module")
def engine(causal_base, prompts):
    eng = ak.Engine.from_pretrained(causal_base)
    for name, path in prompts.items():
        eng.add_adapter(name, path)
    return eng


@pytest.fixture()
def prepended(engine):
    """The same engine serving prompts by prepending their embeddings (the reference for the cache path)."""
    engine.prompt_as_cache = False
    yield engine
    engine.prompt_as_cache = True


@pytest.mark.parametrize("method", METHODS)
def test_logits_equal_peft_at_real_positions(engine, causal_base, prompts, method):
    ids = random_ids(batch=2, length=9, seed=5)
    expected = peft_real_logits(load_peft(causal_base, prompts[method]), ids)
    got = engine.logits(ids, adapters=method)
    assert got.shape == (2, 9, engine.base.facts.vocab_size)  # virtual positions stripped
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (got - engine.logits(ids)).abs().max() > 1e-2


@pytest.mark.parametrize("method", ["ptuning_mlp", "ptuning_lstm"])
def test_prompt_encoder_folded_at_load(causal_base, method, tmp_path):
    """A checkpoint carrying the P-tuning encoder (not its output) is run once at load: equal to PEFT running it."""
    model = peft_virtual_model(causal_base, method, seed=7, num_virtual_tokens=3)
    model.peft_config["default"].inference_mode = False  # PEFT runs the encoder on every forward
    ids = random_ids(batch=1, length=8, seed=4)
    expected = peft_real_logits(model, ids)
    model.save_pretrained(str(tmp_path / "folded"))
    adapter = read_adapter(save_encoder_checkpoint(model, tmp_path / "folded", tmp_path / "unfolded"))
    assert adapter.config.encoder == method.split("_")[1]
    torch.testing.assert_close(adapter.embeddings, read_adapter(tmp_path / "folded").embeddings, atol=1e-5, rtol=0)
    eng = ak.Engine.from_pretrained(causal_base)
    eng.add_adapter("p", adapter)
    torch.testing.assert_close(eng.logits(ids, adapters="p"), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("row", ["prompt", "ptuning_lstm", ak.Stack("lora", "prompt")])
def test_cache_path_equals_prepended_embeddings(engine, prepended, row):
    ids = random_ids(batch=2, length=10, seed=9)
    prepended.prompt_as_cache = True
    cached = engine.logits(ids, adapters=row)
    prepended.prompt_as_cache = False
    torch.testing.assert_close(cached, prepended.logits(ids, adapters=row), atol=1e-4, rtol=0)


def test_prompt_with_lora_gets_its_own_cache(engine):
    """The LoRA acts on q/v (or c_attn): the virtual tokens' K/V differ with it, so a base-only cache would be wrong."""
    embeddings = read_adapter(engine.adapters["prompt"].source).embeddings
    bare, with_lora = prompt_kv(engine.model, embeddings), prompt_kv(engine.model, embeddings, "lora")
    assert (bare.values - with_lora.values).abs().max() > 1e-2


def test_replaced_lora_never_serves_a_stale_prompt_cache(causal_base, prompts, tmp_path):
    """The per-combination K/V remember which LoRA object they were computed with."""
    eng = ak.Engine.from_pretrained(causal_base)
    eng.add_adapter("prompt", prompts["prompt"])
    eng.add_adapter("lora", prompts["lora"])
    ids, row = random_ids(seed=14), ak.Stack("lora", "prompt")
    first = eng.logits(ids, adapters=row)
    eng.remove_adapter("lora")
    eng.add_adapter("lora", make_peft_lora(causal_base, tmp_path / "other", seed=9))
    second = eng.logits(ids, adapters=row)
    eng.prompt_as_cache = False
    torch.testing.assert_close(second, eng.logits(ids, adapters=row), atol=1e-4, rtol=0)
    assert (second - first).abs().max() > 1e-2


def test_ppt_is_a_prompt_with_the_same_runtime(engine, causal_base, prompts, tmp_path):
    """PPT: a pre-trained soft prompt, saved by adaptkit in the PEFT layout, marked as such; served like prompt tuning."""
    adapter = read_adapter(prompts["prompt"])
    ppt = PromptAdapter(PromptConfig(adapter.config.num_virtual_tokens, adapter.config.token_dim, method="ppt"),
                        adapter.embeddings)
    out = write_prompt(ppt, tmp_path / "ppt")
    assert json.loads((out / "adaptkit.json").read_text())["method"] == "ppt"
    engine.add_adapter("ppt", out)
    try:
        assert engine.adapters["ppt"].details["method"] == "ppt"
        ids = random_ids(batch=2, length=6, seed=1)
        expected = peft_real_logits(load_peft(causal_base, out), ids)  # PEFT loads it as PROMPT_TUNING
        torch.testing.assert_close(engine.logits(ids, adapters="ppt"), expected, atol=1e-4, rtol=0)
    finally:
        engine.remove_adapter("ppt")


@pytest.fixture(scope="module")
def greedy_prompt(engine):
    """A prompt and the base's own 20 greedy tokens for it (a prompt adapter must change them)."""
    prompt = random_ids(batch=1, length=6, seed=12)[0].tolist()
    return prompt, engine.generate_ids([prompt], max_new_tokens=20, eos_token_id=-1)[0]


@pytest.mark.parametrize("method", ["prompt", "ptuning_mlp"])
def test_greedy_tokens_equal_peft(engine, causal_base, prompts, greedy_prompt, method):
    prompt, base_tokens = greedy_prompt
    peft_model = load_peft(causal_base, prompts[method])
    got = engine.generate_ids([prompt], adapters=method, max_new_tokens=20, eos_token_id=-1)[0]
    assert got == peft_greedy(peft_model, prompt, 20)
    assert got != base_tokens
    if method == "prompt":  # PEFT's own generate is right for prompt tuning when it re-runs the prompt every step
        ids = torch.tensor([prompt])
        peft_generated = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                                             do_sample=False, use_cache=False, eos_token_id=None, pad_token_id=0)
        assert peft_generated[0, -20:].tolist() == got


def test_written_by_adaptkit_loads_in_peft(engine, causal_base, prompts, tmp_path):
    adapter = read_adapter(prompts["ptuning_lstm"])
    out = write_prompt(adapter, tmp_path / "written")
    again = read_adapter(out)
    assert again.config == adapter.config
    ids = random_ids(batch=2, length=7, seed=8)
    torch.testing.assert_close(peft_real_logits(load_peft(causal_base, out), ids),
                               engine.logits(ids, adapters="ptuning_lstm"), atol=1e-4, rtol=0)


def test_wrong_token_dim_rejected_engine_unchanged(engine, tmp_path):
    hidden = engine.base.facts.hidden_size
    bad = write_prompt(PromptAdapter(PromptConfig(3, hidden // 2), torch.randn(3, hidden // 2)), tmp_path / "narrow")
    ids = random_ids(seed=2)
    before_logits, before = engine.logits(ids, adapters="prompt"), engine.adapters
    with pytest.raises(AdapterMismatchError) as err:
        engine.add_adapter("narrow", bad)
    assert str(bad) in str(err.value) and f"token_dim is {hidden // 2}" in str(err.value)
    assert f"hidden size {hidden}" in str(err.value)
    assert engine.adapters == before
    torch.testing.assert_close(engine.logits(ids, adapters="prompt"), before_logits, atol=0, rtol=0)


def test_exported_prompt_cache_serves_the_prompt(engine, causal_base, prompts, tmp_path):
    from adaptkit.export import export_prefix_cache

    out = export_prefix_cache(prompts["ptuning_mlp"], causal_base, tmp_path / "ptuning.safetensors")
    engine.add_adapter("cache", out)
    try:
        assert engine.adapters["cache"].kind == "prefix"
        assert engine.adapters["cache"].details["method"] == "prompt_cache"
        ids = random_ids(seed=13)
        torch.testing.assert_close(engine.logits(ids, adapters="cache"), engine.logits(ids, adapters="ptuning_mlp"),
                                   atol=1e-6, rtol=0)
        with pytest.raises(UnsupportedAdapterError, match="computed on the bare base"):
            engine.logits(ids, adapters=ak.Stack("lora", "cache"))
    finally:
        engine.remove_adapter("cache")


def test_bert_prompt_prepends_embeddings_equal_peft(tiny_bert, tmp_path):
    from transformers import BertForMaskedLM

    def load_bert():
        return BertForMaskedLM.from_pretrained(str(tiny_bert), attn_implementation="eager").eval()

    model = peft_virtual_model(tiny_bert, "prompt", seed=2, num_virtual_tokens=3, task_type="FEATURE_EXTRACTION",
                               model=load_bert())
    model.save_pretrained(str(tmp_path / "bert-prompt"))
    ids = random_ids(batch=2, length=8, seed=3)
    expected = peft_real_logits(load_peft(tiny_bert, tmp_path / "bert-prompt", model=load_bert()), ids)
    eng = ak.Engine.from_pretrained(tiny_bert)
    eng.add_adapter("p", tmp_path / "bert-prompt")
    got = eng.logits(ids, adapters=["p", None])
    torch.testing.assert_close(got[:1], expected[:1], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1:], eng.logits(ids[1:]), atol=1e-5, rtol=0)
    assert (got[0] - eng.logits(ids[:1])[0]).abs().max() > 1e-2
