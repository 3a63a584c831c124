"""Task heads read as labels: ``Engine.classify`` (a sequence-classification head, or a PET adapter's
pattern and verbalizer) and ``Engine.classify_tokens`` (a token-classification head), each text's tokens
right-padded into one forward with each row's adapter."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from adaptkit import inject
from adaptkit.errors import EngineStateError, UnsupportedAdapterError


def classify(engine, texts: Sequence[str] | str, adapter=None) -> list[dict[str, float]]:
    """See :meth:`Engine.classify`."""
    from adaptkit.adapters.pet import KIND

    texts = [texts] if isinstance(texts, str) else list(texts)
    if isinstance(adapter, str) and engine._adapters.get(adapter) is not None and engine._adapters[adapter].kind == KIND:
        return _classify_pet(engine, texts, adapter)
    logits, _ = _head_logits(engine, texts, adapter, token_level=False)
    names = labels(engine.model.config, logits.shape[-1])
    return [dict(zip(names, row.tolist())) for row in logits.float().softmax(-1)]


def classify_tokens(engine, texts: Sequence[str] | str, adapter=None) -> list[list[dict]]:
    """See :meth:`Engine.classify_tokens`."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    logits, offsets = _head_logits(engine, texts, adapter, token_level=True)
    names = labels(engine.model.config, logits.shape[-1])
    out = []
    for text, row_logits, row_offsets in zip(texts, logits.float().softmax(-1), offsets):
        tokens = []
        for probs, (start, end) in zip(row_logits, row_offsets):
            if end > start:
                score, index = probs.max(-1)
                tokens.append({"text": text[start:end], "start": start, "end": end, "label": names[int(index)],
                               "score": float(score)})
        out.append(tokens)
    return out


def _head_logits(engine, texts: list[str], adapter, token_level: bool):
    """The task head's logits for ``texts`` (right-padded, one forward) and each text's token offsets."""
    if engine.tokenizer is None:
        raise EngineStateError(f"{engine.base.path} has no tokenizer files; classify reads text")
    encoded = engine.tokenizer(texts, add_special_tokens=True, return_offsets_mapping=token_level)
    rows = encoded["input_ids"]
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(texts), width), engine.stop_and_pad_ids()[1], dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)], mask[row, : len(ids)] = torch.tensor(ids), 1
    entries = adapter if isinstance(adapter, (list, tuple)) else [adapter] * len(texts)
    logits = engine.logits(input_ids, mask, adapters=list(entries))
    head = type(engine.model).__name__
    if token_level != (logits.ndim == 3) or not head.endswith(("ForSequenceClassification", "ForTokenClassification")):
        wanted = "ForTokenClassification" if token_level else "ForSequenceClassification"
        raise UnsupportedAdapterError(
            f"{engine.base.path} is a {head}; {'classify_tokens' if token_level else 'classify'} needs a base with a "
            f"...{wanted} head (or, for classify, a PET adapter)")
    offsets = [[tuple(o) for o in row] for row in encoded["offset_mapping"]] if token_level else None
    return logits, offsets

def labels(config, count: int) -> list[str]:
    """The names of a head's ``count`` outputs: ``config.id2label``, else ``LABEL_i``."""
    names = getattr(config, "id2label", None) or {}
    return [str(names.get(i, names.get(str(i), f"LABEL_{i}"))) for i in range(count)]

def _classify_pet(engine, texts: list[str], adapter: str) -> list[dict[str, float]]:
    from adaptkit.adapters.pet import encode_pattern, label_log_probs, label_word_ids

    pet = engine._adapters[adapter]
    if engine.tokenizer is None:
        raise EngineStateError(f"{engine.base.path} has no tokenizer files; classify reads text")
    encoded = [encode_pattern(engine.tokenizer, pet.config, text, pet.scoring) for text in texts]
    width = max(len(ids) for ids, _ in encoded)  # right padding: encoders count positions from 0
    input_ids = torch.full((len(texts), width), engine.stop_and_pad_ids()[1], dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, (ids, _) in enumerate(encoded):
        input_ids[row, : len(ids)], mask[row, : len(ids)] = torch.tensor(ids), 1
    logits = engine.logits(input_ids, mask, adapters=adapter)
    slots = torch.tensor([slot for _, slot in encoded])
    probs = label_log_probs(logits, slots, label_word_ids(engine.tokenizer, pet.config)).exp()
    return [dict(zip(pet.config.labels, row.tolist())) for row in probs]


def attach_pet(model: nn.Module, name: str, adapter, dtype: torch.dtype, device: torch.device) -> None:
    """Check the base scores a PET slot as the adapter was trained to; attach its LoRA, if it carries one
    (the pattern and verbalizer act in ``Engine.classify``, not in the model)."""
    from adaptkit.adapters.pet import check_pet_fits
    from adaptkit.measured import facts_of

    check_pet_fits(adapter, facts_of(model), model)
    if adapter.lora is not None:
        inject.attach_lora(model, name, adapter.lora, dtype, device)


def detach_pet(model: nn.Module, name: str, adapter) -> None:
    if adapter.lora is not None:
        inject.detach_lora(model, name, adapter.lora)
