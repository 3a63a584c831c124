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

    try:
        return Path(snapshot_download(repo, revision=revision or None, cache_dir=cache_dir(),
                                      local_files_only=_offline()))
    except Exception as exc:
        offline = " (HF_HUB_OFFLINE is set: only the local cache is searched)" if _offline() else ""
        raise BaseModelError(
            f"{text}: no such file or folder, and as a Hugging Face Hub id it could not be resolved{offline}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def cached(repo: str) -> Path | None:
    """The local cache's snapshot of ``repo`` (an ``org/name`` id), or None; never downloads."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, cache_dir=cache_dir(), local_files_only=True))
    except Exception:  # not cached (or the cache unreadable): the caller looks elsewhere
        return None


def cache_dir() -> str | None:
    """huggingface_hub's cache folder, from the environment as it is now (a process may set it after importing)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")

