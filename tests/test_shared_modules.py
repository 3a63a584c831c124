"""Two adapters on one module, of different forms: one adapter's LoRA on a layer, another's stored copy
of that layer or of the module around it (modules_to_save). Each row gets exactly what PEFT computes
for its adapter alone, whichever adapter was loaded first."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids

import adaptkit as ak


def peft_adapter(base_model_fn, out, seed, **config):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base_model_fn(), LoraConfig(r=4, lora_alpha=8, **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif "modules_to_save" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(str(out))
    return out


def peft_reference(base_model_fn, adapter, ids):
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model_fn(), str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def bert_cls(tmp_path_factory):
    from transformers import BertForSequenceClassification

    from adaptkit.demo import build_tokenizer, tiny_config

    folder = tmp_path_factory.mktemp("bertcls") / "base"
    config = tiny_config("bert")
    config.num_labels = 3
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(str(folder))
    build_tokenizer().save_pretrained(str(folder))
    return folder


def _loader(base, cls_name):
    import transformers

    cls = getattr(transformers, cls_name)
    return lambda: cls.from_pretrained(str(base), dtype=torch.float32, attn_implementation="eager").eval()


CASES = {
    "lm_head": ("tiny_llama", "AutoModelForCausalLM", {"target_modules": ["q_proj", "lm_head"]},
                {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
    "pooler": ("bert_cls", "BertForSequenceClassification", {"target_modules": ["query", "pooler.dense"]},
               {"target_modules": ["query"], "modules_to_save": ["pooler"]}),
    "pooler-dora": ("bert_cls", "BertForSequenceClassification",
                    {"target_modules": ["query", "pooler.dense"], "use_dora": True},
                    {"target_modules": ["query"], "modules_to_save": ["pooler"]}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("order", ["lora-first", "saved-first"])
def test_a_lora_and_a_stored_copy_of_the_same_module(case, order, request, tmp_path):
    base_name, cls_name, lora_config, saved_config = CASES[case]
    base = request.getfixturevalue(base_name)
    load = _loader(base, cls_name)
    lora = peft_adapter(load, tmp_path / "lora", 1, **lora_config)
    saved = peft_adapter(load, tmp_path / "saved", 2, **saved_config)
    ids = random_ids(batch=3)
    expected = {"lora": peft_reference(load, lora, ids), "saved": peft_reference(load, saved, ids)}
    with torch.no_grad():
        expected[None] = load()(input_ids=ids).logits
    engine = ak.Engine.from_pretrained(base)
    names = ["lora", "saved"] if order == "lora-first" else ["saved", "lora"]
    for name in names:
        engine.add_adapter(name, {"lora": lora, "saved": saved}[name])
    rows = ["lora", "saved", None]
    mixed = engine.logits(ids, adapters=rows)
    for i, row in enumerate(rows):
        torch.testing.assert_close(mixed[i], expected[row][i], atol=1e-4, rtol=0)
    for name in ("lora", "saved"):
        engine.merge(name)
        torch.testing.assert_close(engine.logits(ids, adapters=name), expected[name], atol=1e-4, rtol=0)
        engine.unmerge()
    torch.testing.assert_close(engine.logits(ids), expected[None], atol=1e-4, rtol=0)
