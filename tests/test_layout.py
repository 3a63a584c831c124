"""The package's shape: every module imports, and imports flow down (core <- capabilities <- cli).

The core is every module at the top of ``adaptkit/`` plus ``adapters/`` and ``formats/``; the
capabilities are the folders ``serving/``, ``training/``, ``benchmarking/`` and ``merging/``. The core
imports none of the capabilities, and a capability imports no other capability. Imports are read
from the source (module level and inside functions alike), so a lazy import cannot hide a wrong one.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import adaptkit

CAPABILITIES = ("serving", "training", "benchmarking", "merging")
# top-level modules that sit above the capabilities, as the CLI does: the built-in demo runs a merge
APPLICATIONS = {"adaptkit.demo"}


def all_modules() -> dict[str, Path]:
    """Every module of the installed package (cli/ and formats/ included), name -> source file."""
    found = {}
    for package in ("adaptkit", "adaptkit.cli", "adaptkit.formats"):  # the last two live in cli/, formats/
        module = importlib.import_module(package)
        found[package] = Path(module.__file__)
        for info in pkgutil.walk_packages(module.__path__, f"{package}."):
            found[info.name] = Path(importlib.util.find_spec(info.name).origin)
    return found


def imported_modules(name: str, path: Path) -> set[str]:
    """Absolute names of the adaptkit modules ``name``'s source imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:  # `from adaptkit import quant` imports the module adaptkit.quant
                candidate = f"{base}.{alias.name}"
                names.add(candidate if base.startswith("adaptkit") and _is_module(candidate) else base)
    return {n for n in names if n == "adaptkit" or n.startswith("adaptkit.")}


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def layer_of(module: str) -> str:
    """``core``, a capability's name, ``cli`` or ``application`` (the public facade ``adaptkit`` too)."""
    parts = module.split(".")
    if module in APPLICATIONS or module == "adaptkit":
        return "application"
    if len(parts) > 1 and parts[1] in (*CAPABILITIES, "cli"):
        return parts[1]
    return "core"


def test_every_module_imports():
    modules = all_modules()
    assert {"adaptkit.serving.server", "adaptkit.training.loop", "adaptkit.benchmarking.run",
            "adaptkit.merging.checkpoint", "adaptkit.merging.methods.ties", "adaptkit.cli.main"} <= set(modules)
    for name in modules:
        importlib.import_module(name)


def test_imports_flow_down():
    modules = all_modules()
    wrong = []
    for name, path in modules.items():
        here = layer_of(name)
        for target in imported_modules(name, path):
            there = layer_of(target)
            if there not in ("core", here) and here not in ("cli", "application"):
                wrong.append(f"{name} ({here}) imports {target} ({there})")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from adaptkit.serving import app\n    from ..training.loop import train\n")
    found = imported_modules("adaptkit.merging.x", source)
    assert {"adaptkit.serving.app", "adaptkit.training.loop"} <= found
    assert layer_of("adaptkit.serving.app") == "serving" and layer_of("adaptkit.engine") == "core"


@pytest.mark.parametrize("name", ["bench", "train", "merge_checkpoint", "combine_adapters", "merge_qlora_checkpoint"])
def test_public_functions_are_functions_whatever_was_imported_first(name):
    """No public function shares its name with a module: importing every module first changes nothing."""
    for module in all_modules():
        importlib.import_module(module)
    assert callable(getattr(adaptkit, name)) and not isinstance(getattr(adaptkit, name), type(adaptkit))
    assert importlib.util.find_spec(f"adaptkit.{name}") is None


# ----------------------------------------------------------------------------- declared dependencies
# the extra that installs a module's feature (first matching prefix); elsewhere: the core dependencies
EXTRA_OF_MODULE = {
    "adaptkit.serving.cluster": "ray", "adaptkit.serving.replica": "ray", "adaptkit.serving.gateway": "ray",
    "adaptkit.serving": "serve", "adaptkit.demo_model": "demo", "adaptkit.benchmarking.report": "bench",
    "adaptkit.formats.onnx": "onnx", "adaptkit.formats.gguf": "gguf",
}
# imported only behind a MissingDependencyError that says how to install it (a reference, never a dependency)
OPTIONAL = {"peft": "adaptkit.benchmarking.peft_side", "openai": "adaptkit.serving.server"}


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of the non-standard-library modules a source file imports, anywhere in it."""
    import sys

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "adaptkit"}


def declared_requirements() -> dict[str, set[str]]:
    """{"core" | extra: normalized distribution names} from pyproject.toml."""
    import re

    tomllib = pytest.importorskip("tomllib", reason="pyproject.toml is read with Python 3.11's tomllib")
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}

    return {"core": names(project["dependencies"])} | {
        extra: names(reqs) for extra, reqs in project["optional-dependencies"].items()}


def test_every_extra_declares_what_its_feature_imports():
    """An extra installed alone must bring every package its feature's modules import (a package that only
    another extra pulls in is a broken install): [demo] brings accelerate, which transformers needs for GGUF."""
    from importlib.metadata import packages_distributions

    distributions = packages_distributions()
    declared = declared_requirements()
    missing = []
    for name, path in all_modules().items():
        extra = next((e for prefix, e in EXTRA_OF_MODULE.items() if name == prefix or name.startswith(prefix + ".")),
                     None)
        allowed = declared["core"] | (declared[extra] if extra else set())
        for module in third_party_imports(path):
            if OPTIONAL.get(module) == name:
                continue
            dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
            if not dists & allowed:
                missing.append(f"{name} imports {module} ({', '.join(sorted(dists))}): not in {extra or 'core'}")
    assert missing == []
    # transformers reads GGUF (the demo's model) only with both of these; it imports them itself
    assert {"gguf", "accelerate"} <= declared["demo"]


def test_no_source_file_is_longer_than_a_sitting():
    """A module a reader can take in at once: none over 600 lines in adaptkit/, cli/ and formats/ (the engine
    keeps the facade and delegates; each command group has its module)."""
    root = Path(__file__).resolve().parents[1]
    long = {str(path.relative_to(root)): n for folder in ("adaptkit", "cli", "formats")
            for path in (root / folder).rglob("*.py") if (n := len(path.read_text().splitlines())) > 600}
    assert not long, long
