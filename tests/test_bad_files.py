"""Bad adapter files: refused with one error naming the file, the key and the value, never computed.

Each case is a copy of a good PEFT LoRA with one thing broken, loaded through ``Engine.add_adapter``
(an ``AdapterFormatError``, the engine unchanged) and ``adaptkit inspect`` (one line, exit 1).
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from click.testing import CliRunner
from conftest import make_peft_lora, random_ids
from safetensors.torch import load_file, save_file

import adaptkit as ak
from adaptkit.cli.main import main
from adaptkit.errors import AdapterFormatError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def good(tiny_llama, tmp_path_factory):
    return make_peft_lora(tiny_llama, tmp_path_factory.mktemp("good") / "lora", seed=1)  # r=4


def _config(**changes):
    def change(folder):
        config = json.loads((folder / CONFIG).read_text())
        for key, value in changes.items():
            if value is _MISSING:
                config.pop(key)
            else:
                config[key] = value
        (folder / CONFIG).write_text(json.dumps(config))
    return change


_MISSING = object()


def _tensors(fn):
    def change(folder):
        tensors = load_file(str(folder / WEIGHTS))
        save_file({k: fn(k, v) for k, v in tensors.items()}, str(folder / WEIGHTS))
    return change


def _relabel_f32_as_i32(folder):
    """The header says I32 where the bytes are float32 (same size): the tensors read as integers."""
    raw = (folder / WEIGHTS).read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = raw[8 : 8 + size].replace(b'"F32"', b'"I32"')
    (folder / WEIGHTS).write_bytes(raw[:8] + header + raw[8 + size :])


def _first_nan(key, tensor):
    tensor = tensor.clone()
    if "lora_B" in key:
        tensor.view(-1)[0] = float("nan")
    return tensor


def _first_inf(key, tensor):
    tensor = tensor.clone()
    if "lora_A" in key:
        tensor.view(-1)[3] = float("inf")
    return tensor


CASES = {
    "r 8 with rank-4 tensors": (_config(r=8), "rank 4 but .* says r=8"),
    "r = 10**12": (_config(r=10**12), r"r must be an integer in \[1, 65536\]"),
    "r missing": (_config(r=_MISSING), "r is missing"),
    "r 'four'": (_config(r="four"), "r must be an integer"),
    "lora_alpha 'eight'": (_config(lora_alpha="eight"), "lora_alpha must be a finite number"),
    "lora_alpha NaN": (_config(lora_alpha=float("nan")), "lora_alpha must be a finite number"),
    "use_rslora 'false'": (_config(use_rslora="false"), "use_rslora must be true or false"),
    "target_modules 5": (_config(target_modules=5), "target_modules must be a list of names"),
    "rank_pattern [1, 2]": (_config(rank_pattern=[1, 2]), r"rank_pattern must be an object"),
    "layers_to_transform ['a']": (_config(layers_to_transform=["a"]), "layers_to_transform must be a list of layer"),
    "NaN weights": (_tensors(_first_nan), "non-finite values"),
    "inf weights": (_tensors(_first_inf), "non-finite values"),
    "integer tensors": (_tensors(lambda k, v: (v * 100).int()), "stored as torch.int32"),
    "bool tensors": (_tensors(lambda k, v: v > 0), "stored as torch.bool"),
    "F32 relabelled I32": (_relabel_f32_as_i32, "stored as torch.int32"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_adapter_is_refused_by_name(case, good, tiny_llama, tmp_path):
    breaker, message = CASES[case]
    folder = tmp_path / "bad"
    shutil.copytree(good, folder)
    breaker(folder)
    engine = ak.Engine.from_pretrained(tiny_llama)
    ids = random_ids(seed=2)
    before = engine.logits(ids)
    with pytest.raises(AdapterFormatError, match=message) as error:
        engine.add_adapter("bad", folder)
    assert str(folder) in str(error.value)
    assert engine.adapters == {} and (engine.logits(ids) == before).all()
    result = CliRunner().invoke(main, ["inspect", str(folder), "--base", str(tiny_llama)])
    assert result.exit_code == 1 and result.output.startswith("error: ") and result.output.count("\n") == 1


def test_other_formats_check_the_same(tiny_llama, tmp_path):
    """AdapterHub ``leave_out`` must be layer indices; NaN in a bottleneck or a prefix file is refused."""
    from serve_helpers import write_adapters

    paths = write_adapters(tiny_llama, tmp_path, names=("bottleneck", "prefix"))
    engine = ak.Engine.from_pretrained(tiny_llama)
    config_path = paths["bottleneck"] / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["config"]["leave_out"] = ["a", "b"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match="leave_out must be a list of layer indices"):
        engine.add_adapter("bn", paths["bottleneck"])
    config["config"]["leave_out"] = []
    config_path.write_text(json.dumps(config))
    weights = next(paths["bottleneck"].glob("*.safetensors"))
    save_file({k: v * float("nan") for k, v in load_file(str(weights)).items()}, str(weights))
    with pytest.raises(AdapterFormatError, match="non-finite values"):
        engine.add_adapter("bn", paths["bottleneck"])
    prefix_weights = paths["prefix"] / WEIGHTS
    save_file({k: v.int() for k, v in load_file(str(prefix_weights)).items()}, str(prefix_weights))
    with pytest.raises(AdapterFormatError, match="stored as torch.int32"):
        engine.add_adapter("px", paths["prefix"])
    assert engine.adapters == {}
