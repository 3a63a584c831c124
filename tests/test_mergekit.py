"""mergekit YAML configs run by ``adaptkit merge --recipe``: equal to mergekit's own merge of the same file
(full fine-tunes; deterministic methods), to adaptkit's own recipe (LoRAs given as ``base+lora``, DARE),
and a clear error for what adaptkit does not implement."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import make_peft_lora

import adaptkit as ak
from adaptkit.cli.main import main
from adaptkit.errors import InvalidArgumentError
from adaptkit.formats.checkpoint import open_checkpoint
from adaptkit.merging.recipe import load_recipe, run_recipe


@pytest.fixture(scope="module")
def models(tiny_llama, tmp_path_factory):
    """A folder with the base, two LoRAs and the two full fine-tunes they make when merged."""
    root = tmp_path_factory.mktemp("mergekit")
    shutil.copytree(tiny_llama, root / "base")
    for name, seed in (("sql", 11), ("tone", 12)):
        make_peft_lora(root / "base", root / name, seed=seed)
        ak.merge_checkpoint(root / "base", [root / name], root / f"{name}-full", progress=False)
    return root


def tensors(folder) -> dict[str, torch.Tensor]:
    return {k: v.float() for _, shard in open_checkpoint(folder).iter_shards() for k, v in shard.items()}


def assert_same_weights(got, expected, atol=1e-5):
    got, expected = tensors(got), tensors(expected)
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=atol, rtol=0, msg=key)


def write(folder, name, text):
    path = folder / name
    path.write_text(text)
    return path


def run_mergekit(config_path, out):
    """mergekit's own merge of the config (the reference)."""
    yaml = pytest.importorskip("yaml")
    merge = pytest.importorskip("mergekit.merge")
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(config_path.read_text()))
    merge.run_merge(config, str(out), MergeOptions(copy_tokenizer=False, lazy_unpickle=False, quiet=True, write_model_card=False))


FULL = """
merge_method: {method}
base_model: base
models:
  - model: sql-full
    parameters: {{weight: 0.7{extra}}}
  - model: tone-full
    parameters: {{weight: 0.3{extra}}}
{parameters}dtype: float32
"""


@pytest.mark.parametrize("method, extra, parameters", [
    ("task_arithmetic", "", ""),
    ("task_arithmetic", "", "parameters: {lambda: 0.8}\n"),
    ("ties", ", density: 0.5", ""),
    ("ties", ", density: 0.5", "parameters: {normalize: false, lambda: 1.5}\n"),
    ("ties", ", density: 0.5", "parameters: {lambda: 0.5}\n"),
])
def test_full_fine_tunes_equal_mergekits_own_merge(models, method, extra, parameters, monkeypatch):
    monkeypatch.chdir(models)  # mergekit resolves paths from the working folder, adaptkit from the file's
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = write(models, f"{method}.yml", FULL.format(method=method, extra=extra, parameters=parameters))
    ours = CliRunner().invoke(main, ["merge", "--recipe", str(config), "-o", str(models / f"ours-{method}"), "-q",
                                     "--force"])
    assert ours.exit_code == 0, ours.output
    run_mergekit(config, models / f"theirs-{method}")
    assert_same_weights(models / f"ours-{method}", models / f"theirs-{method}")


@pytest.mark.parametrize("base_model", ["base_model: base\n", ""])
def test_linear_averages_models_as_mergekit_does(models, base_model, monkeypatch):
    monkeypatch.chdir(models)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = write(models, "linear.yml", f"merge_method: linear\n{base_model}models:\n"
                   "  - {model: base, parameters: {weight: 0.2}}\n  - {model: sql-full, parameters: {weight: 0.5}}\n"
                   "  - {model: tone-full, parameters: {weight: 0.8}}\n")
    recipe = load_recipe(config, out=models / "ours-linear")
    assert recipe.weights == pytest.approx((0.5 / 1.5, 0.8 / 1.5))  # normalised, the base's weight included
    run_recipe(recipe, force=True, progress=False)
    run_mergekit(config, models / "theirs-linear")
    assert_same_weights(models / "ours-linear", models / "theirs-linear")


def test_loras_as_base_plus_lora_equal_adaptkits_recipe(models, tmp_path):
    mergekit_yaml = write(models, "ties-lora.yml", """
merge_method: ties
base_model: base
models:
  - model: base+sql
    parameters: {weight: 0.7, density: 0.5}
  - model: base+tone
    parameters: {weight: 0.3, density: 0.5}
""")
    own = write(models, "ties-own.yml", """
method: ties
parameters: {density: 0.5}
base: base
out: own-ties
adapters: [{path: sql, weight: 0.7}, {path: tone, weight: 0.3}]
""")
    run_recipe(load_recipe(mergekit_yaml, out=tmp_path / "from-mergekit"), progress=False)
    run_recipe(load_recipe(own), force=True, progress=False)
    assert_same_weights(tmp_path / "from-mergekit", models / "own-ties", atol=0)
    # mergekit's dare_ties default is normalize: false, which adaptkit's recipe states explicitly
    dare = write(models, "dare.yml", "merge_method: dare_ties\nbase_model: base\nparameters: {seed: 3}\nmodels:\n"
                 "  - {model: base+sql, parameters: {weight: 1.0, density: 0.6}}\n"
                 "  - {model: base+tone, parameters: {weight: 1.0, density: 0.6}}\n")
    recipe = load_recipe(dare, out=tmp_path / "dare")
    assert recipe.method == "dare_ties" and recipe.parameters == {"density": 0.6, "seed": 3, "normalize": False}
    run_recipe(recipe, progress=False)
    ak.merge_checkpoint(models / "base", [models / "sql", models / "tone"], tmp_path / "dare-own", method="dare_ties",
                        density=0.6, seed=3, normalize=False, progress=False)
    assert_same_weights(tmp_path / "dare", tmp_path / "dare-own", atol=0)


def test_full_fine_tunes_merge_like_the_loras_they_came_from(models, tmp_path):
    """Task arithmetic on checkpoints equals the LoRA merge (the fine-tunes are those LoRAs merged)."""
    full = ak.merge_checkpoint(models / "base", [models / "sql-full", models / "tone-full"], tmp_path / "full",
                               weights=[0.7, -0.3], progress=False)
    lora = ak.merge_checkpoint(models / "base", [models / "sql", models / "tone"], tmp_path / "lora",
                               weights=[0.7, -0.3], progress=False)
    assert_same_weights(full, lora, atol=1e-6)
    mixed = ak.merge_checkpoint(models / "base", [models / "sql-full", models / "tone"], tmp_path / "mixed",
                                weights=[0.7, -0.3], progress=False)
    assert_same_weights(mixed, lora, atol=1e-6)


@pytest.mark.parametrize("text, match", [
    ("merge_method: slerp\nbase_model: base\nmodels: [{model: sql-full, parameters: {weight: 1}}]\n",
     r"slerp.yml:1: merge_method: mergekit method 'slerp' is not implemented by adaptkit \(it implements linear, "
     r"task_arithmetic, ties, dare_ties, dare_linear, magnitude_prune\)"),
    ("merge_method: ties\nbase_model: base\nmodels:\n  - {model: sql-full, parameters: {weight: 1, density: 0.5}}\n"
     "  - {model: tone-full, parameters: {weight: 1, density: 0.7}}\n", "different densities"),
    ("merge_method: ties\nbase_model: base\nmodels:\n  - {model: sql-full, parameters: {weight: [0, 1], "
     "density: 0.5}}\n", "gradients"),
    ("slices:\n  - sources: [{model: base, layer_range: [0, 2]}]\nmerge_method: passthrough\n", "slices"),
    ("merge_method: ties\nbase_model: base\nmodels:\n  - {model: other+sql, parameters: {weight: 1}}\n",
     "no such folder"),
    ("merge_method: dare_ties\nbase_model: base\nparameters: {rescale: false}\n"
     "models: [{model: sql-full, parameters: {weight: 1, density: 0.5}}]\n", "rescale: false"),
])
def test_what_adaptkit_does_not_implement_is_refused_by_name(models, text, match):
    name = "slerp.yml" if "slerp" in text else "bad.yml"
    with pytest.raises(InvalidArgumentError, match=match):
        load_recipe(write(models, name, text), out=models / "never")
    assert not (models / "never").exists()


def test_a_mergekit_config_needs_an_output_folder(models):
    config = write(models, "no-out.yml", FULL.format(method="task_arithmetic", extra="", parameters=""))
    result = CliRunner().invoke(main, ["merge", "--recipe", str(config)])
    assert result.exit_code == 1 and "-o OUT" in result.output
