"""PET: pattern and verbalizer checks, slot scoring on masked and causal LMs, training (LoRA / full), the
PET folder (pet.json + PEFT LoRA) and ``Engine.classify``.

Trained PET adapters must reach the margins of ``train_helpers.assert_learned`` (held-out accuracy
>= chance + 0.35, loss <= 0.6 x its start) and ``Engine.classify`` must agree with the trainer's
own held-out accuracy.
"""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import (
    EVAL_SPLIT,
    PATTERN,
    VERBALIZER,
    assert_learned,
    classification_task,
    with_mask_token,
)

import adaptkit as ak
from adaptkit.adapters.pet import PetAdapter, PetConfig, encode_pattern, label_log_probs, label_word_ids
from adaptkit.demo import build_tokenizer, random_bottleneck
from adaptkit.errors import (
    AdapterFormatError,
    AdapterMismatchError,
    InvalidArgumentError,
    UnsupportedAdapterError,
)
from adaptkit.formats.pet import read_pet, write_pet


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train faster on one thread: two spend more time synchronising than computing."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return classification_task(tmp_path_factory.mktemp("pet_task") / "task.jsonl")


@pytest.fixture(scope="module")
def tiny_bert_mlm(tiny_bert, tmp_path_factory):
    return with_mask_token(tiny_bert, tmp_path_factory.mktemp("pet_bert") / "base")


@pytest.fixture(scope="module")
def mlm_tokenizer(tiny_bert_mlm):
    from adaptkit.base import load_tokenizer

    return load_tokenizer(tiny_bert_mlm)


@pytest.mark.parametrize("pattern, verbalizer, message", [
    ("{text} It was good.", VERBALIZER, r"exactly one answer slot \{mask\} \(it has 0"),
    ("{text} {mask} {mask}", VERBALIZER, r"\(it has 2 slot"),
    ("It was {mask}.", VERBALIZER, r"must contain \{text\}"),
    ("{text} {label} {mask}", VERBALIZER, r"unknown placeholder\(s\) \['label'\]"),
    ("{text} {mask", VERBALIZER, "malformed"),
    (PATTERN, {}, "must map each label to a word"),
    (PATTERN, {"pos": "1", "neg": " 1"}, "gives two labels the same word"),
    (PATTERN, {"pos": ""}, "non-empty word"),
])
def test_config_is_checked(pattern, verbalizer, message):
    with pytest.raises(InvalidArgumentError, match=message):
        PetConfig(pattern, verbalizer)


def test_fill_keeps_the_space_with_the_word():
    spaced = PetConfig("{text} It was {mask}.", {"pos": "great", "neg": "bad"})
    assert spaced.spaced and spaced.fill("a {b}") == ("a {b} It was", ".")  # the text is taken as is
    assert spaced.word_text("pos") == " great"
    tight = PetConfig("{{{text}}}={mask}", VERBALIZER)
    assert not tight.spaced and tight.fill("x x") == ("{x x}=", "") and tight.word_text("neg") == "0"
    assert tight.label_index("neg") == 1
    with pytest.raises(InvalidArgumentError, match=r"label 'neu' is not in the verbalizer \(labels: 'pos', 'neg'\)"):
        tight.label_index("neu", where="data.jsonl:7")


def test_words_must_be_single_tokens():
    tokenizer = build_tokenizer()
    assert label_word_ids(tokenizer, PetConfig(PATTERN, VERBALIZER)) == [tokenizer.convert_tokens_to_ids(t) for t in "10"]
    with pytest.raises(InvalidArgumentError, match=r"word ' positive' \(label 'pos'\) is 9 tokens"):
        label_word_ids(tokenizer, PetConfig("{text} {mask}", {"pos": "positive", "neg": "a"}))


def test_slot_positions_causal_and_masked(mlm_tokenizer):
    config = PetConfig("{text} It {mask} here", {"a": "a", "b": "b"})
    ids, slot = encode_pattern(mlm_tokenizer, config, "x y", "causal")
    assert ids == mlm_tokenizer("x y It")["input_ids"] and slot == len(ids) - 1  # the text after the slot is unseen
    ids, slot = encode_pattern(mlm_tokenizer, config, "x y", "mlm")
    assert ids[slot] == mlm_tokenizer.mask_token_id and ids[slot + 1:] == mlm_tokenizer(" here")["input_ids"]
    with pytest.raises(InvalidArgumentError, match="holds 2 mask tokens"):
        encode_pattern(mlm_tokenizer, config, "x <mask>", "mlm")
    with pytest.raises(InvalidArgumentError, match="has no mask token"):
        encode_pattern(build_tokenizer(), config, "x", "mlm")


def test_label_log_probs_is_a_softmax_over_the_label_words():
    logits = torch.randn(2, 4, 10, generator=torch.Generator().manual_seed(0))
    got = label_log_probs(logits, torch.tensor([3, 1]), [7, 2, 5])
    expected = torch.stack([logits[0, 3, [7, 2, 5]], logits[1, 1, [7, 2, 5]]]).log_softmax(-1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def _classify_accuracy(engine, name, task, seed=0) -> float:
    from adaptkit.training.data import read_jsonl, split_eval

    rows = read_jsonl(task).rows
    held = [rows[i] for i in split_eval(len(rows), EVAL_SPLIT, seed)[1]]
    scores = engine.classify([r["text"] for r in held], adapter=name)
    assert all(abs(sum(s.values()) - 1) < 1e-5 and list(s) == ["pos", "neg"] for s in scores)
    return sum(max(s, key=s.get) == r["label"] for s, r in zip(scores, held)) / len(held)


def test_pet_lora_on_a_masked_lm(tiny_bert_mlm, task, tmp_path):
    """PET with a LoRA on a BERT masked LM: learns; the folder is pet.json + the LoRA in PEFT's layout;
    ``Engine.classify`` gives the trainer's held-out accuracy and PEFT the same logits as the engine."""
    from peft import PeftModel
    from transformers import BertForMaskedLM

    result = ak.train("pet", tiny_bert_mlm, task, tmp_path / "pet", epochs=3, lr=1e-2, eval_split=EVAL_SPLIT,
                      pattern=PATTERN, verbalizer=VERBALIZER, progress=False, r=4)
    assert_learned(result)
    meta = json.loads((tmp_path / "pet" / "pet.json").read_text())
    assert (meta["pattern"], meta["verbalizer"], meta["scoring"], meta["lora"]) == (PATTERN, VERBALIZER, "mlm", True)
    engine = ak.Engine.from_pretrained(tiny_bert_mlm)
    info = engine.add_adapter("sentiment", tmp_path / "pet")
    assert info.kind == "pet" and info.details["labels"] == ["pos", "neg"] and info.details["ranks"] == [4]
    assert _classify_accuracy(engine, "sentiment", task) == result.final_eval["accuracy"]

    ids, _ = encode_pattern(engine.tokenizer, PetConfig(PATTERN, VERBALIZER), "x x x", "mlm")
    base = BertForMaskedLM.from_pretrained(str(tiny_bert_mlm), attn_implementation="eager").eval()
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, str(tmp_path / "pet")).eval()(input_ids=torch.tensor([ids])).logits
    torch.testing.assert_close(engine.logits([ids], adapters="sentiment"), expected, atol=1e-4, rtol=0)


def test_pet_full_fine_tuning_on_a_causal_lm(tiny_gpt2, task, tmp_path):
    """PET fine-tuning every weight of GPT-2: the model is saved under model/ (the base to load the PET
    folder on) and the PET file beside it records that model's fingerprint."""
    result = ak.train("pet", tiny_gpt2, task, tmp_path / "pet", epochs=3, lr=1e-3, eval_split=EVAL_SPLIT,
                      pattern=PATTERN, verbalizer=VERBALIZER, progress=False, train="full")
    assert_learned(result)
    assert not (tmp_path / "pet" / "adapter_config.json").exists()
    engine = ak.Engine.from_pretrained(tmp_path / "pet" / "model")
    assert engine.add_adapter("task", tmp_path / "pet").details["lora"] is False
    assert _classify_accuracy(engine, "task", task) == result.final_eval["accuracy"]
    assert json.loads((tmp_path / "pet" / "pet.json").read_text())["base_fingerprint"] == engine.base.fingerprint


def test_scoring_must_match_the_base(tiny_bert_mlm, tmp_path):
    engine = ak.Engine.from_pretrained(tiny_bert_mlm)
    with pytest.raises(AdapterMismatchError, match="trained with causal scoring, but the base \\(bert\\) scores with mlm"):
        engine.add_adapter("p", PetAdapter(PetConfig(PATTERN, VERBALIZER), "causal"))
    engine.add_adapter("p", PetAdapter(PetConfig(PATTERN, VERBALIZER), "mlm"))  # the base model's own scores
    assert len(engine.classify(["x x", "y"], adapter="p")) == 2
    engine.add_adapter("b", random_bottleneck(tiny_bert_mlm, "b"))
    with pytest.raises(UnsupportedAdapterError, match=r"is a BertForMaskedLM; classify needs a base with a "
                                                      r"\.\.\.ForSequenceClassification head \(or, for classify, a PET"):
        engine.classify(["x"], adapter="b")


def test_pet_file_round_trip_and_errors(tmp_path):
    adapter = PetAdapter(PetConfig("{text} It was {mask}.", {"pos": "great", "neg": "bad"}), "causal", fingerprint="f")
    back = read_pet(write_pet(adapter, tmp_path / "p"))
    assert (back.config, back.scoring, back.lora, back.fingerprint) == (adapter.config, "causal", None, "f")
    (tmp_path / "p" / "pet.json").write_text(json.dumps({"format": "adaptkit-pet", "version": 1, "pattern": "{text}",
                                                          "verbalizer": VERBALIZER, "scoring": "causal"}))
    with pytest.raises(AdapterFormatError, match=r"pet.json: PET pattern '\{text\}' must contain"):
        read_pet(tmp_path / "p")
    (tmp_path / "p" / "pet.json").write_text("{}")
    with pytest.raises(AdapterFormatError, match="adaptkit-pet"):
        read_pet(tmp_path / "p")


def test_pet_needs_classification_rows(tiny_llama, tmp_path):
    (tmp_path / "lm.jsonl").write_text('{"text": "the quick brown fox"}\n{"text": "the lazy dog"}\n')
    with pytest.raises(InvalidArgumentError, match=r"a pattern and verbalizer apply to \{\"text\", \"label\"\} rows"):
        ak.train("pet", tiny_llama, tmp_path / "lm.jsonl", tmp_path / "o", pattern=PATTERN, progress=False)
    with pytest.raises(InvalidArgumentError, match="pet trains on"):
        ak.train("pet", tiny_llama, tmp_path / "lm.jsonl", tmp_path / "o", progress=False)
