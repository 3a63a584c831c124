"""Prompt tuning (Lester et al., 2021), P-tuning (Liu et al., 2021) and PPT (Gu et al., 2022).

All three prepend ``P`` learned vectors ("virtual tokens") to the input embeddings::

    h_0 = [E_virtual ; embed(x)]          E_virtual: [P, hidden]

They differ only in training: prompt tuning learns ``E_virtual`` directly; P-tuning produces it
with a prompt encoder (an MLP, or a bidirectional LSTM followed by an MLP) run on learned inputs;
PPT pre-trains the soft prompt on unlabeled text. At inference all three are the same
``E_virtual``: the encoder is run once at load and dropped.

On a causal LM the virtual tokens come first and see nothing after them, so their keys and
values in every layer are fixed: the engine computes them once and serves them as a prefix
(``prefix_cache.py``). On encoders the embeddings are prepended per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adaptkit.errors import AdapterMismatchError, UnsupportedAdapterError

KIND = "prompt"
METHODS = ("prompt_tuning", "p_tuning", "ppt")
ENCODERS = ("mlp", "lstm")  # P-tuning's prompt encoders (folded at load)


@dataclass(frozen=True)
class PromptConfig:
    """``num_virtual_tokens`` soft tokens of width ``token_dim`` (the base's hidden size)."""

    num_virtual_tokens: int
    token_dim: int
    method: str = "prompt_tuning"
    encoder: str | None = None  # the P-tuning encoder it was trained with ("mlp" | "lstm"), already folded

    def __post_init__(self):
        for name in ("num_virtual_tokens", "token_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UnsupportedAdapterError(f"prompt {name} must be a positive integer, got {value!r}")
        if self.method not in METHODS:
            raise UnsupportedAdapterError(f"prompt method {self.method!r} is unknown; known: {', '.join(METHODS)}")
        if self.encoder is not None and self.encoder not in ENCODERS:
            raise UnsupportedAdapterError(
                f"P-tuning encoder {self.encoder!r} is unknown; known: {', '.join(ENCODERS)}"
            )


@dataclass
class PromptAdapter:
    """A loaded soft prompt: ``embeddings`` [P, token_dim]."""

    config: PromptConfig
    embeddings: torch.Tensor
    fingerprint: str | None = None  # base fingerprint, when the writer recorded one
    source: str | None = None  # where it was read from
    base_class: str | None = None  # the transformers class it was trained on, when recorded
    # modules trained with the prompt and stored whole (PEFT's modules_to_save: a SEQ_CLS / TOKEN_CLS head)
    saved_modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # Filled by the engine serving it (prefix_cache.py): the virtual tokens' per-layer K/V on that
    # engine's base, per combination with the row's other adapters. Derived state, never saved.
    served_kv: dict = field(default_factory=dict, repr=False, compare=False)

    kind = KIND

    def __post_init__(self):
        expected = (self.config.num_virtual_tokens, self.config.token_dim)
        if tuple(self.embeddings.shape) != expected:
            raise UnsupportedAdapterError(
                f"{self.source or 'prompt'}: embeddings have shape {tuple(self.embeddings.shape)}, expected "
                f"[virtual tokens, token_dim] = {list(expected)}"
            )

    @property
    def parameter_count(self) -> int:
        return self.embeddings.numel() + sum(t.numel() for sd in self.saved_modules.values() for t in sd.values())

    @property
    def nbytes(self) -> int:
        return self.embeddings.numel() * self.embeddings.element_size()

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def to(self, device: torch.device | str, dtype: torch.dtype) -> PromptAdapter:
        """Move the embeddings (in place) and return self."""
        self.embeddings = self.embeddings.to(device=device, dtype=dtype)
        return self


def fold_mlp_encoder(inputs: torch.Tensor, linears: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """P-tuning's MLP encoder, run once: ``Linear (ReLU Linear)*`` over ``inputs`` [P, in] -> [P, out]."""
    hidden = inputs.float()
    for i, (weight, bias) in enumerate(linears):
        if i:
            hidden = torch.relu(hidden)
        hidden = hidden @ weight.float().T + bias.float()
    return hidden


def fold_lstm_encoder(
    inputs: torch.Tensor, lstm_state: dict[str, torch.Tensor], linears: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """P-tuning's LSTM encoder, run once: ``MLP(BiLSTM(inputs))``; inputs [P, token_dim] -> [P, token_dim].

    ``lstm_state`` holds ``torch.nn.LSTM`` parameters (``weight_ih_l0``, ``..._reverse``); sizes come from them.
    """
    if "weight_hh_l0" not in lstm_state or "weight_ih_l0_reverse" not in lstm_state:
        raise UnsupportedAdapterError("P-tuning LSTM encoder: expected a bidirectional LSTM (weight_hh_l0, *_reverse)")
    hidden_size = lstm_state["weight_hh_l0"].shape[1]
    num_layers = sum(1 for key in lstm_state if key.startswith("weight_ih_l") and not key.endswith("_reverse"))
    lstm = torch.nn.LSTM(inputs.shape[-1], hidden_size, num_layers=num_layers, bidirectional=True, batch_first=True)
    lstm.load_state_dict({k: v.float() for k, v in lstm_state.items()}, strict=True)
    with torch.no_grad():
        encoded = lstm(inputs.float().unsqueeze(0))[0][0]  # [P, 2 * hidden_size]
    return fold_mlp_encoder(encoded, linears)


def check_prompt_fits(adapter: PromptAdapter, facts) -> None:
    """Raise unless the soft prompt's width is the base's hidden size."""
    if adapter.config.token_dim != facts.hidden_size:
        raise AdapterMismatchError(
            f"{adapter.source or 'prompt adapter'}: token_dim is {adapter.config.token_dim} but the base "
            f"({facts.model_type}) has hidden size {facts.hidden_size}; the adapter was made for another base"
        )


def prompt_details(adapter: PromptAdapter) -> dict:
    """What ``Engine.adapters`` and ``adaptkit inspect`` show about a soft prompt."""
    cfg = adapter.config
    details = {"method": cfg.method, "virtual_tokens": cfg.num_virtual_tokens, "token_dim": cfg.token_dim}
    if cfg.encoder:
        details["encoder"] = f"{cfg.encoder} (folded at load)"
    if adapter.saved_modules:
        details["modules_to_save"] = sorted(adapter.saved_modules)
    return details
