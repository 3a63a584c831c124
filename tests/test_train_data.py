"""Training data: jsonl checks named by line, tokenization and label masks, split, order, batching."""

from __future__ import annotations

import json

import pytest
import torch

from adaptkit.demo import build_tokenizer
from adaptkit.errors import AdaptkitError, InvalidArgumentError
from adaptkit.training.data import (
    IGNORE,
    Example,
    batches,
    collate,
    epoch_order,
    make_objective,
    read_jsonl,
    split_eval,
    tokenize,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def write(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("lines, line, message", [
    (['{"text": "a b"}', "", '{"text": "c d"}'], 2, "empty line"),
    (['{"text": "a b"}', '{"text": "c d"'], 2, "not valid JSON"),
    (['["text"]'], 1, "expected a JSON object"),
    (['{"text": "a b"}', '{"prompt": "q", "completion": "a"}'], 2, "one file holds one kind of row"),
    (['{"txt": "a"}'], 1, r"keys \['txt'\]; a row is one of"),
    (['{"text": 3}'], 1, '"text" must be a non-empty string'),
    (['{"prompt": "q", "completion": "  "}'], 1, '"completion" must be a non-empty string'),
])
def test_bad_rows_are_named_by_line(tmp_path, lines, line, message):
    path = write(tmp_path / "data.jsonl", lines)
    with pytest.raises(InvalidArgumentError, match=message) as info:
        read_jsonl(path)
    assert f"data.jsonl:{line}:" in str(info.value)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InvalidArgumentError, match="no rows"):
        read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(InvalidArgumentError, match="no such data file"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_row_kinds_and_integer_labels(tmp_path):
    assert read_jsonl(write(tmp_path / "lm.jsonl", ['{"text": "a b"}'])).kind == "lm"
    assert read_jsonl(write(tmp_path / "c.jsonl", ['{"prompt": "q", "completion": "a"}'])).kind == "completion"
    data = read_jsonl(write(tmp_path / "cls.jsonl", ['{"text": "a", "label": 1}', '{"text": "b", "label": "0"}']))
    assert data.kind == "classification" and [r["label"] for r in data.rows] == ["1", "0"] and data.lines == (1, 2)


def test_completion_loss_only_on_completion_then_eos(tmp_path, tokenizer):
    data = read_jsonl(write(tmp_path / "c.jsonl", [json.dumps({"prompt": "the quick", "completion": " brown fox"})]))
    (example,) = tokenize(data, tokenizer, make_objective(data, tokenizer, causal=True))
    prompt = tokenizer("the quick")["input_ids"]
    completion = tokenizer(" brown fox", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert list(example.input_ids) == prompt + completion
    assert list(example.labels) == [IGNORE] * len(prompt) + completion


def test_lm_rows_need_a_causal_lm_and_fit_max_length(tmp_path, tokenizer):
    data = read_jsonl(write(tmp_path / "lm.jsonl", ['{"text": "the quick brown fox"}', '{"text": "the lazy dog"}']))
    with pytest.raises(InvalidArgumentError, match="need a causal LM"):
        make_objective(data, tokenizer, causal=False)
    objective = make_objective(data, tokenizer, causal=True)
    examples = tokenize(data, tokenizer, objective)
    assert examples[0].labels == examples[0].input_ids
    with pytest.raises(InvalidArgumentError, match=r"lm.jsonl:1: \d+ tokens, more than max_length=3"):
        tokenize(data, tokenizer, objective, max_length=3)


def test_classification_label_missing_from_verbalizer(tmp_path, tokenizer):
    data = read_jsonl(write(tmp_path / "cls.jsonl", ['{"text": "x x", "label": "pos"}', '{"text": "y", "label": "neu"}']))
    with pytest.raises(InvalidArgumentError, match=r"cls.jsonl:2: label 'neu' is not in the verbalizer \(labels: 'pos', 'neg'\)"):
        make_objective(data, tokenizer, causal=True, pattern="{text}={mask}", verbalizer={"pos": "1", "neg": "0"})


def test_classification_slot_and_targets(tmp_path, tokenizer):
    data = read_jsonl(write(tmp_path / "cls.jsonl", ['{"text": "x x", "label": "pos"}', '{"text": "y", "label": "neg"}']))
    objective = make_objective(data, tokenizer, causal=True, pattern="{text}={mask}", verbalizer={"pos": "1", "neg": "0"})
    assert objective.word_ids == (tokenizer.convert_tokens_to_ids("1"), tokenizer.convert_tokens_to_ids("0"))
    examples = tokenize(data, tokenizer, objective)
    assert list(examples[0].input_ids) == tokenizer("x x=")["input_ids"]
    assert (examples[0].slot, examples[0].target) == (len(examples[0].input_ids) - 1, 0)
    assert examples[1].target == 1


def test_default_verbalizer_is_the_labels_themselves(tmp_path, tokenizer):
    data = read_jsonl(write(tmp_path / "cls.jsonl", ['{"text": "x", "label": "a"}', '{"text": "y", "label": "b"}']))
    objective = make_objective(data, tokenizer, causal=True)  # pattern "{text} {mask}": words " a", " b"
    assert objective.pet.verbalizer == {"a": "a", "b": "b"}
    assert objective.word_ids == tuple(tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" a", " b"))


def test_split_and_epoch_order_depend_only_on_seed():
    train, held = split_eval(40, 0.25, seed=3)
    assert len(held) == 10 and sorted(train + held) == list(range(40))
    assert (train, held) == split_eval(40, 0.25, seed=3) and held != split_eval(40, 0.25, seed=4)[1]
    assert split_eval(40, 0.0, seed=3) == (list(range(40)), [])
    assert epoch_order(12, 1, seed=0) == epoch_order(12, 1, seed=0) != epoch_order(12, 2, seed=0)
    with pytest.raises(AdaptkitError, match="eval_split"):
        split_eval(4, 1.0, seed=0)


def test_collate_right_pads_with_ignored_labels():
    examples = [Example((5, 6, 7), labels=(IGNORE, 6, 7)), Example((8,), labels=(8,))]
    batch = collate(examples, pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.labels.tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch.tokens == 4
    cls = collate([Example((1, 2), slot=1, target=0), Example((3,), slot=0, target=1)], pad_id=0)
    assert cls.slots.tolist() == [1, 0] and cls.targets.tolist() == [0, 1] and cls.labels is None
    assert [b.input_ids.shape[0] for b in batches(examples * 3, 4, list(range(6)), 0)] == [4, 2]
    assert torch.equal(batches(examples, 1, [1, 0], 0)[0].input_ids, torch.tensor([[8]]))
