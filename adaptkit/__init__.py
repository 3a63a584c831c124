"""adaptkit: the deployment end of parameter-efficient fine-tuning.

    import adaptkit as ak
    eng = ak.Engine.from_pretrained("path/to/base")
    eng.add_adapter("sql", "path/to/lora")
    eng.logits(ids, adapters=["sql", None])
"""

from adaptkit.engine import AdapterInfo, Engine
from adaptkit.errors import AdaptkitError
from adaptkit.merge import merge_checkpoint
from adaptkit.routing import Fuse, Mix, Stack

__all__ = ["AdaptkitError", "AdapterInfo", "Engine", "Fuse", "Mix", "Stack", "merge_checkpoint"]
__version__ = "0.1.0"
