"""Bases beyond Llama/GPT-2/BERT that PEFT serves: Gemma 3 (text), OPT, GPT-NeoX, Falcon (both
architectures). LoRA, prefix and prompt tuning against PEFT: unmerged, merged in place, merged into a
checkpoint plain transformers loads, and rows of different adapters in one batch equal to each alone."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids
from peft_checks import save_random_base

import adaptkit as ak
from adaptkit.errors import AdapterMismatchError

COMMON = dict(vocab_size=320, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _configs():
    from transformers import FalconConfig, Gemma3TextConfig, GPTNeoXConfig, OPTConfig

    return {
        "gemma3_text": (Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=16, sliding_window=4,
                                         max_position_embeddings=256, **COMMON), ["q_proj", "v_proj", "down_proj"]),
        "opt": (OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=256, word_embed_proj_dim=64, dropout=0.0, **COMMON),
                ["q_proj", "v_proj", "fc1"]),
        "gpt_neox": (GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=256, **COMMON), ["query_key_value", "dense_h_to_4h"]),
        "falcon": (FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True,
                                num_kv_heads=2, **COMMON), ["query_key_value", "dense_h_to_4h"]),
        "falcon_mq": (FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True, **COMMON),
                      ["query_key_value", "dense"]),
    }


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from transformers import AutoModelForCausalLM


    made = {}
    for name, (config, targets) in _configs().items():
        torch.manual_seed(0)
        made[name] = (save_random_base(AutoModelForCausalLM.from_config(config), tmp_path_factory.mktemp(name) / "base"),
                      targets)
    return made


def _load(base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation="eager").eval()


def _peft(base, config, out, seed):
    from peft import get_peft_model

    model = get_peft_model(_load(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "prompt_encoder" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    model.save_pretrained(str(out))
    return out


def _reference(base, adapter, ids):
    from peft import PeftModel

    with torch.no_grad():
        return PeftModel.from_pretrained(_load(base), str(adapter)).eval()(input_ids=ids).logits[:, -ids.shape[1]:]


@pytest.mark.parametrize("name", ["gemma3_text", "opt", "gpt_neox", "falcon", "falcon_mq"])
def test_lora_prefix_and_prompt_equal_peft(name, bases, tmp_path):
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig

    base, targets = bases[name]
    configs = {"lora": LoraConfig(r=4, lora_alpha=8, target_modules=targets),
               "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
               "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)}
    ids = random_ids(batch=4, length=9)
    with torch.no_grad():
        plain = _load(base)(input_ids=ids).logits
    engine = ak.Engine.from_pretrained(base)
    expected = {None: plain}
    for i, (kind, config) in enumerate(configs.items()):
        adapter = _peft(base, config, tmp_path / kind, seed=i)
        expected[kind] = _reference(base, adapter, ids)
        assert (expected[kind] - plain).abs().max() > 1e-2, kind  # the adapter changes the output
        engine.add_adapter(kind, adapter)
        torch.testing.assert_close(engine.logits(ids, adapters=kind), expected[kind], atol=1e-4, rtol=0)
    rows = [*configs, None][:4] + [None] * (4 - len(configs) - 1)
    mixed = engine.logits(ids, adapters=rows)
    for i, row in enumerate(rows):
        torch.testing.assert_close(mixed[i], expected[row][i], atol=1e-4, rtol=0)
    engine.merge("lora")
    torch.testing.assert_close(engine.logits(ids, adapters="lora"), expected["lora"], atol=1e-4, rtol=0)
    engine.unmerge()
    merged = ak.merge_checkpoint(base, [tmp_path / "lora"], tmp_path / "merged", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(_load(merged)(input_ids=ids).logits, expected["lora"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, cached_heads", [("falcon", 2), ("falcon_mq", 1)])
def test_a_prefix_with_every_head_is_refused_where_falcon_caches_fewer(name, cached_heads, bases, tmp_path):
    """A prefix laid out for every attention head (as PEFT laid them out for Falcon when transformers cached
    every head) fits neither Falcon layout: PEFT itself refuses to load it, and so does adaptkit, by name."""
    import json

    from peft import PeftModel, PrefixTuningConfig
    from safetensors.torch import load_file, save_file

    base, _ = bases[name]
    adapter = _peft(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5), tmp_path / "prefix", 0)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(num_attention_heads=4, token_dim=64, encoder_hidden_size=64)  # every head: 2 layers x 2 x 4 x 16
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    save_file({key: torch.randn(5, 256) for key in load_file(adapter / "adapter_model.safetensors")},
              adapter / "adapter_model.safetensors")
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(_load(base), str(adapter))
    engine = ak.Engine.from_pretrained(base)
    with pytest.raises(AdapterMismatchError, match=f"4 KV heads.*caches 2 layers x {cached_heads} KV heads"):
        engine.add_adapter("prefix", adapter)
    assert engine.adapters == {}
