"""Synthetic tasks a tiny random model learns in a few dozen steps, and the held-out score of a saved adapter."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

PATTERN = "{text}={mask}"  # the slot right after "=": the label words are single tokens ("1", "0")
VERBALIZER = {"pos": "1", "neg": "0"}
EVAL_SPLIT = 0.25
# Margins every method must reach on the task below (two balanced labels: chance 0.5).
ACCURACY_OVER_CHANCE = 0.35  # final held-out accuracy >= 0.85
LOSS_RATIO = 0.6  # final held-out loss <= 0.6 x before training; mean of the last 3 step losses <= 0.6 x the first 3


def classification_task(path: Path, rows: int = 64, seed: int = 0) -> Path:
    """``{"text": "x x x", "label": "pos"}`` / ``{"text": "y y", "label": "neg"}``: the repeated letter decides."""
    rng = random.Random(seed)
    lines = []
    for _ in range(rows):
        letter = rng.choice("xy")
        lines.append(json.dumps({"text": " ".join(letter * rng.randint(2, 5)), "label": "pos" if letter == "x" else "neg"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def unlabeled_text(path: Path, rows: int = 32, seed: int = 1) -> Path:
    """``{"text": ...}`` rows of random letters (PPT's pre-training data)."""
    rng = random.Random(seed)
    lines = [json.dumps({"text": " ".join(rng.choice("cdefghijklmnopqrstuvwxy") for _ in range(rng.randint(4, 8)))})
             for _ in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def with_mask_token(base: Path, out: Path) -> Path:
    """A copy of the tiny BERT whose tokenizer has a mask token (``<mask>``, id 319 < vocab 320)."""
    from adaptkit.demo import build_tokenizer

    shutil.copytree(base, out)
    tokenizer = build_tokenizer(319)
    tokenizer.add_special_tokens({"mask_token": "<mask>"})
    assert tokenizer.mask_token_id == 319
    tokenizer.save_pretrained(str(out))
    return out


def assert_learned(result) -> None:
    """The stated margins: held-out accuracy over chance, held-out and training loss falling."""
    initial, final = result.initial_eval, result.final_eval
    assert final["accuracy"] >= final["chance"] + ACCURACY_OVER_CHANCE, (initial, final)
    assert final["loss"] <= LOSS_RATIO * initial["loss"], (initial, final)
    assert sum(result.losses[-3:]) <= LOSS_RATIO * sum(result.losses[:3]), result.losses


@torch.no_grad()
def held_out_loss(engine, entry, data: Path, seed: int = 0) -> tuple[float, float]:
    """(loss, accuracy) of ``engine`` with rows routed to ``entry`` on the rows training held out,
    scored with the engine's own forward: equal to the trainer's final evaluation when the saved
    adapter is the trained one."""
    from adaptkit.adapters.pet import label_log_probs, scoring_for
    from adaptkit.training.data import collate, make_objective, read_jsonl, split_eval, tokenize

    dataset = read_jsonl(data)
    objective = make_objective(dataset, engine.tokenizer, engine.base.facts.spec.is_causal,
                               scoring_for(engine.base.facts, engine.model), PATTERN, VERBALIZER)
    examples = tokenize(dataset, engine.tokenizer, objective)
    held = [examples[i] for i in split_eval(len(examples), EVAL_SPLIT, seed)[1]]
    batch = collate(held, engine.stop_and_pad_ids()[1])
    logits = engine.logits(batch.input_ids, batch.attention_mask, adapters=[entry] * len(held))
    scores = label_log_probs(logits, batch.slots, objective.word_ids)
    loss = float(torch.nn.functional.nll_loss(scores, batch.targets))
    return loss, float((scores.argmax(-1) == batch.targets).float().mean())
