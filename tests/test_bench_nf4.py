"""adaptkit bench on an NF4 base (QLoRA): the same LoRA modes, the base loaded in 4-bit.

Separate from test_bench.py because importing bitsandbytes alone takes seconds here.
"""

from __future__ import annotations

import math

import pytest

import adaptkit as ak
from adaptkit.demo import random_lora
from adaptkit.formats.peft import write_lora

pytest.importorskip("bitsandbytes")


def test_bench_on_an_nf4_base_measures_lora_unmerged_and_merged(tiny_llama, tmp_path):
    lora = write_lora(random_lora(tiny_llama, ("q_proj", "v_proj"), r=4, seed=1), tmp_path / "qlora")
    result = ak.bench(tiny_llama, {"qlora": lora}, batch=(1,), prompt_len=6, new_tokens=2, quantize="nf4",
                      repeats=2, warmup=0, threads=1)
    record = result.record
    assert record["settings"]["quantize"] == "nf4"
    cases = {c["case"]: c for c in record["cases"]}
    assert set(cases) == {"base", "lora unmerged: qlora", "lora merged: qlora"}
    for case in cases.values():
        for figure in ("prefill_s", "decode_token_s"):
            assert math.isfinite(case[figure]["ratio"]) and case[figure]["ratio"] > 0
            assert case[figure]["p90_s"] >= case[figure]["median_s"] > 0
    assert record["adapters"]["qlora"]["merge_unmerge_s"]["median_s"] > 0  # merge into NF4 and exact restore
    assert "NF4" in result.table().splitlines()[0]
