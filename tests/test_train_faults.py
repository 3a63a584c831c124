"""Damaged training checkpoints and diverged runs: one clear error, nothing resumed from garbage."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_helpers import EVAL_SPLIT, PATTERN, VERBALIZER, classification_task

import adaptkit as ak
from adaptkit.errors import AdaptkitError, TrainingError


@pytest.fixture(scope="module")
def checkpoint(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    task = classification_task(root / "task.jsonl")
    result = train(tiny_llama, task, root / "out", max_steps=2)
    return task, result.checkpoint


def train(base, task, out, **kwargs):
    settings = dict(lr=1e-2, epochs=1, batch_size=4, eval_split=EVAL_SPLIT, seed=0, pattern=PATTERN,
                    verbalizer=VERBALIZER, progress=False)
    return ak.train("lora", base, task, out, **{**settings, **kwargs})


def _truncate(name):
    def damage(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    return damage


def _state(**changes):
    def damage(folder):
        record = json.loads((folder / "trainer_state.json").read_text())
        record["state"].update(changes)
        (folder / "trainer_state.json").write_text(json.dumps(record))
    return damage


def _trainable(fn):
    def damage(folder):
        tensors = load_file(str(folder / "trainable.safetensors"))
        save_file({k: fn(v) for k, v in tensors.items()}, str(folder / "trainable.safetensors"))
    return damage


DAMAGE = {
    "truncated trainable.safetensors": (_truncate("trainable.safetensors"), "trainable.safetensors: not a readable"),
    "truncated optimizer.pt": (_truncate("optimizer.pt"), "optimizer.pt: unreadable"),
    "truncated trainer_state.json": (_truncate("trainer_state.json"), "trainer_state.json: unreadable"),
    "tensors of another shape": (_trainable(lambda v: torch.zeros(v.shape[0] + 1, *v.shape[1:])), "do not fit"),
    "all-NaN tensors": (_trainable(lambda v: v * float("nan")), "non-finite values"),
    "step -5": (_state(step=-5), r"state.step must be an integer >= 0, got -5"),
    "NaN losses": (_state(losses=[float("nan")]), "state.losses must be a list of finite numbers"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused(case, checkpoint, tiny_llama, tmp_path):
    task, saved = checkpoint
    damage, message = DAMAGE[case]
    copy = tmp_path / "step"
    shutil.copytree(saved, copy)
    damage(copy)
    with pytest.raises(AdaptkitError, match=message):
        train(tiny_llama, task, tmp_path / "out", resume=copy)
    assert not (tmp_path / "out").exists()


def test_a_diverged_run_stops_and_writes_nothing(tiny_llama, checkpoint, tmp_path, monkeypatch):
    from adaptkit.training import loop

    task, _ = checkpoint
    real, calls = loop.batch_loss, []

    def diverging(logits, batch, objective):  # the third step's loss is NaN, as in a diverged run
        loss, right, count = real(logits, batch, objective)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 and loss.requires_grad else loss), right, count

    monkeypatch.setattr(loop, "batch_loss", diverging)
    with pytest.raises(TrainingError, match="the training loss became nan"):
        train(tiny_llama, task, tmp_path / "out", eval_split=0.0)
    assert not (tmp_path / "out").exists()
    with pytest.raises(AdaptkitError, match="lr must be a positive finite number"):
        train(tiny_llama, task, tmp_path / "out", lr=float("inf"))
