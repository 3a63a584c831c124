"""Bases and adapters named by Hugging Face Hub id, as transformers, PEFT and vLLM users name them.

Everywhere adaptkit takes a path it also takes ``org/name`` or ``org/name@revision``: an existing
local path is used as it is; otherwise the id is resolved through ``huggingface_hub`` — the local
cache first (``HF_HOME``, ``HF_HUB_CACHE``), and with ``HF_HUB_OFFLINE=1`` nothing else.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from adaptkit.errors import BaseModelError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def local_path(source: str | os.PathLike) -> Path:
    """A local file or folder for ``source`` (a path, or a Hub id ``org/name[@revision]``)."""
    path = Path(source)
    text = str(source)
    if path.exists():
        return path
    repo, _, revision = text.partition("@")
    if not _HUB_ID.match(repo) or text.startswith((".", "/")):
        return path  # not an id: the caller reports the missing path
    from huggingface_hub import snapshot_download

    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub") if "HF_HOME" in os.environ
                                                  else None)  # read now: a process may set them after importing
    try:
        return Path(snapshot_download(repo, revision=revision or None, cache_dir=cache, local_files_only=_offline()))
    except Exception as exc:
        offline = " (HF_HUB_OFFLINE is set: only the local cache is searched)" if _offline() else ""
        raise BaseModelError(
            f"{text}: no such file or folder, and as a Hugging Face Hub id it could not be resolved{offline}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")

