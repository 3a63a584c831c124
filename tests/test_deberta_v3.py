"""DeBERTa-v3 as published (relative attention with c2p and p2c, ``share_att_key``: the relative-position
embeddings go through ``query_proj`` and ``key_proj``, a tensor that is not the batch's rows). SEQ_CLS and
TOKEN_CLS LoRAs on query/key/value with their heads: equal to PEFT, rows of different adapters (and none)
in one batch equal each alone (such batches run one forward per entry), merged in place and into a
checkpoint plain transformers loads."""

from __future__ import annotations

import pytest
import torch
from peft_checks import save_random_base, save_trained
from test_encoder_heads import LABELS, TASKS, TEXTS

import adaptkit as ak


@pytest.fixture(scope="module", params=list(TASKS))
def deberta_v3(request, tmp_path_factory):
    import transformers
    from peft import LoraConfig, get_peft_model

    config = transformers.DebertaV2Config(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
        relative_attention=True, pos_att_type=["p2c", "c2p"], share_att_key=True, position_buckets=256,
        norm_rel_ebd="layer_norm", max_relative_positions=-1, position_biased_input=False,
        id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    cls = getattr(transformers, "DebertaV2" + TASKS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    base = save_random_base(cls(config), folder / "base")
    adapters = {}
    for i, name in enumerate(("a", "b")):
        model = get_peft_model(cls.from_pretrained(str(base), attn_implementation="eager").eval(),
                               LoraConfig(task_type=request.param, r=4, lora_alpha=8,
                                          target_modules=["query_proj", "key_proj", "value_proj"]))
        adapters[name] = save_trained(model, folder / name, seed=i, std=0.2)
    return base, cls, adapters


def _peft(cls, base, adapter, ids, mask):
    from peft import PeftModel

    model = cls.from_pretrained(str(base), attn_implementation="eager").eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_lora_on_deberta_v3_equals_peft_per_row(deberta_v3, tmp_path):
    base, cls, adapters = deberta_v3
    engine = ak.Engine.from_pretrained(base)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    batch = engine.tokenizer(TEXTS, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    expected = {name: _peft(cls, base, path, ids, mask) for name, path in [*adapters.items(), (None, None)]}
    real = mask.bool() if expected[None].ndim == 3 else slice(None)
    assert (expected["a"][real] - expected[None][real]).abs().max() > 1e-2  # the adapter changes the output
    for name in adapters:
        torch.testing.assert_close(engine.logits(ids, mask, adapters=name)[real], expected[name][real], atol=1e-4, rtol=0)
    rows = ["a", None, "b", "a"]
    mixed = engine.logits(ids, mask, adapters=rows)
    for i, row in enumerate(rows):
        keep = mask[i].bool() if mixed.ndim == 3 else slice(None)
        torch.testing.assert_close(mixed[i][keep], expected[row][i][keep], atol=1e-5, rtol=0, msg=str(row))
    engine.merge("a")
    torch.testing.assert_close(engine.logits(ids, mask, adapters="a")[real], expected["a"][real], atol=1e-4, rtol=0)
    engine.unmerge()
    out = ak.merge_checkpoint(base, [adapters["a"]], tmp_path / "merged", progress=False)
    with torch.no_grad():
        plain = cls.from_pretrained(str(out), attn_implementation="eager").eval()(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(plain.logits[real], expected["a"][real], atol=1e-4, rtol=0)
