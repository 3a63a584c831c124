"""Full checkpoints as transformers writes them: single or sharded safetensors (+ index), or ``.bin``.

Reading is shard by shard (memory-mapped safetensors); writing goes to a temporary folder that is
renamed into place only when complete (:func:`atomic_output_dir`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adaptkit.errors import BaseModelError, OutputExistsError, OutputWriteError
from adaptkit.hub import local_path

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
)


@dataclass(frozen=True)
class Checkpoint:
    """The weight files of a model folder and which tensor lives in which file."""

    folder: Path
    shards: tuple[Path, ...]
    is_safetensors: bool

    def keys_and_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name with its shape, read from headers only (safetensors) or a weights-only load."""
        shapes: dict[str, tuple[int, ...]] = {}
        for shard in self.shards:
            if self.is_safetensors:
                with safe_open(str(shard), framework="pt") as f:
                    for key in f.keys():
                        shapes[key] = tuple(f.get_slice(key).get_shape())
            else:
                for key, tensor in _load_bin(shard).items():
                    shapes[key] = tuple(tensor.shape)
        return shapes

    @functools.cached_property
    def _shard_of(self) -> dict[str, Path]:
        """Which safetensors shard holds each key (headers only, read once)."""
        where: dict[str, Path] = {}
        for shard in self.shards:
            with safe_open(str(shard), framework="pt") as f:
                where.update(dict.fromkeys(f.keys(), shard))
        return where

    def read_tensor(self, key: str) -> torch.Tensor:
        """One tensor, read from its shard alone (safetensors); a ``.bin`` shard is loaded whole to find it."""
        if self.is_safetensors:
            if key not in self._shard_of:
                raise KeyError(key)
            with safe_open(str(self._shard_of[key]), framework="pt") as f:
                return f.get_tensor(key)
        for shard in self.shards:
            state = _load_bin(shard)
            if key in state:
                return state[key]
        raise KeyError(key)

    def iter_shards(self) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
        """(shard path, its tensors) one shard at a time."""
        for shard in self.shards:
            if self.is_safetensors:
                with safe_open(str(shard), framework="pt") as f:
                    yield shard, {key: f.get_tensor(key) for key in f.keys()}
            else:
                yield shard, _load_bin(shard)


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)


def open_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """Find a model folder's weight files (safetensors preferred)."""
    folder = local_path(folder)
    for index_name, single, is_safe in ((SAFE_INDEX, "model.safetensors", True), (BIN_INDEX, "pytorch_model.bin", False)):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise BaseModelError(f"{index}: not a valid shard index ({exc})") from exc
            files = tuple(dict.fromkeys(folder / name for name in weight_map.values()))
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise BaseModelError(f"{index}: lists shard files that do not exist: {', '.join(missing)}")
            return Checkpoint(folder, files, is_safe)
        if (folder / single).is_file():
            return Checkpoint(folder, (folder / single,), is_safe)
    raise BaseModelError(f"{folder}: no model.safetensors, sharded safetensors index, or pytorch_model.bin")


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool = False, inputs=()) -> Iterator[Path]:
    """A temporary folder beside ``out``, renamed to ``out`` only if the block completes.

    An existing ``out`` is an error unless ``force``; then it is replaced only after success. ``out``
    may not be, hold or sit inside any of ``inputs`` (what the block reads): ``--force`` would
    otherwise replace the base being merged. Temporary folders that killed runs left beside ``out``
    are removed first (each carries its writer's process id).
    """
    out = Path(out)
    check_not_an_input(out, inputs)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; choose another output folder or pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        raise OutputWriteError(f"cannot write {out}: {exc}; choose a folder you can write to") from exc
    try:
        yield tmp
    except OSError as exc:  # disk full, read-only file system, ...
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputWriteError(f"writing {out} failed: {exc}; nothing was written (free some space or choose "
                               "another folder)") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    readable_as_saved(tmp)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def atomic_output_file(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """A temporary file path beside ``out``, renamed to ``out`` only if the block completes."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; choose another file name or pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent)
        os.close(handle)
    except OSError as exc:
        raise OutputWriteError(f"cannot write {out}: {exc}; choose a folder you can write to") from exc
    tmp = Path(name)
    try:
        yield tmp
        readable_as_saved(tmp)
        os.replace(tmp, out)
    except OSError as exc:
        raise OutputWriteError(f"writing {out} failed: {exc}; nothing was written") from exc
    finally:
        tmp.unlink(missing_ok=True)


def readable_as_saved(path: Path) -> None:
    """Give ``path`` (and what it holds) the permissions a plain ``save_pretrained`` would: 0666/0777 less
    the umask (temporary files and folders are created private, and some writers keep that)."""
    umask = os.umask(0)
    os.umask(umask)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)


def check_not_an_input(out: Path, inputs) -> None:
    """Refuse an output that is, holds or sits inside one of the paths being read."""
    target = out.resolve()
    for source in inputs:
        source = getattr(source, "source", source)  # a loaded adapter: the folder it was read from
        if source is None or not isinstance(source, (str, os.PathLike)):
            continue  # an adapter built in memory is not on disk
        source = Path(source).resolve()
        if target == source or target in source.parents or source in target.parents:
            raise OutputExistsError(f"output {out} would overwrite {source}, which this command reads; "
                                    "choose an output folder outside the inputs")


def remove_stale_temporaries(out: Path) -> int:
    """Remove ``.OUT.tmp-PID-*`` / ``.OUT.old-PID`` folders whose process is gone (and unnamed legacy ones)."""
    removed = 0
    for leftover in out.parent.glob(f".{out.name}.*"):
        kind, _, rest = leftover.name[len(out.name) + 2 :].partition("-")
        if kind not in ("tmp", "old"):
            continue
        pid = rest.split("-")[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_shard(tensors: dict[str, torch.Tensor], path: Path) -> int:
    """Write one safetensors shard; returns its bytes of tensor data."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def shard_names(n: int) -> list[str]:
    """transformers' file names for ``n`` output shards."""
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_shards(folder: Path, shards: Iterator[dict[str, torch.Tensor]], n_shards: int,
                 added: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``n_shards`` tensor dicts as safetensors shards (+ index when several), one in memory at a time.

    ``added`` tensors (which the input lacked, e.g. an untied lm_head) go into the last shard.
    """
    names = shard_names(n_shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, tensors in enumerate(shards):
        if i == n_shards - 1 and added:
            tensors.update(added)
        total += save_shard(tensors, folder / names[i])
        weight_map.update(dict.fromkeys(tensors, names[i]))
        del tensors
    if n_shards > 1:
        write_index(folder, weight_map, total)


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2))


def copy_side_files(src: Path, dst: Path, config_updates: dict | None = None) -> None:
    """Copy config, generation config and tokenizer files; apply ``config_updates`` to config.json."""
    src = local_path(src)
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if config_updates:
        config = json.loads((dst / "config.json").read_text())
        config.update(config_updates)
        (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
