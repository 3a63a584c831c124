"""QLoRA: NF4 bases (bitsandbytes), LoRA on top vs PEFT, merges that keep or re-quantize NF4, saving.

References: PEFT's LoRA on bitsandbytes ``Linear4bit`` layers (same quantized base), bitsandbytes'
own (de)quantization, plain transformers loading of every written folder. Without AVX512-BF16,
bitsandbytes computes ``Linear4bit`` as ``x @ dequantize_4bit(W)^T`` in float32, the same kernel for
adaptkit and PEFT, so fp32 logits agree to 1e-4 (observed: bit for bit).

CPUs with AVX512-BF16 repack a 4-bit layer on its first no-grad forward and compute it in bf16 from
then on. CI machines may lack it, so tests that depend on the layout take the ``cpu_layout`` fixture
(tests/nf4_layouts.py), which runs them in both layouts on any CPU; others repack explicitly with
bitsandbytes' own function, exactly as ``Linear4bit.forward`` does.
"""

from __future__ import annotations

import json

import pytest
import torch
from adapterhub_fixtures import ADAPTERHUB, FUSION_NAME, arch_info, needs_fixtures
from click.testing import CliRunner
from conftest import load_hf, make_peft_lora, random_ids
from nf4_layouts import CPU_HAS_AVX512BF16, emulated_packed_gemv, force_layout
from safetensors.torch import load_file
from virtual_helpers import load_peft, make_peft_virtual, peft_real_logits

import adaptkit as ak
from adaptkit import describe, quant
from adaptkit.cli.main import main
from adaptkit.errors import AdaptkitError, InvalidArgumentError
from adaptkit.merging import qlora

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import _convert_weight_packed_for_cpu, dequantize_4bit  # noqa: E402

# On AVX512-BF16 CPUs bitsandbytes computes a repacked 4-bit layer in bfloat16, whatever the compute
# dtype: comparisons with a dense fp32 model then differ by bf16 rounding (about 2^-8 relative per
# product). adaptkit and PEFT share that kernel, so comparisons between the two keep 1e-4.
BF16_KERNEL_REL = 1e-2  # relative logit error of the bf16 kernel vs the same weights in fp32 (measured ~3e-3)
EXACT_REL = 1e-5  # fp32: dequantize + delta differs from unmerged by summation order only
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NF4_FP32 = dict(quantize="nf4", compute_dtype="float32")


def bnb_config(double_quant: bool = True, compute_dtype=torch.float32):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype)


def hf_nf4(base):
    """The reference NF4 base: plain transformers + bitsandbytes."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base), quantization_config=bnb_config(), dtype=torch.float32,
                                                device_map="cpu", attn_implementation="eager").eval()


def peft_nf4(base, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_nf4(base), str(adapter)).eval()


def layers_4bit(model) -> dict:
    from adaptkit.inject import base_modules

    return {name: m for name, m in base_modules(model).items() if quant.is_quantized(m)}


def repack_like_avx512bf16_forward(model) -> None:
    """What ``Linear4bit.forward`` does to each layer on an AVX512-BF16 CPU (bitsandbytes 0.49+)."""
    for layer in layers_4bit(model).values():
        if not quant.is_cpu_packed(layer):  # already repacked by a real forward on such a CPU
            layer.weight.data, _ = _convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def lora(tiny_llama, tmp_path_factory):
    """A LoRA on every linear layer with ||dW|| / ||W|| about 0.1 (s = 1.6/4, A, B ~ N(0, 0.1^2))."""
    return make_peft_lora(tiny_llama, tmp_path_factory.mktemp("qlora") / "a", seed=3, r=4, lora_alpha=1.6,
                          target_modules=ALL_LINEAR)


@pytest.fixture(scope="module")
def peft_merged(tiny_llama, lora):
    """PEFT's merge_and_unload on the NF4 base, done before any forward: after a CPU repack PEFT would
    read the repacked bytes in the loaded layout (the bug adaptkit avoids)."""
    merged = peft_nf4(tiny_llama, lora).merge_and_unload()
    quant.remember_loaded_states(merged)  # quant.dequantize_weight stays exact after a CPU repack
    return merged


@pytest.fixture(scope="module")
def merged_fp32(tiny_llama, lora, tmp_path_factory):
    return ak.merge_qlora_checkpoint(tiny_llama, [lora], tmp_path_factory.mktemp("m") / "fp32", progress=False)


def test_nf4_load_keeps_head_embeddings_norms_dense(tiny_llama):
    engine = ak.Engine.from_pretrained(tiny_llama, **NF4_FP32)
    model = engine.model
    assert engine.base.quantize == "nf4"
    assert set(layers_4bit(model)) == {f"model.layers.{i}.{p}.{m}" for i in range(2)
                                        for p, ms in (("self_attn", ALL_LINEAR[:4]), ("mlp", ALL_LINEAR[4:])) for m in ms}
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.norm.weight.dtype == torch.float32
    assert layers_4bit(model)["model.layers.0.self_attn.q_proj"].weight.quant_state.nested  # double quant
    skipped = ak.Engine.from_pretrained(tiny_llama, quantize="nf4", skip_modules=["down_proj"], double_quant=False)
    names = set(layers_4bit(skipped.model))
    assert not any(n.endswith("down_proj") for n in names) and len(names) == 12
    assert not quant.is_quantized(skipped.model.lm_head)  # transformers' default skip is kept with a skip list
    assert not skipped.model.model.layers[0].self_attn.q_proj.weight.quant_state.nested


def test_memory_estimate_equals_loaded_bytes(tiny_llama):
    """Bytes from shapes (inspect) == bytes of the loaded model, NF4 and 16-bit."""
    sizes = describe.base_memory(tiny_llama)
    assert quant.model_nbytes(ak.Engine.from_pretrained(tiny_llama, **NF4_FP32).model) == sizes["nf4_fp32_compute"]
    assert quant.model_nbytes(ak.Engine.from_pretrained(tiny_llama, quantize="nf4", dtype="bfloat16").model) == sizes["nf4"]
    assert quant.model_nbytes(ak.Engine.from_pretrained(tiny_llama, dtype="bfloat16").model) == sizes["16-bit"]
    assert sizes["nf4"] < sizes["16-bit"] < sizes["float32"]


@pytest.mark.parametrize("options", [{}, {"use_dora": True, "modules_to_save": ["lm_head"]}], ids=["lora", "dora+saved"])
def test_unmerged_qlora_equals_peft_on_the_same_nf4_base(tiny_llama, tmp_path, options, cpu_layout):
    adapter = make_peft_lora(tiny_llama, tmp_path / "x", seed=4, target_modules=ALL_LINEAR, **options)
    engine = ak.Engine.from_pretrained(tiny_llama, **NF4_FP32)
    engine.add_adapter("x", adapter)
    ids = random_ids(batch=3, seed=1)
    ours = engine.logits(ids, adapters=["x", None, "x"])  # per-row routing on the 4-bit base
    reference = peft_nf4(tiny_llama, adapter)
    expected = logits(reference, ids)
    with reference.disable_adapter():
        bare = logits(reference, ids)
    torch.testing.assert_close(ours[1], bare[1], atol=1e-4, rtol=0)
    assert (expected - bare).abs().max() > 0.1
    if cpu_layout == "generic" or not options:  # the same kernel on both sides
        torch.testing.assert_close(ours[[0, 2]], expected[[0, 2]], atol=1e-4, rtol=0)
    if cpu_layout == "avx512bf16":
        # PEFT's DoRA reads the repacked bytes as if they were in the loaded layout (wrong weight
        # norms), so the reference here is PEFT on a dense copy of the dequantized NF4 weights, within
        # the bf16 kernel's rounding; the adapter's own effect is 10x larger than that bound.
        dense = peft_logits_on_dequantized(tiny_llama, adapter, ids, tmp_path / "dequantized")
        assert qlora.relative_logit_error(dense[[0, 2]], ours[[0, 2]]) < BF16_KERNEL_REL
        assert qlora.relative_logit_error(dense[[0, 2]], bare[[0, 2]]) > 10 * BF16_KERNEL_REL


def peft_logits_on_dequantized(base, adapter, ids, folder):
    """PEFT's logits for ``adapter`` on a dense fp32 copy of ``base``'s NF4 weights (bitsandbytes-free)."""
    from conftest import peft_logits

    return peft_logits(ak.merge_qlora_checkpoint(base, [], folder, progress=False), adapter, ids)


def test_emulated_kernel_matches_bitsandbytes_avx512bf16_kernel(tiny_llama):
    """The stand-in for bitsandbytes' AVX512-BF16 kernel (tests/nf4_layouts.py) computes what it computes."""
    if not CPU_HAS_AVX512BF16:
        pytest.skip("this CPU lacks AVX512-BF16: bitsandbytes' repacked kernel cannot run here to compare with")
    layer = layers_4bit(hf_nf4(tiny_llama))["model.layers.0.mlp.down_proj"]
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        real = layer(x)  # repacks, then the real kernel
        assert quant.is_cpu_packed(layer)
        state = layer.weight.quant_state
        emulated = emulated_packed_gemv(x, layer.weight.data, state=state)
    torch.testing.assert_close(emulated, real, atol=2e-2, rtol=1e-2)  # bf16 products, accumulation order differs
    assert qlora.relative_logit_error(real, emulated) < 5e-3


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prefix_and_prompt_adapters_on_nf4_equal_peft(tiny_llama, tmp_path, method, cpu_layout):
    """Prefix/prompt K/V are computed once at load by running the 4-bit base; PEFT on the same base."""
    adapter = make_peft_virtual(tiny_llama, tmp_path / method, method, seed=2, num_virtual_tokens=4)
    engine = ak.Engine.from_pretrained(tiny_llama, **NF4_FP32)
    engine.add_adapter("v", adapter)
    ids = random_ids(batch=2, seed=6)
    expected = peft_real_logits(load_peft(tiny_llama, adapter, model=hf_nf4(tiny_llama)), ids)
    got = engine.logits(ids, adapters=["v", None])
    torch.testing.assert_close(got[:1], expected[:1], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1:], logits(hf_nf4(tiny_llama), ids)[1:], atol=1e-4, rtol=0)


@needs_fixtures
def test_bottleneck_and_fusion_on_nf4_equal_the_dequantized_dense_base(tmp_path, cpu_layout):
    """AdapterHub bottleneck/fusion modules sit between 4-bit layers. Reference: the same adapters on a
    dense copy of the dequantized NF4 weights (exact on the generic kernel, x @ deq(W)^T in fp32; within
    bf16 rounding on the repacked one)."""
    info = arch_info("llama")
    base = ADAPTERHUB / info["base"]
    dense = ak.merge_qlora_checkpoint(base, [], tmp_path / "dequantized", progress=False)
    engines = [ak.Engine.from_pretrained(base, **NF4_FP32), ak.Engine.from_pretrained(dense)]
    for engine in engines:
        for name in ("seq_bn", "custom", "par_bn"):
            engine.add_adapter(name, ADAPTERHUB / info["adapters"][name])
        engine.add_adapter(FUSION_NAME, ADAPTERHUB / info["fusion"]["dir"])
    rows = ["seq_bn", "par_bn", ak.Fuse("seq_bn", "custom"), None]
    ids = random_ids(vocab=256, batch=4, seed=7)
    nf4, reference = (engine.logits(ids, adapters=rows) for engine in engines)
    if cpu_layout == "generic":
        torch.testing.assert_close(nf4, reference, atol=1e-4, rtol=0)
    else:
        assert qlora.relative_logit_error(reference, nf4) < BF16_KERNEL_REL
    assert (nf4[0] - nf4[3]).abs().max() > 1e-3


def test_gpt2_conv1d_base_qlora_and_merge(tiny_gpt2, tmp_path):
    """GPT-2's Conv1D layers become Linear4bit [out, in]; the merged checkpoint stores them [in, out] again."""
    adapter = make_peft_lora(tiny_gpt2, tmp_path / "g", seed=6)
    engine = ak.Engine.from_pretrained(tiny_gpt2, **NF4_FP32)
    engine.add_adapter("g", adapter)
    ids = random_ids(seed=2)
    torch.testing.assert_close(engine.logits(ids, adapters="g"), logits(peft_nf4(tiny_gpt2, adapter), ids), atol=1e-4, rtol=0)
    out = ak.merge_qlora_checkpoint(tiny_gpt2, [adapter], tmp_path / "merged", progress=False)
    assert qlora.qlora_merge_error(tiny_gpt2, [adapter], out) < EXACT_REL  # both sides x @ deq(W)^T in fp32


def test_dequantize_merge_equals_unmerged_qlora(tiny_llama, lora, merged_fp32, tmp_path):
    reference = peft_nf4(tiny_llama, lora)
    layer = reference.base_model.model.model.layers[0].self_attn.q_proj
    w_nf4 = dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    ratio = float(delta.norm() / w_nf4.norm())
    assert 0.05 < ratio < 0.2  # the regime of the issue: ||dW|| / ||W|| about 0.1
    # the merged weight is bitsandbytes' dequantized NF4 weight plus the delta, in fp32
    tensors = load_file(merged_fp32 / "model.safetensors")
    torch.testing.assert_close(tensors["model.layers.0.self_attn.q_proj.weight"], w_nf4 + delta, atol=1e-6, rtol=0)
    ids = random_ids(batch=2, seed=5)
    with quant.dequantizing_kernels(reference):  # x @ deq(W)^T in fp32, whatever this CPU would repack
        unmerged = logits(reference, ids)
    merged = logits(load_hf(merged_fp32), ids)  # plain transformers, no adaptkit, no bitsandbytes
    error = qlora.relative_logit_error(unmerged, merged)
    # fp32 output: only summation order differs, so far below the bound of 1e-2
    assert error < EXACT_REL
    assert "quantization_config" not in json.loads((merged_fp32 / "config.json").read_text())
    bf16 = ak.merge_qlora_checkpoint(tiny_llama, [lora], tmp_path / "bf16", dtype="bfloat16", progress=False)
    assert qlora.qlora_merge_error(tiny_llama, [lora], bf16) <= 1e-2  # bf16 rounding of the output weights


def test_requantize_equals_peft_merge_and_reports_its_error(tiny_llama, lora, merged_fp32, peft_merged, tmp_path):
    out = tmp_path / "nf4-merged"
    result = CliRunner().invoke(main, ["merge", str(tiny_llama), str(lora), "-o", str(out), "--quantize", "nf4",
                                       "--requantize", "-q"])
    assert result.exit_code == 0, result.output
    reported = float(result.output.strip().split("error added by re-quantizing: ")[1].split()[0])
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    # PEFT's merge_and_unload on a 4-bit base re-quantizes W + dW the same way: same codes, same scales
    from adaptkit.merging.checkpoint import probe_ids

    ids, probe = random_ids(batch=2, seed=5), probe_ids(320)
    reference, ours = peft_nf4(tiny_llama, lora), hf_nf4(out)
    with quant.dequantizing_kernels(reference), quant.dequantizing_kernels(ours):  # what the report measures
        unmerged, requantized = logits(reference, probe), logits(ours, probe)
    for name, layer in layers_4bit(ours).items():
        theirs = peft_merged.get_submodule(name).weight
        assert torch.equal(layer.weight.data, theirs.data), name
        assert torch.equal(dequantize_4bit(layer.weight.data, layer.weight.quant_state),
                           dequantize_4bit(theirs.data, theirs.quant_state)), name
    expected = qlora.relative_logit_error(unmerged, requantized)
    assert reported == pytest.approx(expected, rel=1e-3)
    assert reported > 100 * qlora.relative_logit_error(unmerged, logits(load_hf(merged_fp32), probe))
    torch.testing.assert_close(logits(ours, ids), logits(peft_merged, ids), atol=1e-4, rtol=0)  # same kernel


def test_merge_after_inference_equals_merge_before(tiny_llama, lora, merged_fp32, tmp_path):
    engine = ak.Engine.from_pretrained(tiny_llama, **NF4_FP32)
    engine.add_adapter("a", lora)
    layers = layers_4bit(engine.model)
    before = {name: quant.dequantize_weight(layer) for name, layer in layers.items()}
    codes = {name: layer.weight.data.clone() for name, layer in layers.items()}
    for _ in range(3):
        engine.logits(random_ids(seed=9), adapters=["a", None])
    repack_like_avx512bf16_forward(engine.model)
    for name, layer in layers.items():
        assert quant.is_cpu_packed(layer), name
        assert torch.equal(quant.dequantize_weight(layer), before[name]), name
    name, layer = "model.layers.0.self_attn.k_proj", layers["model.layers.0.self_attn.k_proj"]
    state = layer.weight.quant_state  # now bf16 scales [K/64, N]
    bf16_scales = dequantize_4bit(codes[name], _as_loaded(state))  # loaded codes, the repacked scales
    naive = dequantize_4bit(layer.weight.data.reshape(codes[name].shape), _as_loaded(state))
    assert not torch.equal(naive, bf16_scales)  # the repacked bytes read as if loaded: other weights
    assert not torch.equal(bf16_scales, before[name])  # and the bf16 scales alone change them too
    out = ak.merge_qlora_checkpoint(tiny_llama, [lora], tmp_path / "after", loaded=engine.base, progress=False)
    expected, got = load_file(merged_fp32 / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert quant.restore_loaded_layout(engine.model) == len(layers)
    assert all(torch.equal(m.weight.data, codes[n]) and not quant.is_cpu_packed(m) for n, m in layers.items())
    # a model loaded without adaptkit has no recorded state: its bf16 scales are the best left (fallback)
    plain = hf_nf4(tiny_llama)
    repack_like_avx512bf16_forward(plain)
    assert torch.equal(quant.dequantize_weight(plain.get_submodule(name)), bf16_scales)
    assert quant.restore_loaded_layout(plain) == 0


def _as_loaded(state):
    """The repacked state with its bf16 scales, as if the bytes were still in the loaded layout."""
    from bitsandbytes.functional import QuantState

    return QuantState(state.absmax.T.reshape(-1).float(), shape=state.shape, code=state.code, blocksize=64,
                      quant_type="nf4", dtype=torch.float32)


def test_engine_merge_requantizes_and_unmerge_restores_bit_exactly(tiny_llama, lora, peft_merged, cpu_layout):
    engine = ak.Engine.from_pretrained(tiny_llama, **NF4_FP32)
    engine.add_adapter("a", lora)
    ids = random_ids(seed=8)
    unmerged = engine.logits(ids, adapters="a")  # avx512bf16: repacks every layer
    layers = layers_4bit(engine.model)
    assert all(quant.is_cpu_packed(m) == (cpu_layout == "avx512bf16") for m in layers.values())
    stored = {n: (m.weight.data.clone(), m.weight.quant_state) for n, m in layers.items()}
    engine.merge("a")
    merged_weights = {n: quant.dequantize_weight(m) for n, m in layers.items()}
    for name, weight in merged_weights.items():  # the same re-quantization as PEFT's merge_and_unload
        assert torch.equal(weight, quant.dequantize_weight(peft_merged.get_submodule(name))), name
    merged = engine.logits(ids, adapters="a")
    assert (merged - unmerged).abs().max() > 1e-3  # re-quantizing W + dW adds NF4's rounding
    engine.unmerge()
    for name, layer in layers.items():
        assert torch.equal(layer.weight.data, stored[name][0]) and layer.weight.quant_state is stored[name][1], name
    assert torch.equal(engine.logits(ids, adapters="a"), unmerged)
    # merging again, from whichever layout the layers are in now, re-quantizes the same weights
    repack_like_avx512bf16_forward(engine.model)
    engine.merge("a")
    assert all(torch.equal(merged_weights[n], quant.dequantize_weight(m)) for n, m in layers.items())
    engine.unmerge()
    assert all(quant.is_cpu_packed(m) for m in layers.values())


def test_saved_nf4_base_reloads_with_the_same_logits(tiny_llama, lora, merged_fp32, tmp_path):
    out = tmp_path / "base-nf4"
    result = CliRunner().invoke(main, ["quantize", str(tiny_llama), "-o", str(out), "--compute-dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "NF4" in result.output and "16-bit" in result.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_use_double_quant"]
    assert (out / "tokenizer.json").is_file()
    ids = random_ids(seed=4)
    fresh = ak.Engine.from_pretrained(tiny_llama, **NF4_FP32)
    shipped = ak.Engine.from_pretrained(out)  # NF4 from config.json, no re-quantization
    assert shipped.base.quantize == "nf4" and shipped.base.fingerprint == fresh.base.fingerprint
    assert torch.equal(shipped.logits(ids), fresh.logits(ids))
    assert torch.equal(logits(hf_nf4(tiny_llama), ids), logits(load_hf(out), ids))  # plain transformers
    for engine in (fresh, shipped):
        engine.add_adapter("a", lora)
    torch.testing.assert_close(shipped.logits(ids, adapters="a"), fresh.logits(ids, adapters="a"), atol=0, rtol=0)
    # merging into the shipped NF4 base gives the very checkpoint merged from the full-precision base
    again = ak.merge_qlora_checkpoint(out, [lora], tmp_path / "from-nf4", progress=False)
    expected, got = load_file(merged_fp32 / "model.safetensors"), load_file(again / "model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    with pytest.raises(InvalidArgumentError, match="already quantized"):
        ak.Engine.from_pretrained(out, quantize="nf4", double_quant=False)


def test_inspect_reports_nf4_bytes_and_peak_rss(tiny_llama, lora):
    result = CliRunner().invoke(main, ["inspect", str(lora), "--base", str(tiny_llama), "--load", "nf4"])
    assert result.exit_code == 0, result.output
    sizes = describe.base_memory(tiny_llama)
    line = next(x for x in result.output.splitlines() if x.startswith("base memory:"))
    assert "NF4" in line and "16-bit" in line
    assert f"NF4 {sizes['nf4'] / 1024:.1f} KiB" in line
    assert "peak RSS" in result.output


def test_bad_quantize_arguments_are_adaptkit_errors(tiny_llama, tmp_path):
    import shutil

    from adaptkit.errors import BaseModelError

    gptq = shutil.copytree(tiny_llama, tmp_path / "gptq")
    config = json.loads((gptq / "config.json").read_text())
    (gptq / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    with pytest.raises(BaseModelError, match="bitsandbytes NF4 bases only"):
        ak.Engine.from_pretrained(gptq)
    with pytest.raises(InvalidArgumentError, match="known: nf4"):
        ak.Engine.from_pretrained(tiny_llama, quantize="int3")
    with pytest.raises(InvalidArgumentError, match="only apply with quantize='nf4'"):
        ak.Engine.from_pretrained(tiny_llama, double_quant=False)
    with pytest.raises(InvalidArgumentError, match="unknown quantization option"):
        ak.Engine.from_pretrained(tiny_llama, quantize="nf4", blocksize=32)
    with pytest.raises(AdaptkitError, match="NF4 base"):
        ak.merge_qlora_checkpoint(tiny_llama, [], "unused", loaded=ak.Engine.from_pretrained(tiny_llama).base)


# ----------------------------------------------------------------------------- training on both layouts
@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from train_helpers import classification_task

    return classification_task(tmp_path_factory.mktemp("task") / "task.jsonl")


def train_qlora(base, task, out, **kwargs):
    from train_helpers import EVAL_SPLIT, PATTERN, VERBALIZER

    settings = dict(lr=1e-2, epochs=3, eval_split=EVAL_SPLIT, seed=0, pattern=PATTERN, verbalizer=VERBALIZER,
                    progress=False)
    return ak.train("qlora", base, task, out, **{**settings, **kwargs})


def test_qlora_training_learns_with_an_evaluation_split(tiny_llama, task, tmp_path, cpu_layout):
    """The evaluation before training runs without grad; on AVX512-BF16 CPUs that forward used to repack
    every layer into the inference kernel, which has no autograd, and nothing was learned. The trainer
    now computes through the dequantizing kernel throughout, whatever the layout was: the same margins
    as every other method, and the saved adapter reproduces the trainer's held-out loss."""
    from train_helpers import assert_learned, held_out_loss

    result = train_qlora(tiny_llama, task, tmp_path / "out")
    assert_learned(result)
    engine = ak.Engine.from_pretrained(tiny_llama, quantize="nf4")
    engine.add_adapter("q", tmp_path / "out")
    with quant.dequantizing_kernels(engine.model):  # the kernel the trainer scored with
        loss, accuracy = held_out_loss(engine, "q", task)
    assert abs(loss - result.final_eval["loss"]) < 1e-4 and accuracy == result.final_eval["accuracy"]
    served, _ = held_out_loss(engine, "q", task)  # the inference kernel (bf16 after a repack)
    assert abs(served - loss) < (5e-2 if cpu_layout == "avx512bf16" else 1e-6)
    assert all(quant.is_cpu_packed(m) == (cpu_layout == "avx512bf16") for m in layers_4bit(engine.model).values())


def test_qlora_resume_continues_to_the_uninterrupted_result(tiny_llama, task, tmp_path, cpu_layout):
    """Stopped after 5 of 12 steps and resumed (evaluations at both starts): the same losses and tensors."""
    settings = dict(epochs=2, batch_size=4, grad_accum=2)
    whole = train_qlora(tiny_llama, task, tmp_path / "whole", **settings)
    part = train_qlora(tiny_llama, task, tmp_path / "part", max_steps=5, **settings)
    resumed = train_qlora(tiny_llama, task, tmp_path / "part", resume=part.checkpoint.parent, force=True, **settings)
    assert resumed.steps == whole.steps == 12
    assert resumed.losses == whole.losses and resumed.evals == whole.evals
    expected = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "part" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys() and all(expected[k].abs().max() > 0 for k in expected if "lora_B" in k)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)


def test_a_step_that_reaches_no_trainable_tensor_is_an_error(tiny_llama, task, tmp_path, monkeypatch):
    """Without the dequantizing kernel the old failure comes back: on the repacked layout the 4-bit
    matmul has no autograd. That must stop training with a clear error, never write an untrained adapter."""
    import contextlib

    from adaptkit.errors import TrainingError

    monkeypatch.setattr(quant, "dequantizing_kernels", lambda model: contextlib.nullcontext())
    force_layout("avx512bf16", monkeypatch)
    with pytest.raises(TrainingError, match="no gradient reached"):
        train_qlora(tiny_llama, task, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- layers the CPU kernel can't take
@pytest.fixture(scope="module")
def odd_llama(tmp_path_factory):
    """Hidden 96, MLP 160, 2 KV heads of 24: no layer fits bitsandbytes' AVX512-BF16 CPU kernel
    (in_features % 64, out_features % 32)."""
    from adaptkit.demo import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("odd") / "base", "llama", hidden_size=96, intermediate_size=160)


def test_layers_the_cpu_kernel_cannot_take_stay_4bit_on_the_generic_kernel(odd_llama, tmp_path, cpu_layout, caplog):
    """Such a base used to load "healthy" and fail on its first forward (every served request a 500,
    ``merge --quantize nf4 --verify`` a crash after writing). Now those layers keep bitsandbytes' generic
    kernel, stay 4-bit, are named in one warning, and compute exactly the dequantized weights."""
    from adaptkit.serving.server import BackgroundServer, Server

    with caplog.at_level("WARNING", logger="adaptkit"):
        engine = ak.Engine.from_pretrained(odd_llama, **NF4_FP32)
    layers = layers_4bit(engine.model)
    assert len(layers) == 14
    if cpu_layout == "avx512bf16":
        assert set(engine.base.generic_kernel_layers) == set(layers)
        assert engine.base.generic_kernel_layers["model.layers.0.self_attn.k_proj"] == (
            "out_features 48 is not a multiple of 32, in_features 96 is not a multiple of 64")
        assert "14 NF4 layer(s) compute with bitsandbytes' generic CPU kernel" in caplog.text
        assert "model.layers.0.mlp.up_proj (in_features 96 is not a multiple of 64); and 8 more" in caplog.text
    else:
        assert engine.base.generic_kernel_layers == {} and not caplog.text
    ids = random_ids(batch=2, seed=3)
    dense = ak.Engine.from_pretrained(ak.merge_qlora_checkpoint(odd_llama, [], tmp_path / "dense", progress=False))
    torch.testing.assert_close(engine.logits(ids), dense.logits(ids), atol=1e-4, rtol=0)
    assert not any(quant.is_cpu_packed(m) for m in layers.values())

    adapter = make_peft_lora(odd_llama, tmp_path / "lora", seed=1, target_modules=ALL_LINEAR)
    result = CliRunner().invoke(main, ["merge", str(odd_llama), str(adapter), "-o", str(tmp_path / "merged"),
                                       "--quantize", "nf4", "--verify", "-q"])
    assert result.exit_code == 0, result.output
    assert float(result.output.split("merged vs unmerged QLoRA: ")[1].split()[0]) < EXACT_REL
    with BackgroundServer(Server(engine, {"lora": adapter})) as server:
        import httpx

        answer = httpx.post(server.url + "/v1/completions", timeout=60,
                            json={"model": "lora", "prompt": "the quick", "max_tokens": 4, "temperature": 0})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] == engine.generate(["the quick"], adapters=["lora"], max_new_tokens=4)[0]
