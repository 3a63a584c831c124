"""Outputs lose nothing and litter nothing: no output over an input, no temp folder outliving its run,
SIGTERM like Ctrl-C, a full disk as one line."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_peft_lora
from safetensors.torch import load_file

from adaptkit.cli.main import main
from adaptkit.demo import build_tiny_model


@pytest.fixture(scope="module")
def lora(tiny_llama, tmp_path_factory):
    return make_peft_lora(tiny_llama, tmp_path_factory.mktemp("out-lora") / "lora", seed=2)


def merge(*args) -> object:
    return CliRunner().invoke(main, ["merge", *map(str, args), "-q"])


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_output_over_an_input_is_refused(tiny_llama, lora, tmp_path):
    before_base, before_lora = snapshot(tiny_llama), snapshot(lora)
    for out in (tiny_llama, lora, tiny_llama / "sub", tiny_llama.parent):
        result = merge(tiny_llama, lora, "-o", out, "--force")
        assert result.exit_code == 1 and "which this command reads" in result.output, out
        assert result.output.count("\n") == 1
    assert snapshot(tiny_llama) == before_base and snapshot(lora) == before_lora


def test_temp_folders_of_dead_runs_are_removed(tiny_llama, lora, tmp_path):
    out = tmp_path / "merged"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / f".merged.tmp-{dead.pid}-abc", tmp_path / ".merged.tmp-legacy", tmp_path / f".merged.old-{dead.pid}"]
    live = tmp_path / f".merged.tmp-{os.getppid()}-live"  # a run still going (our parent process is alive)
    for folder in [*stale, live]:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    assert merge(tiny_llama, lora, "-o", out).exit_code == 0
    assert not any(p.exists() for p in stale) and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "merged"])


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_llama, lora, tmp_path, monkeypatch):
    from adaptkit.formats import checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_shard", full)
    result = merge(tiny_llama, lora, "-o", tmp_path / "merged")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "No space left on device" in result.output and "nothing was written" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def slow_base(tmp_path_factory):
    """A base of many small shards, so a merge takes long enough to be killed in the middle."""
    root = tmp_path_factory.mktemp("slow")
    base = build_tiny_model(root / "base", "llama", hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                            max_shard_size="200KB")
    adapter = make_peft_lora(base, root / "lora", seed=5, target_modules=["q_proj", "v_proj", "down_proj"])
    reference = root / "reference"
    assert merge(base, adapter, "-o", reference).exit_code == 0
    return base, adapter, reference


def _merge_process(base, adapter, out) -> subprocess.Popen:
    code = "import sys; from adaptkit.cli.main import main; sys.argv = ['adaptkit'] + sys.argv[1:]; main()"
    return subprocess.Popen([sys.executable, "-c", code, "merge", str(base), str(adapter), "-o", str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_temp(out: Path, process: subprocess.Popen) -> Path:
    end = time.monotonic() + 120
    while time.monotonic() < end and process.poll() is None:
        found = [p for p in out.parent.glob(f".{out.name}.tmp-*") if any(p.glob("*.safetensors"))]
        if found:
            return found[0]
        time.sleep(0.005)
    raise AssertionError(f"no temporary folder appeared (exit {process.poll()}): {process.stderr.read()}")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_merge_killed_midway_then_rerun(slow_base, tmp_path, how):
    """Killed while writing shards: nothing at OUT; SIGTERM cleans up itself, SIGKILL's leftover is removed by
    the next run; the re-run equals the reference merge bit for bit."""
    base, adapter, reference = slow_base
    out = tmp_path / "merged"
    process = _merge_process(base, adapter, out)
    temp = _wait_for_temp(out, process)
    process.send_signal(signal.SIGSTOP)  # frozen mid-write at once, however busy this machine is
    process.send_signal(getattr(signal, how))
    process.send_signal(signal.SIGCONT)
    code = process.wait(60)
    assert not out.exists()
    if how == "SIGTERM":
        stderr = process.stderr.read()
        assert code == 130 and "interrupted" in stderr, stderr
        assert not temp.exists()
    else:
        assert code == -signal.SIGKILL and temp.exists()
    assert merge(base, adapter, "-o", out).exit_code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    assert snapshot(out).keys() == snapshot(reference).keys()
    for name in (p for p in snapshot(out) if str(p).endswith(".safetensors")):
        expected, got = load_file(str(reference / name)), load_file(str(out / name))
        assert expected.keys() == got.keys() and all((expected[k] == got[k]).all() for k in expected)


def test_an_interrupt_that_a_library_turned_into_another_error_still_reads_as_interrupted(tiny_llama, lora,
                                                                                         tmp_path, monkeypatch):
    """A signal landing inside safetensors' reader comes out as a ValueError ("could not determine the shape of
    object type 'torch.storage.UntypedStorage'", seen once in CI): still exit 130 and one line, no traceback."""
    import adaptkit as ak

    cli = sys.modules[main.__module__]

    def cut_short(*args, **kwargs):
        cli._signalled.append(signal.SIGTERM)  # what the SIGTERM handler records before raising
        raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")

    monkeypatch.setattr(ak, "merge_checkpoint", cut_short)
    monkeypatch.setattr(cli, "_signalled", [])
    result = merge(tiny_llama, lora, "-o", tmp_path / "merged")
    assert (result.exit_code, result.output.strip()) == (130, "error: interrupted; outputs in progress were removed")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_respect_the_umask(tiny_llama, lora, tmp_path, umask):
    """Folders and files come out as ``save_pretrained``'s would: 0777/0666 less the umask (temporary folders
    and some writers create them private)."""
    from adaptkit.export import export_prefix_cache

    previous = os.umask(umask)
    try:
        merged = tmp_path / "merged"
        assert merge(tiny_llama, lora, "-o", merged).exit_code == 0
        onnx = CliRunner().invoke(main, ["export", "onnx", str(tiny_llama), "-o", str(tmp_path / "m.onnx")])
        assert onnx.exit_code == 0, onnx.output
        from serve_helpers import write_adapters

        prefix = write_adapters(tiny_llama, tmp_path / "adapters", names=("prefix",))["prefix"]
        export_prefix_cache(prefix, tiny_llama, tmp_path / "prefix.safetensors")
    finally:
        os.umask(previous)
    written = [merged, *merged.iterdir(), tmp_path / "m.onnx", tmp_path / "prefix.safetensors"]
    for path in written:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == expected, (path, oct(path.stat().st_mode & 0o777))
