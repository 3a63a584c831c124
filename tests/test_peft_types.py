"""AdaLoRA, VeRA, LoHa, LoKr and (IA)^3 adapters saved by PEFT, served and merged as PEFT computes them.

Every adapter is made with PEFT's own API (``get_peft_model``, its parameters randomised because PEFT
initialises some of them to zero or one, ``save_pretrained``). The reference is PEFT's
``PeftModel.from_pretrained`` (fp32, within 1e-4): unmerged, in a batch mixed with a plain LoRA and the
bare base, merged in place, merged into a checkpoint (also with TIES next to a plain LoRA, against a TIES
computed here from PEFT's own dense deltas). What adaptkit does not serve is refused by name.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_hf, make_peft_lora, peft_logits, random_ids
from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, PeftModel, VeraConfig, get_peft_model
from torch import nn

import adaptkit as ak
from adaptkit.adapters.peft_types import bind_base_layers, layer_from_tensors, needs_base_layers
from adaptkit.errors import AdapterMismatchError, UnsupportedAdapterError
from adaptkit.formats.detect import read_adapter
from adaptkit.inject import base_modules, weight_out_in

ADAPTER_PARAMS = ("lora_A", "lora_B", "lora_E", "hada_", "lokr_", "ia3_l", "vera_lambda")
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def _randomise(model, seed: int) -> None:
    """Non-trivial adapter values: PEFT starts LoHa's w2_b, LoKr's w1, AdaLoRA's E and VeRA's lambda_b at
    zero and (IA)^3's vectors at one, which would make the adapter a no-op."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not any(key in name for key in ADAPTER_PARAMS):
                continue
            noise = torch.randn(param.shape, generator=gen)
            if "ia3_l" in name or "vera_lambda" in name:
                param.copy_(1 + 0.5 * noise)  # vectors that scale: around one
            else:
                param.copy_(0.2 * noise)


def _save(base, config, out, seed: int = 0):
    model = get_peft_model(load_hf(base), config)
    _randomise(model, seed)
    model.save_pretrained(str(out))
    return out


def _pruned_adalora(base, out, seed: int = 0):
    """An AdaLoRA trained through PEFT's rank allocator: its saved rank_pattern prunes ranks (some layers to 0)."""
    config = AdaLoraConfig(init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=6, lora_alpha=8,
                           target_modules=LLAMA_TARGETS)
    model = get_peft_model(load_hf(base), config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = random_ids(batch=2, length=8, seed=5)
    for step in range(config.total_step):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    _randomise(model, seed)  # the pruned ranks are dropped when saving, whatever their values
    model.save_pretrained(str(out))
    kept = [sum(mask) for mask in json.loads((out / "adapter_config.json").read_text())["rank_pattern"].values()]
    assert min(kept) < config.init_r  # the case really prunes
    return out


# case -> (base, builder(base, out)); PEFT's LoHa and LoKr take nn.Linear only: on GPT-2 that is the (tied) lm_head
CASES = {
    "adalora": ("llama", lambda b, o: _save(b, AdaLoraConfig(init_r=6, lora_alpha=8, total_step=10,
                                                             target_modules=LLAMA_TARGETS), o)),
    "adalora_pruned": ("llama", _pruned_adalora),
    "vera": ("llama", lambda b, o: _save(b, VeraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                                         o)),
    "loha": ("llama", lambda b, o: _save(b, LoHaConfig(r=4, alpha=8, target_modules=LLAMA_TARGETS), o)),
    "loha_patterns": ("llama", lambda b, o: _save(b, LoHaConfig(r=4, alpha=8, target_modules=LLAMA_TARGETS,
                                                                rank_pattern={"v_proj": 2},
                                                                alpha_pattern={"down_proj": 3}), o)),
    "lokr": ("llama", lambda b, o: _save(b, LoKrConfig(r=4, alpha=8, target_modules=LLAMA_TARGETS), o)),
    "lokr_decomposed": ("llama", lambda b, o: _save(b, LoKrConfig(r=2, alpha=6, decompose_both=True,
                                                                  target_modules=LLAMA_TARGETS), o)),
    "ia3": ("llama", lambda b, o: _save(b, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                     feedforward_modules=["down_proj"]), o)),
    "gpt2_ia3": ("gpt2", lambda b, o: _save(b, IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                                                         feedforward_modules=["mlp.c_proj"]), o)),
    "gpt2_loha": ("gpt2", lambda b, o: _save(b, LoHaConfig(r=4, alpha=8, target_modules=["lm_head"]), o)),
    "gpt2_vera": ("gpt2", lambda b, o: _save(b, VeraConfig(r=4, target_modules=["c_attn", "c_fc"]), o)),
    "gpt2_adalora": ("gpt2", lambda b, o: _save(b, AdaLoraConfig(init_r=4, lora_alpha=6, total_step=10,
                                                                 target_modules=["c_attn", "c_fc"]), o)),
}
TIED_HEAD = {"gpt2_loha"}  # PEFT's merge_and_unload writes the tied head into the embeddings too: no TIES reference


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory, tiny_llama, tiny_gpt2):
    """(base folder, adapter folder, case name), each adapter made once per module."""
    arch, build = CASES[request.param]
    base = {"llama": tiny_llama, "gpt2": tiny_gpt2}[arch]
    return base, build(base, tmp_path_factory.mktemp(request.param) / "adapter"), request.param


@pytest.fixture(scope="module")
def ids():
    return random_ids(batch=3, length=9)


def servable(engine, path):
    """What is added to ``engine``: the folder itself (the engine binds (IA)^3 and VeRA layers to its base)."""
    return path


def checkpoint_layers(base):
    """``layer_of`` over the base checkpoint's tensors ([out, in] and bias), as a merge into that checkpoint sees them."""
    modules = base_modules(load_hf(base))

    def layer_of(name):
        module = modules.get(name)
        return None if module is None else layer_from_tensors(weight_out_in(module), getattr(module, "bias", None))

    return layer_of


def mergeable(base, path):
    """What is merged into ``base``'s checkpoint: the folder, or (IA)^3 bound to the checkpoint's own tensors."""
    adapter = read_adapter(path)
    return bind_base_layers(adapter, checkpoint_layers(base)) if needs_base_layers(adapter) else path


def test_logits_match_peft(case, ids):
    base, adapter, name = case
    expected = peft_logits(base, adapter, ids)
    engine = ak.Engine.from_pretrained(base)
    info = engine.add_adapter("t", servable(engine, adapter))
    assert info.kind == "lora" and read_adapter(adapter).peft_type == name.removeprefix("gpt2_").split("_")[0].upper()
    torch.testing.assert_close(engine.logits(ids, adapters="t"), expected, atol=1e-4, rtol=0)
    assert (engine.logits(ids) - expected).abs().max() > 1e-2  # the adapter really changes the output
    assert all(isinstance(r, int) and r >= 1 for r in info.details["ranks"])  # what inspect reports


def test_mixed_rows_equal_each_row_alone(case, ids, tmp_path):
    """One batch: this adapter, a plain PEFT LoRA and the bare base, each row as it is alone."""
    base, adapter, _ = case
    engine = ak.Engine.from_pretrained(base)
    engine.add_adapter("t", servable(engine, adapter))
    engine.add_adapter("l", make_peft_lora(base, tmp_path / "lora", seed=7))
    rows = ["t", "l", None]
    mixed = engine.logits(ids, adapters=rows)
    for i, entry in enumerate(rows):
        torch.testing.assert_close(mixed[i : i + 1], engine.logits(ids[i : i + 1], adapters=entry), atol=1e-4, rtol=0)
    assert (mixed[0] - mixed[2]).abs().max() > 1e-2 and (mixed[1] - mixed[2]).abs().max() > 1e-2


def test_merge_in_place_and_unmerge(case, ids):
    base, adapter, _ = case
    engine = ak.Engine.from_pretrained(base)
    plain = engine.logits(ids)
    engine.add_adapter("t", servable(engine, adapter))
    unmerged = engine.logits(ids, adapters="t")
    engine.merge("t")
    torch.testing.assert_close(engine.logits(ids, adapters="t"), unmerged, atol=1e-4, rtol=0)
    engine.unmerge()
    torch.testing.assert_close(engine.logits(ids), plain, atol=0, rtol=0)
    torch.testing.assert_close(engine.logits(ids, adapters="t"), unmerged, atol=0, rtol=0)


def test_merge_checkpoint_matches_peft(case, ids, tmp_path):
    base, adapter, _ = case
    out = ak.merge_checkpoint(base, [mergeable(base, adapter)], tmp_path / "merged", progress=False)
    with torch.no_grad():
        got = load_hf(out)(input_ids=ids).logits
    torch.testing.assert_close(got, peft_logits(base, adapter, ids), atol=1e-4, rtol=0)


def _peft_deltas(base, adapter) -> dict[str, torch.Tensor]:
    """PEFT's own dense delta of every tensor the adapter changes: merge_and_unload minus the base."""
    plain = load_hf(base).state_dict()
    merged = PeftModel.from_pretrained(load_hf(base), str(adapter)).merge_and_unload().state_dict()
    return {key: merged[key] - plain[key] for key in plain if not torch.equal(merged[key], plain[key])}


def _ties(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES-Merging (Yadav et al., 2023) with weights 1: trim each delta to its top ``density`` magnitudes,
    elect the sign of the sum, average the entries that agree with it."""
    trimmed = []
    for delta in deltas:
        flat = delta.flatten()
        keep = torch.zeros_like(flat)
        keep[flat.abs().topk(max(1, int(density * flat.numel()))).indices] = 1
        trimmed.append((flat * keep).view_as(delta))
    stacked = torch.stack(trimmed)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agrees = (stacked.sign() == elected).float()
    count = agrees.sum(0)
    return (stacked * agrees).sum(0) / torch.where(count == 0, 1.0, count)


def test_ties_merge_with_a_lora(case, tmp_path):
    base, adapter, name = case
    if name in TIED_HEAD:
        pytest.skip("PEFT merges a tied head into the embeddings too; the linear merge above covers this case")
    lora = make_peft_lora(base, tmp_path / "lora", seed=11)
    out = ak.merge_checkpoint(base, [mergeable(base, adapter), lora], tmp_path / "ties", method="ties", density=0.5,
                              progress=False)
    plain = load_hf(base).state_dict()
    ours, theirs = _peft_deltas(base, adapter), _peft_deltas(base, lora)
    assert set(ours) & set(theirs)  # some tensors are changed by both: the sign election matters there
    got = load_hf(out).state_dict()
    for key, tensor in plain.items():
        deltas = [d[key] for d in (ours, theirs) if key in d]
        expected = tensor + _ties(deltas, 0.5) if deltas else tensor
        torch.testing.assert_close(got[key], expected, atol=1e-5, rtol=0, msg=key)


def test_inspect_describes_each_type(case):
    from adaptkit.describe import describe_adapter

    _, adapter, _ = case
    lines, _ = describe_adapter(adapter)
    assert "kind: lora" in lines


# ----------------------------------------------------------------------------- base-dependent layers
def test_vera_layers_of_different_widths(tiny_llama, tmp_path, ids):
    """PEFT's shared vera_A is as wide as the widest adapted layer (down_proj: 128); q_proj uses its first 64
    columns. Bound to the base, each layer gets its own width; merged too."""
    adapter = _save(tiny_llama, VeraConfig(r=4, target_modules=["q_proj", "down_proj"]), tmp_path / "vera", seed=2)
    expected = peft_logits(tiny_llama, adapter, ids)
    engine = ak.Engine.from_pretrained(tiny_llama)
    engine.add_adapter("t", bind_base_layers(read_adapter(adapter), base_modules(engine.model).get))
    torch.testing.assert_close(engine.logits(ids, adapters="t"), expected, atol=1e-4, rtol=0)
    bound = bind_base_layers(read_adapter(adapter), checkpoint_layers(tiny_llama))
    out = ak.merge_checkpoint(tiny_llama, [bound], tmp_path / "merged", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(load_hf(out)(input_ids=ids).logits, expected, atol=1e-4, rtol=0)


def test_vera_of_different_widths_by_path(tiny_llama, tmp_path, ids):
    adapter = _save(tiny_llama, VeraConfig(r=4, target_modules=["q_proj", "down_proj"]), tmp_path / "vera", seed=2)
    engine = ak.Engine.from_pretrained(tiny_llama)
    engine.add_adapter("t", adapter)
    torch.testing.assert_close(engine.logits(ids, adapters="t"), peft_logits(tiny_llama, adapter, ids), atol=1e-4,
                               rtol=0)


def test_ia3_by_path_is_bound_by_the_engine(tiny_gpt2, tmp_path, ids):
    adapter = _save(tiny_gpt2, IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
                    tmp_path / "ia3")
    engine = ak.Engine.from_pretrained(tiny_gpt2)
    engine.add_adapter("t", adapter)
    torch.testing.assert_close(engine.logits(ids, adapters="t"), peft_logits(tiny_gpt2, adapter, ids), atol=1e-4,
                               rtol=0)


def test_ia3_and_vera_by_path_merge_into_checkpoints(tiny_llama, tmp_path, ids):
    """merge_checkpoint binds (IA)^3 and VeRA layers to the checkpoint's own tensors."""
    for name, config in (("ia3", IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])),
                         ("vera", VeraConfig(r=4, target_modules=["q_proj", "down_proj"]))):
        adapter = _save(tiny_llama, config, tmp_path / name, seed=3)
        out = ak.merge_checkpoint(tiny_llama, [adapter], tmp_path / f"merged-{name}", progress=False)
        with torch.no_grad():
            torch.testing.assert_close(load_hf(out)(input_ids=ids).logits, peft_logits(tiny_llama, adapter, ids),
                                       atol=1e-4, rtol=0)


def test_binding_leaves_the_read_adapter_unbound(tiny_llama, tmp_path):
    """bind_base_layers returns a copy: the same adapter object can be bound to several bases."""
    adapter = read_adapter(_save(tiny_llama, IA3Config(target_modules=["k_proj"], feedforward_modules=[]),
                                 tmp_path / "ia3"))
    engine = ak.Engine.from_pretrained(tiny_llama)
    bound = bind_base_layers(adapter, base_modules(engine.model).get)
    assert needs_base_layers(adapter) and not needs_base_layers(bound)
    with pytest.raises(AdapterMismatchError, match="does not exist"):
        bind_base_layers(adapter, {}.get)


# ----------------------------------------------------------------------------- refusals
def test_vera_without_saved_projections_is_refused(tiny_llama, tmp_path):
    adapter = _save(tiny_llama, VeraConfig(r=4, target_modules=["q_proj"], save_projection=False), tmp_path / "vera")
    with pytest.raises(UnsupportedAdapterError, match="save_projection"):
        read_adapter(adapter)


def test_vera_trained_biases_are_refused(tiny_gpt2, tmp_path):
    adapter = _save(tiny_gpt2, VeraConfig(r=4, target_modules=["c_attn"], bias="all"), tmp_path / "vera")
    with pytest.raises(UnsupportedAdapterError, match="bias='all'"):
        read_adapter(adapter)


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("config, field", [
    (LoHaConfig(r=2, target_modules=["conv"], use_effective_conv2d=True), "hada_t1"),
    (LoKrConfig(r=2, target_modules=["conv"], use_effective_conv2d=True), "lokr_w2"),
    (IA3Config(target_modules=["conv"], feedforward_modules=[]), "ia3_l"),
], ids=["loha", "lokr", "ia3"])
def test_convolution_layers_are_refused(tmp_path, config, field):
    model = get_peft_model(_ConvNet(), config)
    model.save_pretrained(str(tmp_path / "conv"))
    with pytest.raises(UnsupportedAdapterError, match=f"conv: {field}.*convolution"):
        read_adapter(tmp_path / "conv")


def test_loha_without_factors_is_refused_where_factors_are_needed(tiny_llama, tmp_path):
    """LoHa has no low-rank factors: rescaling at load and combining into a LoRA say so instead of guessing."""
    from adaptkit.merging.combine import combine_adapters

    adapter = _save(tiny_llama, LoHaConfig(r=2, alpha=4, target_modules=["q_proj"]), tmp_path / "loha")
    engine = ak.Engine.from_pretrained(tiny_llama)
    with pytest.raises(UnsupportedAdapterError, match="scale="):
        engine.add_adapter("t", adapter, scale=0.5)
    lora = make_peft_lora(tiny_llama, tmp_path / "lora")
    with pytest.raises(UnsupportedAdapterError, match="LOHA adapter cannot be combined into a LoRA"):
        combine_adapters([adapter, lora], progress=False)


def test_every_type_and_kind_in_one_batch(tiny_llama, tmp_path, ids):
    """Rows of LoHa, LoKr, (IA)^3, VeRA, AdaLoRA, a LoRA, a prefix and the bare base in one forward."""
    from peft import PrefixTuningConfig

    configs = {
        "loha": LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        "lokr": LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"]),
        "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "vera": VeraConfig(r=4, target_modules=["q_proj", "down_proj"]),
        "adalora": AdaLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], total_step=10),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    }
    batch = random_ids(batch=len(configs) + 2, length=9, seed=5)
    engine = ak.Engine.from_pretrained(tiny_llama)
    expected = {None: engine.logits(batch)}
    for i, (name, config) in enumerate(configs.items()):
        path = _save(tiny_llama, config, tmp_path / name, seed=i)
        expected[name] = peft_logits(tiny_llama, path, batch)[:, -batch.shape[1]:]
        engine.add_adapter(name, path)
    lora = make_peft_lora(tiny_llama, tmp_path / "lora", seed=9)
    expected["lora"] = peft_logits(tiny_llama, lora, batch)
    engine.add_adapter("lora", lora)
    rows = [*configs, "lora", None]
    mixed = engine.logits(batch, adapters=rows)
    for i, row in enumerate(rows):
        torch.testing.assert_close(mixed[i], expected[row][i], atol=1e-4, rtol=0, msg=str(row))
