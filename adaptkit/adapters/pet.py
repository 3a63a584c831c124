"""PET, Pattern-Exploiting Training (Schick & Schütze, 2021): classification as filling a blank.

A *pattern* turns an input into a sentence with one answer slot; a *verbalizer* maps each label to
one word. The model scores each label by how well its word fills the slot::

    x = "the movie was dull"    pattern "{text} All in all, it was {mask}."    verbalizer {pos: great, neg: bad}
    s_l = logits[slot, id(v(l))]          logits: [S, V] of the filled pattern
    p(l | x) = softmax_l(s_l)             loss = cross-entropy of p against the gold label

On a masked LM the slot is the mask token and ``logits[slot]`` is the masked-LM head's output there.
On a causal LM the pattern is cut at the slot and ``logits[slot]`` is the next-token prediction after
the last token before it (text after the slot is never seen). Each word must be one token, as in
PET; a word that follows whitespace in the pattern is tokenized with that space (``" great"``).

A PET adapter is the pattern and verbalizer, plus the LoRA it was fine-tuned with when it carries
one (a fully fine-tuned model is saved as a base of its own).
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from adaptkit.adapters.lora import LoraAdapter
from adaptkit.errors import AdapterMismatchError, InvalidArgumentError

KIND = "pet"
TEXT = "text"  # the pattern's input placeholder, written {text}
SLOT = "mask"  # the answer slot, written {mask}
SCORINGS = ("causal", "mlm")  # next-token prediction at the slot | the masked-LM head at a mask token


@dataclass(frozen=True)
class PetConfig:
    """A pattern with ``{text}`` and one ``{mask}``, and the word of every label.

    Example:
        >>> PetConfig("{text} It was {mask}.", {"pos": "great", "neg": "bad"})
    """

    pattern: str
    verbalizer: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise InvalidArgumentError(f"PET pattern must be a string, got {self.pattern!r}")
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(self.pattern) if name is not None]
        except ValueError as exc:
            raise InvalidArgumentError(f"PET pattern {self.pattern!r} is malformed ({exc}); write braces as {{{{ }}}}") from exc
        unknown = sorted(set(fields) - {TEXT, SLOT})
        if unknown:
            raise InvalidArgumentError(
                f"PET pattern {self.pattern!r} has unknown placeholder(s) {unknown}; it takes {{text}} and {{mask}}"
            )
        if fields.count(SLOT) != 1 or TEXT not in fields:
            raise InvalidArgumentError(
                f"PET pattern {self.pattern!r} must contain {{text}} and exactly one answer slot {{mask}} "
                f"(it has {fields.count(SLOT)} slot(s)), e.g. '{{text}} It was {{mask}}.'"
            )
        if not isinstance(self.verbalizer, Mapping) or not self.verbalizer:
            raise InvalidArgumentError(f"PET verbalizer must map each label to a word, got {self.verbalizer!r}")
        for label, word in self.verbalizer.items():
            if not isinstance(label, str) or not isinstance(word, str) or not word.strip():
                raise InvalidArgumentError(f"PET verbalizer entry {label!r}: {word!r} must map a label to a non-empty word")
        words = [w.strip() for w in self.verbalizer.values()]
        if len(set(words)) != len(words):
            raise InvalidArgumentError(f"PET verbalizer {dict(self.verbalizer)} gives two labels the same word")
        object.__setattr__(self, "verbalizer", dict(self.verbalizer))

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.verbalizer)

    def label_index(self, label: str, where: str = "data") -> int:
        """The position of ``label`` in :attr:`labels`; an error names the known labels."""
        if label not in self.verbalizer:
            raise InvalidArgumentError(
                f"{where}: label {label!r} is not in the verbalizer (labels: {', '.join(map(repr, self.labels))}); "
                "add it to the verbalizer or fix the row"
            )
        return self.labels.index(label)

    def _parts(self, text: str) -> tuple[str, str]:
        """The filled pattern before and after the slot (``{{``/``}}`` unescaped, ``text`` taken as is)."""
        parts, current = [], ""
        for literal, name, _, _ in string.Formatter().parse(self.pattern):
            current += literal
            if name == TEXT:
                current += text
            elif name == SLOT:
                parts.append(current)
                current = ""
        return parts[0], current

    @property
    def spaced(self) -> bool:
        """Whether the slot follows whitespace (then each word is tokenized with a leading space)."""
        return self._parts("x")[0][-1:].isspace()

    def fill(self, text: str) -> tuple[str, str]:
        """(text before the slot, text after it); whitespace right before the slot goes with the word."""
        head, tail = self._parts(text)
        return (head.rstrip() if self.spaced else head), tail

    def word_text(self, label: str) -> str:
        word = self.verbalizer[label].strip()
        return " " + word if self.spaced else word


def label_word_ids(tokenizer, config: PetConfig) -> list[int]:
    """The one token id of each label's word, in :attr:`PetConfig.labels` order."""
    ids = []
    for label in config.labels:
        text = config.word_text(label)
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            pieces = tokenizer.convert_ids_to_tokens(tokens)
            raise InvalidArgumentError(
                f"PET verbalizer word {text!r} (label {label!r}) is {len(tokens)} tokens {pieces} for this tokenizer; "
                "PET scores one token at the slot: choose a word that is a single token"
            )
        ids.append(tokens[0])
    return ids


def encode_pattern(tokenizer, config: PetConfig, text: str, scoring: str) -> tuple[list[int], int]:
    """(token ids of the filled pattern, index of the position whose logits score the slot).

    causal: the text before the slot only; the slot is scored from its last token.
    mlm: the whole sentence with the tokenizer's mask token at the slot.
    """
    before, after = config.fill(text)
    if scoring == "causal":
        ids = tokenizer(before)["input_ids"]
        if not ids:
            raise InvalidArgumentError(
                f"PET pattern {config.pattern!r} leaves no token before the slot; a causal LM predicts the slot "
                "from the text before it"
            )
        return ids, len(ids) - 1
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise InvalidArgumentError("the tokenizer has no mask token; PET on an encoder needs one (tokenizer.mask_token)")
    space = " " if config.spaced else ""
    ids = tokenizer(before + space + tokenizer.mask_token + after)["input_ids"]
    slots = [i for i, token in enumerate(ids) if token == mask_id]
    if len(slots) != 1:
        raise InvalidArgumentError(
            f"text {text[:40]!r} filled into {config.pattern!r} holds {len(slots)} mask tokens; it must hold exactly one "
            f"(remove {tokenizer.mask_token!r} from the text)"
        )
    return ids, slots[0]


def label_log_probs(logits: torch.Tensor, slots: torch.Tensor, word_ids: Sequence[int]) -> torch.Tensor:
    """``log softmax_l(logits[b, slot_b, id(v(l))])``: logits [B, S, V], slots [B] -> [B, K] (float32)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    at_slot = logits[rows, slots.to(logits.device)]  # [B, V]
    words = torch.as_tensor(list(word_ids), device=logits.device)
    return at_slot[:, words].float().log_softmax(dim=-1)


def scoring_for(facts, model) -> str:
    """``"causal"`` for a causal LM; ``"mlm"`` for an encoder loaded with its masked-LM head."""
    if facts.spec.is_causal:
        return "causal"
    if model.get_output_embeddings() is None:
        raise AdapterMismatchError(
            f"the {facts.model_type} base has no masked-LM head ({type(model).__name__}); PET on an encoder scores "
            "the slot with it: save the base as ...ForMaskedLM"
        )
    return "mlm"


@dataclass
class PetAdapter:
    """A loaded PET adapter: pattern + verbalizer, how the slot is scored, and its LoRA if it carries one."""

    config: PetConfig
    scoring: str
    lora: LoraAdapter | None = None
    fingerprint: str | None = None
    source: str | None = None
    base_class: str | None = None

    kind = KIND

    def __post_init__(self):
        if self.scoring not in SCORINGS:
            raise InvalidArgumentError(f"PET scoring {self.scoring!r} is unknown; known: {', '.join(SCORINGS)}")

    @property
    def parameter_count(self) -> int:
        return self.lora.parameter_count if self.lora is not None else 0

    @property
    def nbytes(self) -> int:
        return self.lora.nbytes if self.lora is not None else 0


def check_pet_fits(adapter: PetAdapter, facts, model) -> None:
    """Raise unless the base scores the slot the way the adapter was trained (causal vs masked LM)."""
    scoring = scoring_for(facts, model)
    if scoring != adapter.scoring:
        raise AdapterMismatchError(
            f"{adapter.source or 'PET adapter'}: trained with {adapter.scoring} scoring, but the base "
            f"({facts.model_type}) scores with {scoring}; load it on the kind of base it was trained on"
        )


def pet_details(adapter: PetAdapter) -> dict:
    """What ``Engine.adapters`` and ``adaptkit inspect`` show about a PET adapter."""
    details = {"pattern": adapter.config.pattern, "labels": list(adapter.config.labels),
               "verbalizer": dict(adapter.config.verbalizer), "scoring": adapter.scoring,
               "lora": adapter.lora is not None}
    if adapter.lora is not None:
        details["ranks"] = sorted(set(adapter.lora.ranks().values()))
    return details
