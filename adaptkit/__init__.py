"""adaptkit: the deployment end of parameter-efficient fine-tuning.

    import adaptkit as ak
    eng = ak.Engine.from_pretrained("path/to/base")
    eng.add_adapter("sql", "path/to/lora")
    eng.logits(ids, adapters=["sql", None])

Public names are imported on first use (``_PUBLIC`` below), so ``import adaptkit`` and
``adaptkit --help`` do not pay for torch and transformers until they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it (one static table; add new public names here)
_PUBLIC = {
    "AdaptkitError": "adaptkit.errors",
    "AdapterInfo": "adaptkit.engine",
    "Average": "adaptkit.routing",
    "Engine": "adaptkit.engine",
    "Fuse": "adaptkit.routing",
    "Mix": "adaptkit.routing",
    "Stack": "adaptkit.routing",
    "bench": "adaptkit.bench_run",
    "combine_adapters": "adaptkit.combine",
    "merge_checkpoint": "adaptkit.merge",
    "merge_qlora_checkpoint": "adaptkit.qlora",
    "quantize_base": "adaptkit.qlora",
    "train": "adaptkit.trainer",
}

__all__ = sorted(_PUBLIC)

# ``adaptkit.bench`` is also a submodule (the timing harness). Importing a submodule sets the package
# attribute of its name to the module, which would hide the function ``ak.bench`` whenever the
# harness was imported first. So it is imported now (it is light: no torch at import) and that
# attribute dropped; ``__getattr__`` below then resolves ``ak.bench`` to the function every time.
importlib.import_module("adaptkit.bench")
del globals()["bench"]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'adaptkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:  # for type checkers and IDEs
    from adaptkit.bench_run import bench
    from adaptkit.combine import combine_adapters
    from adaptkit.engine import AdapterInfo, Engine
    from adaptkit.errors import AdaptkitError
    from adaptkit.merge import merge_checkpoint
    from adaptkit.qlora import merge_qlora_checkpoint, quantize_base
    from adaptkit.routing import Average, Fuse, Mix, Stack
    from adaptkit.trainer import train
