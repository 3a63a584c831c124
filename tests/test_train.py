"""Training every method on a tiny model: margins, saved == trained, PEFT / AdapterHub layouts, resume, CLI.

Each method learns ``train_helpers.classification_task`` (the letter a text repeats decides its label)
and must end with held-out accuracy >= chance + 0.35 and held-out / training loss <= 0.6 x where it
started (``train_helpers.assert_learned``). The saved adapter, loaded by the engine, must reproduce
the trainer's final held-out loss (1e-4): what is written is what was trained. QLoRA is trained in
test_qlora.py, in both of bitsandbytes' CPU layouts.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import load_hf, random_ids
from safetensors.torch import load_file
from train_helpers import (
    EVAL_SPLIT,
    PATTERN,
    VERBALIZER,
    assert_learned,
    classification_task,
    held_out_loss,
    unlabeled_text,
    with_mask_token,
)

import adaptkit as ak
from adaptkit.errors import InvalidArgumentError, OutputExistsError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train faster on one thread: two spend more time synchronising than computing."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return classification_task(tmp_path_factory.mktemp("task") / "task.jsonl")


@pytest.fixture(scope="module")
def tiny_bert_mlm(tiny_bert, tmp_path_factory):
    return with_mask_token(tiny_bert, tmp_path_factory.mktemp("bert_mlm") / "base")


@pytest.fixture(scope="module")
def engines():
    """One engine per (base, quantize), shared by the tests of this module."""
    cache = {}

    def get(base, quantize=None):
        if (base, quantize) not in cache:
            cache[(base, quantize)] = ak.Engine.from_pretrained(base, quantize=quantize)
        return cache[(base, quantize)]

    return get


def train(method, base, data, out, **kwargs):
    kwargs = {"epochs": 3, "eval_split": EVAL_SPLIT, "seed": 0, "pattern": PATTERN, "verbalizer": VERBALIZER,
              "progress": False, **kwargs}
    return ak.train(method, base, data, out, **kwargs)


# method -> (base fixture, lr, epochs, method options). Soft prompts learn slower: 6 epochs (36 steps).
CASES = {
    "lora": ("tiny_llama", 1e-2, 3, {}),
    "prefix": ("tiny_gpt2", 1e-2, 3, {}),
    "ptuning2": ("tiny_llama", 1e-1, 3, {}),
    "prompt": ("tiny_llama", 3e-2, 6, {}),
    "ptuning": ("tiny_llama", 3e-3, 6, {"encoder": "lstm"}),
    "ppt": ("tiny_llama", 3e-2, 6, {}),
    "bottleneck": ("tiny_bert_mlm", 1e-2, 3, {"architecture": "houlsby"}),
}
PEFT_KINDS = {"lora", "prefix", "ptuning2", "prompt", "ptuning", "ppt"}


@pytest.mark.parametrize("method", list(CASES))
def test_method_learns_and_saves_what_it_trained(method, request, task, engines, tmp_path):
    fixture, lr, epochs, options = CASES[method]
    base = request.getfixturevalue(fixture)
    if method == "ppt":
        options = {"pretrain_data": unlabeled_text(tmp_path / "unlabeled.jsonl"), "pretrain_epochs": 1}
    result = train(method, base, task, tmp_path / "out", lr=lr, epochs=epochs, **options)
    assert_learned(result)
    assert result.steps == epochs * 6 and json.loads((tmp_path / "out" / "adaptkit_train.json").read_text())["steps"] == result.steps
    if method == "ppt":
        assert len(result.pretrain_losses) == 4 and result.pretrain_losses[-1] < result.pretrain_losses[0]

    engine = engines(base)
    engine.add_adapter(method, tmp_path / "out")
    loss, accuracy = held_out_loss(engine, method, task)
    assert abs(loss - result.final_eval["loss"]) < 1e-4 and accuracy == result.final_eval["accuracy"]

    if method in PEFT_KINDS:  # PEFT loads it and computes the same logits
        from peft import PeftModel

        ids = random_ids(batch=2, length=9, seed=1)
        with torch.no_grad():
            expected = PeftModel.from_pretrained(load_hf(base), str(tmp_path / "out")).eval()(input_ids=ids).logits[:, -9:]
        got = engine.logits(ids, adapters=method)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert (got - engine.logits(ids)).abs().max() > 1e-2
    engine.remove_adapter(method)


def test_completion_rows_train_on_the_completion(tiny_llama, tmp_path):
    """``{"prompt", "completion"}`` rows: loss on the completion's tokens (and end-of-sequence) only.
    Margins: held-out next-token accuracy on those tokens >= 0.9 (chance 1/320), loss <= 0.6 x its start."""
    rows = [{"prompt": " ".join(c * (2 + i % 3)), "completion": "=" + ("1" if c == "x" else "0")}
            for i, c in enumerate("xy" * 24)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = ak.train("lora", tiny_llama, tmp_path / "c.jsonl", tmp_path / "out", epochs=3, lr=2e-2,
                      eval_split=EVAL_SPLIT, progress=False)
    assert result.final_eval["count"] == 12 * 3  # "=", the digit, end-of-sequence: prompt tokens carry no loss
    assert result.final_eval["accuracy"] >= 0.9 > 50 * result.final_eval["chance"]
    assert result.final_eval["loss"] <= 0.6 * result.initial_eval["loss"]


def test_encoders_saved_beside_folded_prefix_and_ptuning(tiny_llama, task, tmp_path):
    """Prefix tuning / P-tuning also write their unfolded encoder (``encoder/``): it folds to the saved result."""
    from adaptkit.formats.detect import read_adapter

    train("prefix", tiny_llama, task, tmp_path / "prefix", lr=1e-2, epochs=1, encoder_hidden=16)
    folded, encoder = read_adapter(tmp_path / "prefix"), read_adapter(tmp_path / "prefix" / "encoder")
    assert folded.config.method == encoder.config.method == "prefix_tuning"
    keys = load_file(str(tmp_path / "prefix" / "encoder" / "adapter_model.safetensors"))
    assert keys["prompt_encoder.transform.0.weight"].shape == (16, 2 * 16)  # [h, H_kv * D]
    torch.testing.assert_close(encoder.keys, folded.keys, atol=1e-5, rtol=0)
    train("ptuning", tiny_llama, task, tmp_path / "ptuning", lr=1e-3, epochs=1, encoder="mlp")
    folded, encoder = read_adapter(tmp_path / "ptuning"), read_adapter(tmp_path / "ptuning" / "encoder")
    assert folded.config.encoder == "mlp" and folded.config.method == "p_tuning"
    torch.testing.assert_close(encoder.embeddings, folded.embeddings, atol=1e-5, rtol=0)


def test_bottleneck_round_trips_through_adapterhub(tiny_llama, task, engines, tmp_path):
    """A trained parallel bottleneck is written as AdapterHub writes it; read, re-written and re-read it
    gives identical engine logits."""
    from adaptkit.formats.adapterhub import write_bottleneck
    from adaptkit.formats.detect import read_adapter

    result = train("bottleneck", tiny_llama, task, tmp_path / "sentiment", lr=1e-2, architecture="parallel")
    assert_learned(result)
    meta = json.loads((tmp_path / "sentiment" / "adapter_config.json").read_text())
    assert meta["name"] == "sentiment" and meta["config"]["is_parallel"] and meta["config"]["reduction_factor"] == 2
    keys = load_file(str(tmp_path / "sentiment" / "adapter.safetensors"))
    assert "model.layers.1.output_adapters.adapters.sentiment.adapter_up.weight" in keys
    write_bottleneck(read_adapter(tmp_path / "sentiment"), tmp_path / "again")
    engine = engines(tiny_llama)
    engine.add_adapter("sentiment", tmp_path / "sentiment")
    engine.add_adapter("again", tmp_path / "again")
    ids = random_ids(batch=2, length=9, seed=2)
    assert torch.equal(engine.logits(ids, adapters="sentiment"), engine.logits(ids, adapters="again"))
    loss, accuracy = held_out_loss(engine, "again", task)
    assert abs(loss - result.final_eval["loss"]) < 1e-4 and accuracy == result.final_eval["accuracy"]
    engine.remove_adapter("again")
    engine.remove_adapter("sentiment")


def test_fusion_learns_over_frozen_adapters(tiny_llama, task, engines, tmp_path):
    """Fusion over two bottleneck adapters (random stand-ins for trained ones, series and parallel):
    only the fusion layers train. The saved fusion over the adapters *as they were on disk* gives the
    trainer's final loss, so the adapters did not move."""
    from adaptkit.demo import random_bottleneck
    from adaptkit.formats.adapterhub import write_bottleneck

    for name, seed, parallel in (("a", 1, False), ("b", 2, True)):
        write_bottleneck(random_bottleneck(tiny_llama, name, seed=seed, parallel=parallel), tmp_path / name)
    result = train("fusion", tiny_llama, task, tmp_path / "fusion", lr=1e-2, adapters=f"a={tmp_path / 'a'},b={tmp_path / 'b'}")
    assert_learned(result)
    assert json.loads((tmp_path / "fusion" / "adapter_fusion_config.json").read_text())["adapter_names"] == ["a", "b"]
    engine = engines(tiny_llama)
    for name in ("a", "b", "fusion"):
        engine.add_adapter(name, tmp_path / name)
    loss, accuracy = held_out_loss(engine, ak.Fuse("a", "b"), task)
    assert abs(loss - result.final_eval["loss"]) < 1e-4 and accuracy == result.final_eval["accuracy"]
    for name in ("fusion", "a", "b"):
        engine.remove_adapter(name)


@pytest.mark.parametrize("method, options", [("lora", {}), ("bottleneck", {}), ("prefix", {})])
def test_only_adapter_parameters_train(tiny_llama, task, method, options):
    """The base stays frozen: the parameters that require grad are the adapter's own."""
    from adaptkit.training.data import make_objective, read_jsonl
    from adaptkit.training.methods import setup_method
    from adaptkit.training.setup import SetupContext

    engine = ak.Engine.from_pretrained(tiny_llama)
    dataset = read_jsonl(task)
    objective = make_objective(dataset, engine.tokenizer, True, "causal", PATTERN, VERBALIZER)
    setup = setup_method(method, SetupContext(engine, "trained", objective, "adapter"), options)
    in_model = {n for n, p in engine.model.named_parameters() if p.requires_grad}
    trained = {id(p) for p in setup.trainable.parameters()}
    assert all(p.requires_grad for p in setup.trainable.parameters())
    if method == "prefix":
        assert not in_model  # the prefix lives outside the model, in its inputs
    else:
        assert in_model and all(id(engine.model.get_parameter(n)) in trained for n in in_model)
        assert all(("lora" in n) if method == "lora" else (".layers.trained." in n) for n in in_model)


def test_resume_continues_to_the_uninterrupted_result(tiny_llama, task, tmp_path):
    """Stopped after 5 of 12 steps (mid-epoch, gradient accumulation 2) and resumed: the same adapter
    tensors (atol 1e-6), losses and evaluations as one uninterrupted run."""
    settings = dict(lr=1e-2, epochs=2, batch_size=4, grad_accum=2)
    whole = train("lora", tiny_llama, task, tmp_path / "whole", **settings)
    part = train("lora", tiny_llama, task, tmp_path / "part", max_steps=5, **settings)
    assert part.steps == 5 and part.checkpoint.name == "step-000005"
    with pytest.raises(InvalidArgumentError, match=r"made with lr=0.01, this run has lr=0.02"):
        train("lora", tiny_llama, task, tmp_path / "part", resume=part.checkpoint, force=True, **{**settings, "lr": 2e-2})
    with pytest.raises(OutputExistsError, match="holds checkpoints of an earlier run"):
        train("lora", tiny_llama, task, tmp_path / "part2", checkpoint_dir=part.checkpoint.parent, **settings)
    resumed = train("lora", tiny_llama, task, tmp_path / "part", resume=part.checkpoint.parent, force=True, **settings)
    assert resumed.steps == whole.steps == 12
    assert resumed.losses == whole.losses and resumed.evals == whole.evals
    expected = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "part" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)
    assert sorted(p.name for p in (tmp_path / "part.checkpoints").iterdir()) == ["step-000006", "step-000012"]


def test_bad_method_and_options_are_clear_errors(tiny_llama, task, tmp_path):
    with pytest.raises(InvalidArgumentError, match="training method 'dora' is unknown; known: bottleneck, fusion, lora, pet"):
        train("dora", tiny_llama, task, tmp_path / "x")
    with pytest.raises(InvalidArgumentError, match="method 'prompt' does not take r; it takes virtual_tokens, init, init_text"):
        train("prompt", tiny_llama, task, tmp_path / "x", r=4)
    with pytest.raises(InvalidArgumentError, match="ppt pre-trains its prompt on unlabeled text"):
        train("ppt", tiny_llama, task, tmp_path / "x")


def test_cli_train_and_one_line_errors(tiny_llama, task, tmp_path):
    from adaptkit.cli.main import main

    runner = CliRunner()
    args = ["train", "--method", "lora", "--base", str(tiny_llama), "--data", str(task), "-o", str(tmp_path / "cli"),
            "--lr", "0.01", "--rank", "4", "--targets", "q_proj,v_proj", "--pattern", PATTERN, "--verbalizer",
            "pos=1,neg=0", "--eval-split", "0.25", "-q"]
    done = runner.invoke(main, args)
    assert done.exit_code == 0, done.output
    assert "wrote" in done.output and "accuracy" in done.output
    assert json.loads((tmp_path / "cli" / "adapter_config.json").read_text())["r"] == 4
    (tmp_path / "bad.jsonl").write_text('{"text": "x x", "label": "pos"}\n\n')
    bad = runner.invoke(main, [*args[:6], str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and bad.output.strip().count("\n") == 0
    assert bad.output.startswith("error: ") and "bad.jsonl:2: empty line" in bad.output
    unknown = runner.invoke(main, ["train", "--method", "nope", "--base", str(tiny_llama), "--data", str(task), "-o",
                                   str(tmp_path / "n")])
    assert unknown.exit_code == 1 and "known: bottleneck, fusion, lora, pet, ppt, prefix, prompt" in unknown.output
    missing = runner.invoke(main, [*args, "--verbalizer", "pos=1", "--force"])
    assert missing.exit_code == 1 and "label 'neg' is not in the verbalizer" in missing.output


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gpt2", "bloom", "gpt_neox", "falcon", "opt",
                                        "bert", "roberta", "deberta-v2", "t5", "bart", "nemotron_h"])
def test_default_lora_targets_are_pefts(model_type):
    """With no targets named, a LoRA trains what PEFT's own default for the model type targets (its table,
    read here as the reference; adaptkit finds the query and value projections, or the fused one, by name)."""
    from model_zoo import tiny_config
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    from adaptkit.arch import facts_from_config, skeleton_of
    from adaptkit.training.methods import default_targets

    config = tiny_config(model_type)
    found = default_targets(skeleton_of(config), facts_from_config(config))
    expected = set(PEFT_DEFAULTS[model_type])
    if model_type == "nemotron_h":  # PEFT targets every attention projection of the hybrid; its q/v are among them
        expected &= {"q_proj", "v_proj"}
    assert set(found) == expected
