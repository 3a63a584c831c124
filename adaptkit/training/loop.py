"""Training: a thin loop over the adapter modules the engine runs (``methods.py`` builds them).

    result = ak.train("lora", "path/to/base", "data.jsonl", "out/sql", epochs=3, r=8)

The base is loaded by the engine, frozen (``requires_grad=False``) and in eval mode (no dropout);
only the method's parameters train, with AdamW. Loss of one micro-batch::

    lm / completion   mean over labelled tokens t of  -log p(x_t | x_<t)      (labels -100 excluded)
    classification    mean over rows of  -log softmax_l(s_l)[gold]            (adapters/pet.py)

With ``grad_accum = n`` the gradient of an optimizer step is that of the mean of ``n`` micro-batch
losses. After each epoch the held-out rows (``eval_split``) are scored: loss and accuracy (label
accuracy for classification, next-token accuracy on labelled tokens otherwise).

Checkpoints go to ``<out>.checkpoints/step-NNNNNN`` (each written atomically, the last two kept)
after every epoch, every ``save_every`` steps and at the end: the trainable parameters, the
optimizer state, the torch RNG state and the position (epoch, batch). An epoch's order depends only
on (seed, epoch), so ``resume=`` continues to exactly the result of an uninterrupted run. The output
folder is written atomically at the end, in the layout of the method's kind (``MethodSetup.save``)
with ``adaptkit_train.json`` (settings, losses, evaluations) beside it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from adaptkit import inject, quant
from adaptkit.adapters.pet import label_log_probs
from adaptkit.errors import InvalidArgumentError, OutputExistsError, TrainingError
from adaptkit.formats.checkpoint import atomic_output_dir
from adaptkit.formats.peft import add_peft_head
from adaptkit.formats.tensors import load_adapter_tensors
from adaptkit.generation import positions_from_mask
from adaptkit.prefix_cache import add_virtual_inputs, real_positions
from adaptkit.routing import route_rows, use_plan
from adaptkit.training.data import (
    HEAD_TASKS,
    IGNORE,
    Batch,
    batches,
    epoch_order,
    make_objective,
    read_jsonl,
    split_eval,
    tokenize,
)
from adaptkit.training.methods import method_named, setup_method
from adaptkit.training.setup import MethodSetup, SetupContext, adamw

ADAPTER_NAME = "trained"  # the engine name the trained adapter is attached under
RECORD_NAME = "adaptkit_train.json"
KEEP_CHECKPOINTS = 2
# settings that change the result: a checkpoint only resumes a run that has the same ones
_SIGNATURE_KEYS = ("method", "options", "base_fingerprint", "data_sha256", "lr", "batch_size", "grad_accum",
                   "eval_split", "seed", "max_length", "weight_decay", "pattern", "verbalizer")


@dataclass
class RunState:
    """Where a run is: optimizer steps done, the epoch and how many of its micro-batches are done."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)  # training loss of every optimizer step
    evals: list[dict] = field(default_factory=list)  # held-out scores after every epoch
    initial_eval: dict | None = None  # held-out scores before the first step
    pretrain_losses: list[float] = field(default_factory=list)  # PPT's unlabeled stage


@dataclass
class TrainResult:
    """What :func:`train` did: the output folder, losses per step, evaluations, throughput."""

    path: Path
    method: str
    steps: int
    losses: list[float]
    evals: list[dict]
    initial_eval: dict | None
    final_eval: dict | None
    tokens: int
    seconds: float
    checkpoint: Path | None
    pretrain_losses: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------- forward and loss
def forward_logits(engine, setup: MethodSetup, batch: Batch) -> torch.Tensor:
    """Logits [B, S, V] at the batch's own positions, every row routed to ``setup.entry``.

    Prefix/prompt methods put their current (unfolded, differentiable) K/V or embeddings into the
    model's inputs as the engine does; prompts are always prepended here, never served from a cache.
    """
    model = engine.model
    plan = route_rows([setup.entry] * batch.input_ids.shape[0], device=engine.device)
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if engine.base.facts.spec.is_causal:
        kwargs.update(position_ids=positions_from_mask(batch.attention_mask), use_cache=False)
    seq2seq = engine.base.facts.spec.is_seq2seq
    if seq2seq:  # teacher forcing: the decoder reads its start token, then the labels shifted right
        start = torch.full_like(batch.labels[:, :1], model.config.decoder_start_token_id)
        shifted = torch.cat([start, batch.labels[:, :-1]], dim=1)
        kwargs["decoder_input_ids"] = shifted.masked_fill(shifted == IGNORE, model.config.pad_token_id)
    virtual = 0
    if setup.virtual is not None:
        virtual = add_virtual_inputs(model, plan, {ADAPTER_NAME: setup.virtual()}, kwargs, prompt_as_cache=False)
    with use_plan(plan):
        out = model(**kwargs)
    if seq2seq:
        return out.logits  # the decoder's positions
    return real_positions(out.logits, virtual, batch.input_ids.shape[1])


def batch_loss(logits: torch.Tensor, batch: Batch, objective) -> tuple[torch.Tensor, int, int]:
    """(mean loss, correct predictions, predictions counted) of one batch."""
    if objective.kind == "classification":
        scores = label_log_probs(logits, batch.slots, objective.word_ids)  # [B, K]
        loss = F.nll_loss(scores, batch.targets)
        return loss, int((scores.argmax(-1) == batch.targets).sum()), len(batch.targets)
    if objective.kind == "seq-cls":  # the head's logits [B, labels]
        loss = F.cross_entropy(logits.float(), batch.targets)
        return loss, int((logits.argmax(-1) == batch.targets).sum()), len(batch.targets)
    if objective.kind in ("token-cls", "seq2seq"):  # [B, S, labels] at each labelled position (no shift)
        predicted, labelled = logits.float(), batch.labels != IGNORE
        loss = F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), batch.labels.reshape(-1), ignore_index=IGNORE)
        return loss, int(((predicted.argmax(-1) == batch.labels) & labelled).sum()), int(labelled.sum())
    predicted, wanted = logits[:, :-1].float(), batch.labels[:, 1:]  # position t predicts token t+1
    loss = F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), wanted.reshape(-1), ignore_index=IGNORE)
    labelled = wanted != IGNORE
    return loss, int(((predicted.argmax(-1) == wanted) & labelled).sum()), int(labelled.sum())


@torch.no_grad()
def evaluate(engine, setup: MethodSetup, examples, objective, batch_size: int, pad_id: int) -> dict | None:
    """Loss and accuracy on ``examples`` (None when there are none); ``chance`` is 1/labels or 1/vocab."""
    if not examples:
        return None
    total, correct, counted = 0.0, 0, 0
    for batch in batches(examples, batch_size, list(range(len(examples))), pad_id):
        batch = batch.to(engine.device)
        loss, right, count = batch_loss(forward_logits(engine, setup, batch), batch, objective)
        total, correct, counted = total + float(loss) * count, correct + right, counted + count
    chance = 1 / (objective.num_labels or engine.base.facts.vocab_size)
    return {"loss": total / max(counted, 1), "accuracy": correct / max(counted, 1), "chance": chance, "count": counted}


# ----------------------------------------------------------------------------- checkpoints
def _checkpoint_dir(out: Path, checkpoint_dir) -> Path:
    return Path(checkpoint_dir) if checkpoint_dir else out.parent / f"{out.name}.checkpoints"


def save_checkpoint(folder: Path, setup: MethodSetup, optimizer, state: RunState, signature: dict) -> Path:
    """Write one checkpoint atomically; keep the last ``KEEP_CHECKPOINTS`` beside it."""
    path = folder / f"step-{state.step:06d}"
    with atomic_output_dir(path, force=True) as tmp:
        tensors = {k: v.detach().cpu().clone().contiguous() for k, v in setup.trainable.state_dict().items()}
        save_file(tensors, str(tmp / "trainable.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"signature": signature, "state": asdict(state)}, indent=2))
    for old in sorted(folder.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself when it is a checkpoint, else the newest ``step-*`` inside it."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    found = sorted(p for p in path.glob("step-*") if (p / "trainer_state.json").is_file()) if path.is_dir() else []
    if not found:
        raise InvalidArgumentError(f"{path}: no checkpoint here (expected trainer_state.json, or step-* folders)")
    return found[-1]


def load_checkpoint(path: Path, setup: MethodSetup, optimizer, signature: dict) -> RunState:
    """Restore parameters, optimizer and RNG from ``path``; the run's settings must match its own.

    Everything is checked before anything is restored: a truncated or hand-edited file, tensors of
    other shapes, non-finite values (a diverged run) or an impossible position is one clear error.
    """
    record = _read_state_record(path / "trainer_state.json")
    for key in _SIGNATURE_KEYS:
        theirs, ours = record["signature"].get(key), signature.get(key)
        if theirs != ours:
            raise InvalidArgumentError(
                f"{path}: the checkpoint was made with {key}={theirs!r}, this run has {key}={ours!r}; resume with "
                "the same settings (only epochs, max_steps and save_every may change)"
            )
    state = _run_state(record, path / "trainer_state.json")
    trainable = load_adapter_tensors(path / "trainable.safetensors")  # readable, floating point, finite
    expected = {k: tuple(v.shape) for k, v in setup.trainable.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in trainable.items()}
    if found != expected:
        wrong = sorted(set(found.items()) ^ set(expected.items()))[:3]
        raise InvalidArgumentError(f"{path / 'trainable.safetensors'}: its tensors do not fit this run's method "
                                   f"(first differences: {wrong}); resume with the settings it was made with")
    try:
        saved = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        optimizer_state, rng = saved["optimizer"], saved["rng"]
    except Exception as exc:
        raise InvalidArgumentError(f"{path / 'optimizer.pt'}: unreadable ({type(exc).__name__}: {exc}); the checkpoint "
                                   "is damaged: resume from an earlier one or start over") from exc
    moments = [v for s in optimizer_state.get("state", {}).values() for v in s.values() if isinstance(v, torch.Tensor)]
    if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in moments):
        raise InvalidArgumentError(f"{path / 'optimizer.pt'}: the optimizer state holds NaN or inf (the run had "
                                   "diverged); resume from an earlier checkpoint or lower the learning rate")
    backup = copy.deepcopy(optimizer.state_dict())
    try:
        optimizer.load_state_dict(optimizer_state)
        torch.set_rng_state(rng["torch"])
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        optimizer.load_state_dict(backup)
        raise InvalidArgumentError(f"{path / 'optimizer.pt'}: does not fit this run ({exc}); resume with the settings "
                                   "it was made with") from exc
    setup.trainable.load_state_dict(trainable, strict=True)
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def _read_state_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgumentError(f"{path}: unreadable ({exc}); the checkpoint is damaged: resume from an earlier "
                                   "one or start over") from exc
    if not isinstance(record, dict) or not isinstance(record.get("signature"), dict) or \
            not isinstance(record.get("state"), dict):
        raise InvalidArgumentError(f"{path}: expected {{\"signature\": ..., \"state\": ...}}; the checkpoint is damaged")
    return record


def _run_state(record: dict, path: Path) -> RunState:
    """The saved position, checked: counters are integers >= 0, losses finite numbers."""
    fields = record["state"]
    known = {f.name for f in dataclasses.fields(RunState)}
    if set(fields) - known:
        raise InvalidArgumentError(f"{path}: unknown state fields {sorted(set(fields) - known)}")
    for key in ("step", "epoch", "batch", "tokens"):
        value = fields.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgumentError(f"{path}: state.{key} must be an integer >= 0, got {value!r}")
    for key in ("losses", "pretrain_losses"):
        values = fields.get(key, [])
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise InvalidArgumentError(f"{path}: state.{key} must be a list of finite numbers (a NaN loss means the "
                                       "run diverged: resume from an earlier checkpoint)")
    return RunState(**fields)


# ----------------------------------------------------------------------------- the loop
@dataclass
class _Run:
    """One fit: the data, objective and optimizer of a stage (PPT has two stages)."""

    engine: object
    setup: MethodSetup
    objective: object
    examples: list
    optimizer: torch.optim.Optimizer
    batch_size: int
    grad_accum: int
    seed: int
    pad_id: int
    eval_examples: list = field(default_factory=list)

    def steps_per_epoch(self) -> int:
        micro = -(-len(self.examples) // self.batch_size)
        return -(-micro // self.grad_accum)

    def evaluate(self) -> dict | None:
        return evaluate(self.engine, self.setup, self.eval_examples, self.objective, self.batch_size, self.pad_id)

    def groups(self, epoch: int) -> list[list[Batch]]:
        """The micro-batches of ``epoch``, ``grad_accum`` per optimizer step."""
        order = epoch_order(len(self.examples), epoch, self.seed)
        micro = batches(self.examples, self.batch_size, order, self.pad_id)
        return [micro[i : i + self.grad_accum] for i in range(0, len(micro), self.grad_accum)]

    def step(self, group: list[Batch]) -> tuple[float, int]:
        """One optimizer step over a group of micro-batches; (mean loss, tokens)."""
        self.optimizer.zero_grad(set_to_none=True)
        total, tokens = 0.0, 0
        for batch in group:
            batch = batch.to(self.engine.device)
            loss = batch_loss(forward_logits(self.engine, self.setup, batch), batch, self.objective)[0]
            if not torch.isfinite(loss.detach()):
                raise TrainingError(f"the training loss became {float(loss.detach())} (the run diverged); nothing is written: "
                                    "lower the learning rate, or resume from the last checkpoint")
            if not loss.requires_grad:
                raise TrainingError(_no_gradient_message([n for n, p in self.setup.trainable.named_parameters()
                                                          if p.requires_grad]))
            (loss / len(group)).backward()
            total, tokens = total + float(loss.detach()), tokens + batch.tokens
        check_gradients(self.setup.trainable)
        self.optimizer.step()
        return total / len(group), tokens


def check_gradients(trainable: torch.nn.Module) -> None:
    """Raise when a trainable tensor got no gradient from the step's backward: its path to the loss is
    cut somewhere (a kernel without autograd, a detached input), and the step would silently not train it."""
    missing = [name for name, p in trainable.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise TrainingError(_no_gradient_message(missing))


def _no_gradient_message(names: list[str]) -> str:
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (f"no gradient reached {shown}: the forward cut their path to the loss (a layer computed without "
            "autograd?); nothing was updated. Report this with the method and base.")


def _check_settings(epochs, lr, batch_size, grad_accum, max_steps, save_every, max_length) -> None:
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("grad_accum", grad_accum),
                        ("max_length", max_length)):
        if not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("max_steps", max_steps), ("save_every", save_every)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise InvalidArgumentError(f"{name} must be a positive integer or None, got {value!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise InvalidArgumentError(f"lr must be a positive finite number, got {lr!r}")


def _pretrain(run: _Run, state: RunState, lr: float, weight_decay: float, max_length: int, progress: bool) -> None:
    """PPT's first stage: the prompt trained on unlabeled ``{"text"}`` rows with the LM loss (own optimizer)."""
    engine, setup = run.engine, run.setup
    dataset = read_jsonl(setup.pretrain["data"])
    objective = make_objective(dataset, engine.tokenizer, engine.base.facts.spec.is_causal)
    if objective.kind != "lm":
        raise InvalidArgumentError(f"{dataset.path}: PPT pre-trains on unlabeled {{\"text\"}} rows, not {dataset.kind} rows")
    params = [p for p in setup.trainable.parameters() if p.requires_grad]
    stage = _Run(engine, setup, objective, tokenize(dataset, engine.tokenizer, objective, max_length),
                 adamw(params, lr, weight_decay), run.batch_size, run.grad_accum, run.seed, run.pad_id)
    epochs = setup.pretrain["epochs"]
    bar = tqdm(total=epochs * stage.steps_per_epoch(), desc="ppt pre-training", unit="step", disable=not progress)
    for epoch in range(epochs):
        for group in stage.groups(epoch):
            loss, _ = stage.step(group)
            state.pretrain_losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
    bar.close()


def _fit(run: _Run, state: RunState, epochs: int, total: int, save_every: int | None, save, progress: bool,
         label: str) -> Path | None:
    """Optimizer steps from ``state`` on until ``epochs`` or ``total`` steps; held-out scores and a
    checkpoint (``save()``) after every epoch, checkpoints every ``save_every`` steps. Returns the
    last checkpoint written (None if none)."""
    saved = None
    bar = tqdm(total=total, initial=min(state.step, total), desc=label, unit="step", disable=not progress)
    while state.epoch < epochs and state.step < total:
        groups = run.groups(state.epoch)
        for group in groups[state.batch // run.grad_accum :]:
            loss, tokens = run.step(group)
            state.step, state.batch, state.tokens = state.step + 1, state.batch + len(group), state.tokens + tokens
            state.losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if save_every and state.step % save_every == 0:
                saved = save()
            if state.step >= total:
                break
        if state.batch >= sum(len(g) for g in groups):  # the epoch is complete
            state.epoch, state.batch = state.epoch + 1, 0
            state.evals.append({"epoch": state.epoch, "step": state.step, **(run.evaluate() or {})})
            saved = save()
    bar.close()
    return saved


def _prepare_output(out: Path, checkpoint_dir, resume, force: bool) -> Path:
    """The checkpoints folder; refuses an existing ``out`` or an earlier run's checkpoints unless ``force``."""
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; choose another output folder or pass force=True (--force)")
    checkpoints = _checkpoint_dir(out, checkpoint_dir)
    if resume is None and checkpoints.exists() and any(checkpoints.glob("step-*")):
        if not force:
            raise OutputExistsError(f"{checkpoints} holds checkpoints of an earlier run; resume from it "
                                    f"(--resume {checkpoints}) or pass --force to start over")
        shutil.rmtree(checkpoints)
    return checkpoints


HEAD_MODULES = ("classifier", "score")  # PEFT's modules_to_save for SEQ_CLS / TOKEN_CLS
PEFT_LAYOUT_METHODS = ("lora", "prefix", "ptuning2", "prompt", "ptuning")


def head_labels_of(engine, task: str) -> tuple[str, ...]:
    """The labels of the base's ``task`` head (``config.id2label``), or an error naming the head it lacks."""
    head = type(engine.model).__name__
    wanted = HEAD_TASKS.get(task)
    if wanted is None or not head.endswith(wanted):
        raise InvalidArgumentError(f"task {task!r} trains a ...{wanted or 'ForSequenceClassification'} head; "
                                   f"{engine.base.path} is a {head}")
    from adaptkit.heads import labels

    return tuple(labels(engine.model.config, engine.model.config.num_labels))


def with_trained_head(engine, setup: MethodSetup, method: str, task: str) -> MethodSetup:
    """``setup`` with a trainable copy of the base's head for the adapter's rows; saved in the adapter as
    PEFT saves a SEQ_CLS / TOKEN_CLS head (``modules_to_save``)."""
    if method not in PEFT_LAYOUT_METHODS:
        raise InvalidArgumentError(f"task {task}: the head is saved in PEFT's layout; use one of "
                                   f"{', '.join(PEFT_LAYOUT_METHODS)} (not {method})")
    modules = inject.base_modules(engine.model)
    name = next((m for m in HEAD_MODULES if m in modules), None)
    if name is None:
        raise InvalidArgumentError(f"{engine.base.path}: no head module named {' or '.join(HEAD_MODULES)}")
    switched = inject.wrap_once(engine.model, name, inject.SwitchedModule)
    switched.add(ADAPTER_NAME, inject.plain_copy(modules[name]).state_dict())
    head = switched.replacements[ADAPTER_NAME]
    head.requires_grad_(True)

    def save(folder: Path) -> None:
        setup.save(folder)
        add_peft_head(folder, name, head.state_dict(), task, prompt_learning=method != "lora")

    return dataclasses.replace(setup, trainable=nn.ModuleDict({"adapter": setup.trainable, "head": head}), save=save,
                               options={**setup.options, "task": task, "head": name})


def _scoring(engine, dataset) -> str | None:
    """How classification rows score their slot on this base (None for other rows)."""
    if dataset.kind != "classification":
        return None
    from adaptkit.adapters.pet import scoring_for

    return scoring_for(engine.base.facts, engine.model)


def train(method: str, base: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
          epochs: int = 1, lr: float | None = None, batch_size: int = 8, grad_accum: int = 1, eval_split: float = 0.1,
          seed: int = 0, resume: str | os.PathLike | None = None, max_steps: int | None = None,
          save_every: int | None = None, checkpoint_dir: str | os.PathLike | None = None, max_length: int = 512,
          weight_decay: float = 0.0, pattern: str | None = None, verbalizer: dict | None = None,
          dtype: str = "float32", device: str | None = None, progress: bool = True, force: bool = False,
          task: str | None = None, **method_options) -> TrainResult:
    """Train an adapter of ``method`` on ``base`` with the rows of ``data``; write it to ``out``.

    Args:
        method: ``lora``, ``qlora``, ``prefix``, ``ptuning2``, ``prompt``, ``ptuning``, ``ppt``,
            ``bottleneck``, ``fusion`` or ``pet`` (``methods.METHODS``).
        base: a Hugging Face model folder. data: a jsonl file (see ``data.py``).
        out: output folder, in the layout of the method's kind (PEFT, AdapterHub, PET).
        lr: AdamW learning rate (default: the method's). eval_split: share of rows held out.
        resume: a checkpoint folder, or the checkpoints folder (the newest is taken).
        max_steps: stop after this many optimizer steps in all. save_every: checkpoint period (steps).
        pattern, verbalizer: how ``{"text", "label"}`` rows are scored (``adapters/pet.py``).
        task: ``seq-cls`` / ``token-cls``: train the base's classification head with the adapter (PEFT's
            SEQ_CLS / TOKEN_CLS: the head is saved in the adapter as ``modules_to_save``); ``seq2seq``:
            ``{"prompt", "completion"}`` rows on an encoder-decoder (the default there).
        method_options: the method's own options (e.g. ``r=8``, ``virtual_tokens=20``).

    Example:
        >>> ak.train("prompt", "tiny-llama", "data.jsonl", "out/prompt", epochs=3, virtual_tokens=8)
    """
    from adaptkit.engine import Engine

    _check_settings(epochs, lr, batch_size, grad_accum, max_steps, save_every, max_length)
    spec = method_named(method)
    out = Path(out)
    checkpoints = _prepare_output(out, checkpoint_dir, resume, force)
    resume_path = latest_checkpoint(resume) if resume is not None else None
    dataset = read_jsonl(data)  # before the base: bad rows fail fast
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine = Engine.from_pretrained(base, dtype=dtype, quantize=spec.quantize, device=device)
    head_task = task in HEAD_TASKS
    objective = make_objective(dataset, engine.tokenizer, engine.base.facts.spec.is_causal,
                               _scoring(engine, dataset) if task is None else None, pattern, verbalizer, task,
                               head_labels_of(engine, task) if head_task else (), engine.base.facts.spec.is_seq2seq)
    examples = tokenize(dataset, engine.tokenizer, objective, max_length)
    train_rows, eval_rows = split_eval(len(examples), eval_split, seed)

    # 4-bit layers: the kernel with autograd throughout, also for evaluations (which run without grad)
    with quant.dequantizing_kernels(engine.model):
        torch.manual_seed(seed)
        hub_name = re.sub(r"[^A-Za-z0-9_\-]", "_", out.name) or "adapter"
        setup = setup_method(method, SetupContext(engine, ADAPTER_NAME, objective, hub_name), method_options)
        if head_task:
            setup = with_trained_head(engine, setup, method, task)
        lr = spec.lr if lr is None else float(lr)
        params = [p for p in setup.trainable.parameters() if p.requires_grad]
        optimizer = (setup.make_optimizer or adamw)(params, lr, weight_decay)
        signature = {"method": method, "options": setup.options, "base_fingerprint": engine.base.fingerprint,
                     "data_sha256": hashlib.sha256(Path(data).read_bytes()).hexdigest(), "lr": lr,
                     "batch_size": batch_size, "grad_accum": grad_accum, "eval_split": eval_split, "seed": seed,
                     "max_length": max_length, "weight_decay": weight_decay, "task": task,
                     "pattern": objective.pet and objective.pet.pattern,
                     "verbalizer": objective.pet and objective.pet.verbalizer}
        signature = json.loads(json.dumps(signature))  # as a checkpoint stores it (tuples become lists)
        run = _Run(engine, setup, objective, [examples[i] for i in train_rows], optimizer, batch_size, grad_accum, seed,
                   engine.stop_and_pad_ids()[1], [examples[i] for i in eval_rows])
        if resume_path is not None:
            state = load_checkpoint(resume_path, setup, optimizer, signature)
        else:
            state = RunState()
            if setup.pretrain is not None:
                _pretrain(run, state, lr, weight_decay, max_length, progress)
            state.initial_eval = run.evaluate()

        started = time.perf_counter()
        total = epochs * run.steps_per_epoch() if max_steps is None else min(max_steps, epochs * run.steps_per_epoch())
        saved = _fit(run, state, epochs, total, save_every,
                     lambda: save_checkpoint(checkpoints, setup, optimizer, state, signature), progress, f"train {method}")
        checkpoint = saved if saved is not None and saved.name == f"step-{state.step:06d}" else \
            save_checkpoint(checkpoints, setup, optimizer, state, signature)
        final_eval = run.evaluate()
    seconds = time.perf_counter() - started
    with atomic_output_dir(out, force=force, inputs=[base, data]) as tmp:
        setup.save(tmp)
        record = {**signature, "base": str(base), "data": str(data), "epochs": epochs, "steps": state.step,
                  "losses": state.losses, "initial_eval": state.initial_eval, "evals": state.evals, "final_eval": final_eval,
                  "pretrain_losses": state.pretrain_losses, "tokens": state.tokens, "seconds": seconds}
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2))
    return TrainResult(out, method, state.step, state.losses, state.evals, state.initial_eval, final_eval,
                       state.tokens, seconds, checkpoint, state.pretrain_losses)
