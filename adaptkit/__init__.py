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
    "Average": "adaptkit.compositions",
    "Engine": "adaptkit.engine",
    "Fuse": "adaptkit.compositions",
    "Mix": "adaptkit.compositions",
    "Stack": "adaptkit.compositions",
    "bench": "adaptkit.benchmarking.run",
    "combine_adapters": "adaptkit.merging.combine",
    "merge_checkpoint": "adaptkit.merging.checkpoint",
    "merge_qlora_checkpoint": "adaptkit.merging.qlora",
    "quantize_base": "adaptkit.merging.qlora",
    "train": "adaptkit.training.loop",
}

__all__ = sorted(_PUBLIC)


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
    from adaptkit.benchmarking.run import bench
    from adaptkit.compositions import Average, Fuse, Mix, Stack
    from adaptkit.engine import AdapterInfo, Engine
    from adaptkit.errors import AdaptkitError
    from adaptkit.merging.checkpoint import merge_checkpoint
    from adaptkit.merging.combine import combine_adapters
    from adaptkit.merging.qlora import merge_qlora_checkpoint, quantize_base
    from adaptkit.training.loop import train
