"""Merge recipes (YAML/JSON): the same result as the API call; errors name file, line and field."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import make_peft_lora

import adaptkit as ak
from adaptkit.cli.main import main
from adaptkit.errors import InvalidArgumentError
from adaptkit.formats.peft import read_lora
from adaptkit.merging.recipe import load_recipe


@pytest.fixture(scope="module")
def pair(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    make_peft_lora(tiny_llama, root / "sql", seed=1)
    make_peft_lora(tiny_llama, root / "tone", seed=2, r=8, use_rslora=True)
    return root


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_yaml_recipe_equals_api_call(pair, tiny_llama, tmp_path):
    recipe = pair / "ties.yaml"
    recipe.write_text(f"""# TIES of two adapters into the base
method: ties
parameters:
  density: 0.5
base: {tiny_llama}
out: merged-ties
adapters:
  - {{path: sql, weight: 0.7}}
  - path: tone
    weight: 0.3
""")
    result = CliRunner().invoke(main, ["merge", "--recipe", str(recipe), "--quiet"])
    assert result.exit_code == 0, result.output
    expected = ak.merge_checkpoint(tiny_llama, [pair / "sql", pair / "tone"], tmp_path / "api", weights=[0.7, 0.3],
                                   method="ties", density=0.5, progress=False)
    got, want = _tensors(pair / "merged-ties"), _tensors(expected)
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)


def test_json_recipe_into_adapter(pair, tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"into": "adapter", "out": "combined", "method": "linear",
                                  "adapters": [{"path": str(pair / "sql"), "weight": 0.6}, str(pair / "tone")]}, indent=2))
    result = CliRunner().invoke(main, ["merge", "--recipe", str(recipe), "--quiet"])
    assert result.exit_code == 0, result.output
    combined, sql, tone = read_lora(tmp_path / "combined"), read_lora(pair / "sql"), read_lora(pair / "tone")
    module = "model.layers.0.self_attn.q_proj"
    want = 0.6 * sql.layers[module].delta_weight() + tone.layers[module].delta_weight()
    assert float((combined.layers[module].delta_weight() - want).norm() / want.norm()) <= 1e-6


BASE_LINES = """method: ties
parameters:
  density: 0.5
base: {base}
out: merged
adapters:
  - path: sql
    weight: 0.7
  - path: tone
    weight: 0.3
"""


@pytest.mark.parametrize("edit, line, field, message", [
    (("weight: 0.3", "weight: lots"), 10, "adapters[1].weight", "expected a finite number, got 'lots'"),
    (("weight: 0.3", "weight: .nan"), 10, "adapters[1].weight", "finite number"),
    (("density: 0.5", "density: 1.5"), 3, "parameters.density", r"density must be in \(0, 1\]"),
    (("density: 0.5", "density: 0"), 3, "parameters.density", r"density must be in \(0, 1\]"),
    (("method: ties", "method: slerp"), 1, "method", "known methods: dare_linear"),
    (("out: merged", "outt: merged"), 5, "outt", "unknown field 'outt'; known fields: adapters, base"),
    (("    weight: 0.7", "    wieght: 0.7"), 8, "adapters[0].wieght", "unknown field 'wieght'"),
    (("path: tone", "path: missing"), 9, "adapters[1].path", "no such folder"),
    (("  density: 0.5", "  density: 0.5\n  rank: 4"), 4, "parameters.rank", "does not take rank"),
    (("out: merged", "out: merged: twice"), 5, None, "not valid YAML"),
])
def test_bad_recipe_names_line_and_field(edit, line, field, message, pair, tiny_llama):
    recipe = pair / "bad.yaml"
    recipe.write_text(BASE_LINES.format(base=tiny_llama).replace(*edit))
    with pytest.raises(InvalidArgumentError, match=message) as info:
        load_recipe(recipe)
    assert f"{recipe}:{line}:" in str(info.value)
    if field:
        assert f": {field}: " in str(info.value)
    result = CliRunner().invoke(main, ["merge", "--recipe", str(recipe)])
    assert result.exit_code == 1 and f"bad.yaml:{line}:" in result.output
    assert not (pair / "merged").exists()


def test_json_syntax_error_names_line(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text('{\n  "out": "x",\n  "adapters": [1,,]\n}')
    with pytest.raises(InvalidArgumentError, match=r"r.json:3: not valid JSON"):
        load_recipe(recipe)


def test_missing_fields(pair, tmp_path):
    recipe = pair / "nobase.yaml"
    recipe.write_text("out: x\nadapters: [sql]\n")
    with pytest.raises(InvalidArgumentError, match="missing required field 'base'"):
        load_recipe(recipe)
    recipe.write_text("base: .\nadapters: [sql]\n")
    with pytest.raises(InvalidArgumentError, match="missing required field 'out'"):
        load_recipe(recipe)


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


@pytest.mark.parametrize("text, message", [
    (ALIAS_BOMB, "anchors and aliases"),                                  # 9 levels: 9**9 items when expanded
    ("adapters: &loop [*loop]\nout: x\n", "anchors and aliases"),         # a recursive alias
])
def test_yaml_aliases_are_refused_before_any_expansion(text, message, tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    with pytest.raises(InvalidArgumentError, match=message):
        load_recipe(path)


def test_a_recipe_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("adapters: [caf\xe9]\nout: x\n".encode("latin-1"))
    with pytest.raises(InvalidArgumentError, match="not UTF-8 text"):
        load_recipe(path)


@pytest.mark.parametrize("out", ["../../../x", "/etc/x", "sub/../../x"])
def test_a_recipe_writes_only_inside_its_folder(out, pair, tiny_llama, tmp_path):
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.parent.mkdir()
    recipe.write_text(json.dumps({"base": str(tiny_llama), "adapters": [str(pair / "sql")], "out": out}))
    with pytest.raises(InvalidArgumentError, match="leads outside the recipe's folder"):
        load_recipe(recipe)
    cli = CliRunner().invoke(main, ["merge", "--recipe", str(recipe), "-q"])
    assert cli.exit_code == 1 and "pass -o OUT" in cli.output and cli.output.count("\n") == 1
    given = CliRunner().invoke(main, ["merge", "--recipe", str(recipe), "-o", str(tmp_path / "chosen"), "-q"])
    assert given.exit_code == 0, given.output
    assert (tmp_path / "chosen" / "model.safetensors").is_file()
