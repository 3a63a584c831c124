"""Encoders with task heads (PEFT's SEQ_CLS and TOKEN_CLS): LoRA, prompt tuning and P-tuning, each
adapter with its own trained head (modules_to_save), on BERT, RoBERTa and DeBERTa-v2. Logits equal
PEFT's, rows of different adapters in one batch equal each alone (a row's prompt starts at position 0,
where the heads read), LoRA merges in place and into checkpoints, and ``Engine.classify`` /
``Engine.classify_tokens`` give PEFT's probabilities and labels."""

from __future__ import annotations

import pytest
import torch
from peft_checks import save_random_base, save_trained

import adaptkit as ak

LABELS = {0: "neg", 1: "neu", 2: "pos"}
FAMILIES = ("bert", "roberta", "deberta-v2", "xlm-roberta")
TASKS = {"SEQ_CLS": "ForSequenceClassification", "TOKEN_CLS": "ForTokenClassification"}


def _config(family: str):
    from transformers import BertConfig, DebertaV2Config, RobertaConfig, XLMRobertaConfig

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    if family == "bert":
        return BertConfig(pad_token_id=0, **common)
    if family in ("roberta", "xlm-roberta"):
        config_cls = RobertaConfig if family == "roberta" else XLMRobertaConfig
        return config_cls(pad_token_id=0, bos_token_id=1, eos_token_id=2, **common)
    return DebertaV2Config(pad_token_id=0, relative_attention=True, position_buckets=16, max_relative_positions=32,
                           pos_att_type=["c2p", "p2c"], **common)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    import transformers


    made = {}
    for family in FAMILIES:
        for task, suffix in TASKS.items():
            folder = tmp_path_factory.mktemp(f"{family}-{task}") / "base"
            prefix = {"bert": "Bert", "roberta": "Roberta", "deberta-v2": "DebertaV2", "xlm-roberta": "XLMRoberta"}[family]
            cls = getattr(transformers, prefix + suffix)
            torch.manual_seed(0)
            made[family, task] = (save_random_base(cls(_config(family)), folder), cls)
    return made


def _peft_configs(task: str, family: str):
    from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    targets = ["query_proj", "value_proj"] if family == "deberta-v2" else ["query", "value"]
    configs = {"lora": LoraConfig(task_type=task, r=4, lora_alpha=8, target_modules=targets),
               "prompt": PromptTuningConfig(task_type=task, num_virtual_tokens=5),
               "ptuning": PromptEncoderConfig(task_type=task, num_virtual_tokens=3, encoder_hidden_size=32)}
    if family != "deberta-v2":  # DeBERTa's attention takes no extra keys and values (PEFT cannot prefix it either)
        configs["prefix"] = PrefixTuningConfig(task_type=task, num_virtual_tokens=4)  # P-tuning v2 on encoders
    return configs


@pytest.fixture(autouse=True)
def peft_sees_the_cache_argument(monkeypatch):
    """PEFT 0.21 looks for a ``past_key_values`` parameter in the model's signature before it prefixes an
    encoder; transformers 5 encoders take it through ``**kwargs`` (as ``cache``). Show PEFT the parameter,
    so that its own prefix-tuning path runs as the reference."""
    import transformers

    for family in ("Bert", "Roberta", "XLMRoberta"):
        for suffix in TASKS.values():
            cls = getattr(transformers, family + suffix)
            original = cls.forward

            def forward(self, input_ids=None, attention_mask=None, past_key_values=None, _original=original, **kwargs):
                return _original(self, input_ids=input_ids, attention_mask=attention_mask,
                                 past_key_values=past_key_values, **kwargs)

            monkeypatch.setattr(cls, "forward", forward)


def _make(cls, base, config, out, seed):
    from peft import get_peft_model

    model = get_peft_model(cls.from_pretrained(str(base), attn_implementation="eager").eval(), config)
    return save_trained(model, out, seed, std=0.2)  # the adapter and its head


def _reference(cls, base, adapter, ids, mask, virtual):
    from peft import PeftModel

    model = PeftModel.from_pretrained(cls.from_pretrained(str(base), attn_implementation="eager").eval(), str(adapter))
    with torch.no_grad():
        logits = model.eval()(input_ids=ids, attention_mask=mask).logits
    return logits[:, virtual:] if logits.ndim == 3 else logits  # token heads: PEFT keeps the virtual positions


TEXTS = ["the quick brown fox", "SELECT name", "adaptkit serves many adapters over one base model", "LoRA"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", list(TASKS))
def test_heads_equal_peft_per_row(family, task, bases, tmp_path):
    base, cls = bases[family, task]
    engine = ak.Engine.from_pretrained(base)
    batch = engine.tokenizer(TEXTS, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        expected = {None: cls.from_pretrained(str(base), attn_implementation="eager").eval()(
            input_ids=ids, attention_mask=mask).logits}
    for i, (kind, config) in enumerate(_peft_configs(task, family).items()):
        adapter = _make(cls, base, config, tmp_path / kind, seed=i)
        virtual = getattr(config, "num_virtual_tokens", 0) if kind in ("prompt", "ptuning") else 0  # prefix: a cache
        expected[kind] = _reference(cls, base, adapter, ids, mask, virtual)
        engine.add_adapter(kind, adapter)
        got = engine.logits(ids, mask, adapters=kind)
        real = mask.bool() if got.ndim == 3 else slice(None)  # padding positions are not compared
        torch.testing.assert_close(got[real], expected[kind][real], atol=1e-4, rtol=0, msg=kind)
    rows = ["lora", "prompt", "ptuning", "prefix" if "prefix" in expected else None]
    mixed = engine.logits(ids, mask, adapters=rows)
    for i, row in enumerate(rows):
        keep = mask[i].bool() if mixed.ndim == 3 else slice(None)
        torch.testing.assert_close(mixed[i][keep], expected[row][i][keep], atol=1e-4, rtol=0, msg=str(row))
    if task == "SEQ_CLS":
        probs = engine.classify(TEXTS, adapter=rows)
        for i, row in enumerate(rows):
            wanted = expected[row][i].softmax(-1)
            assert list(probs[i]) == ["neg", "neu", "pos"]
            assert max(abs(probs[i][LABELS[k]] - float(wanted[k])) for k in LABELS) < 1e-5
    else:
        tokens = engine.classify_tokens(TEXTS, adapter="prompt")
        offsets = engine.tokenizer(TEXTS, return_offsets_mapping=True)["offset_mapping"]
        for i, text in enumerate(TEXTS):
            spans = [(s, e) for s, e in offsets[i] if e > s]
            assert [(t["start"], t["end"]) for t in tokens[i]] == spans
            assert "".join(t["text"] for t in tokens[i]).replace(" ", "") == text.replace(" ", "")
            predicted = expected["prompt"][i].argmax(-1)
            positions = [j for j, (s, e) in enumerate(offsets[i]) if e > s]
            assert [t["label"] for t in tokens[i]] == [LABELS[int(predicted[j])] for j in positions]
    engine.merge("lora")
    merged_logits = engine.logits(ids, mask, adapters="lora")
    engine.unmerge()
    real = mask.bool() if merged_logits.ndim == 3 else slice(None)
    torch.testing.assert_close(merged_logits[real], expected["lora"][real], atol=1e-4, rtol=0)
    out = ak.merge_checkpoint(base, [tmp_path / "lora"], tmp_path / "merged", progress=False)
    with torch.no_grad():
        plain = cls.from_pretrained(str(out), attn_implementation="eager").eval()(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(plain.logits[real], expected["lora"][real], atol=1e-4, rtol=0)


def test_a_prefix_is_refused_on_deberta(bases, tmp_path):
    from peft import PrefixTuningConfig

    from adaptkit.errors import UnsupportedAdapterError

    base, cls = bases["deberta-v2", "SEQ_CLS"]
    adapter = _make(cls, base, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4), tmp_path / "prefix", 0)
    with pytest.raises(UnsupportedAdapterError, match="deberta-v2 encoder.s attention takes no key/value cache"):
        ak.Engine.from_pretrained(base).add_adapter("prefix", adapter)


def test_classify_names_a_missing_head(tiny_bert):
    from adaptkit.errors import UnsupportedAdapterError

    engine = ak.Engine.from_pretrained(tiny_bert)
    with pytest.raises(UnsupportedAdapterError, match="ForTokenClassification head"):
        engine.classify_tokens(["x"])
