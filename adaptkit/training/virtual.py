"""Training setups of the prefix and prompt families: the unfolded forms, through the model's inputs.

The runtime holds these adapters folded (``adapters/prefix.py``, ``adapters/prompt.py``); training
runs what folds to them, every step, with the adapters' own fold functions, and hands the result
to the engine's input builder (``prefix_cache.add_virtual_inputs``) as a fresh adapter object:

- prefix tuning: ``F = fold_prefix_mlp(E, W_1, b_1, W_2, b_2)`` -> K/V (``prefix_from_flat``) -> DynamicCache
- P-tuning v2: the flat ``F`` [P, L*2*H_kv*D] itself -> K/V -> DynamicCache
- prompt tuning / PPT: the soft prompt [P, hidden] -> ``inputs_embeds`` (never the K/V cache, which
  the engine computes once under ``no_grad``)
- P-tuning: ``fold_mlp_encoder((BiLSTM)(E))`` -> ``inputs_embeds``

Encoders are saved beside the folded adapter (``encoder/``, PEFT names) to continue training from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from adaptkit.adapters.prefix import PrefixAdapter, PrefixConfig, fold_prefix_mlp, prefix_from_flat
from adaptkit.adapters.prompt import PromptAdapter, PromptConfig, fold_mlp_encoder
from adaptkit.errors import InvalidArgumentError
from adaptkit.training.setup import MethodSetup, SetupContext, base_class_of


# ----------------------------------------------------------------------------- prefix family
def _prefix_config(ctx: SetupContext, tokens: int, method: str) -> PrefixConfig:
    from adaptkit.adapters.prefix import takes_prefix

    facts = ctx.engine.base.facts
    if not takes_prefix(facts):
        raise InvalidArgumentError(f"prefix tuning needs attention that takes extra keys and values; the base is a "
                                   f"{facts.model_type} encoder without it (use --method prompt or bottleneck there)")
    return PrefixConfig(int(tokens), facts.num_layers, facts.num_kv_heads, facts.head_dim, method=method)


class PrefixMLP(nn.Module):
    """Prefix tuning's reparameterisation, named as PEFT names it (``embedding``, ``transform.0``,
    ``transform.2``); the math is :func:`~adaptkit.adapters.prefix.fold_prefix_mlp`.

    ``embedding`` [P, H_kv*D] -> Linear [h] -> tanh -> Linear [L*2*H_kv*D].
    """

    def __init__(self, config: PrefixConfig, hidden: int):
        super().__init__()
        self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
        self.transform = nn.Sequential(nn.Linear(config.token_dim, hidden), nn.Tanh(),
                                       nn.Linear(hidden, config.flat_width))

    def flat(self) -> torch.Tensor:
        first, last = self.transform[0], self.transform[2]
        return fold_prefix_mlp(self.embedding.weight, first.weight, first.bias, last.weight, last.bias)


def _prefix_setup(ctx: SetupContext, config: PrefixConfig, trainable: nn.Module, flat: Callable, options: dict,
                  encoder_fields: dict | None) -> MethodSetup:
    from adaptkit.formats.peft_prompt import write_prefix, write_prompt_encoder

    engine = ctx.engine

    def prefix_adapter() -> PrefixAdapter:
        keys, values = prefix_from_flat(flat(), config)
        return PrefixAdapter(config, keys.to(engine.base.dtype), values.to(engine.base.dtype),
                             fingerprint=engine.base.fingerprint, base_class=base_class_of(ctx))

    def save(folder: Path) -> None:
        with torch.no_grad():
            adapter = prefix_adapter()
        write_prefix(adapter, folder)
        if encoder_fields is not None:  # the unfolded encoder, to continue training from
            write_prompt_encoder(adapter, trainable.state_dict(), folder / "encoder", **encoder_fields)

    return MethodSetup(trainable.to(engine.device), ctx.name, save, options, virtual=prefix_adapter)


def setup_prefix(ctx: SetupContext, virtual_tokens: int = 8, encoder_hidden: int | None = None) -> MethodSetup:
    """Prefix tuning: K/V of ``virtual_tokens`` positions in every layer, trained through an MLP."""
    config = _prefix_config(ctx, virtual_tokens, "prefix_tuning")
    hidden = int(encoder_hidden or config.token_dim)
    encoder = PrefixMLP(config, hidden)
    fields = {"prefix_projection": True, "encoder_hidden_size": hidden}
    options = {"virtual_tokens": config.num_virtual_tokens, "encoder_hidden": hidden}
    return _prefix_setup(ctx, config, encoder, encoder.flat, options, fields)


def setup_ptuning2(ctx: SetupContext, virtual_tokens: int = 8) -> MethodSetup:
    """P-tuning v2: the per-layer K/V trained directly (PEFT's ``embedding`` [P, L*2*H_kv*D], N(0, 1))."""
    config = _prefix_config(ctx, virtual_tokens, "p_tuning_v2")
    table = nn.Embedding(config.num_virtual_tokens, config.flat_width)
    return _prefix_setup(ctx, config, table, lambda: table.weight, {"virtual_tokens": config.num_virtual_tokens}, None)


# ----------------------------------------------------------------------------- prompt family
PROMPT_INITS = ("random", "vocab", "text")


def _initial_prompt(ctx: SetupContext, tokens: int, init: str, init_text: str | None) -> torch.Tensor:
    """[P, hidden]: ``random`` (normal, the std of the base's embeddings), ``vocab`` (embeddings of
    random vocabulary tokens) or ``text`` (embeddings of ``init_text``'s tokens, repeated to P)."""
    table = ctx.engine.model.get_input_embeddings().weight.detach().float()
    if init == "random":
        return torch.randn(tokens, table.shape[1]) * table.std()
    if init == "vocab":
        return table[torch.randint(0, table.shape[0], (tokens,))].cpu().clone()
    if init == "text":
        ids = ctx.engine.tokenizer(init_text or "", add_special_tokens=False)["input_ids"] if init_text else []
        if not ids:
            raise InvalidArgumentError("prompt init 'text' needs a non-empty init_text (--prompt-init-text)")
        ids = (ids * math.ceil(tokens / len(ids)))[:tokens]
        return table[torch.tensor(ids)].cpu().clone()
    raise InvalidArgumentError(f"prompt init {init!r} is unknown; known: {', '.join(PROMPT_INITS)}")


class PromptEncoder(nn.Module):
    """P-tuning's prompt encoder, named as PEFT names it; the MLP math is
    :func:`~adaptkit.adapters.prompt.fold_mlp_encoder`.

    mlp:  ``embedding`` [P, hidden] -> Linear h, ReLU, Linear h, ReLU, Linear hidden
    lstm: ``embedding`` -> BiLSTM (2 layers, h per direction) -> Linear 2h, ReLU, Linear hidden
    """

    def __init__(self, tokens: int, width: int, encoder: str, hidden: int):
        super().__init__()
        self.embedding = nn.Embedding(tokens, width)
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(width, hidden, num_layers=2, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, width))
        elif encoder == "mlp":
            self.lstm_head = None
            self.mlp_head = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, width))
        else:
            raise InvalidArgumentError(f"P-tuning encoder {encoder!r} is unknown; known: lstm, mlp")

    def embeddings(self) -> torch.Tensor:
        inputs = self.embedding.weight
        if self.lstm_head is not None:
            inputs = self.lstm_head(inputs.unsqueeze(0))[0][0]  # [P, 2h]
        linears = [(layer.weight, layer.bias) for layer in self.mlp_head if isinstance(layer, nn.Linear)]
        return fold_mlp_encoder(inputs, linears)


def _prompt_setup(ctx: SetupContext, config: PromptConfig, trainable: nn.Module, embeddings: Callable,
                  options: dict, encoder_fields: dict | None = None, pretrain: dict | None = None) -> MethodSetup:
    from adaptkit.formats.peft_prompt import write_prompt, write_prompt_encoder

    engine = ctx.engine

    def prompt_adapter() -> PromptAdapter:
        return PromptAdapter(config, embeddings().to(engine.base.dtype), fingerprint=engine.base.fingerprint,
                             base_class=base_class_of(ctx))

    def save(folder: Path) -> None:
        with torch.no_grad():
            adapter = prompt_adapter()
        write_prompt(adapter, folder)
        if encoder_fields is not None:
            write_prompt_encoder(adapter, trainable.state_dict(), folder / "encoder", **encoder_fields)

    return MethodSetup(trainable.to(engine.device), ctx.name, save, options, virtual=prompt_adapter, pretrain=pretrain)


def setup_prompt(ctx: SetupContext, virtual_tokens: int = 8, init: str = "random", init_text: str | None = None,
                 _method: str = "prompt_tuning", _pretrain: dict | None = None) -> MethodSetup:
    """Prompt tuning: ``virtual_tokens`` soft embeddings prepended to the input."""
    width = ctx.engine.base.facts.hidden_size
    table = nn.Embedding(int(virtual_tokens), width)
    with torch.no_grad():
        table.weight.copy_(_initial_prompt(ctx, int(virtual_tokens), init, init_text))
    config = PromptConfig(int(virtual_tokens), width, method=_method)
    options = {"virtual_tokens": config.num_virtual_tokens, "init": init, "init_text": init_text}
    return _prompt_setup(ctx, config, table, lambda: table.weight, options, pretrain=_pretrain)


def setup_ptuning(ctx: SetupContext, virtual_tokens: int = 8, encoder: str = "mlp",
                  encoder_hidden: int | None = None) -> MethodSetup:
    """P-tuning (v1): the soft prompt is the output of an MLP or BiLSTM+MLP prompt encoder."""
    width = ctx.engine.base.facts.hidden_size
    hidden = int(encoder_hidden or width)
    module = PromptEncoder(int(virtual_tokens), width, encoder, hidden)
    config = PromptConfig(int(virtual_tokens), width, method="p_tuning", encoder=encoder)
    fields = {"encoder_hidden_size": hidden, "encoder_reparameterization_type": encoder.upper(), "encoder_num_layers": 2}
    options = {"virtual_tokens": config.num_virtual_tokens, "encoder": encoder, "encoder_hidden": hidden}
    return _prompt_setup(ctx, config, module, module.embeddings, options, encoder_fields=fields)


def setup_ppt(ctx: SetupContext, pretrain_data=None, pretrain_epochs: int = 1, virtual_tokens: int = 8,
              init: str = "vocab", init_text: str | None = None) -> MethodSetup:
    """PPT: prompt tuning whose soft prompt is first trained on unlabeled ``{"text"}`` rows (LM loss)."""
    if pretrain_data is None:
        raise InvalidArgumentError("ppt pre-trains its prompt on unlabeled text: give pretrain_data "
                                   "(--pretrain-data FILE.jsonl of {\"text\"} rows)")
    pretrain = {"data": str(pretrain_data), "epochs": int(pretrain_epochs)}
    setup = setup_prompt(ctx, virtual_tokens, init, init_text, _method="ppt", _pretrain=pretrain)
    setup.options.update(pretrain_data=str(pretrain_data), pretrain_epochs=int(pretrain_epochs))
    return setup
