"""The command line: fast help, inspect, merge --verify, generate, demo."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import load_hf, make_peft_lora, random_ids

import adaptkit as ak
from adaptkit.cli.main import main


@pytest.fixture(scope="module")
def lora(tiny_llama, tmp_path_factory):
    return make_peft_lora(tiny_llama, tmp_path_factory.mktemp("cli") / "sql", seed=5, r=4)


def test_help_lists_commands_and_does_not_import_torch():
    code = "import sys; from adaptkit.cli.main import main; assert 'torch' not in sys.modules; print('lazy')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "lazy\n"
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("merge", "inspect", "generate", "demo"):
        assert command in result.output


def test_inspect_reports_facts_and_compatibility(lora, tiny_llama, tiny_gpt2):
    result = CliRunner().invoke(main, ["inspect", str(lora), "--base", str(tiny_llama)])
    assert result.exit_code == 0, result.output
    engine = ak.Engine.from_pretrained(tiny_llama)
    info = engine.add_adapter("sql", lora)
    assert "kind: lora" in result.output
    assert f"parameters: {info.params:,}" in result.output
    assert "ranks: [4]" in result.output and "'q_proj'" in result.output
    assert "compatible with" in result.output and ": yes" in result.output
    other = CliRunner().invoke(main, ["inspect", str(lora), "--base", str(tiny_gpt2)])
    assert other.exit_code == 1 and ": no (" in other.output


def test_merge_verify_and_output_loads(lora, tiny_llama, tmp_path):
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", str(tiny_llama), str(lora), "-o", str(out), "--verify", "-q"])
    assert result.exit_code == 0, result.output
    diff = float(result.output.split("= ")[-1].split()[0])
    assert diff < 1e-4
    ids = random_ids(seed=2)
    engine = ak.Engine.from_pretrained(tiny_llama)
    engine.add_adapter("sql", lora)
    with torch.no_grad():
        merged = load_hf(out)(input_ids=ids).logits
    torch.testing.assert_close(merged, engine.logits(ids, adapters="sql"), atol=1e-4, rtol=0)


def test_generate_prints_the_engine_output(lora, tiny_llama):
    result = CliRunner().invoke(
        main, ["generate", str(tiny_llama), "--adapter", f"sql={lora}", "--prompt", "SELECT name", "--max-new-tokens", "6"]
    )
    assert result.exit_code == 0, result.output
    engine = ak.Engine.from_pretrained(tiny_llama)
    engine.add_adapter("sql", lora)
    expected = engine.generate(["SELECT name"], adapters=["sql"], max_new_tokens=6)[0]
    assert result.output == f"SELECT name{expected}\n"



def test_generate_streams_prints_json_and_takes_dtype_auto_and_device(tiny_llama, tmp_path):
    import json

    import torch

    import adaptkit as ak
    from adaptkit.demo import build_tiny_model

    engine = ak.Engine.from_pretrained(tiny_llama)
    expected = engine.generate(["the quick", "SELECT"], max_new_tokens=6)
    runner = CliRunner()
    one = runner.invoke(main, ["generate", str(tiny_llama), "--prompt", "the quick", "--max-new-tokens", "6"])
    assert one.exit_code == 0 and one.output == f"the quick{expected[0]}\n"
    both = runner.invoke(main, ["generate", str(tiny_llama), "--prompt", "the quick", "--prompt", "SELECT",
                                "--max-new-tokens", "6", "--json"])
    rows = [json.loads(line) for line in both.output.splitlines()]
    assert [r["text"] for r in rows] == expected and all(len(r["tokens"]) <= 6 for r in rows)
    streamed = []
    engine.generate_ids(engine.encode(["the quick"]), max_new_tokens=6, on_token=lambda row, t: streamed.append(t))
    assert engine.tokenizer.decode(streamed, skip_special_tokens=True) == expected[0]
    half = build_tiny_model(tmp_path / "bf16", "llama", torch_dtype="bfloat16")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(half), dtype=torch.bfloat16)
    model.save_pretrained(str(half))
    assert ak.Engine.from_pretrained(half, dtype="auto").base.dtype == torch.bfloat16
    assert ak.Engine.from_pretrained(tiny_llama, dtype="auto").base.dtype == torch.float32
    if not torch.cuda.is_available():
        cuda = runner.invoke(main, ["generate", str(tiny_llama), "--prompt", "x", "--device", "cuda"])
        assert cuda.exit_code == 1 and cuda.output.startswith("error: ") and "--device cpu" in cuda.output


def test_generate_chat_sends_the_prompt_as_a_user_turn(tiny_llama):
    from adaptkit.chat import chat_prompt_ids

    engine = ak.Engine.from_pretrained(tiny_llama)
    ids = chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": "SELECT name"}])
    expected = engine.tokenizer.decode(engine.generate_ids([ids], max_new_tokens=5)[0], skip_special_tokens=True)
    result = CliRunner().invoke(main, ["generate", str(tiny_llama), "--chat", "--prompt", "SELECT name",
                                       "--max-new-tokens", "5"])
    assert result.exit_code == 0 and result.output == f"{expected}\n"  # the reply only, not the rendered turn
    assert ids != engine.encode(["SELECT name"])[0]


def test_verify_says_what_error_the_output_dtype_makes_expected(lora, tiny_llama, tmp_path):
    import transformers

    from adaptkit.merging.checkpoint import probe_ids, storage_rounding, verify_verdict

    runner = CliRunner()
    half = runner.invoke(main, ["merge", str(tiny_llama), str(lora), "-o", str(tmp_path / "bf16"), "--dtype",
                                "bfloat16", "--verify", "-q"])
    full = runner.invoke(main, ["merge", str(tiny_llama), str(lora), "-o", str(tmp_path / "f32"), "--verify", "-q"])
    assert half.exit_code == 0 and full.exit_code == 0, half.output + full.output
    load = transformers.AutoModelForCausalLM.from_pretrained
    load(str(tiny_llama), dtype=torch.bfloat16).save_pretrained(str(tmp_path / "base-bf16"))  # the base stored in bf16
    model, stored = load(str(tiny_llama), dtype=torch.float32), load(str(tmp_path / "base-bf16"), dtype=torch.float32)
    ids = probe_ids(model.config.vocab_size)
    with torch.no_grad():
        reference, rounded = model(input_ids=ids).logits, stored(input_ids=ids).logits
    expected_rounding = float((rounded - reference).abs().max())
    assert storage_rounding(tiny_llama, "bfloat16") == pytest.approx(expected_rounding, abs=1e-5)  # fp32 sums
    assert expected_rounding > 1e-3 and storage_rounding(tiny_llama, "float32") == 0.0
    assert f"moves its logits by {expected_rounding:.1e}" in half.output and half.output.rstrip().endswith(": fine")
    assert "float32: only summation order differs" in full.output and full.output.rstrip().endswith(": fine")
    assert "MORE than expected" in verify_verdict(5 * expected_rounding, expected_rounding, "bfloat16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a device this machine lacks")
@pytest.mark.parametrize("args", [
    ["quantize", "{base}", "-o", "{tmp}/q"],
    ["inspect", "{lora}", "--base", "{base}", "--load", "nf4"],
    ["merge", "{base}", "{lora}", "-o", "{tmp}/m", "--quantize", "nf4"],
    ["merge", "{base}", "{lora}", "-o", "{tmp}/m", "--verify"],
    ["export", "prefix-cache", "{lora}", "--base", "{base}", "-o", "{tmp}/kv.safetensors"],
    ["bench", "{base}", "--dtype", "auto"],
    ["train", "--method", "lora", "--base", "{base}", "--data", "{tmp}/data.jsonl", "-o", "{tmp}/t", "--dtype", "auto"],
])
def test_every_command_that_loads_a_model_takes_device(args, lora, tiny_llama, tmp_path):
    (tmp_path / "data.jsonl").write_text('{"text": "SELECT name FROM users"}\n' * 4)
    filled = [a.format(base=tiny_llama, lora=lora, tmp=tmp_path) for a in args] + ["--device", "cuda"]
    result = CliRunner().invoke(main, filled)
    assert result.exit_code == 1 and "device 'cuda'" in result.output and "--device cpu" in result.output
    assert not (tmp_path / "q").exists()
