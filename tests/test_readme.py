"""README's examples run as written, in order, on the files ``adaptkit demo --workdir demo`` keeps.

The demo runs on its tiny random model here (``ADAPTKIT_DEMO_MODEL=random``: no download, seconds;
``ADAPTKIT_README_MODEL=smollm2`` runs README on the real model instead, as a user would, in minutes);
the commands and code are README's own. Bash lines run in a shell (``adaptkit serve`` in the
background until the end, on a free port in place of README's 8000), YAML blocks marked
``file=PATH`` are written there, Python blocks are executed. The set-up commands (pip) are skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from serve_helpers import wait_until

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)


def blocks() -> list[tuple[str, str, str]]:
    """(language, info after it, body) of every fenced block with a language, in order."""
    return [(m.group(1), m.group(2).strip(), m.group(3)) for m in BLOCK.finditer(README.read_text())]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_blocks_are_found():
    kinds = [lang for lang, _, _ in blocks()]
    assert kinds.count("python") >= 4 and kinds.count("bash") >= 6 and kinds.count("yaml") == 2


def test_every_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "ADAPTKIT_DEMO_MODEL": os.environ.get("ADAPTKIT_README_MODEL", "random"), "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ports, servers, ran = {str(8000 + i): str(free_port()) for i in range(4)}, [], []
    try:
        for lang, info, body in blocks():
            if "pip install" in body:
                continue  # the set-up commands: this environment is the one they make
            body = re.sub(r"\b800[0-3]\b", lambda m: ports[m.group(0)], body)
            if lang == "yaml":
                target = re.fullmatch(r"file=(\S+)", info)
                assert target, f"a YAML block needs file=PATH to be runnable: {body[:60]!r}"
                Path(target.group(1)).write_text(body)
            elif lang == "bash":
                for line in _commands(body):
                    if line.startswith("adaptkit serve"):
                        servers.append(_start_server(line, env, tmp_path))
                        continue
                    done = subprocess.run(line, shell=True, env=env, capture_output=True, text=True, timeout=600)
                    assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
                    if "--verify" in line and "--quantize" not in line:
                        assert done.stdout.rstrip().endswith(": fine"), done.stdout
                    ran.append(line)
            elif lang == "python":
                exec(compile(body, f"README python block {len(ran)}", "exec"), {"__name__": "__readme__"})
                ran.append(body.splitlines()[0])
    finally:
        for server in servers:  # the shell and the server it started: the whole process group
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    out = capsys.readouterr().out
    assert "'accuracy'" in out and "'pos'" in out  # the training block printed its evaluation and probabilities
    assert Path("demo/onnx/model.onnx").is_file() and Path("demo/merged-mergekit/config.json").is_file()
    assert Path("demo/json.gguf").is_file() and Path("demo/json-lora.gguf").is_file()
    assert len(ran) >= 20


def _commands(body: str) -> list[str]:
    """The commands of a bash block: comments dropped, backslash continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", body)
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _start_server(line: str, env: dict, folder: Path) -> subprocess.Popen:
    port = re.search(r"--port (\d+)", line).group(1)
    log_path = folder / f"serve-{port}.log"
    log = open(log_path, "w")
    server = subprocess.Popen(line, shell=True, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy():
        if server.poll() is not None:
            raise AssertionError(f"{line} exited: {log_path.read_text()}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, f"{line} to answer /health", limit=120, every=0.2)
    return server


@pytest.fixture(autouse=True)
def _no_stray_demo(tmp_path):
    yield
    shutil.rmtree(tmp_path / "demo", ignore_errors=True)
