"""Combining adapters in delta-weight space: exact linear, svd, ties, dare_*, magnitude_prune.

The reference deltas ``dW_i`` come from PEFT's own ``get_delta_weight`` (scale, rsLoRA and patterns
computed by PEFT, not by adaptkit); the reference methods below are written from the papers, entry by
entry, independently of ``adaptkit.merging.methods``. mergekit, when installed, is a second reference.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import load_hf, make_peft_lora, random_ids

import adaptkit as ak
from adaptkit.cli.main import main
from adaptkit.errors import AdapterMismatchError, InvalidArgumentError, UnsupportedAdapterError
from adaptkit.formats.peft import read_lora
from adaptkit.merging.combine import combine_adapters

WEIGHTS = [0.7, -0.3, 0.5]


@pytest.fixture(scope="module")
def three(tiny_llama, tmp_path_factory):
    """Different ranks, targets, rsLoRA and rank/alpha patterns: every way the scale can differ."""
    root = tmp_path_factory.mktemp("three")
    a = make_peft_lora(tiny_llama, root / "a", seed=1)  # r=4, alpha=8: q, v, down
    b = make_peft_lora(tiny_llama, root / "b", seed=2, r=8, lora_alpha=4, use_rslora=True,
                       target_modules=["q_proj", "o_proj"])
    c = make_peft_lora(tiny_llama, root / "c", seed=3, r=6, lora_alpha=12, target_modules=["q_proj", "v_proj", "up_proj"],
                       rank_pattern={"v_proj": 2}, alpha_pattern={"up_proj": 30})
    return [a, b, c]


def peft_deltas(base, paths) -> list[dict[str, torch.Tensor]]:
    """Per adapter, {module: dW} as PEFT computes it (``get_delta_weight``, [out, in] for nn.Linear)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_hf(base), str(paths[0]), adapter_name="a0")
    for i, path in enumerate(paths[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{i}")
    out = [{} for _ in paths]
    with torch.no_grad():
        for name, module in model.base_model.model.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "lora_A"):
                for i in range(len(paths)):
                    if f"a{i}" in module.lora_A:
                        out[i][name] = module.get_delta_weight(f"a{i}").float().clone()
    return out


@pytest.fixture(scope="module")
def deltas(tiny_llama, three):
    return peft_deltas(tiny_llama, three)


def _sum(deltas, weights, module):
    return sum(w * d[module] for d, w in zip(deltas, weights) if module in d)


def _rel(got, want):
    return float((got - want).norm() / want.norm())


# ----------------------------------------------------------------- reference methods (from the papers)
def ref_seed(seed: int, key: str, index: int) -> int:
    """The documented seeding rule: sha256 of ``"{seed}/{key}/{index}"``, first 8 bytes, 63 bits."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}/{index}".encode()).digest()[:8], "little") & (2**63 - 1)


def ref_trim(x: np.ndarray, density: float) -> np.ndarray:
    """Keep the k = max(1, int(density * n)) largest |x|."""
    flat = x.ravel()
    k = max(1, int(density * flat.size))
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(x.shape)


def ref_dare(x: np.ndarray, density: float, seed: int) -> np.ndarray:
    """DARE: keep each entry with probability density (Bernoulli from a seeded torch generator), rescale 1/density."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.bernoulli(torch.full(x.shape, density), generator=gen).numpy()
    return x * mask / density


def ref_disjoint(tasks: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """TIES steps 2-3, entry by entry: elected sign of sum_i w_i t_i, weighted mean of the agreeing entries."""
    out = np.zeros_like(tasks[0])
    for idx in np.ndindex(out.shape):
        values = [w * t[idx] for t, w in zip(tasks, weights)]
        sign = 1.0 if sum(values) >= 0 else -1.0
        agree = [(v, w) for v, w in zip(values, weights) if np.sign(v) == sign]
        if agree:
            out[idx] = sum(v for v, _ in agree) / sum(w for _, w in agree)
    return out


def reference(method, tasks, weights, density, key, indices, seed=0):
    tasks = [t.numpy().astype(np.float64) for t in tasks]
    if method == "ties":
        return ref_disjoint([ref_trim(t, density) for t in tasks], weights)
    if method == "magnitude_prune":
        return sum(w * ref_trim(t, density) for t, w in zip(tasks, weights))
    dropped = [ref_dare(t, density, ref_seed(seed, key, i)) for t, i in zip(tasks, indices)]
    if method == "dare_linear":
        return sum(w * t for t, w in zip(dropped, weights))
    return ref_disjoint(dropped, weights)  # dare_ties


# ----------------------------------------------------------------- linear: exact
def test_linear_adapter_equals_weighted_sum_of_deltas(three, deltas, tmp_path):
    res = combine_adapters(three, WEIGHTS, "linear", out=tmp_path / "combined", progress=False)
    assert res.exact
    back = read_lora(tmp_path / "combined")  # what was written, read back
    modules = set().union(*deltas)
    assert set(back.layers) == modules
    for module in modules:
        rel = _rel(back.layers[module].delta_weight(), _sum(deltas, WEIGHTS, module))
        assert rel <= 1e-6, (module, rel)
    # ranks concatenate: q_proj is in all three (4 + 8 + 6), v_proj in a and c (4 + 2 from rank_pattern)
    assert back.layers["model.layers.0.self_attn.q_proj"].rank == 18
    assert back.layers["model.layers.1.self_attn.v_proj"].rank == 6


def test_linear_adapter_loads_in_peft_and_engine_like_mix(tiny_llama, three, deltas, tmp_path):
    from peft import PeftModel

    out = combine_adapters(three, WEIGHTS, out=tmp_path / "combined", progress=False).path
    ids = random_ids(seed=5)
    reference = load_hf(tiny_llama)
    with torch.no_grad():
        for module in set().union(*deltas):
            reference.get_submodule(module).weight += _sum(deltas, WEIGHTS, module)
        expected = reference(input_ids=ids).logits
        peft = PeftModel.from_pretrained(load_hf(tiny_llama), str(out)).eval()(input_ids=ids).logits
    torch.testing.assert_close(peft, expected, atol=1e-4, rtol=0)

    engine = ak.Engine.from_pretrained(tiny_llama)
    for i, path in enumerate(three):
        engine.add_adapter(f"a{i}", path)
    engine.add_adapter("combined", out)
    mix = engine.logits(ids, adapters=ak.Mix({f"a{i}": w for i, w in enumerate(WEIGHTS)}))
    torch.testing.assert_close(engine.logits(ids, adapters="combined"), mix, atol=1e-4, rtol=0)
    torch.testing.assert_close(mix, expected, atol=1e-4, rtol=0)


def test_linear_merged_checkpoint_equals_engine_mix(causal_base, tmp_path):
    """GPT-2 too: Conv1D stores [in, out]; rsLoRA and a different rank in the second adapter."""
    from adaptkit.merging.checkpoint import verify_merged_checkpoint

    a = make_peft_lora(causal_base, tmp_path / "a", seed=7)
    b = make_peft_lora(causal_base, tmp_path / "b", seed=8, r=8, use_rslora=True)
    out = ak.merge_checkpoint(causal_base, [a, b], tmp_path / "merged", weights=[0.6, -0.4], method="task_arithmetic",
                              progress=False)
    assert verify_merged_checkpoint(causal_base, [a, b], out, weights=[0.6, -0.4]) <= 1e-4


# ----------------------------------------------------------------- ties / dare / magnitude_prune
def _checkpoint_deltas(base, merged):
    from safetensors.torch import load_file

    before, after = load_file(str(base / "model.safetensors")), load_file(str(merged / "model.safetensors"))
    return {k[: -len(".weight")]: after[k] - before[k] for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("method, density", [("ties", 0.4), ("magnitude_prune", 0.3), ("dare_linear", 0.6),
                                             ("dare_ties", 0.5)])
def test_sparse_methods_match_reference(method, density, tiny_llama, three, deltas, tmp_path):
    weights = [0.7, 0.3, 0.5]  # ties-family methods elect signs: positive weights
    seed = 3 if "dare" in method else None
    merged = ak.merge_checkpoint(tiny_llama, three, tmp_path / "merged", weights=weights, method=method,
                                 density=density, seed=seed, progress=False)
    got = _checkpoint_deltas(tiny_llama, merged)
    assert set(got) == set().union(*deltas)
    # as an adapter, factored at full rank (64 for these layers): the same masks, so the same deltas
    combined = combine_adapters(three, weights, method, density=density, seed=seed, rank=64,
                                progress=False) if method == "dare_ties" else None
    for module in sorted(got):
        parts = [(d[module], w, i) for i, (d, w) in enumerate(zip(deltas, weights)) if module in d]
        want = torch.from_numpy(reference(method, [p[0] for p in parts], [p[1] for p in parts], density,
                                          f"{module}.weight", [p[2] for p in parts], seed=3)).float()
        torch.testing.assert_close(got[module], want, atol=2e-6, rtol=0)  # W + d - W: fp32 rounding of |W| ~ 0.3
        if combined is not None:
            torch.testing.assert_close(combined.adapter.layers[module].delta_weight(), want, atol=2e-6, rtol=0)
            assert combined.energy[module] == pytest.approx(1.0, abs=1e-6)


def test_sparse_methods_actually_sparsify(deltas):
    from adaptkit.merging.methods import make_method

    module = "model.layers.0.self_attn.q_proj"
    tasks = [d[module] for d in deltas]
    pruned = make_method("magnitude_prune", density=0.25).combine(tasks[:1], [1.0], module, [0])
    assert float((pruned != 0).float().mean()) == pytest.approx(0.25, abs=0.01)

    def dare(seed):
        return make_method("dare_linear", density=0.5, seed=seed).combine(tasks, [1, 1, 1], module, [0, 1, 2])

    kept = make_method("dare_linear", density=0.5, seed=1).combine(tasks[:1], [1.0], module, [0]) != 0
    assert float(kept.float().mean()) == pytest.approx(0.5, abs=0.03)  # Bernoulli(0.5) over 4096 entries
    torch.testing.assert_close(dare(1), dare(1), atol=0, rtol=0)  # seeded
    assert (dare(1) - dare(2)).abs().max() > 1e-3


def test_mergekit_agrees_on_deterministic_methods(deltas):
    """mergekit's own kernels on the same deltas (base 0, so W + d - W is exact)."""
    mergekit = pytest.importorskip("mergekit.merge_methods")
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
    from mergekit.sparsify import SparsificationMethod

    from adaptkit.merging.methods import make_method

    prune = GeneralizedTaskArithmeticMerge(consensus_method=None, sparsification_method=SparsificationMethod.magnitude,
                                           default_normalize=False, default_rescale=False, method_name="magnitude_prune",
                                           method_pretty_name=None, method_reference_url=None)
    module = "model.layers.1.self_attn.q_proj"
    tasks, weights = [d[module] for d in deltas], [0.7, 0.3, 0.5]
    for ours, theirs, params in (("ties", "ties", {"density": 0.4}), ("magnitude_prune", prune, {"density": 0.3}),
                                 ("task_arithmetic", "task_arithmetic", {})):
        expected = mergekit.merge_tensors([torch.zeros_like(tasks[0]), *tasks], theirs, base_index=0,
                                          parameters={"weight": weights, **params})
        got = make_method(ours, **params).combine(tasks, weights, module, [0, 1, 2])
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


# ----------------------------------------------------------------- svd
def test_svd_truncates_and_reports_energy(three, deltas, tiny_llama, tmp_path):
    res = combine_adapters(three, WEIGHTS, "svd", rank=5, out=tmp_path / "svd", progress=False)
    for module in set().union(*deltas):
        full = _sum(deltas, WEIGHTS, module).double()
        u, s, vh = torch.linalg.svd(full)
        best = (u[:, :5] * s[:5]) @ vh[:5]
        assert res.energy[module] == pytest.approx(float(s[:5].square().sum() / s.square().sum()), abs=1e-6)
        torch.testing.assert_close(res.adapter.layers[module].delta_weight().double(), best, atol=1e-5, rtol=0)
        assert res.adapter.layers[module].rank == min(5, int((s > 1e-6 * s[0]).sum()))  # down_proj: only a, r=4
    merged = ak.merge_checkpoint(tiny_llama, three, tmp_path / "merged", weights=WEIGHTS, method="svd", rank=5,
                                 progress=False)
    record = json.loads((merged / "adaptkit_merge.json").read_text())["adaptkit_merge"]
    assert record["method_params"] == {"rank": 5}
    for module, energy in res.energy.items():
        assert record["energy_kept"][f"{module}.weight"] == pytest.approx(energy, abs=1e-9)


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(weights=[0.0, 0.0, 0.0]), InvalidArgumentError, "all merge weights are zero"),
    (dict(weights=[float("nan"), 1.0, 1.0]), InvalidArgumentError, "finite"),
    (dict(method="slerp"), InvalidArgumentError, "known methods: dare_linear, dare_ties, linear, magnitude_prune, svd"),
    (dict(method="ties", density=0.0), InvalidArgumentError, r"density must be in \(0, 1\]"),
    (dict(method="ties", density=1.5), InvalidArgumentError, r"density must be in \(0, 1\]"),
    (dict(method="dare_ties", density=float("nan")), InvalidArgumentError, r"density must be in \(0, 1\]"),
    (dict(method="ties"), InvalidArgumentError, "needs density"),
    (dict(method="ties", density=0.5, weights=[1.0, -1.0, 1.0]), InvalidArgumentError, "weights must be positive"),
    (dict(method="linear", rank=4), InvalidArgumentError, "use method 'svd'"),
    (dict(method="linear", density=0.5), InvalidArgumentError, "does not take density"),
])
def test_bad_arguments_are_refused_and_nothing_is_written(kwargs, error, match, three, tiny_llama, tmp_path):
    weights = kwargs.pop("weights", None)
    with pytest.raises(error, match=match):
        combine_adapters(three, weights, out=tmp_path / "out", progress=False, **kwargs)
    if "rank" not in kwargs:  # rank is a combine-only argument
        with pytest.raises(error, match=match):
            ak.merge_checkpoint(tiny_llama, three, tmp_path / "merged", weights=weights, progress=False, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_mismatched_bases_and_dora_are_refused(three, tiny_llama, tiny_gpt2, tmp_path):
    gpt2 = make_peft_lora(tiny_gpt2, tmp_path / "gpt2", seed=4)
    with pytest.raises(AdapterMismatchError, match="different"):
        combine_adapters([three[0], gpt2], out=tmp_path / "out", progress=False)
    wide = tmp_path / "wide"
    from adaptkit.demo import build_tiny_model

    other = build_tiny_model(tmp_path / "other", "llama", hidden_size=32, intermediate_size=64)
    make_peft_lora(other, wide, seed=5)
    with pytest.raises(AdapterMismatchError, match=r"\[out, in\]"):
        combine_adapters([three[0], wide], out=tmp_path / "out", progress=False)
    dora = make_peft_lora(tiny_llama, tmp_path / "dora", seed=6, use_dora=True)
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        combine_adapters([three[0], dora], out=tmp_path / "out", progress=False)
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        ak.merge_checkpoint(tiny_llama, [dora], tmp_path / "merged", method="ties", density=0.5, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


# ----------------------------------------------------------------- CLI
def test_cli_into_adapter(three, deltas, tmp_path):
    result = CliRunner().invoke(main, ["merge", *map(str, three), "--into-adapter", str(tmp_path / "out"),
                                       "--weights", "0.7,-0.3,0.5", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "exact" in result.output
    back = read_lora(tmp_path / "out")
    module = "model.layers.1.mlp.down_proj"
    assert _rel(back.layers[module].delta_weight(), _sum(deltas, WEIGHTS, module)) <= 1e-6

    result = CliRunner().invoke(main, ["merge", *map(str, three), "--into-adapter", str(tmp_path / "svd"),
                                       "--method", "svd", "--rank", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "energy kept" in result.output and "model.layers.0.self_attn.q_proj" in result.output

    result = CliRunner().invoke(main, ["merge", *map(str, three), "--into-adapter", str(tmp_path / "bad"),
                                       "--method", "nope"])
    assert result.exit_code == 1 and "known methods" in result.output and not (tmp_path / "bad").exists()
    result = CliRunner().invoke(main, ["merge", *map(str, three), "--into-adapter", str(tmp_path / "bad"),
                                       "--dtype", "bfloat16"])
    assert result.exit_code == 2 and "drop --dtype" in result.output and not (tmp_path / "bad").exists()
