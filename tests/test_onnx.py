"""ONNX export with a KV cache: onnxruntime logits == torch logits (1e-4), prefill and three decode steps.

The torch reference is the adaptkit engine with the adapter served *unmerged* and no cache (a full
forward over the whole sequence each step), so the merge, the cache and the export are all checked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import load_hf, make_peft_lora, random_ids

import adaptkit as ak
from adaptkit.cli.main import main
from adaptkit.errors import OutputExistsError, UnsupportedAdapterError
from adaptkit.export import export_onnx
from adaptkit.generation import left_pad, positions_from_mask

ort = pytest.importorskip("onnxruntime")


def ort_vs_torch(onnx_path, base, adapter, steps=3):
    """Per step, the max |onnxruntime - torch| over a left-padded batch (rows of 6 and 3 tokens)."""
    engine = ak.Engine.from_pretrained(base)
    entry = None
    if adapter is not None:
        engine.add_adapter("a", adapter)
        entry = "a"
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and names[3] == "past_key_values.0.key"
    ids, mask = left_pad([[5, 17, 42, 8, 99, 23], [61, 7, 150]], 0, "cpu")
    facts = engine.base.facts
    past = [np.zeros((2, facts.num_kv_heads, 0, facts.head_dim), np.float32) for _ in names[3:]]
    step_ids, positions, diffs = ids, positions_from_mask(mask), []
    for _ in range(steps + 1):
        feed = {"input_ids": step_ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
        logits, *past = sess.run(None, {**feed, **dict(zip(names[3:], past))})
        expected = engine.logits(ids, mask, adapters=entry)[:, -step_ids.shape[1]:]
        real = mask[:, -step_ids.shape[1]:].bool().numpy()  # padded positions' logits are meaningless
        diffs.append(float(np.abs(logits - expected.numpy())[real].max()))
        assert past[0].shape == (2, facts.num_kv_heads, mask.shape[1], facts.head_dim)  # no prefix in the presents
        token = expected[:, -1].argmax(-1, keepdim=True)
        ids, step_ids = torch.cat([ids, token], 1), token
        mask, positions = torch.cat([mask, torch.ones_like(token)], 1), positions[:, -1:] + 1
    return diffs


def test_merged_lora(causal_base, tmp_path):
    adapter = make_peft_lora(causal_base, tmp_path / "lora", seed=3, r=8, use_rslora=True)
    path = export_onnx(causal_base, tmp_path / "model.onnx", adapter=adapter)
    diffs = ort_vs_torch(path, causal_base, adapter)
    assert len(diffs) == 4 and max(diffs) <= 1e-4, diffs
    bare = ak.Engine.from_pretrained(causal_base).logits(random_ids(seed=1))
    with_lora = ak.Engine.from_pretrained(causal_base)
    with_lora.add_adapter("a", adapter)
    assert (with_lora.logits(random_ids(seed=1), adapters="a") - bare).abs().max() > 1e-2  # the LoRA matters
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("kind", ["PrefixTuningConfig", "PromptTuningConfig"])
def test_prefix_and_prompt_adapters_baked_in(kind, tiny_llama, tmp_path):
    """Prefix tuning's K/V, and a prompt's K/V computed on the base, become constants of the graph."""
    import peft

    model = peft.get_peft_model(load_hf(tiny_llama), getattr(peft, kind)(task_type="CAUSAL_LM", num_virtual_tokens=5))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "prompt_encoder" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    model.save_pretrained(str(tmp_path / "virtual"))
    path = export_onnx(tiny_llama, tmp_path / "virtual.onnx", adapter=tmp_path / "virtual")
    diffs = ort_vs_torch(path, tiny_llama, tmp_path / "virtual")
    assert max(diffs) <= 1e-4, diffs
    assert max(ort_vs_torch(path, tiny_llama, None, steps=0)) > 1e-2  # the prefix matters
    if kind == "PrefixTuningConfig":  # the bare base too
        bare = export_onnx(tiny_llama, tmp_path / "bare.onnx")
        assert max(ort_vs_torch(bare, tiny_llama, None, steps=1)) <= 1e-4


def test_cli_export_onnx_verify_and_bad_input(tiny_llama, tiny_bert, tmp_path):
    adapter = make_peft_lora(tiny_llama, tmp_path / "lora", seed=5)
    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(main, ["export", "onnx", str(tiny_llama), "--adapter", str(adapter), "-o", str(out),
                                       "--verify"])
    assert result.exit_code == 0, result.output
    diff = float(result.output.rsplit("= ", 1)[1].split()[0])
    assert diff <= 1e-4 and out.is_file()

    before = out.read_bytes()
    with pytest.raises(OutputExistsError, match="--force"):
        export_onnx(tiny_llama, out, adapter=adapter)
    assert out.read_bytes() == before
    with pytest.raises(UnsupportedAdapterError, match="encoder"):
        export_onnx(tiny_bert, tmp_path / "bert.onnx")
    result = CliRunner().invoke(main, ["export", "onnx", str(tiny_llama), "--adapter", str(tmp_path / "missing"),
                                       "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 1 and "error:" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora", "model.onnx"]


def test_bottleneck_adapter_traced_in(tmp_path):
    """A bottleneck adapter (AdapterHub fixture, Pfeiffer-style seq_bn) is traced into the graph as modules."""
    from adapterhub_fixtures import ADAPTERHUB, arch_info, needs_fixtures

    if needs_fixtures.args[0]:
        pytest.skip(needs_fixtures.kwargs["reason"])
    info = arch_info("llama")
    base, adapter = ADAPTERHUB / info["base"], ADAPTERHUB / info["adapters"]["double_seq_bn"]
    path = export_onnx(base, tmp_path / "bn.onnx", adapter=adapter)
    assert max(ort_vs_torch(path, base, adapter)) <= 1e-4
    assert max(ort_vs_torch(path, base, None, steps=0)) > 1e-3  # the adapter matters


def greedy_with_onnxruntime_alone(folder, text: str, steps: int) -> tuple[list[int], list[int]]:
    """Greedy decoding of an exported folder with onnxruntime, tokenizers and numpy only (README's loop)."""
    import json

    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    config = json.loads((folder / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    heads = config["num_attention_heads"]
    kv_heads, head_dim = config.get("num_key_value_heads", heads), config["hidden_size"] // heads
    past = {f"past_key_values.{i}.{kind}": np.zeros((1, kv_heads, 0, head_dim), np.float32)
            for i in range(config["num_hidden_layers"]) for kind in ("key", "value")}
    prompt = tokenizer.encode(text).ids
    step, generated = prompt, []
    for _ in range(steps):
        total = len(prompt) + len(generated)
        logits, *presents = session.run(None, {
            "input_ids": np.array([step], np.int64), "attention_mask": np.ones((1, total), np.int64),
            "position_ids": np.arange(total - len(step), total, dtype=np.int64)[None], **past})
        generated.append(int(logits[0, -1].argmax()))
        past = dict(zip(past, presents))  # present.{i}.key/value, in the order of the past inputs
        step = generated[-1:]
    return prompt, generated


def test_exported_folder_decodes_with_onnxruntime_alone(tiny_llama, tmp_path):
    """The folder layout: model.onnx with the base's config, generation config and tokenizer beside it."""
    import adaptkit as ak

    adapter = make_peft_lora(tiny_llama, tmp_path / "lora", seed=8)
    folder = tmp_path / "exported"
    result = CliRunner().invoke(main, ["export", "onnx", str(tiny_llama), "--adapter", str(adapter), "-o", str(folder),
                                       "--verify"])
    assert result.exit_code == 0, result.output
    assert float(result.output.rsplit("= ", 1)[1].split()[0]) <= 1e-4 and result.output.rstrip().endswith(": fine")
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    prompt, generated = greedy_with_onnxruntime_alone(folder, "the quick brown fox", 8)
    engine = ak.Engine.from_pretrained(tiny_llama)
    engine.add_adapter("lora", adapter)
    assert generated == engine.generate_ids([prompt], ["lora"], max_new_tokens=8, eos_token_id=-1)[0]
