"""``adaptkit train --task seq-cls|token-cls``: an adapter trained with the base's classification head
(PEFT's SEQ_CLS / TOKEN_CLS), for LoRA, prompt tuning, P-tuning and prefix tuning. Held-out margins as the
other training tests; the output loads in PEFT with the engine's logits."""

from __future__ import annotations

import json
import random

import pytest
import torch
from test_encoder_heads import bases, peft_sees_the_cache_argument  # noqa: F401

import adaptkit as ak

WORDS = {"pos": ["quick", "brown", "fox"], "neg": ["lazy", "dog"], "neu": ["SELECT", "name"]}


def seq_rows(count=96, seed=0):
    gen = random.Random(seed)
    rows = []
    for _ in range(count):
        label = gen.choice(sorted(WORDS))
        words = [gen.choice(WORDS[label]) for _ in range(3)] + [gen.choice(["the", "over", "adds"])]
        gen.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def token_rows(count=48, seed=0):
    gen = random.Random(seed)
    every = [(w, label) for label, words in WORDS.items() for w in words]
    rows = []
    for _ in range(count):
        picked = [gen.choice(every) for _ in range(5)]
        rows.append({"tokens": [w for w, _ in picked], "labels": [label for _, label in picked]})
    return rows


CASES = [("seq-cls", "lora", {"r": 8}), ("seq-cls", "prompt", {"virtual_tokens": 6}),
         ("seq-cls", "ptuning", {"virtual_tokens": 6}), ("seq-cls", "prefix", {"virtual_tokens": 4}),
         ("seq-cls", "ptuning2", {"virtual_tokens": 4}),
         ("token-cls", "lora", {"r": 8}), ("token-cls", "prompt", {"virtual_tokens": 6}),
         ("token-cls", "ptuning", {"virtual_tokens": 6}), ("token-cls", "prefix", {"virtual_tokens": 4})]


@pytest.mark.parametrize("task, method, options", CASES, ids=[f"{t}-{m}" for t, m, _ in CASES])
def test_heads_train_and_load_in_peft(task, method, options, bases, tmp_path):  # noqa: F811
    from peft import PeftModel

    base, cls = bases["bert", "SEQ_CLS" if task == "seq-cls" else "TOKEN_CLS"]
    data = tmp_path / "data.jsonl"
    rows = seq_rows() if task == "seq-cls" else token_rows()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the virtual-token methods reach the head only through attention to the first position: more steps
    result = ak.train(method, base, data, tmp_path / "out", task=task, epochs=12 if method == "lora" else 24,
                      lr=3e-2 if method != "lora" else 1e-2,
                      eval_split=0.25, progress=False, **options)
    first, last = result.initial_eval, result.final_eval
    assert last["accuracy"] >= 0.85 and last["loss"] <= 0.6 * first["loss"], (first, last)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["task_type"] == {"seq-cls": "SEQ_CLS", "token-cls": "TOKEN_CLS"}[task]
    engine = ak.Engine.from_pretrained(base)
    engine.add_adapter("trained", tmp_path / "out")
    batch = engine.tokenizer(["quick fox over the dog", "SELECT name"], return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    got = engine.logits(ids, mask, adapters="trained")
    model = PeftModel.from_pretrained(cls.from_pretrained(str(base), attn_implementation="eager").eval(),
                                      str(tmp_path / "out")).eval()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    if expected.ndim == 3 and method in ("prompt", "ptuning"):  # PEFT keeps the virtual positions' logits
        expected = expected[:, options["virtual_tokens"]:]
    real = mask.bool() if got.ndim == 3 else slice(None)
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=0)


def test_task_errors(bases, tmp_path):  # noqa: F811
    from adaptkit.errors import InvalidArgumentError

    base, _ = bases["bert", "SEQ_CLS"]
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "quick fox", "label": "maybe"}) + "\n")
    with pytest.raises(InvalidArgumentError, match=r"data.jsonl:1: label 'maybe' is not one of the head's labels"):
        ak.train("lora", base, data, tmp_path / "out", task="seq-cls", progress=False)
    with pytest.raises(InvalidArgumentError, match="token-cls' trains a ...ForTokenClassification head"):
        ak.train("lora", base, data, tmp_path / "out", task="token-cls", progress=False)
    with pytest.raises(InvalidArgumentError, match="use one of lora, prefix"):
        data.write_text(json.dumps({"text": "quick fox", "label": "pos"}) + "\n" * 1)
        ak.train("bottleneck", base, data, tmp_path / "out", task="seq-cls", progress=False, eval_split=0.0)
