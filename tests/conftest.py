"""Shared fixtures: tiny random bases built locally (never downloaded) and PEFT-made adapters."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# Ray reads this once, when it is first imported, and transformers may import it before adaptkit does (its
# find_spec("ray.tune") imports ray): set here, the tests' local Ray instance stays on 127.0.0.1 whatever runs first
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

SHARED_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from adaptkit.demo import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("llama") / "base", "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    from adaptkit.demo import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("gpt2") / "base", "gpt2")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    from adaptkit.demo import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("bert") / "base", "bert")


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def causal_base(request, tiny_llama, tiny_gpt2) -> Path:
    """Each causal architecture in turn."""
    return {"llama": tiny_llama, "gpt2": tiny_gpt2}[request.param]


@pytest.fixture(params=["generic", "avx512bf16"])
def cpu_layout(request, monkeypatch) -> str:
    """4-bit layers built in the test get this bitsandbytes CPU layout, whatever this CPU (nf4_layouts.py)."""
    from nf4_layouts import force_layout

    return force_layout(request.param, monkeypatch)


def load_hf(base: Path):
    """The base as plain transformers loads it (fp32, eager attention, eval)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation="eager").eval()


def lora_targets(base: Path) -> list[str]:
    return ["c_attn", "c_fc"] if "gpt2" in str(base) else ["q_proj", "v_proj", "down_proj"]


def make_peft_lora(base: Path, out: Path, seed: int = 0, **config) -> Path:
    """A PEFT LoRA with non-zero random A and B (PEFT's own init makes B zero), saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    config.setdefault("target_modules", lora_targets(base))
    config.setdefault("r", 4)
    config.setdefault("lora_alpha", 8)
    if "gpt2" in str(base):
        config.setdefault("fan_in_fan_out", True)
    model = get_peft_model(load_hf(base), LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name or "lora_embedding_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif "lora_magnitude" in name:
                param.mul_(1 + 0.1 * torch.rand(param.shape, generator=gen))
            elif "modules_to_save" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(str(out))
    return out


def peft_logits(base: Path, adapter: Path, input_ids, merge: bool = False, **kwargs):
    """The reference: PEFT's logits for ``adapter`` on ``base``."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_hf(base), str(adapter)).eval()
    if merge:
        model = model.merge_and_unload()
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits


def random_ids(vocab: int = 320, batch: int = 2, length: int = 9, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=gen)
