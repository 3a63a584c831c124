"""Training data: jsonl rows read and checked line by line, tokenized, split, ordered and batched.

One file holds one kind of row:

    {"text": ...}                      language modelling: loss on every next token
    {"prompt": ..., "completion": ...} loss on the completion's tokens only (then end-of-sequence)
    {"text": ..., "label": ...}        classification: the label's word scored at a pattern's slot
                                       (``adapters/pet.py``; default pattern ``"{text} {mask}"``,
                                       default verbalizer: each label is its own word); with
                                       ``task="seq-cls"``: the base's sequence-classification head
    {"tokens": [...], "labels": [...]} token classification (``task="token-cls"``): one label per
                                       word, taken at its first sub-token by the base's token head

Batches are right-padded; ``labels`` is -100 wherever no loss is taken (padding, prompts). The
order of an epoch depends only on (seed, epoch), so a resumed run sees the batches an
uninterrupted one would.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from adaptkit.adapters.pet import PetConfig, encode_pattern, label_word_ids
from adaptkit.errors import InvalidArgumentError

IGNORE = -100  # label of positions without loss (torch's cross_entropy ignore_index)
ROW_KINDS = {  # kind -> the keys of its rows
    "lm": ("text",),
    "completion": ("completion", "prompt"),
    "classification": ("label", "text"),
    "tokens": ("labels", "tokens"),
}
HEAD_TASKS = {"seq-cls": "ForSequenceClassification", "token-cls": "ForTokenClassification"}  # --task -> head
DEFAULT_PATTERN = "{text} {mask}"


@dataclass(frozen=True)
class Dataset:
    """The rows of one jsonl file, all of one kind, with the line number of each."""

    path: Path
    kind: str
    rows: tuple[dict, ...]
    lines: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.rows)


def read_jsonl(path: str | os.PathLike) -> Dataset:
    """Read and check a training file; every problem is named by ``FILE:LINE`` with how to fix it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InvalidArgumentError(f"{path}: no such data file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"{path}: cannot be read as UTF-8 text ({exc})") from exc
    rows, lines, kind, first_line = [], [], None, 0
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{path}:{number}"
        if not line.strip():
            raise InvalidArgumentError(f"{where}: empty line; every line must be one JSON object (remove the blank line)")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        row_kind = _row_kind(row, where)
        if kind is None:
            kind, first_line = row_kind, number
        elif row_kind != kind:
            raise InvalidArgumentError(
                f"{where}: a {row_kind} row {sorted(row)}, but line {first_line} is a {kind} row {list(ROW_KINDS[kind])}; "
                "one file holds one kind of row"
            )
        rows.append(row)
        lines.append(number)
    if not rows:
        raise InvalidArgumentError(f"{path}: no rows; write one JSON object per line, e.g. {{\"text\": \"...\"}}")
    return Dataset(path, kind, tuple(rows), tuple(lines))


def _row_kind(row, where: str) -> str:
    if not isinstance(row, dict):
        raise InvalidArgumentError(f"{where}: expected a JSON object, got {type(row).__name__}")
    keys = tuple(sorted(row))
    kind = next((k for k, fields in ROW_KINDS.items() if fields == keys), None)
    if kind is None:
        shapes = ", ".join("{" + ", ".join(f'"{f}"' for f in sorted(fields)) + "}" for fields in ROW_KINDS.values())
        raise InvalidArgumentError(f"{where}: keys {list(keys)}; a row is one of {shapes}")
    if kind == "tokens":
        words, labels = row["tokens"], row["labels"]
        if (not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words)
                or not isinstance(labels, list) or len(labels) != len(words)):
            raise InvalidArgumentError(f"{where}: \"tokens\" must be a non-empty list of words and \"labels\" one "
                                       "label per word")
        row["labels"] = [str(label) for label in labels]
        return kind
    for key in keys:
        value = row[key]
        if key == "label" and isinstance(value, int) and not isinstance(value, bool):
            row[key] = str(value)
        elif not isinstance(value, str) or (key != "label" and not value.strip()):
            raise InvalidArgumentError(f"{where}: \"{key}\" must be a non-empty string, got {value!r}")
    return kind


# ----------------------------------------------------------------------------- tokenizing
@dataclass(frozen=True)
class Objective:
    """What the loss is taken on: ``kind`` (lm | completion | classification) and, for
    classification, the pattern, how its slot is scored and the label words' token ids."""

    kind: str
    pet: PetConfig | None = None
    scoring: str | None = None
    word_ids: tuple[int, ...] = ()
    head_labels: tuple[str, ...] = ()  # seq-cls / token-cls: the head's labels, by index (config.id2label)

    @property
    def num_labels(self) -> int:
        return len(self.word_ids) or len(self.head_labels)


def make_objective(dataset: Dataset, tokenizer, causal: bool, scoring: str | None = None,
                   pattern: str | None = None, verbalizer: dict | None = None, task: str | None = None,
                   head_labels: tuple[str, ...] = (), seq2seq: bool = False) -> Objective:
    """The objective of ``dataset`` on this base; classification labels are checked against the verbalizer,
    or (``task`` seq-cls / token-cls) against the head's labels."""
    if tokenizer is None:
        raise InvalidArgumentError("the base folder has no tokenizer files; training reads text and needs one")
    if task == "seq2seq" or (task is None and seq2seq):
        if not seq2seq or dataset.kind != "completion":
            raise InvalidArgumentError(f"{dataset.path}: seq2seq training takes {{\"prompt\", \"completion\"}} rows on an "
                                       "encoder-decoder base (T5, BART): the prompt goes to the encoder")
        return Objective("seq2seq")
    if task is not None:
        return _head_objective(dataset, task, head_labels, pattern, verbalizer)
    if dataset.kind == "tokens":
        raise InvalidArgumentError(f"{dataset.path}: {{\"tokens\", \"labels\"}} rows train a token-classification "
                                   "head: pass task=\"token-cls\" (--task token-cls)")
    if dataset.kind != "classification":
        if pattern is not None or verbalizer is not None:
            raise InvalidArgumentError(f"{dataset.path}: a pattern and verbalizer apply to {{\"text\", \"label\"}} rows, "
                                       f"not to {dataset.kind} rows")
        if not causal:
            raise InvalidArgumentError(f"{dataset.path}: {dataset.kind} rows need a causal LM; on an encoder use "
                                       "{\"text\", \"label\"} rows (scored by the masked-LM head)")
        return Objective(dataset.kind)
    if verbalizer is None:
        verbalizer = {label: label for label in dict.fromkeys(row["label"] for row in dataset.rows)}
    config = PetConfig(pattern or DEFAULT_PATTERN, verbalizer)
    for row, line in zip(dataset.rows, dataset.lines):
        config.label_index(row["label"], where=f"{dataset.path}:{line}")
    return Objective("classification", config, scoring or ("causal" if causal else "mlm"),
                     tuple(label_word_ids(tokenizer, config)))


def _head_objective(dataset: Dataset, task: str, labels: tuple[str, ...], pattern, verbalizer) -> Objective:
    wanted = {"seq-cls": "classification", "token-cls": "tokens"}.get(task)
    if wanted is None:
        raise InvalidArgumentError(f"task {task!r}: use seq-cls or token-cls (or none: the rows say what to train)")
    if dataset.kind != wanted:
        shape = "{\"text\", \"label\"}" if wanted == "classification" else "{\"tokens\", \"labels\"}"
        raise InvalidArgumentError(f"{dataset.path}: task {task} trains on {shape} rows, not {dataset.kind} rows")
    if pattern is not None or verbalizer is not None:
        raise InvalidArgumentError(f"task {task} trains the base's head; a pattern and verbalizer are for PET")
    for row, line in zip(dataset.rows, dataset.lines):
        for label in [row["label"]] if wanted == "classification" else row["labels"]:
            if label not in labels:
                raise InvalidArgumentError(f"{dataset.path}:{line}: label {label!r} is not one of the head's labels "
                                           f"{list(labels)} (config.json id2label)")
    return Objective(task, head_labels=tuple(labels))


@dataclass(frozen=True)
class Example:
    """One tokenized row: ids, per-token labels (lm/completion) or (slot, label index) (classification)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...] | None = None
    slot: int | None = None
    target: int | None = None


def tokenize(dataset: Dataset, tokenizer, objective: Objective, max_length: int = 512) -> list[Example]:
    """Every row as an :class:`Example`; a row longer than ``max_length`` tokens is an error naming its line."""
    examples = []
    eos = tokenizer.eos_token_id
    for row, line in zip(dataset.rows, dataset.lines):
        if objective.kind == "classification":
            ids, slot = encode_pattern(tokenizer, objective.pet, row["text"], objective.scoring)
            example = Example(tuple(ids), slot=slot, target=objective.pet.label_index(row["label"]))
        elif objective.kind == "seq-cls":
            ids = tokenizer(row["text"])["input_ids"]
            example = Example(tuple(ids), target=objective.head_labels.index(row["label"]))
        elif objective.kind == "token-cls":
            example = _token_example(tokenizer, row, objective.head_labels)
        elif objective.kind == "seq2seq":  # the prompt to the encoder; the completion and eos are the decoder's labels
            target = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
            example = Example(tuple(tokenizer(row["prompt"])["input_ids"]),
                              labels=tuple(target + ([eos] if eos is not None and target[-1:] != [eos] else [])))
        elif objective.kind == "lm":
            ids = tokenizer(row["text"])["input_ids"]
            example = Example(tuple(ids), labels=tuple(ids))
        else:
            prompt = tokenizer(row["prompt"])["input_ids"]
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            example = Example(tuple(prompt + completion), labels=tuple([IGNORE] * len(prompt) + completion))
        if len(example.input_ids) > max_length:
            raise InvalidArgumentError(
                f"{dataset.path}:{line}: {len(example.input_ids)} tokens, more than max_length={max_length}; "
                "shorten the row or raise --max-length"
            )
        if objective.kind == "token-cls" and all(t == IGNORE for t in example.labels):
            raise InvalidArgumentError(f"{dataset.path}:{line}: no word of the row starts a token")
        if objective.kind == "lm" and len(example.input_ids) < 2:
            raise InvalidArgumentError(f"{dataset.path}:{line}: one token only; language modelling needs at least two")
        examples.append(example)
    return examples


def _token_example(tokenizer, row: dict, labels: tuple[str, ...]) -> Example:
    """Words tokenized as one text (joined by spaces); each word's label on its first sub-token, the rest
    and the special tokens without loss (the usual token-classification rule)."""
    text, spans, start = "", [], 0
    for word in row["tokens"]:
        if text:
            text += " "
        start = len(text)
        text += word
        spans.append((start, len(text)))
    encoded = tokenizer(text, return_offsets_mapping=True)
    targets, word = [], 0
    for begin, end in encoded["offset_mapping"]:
        while word < len(spans) and begin >= spans[word][1]:
            word += 1
        first = word < len(spans) and end > begin and begin <= spans[word][0] < end
        targets.append(labels.index(row["labels"][word]) if first else IGNORE)
    return Example(tuple(encoded["input_ids"]), labels=tuple(targets))


def split_eval(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, eval indices): ``round(fraction * count)`` rows held out, chosen by ``seed``."""
    if not 0 <= fraction < 1:
        raise InvalidArgumentError(f"eval_split must be in [0, 1), got {fraction}")
    held = round(fraction * count)
    if fraction > 0 and held == 0:
        held = 1
    if held >= count:
        raise InvalidArgumentError(f"eval_split={fraction} leaves no training rows out of {count}; lower it")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[held:]), sorted(order[:held])


def epoch_order(count: int, epoch: int, seed: int) -> list[int]:
    """The shuffled row order of one epoch: a function of (seed, epoch) only."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch + 1)).tolist()


@dataclass
class Batch:
    """Right-padded tensors of a few examples.

    ``input_ids``/``attention_mask`` [B, S]; ``labels`` [B, S] (lm/completion, -100 without loss);
    ``slots``/``targets`` [B] (classification).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) if t is not None else None for t in
                       (self.input_ids, self.attention_mask, self.labels, self.slots, self.targets)))


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Pad ``examples`` on the right into one :class:`Batch`."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    label_width = max(len(e.labels) for e in examples) if examples[0].labels is not None else 0
    labels = torch.full((len(examples), label_width), IGNORE, dtype=torch.long) if label_width else None
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        if labels is not None:  # as long as the inputs, except the decoder labels of an encoder-decoder
            labels[row, : len(example.labels)] = torch.tensor(example.labels)
    if examples[0].slot is None and examples[0].target is None:
        return Batch(ids, mask, labels)
    if examples[0].slot is None:  # a sequence head: one target per row
        return Batch(ids, mask, None, None, torch.tensor([e.target for e in examples]))
    slots = torch.tensor([e.slot for e in examples])
    return Batch(ids, mask, None, slots, torch.tensor([e.target for e in examples]))


def batches(examples: list[Example], batch_size: int, order: list[int], pad_id: int) -> list[Batch]:
    """``examples`` in ``order``, ``batch_size`` at a time (the last batch may be smaller)."""
    picked = [examples[i] for i in order]
    return [collate(picked[i : i + batch_size], pad_id) for i in range(0, len(picked), batch_size)]
