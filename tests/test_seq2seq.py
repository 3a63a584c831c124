"""Encoder-decoders (T5, BART) with LoRA (PEFT ``SEQ_2_SEQ_LM``): the decoder's logits for given
``decoder_input_ids`` equal PEFT's, per row in mixed batches, merged in place and in checkpoints that plain
transformers loads; greedy generation (the prompt is the encoder's input) equals PEFT's ``generate``."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids
from peft_checks import save_random_base, save_trained

import adaptkit as ak


@pytest.fixture(scope="module")
def seq2seq_bases(tmp_path_factory):
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration


    configs = {
        "t5": (T5ForConditionalGeneration, T5Config(vocab_size=320, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                    num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                                    eos_token_id=2, dropout_rate=0.0), ["q", "v", "wo"]),
        "flan-t5": (T5ForConditionalGeneration, T5Config(vocab_size=320, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                         num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                                         eos_token_id=2, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                                                         tie_word_embeddings=False), ["q", "v", "wi_0", "wi_1"]),
        "bart": (BartForConditionalGeneration, BartConfig(vocab_size=320, d_model=64, encoder_layers=2, decoder_layers=2,
                                                          encoder_attention_heads=4, decoder_attention_heads=4,
                                                          encoder_ffn_dim=128, decoder_ffn_dim=128,
                                                          max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                                                          eos_token_id=2, decoder_start_token_id=2, dropout=0.0,
                                                          forced_eos_token_id=None), ["q_proj", "v_proj", "fc1"]),
    }
    made = {}
    for name, (cls, config, targets) in configs.items():
        torch.manual_seed(0)
        made[name] = (save_random_base(cls(config), tmp_path_factory.mktemp(name) / "base", std=0.1), cls, targets)
    return made


def _lora(cls, base, targets, out, seed):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(cls.from_pretrained(str(base)).eval(),
                           LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    model.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("family", ["t5", "flan-t5", "bart"])
def test_lora_on_encoder_decoders_equals_peft(family, seq2seq_bases, tmp_path):
    from peft import PeftModel

    base, cls, targets = seq2seq_bases[family]
    ids = random_ids(batch=3, length=8)
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0  # a shorter encoder input
    decoder = random_ids(batch=3, length=5, seed=1)
    adapters = {name: _lora(cls, base, targets, tmp_path / name, seed) for seed, name in enumerate(("a", "b"))}
    expected, generated = {}, {}
    for name, path in adapters.items():
        model = PeftModel.from_pretrained(cls.from_pretrained(str(base)).eval(), str(path)).eval()
        with torch.no_grad():
            expected[name] = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
            generated[name] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                             num_beams=1)
    plain = cls.from_pretrained(str(base)).eval()
    with torch.no_grad():
        expected[None] = plain(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
    engine = ak.Engine.from_pretrained(base)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
        torch.testing.assert_close(engine.logits(ids, mask, adapters=name, decoder_input_ids=decoder), expected[name],
                                   atol=1e-4, rtol=0)
    rows = ["a", "b", None]
    mixed = engine.logits(ids, mask, adapters=rows, decoder_input_ids=decoder)
    for i, row in enumerate(rows):
        torch.testing.assert_close(mixed[i], expected[row][i], atol=1e-4, rtol=0)
    # greedy generation per row: PEFT's generate, its start token dropped, up to its end of sequence
    prompts = [row[: int(m.sum())].tolist() for row, m in zip(ids, mask)]
    got = engine.generate_ids(prompts, adapters=["a", "b", "a"], max_new_tokens=6)
    for i, name in enumerate(["a", "b", "a"]):
        want = generated[name][i, 1:].tolist()
        if 2 in want:
            want = want[: want.index(2) + 1]
        assert got[i] == want, (i, got[i], want)
    engine.merge("a")
    torch.testing.assert_close(engine.logits(ids, mask, adapters="a", decoder_input_ids=decoder), expected["a"],
                               atol=1e-4, rtol=0)
    engine.unmerge()
    merged = ak.merge_checkpoint(base, [adapters["a"]], tmp_path / "merged", progress=False)
    with torch.no_grad():
        out = cls.from_pretrained(str(merged)).eval()(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder)
    torch.testing.assert_close(out.logits, expected["a"], atol=1e-4, rtol=0)


def _prompt(cls, base, kind, out, seed):
    from peft import PromptEncoderConfig, PromptTuningConfig, get_peft_model

    config = (PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4) if kind == "prompt" else
              PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, encoder_hidden_size=32))
    return save_trained(get_peft_model(cls.from_pretrained(str(base)).eval(), config), out, seed)


@pytest.mark.parametrize("family", ["t5", "flan-t5", "bart"])
def test_prompt_tuning_and_p_tuning_on_encoder_decoders(family, seq2seq_bases, tmp_path):
    """PEFT SEQ_2_SEQ_LM prompts go in front of the encoder's input; logits and greedy decoding from PEFT's
    forward (its generate uses the same encoder prompt) equal, in one batch with a LoRA row and a base row."""
    from peft import PeftModel

    base, cls, targets = seq2seq_bases[family]
    ids = random_ids(batch=4, length=8, seed=3)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    decoder = random_ids(batch=4, length=5, seed=4)
    paths = {"prompt": _prompt(cls, base, "prompt", tmp_path / "prompt", 1),
             "ptuning": _prompt(cls, base, "ptuning", tmp_path / "ptuning", 2),
             "lora": _lora(cls, base, targets, tmp_path / "lora", 3)}
    engine = ak.Engine.from_pretrained(base)
    expected, generated = {}, {}
    for name, path in paths.items():
        model = PeftModel.from_pretrained(cls.from_pretrained(str(base)).eval(), str(path)).eval()
        with torch.no_grad():
            expected[name] = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
            generated[name] = _greedy(model, ids, mask, engine.model.config.decoder_start_token_id, 6)
        engine.add_adapter(name, path)
    with torch.no_grad():
        expected[None] = cls.from_pretrained(str(base)).eval()(input_ids=ids, attention_mask=mask,
                                                                decoder_input_ids=decoder).logits
    rows = ["prompt", "ptuning", "lora", None]
    mixed = engine.logits(ids, mask, adapters=rows, decoder_input_ids=decoder)
    for i, row in enumerate(rows):
        torch.testing.assert_close(mixed[i], expected[row][i], atol=1e-4, rtol=0, msg=str(row))
    prompts = [row[: int(m.sum())].tolist() for row, m in zip(ids, mask)]
    got = engine.generate_ids(prompts, adapters=["prompt", "ptuning", "lora", "prompt"], max_new_tokens=6)
    for i, name in enumerate(["prompt", "ptuning", "lora", "prompt"]):
        assert got[i] == generated[name][i], (name, got[i], generated[name][i])


def _greedy(model, ids, mask, start: int, steps: int, eos: int = 2) -> list[list[int]]:
    """Greedy decoding with PEFT's forward (the reference the issue names), each row up to its end of sequence."""
    decoder = torch.full((ids.shape[0], 1), start)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits[:, -1]
        decoder = torch.cat([decoder, logits.argmax(-1, keepdim=True)], dim=1)
    rows = []
    for row in decoder[:, 1:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def test_encoder_decoders_need_decoder_input_ids(seq2seq_bases):
    from adaptkit.errors import InvalidArgumentError

    engine = ak.Engine.from_pretrained(seq2seq_bases["t5"][0])
    with pytest.raises(InvalidArgumentError, match="pass decoder_input_ids"):
        engine.logits(random_ids())


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_prefix_tuning_on_encoder_decoders(family, seq2seq_bases, tmp_path):
    """PEFT's SEQ_2_SEQ_LM prefix: K/V in the decoder's self-attention cache (cross-attention from the encoder,
    as PEFT leaves it). T5 (relative positions) mixes prefix rows with others; on BART (absolute positions
    counted from the cache) rows of one prefix length batch together."""
    from peft import PeftModel, PrefixTuningConfig, get_peft_model

    base, cls, targets = seq2seq_bases[family]
    model = get_peft_model(cls.from_pretrained(str(base)).eval(),
                           PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(7))
    model.save_pretrained(str(tmp_path / "prefix"))
    ids = random_ids(batch=3, length=8, seed=5)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    decoder = random_ids(batch=3, length=5, seed=6)
    reference = PeftModel.from_pretrained(cls.from_pretrained(str(base)).eval(), str(tmp_path / "prefix")).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
        plain = cls.from_pretrained(str(base)).eval()(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
    assert (expected - plain).abs().max() > 1e-2
    engine = ak.Engine.from_pretrained(base)
    engine.add_adapter("prefix", tmp_path / "prefix")
    torch.testing.assert_close(engine.logits(ids, mask, adapters="prefix", decoder_input_ids=decoder), expected,
                               atol=1e-4, rtol=0)
    rows = ["prefix", None, "prefix"]
    mixed = engine.logits(ids, mask, adapters=rows, decoder_input_ids=decoder)
    for i, row in enumerate(rows):
        torch.testing.assert_close(mixed[i], (expected if row else plain)[i], atol=1e-4, rtol=0)
    prompts = [row[: int(m.sum())].tolist() for row, m in zip(ids, mask)]
    want = _greedy(reference, ids, mask, engine.model.config.decoder_start_token_id, 6)
    got = engine.generate_ids(prompts, adapters=rows, max_new_tokens=6)
    plain_want = _greedy(cls.from_pretrained(str(base)).eval(), ids, mask, engine.model.config.decoder_start_token_id, 6)
    for i, row in enumerate(rows):
        assert got[i] == (want if row else plain_want)[i], (row, got[i])


@pytest.fixture(scope="module")
def t5_untied(tmp_path_factory):
    """A T5 with its own output head (the tied one scales the decoder's output by d_model^-0.5, which keeps a
    tiny random model's logits too flat for a few steps of training to move the loss much)."""
    from transformers import T5Config, T5ForConditionalGeneration

    from adaptkit.demo import build_tokenizer

    folder = tmp_path_factory.mktemp("t5-untied") / "base"
    config = T5Config(vocab_size=320, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=2, dropout_rate=0.0, tie_word_embeddings=False,
                      initializer_factor=1.0)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(str(folder))
    build_tokenizer().save_pretrained(str(folder))
    return folder, T5ForConditionalGeneration


@pytest.mark.parametrize("method, options", [("lora", {"r": 8}), ("prompt", {"virtual_tokens": 20}),
                                             ("ptuning", {"virtual_tokens": 20}), ("prefix", {"virtual_tokens": 4})])
def test_seq2seq_training_reaches_the_margins_and_loads_in_peft(method, options, t5_untied, tmp_path):
    """{"prompt", "completion"} rows on T5: the completion is the decoder's target (the class of the prompt's
    words); held-out margins as the other training tests, and the output loads in PEFT with our logits."""
    import json
    import random

    from peft import PeftModel

    base, cls = t5_untied
    gen = random.Random(0)
    classes = {"fox": ["quick", "brown", "the"], "dog": ["lazy", "over", "jumps"]}
    rows = []
    for _ in range(96):
        label = gen.choice(sorted(classes))
        rows.append({"prompt": " ".join(gen.choice(classes[label]) for _ in range(3)), "completion": label})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = ak.train(method, base, data, tmp_path / "out", epochs={"lora": 10, "prefix": 30, "ptuning": 200}.get(method, 60),
                      lr={"lora": 1e-2, "prefix": 5e-2, "ptuning": 3e-3}.get(method, 1e-1),
                      eval_split=0.25, progress=False, **options)
    first, last = result.initial_eval, result.final_eval
    assert last["accuracy"] >= 0.85 and last["loss"] <= 0.6 * first["loss"], (first, last)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM"
    engine = ak.Engine.from_pretrained(base)
    engine.add_adapter("trained", tmp_path / "out")
    ids = torch.tensor([engine.encode(["quick brown the"])[0]])
    decoder = torch.tensor([[0, 5, 9]])
    reference = PeftModel.from_pretrained(cls.from_pretrained(str(base)).eval(), str(tmp_path / "out")).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=decoder).logits
    torch.testing.assert_close(engine.logits(ids, adapters="trained", decoder_input_ids=decoder), expected, atol=1e-4,
                               rtol=0)
