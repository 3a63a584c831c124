"""AdapterFusion and per-row composition: every kind of row in one batch, and the errors around Fuse."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from adapterhub_fixtures import (
    ADAPTERHUB,
    ARCHS,
    FUSION_NAME,
    arch_info,
    assert_engine_unchanged,
    engine_state,
    expected,
    load_engine,
    needs_fixtures,
)

import adaptkit as ak
from adaptkit.demo import random_lora
from adaptkit.errors import (
    AdapterMismatchError,
    EngineStateError,
    InvalidArgumentError,
    UnknownAdapterError,
    UnsupportedAdapterError,
)
from adaptkit.formats.adapterhub import read_fusion

pytestmark = needs_fixtures

LORA_TARGETS = {"bert": ("query", "value", "dense"), "gpt2": ("c_attn", "c_fc", "c_proj"),
                "llama": ("q_proj", "v_proj", "o_proj", "down_proj")}


def _lora(arch: str):
    return random_lora(ADAPTERHUB / arch_info(arch)["base"], LORA_TARGETS[arch], r=4, alpha=8, seed=3, std=0.2)


@pytest.fixture(scope="module", params=ARCHS)
def mixed_engine(request):
    """Bottleneck adapters, their fusion and a LoRA "c" on one base. The LoRA goes in first on GPT-2
    and last on the others, so both nestings (LoRA layer inside a wrapped sub-block) are exercised."""
    arch = request.param
    if arch == "gpt2":
        eng = ak.Engine.from_pretrained(ADAPTERHUB / arch_info(arch)["base"])
        eng.add_adapter("c", _lora(arch))
        for name, path in arch_info(arch)["adapters"].items():
            eng.add_adapter(name, ADAPTERHUB / path)
        eng.add_adapter(FUSION_NAME, ADAPTERHUB / arch_info(arch)["fusion"]["dir"])
    else:
        eng = load_engine(arch)
        eng.add_adapter("c", _lora(arch))
    return arch, eng


def test_one_batch_of_every_row_kind_equals_each_row_alone(mixed_engine):
    arch, eng = mixed_engine
    exp = expected(arch)
    rows = ["seq_bn", ak.Fuse("seq_bn", "custom"), None, "c", ak.Mix({"seq_bn": 0.7, "c": -0.3})]
    ids = exp["input_ids"][:1].repeat(len(rows), 1)  # row 0 of the fixtures has no padding
    batch = eng.logits(ids, adapters=rows)
    for i, row in enumerate(rows):
        alone = eng.logits(ids[i : i + 1], adapters=[row])
        torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-5, rtol=0, msg=f"row {i} {row!r}")
    # the bottleneck rows are AdapterHub's outputs, and every row differs from every other one
    torch.testing.assert_close(batch[0], exp["out.seq_bn"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[1], exp["out.fuse.seq_bn+custom"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[2], exp["out.base"][0], atol=1e-5, rtol=1e-5)
    for i in range(len(rows)):
        for j in range(i):
            assert (batch[i] - batch[j]).abs().max() > 1e-3, (rows[i], rows[j])


def test_mix_of_a_bottleneck_and_a_lora_with_unit_weights_is_their_stack(mixed_engine):
    """Mix weights scale each adapter's own delta: at weight 1 both act fully, as in Stack(c, seq_bn)."""
    arch, eng = mixed_engine
    ids = expected(arch)["input_ids"][:1]
    mixed = eng.logits(ids, adapters=ak.Mix({"seq_bn": 1.0, "c": 1.0}))
    torch.testing.assert_close(mixed, eng.logits(ids, adapters=ak.Stack("c", "seq_bn")), atol=1e-5, rtol=1e-5)


def test_merging_a_lora_under_wrapped_sub_blocks(mixed_engine):
    """merge/unmerge find LoRA layers by their base names through the bottleneck wrappers."""
    arch, eng = mixed_engine
    ids = expected(arch)["input_ids"][:1]
    before = eng.logits(ids, adapters="c")
    eng.merge("c")
    try:
        torch.testing.assert_close(eng.logits(ids, adapters="c"), before, atol=1e-4, rtol=0)
    finally:
        eng.unmerge()
    torch.testing.assert_close(eng.logits(ids, adapters="c"), before, atol=0, rtol=0)


def test_fuse_errors_leave_the_engine_unchanged(mixed_engine):
    arch, eng = mixed_engine
    ids = expected(arch)["input_ids"][:1]
    before = engine_state(eng, ids)
    with pytest.raises(UnknownAdapterError, match="no adapter named 'nope'"):
        eng.logits(ids, adapters=ak.Fuse("seq_bn", "nope"))
    with pytest.raises(EngineStateError, match=r"another order; write ak.Fuse\('seq_bn', 'custom'\)"):
        eng.logits(ids, adapters=ak.Fuse("custom", "seq_bn"))
    with pytest.raises(EngineStateError, match="no fusion over exactly these adapters is loaded"):
        eng.logits(ids, adapters=ak.Fuse("seq_bn", "par_bn"))
    with pytest.raises(UnsupportedAdapterError, match=r"bottleneck adapters only; \['c'\]"):
        eng.logits(ids, adapters=ak.Fuse("seq_bn", "c"))
    with pytest.raises(UnsupportedAdapterError, match="bottleneck adapters only"):
        eng.logits(ids, adapters=ak.Average("seq_bn", "c"))
    with pytest.raises(InvalidArgumentError, match=r"AdapterFusion layer, not a row adapter; route rows with ak.Fuse"):
        eng.logits(ids, adapters=FUSION_NAME)
    with pytest.raises(EngineStateError, match="already loaded as 'seq_bn_custom'"):
        eng.add_adapter("again", ADAPTERHUB / arch_info(arch)["fusion"]["dir"])
    assert_engine_unchanged(eng, before, ids)


def test_fusion_without_its_adapters_is_refused():
    info = arch_info("gpt2")
    eng = ak.Engine.from_pretrained(ADAPTERHUB / info["base"])
    eng.add_adapter("seq_bn", ADAPTERHUB / info["adapters"]["seq_bn"])
    ids = expected("gpt2")["input_ids"][:1]
    before = engine_state(eng, ids)
    sibling = ADAPTERHUB / info["fusion"]["setup_dir"] / "custom"
    with pytest.raises(EngineStateError, match=rf"\['custom'\] is not loaded.*eng.add_adapter\('custom', '{sibling}'\)"):
        eng.add_adapter("fused", ADAPTERHUB / info["fusion"]["dir"])
    assert_engine_unchanged(eng, before, ids)


def test_fusion_bound_to_other_engine_names():
    """A fusion finds its adapters by name; dataclasses.replace binds it to the engine's names."""
    info = arch_info("llama")
    eng = ak.Engine.from_pretrained(ADAPTERHUB / info["base"])
    setup = ADAPTERHUB / info["fusion"]["setup_dir"]
    eng.add_adapter("a", setup / "seq_bn")
    eng.add_adapter("b", setup / "custom")
    eng.add_adapter("ab", dataclasses.replace(read_fusion(ADAPTERHUB / info["fusion"]["dir"]), adapter_names=("a", "b")))
    assert eng.adapters["ab"].details["adapters"] == ["a", "b"]
    exp = expected("llama")
    got = eng.logits(exp["input_ids"], exp["attention_mask"], adapters=ak.Fuse("a", "b"))
    real = exp["attention_mask"].bool()
    torch.testing.assert_close(got[real], exp["out.fuse.seq_bn+custom"][real], atol=1e-5, rtol=1e-5)
    # a fusion whose layers sit where its adapters do not (double_seq_bn also sits after attention)
    eng.add_adapter("d", ADAPTERHUB / info["adapters"]["double_seq_bn"])
    before = engine_state(eng, exp["input_ids"][:1])
    wrong = dataclasses.replace(read_fusion(ADAPTERHUB / info["fusion"]["dir"]), adapter_names=("d", "a"))
    with pytest.raises(AdapterMismatchError, match="sit at a site where the fusion has no layer"):
        eng.add_adapter("da", wrong)
    assert_engine_unchanged(eng, before, exp["input_ids"][:1])
    # removing a fused adapter makes the Fuse row an unknown-name error, not a silent base row
    eng.remove_adapter("b")
    with pytest.raises(UnknownAdapterError, match="no adapter named 'b'"):
        eng.logits(exp["input_ids"][:1], adapters=ak.Fuse("a", "b"))
