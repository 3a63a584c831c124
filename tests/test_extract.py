"""LoRA extraction from a fine-tuned checkpoint: exact at full rank, Eckart-Young energy at low rank."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import load_hf, random_ids

import adaptkit as ak
from adaptkit.cli.main import main
from adaptkit.errors import AdapterMismatchError, InvalidArgumentError, OutputExistsError
from adaptkit.formats.peft import read_lora
from adaptkit.merging.extract import extract_lora


def _fine_tune(base, out, seed, shard=None):
    """A 'fully fine-tuned' copy: dense (full-rank) noise on every block weight, and one norm changed."""
    model = load_hf(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and (".layers." in name or ".h." in name):
                param.add_(0.02 * torch.randn(param.shape, generator=gen))
        norm = next(p for n, p in model.named_parameters() if n.endswith(("input_layernorm.weight", "ln_1.weight")))
        norm.mul_(1.1)
    model.save_pretrained(str(out), **({"max_shard_size": shard} if shard else {}))
    return out


@pytest.fixture(scope="module")
def llama_ft(tiny_llama, tmp_path_factory):
    return _fine_tune(tiny_llama, tmp_path_factory.mktemp("ft") / "llama-ft", seed=1, shard="100KB")


def _state(folder):
    from adaptkit.formats.checkpoint import open_checkpoint

    return {k: v for _, tensors in open_checkpoint(folder).iter_shards() for k, v in tensors.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_rank_reconstructs_the_fine_tuned_weights(arch, tiny_llama, tiny_gpt2, llama_ft, tmp_path):
    base = tiny_llama if arch == "llama" else tiny_gpt2
    ft = llama_ft if arch == "llama" else _fine_tune(tiny_gpt2, tmp_path / "gpt2-ft", seed=2)
    assert arch == "gpt2" or len(list(ft.glob("model-*.safetensors"))) > 1  # streaming over several shards
    res = extract_lora(ft, base, rank=64, out=tmp_path / "lora", progress=False)  # 64 = min(out, in) everywhere
    assert all(e == pytest.approx(1.0, abs=1e-6) for e in res.energy.values())
    merged = ak.merge_checkpoint(base, [tmp_path / "lora"], tmp_path / "merged", progress=False)
    want, got, before = _state(ft), _state(merged), _state(base)
    targets = [k for k in want if k.removesuffix(".weight") in res.energy]
    assert len(targets) == (14 if arch == "llama" else 8)  # every linear weight of the blocks (GPT-2: Conv1D)
    for key in targets:
        rel = float((got[key] - want[key]).norm() / (want[key] - before[key]).norm())
        assert rel <= 1e-5, (key, rel)  # relative to the fine-tuning difference, the stricter measure
    norm = next(k for k in want if k.endswith(("input_layernorm.weight", "ln_1.weight")))
    assert res.other_changes == {norm: pytest.approx(0.1, rel=1e-4)}  # reported, not carried
    if arch == "llama":  # PEFT loads the extracted LoRA and gives the fine-tuned model's logits
        from peft import PeftModel

        ids = random_ids(seed=3)
        with torch.no_grad():
            peft = PeftModel.from_pretrained(load_hf(base), str(tmp_path / "lora")).eval()(input_ids=ids).logits
            reference = load_hf(ft)
            reference.get_submodule(norm.removesuffix(".weight")).weight.copy_(before[norm])  # what a LoRA can carry
            torch.testing.assert_close(peft, reference(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_low_rank_energy_matches_singular_values(tiny_llama, llama_ft, tmp_path):
    res = extract_lora(llama_ft, tiny_llama, rank=4, out=tmp_path / "lora", targets=["q_proj", "k_proj", "down_proj"],
                       progress=False)
    want, before = _state(llama_ft), _state(tiny_llama)
    assert sorted({m.rpartition(".")[2] for m in res.energy}) == ["down_proj", "k_proj", "q_proj"]
    back = read_lora(tmp_path / "lora")
    assert back.config.target_modules == ("down_proj", "k_proj", "q_proj")
    for module, energy in res.energy.items():
        diff = (want[f"{module}.weight"] - before[f"{module}.weight"]).double()
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        assert energy == pytest.approx(float(s[:4].square().sum() / s.square().sum()), abs=1e-6)
        assert 0.05 < energy < 0.5  # dense noise: a rank-4 slice keeps a small share
        best = (u[:, :4] * s[:4]) @ vh[:4]
        torch.testing.assert_close(back.layers[module].delta_weight().double(), best, atol=1e-5, rtol=0)
        assert back.layers[module].rank == 4


def test_cli_extract_prints_energy_per_layer(tiny_llama, llama_ft, tmp_path):
    result = CliRunner().invoke(main, ["extract", str(llama_ft), "--base", str(tiny_llama), "--rank", "8",
                                       "-o", str(tmp_path / "lora"), "--targets", "v_proj,o_proj", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "model.layers.1.self_attn.o_proj" in result.output and "energy" in result.output
    assert "not carried" in result.output  # the changed norm is reported
    assert set(read_lora(tmp_path / "lora").layers) == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1)
                                                         for p in ("v_proj", "o_proj")}


def test_bad_extraction_input_writes_nothing(tiny_llama, tiny_gpt2, llama_ft, tmp_path):
    with pytest.raises(AdapterMismatchError, match="not a fine-tune of"):
        extract_lora(llama_ft, tiny_gpt2, rank=4, out=tmp_path / "a", progress=False)
    from adaptkit.demo import build_tiny_model

    narrow = build_tiny_model(tmp_path / "narrow", "llama", intermediate_size=96)
    with pytest.raises(AdapterMismatchError, match="different tensors"):
        extract_lora(llama_ft, narrow, rank=4, out=tmp_path / "b", progress=False)
    with pytest.raises(InvalidArgumentError, match="rank must be an integer >= 1"):
        extract_lora(llama_ft, tiny_llama, rank=0, out=tmp_path / "c", progress=False)
    with pytest.raises(InvalidArgumentError, match="known: down_proj, gate_proj"):
        extract_lora(llama_ft, tiny_llama, rank=4, out=tmp_path / "d", targets=["c_attn"], progress=False)
    with pytest.raises(InvalidArgumentError, match="no difference"):
        extract_lora(tiny_llama, tiny_llama, rank=4, out=tmp_path / "e", progress=False)
    (tmp_path / "f").mkdir()
    with pytest.raises(OutputExistsError, match="--force"):
        extract_lora(llama_ft, tiny_llama, rank=4, out=tmp_path / "f", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "narrow"]
