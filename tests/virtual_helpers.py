"""PEFT-made prefix / prompt adapters with random weights, and PEFT references, for the prefix and prompt tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import load_hf
from safetensors.torch import save_file

# method -> (PEFT config class name, extra config)
PEFT_METHODS = {
    "prefix": ("PrefixTuningConfig", {}),  # P-tuning v2: the K/V trained directly
    "prefix_mlp": ("PrefixTuningConfig", {"prefix_projection": True, "encoder_hidden_size": 24}),
    "prompt": ("PromptTuningConfig", {}),
    "ptuning_mlp": ("PromptEncoderConfig", {"encoder_hidden_size": 20}),
    "ptuning_lstm": ("PromptEncoderConfig", {"encoder_hidden_size": 20, "encoder_reparameterization_type": "LSTM"}),
}


def peft_virtual_model(base: Path, method: str, seed: int = 0, num_virtual_tokens: int = 5, task_type="CAUSAL_LM",
                       model=None, **config):
    """A PEFT prompt-learning model whose encoder weights are random (scale 0.5), so outputs differ from the base."""
    import peft

    cls_name, extra = PEFT_METHODS[method]
    peft_config = getattr(peft, cls_name)(task_type=task_type, num_virtual_tokens=num_virtual_tokens, **extra, **config)
    model = peft.get_peft_model(load_hf(base) if model is None else model, peft_config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "prompt_encoder" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return model.eval()


def make_peft_virtual(base: Path, out: Path, method: str, seed: int = 0, **config) -> Path:
    """Save a random PEFT prefix/prompt adapter (PEFT writes the folded ``prompt_embeddings``)."""
    peft_virtual_model(base, method, seed, **config).save_pretrained(str(out))
    return out


def save_encoder_checkpoint(model, folded_dir: Path, out: Path) -> Path:
    """adaptkit's training form: the PEFT config plus the *unfolded* encoder (``prompt_encoder.default.*``)."""
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((folded_dir / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(config))
    state = {f"prompt_encoder.default.{k}": v.detach().clone().contiguous()
             for k, v in model.prompt_encoder["default"].state_dict().items()}
    save_file(state, str(out / "adapter_model.safetensors"))
    return out


def load_peft(base: Path, adapter: Path, model=None):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_hf(base) if model is None else model, str(adapter)).eval()


@torch.no_grad()
def peft_real_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """PEFT's logits at the caller's token positions (prompt methods also return the virtual ones first)."""
    return model(input_ids=input_ids).logits[:, -input_ids.shape[1] :]


@torch.no_grad()
def peft_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding by re-running PEFT's forward on the whole sequence each step.

    The reference for generation: PEFT 0.21.2's own ``generate`` with transformers 5.24 drops the
    prefix/prompt after the first step (it injects ``past_key_values``, which transformers renamed
    ``cache``), and with ``use_cache=False`` it offsets Llama prefix positions twice.
    """
    seq = torch.tensor([prompt])
    for _ in range(steps):
        token = model(input_ids=seq).logits[0, -1].argmax()
        seq = torch.cat([seq, token.view(1, 1)], dim=1)
    return seq[0, len(prompt) :].tolist()
