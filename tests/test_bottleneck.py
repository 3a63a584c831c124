"""Bottleneck adapters against AdapterHub's own outputs (golden fixtures), and their config rules."""

from __future__ import annotations

import pytest
import torch
from adapterhub_fixtures import (
    ARCHS,
    all_cases_batch,
    arch_info,
    case_inputs,
    case_rows,
    expected,
    forward_all_positions,
    load_engine,
    needs_fixtures,
)

import adaptkit as ak
from adaptkit.adapters.bottleneck import BottleneckConfig, BottleneckLayer
from adaptkit.errors import BaseModelError, UnsupportedAdapterError
from adaptkit.inject import WRAPPERS

ATOL = 1e-5  # the fixtures README's suggestion for float32 on CPU; observed: <= 1.4e-6 (bert), <= 2.4e-7 (gpt2/llama)


@pytest.fixture(scope="module", params=ARCHS)
def arch_engine(request):
    return request.param, load_engine(request.param)


@needs_fixtures
def test_every_fixture_case_matches_adapterhub(arch_engine):
    """Every out.* key (single adapters, stack, fuse, average, average_w, parallel), every position,
    all 13 cases as the rows of one batch (per-row routing; Parallel is its children's rows)."""
    arch, eng = arch_engine
    ids, mask, rows, where = all_cases_batch(arch)
    assert len(where) == 13 and len(rows) == 28
    got = forward_all_positions(eng, ids, mask, rows)
    for key, span in where.items():
        torch.testing.assert_close(got[span], expected(arch)[key], atol=ATOL, rtol=ATOL, msg=f"{arch} {key}")


@needs_fixtures
def test_engine_logits_match_adapterhub_on_real_tokens(arch_engine):
    """The public path: Engine.logits equals the fixtures wherever a token is real (BERT: everywhere)."""
    arch, eng = arch_engine
    for key in ("out.double_seq_bn", "out.fuse.seq_bn+custom", "out.parallel.seq_bn+custom"):
        spec = arch_info(arch)["cases"][key]
        ids, mask = case_inputs(arch, spec)
        got = eng.logits(ids, mask, adapters=case_rows(spec, expected(arch)["input_ids"].shape[0]))
        real = mask.bool() if arch != "bert" else torch.ones_like(mask, dtype=torch.bool)
        torch.testing.assert_close(got[real], expected(arch)[key][real], atol=ATOL, rtol=ATOL, msg=f"{arch} {key}")


@needs_fixtures
def test_adapters_really_change_the_output(arch_engine):
    """Guards against a vacuous match: each adapter moves the output well beyond the tolerance."""
    arch, _ = arch_engine
    exp = expected(arch)
    for key in ("out.seq_bn", "out.double_seq_bn", "out.par_bn", "out.custom", "out.custom_ln", "out.fuse.seq_bn+custom"):
        assert (exp[key] - exp["out.base"]).abs().max() > 1e-2, key


@needs_fixtures
def test_prefixed_bert_adapters_give_the_same_outputs():
    """adapters_prefixed/ (saved from BertAdapterModel, keys start with "bert.") loads like adapters/."""
    eng = load_engine("bert", "adapters_prefixed", fusion=False)
    exp = expected("bert")
    for name in arch_info("bert")["adapters_prefixed"]:
        got = eng.logits(exp["input_ids"], exp["attention_mask"], adapters=name)
        torch.testing.assert_close(got, exp[f"out.{name}"], atol=ATOL, rtol=ATOL, msg=name)


@needs_fixtures
def test_removing_adapters_restores_the_plain_model():
    eng = load_engine("gpt2")
    exp = expected("gpt2")
    for name in [*eng.adapters]:
        if eng.adapters[name].kind == "fusion":
            eng.remove_adapter(name)
    for name in [*eng.adapters]:
        eng.remove_adapter(name)
    assert not any(isinstance(m, WRAPPERS) for m in eng.model.modules())
    got = eng.logits(exp["input_ids"][:1])
    torch.testing.assert_close(got, exp["ref.plain"][:1], atol=ATOL, rtol=ATOL)


@needs_fixtures
def test_bottleneck_details():
    eng = load_engine("llama", fusion=False)
    info = eng.adapters["double_seq_bn"]
    assert info.kind == "bottleneck" and info.params == 2 * 2 * (4 * 64 + 4 + 64 * 4 + 64)
    assert info.details["sites"] == ["mh", "output"] and info.details["bottleneck"] == [4]
    assert eng.adapters["par_bn"].details["placement"] == "parallel"
    assert eng.adapters["custom_ln"].details["scaling"] == "learned"


@needs_fixtures
def test_unsupported_architecture_is_refused(tmp_path):
    """Bottleneck sites are placed only where the block layout is AdapterHub's, as measured on the live model
    (not granite's scaled residuals)."""
    from transformers import AutoModelForCausalLM, GraniteConfig

    from adaptkit.arch import adapter_site
    from adaptkit.demo import tiny_config
    from adaptkit.measured import facts_of

    facts = facts_of(AutoModelForCausalLM.from_config(tiny_config("llama")))
    assert adapter_site(facts, "output").residual_norm == "post_attention_layernorm"
    granite = AutoModelForCausalLM.from_config(GraniteConfig(**{**tiny_config("llama").to_dict(), "model_type": "granite",
                                                                "residual_multiplier": 0.5}))
    with pytest.raises(BaseModelError, match="not supported on 'granite'"):
        adapter_site(facts_of(granite), "mh")


# ---------------------------------------------------------------------- options no fixture uses
def _layer(config: BottleneckConfig, hidden: int = 8, seed: int = 0, **extra) -> BottleneckLayer:
    gen = torch.Generator().manual_seed(seed)
    d = config.bottleneck_size(hidden, 0)
    tensors = {"down.weight": torch.randn(d, hidden, generator=gen), "down.bias": torch.randn(d, generator=gen),
               "up.weight": torch.randn(hidden, d, generator=gen), "up.bias": torch.randn(hidden, generator=gen)}
    tensors.update(extra)
    return BottleneckLayer(config, tensors)


def test_gating_channel_scaling_and_residual_before_ln_follow_adapterhub():
    """AdapterHub's Adapter.forward: gate = mean_seq(sigmoid(W_g x + b_g)); with
    adapter_residual_before_ln the residual enters before LN_after; 'channel' scales per feature."""
    gen = torch.Generator().manual_seed(1)
    extra = {"gate.weight": torch.randn(1, 8, generator=gen), "gate.bias": torch.randn(1, generator=gen),
             "scaling": torch.rand(8, generator=gen) + 0.5, "norm_after.weight": torch.rand(8, generator=gen),
             "norm_after.bias": torch.randn(8, generator=gen)}
    cfg = BottleneckConfig(reduction_factor=2, non_linearity="leakyrelu", use_gating=True, scaling="channel",
                           ln_after=True, adapter_residual_before_ln=True)
    layer = _layer(cfg, **extra)
    x, res = torch.randn(3, 5, 8, generator=gen), torch.randn(3, 5, 8, generator=gen)
    up = (torch.nn.functional.leaky_relu(x @ layer.down.weight.T + layer.down.bias) @ layer.up.weight.T
          + layer.up.bias) * extra["scaling"]
    gate = torch.sigmoid(x @ extra["gate.weight"].T + extra["gate.bias"]).mean(dim=1, keepdim=True)
    want = torch.nn.functional.layer_norm(up * gate + res, (8,), extra["norm_after.weight"], extra["norm_after.bias"])
    torch.testing.assert_close(layer.transform(x, res), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.up_projection(x), up, atol=1e-6, rtol=1e-6)


def test_residual_options_of_step_one():
    h, r = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    ln = torch.nn.LayerNorm(8)
    for option, want_res in ((True, h), (False, ln(h + r)), ("post_add", h + r)):
        x, res = _layer(BottleneckConfig(reduction_factor=2, residual_before_ln=option)).prepare(h, r, ln)
        torch.testing.assert_close(x, ln(h + r))
        torch.testing.assert_close(res, want_res)
    x, res = _layer(BottleneckConfig(reduction_factor=2, is_parallel=True)).prepare(h, r, ln)
    assert x is r and res is r
    # original_ln_after false: the site output is the adapter output itself (pre-LN blocks add r back)
    layer = _layer(BottleneckConfig(reduction_factor=2, original_ln_after=False))
    torch.testing.assert_close(layer.finish(h, h, r, None, model_adds_residual=True) + r, h)


def test_config_validation_and_per_layer_reduction():
    cfg = BottleneckConfig(reduction_factor={"1": 4, "default": 16})
    assert (cfg.bottleneck_size(64, 0), cfg.bottleneck_size(64, 1), cfg.bottleneck_size(8, 0)) == (4, 16, 1)
    with pytest.raises(UnsupportedAdapterError, match="no factor for block 0"):
        BottleneckConfig(reduction_factor={"1": 4}).bottleneck_size(64, 0)
    with pytest.raises(UnsupportedAdapterError, match="residual_before_ln"):
        BottleneckConfig(residual_before_ln="pre_add")
    with pytest.raises(UnsupportedAdapterError, match="scaling"):
        BottleneckConfig(scaling="per_head")
    with pytest.raises(UnsupportedAdapterError, match="non_linearity 'swishy' is unknown"):
        BottleneckConfig(non_linearity="swishy")
    with pytest.raises(UnsupportedAdapterError, match="sits nowhere"):
        BottleneckConfig(mh_adapter=False, output_adapter=False)


@needs_fixtures
def test_mix_of_one_bottleneck_with_weight_one_is_that_adapter():
    eng = load_engine("gpt2", fusion=False)
    exp = expected("gpt2")
    got = eng.logits(exp["input_ids"][:1], adapters=ak.Mix({"double_seq_bn": 1.0}))
    torch.testing.assert_close(got, exp["out.double_seq_bn"][:1], atol=ATOL, rtol=ATOL)
    half = eng.logits(exp["input_ids"][:1], adapters=ak.Mix({"double_seq_bn": 0.5}))
    assert (half - got).abs().max() > 1e-2 and (half - exp["out.base"][:1]).abs().max() > 1e-2



@needs_fixtures
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generation_with_a_kv_cache_follows_the_full_forward(arch):
    """Decoding one token at a time (sites see only the new token, the residual recorder its stream)
    picks the argmax of the full-sequence forward at every step, per row, in one batch."""
    eng = load_engine(arch)
    prompt = expected(arch)["input_ids"][0, :5].tolist()
    rows = ["double_seq_bn", ak.Fuse("seq_bn", "custom"), None]
    generated = eng.generate_ids([prompt] * len(rows), adapters=rows, max_new_tokens=4, eos_token_id=-1)
    for row, new in zip(rows, generated):
        full = eng.logits(torch.tensor([prompt + new]), adapters=[row])[0]
        assert full[len(prompt) - 1 : -1].argmax(-1).tolist() == new, row
