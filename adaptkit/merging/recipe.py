"""Merge recipes: a whole merge described in a YAML or JSON file (``adaptkit merge --recipe r.yaml``).

::

    method: ties                 # a name from adaptkit.merging.methods (default: linear)
    parameters: {density: 0.5}   # density, seed, rank: what the method takes
    base: ../models/base         # required when into: checkpoint
    into: checkpoint             # checkpoint (default) | adapter
    out: merged                  # the folder written
    dtype: bfloat16              # checkpoint only (default: as stored)
    adapters:                    # a path, or {path, weight}
      - {path: sql, weight: 0.7}
      - tone

mergekit's YAML configs are accepted too (``merge_method``, ``models``, ``base_model``; see
:mod:`adaptkit.merging.mergekit`). Relative paths are relative to the recipe file. Every problem is reported with the file, the line
and the field (``r.yaml:7: adapters[1].weight: ...``) before anything is read or written.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from adaptkit.errors import AdaptkitError, InvalidArgumentError

FIELDS = ("adapters", "base", "dtype", "into", "method", "out", "parameters")
ADAPTER_FIELDS = ("path", "weight")
PARAMETERS = ("density", "rank", "seed", "normalize")
INTO = ("adapter", "checkpoint")


@dataclass(frozen=True)
class Recipe:
    """A validated merge recipe (paths resolved against the recipe's folder)."""

    source: Path
    method: str
    into: str
    out: Path
    adapters: tuple[Path, ...]
    weights: tuple[float, ...]
    base: Path | None = None
    dtype: str | None = None
    parameters: dict = field(default_factory=dict)
    scale: float = 1.0  # a factor on the combined delta (mergekit's lambda where weights cannot carry it)


def _line_table(text: str) -> dict[tuple, int]:
    """1-based line of every field path (``("adapters", 1, "weight")``) in a YAML/JSON document."""
    import yaml

    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[(*path, key.value)] = key.start_mark.line + 1
                walk(value, (*path, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, i)] = item.start_mark.line + 1
                walk(item, (*path, i))

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        lines[()] = root.start_mark.line + 1
        walk(root, ())
    return lines


def _parse(path: Path, text: str):
    """The document's data, with syntax errors reported at their line."""
    import yaml

    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # events are not expanded: cheap for any input
            if isinstance(event, (yaml.AliasEvent,)) or getattr(event, "anchor", None):
                raise InvalidArgumentError(
                    f"{path}:{event.start_mark.line + 1}: YAML anchors and aliases (&name, *name) are not accepted in "
                    "recipes (they can expand without bound); write the values out")
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise InvalidArgumentError(f"{where}: not valid YAML ({problem})") from None


class _Checker:
    """Raises errors that name the file, the line and the field path."""

    def __init__(self, source: Path, lines: dict[tuple, int]):
        self.source, self.lines = source, lines

    def fail(self, path: tuple, message: str):
        line = next((self.lines[path[:n]] for n in range(len(path), -1, -1) if path[:n] in self.lines), None)
        name = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(path))
        where = f"{self.source}:{line}" if line else str(self.source)
        raise InvalidArgumentError(f"{where}: {name + ': ' if name else ''}{message}")

    def mapping(self, value, path: tuple, known: tuple[str, ...]) -> dict:
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping with fields {', '.join(known)}, got {type(value).__name__}")
        for key in value:
            if key not in known:
                self.fail((*path, key), f"unknown field {key!r}; known fields: {', '.join(known)}")
        return value

    def text(self, value, path: tuple) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(path, f"expected a non-empty string, got {value!r}")
        return value

    def number(self, value, path: tuple) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(path, f"expected a finite number, got {value!r}")
        return float(value)

    def output_folder(self, value, path: tuple) -> Path:
        """An output: relative to the recipe file and inside its folder (a recipe cannot write elsewhere)."""
        given = Path(self.text(value, path))
        root = self.source.parent.resolve()
        folder = (root / given).resolve()
        if given.is_absolute() or not (folder == root or root in folder.parents):
            self.fail(path, f"{str(given)!r} leads outside the recipe's folder {str(root)!r}; give a path relative to "
                            "the recipe that stays inside it, or pass -o OUT on the command line")
        return folder

    def folder(self, value, path: tuple, must_exist: bool = True) -> Path:
        folder = Path(self.text(value, path))
        folder = folder if folder.is_absolute() else self.source.parent / folder
        if must_exist and not folder.exists():
            self.fail(path, f"no such folder {str(folder)!r} (relative paths are relative to the recipe file)")
        return folder


def load_recipe(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Recipe:
    """Read and validate a recipe; every error names the file, line and field.

    ``out`` (``adaptkit merge --recipe r.yaml -o OUT``) replaces the recipe's own ``out``, which must
    otherwise stay inside the recipe's folder.
    """
    from adaptkit.merging.methods import check_method, make_method

    source = Path(path)
    if not source.is_file():
        raise InvalidArgumentError(f"{source}: no such recipe file")
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") \
            from None
    data = _parse(source, text)
    check = _Checker(source, _line_table(text))
    from adaptkit.merging import mergekit

    if mergekit.is_mergekit(data):
        return mergekit.translate(data, check, out)
    check.mapping(data, (), FIELDS)
    for required in ("adapters",) if out is not None else ("adapters", "out"):
        if required not in data:
            check.fail((), f"missing required field {required!r}")

    into = data.get("into", "checkpoint")
    if into not in INTO:
        check.fail(("into",), f"expected one of {', '.join(INTO)}, got {into!r}")
    method = check.text(data.get("method", "linear"), ("method",))
    params = check.mapping(data.get("parameters") or {}, ("parameters",), PARAMETERS)
    try:
        takes = check_method(method).parameters
    except AdaptkitError as exc:
        check.fail(("method",), str(exc))
    for key in params:
        if key not in takes and not (key == "rank" and into == "adapter"):
            check.fail(("parameters", key), f"method {method!r} does not take {key} (it takes {', '.join(takes) or 'none'})")
    try:
        # into: adapter, a rank the method does not take is the rank its result is factored at (combine_adapters)
        make_method(method, **{k: v for k, v in params.items() if k in takes})
    except AdaptkitError as exc:
        named = [k for k in params if str(exc).startswith(k) or f" {k} " in str(exc)]
        check.fail(("parameters", named[0]) if named else ("method",), str(exc))

    adapters = data["adapters"]
    if not isinstance(adapters, list) or not adapters:
        check.fail(("adapters",), "expected a non-empty list of adapter paths or {path, weight} entries")
    paths, weights = [], []
    for i, entry in enumerate(adapters):
        if isinstance(entry, str):
            entry = {"path": entry}
        check.mapping(entry, ("adapters", i), ADAPTER_FIELDS)
        if "path" not in entry:
            check.fail(("adapters", i), "missing required field 'path'")
        paths.append(check.folder(entry["path"], ("adapters", i, "path")))
        weights.append(check.number(entry.get("weight", 1.0), ("adapters", i, "weight")))
    if all(w == 0 for w in weights):
        check.fail(("adapters",), "every weight is zero: the merge would change nothing")

    base = None
    if into == "checkpoint":
        if "base" not in data:
            check.fail((), "missing required field 'base' (into: checkpoint merges into a base model)")
        base = check.folder(data["base"], ("base",))
    elif "base" in data or "dtype" in data:
        check.fail(("base" if "base" in data else "dtype",), "into: adapter writes a LoRA; base and dtype apply to checkpoints")
    elif len(paths) < 2:
        check.fail(("adapters",), "into: adapter needs at least two adapters to combine")
    dtype = data.get("dtype")
    if dtype is not None:
        from adaptkit.base import parse_dtype

        try:
            parse_dtype(check.text(dtype, ("dtype",)))
        except AdaptkitError as exc:
            check.fail(("dtype",), str(exc))
    return Recipe(
        source=source, method=method, into=into,
        out=Path(out) if out is not None else check.output_folder(data["out"], ("out",)),
        adapters=tuple(paths), weights=tuple(weights), base=base, dtype=dtype, parameters=dict(params),
    )


def run_recipe(recipe: Recipe, force: bool = False, progress: bool = True):
    """Run a loaded recipe: the merged checkpoint's path, or the :class:`~adaptkit.merging.combine.Combined` adapter."""
    if recipe.into == "adapter":
        from adaptkit.merging.combine import combine_adapters

        return combine_adapters(list(recipe.adapters), list(recipe.weights), recipe.method, out=recipe.out,
                                force=force, progress=progress, **recipe.parameters)
    from adaptkit.merging.checkpoint import merge_checkpoint
    from adaptkit.merging.methods import Scaled, make_method

    method = make_method(recipe.method, **recipe.parameters)
    return merge_checkpoint(recipe.base, list(recipe.adapters), recipe.out, weights=list(recipe.weights),
                            dtype=recipe.dtype, method=Scaled(method, recipe.scale) if recipe.scale != 1.0 else method,
                            force=force, progress=progress)
