"""adaptkit's PET layout: ``pet.json`` (pattern, verbalizer, scoring), and the LoRA beside it.

::

    pet.json                      {"format": "adaptkit-pet", "version": 1, "pattern": "{text} It was {mask}.",
                                   "verbalizer": {"pos": "great", "neg": "bad"}, "scoring": "causal" | "mlm",
                                   "lora": true | false, "base_fingerprint": ..., "base_class": ...}
    adapter_config.json           the LoRA in the PEFT layout (when "lora" is true), so PEFT loads the
    adapter_model.safetensors     folder's LoRA as it loads any other

A PET adapter trained by full fine-tuning has no LoRA: its model is saved as a base of its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from adaptkit.adapters.pet import PetAdapter, PetConfig
from adaptkit.errors import AdapterFormatError, AdaptkitError
from adaptkit.formats import peft

PET_FILE = "pet.json"
FORMAT = "adaptkit-pet"
VERSION = 1


def is_pet_folder(path: Path) -> bool:
    return (path / PET_FILE).is_file()


def read_pet(folder: str | os.PathLike) -> PetAdapter:
    """Read a PET folder (its LoRA through the PEFT reader)."""
    folder = Path(folder)
    path = folder / PET_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterFormatError(f"{path}: expected a JSON object with \"format\": \"{FORMAT}\"")
    if meta.get("version") != VERSION:
        raise AdapterFormatError(f"{path}: PET file version {meta.get('version')!r}; this adaptkit reads {VERSION}")
    missing = [k for k in ("pattern", "verbalizer", "scoring") if k not in meta]
    if missing:
        raise AdapterFormatError(f"{path}: {', '.join(missing)} missing")
    try:
        config = PetConfig(meta["pattern"], meta["verbalizer"])
        lora = peft.read_lora(folder) if meta.get("lora") else None
        return PetAdapter(config, meta["scoring"], lora=lora, fingerprint=meta.get("base_fingerprint"),
                          source=str(folder), base_class=meta.get("base_class"))
    except AdapterFormatError:
        raise
    except AdaptkitError as exc:
        raise AdapterFormatError(f"{path}: {exc}") from exc


def write_pet(adapter: PetAdapter, folder: str | os.PathLike) -> Path:
    """Write ``pet.json`` (and the LoRA in the PEFT layout beside it) into a (normally temporary) folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if adapter.lora is not None:
        peft.write_lora(adapter.lora, folder)
    meta = {"format": FORMAT, "version": VERSION, "pattern": adapter.config.pattern,
            "verbalizer": dict(adapter.config.verbalizer), "scoring": adapter.scoring, "lora": adapter.lora is not None,
            "base_fingerprint": adapter.fingerprint, "base_class": adapter.base_class}
    (folder / PET_FILE).write_text(json.dumps(meta, indent=2))
    return folder
