"""Many LoRAs in one batch (lora_stack.py): stacked factors, one adapter index per row.

Reference: each row alone (one adapter for the whole batch takes the single-slot path), and the
exact per-adapter computation; the batched paths (BGMV for few tokens per row, SGMV for many) must
agree with both within 1e-5 (fp32; only the summation order of the small matmuls differs).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_peft_lora, random_ids

import adaptkit as ak
from adaptkit import inject, lora_stack
from adaptkit.demo import random_lora

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
RANKS = (4, 8, 16)


@pytest.fixture(scope="module")
def engine(tiny_llama, tmp_path_factory):
    """40 plain LoRAs of ranks 4/8/16 (one with a rank pattern: 6 pads to 8), and one DoRA."""
    eng = ak.Engine.from_pretrained(tiny_llama)
    for i in range(40):
        extra = {"rank_pattern": {"v_proj": 6}} if i == 7 else {}
        eng.add_adapter(f"a{i}", random_lora(tiny_llama, TARGETS, r=RANKS[i % 3], alpha=2.0 * RANKS[i % 3],
                                             seed=100 + i, std=0.1, **extra))
    eng.add_adapter("dora", make_peft_lora(tiny_llama, tmp_path_factory.mktemp("dora") / "d", seed=5, use_dora=True))
    return eng


def mixed_rows() -> list:
    """48 rows: 40 distinct adapters, Mix rows (weights, negative too), a Stack, DoRA and base rows."""
    rows = [f"a{i}" for i in range(40)]
    rows += [ak.Mix({"a1": 0.7, "a2": -0.3}), ak.Mix({"a5": 0.5, "a10": 0.5, "a20": 0.25}), ak.Stack("a3", "a4"),
             "dora", None, "a0", None, ak.Mix({"a7": 2.0})]
    return rows


def each_row_alone(engine, ids, rows) -> torch.Tensor:
    return torch.cat([engine.logits(ids[i : i + 1], adapters=[row]) for i, row in enumerate(rows)])


@pytest.mark.parametrize("length, segment_tokens", [(1, 1024), (12, 1024), (12, 1)], ids=["decode", "bgmv", "sgmv"])
def test_forty_adapters_mixed_with_mix_dora_and_base_rows_equal_each_row_alone(engine, length, segment_tokens,
                                                                               monkeypatch):
    monkeypatch.setattr(lora_stack, "SEGMENT_TOKENS", segment_tokens)
    rows = mixed_rows()
    ids = random_ids(batch=len(rows), length=length, seed=length)
    together = engine.logits(ids, adapters=rows)
    torch.testing.assert_close(together, each_row_alone(engine, ids, rows), atol=1e-5, rtol=0)
    base = engine.logits(ids)
    assert all((together[i] - base[i]).abs().max() > 1e-3 for i, r in enumerate(rows) if r is not None)
    torch.testing.assert_close(together[44], base[44], atol=0, rtol=0)  # a base row pays nothing and gets nothing


def test_bgmv_and_sgmv_give_the_same_result(engine, monkeypatch):
    """The same batch through the gather + batched matmul path and through the segments path."""
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(lora_stack.torch, "bmm", lambda *a: calls.append(1) or real_bmm(*a))
    rows = mixed_rows()
    ids = random_ids(batch=len(rows), length=6, seed=3)
    bgmv = engine.logits(ids, adapters=rows)
    assert len(calls) >= 2 * 2 * 5  # two per bucket, in every adapted layer
    monkeypatch.setattr(lora_stack, "SEGMENT_TOKENS", 1)  # every segment long enough: SGMV
    calls.clear()
    torch.testing.assert_close(engine.logits(ids, adapters=rows), bgmv, atol=1e-5, rtol=0)
    assert not calls


def test_decode_steps_of_a_mixed_batch_equal_each_row_decoded_alone(engine):
    """Prefill (segments) then one-token decode steps (gather): greedy tokens equal each row alone."""
    rows = mixed_rows()[::3]
    prompts = [list(map(int, p)) for p in random_ids(batch=len(rows), length=5, seed=8)]
    together = engine.generate_ids(prompts, rows, max_new_tokens=6)
    alone = [engine.generate_ids([p], [r], max_new_tokens=6)[0] for p, r in zip(prompts, rows)]
    assert together == alone


def test_stacked_factors_equal_the_exact_computation(engine, tiny_llama):
    """Per layer, the batched delta equals ``w * s * (x A^T) B^T`` computed from the adapter's own factors."""
    layer = inject.locate(engine.model, "model.layers.1.self_attn.v_proj")
    assert isinstance(layer, inject.LoraLinear) and layer.exact == ["dora"]
    x = torch.randn(5, 3, layer.base.in_features, generator=torch.Generator().manual_seed(0))
    plan = ak_route(["a7", "a8", None, ak.Mix({"a9": -0.5}), "a7"])
    with_adapters = layer.stacks.apply(torch.zeros(5, 3, layer.base.out_features), x, plan)
    for row, (name, weight) in enumerate([("a7", 1.0), ("a8", 1.0), (None, 0.0), ("a9", -0.5), ("a7", 1.0)]):
        expected = 0 * x[row, :, :1] if name is None else weight * layer.lora[name].low_rank_output(x[row])
        torch.testing.assert_close(with_adapters[row], expected.expand_as(with_adapters[row]), atol=1e-6, rtol=0)
    assert layer.lora["a7"].rank == 6 and layer.stacks.layout.index["a7"][0] == 8  # rank 6 rides the 8 bucket


def ak_route(entries):
    from adaptkit.routing import route_rows

    return route_rows(entries)


@pytest.mark.parametrize("segment_tokens", [1024, 1], ids=["bgmv", "sgmv"])
def test_adding_and_removing_adapters_leaves_the_others_bit_identical(tiny_llama, segment_tokens, monkeypatch):
    monkeypatch.setattr(lora_stack, "SEGMENT_TOKENS", segment_tokens)
    engine = ak.Engine.from_pretrained(tiny_llama)
    for i in range(6):  # k0-k2 share the rank-4 bucket, k3-k5 the rank-8 one
        engine.add_adapter(f"k{i}", random_lora(tiny_llama, TARGETS, r=4 if i < 3 else 8, seed=i))
    rows = ["k0", "k1", "k2", ak.Mix({"k0": 0.5, "k2": 0.5}), None, "k5", "k0"]
    for length in (1, 12):
        ids = random_ids(batch=len(rows), length=length, seed=length)
        before = engine.logits(ids, adapters=rows)
        for i in range(6, 30):  # more of the same ranks (the buckets grow) and a new rank-32 bucket
            engine.add_adapter(f"k{i}", random_lora(tiny_llama, TARGETS, r=(4, 8, 32)[i % 3], seed=i))
        engine.remove_adapter("k3")
        engine.remove_adapter("k1")
        engine.add_adapter("k1", random_lora(tiny_llama, TARGETS, r=4, seed=1))  # back, in the lowest free slot
        assert torch.equal(engine.logits(ids, adapters=rows), before)
        engine.remove_adapter("k4")
        assert torch.equal(engine.logits(ids, adapters=rows), before)
        for i in range(6, 30):
            engine.remove_adapter(f"k{i}")
        for i in (3, 4):
            engine.add_adapter(f"k{i}", random_lora(tiny_llama, TARGETS, r=8, seed=i))


def test_trainable_and_bias_factors_stay_on_the_exact_path(tiny_llama, tmp_path):
    engine = ak.Engine.from_pretrained(tiny_llama)
    engine.add_adapter("bias", make_peft_lora(tiny_llama, tmp_path / "b", seed=2, lora_bias=True))
    trainable = random_lora(tiny_llama, TARGETS, seed=9)
    for weights in trainable.layers.values():
        weights.lora_A.requires_grad_(True)
    engine.add_adapter("trainable", trainable)
    engine.add_adapter("plain", random_lora(tiny_llama, TARGETS, seed=8))
    layer = inject.locate(engine.model, "model.layers.0.self_attn.q_proj")
    assert layer.exact == ["bias", "trainable"] and "plain" in layer.stacks
    ids = random_ids(batch=3, seed=1)
    out = engine.logits(ids, adapters=["bias", "trainable", "plain"])
    torch.testing.assert_close(out, each_row_alone(engine, ids, ["bias", "trainable", "plain"]), atol=1e-5, rtol=0)


SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_layers_reading_one_input_share_one_shrink(tiny_llama, monkeypatch):
    """q/k/v and gate/up read the same hidden states (measured on the model): their LoRAs' ``x A^T`` is one matmul
    against the A factors stacked along the rank, held once (each layer's A a view of the stack); results equal
    every layer computing its own (1e-5: the wider matmul may sum in another order), also after adds and removes."""
    from adaptkit.measured import shared_inputs

    engine = ak.Engine.from_pretrained(tiny_llama)
    groups = shared_inputs(engine.model)
    layers = engine.model.config.num_hidden_layers
    attention = tuple(f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj"))
    assert attention in groups and ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj") in groups
    assert len(groups) == 2 * layers
    engine.add_adapter("all", random_lora(tiny_llama, SEVEN, r=8, seed=1))
    engine.add_adapter("qv", random_lora(tiny_llama, ("q_proj", "v_proj"), r=4, seed=2))  # k's layout differs
    calls = []
    real = lora_stack.shrink
    monkeypatch.setattr(lora_stack, "shrink", lambda *a: calls.append(1) or real(*a))
    memory = lora_stack.stack_memory(engine.model)

    def unshared(ids, rows):
        members = [m.stacks for m in engine.model.modules() if isinstance(m, inject.LoraLinear)]
        kept = [s.siblings for s in members]
        for s in members:
            s.siblings = None
        try:
            return engine.logits(ids, adapters=rows)
        finally:
            for s, siblings in zip(members, kept):
                s.siblings = siblings

    cases = [(["all"] * 3, 5), (["all", "qv", None, ak.Mix({"all": 0.5, "qv": -0.5})], 6)]
    for rows, per_layer in cases:  # q+v, k, o, gate+up, down; q+v twice where both buckets (ranks 8 and 4) run
        for length in (1, 7):
            ids = random_ids(batch=len(rows), length=length, seed=length)
            calls.clear()
            shared = engine.logits(ids, adapters=rows)
            assert len(calls) == per_layer * layers
            torch.testing.assert_close(shared, unshared(ids, rows), atol=1e-5, rtol=0)
            torch.testing.assert_close(shared, each_row_alone(engine, ids, rows), atol=1e-5, rtol=0)
    q, v = (inject.locate(engine.model, f"model.layers.1.self_attn.{p}").stacks for p in ("q_proj", "v_proj"))
    assert q.buckets[8].A.untyped_storage().data_ptr() == v.buckets[8].A.untyped_storage().data_ptr()
    assert lora_stack.stack_memory(engine.model) == memory  # nothing held twice

    ids = random_ids(batch=3, length=5, seed=9)
    before = engine.logits(ids, adapters=["all", None, "all"])
    engine.add_adapter("later", random_lora(tiny_llama, SEVEN, r=8, seed=3))  # written into the shared storage
    engine.remove_adapter("qv")  # q, k and v hold the same adapters again: all three share
    calls.clear()
    torch.testing.assert_close(engine.logits(ids, adapters=["all", None, "all"]), before, atol=1e-5, rtol=0)
    assert len(calls) == 4 * layers
    rows = ["later", "all", "later"]
    torch.testing.assert_close(engine.logits(ids, adapters=rows), unshared(ids, rows), atol=1e-5, rtol=0)


def test_shared_shrink_follows_adds_and_removes_between_forwards(tiny_llama):
    """Adds that grow a bucket (a member's A moves to storage of its own), removes and a re-add under the same name
    with other weights, all between two forwards, back to the same layout: the shared shrink reads the new weights."""
    engine = ak.Engine.from_pretrained(tiny_llama)
    for i in range(4):  # a full bucket of 4 slots
        engine.add_adapter(f"s{i}", random_lora(tiny_llama, SEVEN, r=4, seed=20 + i))
    ids = random_ids(batch=2, length=5, seed=2)
    engine.logits(ids, adapters=["s0", "s1"])  # the stacks are shared from here
    engine.add_adapter("grow", random_lora(tiny_llama, SEVEN, r=4, seed=30))  # every layer's bucket grows
    engine.remove_adapter("grow")
    engine.remove_adapter("s1")
    engine.add_adapter("s1", random_lora(tiny_llama, SEVEN, r=4, seed=99))  # same slot, same layout, new weights
    shared = engine.logits(ids, adapters=["s0", "s1"])
    reference = ak.Engine.from_pretrained(tiny_llama)
    for name, seed in (("s0", 20), ("s1", 99)):
        reference.add_adapter(name, random_lora(tiny_llama, SEVEN, r=4, seed=seed))
    torch.testing.assert_close(shared, reference.logits(ids, adapters=["s0", "s1"]), atol=1e-5, rtol=0)
