"""Helpers over ../shared/fixtures/adapterhub (made with the real AdapterHub library; see its README)."""

from __future__ import annotations

import json
from functools import cache

import pytest
import torch
from conftest import SHARED_FIXTURES
from safetensors.torch import load_file

import adaptkit as ak
from adaptkit.routing import use_plan

ADAPTERHUB = SHARED_FIXTURES / "adapterhub"
ARCHS = ("bert", "gpt2", "llama")
FUSION_NAME = "seq_bn_custom"  # engine name of the fixtures' fusion "seq_bn,custom"

needs_fixtures = pytest.mark.skipif(
    not (ADAPTERHUB / "manifest.json").is_file(),
    reason=f"AdapterHub golden fixtures not found at {ADAPTERHUB} (CI copies shared/ beside the clone)",
)


@cache
def manifest() -> dict:
    return json.loads((ADAPTERHUB / "manifest.json").read_text())


def arch_info(arch: str) -> dict:
    return manifest()["archs"][arch]


@cache
def expected(arch: str) -> dict[str, torch.Tensor]:
    return load_file(str(ADAPTERHUB / arch_info(arch)["expected"]))


def load_engine(arch: str, folder_key: str = "adapters", fusion: bool = True) -> ak.Engine:
    """The fixture base with every fixture adapter loaded under its own name (+ the fusion)."""
    info = arch_info(arch)
    eng = ak.Engine.from_pretrained(ADAPTERHUB / info["base"])
    for name, path in info[folder_key].items():
        eng.add_adapter(name, ADAPTERHUB / path)
    if fusion:
        eng.add_adapter(FUSION_NAME, ADAPTERHUB / info["fusion"]["dir"])
    return eng


def case_rows(spec: dict, batch: int) -> list:
    """A manifest case as adaptkit row entries (Parallel: each child on its own copy of the batch)."""
    kind = spec["type"]
    if kind == "none":
        return [None] * batch
    if kind == "single":
        return [spec["adapter"]] * batch
    if kind == "stack":
        return [ak.Stack(*spec["children"])] * batch
    if kind == "fuse":
        return [ak.Fuse(*spec["children"])] * batch
    if kind == "average":
        return [ak.Average(*spec["children"], weights=spec["weights"])] * batch
    if kind == "parallel":
        return [child for child in spec["children"] for _ in range(batch)]
    raise AssertionError(f"unknown case type {kind}")


def forward_all_positions(eng: ak.Engine, ids: torch.Tensor, mask: torch.Tensor, rows: list) -> torch.Tensor:
    """The model output at every position under the engine's routing, with transformers' default
    position ids (the fixtures' outputs include right-padded positions, which Engine.logits numbers
    differently: it counts real tokens only)."""
    with torch.inference_mode(), use_plan(eng.plan(rows, ids.shape[0])):
        out = eng.model(input_ids=ids, attention_mask=mask)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def case_inputs(arch: str, spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    exp = expected(arch)
    ids, mask = exp["input_ids"], exp["attention_mask"]
    if spec["type"] == "parallel":
        copies = len(spec["children"])
        return ids.repeat(copies, 1), mask.repeat(copies, 1)
    return ids, mask


def all_cases_batch(arch: str) -> tuple[torch.Tensor, torch.Tensor, list, dict[str, slice]]:
    """Every fixture case in one batch: (ids, mask, row entries, case key -> its rows)."""
    ids, masks, rows, where = [], [], [], {}
    batch = expected(arch)["input_ids"].shape[0]
    for key, spec in sorted(arch_info(arch)["cases"].items()):
        case_ids, case_mask = case_inputs(arch, spec)
        where[key] = slice(len(rows), len(rows) + case_ids.shape[0])
        ids.append(case_ids)
        masks.append(case_mask)
        rows += case_rows(spec, batch)
    return torch.cat(ids), torch.cat(masks), rows, where


def engine_state(eng: ak.Engine, ids: torch.Tensor) -> tuple:
    """What must not change after a failed call: loaded adapters, module tree, base output."""
    return (dict(eng.adapters), [(n, type(m).__name__) for n, m in eng.model.named_modules()], eng.logits(ids))


def assert_engine_unchanged(eng: ak.Engine, before: tuple, ids: torch.Tensor) -> None:
    after = engine_state(eng, ids)
    assert after[0] == before[0]
    assert after[1] == before[1]
    torch.testing.assert_close(after[2], before[2], atol=0, rtol=0)
