"""What a training method's setup gets and gives (``methods.py``, ``virtual.py``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from adaptkit.compositions import RowEntry
from adaptkit.training.data import Objective


@dataclass
class SetupContext:
    """What a method setup gets: the engine holding the base, the engine name to attach under,
    the training objective and the name written inside AdapterHub files."""

    engine: object
    name: str
    objective: Objective
    hub_name: str


@dataclass
class MethodSetup:
    """A method ready to train.

    ``trainable`` holds every trained parameter (its state dict is what a checkpoint holds);
    ``entry`` is the routing entry of every row; ``virtual`` builds, from the current parameters,
    the prefix/prompt adapter a forward puts into the model's inputs; ``save`` writes the
    deployment layout into a folder; ``pretrain`` is PPT's unlabeled stage (data path, epochs).
    """

    trainable: nn.Module
    entry: RowEntry
    save: Callable[[Path], None]
    options: dict
    virtual: Callable[[], object] | None = None
    make_optimizer: Callable | None = None
    pretrain: dict | None = field(default=None)


def adamw(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def base_class_of(ctx: SetupContext) -> str:
    return type(ctx.engine.model).__name__
