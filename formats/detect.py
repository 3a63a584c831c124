"""Which reader a path needs: the layout is detected from the files on disk."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from adaptkit.adapters.lora import LoraAdapter
from adaptkit.errors import AdapterFormatError, UnsupportedAdapterError
from adaptkit.formats import adapterhub, peft, peft_prompt, pet, prefix_file
from adaptkit.hub import local_path


def read_adapter(path: str | os.PathLike):
    """Read any supported adapter (PEFT folder, AdapterHub folder, adaptkit file or PET folder) from ``path``."""
    _, read = _reader_for(local_path(path))
    return read()


def is_model_folder(path: str | os.PathLike) -> bool:
    """True for a model checkpoint folder (config.json and model weights, no adapter config): a full
    fine-tune where a merge takes adapters."""
    from adaptkit.formats.checkpoint import BIN_INDEX, SAFE_INDEX

    folder = local_path(path)
    weights = ("model.safetensors", SAFE_INDEX, "pytorch_model.bin", BIN_INDEX)
    return (folder.is_dir() and (folder / "config.json").is_file() and not (folder / peft.CONFIG_NAME).exists()
            and any((folder / name).is_file() for name in weights))


def detect_kind(path: str | os.PathLike) -> str:
    """The kind of the adapter at ``path`` from its config files alone (no tensor is read): ``lora``,
    ``prefix``, ``prompt``, ``bottleneck``, ``fusion`` or ``pet``. Raises as :func:`read_adapter` would
    for a folder that is not a supported adapter."""
    kind, _ = _reader_for(local_path(path))
    return kind


def _reader_for(path: Path):
    """(kind, a call that reads the adapter) for ``path``: the one place the layout is told from the files."""
    if prefix_file.is_prefix_file(path):
        return "prefix", lambda: prefix_file.read_prefix_file(path)
    if pet.is_pet_folder(path):  # before PEFT: a PET folder also holds its LoRA's adapter_config.json
        return "pet", lambda: pet.read_pet(path)
    if (path / adapterhub.FUSION_CONFIG_NAME).is_file():
        return "fusion", lambda: adapterhub.read_fusion(path)
    if (path / adapterhub.SETUP_NAME).is_file() and not (path / peft.CONFIG_NAME).is_file():
        raise adapterhub.setup_error(path)
    config = peft.read_config(path)
    if peft.is_peft_config(config):
        peft_type = str(config["peft_type"])
        from adaptkit.formats import peft_types

        if peft_type in peft_types.PEFT_TYPES:  # AdaLoRA, VeRA, LoHa, LoKr, (IA)^3: weight deltas, LoRA-family
            return "lora", lambda: peft_types.read_peft_type(path, config)
        kind = peft.PEFT_TYPES.get(peft_type)
        if kind is None:
            known = ", ".join(sorted({*peft.PEFT_TYPES, *peft_types.PEFT_TYPES}))
            raise UnsupportedAdapterError(
                f"{path / peft.CONFIG_NAME}: peft_type {peft_type!r} is not supported; supported: {known}"
            )
        readers = {"lora": ("lora", peft.read_lora), "prefix": ("prefix", peft_prompt.read_prefix),
                   "ptuning": ("prompt", peft_prompt.read_prompt), "prompt": ("prompt", peft_prompt.read_prompt)}
        if kind not in readers:
            raise UnsupportedAdapterError(f"{path}: {peft_type} adapters cannot be loaded by this version")
        served_as, reader = readers[kind]
        return served_as, lambda: reader(path, config)
    if adapterhub.is_adapterhub_config(config):
        return "bottleneck", lambda: adapterhub.read_bottleneck(path, config)
    raise AdapterFormatError(
        f"{path / peft.CONFIG_NAME}: neither a PEFT config (no 'peft_type') nor an AdapterHub config (no 'config')"
    )


def load_lora_adapters(adapters: Sequence) -> list[LoraAdapter]:
    """Read adapter paths (or take loaded adapters); only the LoRA family merges into weights."""
    loaded = [a if isinstance(a, LoraAdapter) else read_adapter(a) for a in adapters]
    for adapter in loaded:
        if not isinstance(adapter, LoraAdapter):
            raise UnsupportedAdapterError(
                f"{adapter.source}: a {adapter.kind} adapter cannot be merged into weights; only LoRA-family adapters can"
            )
    return loaded
