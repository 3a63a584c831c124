"""GGUF export (formats/gguf.py, adaptkit export gguf): merged models read back by transformers' own GGUF
loader (``from_pretrained(..., gguf_file=)``, which undoes llama.cpp's layout as llama.cpp's converter made it)
against the merged checkpoint in plain transformers; LoRA adapter files read with ``gguf`` against the
factors, named as llama.cpp's ``convert_lora_to_gguf.py`` names them; llama.cpp itself where
``llama_cpp`` (llama-cpp-python) is importable.

Tolerances: f32 1e-4 (the same float32 weights, another file). q8_0, f16 and bf16 are measured against
what the same type does to the bare base, the same way: per weight, the relative rounding error of the merged
model's tensors within 1.05x of the base's; on the logits of a probe, the RMS error within 1.5x of the base's
(a model with a LoRA merged is another model and amplifies the same relative rounding a little differently:
1.35x measured on SmolLM2-135M with a random rank-8 LoRA on all seven projections).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import random_ids

from adaptkit.demo import build_tiny_model, build_tokenizer, random_lora
from adaptkit.errors import InvalidArgumentError, UnsupportedAdapterError
from adaptkit.formats.peft import write_lora
from adaptkit.merging.checkpoint import merge_checkpoint
from adaptkit.merging.gguf import export_gguf, export_lora_gguf

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install 'adaptkit[gguf]')")
transformers = pytest.importorskip("transformers")

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def logits_of(folder, ids, gguf_file=None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(ids).logits


def field(reader, key):
    found = reader.get_field(key)
    return None if found is None else found.contents()


@pytest.fixture(scope="module")
def llama(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    loras = [write_lora(random_lora(tiny_llama, SEVEN, r=4, alpha=8, seed=s), root / f"lora{s}") for s in (1, 2)]
    return tiny_llama, loras, root


def test_merged_llama_reads_back_in_transformers_equal_to_the_merged_checkpoint(llama):
    base, (first, second), root = llama
    ids = random_ids(batch=2, length=9, seed=3)
    for adapters, weights in (([first], None), ([first, second], [0.7, -0.4])):
        out, _ = export_gguf(base, root / "m.gguf", adapters=adapters, weights=weights, outtype="f32", force=True,
                             progress=False)
        merged = merge_checkpoint(base, adapters, root / "merged", weights=weights, dtype="float32", force=True,
                                  progress=False)
        expected = logits_of(merged, ids)
        assert (expected - logits_of(base, ids)).abs().max() > 1e-2  # the adapters change the model
        torch.testing.assert_close(logits_of(root, ids, "m.gguf"), expected, atol=1e-4, rtol=0)
    reader = gguf.GGUFReader(out)
    assert field(reader, "general.architecture") == "llama" and field(reader, "llama.block_count") == 2
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.attn_q.weight", "blk.0.ffn_gate.weight"} <= names
    assert not list(out.parent.glob(".m.gguf*"))  # no temporary left beside the output


def test_quantized_and_half_outputs_err_no_more_than_on_the_bare_base(llama):
    base, (first, _), root = llama
    ids = random_ids(batch=2, length=9, seed=4)
    merged = merge_checkpoint(base, [first], root / "merged-q", dtype="float32", force=True, progress=False)
    exact = {"base": logits_of(base, ids), "merged": logits_of(merged, ids)}
    for outtype in ("q8_0", "f16", "bf16"):
        errors = rounding_errors(base, merged, [first], root, ids, exact, outtype)
        assert 0 < errors["base"] < 0.05 * float(exact["base"].abs().max()), (outtype, errors)  # rounds, not wildly
        assert errors["merged"] <= 1.5 * errors["base"], (outtype, errors)
        reader = gguf.GGUFReader(root / "merged.gguf")
        kinds = {t.name: t.tensor_type for t in reader.tensors}
        wanted = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "f16": gguf.GGMLQuantizationType.F16,
                  "bf16": gguf.GGMLQuantizationType.BF16}[outtype]
        assert kinds["blk.0.attn_q.weight"] == wanted and kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


def rounding_errors(base, merged, adapters, root, ids, exact, outtype) -> dict:
    """RMS logit error of ``outtype`` on the bare base and on the merged model (each against its float32 self),
    after checking that each weight of the merged file rounds (relative error) as the base's does."""
    errors, weight_errors = {}, {}
    for which, adapters_of, source in (("base", [], base), ("merged", adapters, merged)):
        out, _ = export_gguf(base, root / f"{which}.gguf", adapters=adapters_of, outtype=outtype, force=True,
                             progress=False)
        errors[which] = float((logits_of(root, ids, f"{which}.gguf") - exact[which]).pow(2).mean().sqrt())
        state = {}
        from safetensors.torch import load_file

        for shard in sorted(source.glob("*.safetensors")):
            state.update(load_file(shard))
        for tensor in gguf.GGUFReader(out).tensors:  # the MLP's weights: stored as they are (no rotary permutation)
            if tensor.name.split(".")[-2] in ("ffn_gate", "ffn_up", "ffn_down"):
                block, kind = tensor.name.split(".")[1], tensor.name.split(".")[2][4:]
                original = state[f"model.layers.{block}.mlp.{kind}_proj.weight"].float().numpy()
                stored = gguf.quants.dequantize(np.array(tensor.data), tensor.tensor_type).reshape(original.shape)
                weight_errors.setdefault(tensor.name, {})[which] = np.linalg.norm(stored - original) / np.linalg.norm(original)
    for name, pair in weight_errors.items():
        assert 0 < pair["merged"] <= 1.05 * pair["base"], (outtype, name, pair)
    return errors


def test_tokenizer_travels_in_the_file(llama):
    from transformers import AutoTokenizer

    base, _, root = llama
    export_gguf(base, root / "tok.gguf", outtype="f32", force=True, progress=False)
    original, read_back = AutoTokenizer.from_pretrained(str(base)), AutoTokenizer.from_pretrained(str(root), gguf_file="tok.gguf")
    for text in ("Hello world, the weather is nice today.", "SELECT name FROM users WHERE id = 42;", "  spaces\tand\nlines"):
        assert read_back(text).input_ids == original(text).input_ids
    reader = gguf.GGUFReader(root / "tok.gguf")
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and len(field(reader, "tokenizer.ggml.tokens")) == 320
    assert field(reader, "tokenizer.ggml.eos_token_id") == original.eos_token_id


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "gemma2", "phi3", "gpt2"])
def test_other_architectures_read_back_equal(model_type, tmp_path):
    from model_zoo import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    if model_type == "qwen3":  # transformers' GGUF loader reads no head size for qwen3 and takes its default, 128
        config.head_dim = 128
    if model_type == "gpt2":  # nor GPT-2's positions (it reads context_length as n_ctx) or n_inner: its defaults
        config.n_positions, config.n_inner = 1024, None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                param.add_(torch.randn_like(param) * 0.1)  # norms that are not all ones: a +1 or transpose shows
    model.save_pretrained(tmp_path / "base")
    build_tokenizer(min(model.config.vocab_size, 320)).save_pretrained(tmp_path / "base")
    base = tmp_path / "base"
    targets = ("c_attn", "c_fc") if model_type == "gpt2" else ("qkv_proj", "o_proj") if model_type == "phi3" else SEVEN
    lora = write_lora(random_lora(base, targets, r=4, alpha=8, seed=5), tmp_path / "lora")
    export_gguf(base, tmp_path / "m.gguf", adapters=[lora], outtype="f32", progress=False)
    merged = merge_checkpoint(base, [lora], tmp_path / "merged", dtype="float32", progress=False)
    ids = random_ids(batch=2, length=7, seed=1, vocab=min(model.config.vocab_size, 320))
    expected = logits_of(merged, ids)
    assert (expected - logits_of(base, ids)).abs().max() > 1e-3
    torch.testing.assert_close(logits_of(tmp_path, ids, "m.gguf"), expected, atol=1e-4, rtol=0)


def test_gemma_norms_are_stored_as_one_plus_w(tmp_path):
    """llama.cpp's Gemma multiplies by the stored norm weight; Hugging Face's by 1 + w (transformers' GGUF loader
    does not undo this for Gemma 1, so the file is read with gguf)."""
    from model_zoo import tiny_model

    model = tiny_model("gemma")
    model.save_pretrained(tmp_path / "base")
    build_tokenizer(min(model.config.vocab_size, 320)).save_pretrained(tmp_path / "base")
    export_gguf(tmp_path / "base", tmp_path / "g.gguf", outtype="f32", progress=False)
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "g.gguf").tensors}
    state = model.state_dict()
    np.testing.assert_allclose(tensors["blk.0.attn_norm.weight"], state["model.layers.0.input_layernorm.weight"] + 1)
    np.testing.assert_allclose(tensors["output_norm.weight"], state["model.norm.weight"] + 1)
    np.testing.assert_allclose(tensors["blk.1.ffn_down.weight"], state["model.layers.1.mlp.down_proj.weight"])


def unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's interleaved rotary rows back to Hugging Face's rotate-half order."""
    return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


@pytest.mark.parametrize("options", [{}, {"use_rslora": True}, {"rank_pattern": {"v_proj": 8}}],
                         ids=["plain", "rslora", "rank-pattern"])
def test_lora_gguf_is_named_and_scaled_as_llama_cpp_reads_it(llama, options):
    base, _, root = llama
    adapter = random_lora(base, SEVEN, r=4, alpha=8, seed=7, **options)
    folder = write_lora(adapter, root / f"lora-{len(options)}-{next(iter(options), 'plain')}")
    out = export_lora_gguf(folder, base, root / "adapter.gguf", outtype="f32", force=True)
    reader = gguf.GGUFReader(out)
    assert field(reader, "general.type") == "adapter" and field(reader, "adapter.type") == "lora"
    assert field(reader, "general.architecture") == "llama"
    alpha = field(reader, "adapter.lora.alpha")
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    assert set(tensors) == {f"blk.{i}.{n}.weight.lora_{ab}" for i in range(2) for n in names.values() for ab in "ab"}
    config = transformers.AutoConfig.from_pretrained(base)
    for module, weights in adapter.layers.items():
        block, proj = module.split(".")[2], module.split(".")[-1]
        a, b = tensors[f"blk.{block}.{names[proj]}.weight.lora_a"], tensors[f"blk.{block}.{names[proj]}.weight.lora_b"]
        assert a.shape == tuple(weights.lora_A.shape) and b.shape == tuple(weights.lora_B.shape)
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}.get(proj)
        if heads:
            b = unpermute(b, heads)
        delta = alpha / a.shape[0] * (b @ a)  # what llama.cpp adds: alpha / r * B A
        np.testing.assert_allclose(delta, weights.delta_weight().numpy(), atol=1e-6)
    if options.get("use_rslora"):
        assert math.isclose(alpha, 8 / math.sqrt(4) * 4, rel_tol=1e-6)  # rsLoRA's alpha / sqrt(r), folded into alpha


def test_llama_cpp_runs_the_exports_as_adaptkit_does(llama):
    """llama.cpp itself (llama-cpp-python): the merged GGUF, and the base GGUF with the LoRA GGUF applied, against
    adaptkit's unmerged LoRA, 1e-4 with a float32 K/V cache (measured: 1.5e-6 for both; with llama.cpp's default
    f16 cache, 1.4e-3, and 1.1e-3 for the bare base)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it builds llama.cpp)")
    import adaptkit as ak

    base, (first, _), root = llama
    export_gguf(base, root / "plain.gguf", outtype="f32", force=True, progress=False)
    export_gguf(base, root / "merged.gguf", adapters=[first], outtype="f32", force=True, progress=False)
    export_lora_gguf(first, base, root / "lora.gguf", outtype="f32", force=True)
    engine = ak.Engine.from_pretrained(base)
    engine.add_adapter("a", first)
    ids = [int(i) for i in random_ids(batch=1, length=8, seed=6)[0]]
    expected = engine.logits(torch.tensor([ids]), adapters="a")[0].numpy()
    runs = {"merged": dict(model_path=str(root / "merged.gguf")),
            "lora": dict(model_path=str(root / "plain.gguf"), lora_path=str(root / "lora.gguf"))}
    for name, kwargs in runs.items():
        model = llama_cpp.Llama(**kwargs, n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                                type_k=0, type_v=0)  # a float32 K/V cache (its default, f16, rounds K and V)
        model.eval(ids)
        got = np.array(model.scores[: len(ids)])
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0, err_msg=name)


def test_refusals_name_what_and_why(llama, tmp_path, tiny_bert):
    from conftest import make_peft_lora

    base, (first, _), root = llama
    with pytest.raises(UnsupportedAdapterError, match="bert"):
        export_gguf(tiny_bert, tmp_path / "b.gguf", progress=False)
    scaled = build_tiny_model(tmp_path / "scaled", "llama", rope_scaling={"rope_type": "llama3", "factor": 8.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    with pytest.raises(UnsupportedAdapterError, match="llama3"):
        export_gguf(scaled, tmp_path / "s.gguf", progress=False)
    with pytest.raises(InvalidArgumentError, match="q4_k"):
        export_gguf(base, tmp_path / "x.gguf", outtype="q4_k", progress=False)
    dora = make_peft_lora(base, tmp_path / "dora", seed=1, use_dora=True)
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        export_lora_gguf(dora, base, tmp_path / "d.gguf")
    from virtual_helpers import make_peft_virtual

    prefix = make_peft_virtual(base, tmp_path / "prefix", "prefix")
    with pytest.raises(UnsupportedAdapterError, match="virtual tokens"):
        export_gguf(base, tmp_path / "p.gguf", adapters=[prefix], progress=False)
    assert not any(tmp_path.glob("*.gguf")) and not any(tmp_path.glob(".*gguf*"))


def test_cli_writes_both_kinds(llama, tmp_path):
    from adaptkit.cli.main import main

    base, (first, _), _ = llama
    runner = CliRunner()
    result = runner.invoke(main, ["export", "gguf", str(base), "--adapter", str(first), "-o", str(tmp_path / "m.gguf"),
                                  "--outtype", "q8_0", "-q"])
    assert result.exit_code == 0, result.output
    assert "m.gguf" in result.output and gguf.GGUFReader(tmp_path / "m.gguf").tensors
    result = runner.invoke(main, ["export", "gguf", str(base), "--lora-only", str(first), "-o", str(tmp_path / "a.gguf")])
    assert result.exit_code == 0, result.output
    assert field(gguf.GGUFReader(tmp_path / "a.gguf"), "general.type") == "adapter"
    result = runner.invoke(main, ["export", "gguf", str(base), "--adapter", str(first), "-o", str(tmp_path / "m.gguf")])
    assert result.exit_code != 0 and "already exists" in result.output and "Traceback" not in result.output


def test_smollm2_merged_and_quantized(tmp_path):
    """The real model: f32 equal to the merged checkpoint, q8_0 within what it does to the bare base, the
    pre-tokenizer named as llama.cpp names SmolLM's."""
    from adaptkit.demo_model import find_smollm2

    found = find_smollm2()
    if found.path is None:
        pytest.skip(f"SmolLM2 is not available: {found.source}")
    base = found.path
    lora = write_lora(random_lora(base, SEVEN, r=8, alpha=16, seed=3, std=0.02), tmp_path / "lora")
    ids = torch.randint(100, 40000, (2, 32), generator=torch.Generator().manual_seed(0))
    merged = merge_checkpoint(base, [lora], tmp_path / "merged", dtype="float32", progress=False)
    exact = {"base": logits_of(base, ids), "merged": logits_of(merged, ids)}
    export_gguf(base, tmp_path / "m32.gguf", adapters=[lora], outtype="f32", progress=False)
    torch.testing.assert_close(logits_of(tmp_path, ids, "m32.gguf"), exact["merged"], atol=1e-4, rtol=0)
    errors = rounding_errors(base, merged, [lora], tmp_path, ids, exact, "q8_0")
    assert errors["merged"] <= 1.5 * errors["base"], errors
    assert field(gguf.GGUFReader(tmp_path / "base.gguf"), "tokenizer.ggml.pre") == "smollm"


def test_a_failure_while_writing_leaves_nothing(llama, tmp_path, monkeypatch):
    """The file is written beside OUT and renamed only when complete: a failure on the fifth tensor leaves no
    OUT, no temporary, and an existing OUT untouched."""
    from adaptkit.formats import gguf as gguf_format

    base, (first, _), _ = llama
    real, calls = gguf_format.encoded, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(*args)

    monkeypatch.setattr(gguf_format, "encoded", failing)
    (tmp_path / "kept.gguf").write_bytes(b"an earlier export")
    for name, force in (("new.gguf", False), ("kept.gguf", True)):
        calls.clear()
        with pytest.raises(Exception, match="disk full"):
            export_gguf(base, tmp_path / name, adapters=[first], outtype="f32", force=force, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.gguf"]
    assert (tmp_path / "kept.gguf").read_bytes() == b"an earlier export"
