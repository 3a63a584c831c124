"""Hub ids (``org/name``, ``org/name@revision``) wherever a path is taken, from a cache the test lays out,
with the Hub offline: nothing is downloaded."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import make_peft_lora, random_ids

import adaptkit as ak
from adaptkit.cli.main import main
from adaptkit.errors import BaseModelError

MAIN, OTHER = "a" * 40, "b" * 40


def cache_repo(hub, repo: str, folder, commit: str, ref: str | None = "main"):
    """``folder`` as the snapshot ``commit`` of ``repo`` in a Hugging Face cache at ``hub``."""
    root = hub / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    if ref:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, tiny_llama):
    hub = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache_repo(hub, "adaptkit-test/tiny-llama", tiny_llama, MAIN)
    sql = make_peft_lora(tiny_llama, tmp_path / "sql", seed=3)
    other = make_peft_lora(tiny_llama, tmp_path / "sql-v2", seed=4)
    cache_repo(hub, "adaptkit-test/sql-lora", sql, MAIN)
    cache_repo(hub, "adaptkit-test/sql-lora", other, OTHER, ref=None)
    return {"sql": sql, "other": other}


def test_bases_and_adapters_by_hub_id(offline_hub, tiny_llama, tmp_path):
    ids = random_ids(seed=3)
    by_id = ak.Engine.from_pretrained("adaptkit-test/tiny-llama")
    by_id.add_adapter("sql", "adaptkit-test/sql-lora")
    by_id.add_adapter("v2", f"adaptkit-test/sql-lora@{OTHER}")
    by_path = ak.Engine.from_pretrained(tiny_llama)
    by_path.add_adapter("sql", offline_hub["sql"])
    by_path.add_adapter("v2", offline_hub["other"])
    for name in ("sql", "v2"):
        assert torch.equal(by_id.logits(ids, adapters=name), by_path.logits(ids, adapters=name))
    merged = ak.merge_checkpoint("adaptkit-test/tiny-llama", ["adaptkit-test/sql-lora"], tmp_path / "m", progress=False)
    assert (merged / "tokenizer.json").is_file() and (merged / "model.safetensors").is_file()
    result = CliRunner().invoke(main, ["generate", "adaptkit-test/tiny-llama", "--adapter",
                                       "sql=adaptkit-test/sql-lora", "--prompt", "SELECT", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output


def test_an_id_not_in_the_offline_cache(offline_hub):
    with pytest.raises(BaseModelError, match="HF_HUB_OFFLINE is set"):
        ak.Engine.from_pretrained("adaptkit-test/not-there")
    result = CliRunner().invoke(main, ["inspect", "adaptkit-test/not-there@main"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "Hub id" in result.output
