"""adaptkit bench: the record of a run over one adapter of every kind, the harness under it, the CLI.

No wall-clock limit is asserted anywhere: the machine is shared. What is asserted is that every
figure is there and sane (samples present, p90 >= median, ratios finite and positive, the base's
ratio exactly 1), and that the overhead model counts what the adapters really hold.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import adaptkit as ak
from adaptkit.benchmarking.timing import Case, ForwardClock, time_interleaved
from adaptkit.cli.main import main
from adaptkit.demo import random_lora, write_demo_adapters
from adaptkit.errors import InvalidArgumentError, MissingDependencyError

REPEATS, NEW_TOKENS, PROMPT_LEN, BATCHES = 2, 3, 8, (1, 2)
FIGURES = ("request_s", "prefill_s", "decode_token_s")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> dict:
    return {name: str(path) for name, path in write_demo_adapters(tiny_llama, tmp_path_factory.mktemp("bench")).items()}


@pytest.fixture(scope="module")
def run(tiny_llama, adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    result = ak.bench(tiny_llama, adapters, batch=BATCHES, prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS,
                      repeats=REPEATS, warmup=1, threads=1, json_path=out / "bench.json", plot_path=out / "bench.png")
    return result


def _check_figure(figure: dict, where: str) -> None:
    samples = figure["samples_s"]
    assert len(samples) == REPEATS and all(s > 0 for s in samples), where
    assert figure["median_s"] == statistics.median(samples), where
    assert figure["p90_s"] >= figure["median_s"] > 0, where
    assert math.isfinite(figure["ratio"]) and figure["ratio"] > 0, where


def test_every_kind_and_mode_is_measured(run):
    found = {(c["kind"], c["mode"]) for c in run.record["cases"]}
    assert found == {("base", "-"), ("lora", "unmerged"), ("lora", "merged"), ("lora", "mixed"), ("prefix", "cache"),
                     ("prompt", "cache"), ("prompt", "embeddings"), ("bottleneck", "series"),
                     ("bottleneck", "parallel"), ("fusion", "fuse")}
    assert {c["batch"] for c in run.record["cases"]} == set(BATCHES)
    mixed = [c for c in run.record["cases"] if c["mode"] == "mixed"]
    assert [c["batch"] for c in mixed] == [2] and mixed[0]["adapters"] == ["lora_a", "lora_b"]
    assert {"case": "lora mixed: lora_a+lora_b", "batch": 1,
            "reason": "a mixed batch needs at least 2 rows (--batch 2 or more)"} in run.record["skipped"]


def test_record_has_every_field_with_sane_values(run):
    record = run.record
    assert record["adaptkit_bench"] == 1
    machine = record["machine"]
    for key in ("python", "torch", "transformers", "threads", "cpu_model", "cpus"):
        assert machine[key], key
    assert machine["threads"] == 1  # the run's own setting, restored afterwards
    settings = record["settings"]
    assert (settings["prompt_len"], settings["new_tokens"], settings["repeats"], settings["dtype"]) == (
        PROMPT_LEN, NEW_TOKENS, REPEATS, "float32")
    assert record["model"]["hidden_size"] == 64 and record["model"]["linear_macs_per_token"] > 0
    for case in record["cases"]:
        where = f"{case['case']} batch {case['batch']}"
        for figure in FIGURES:
            _check_figure(case[figure], f"{where} {figure}")
        if case["kind"] == "base":
            assert all(case[f]["ratio"] == 1.0 for f in FIGURES)
        steps = case["decode_steps_s"]
        assert len(steps) == REPEATS and all(len(s) == NEW_TOKENS - 1 and min(s) > 0 for s in steps), where
        tokens = case["tokens_per_s"]
        assert tokens["median"] == pytest.approx(case["batch"] / case["decode_token_s"]["median_s"])
        assert 0 < tokens["p90"] <= tokens["median"] and tokens["ratio"] == pytest.approx(1 / case["decode_token_s"]["ratio"])
        assert case["peak_memory_bytes"] > 0 and case["memory_source"] in ("rss", "rss-lifetime", "cuda")
        theory = case["theory"]
        assert all(math.isfinite(v) and v >= 0 for v in theory.values()), where
    merged = next(c for c in record["cases"] if c["mode"] == "merged")
    _check_figure({**merged["setup_s"], "ratio": 1.0}, "merge")  # the merge before each timed request
    assert "setup_s" not in next(c for c in record["cases"] if c["mode"] == "unmerged")


def test_adapters_report_load_switch_and_merge_times(run, adapters):
    reported = run.record["adapters"]
    assert set(reported) == set(adapters)
    engine = ak.Engine.from_pretrained(run.record["settings"]["base"])
    for name, item in reported.items():
        assert item["path"] == adapters[name]
        assert item["params"] > 0 and item["nbytes"] >= item["params"]
        for key in ("load_s", "switch_s"):
            assert item[key]["samples_s"] and item[key]["p90_s"] >= item[key]["median_s"] > 0, (name, key)
        assert ("merge_unmerge_s" in item) == (item["kind"] == "lora"), name
    assert reported["lora_a"]["params"] == engine.add_adapter("lora_a", adapters["lora_a"]).params


def test_overhead_model_counts_what_the_adapters_hold(run):
    """LoRA: r * (in + out) per target = its parameter count; bottleneck: 2 H d per site; prefix: 2 L H D P."""
    record, model = run.record, run.record["model"]
    cases = {(c["case"], c["batch"]): c for c in record["cases"]}
    added = {label: c["theory"]["added_macs_per_token_decode"] for (label, batch), c in cases.items() if batch == 1}
    assert added["base"] == 0 and added["lora merged: lora_a"] == 0
    assert added["lora unmerged: lora_a"] == record["adapters"]["lora_a"]["params"]
    hidden, layers = model["hidden_size"], model["num_layers"]
    assert added["bottleneck series: bn_series"] == 2 * hidden * (hidden // 16) * layers
    assert added["bottleneck parallel: bn_parallel"] == 2 * hidden * (hidden // 2) * layers
    attention_per_key = 2 * layers * model["num_heads"] * model["head_dim"]
    assert added["prefix cache: prefix"] == attention_per_key * 8
    assert added["prompt cache: prompt"] == attention_per_key * 8
    fuse = hidden * hidden + 2 * (2 * hidden * hidden) + 2 * 2 * hidden  # query, key + value over 2, scores + sum
    assert added["fusion fuse: fusion"] == layers * fuse + 2 * added["bottleneck series: bn_series"]
    prefill = cases[("prompt embeddings: prompt", 1)]["theory"]
    assert prefill["added_fraction_prefill"] > cases[("prompt cache: prompt", 1)]["theory"]["added_fraction_prefill"]
    mixed = cases[("lora mixed: lora_a+lora_b", 2)]["theory"]
    assert mixed["added_macs_per_token_decode"] == record["adapters"]["lora_a"]["params"]  # both LoRAs same size


def test_json_and_png_are_written(run):
    assert json.loads(run.json_path.read_text())["cases"] == json.loads(json.dumps(run.record["cases"]))
    data = run.plot_path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 400 and height > 300
    table = run.table()
    assert "| case | batch |" in table and "fusion fuse: fusion" in table and "| lora_a | lora |" in table


def test_cli_prints_the_table_and_compares_with_peft(tiny_llama, adapters, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "cli.json"
    args = ["bench", str(tiny_llama), "--adapters", f"lora_a={adapters['lora_a']},{adapters['prefix']}",
            "--adapters", adapters["prompt"], "--batch", "2", "--prompt-len", "6", "--new-tokens", "2",
            "--repeats", "2", "--warmup", "0", "--threads", "1", "--compare", "peft", "--json", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "| case | batch |" in result.output and "peft decode ms/token" in result.output
    assert f"wrote record {out}" in result.output
    record = json.loads(out.read_text())
    peft = {c["matches"]: c for c in record["cases"] if c["engine"] in ("peft", "transformers")}
    assert set(peft) == {"base", "lora unmerged: lora_a", "lora merged: lora_a", "lora mixed: lora_a",
                         "prefix cache: prefix", "prompt embeddings: prompt"}
    assert peft["base"]["decode_token_s"]["ratio"] == 1.0
    for case in peft.values():
        for figure in FIGURES:
            assert math.isfinite(case[figure]["ratio"]) and case[figure]["ratio"] > 0
    assert any(s["case"] == "peft prompt cache: prompt" for s in record["skipped"])


@pytest.mark.parametrize("module,flag,extra", [("matplotlib", "--plot", "adaptkit[bench]"), ("peft", "--compare", "peft")])
def test_a_missing_optional_package_is_one_clear_line(tiny_llama, monkeypatch, tmp_path, module, flag, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    value = str(tmp_path / "x.png") if flag == "--plot" else "peft"
    result = CliRunner().invoke(main, ["bench", str(tiny_llama), flag, value])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert extra in result.output and "not installed" in result.output
    with pytest.raises(MissingDependencyError):
        ak.bench(tiny_llama, plot_path=tmp_path / "x.png", compare="peft")


def test_bad_settings_and_a_fusion_without_its_adapters_are_refused(tiny_llama, adapters):
    with pytest.raises(InvalidArgumentError, match="new_tokens must be >= 2"):
        ak.bench(tiny_llama, new_tokens=1)
    with pytest.raises(InvalidArgumentError, match="batch sizes"):
        ak.bench(tiny_llama, batch=(0,))
    with pytest.raises(InvalidArgumentError, match=r"fuses \['bn_series', 'bn_series_b'\]"):
        ak.bench(tiny_llama, {"fusion": adapters["fusion"]}, batch=(1,), repeats=1)
    with pytest.raises(InvalidArgumentError, match="given twice"):
        ak.bench(tiny_llama, [adapters["prefix"], adapters["prefix"]])


def test_interleaved_cases_keep_parts_setup_and_their_ratios():
    calls = []
    cases = {
        "base": lambda: {"part": 1.0, "raw": [1, 2]},
        "other": Case(lambda: {"part": 3.0}, setup=lambda: calls.append("setup"), teardown=lambda: calls.append("down")),
    }
    timings = time_interleaved(cases, baseline="base", repeats=4, warmup=1)
    assert calls == ["setup", "down"] * 5
    assert timings["base"].parts["part"].samples == [1.0] * 4 and timings["base"].extra["raw"] == [[1, 2]] * 4
    assert timings["other"].parts["part"].ratio == 3.0 and timings["base"].ratio == 1.0
    assert len(timings["other"].parts["setup"].samples) == 4 and "setup" not in timings["base"].parts


def test_forward_clock_splits_prefill_and_steps():
    layer = torch.nn.Linear(4, 4)
    with ForwardClock(layer) as clock:
        clock.start()
        for _ in range(3):
            layer(torch.ones(1, 4))
        prefill, steps = clock.split(3)
        assert prefill > 0 and len(steps) == 2 and min(steps) > 0
        with pytest.raises(RuntimeError, match="expected 4 forwards"):
            clock.split(4)
    layer(torch.ones(1, 4))
    assert len(clock.ends) == 3  # the hook is gone after the block


def test_ak_bench_is_the_function_even_after_the_harness_module_was_imported():
    """Importing the submodule ``adaptkit.benchmarking.timing`` must not shadow ``ak.bench`` (resolved lazily)."""
    code = "import sys, adaptkit.benchmarking.timing, adaptkit as ak; print('bench' in vars(ak), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "False False\n"
    assert ak.bench.__module__ == "adaptkit.benchmarking.run" and callable(ak.bench)  # this process imported it first


def test_lora_macs_are_rank_times_in_plus_out(tiny_gpt2):
    from adaptkit.benchmarking.overhead import adapter_macs

    lora = random_lora(tiny_gpt2, ("c_attn",), r=4)
    assert adapter_macs(lora) == 2 * 4 * (64 + 192)  # 2 layers of c_attn: 64 -> 192


def test_progress_names_the_case_and_round(capfd):
    from adaptkit.benchmarking.timing import time_interleaved

    timings = time_interleaved({"a": lambda: None, "b": lambda: None}, repeats=2, warmup=1, progress="bench")
    err = capfd.readouterr().err
    assert "bench" in err and "6/6" in err and "round 2/2: b" in err
    assert sorted(timings) == ["a", "b"] and all(len(t.samples) == 2 for t in timings.values())


def test_bench_covers_encoder_classification_and_seq2seq_generation(tmp_path):
    """An encoder with a classification head: each case is one classification forward (the prefill figures,
    no decoding); an encoder-decoder: generation with its encoder once, like a causal LM's prefill."""
    import json

    import torch
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import BertForSequenceClassification, T5Config, T5ForConditionalGeneration

    from adaptkit.demo import build_tokenizer, tiny_config

    torch.manual_seed(0)
    config = tiny_config("bert")
    config.num_labels = 3
    BertForSequenceClassification(config).save_pretrained(str(tmp_path / "bert"))
    build_tokenizer().save_pretrained(str(tmp_path / "bert"))
    t5 = T5Config(vocab_size=320, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0,
                  pad_token_id=0, eos_token_id=2, dropout_rate=0.0)
    T5ForConditionalGeneration(t5).save_pretrained(str(tmp_path / "t5"))
    build_tokenizer().save_pretrained(str(tmp_path / "t5"))
    made = {}
    for base, cls, task, targets in ((tmp_path / "bert", BertForSequenceClassification, "SEQ_CLS", ["query"]),
                                     (tmp_path / "t5", T5ForConditionalGeneration, "SEQ_2_SEQ_LM", ["q"])):
        for kind, peft_config in (("lora", LoraConfig(task_type=task, r=4, target_modules=targets)),
                                  ("prompt", PromptTuningConfig(task_type=task, num_virtual_tokens=4))):
            out = tmp_path / f"{base.name}-{kind}"
            get_peft_model(cls.from_pretrained(str(base)), peft_config).save_pretrained(str(out))
            made[base.name, kind] = out
    for name in ("bert", "t5"):
        result = ak.bench(tmp_path / name, {k: str(made[name, k]) for k in ("lora", "prompt")}, batch=(2,),
                          prompt_len=8, new_tokens=3, repeats=2, warmup=1, json_path=tmp_path / f"{name}.json")
        record = json.loads((tmp_path / f"{name}.json").read_text())
        cases = {c["case"]: c for c in record["cases"]}
        assert {"base", "lora unmerged: lora", "lora merged: lora", "lora mixed: lora",
                "prompt embeddings: prompt"} <= set(cases)
        assert "prompt cache: prompt" not in cases  # encoders and encoder-decoders prepend prompts
        assert cases["base"]["prefill_s"]["ratio"] == 1.0 and cases["lora unmerged: lora"]["prefill_s"]["median_s"] > 0
        if name == "bert":
            assert all(c["decode_token_s"] is None for c in cases.values())
            assert "one classification forward" in result.table()
        else:
            assert all(len(c["decode_steps_s"][0]) == 2 for c in cases.values())  # 3 tokens: 2 decode steps
