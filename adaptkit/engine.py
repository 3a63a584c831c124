"""The Engine: one base model, many named adapters, each batch row routed to its own.

    eng = Engine.from_pretrained("tiny-llama")
    eng.add_adapter("sql", "adapters/sql")
    logits = eng.logits(ids, adapters=["sql", None])

Adapters are injected once (``inject.py``); a forward sets a routing plan (``routing.py``) that
every injected layer reads. The facade keeps construction, adapters by name, the forward entry points
and the lock; the rest lives where it is named: fitting an adapter to the base (``fitting.py``), each
kind's attach/detach/details (``kinds.py``), row compositions and their checks (``compositions.py``),
task heads and PET (``heads.py``), encoder-decoder start-up (``seq2seq.py``), merging in place and back
(``in_place.py``).
"""

from __future__ import annotations

import functools
import math
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from adaptkit import heads, in_place, prefix_cache
from adaptkit.adapters.lora import LoraAdapter
from adaptkit.base import LoadedBase, check_made_for, load_base
from adaptkit.compositions import check_row_entries, members_of
from adaptkit.errors import (
    EngineStateError,
    InvalidArgumentError,
    UnknownAdapterError,
    UnsupportedAdapterError,
)
from adaptkit.fitting import fit_lora, rescaled
from adaptkit.generation import (
    DecodeState,
    attention_masks,
    check_sampling,
    left_pad,
    new_cache,
    positions_from_mask,
    sample_next,
)
from adaptkit.kinds import KIND_HANDLERS, details_of  # noqa: F401 (details_of re-exported)
from adaptkit.measured import cache_argument
from adaptkit.routing import RoutingPlan, RowsNotSeparable, by_groups, route_rows, use_plan
from adaptkit.seq2seq import start as seq2seq_start

_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_PLAIN_MODULE = torch.nn.Module()  # its attributes (``training``, ``forward``, ...) cannot name an adapter


@dataclass(frozen=True)
class AdapterInfo:
    """What ``Engine.adapters`` reports about one loaded adapter."""

    name: str
    kind: str
    params: int
    nbytes: int
    source: str | None
    details: dict = field(default_factory=dict)


@dataclass
class TokenScores:
    """:meth:`Engine.score` of one input: its tokens, each one's log-probability given those before it
    (None for the first), and (with ``top``) the most likely (token, log-probability) pairs there."""

    token_ids: list[int]
    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


def _exclusive(method):
    """Run ``method`` holding the engine's lock: adapter changes, merges and forwards never interleave
    across threads (a forward during a merge would read half-written weights)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class Engine:
    """A base model with named adapters; logits and generation with per-row adapters.

    Safe to share between threads: every public method that reads or changes the model holds one
    re-entrant lock, so calls from several threads run one after the other.
    """

    def __init__(self, base: LoadedBase):
        self.base = base
        self._lock = threading.RLock()
        self._adapters: dict[str, object] = {}
        self._infos: dict[str, AdapterInfo] = {}
        self._default: object = None
        self._merged: str | None = None
        self._merge_backup: list[tuple[torch.nn.Module, str, object]] = []  # (module, param, original)
        # prompt adapters on causal LMs: served as K/V computed once (False: embeddings prepended per request)
        self.prompt_as_cache = True

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: str | torch.dtype = "float32",
        quantize: str | None = None,
        device: str | torch.device = "cpu",
        **quantize_options,
    ) -> Engine:
        """Load a base model folder. ``quantize="nf4"`` loads its linear layers in 4-bit NF4."""
        return cls(load_base(path, dtype=dtype, device=device, quantize=quantize, quantize_options=quantize_options))

    @property
    def model(self) -> torch.nn.Module:
        return self.base.model

    @property
    def tokenizer(self):
        return self.base.tokenizer

    @property
    def device(self) -> torch.device:
        return self.base.model.get_input_embeddings().weight.device

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        return dict(self._infos)

    @property
    def merged(self) -> str | None:
        """The name of the LoRA merged into the weights, if any."""
        return self._merged

    @_exclusive
    def add_adapter(self, name: str, adapter, scale: float = 1.0) -> AdapterInfo:
        """Load an adapter (a path, kind detected from the files, or an adapter object) as ``name``.

        ``scale`` multiplies the adapter's effect (a LoRA's ``alpha / r``). A failed load leaves the
        engine exactly as it was.
        """
        from adaptkit.formats.detect import read_adapter

        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidArgumentError(f"adapter name {name!r} must be 1-64 letters, digits, '_' or '-'")
        if hasattr(_PLAIN_MODULE, name):  # routed layers keep adapters in nn.ModuleDicts, keyed by name
            raise InvalidArgumentError(f"adapter name {name!r} is reserved (a torch.nn.Module attribute); choose another")
        if name in self._adapters:
            raise InvalidArgumentError(f"an adapter named {name!r} is already loaded; remove_adapter({name!r}) first")
        if self._merged is not None:
            raise EngineStateError(f"{self._merged!r} is merged into the weights; call unmerge() before adding adapters")
        loaded = read_adapter(adapter) if isinstance(adapter, (str, os.PathLike)) else adapter
        handlers = KIND_HANDLERS.get(loaded.kind)
        if handlers is None:
            raise UnsupportedAdapterError(f"adapter kind {loaded.kind!r} cannot be served by this engine")
        self._check_base(loaded)
        if isinstance(loaded, LoraAdapter):
            loaded = fit_lora(self.model, loaded)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise InvalidArgumentError(f"scale must be a finite number, got {scale!r}")
        if scale != 1.0:
            loaded = rescaled(loaded, float(scale))
        attach, _, details = handlers
        try:
            attach(self.model, name, loaded, self.base.dtype, self.device)
        except Exception:
            handlers[1](self.model, name, loaded)  # undo any partial injection
            raise
        self._adapters[name] = loaded
        info = AdapterInfo(name, loaded.kind, loaded.parameter_count, loaded.nbytes, loaded.source, details(loaded))
        self._infos[name] = info
        return info

    def _check_base(self, adapter) -> None:
        check_made_for(adapter, self.base.facts, self.base.fingerprint)

    @_exclusive
    def remove_adapter(self, name: str) -> None:
        """Unload an adapter (its layers go back to the plain base modules when none is left)."""
        self._require(name)
        if self._merged == name:
            raise EngineStateError(f"{name!r} is merged into the weights; call unmerge() first")
        adapter = self._adapters.pop(name)
        del self._infos[name]
        KIND_HANDLERS[adapter.kind][1](self.model, name, adapter)
        if name in members_of(self._default if not isinstance(self._default, list) else None):
            self._default = None

    @_exclusive
    def set_default_adapter(self, entry) -> None:
        """The adapter used when ``adapters=None`` is passed (no weights are copied)."""
        for name in members_of(entry):
            self._require(name)
        self._default = entry

    def _require(self, name: str) -> None:
        if name not in self._adapters:
            known = ", ".join(sorted(self._adapters)) or "none loaded"
            raise UnknownAdapterError(f"no adapter named {name!r}; loaded adapters: {known}")

    # ----------------------------------------------------------------- routing
    def plan(self, adapters, batch_size: int) -> RoutingPlan:
        """Check the per-row entries and group rows by adapter, once for the whole forward."""
        if adapters is None or isinstance(adapters, (str,)) or not isinstance(adapters, Sequence):
            entries = [self._default if adapters is None else adapters] * batch_size
        else:
            entries = list(adapters)
        if len(entries) != batch_size:
            raise InvalidArgumentError(f"adapters has {len(entries)} entries for a batch of {batch_size} rows")
        for entry in entries:
            for name in members_of(entry):
                self._require(name)
        check_row_entries(entries, self._adapters)
        if self._merged is not None:
            entries = [self._strip_merged(e) for e in entries]
        return route_rows(entries, device=self.device)

    def _strip_merged(self, entry):
        if entry == self._merged:
            return None
        raise EngineStateError(
            f"{self._merged!r} is merged into the weights, so every row must use it (got {entry!r}); call unmerge() first"
        )

    # ----------------------------------------------------------------- forward
    @_exclusive
    @torch.inference_mode()
    def logits(self, input_ids, attention_mask=None, adapters=None, decoder_input_ids=None) -> torch.Tensor:
        """Logits [batch, seq, vocab] (encoders: last hidden state, or a task head's) with each row's adapter.

        ``adapters``: one entry per row (None, a name, ak.Stack/Fuse/Mix), or one entry for all rows.
        Left padding is handled: position ids count real tokens only. Encoder-decoders (T5, BART): the
        inputs go to the encoder and ``decoder_input_ids`` [B, T] to the decoder, whose logits
        [B, T, vocab] are returned (transformers' names).
        """
        input_ids, attention_mask = self._checked_batch(input_ids, attention_mask)
        plan = self.plan(adapters, input_ids.shape[0])
        counts_places = self.base.facts.spec.is_causal and not self.base.facts.pads_exactly
        groups = self._row_groups(plan, attention_mask.sum(dim=1).tolist() if counts_places else None)
        if counts_places and not bool(attention_mask.all()):
            # a model that places tokens by their count: each group of equal lengths runs on its real columns
            return by_groups(groups, lambda rows: self._unpadded_logits(
                input_ids[rows], attention_mask[rows], [plan.entries[i] for i in rows]), columns=attention_mask.bool())
        if len(groups) > 1:  # rows whose prefixes place them at different positions, one forward each
            decoder = None if decoder_input_ids is None else \
                torch.as_tensor(decoder_input_ids, device=self.device).view(input_ids.shape[0], -1)
            return by_groups(groups, lambda rows: self.logits(
                input_ids[rows], attention_mask[rows], [plan.entries[i] for i in rows],
                None if decoder is None else decoder[rows]))
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.base.facts.spec.is_seq2seq:
            if decoder_input_ids is None:
                raise InvalidArgumentError(f"{self.base.facts.model_type} is an encoder-decoder: pass decoder_input_ids "
                                           "(the decoder's tokens, starting with its decoder_start_token_id)")
            kwargs["decoder_input_ids"] = torch.as_tensor(decoder_input_ids, device=self.device).view(
                input_ids.shape[0], -1)
        elif decoder_input_ids is not None:
            raise InvalidArgumentError(f"decoder_input_ids: {self.base.facts.model_type} has no decoder of its own")
        if self.base.facts.spec.is_causal:
            kwargs["position_ids"] = positions_from_mask(attention_mask)
            kwargs["use_cache"] = False
        # prefix / prompt rows: their K/V as the cache (or embeddings in front), mask and positions extended
        virtual = prefix_cache.add_virtual_inputs(self.model, plan, self._adapters, kwargs, self.prompt_as_cache)
        if "position_ids" in kwargs:
            kwargs["attention_mask"] = attention_masks(self.model, kwargs["attention_mask"], kwargs["position_ids"],
                                                       self.base.dtype)
        try:
            with use_plan(plan):
                out = self.model(**kwargs)
        except RowsNotSeparable:  # a layer saw inputs that are not rows (DeBERTa's relative embeddings)
            by_entry = {}
            for row, entry in enumerate(plan.entries):
                by_entry.setdefault(entry, []).append(row)
            return by_groups(list(by_entry.values()), lambda rows: self.logits(
                input_ids[rows], attention_mask[rows], [plan.entries[i] for i in rows]))
        out = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        if self.base.facts.spec.is_seq2seq:
            return out  # the decoder's positions; virtual tokens went to the encoder
        return prefix_cache.real_positions(out, virtual, input_ids.shape[1])

    def _unpadded_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, entries: list) -> torch.Tensor:
        """Logits of rows that use the same columns, run on those columns only (no padding in the forward)."""
        used = attention_mask.bool().any(dim=0).nonzero().flatten()
        columns = slice(int(used[0]), int(used[-1]) + 1)
        return self.logits(input_ids[:, columns], attention_mask[:, columns], entries)

    def _checked_batch(self, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` [B, S] integer ids within the vocabulary and a mask of the same shape, or a clear error."""
        try:
            input_ids = torch.as_tensor(input_ids, device=self.device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InvalidArgumentError(f"input_ids must be a [batch, seq] tensor or nested list of token ids ({exc})") \
                from exc
        if input_ids.ndim == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.ndim != 2 or input_ids.numel() == 0:
            raise InvalidArgumentError(f"input_ids must be [batch, seq] with at least one token, got shape "
                                       f"{tuple(input_ids.shape)}")
        if input_ids.is_floating_point() or input_ids.dtype == torch.bool or input_ids.is_complex():
            raise InvalidArgumentError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        self._check_token_ids(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = torch.as_tensor(attention_mask, device=self.device)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise InvalidArgumentError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                                       f"{tuple(input_ids.shape)}; give one mask value per token")
        return input_ids.long(), attention_mask

    def _check_token_ids(self, ids) -> None:
        vocab = self.base.facts.vocab_size
        low, high = (int(ids.min()), int(ids.max())) if isinstance(ids, torch.Tensor) else (min(ids), max(ids))
        if low < 0 or high >= vocab:
            raise InvalidArgumentError(f"token id {low if low < 0 else high} is outside the vocabulary [0, {vocab}); "
                                       "ids must come from this base's tokenizer")

    def check_context(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, adapters=None) -> None:
        """Refuse a generation that would run past the model's context (``max_position_embeddings``)."""
        context = self.base.facts.max_positions
        if context is None:
            return
        entries = adapters if isinstance(adapters, list) else [adapters] * len(prompt_ids)
        for prompt, entry in zip(prompt_ids, entries):
            virtual = sum(self._infos[n].details.get("virtual_tokens", 0) for n in members_of(entry) if n in self._infos)
            needed = len(prompt) + virtual + max_new_tokens
            if needed > context:
                raise InvalidArgumentError(
                    f"this model's context is {context} tokens; the request needs {needed} ({len(prompt)} prompt + "
                    f"{virtual} virtual tokens + max_new_tokens {max_new_tokens}); shorten the prompt or lower "
                    "max_new_tokens")

    @_exclusive
    @torch.inference_mode()
    def classify(self, texts: Sequence[str] | str, adapter=None) -> list[dict[str, float]]:
        """Label probabilities of each text: one ``{label: p}`` per text.

        - a PET adapter: ``p(l | x) = softmax_l(logits[slot, id(v(l))])`` (``adapters/pet.py``);
        - a base with a sequence-classification head (``...ForSequenceClassification``): softmax of the
          head's logits, labels from ``config.id2label``; ``adapter`` is one entry for every text or one
          per text (a LoRA, a prompt with its own head, ``None`` for the base's head), in one batch.

        Example:
            >>> eng.classify(["the movie was dull"], adapter="sentiment")  # [{"pos": 0.1, "neg": 0.9}]
        """
        return heads.classify(self, texts, adapter)

    def classify_tokens(self, texts: Sequence[str] | str, adapter=None) -> list[list[dict]]:
        """Each token's label on a base with a token-classification head (``...ForTokenClassification``):
        per text, ``{"text", "start", "end", "label", "score"}`` for every token that covers characters
        (special tokens are left out), ``start:end`` its span in the text. ``adapter`` as in :meth:`classify`."""
        return heads.classify_tokens(self, texts, adapter)

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        if self.tokenizer is None:
            raise EngineStateError(f"{self.base.path} has no tokenizer files; pass token ids instead of text")
        return [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]

    @_exclusive
    def generate(
        self,
        prompts: Sequence[str] | str,
        adapters=None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> list[str]:
        """Generate a continuation of each prompt with its row's adapter (batched, left-padded)."""
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        token_rows = self.generate_ids(
            self.encode(prompts), adapters, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
        )
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in token_rows]

    @_exclusive
    @torch.inference_mode()
    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        adapters=None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        eos_token_id: int | None = None,
        on_token=None,
    ) -> list[list[int]]:
        """Like :meth:`generate` on token ids; returns the new tokens of each row (up to eos).

        ``on_token(row, token_id)`` is called for each token as soon as it is chosen (streaming)."""
        seq2seq = self.base.facts.spec.is_seq2seq
        if not self.base.facts.spec.is_causal and not seq2seq:
            raise EngineStateError(f"{self.base.facts.model_type} is an encoder; generate needs a causal LM")
        check_sampling(temperature, top_p, top_k, max_new_tokens)
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise InvalidArgumentError("every prompt must have at least one token")
        for prompt in prompt_ids:
            self._check_token_ids(list(prompt))
        if not seq2seq:
            self.check_context(prompt_ids, max_new_tokens, adapters)
        eos_ids, pad_id = self.stop_and_pad_ids(eos_token_id)
        batch = len(prompt_ids)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        new_tokens: list[list[int]] = [[] for _ in range(batch)]
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        eos = torch.tensor(sorted(eos_ids), device=self.device) if eos_ids else None
        groups = self._row_groups(self.plan(adapters, batch), [len(p) for p in prompt_ids])
        if len(groups) > 1:  # one generation per group (see _row_groups), rows put back in order
            entries = self.plan(adapters, batch).entries
            rows_out: list[list[int]] = [[] for _ in range(batch)]
            for rows in groups:
                got = self.generate_ids([prompt_ids[i] for i in rows], [entries[i] for i in rows], max_new_tokens,
                                        temperature, top_p, top_k, seed, eos_token_id,
                                        None if on_token is None else (lambda r, t, rows=rows: on_token(rows[r], t)))
                for i, tokens in zip(rows, got):
                    rows_out[i] = tokens
            return rows_out
        if seq2seq:
            logits, step_fn = seq2seq_start(self, prompt_ids, adapters, pad_id)
        else:
            logits, state = self.prefill(prompt_ids, adapters, pad_id)
            step_fn = lambda token: self.decode_step(state, token)  # noqa: E731
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_p, top_k, generator)
            token = torch.where(finished, torch.full_like(token, pad_id), token)
            for row in (~finished).nonzero().flatten().tolist():
                new_tokens[row].append(int(token[row]))
                if on_token is not None:
                    on_token(row, int(token[row]))
            if eos is not None:
                finished |= torch.isin(token, eos)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            logits = step_fn(token)
        return new_tokens

    def _row_groups(self, plan: RoutingPlan, lengths: Sequence[int] | None = None) -> list[list[int]]:
        """Row groups that can share a forward: one group, except where the model places tokens by their
        count rather than by ``position_ids`` (measured: ``facts.pads_exactly``; BART's decoder counts
        absolute positions from its cache). There a row behind padding, or behind another row's longer prefix,
        would sit at other positions than alone: one group per shift. Encoders (RoFormer) and BART's decoder:
        per prefix length; a causal LM (BlenderbotSmall): per virtual length and number of real tokens
        (``lengths``), each group then run without padding."""
        facts = self.base.facts
        if facts.pads_exactly and facts.family != "bart":
            return [list(range(plan.batch_size))]
        keys = []
        for row, entry in enumerate(plan.entries):
            name, _ = prefix_cache.split_virtual(entry, self._adapters)
            adapter = self._adapters.get(name)
            if facts.spec.is_causal:
                virtual = adapter.config.num_virtual_tokens if adapter is not None else 0
                keys.append((virtual, None if lengths is None else lengths[row]))
            else:
                keys.append(adapter.config.num_virtual_tokens if adapter is not None and adapter.kind == "prefix" else 0)
        return [[i for i, key in enumerate(keys) if key == found] for found in dict.fromkeys(keys)]

    @_exclusive
    @torch.inference_mode()
    def start_seq2seq(self, prompt_ids, adapters=None, pad_id: int = 0):
        """Encoder-decoders: run the encoder once on the right-padded prompts (each row with its adapter),
        then the decoder from its start token; returns the first logits [B, vocab] and ``step(tokens [B])``,
        which feeds one token per row and returns the next logits (the server's decode loop uses it)."""
        if not self.base.facts.spec.is_seq2seq:
            raise EngineStateError(f"{self.base.facts.model_type} is not an encoder-decoder; use prefill")
        return seq2seq_start(self, prompt_ids, adapters, pad_id)

    @_exclusive
    @torch.inference_mode()
    def score(self, inputs, adapters=None, top: int = 0) -> list[TokenScores]:
        """Log-probability of every token of each input given the ones before it, with each row's adapter.

        ``inputs``: texts (tokenized as :meth:`generate` does) or token-id lists. Token ``t`` of a row
        gets ``log_softmax(logits[t-1])[t]`` (the first gets None); ``top`` > 0 adds the ``top`` most
        likely tokens at each position. What evaluation harnesses ask of ``echo`` + ``logprobs``.

        Example:
            >>> eng.score(["The capital of France is Paris"], adapters="geo")[0].logprobs[-1]
        """
        if isinstance(inputs, str) or (len(inputs) and isinstance(inputs[0], int)):
            inputs = [inputs]
        rows = [list(r) for r in (self.encode(inputs) if inputs and isinstance(inputs[0], str) else inputs)]
        _, pad_id = self.stop_and_pad_ids()
        ids, mask = left_pad(rows, pad_id, self.device)
        logprobs = torch.log_softmax(self.logits(ids, mask, adapters).float(), dim=-1)  # [B, S, V]
        width = ids.shape[1]
        scores = []
        for i, row in enumerate(rows):
            start = width - len(row)
            targets = torch.tensor(row[1:], device=self.device)
            before = logprobs[i, start : width - 1]  # position t-1 predicts token t
            chosen = before.gather(-1, targets.view(-1, 1)).squeeze(-1).tolist()
            alternatives = [None]
            if top > 0:
                values, indices = before.topk(min(top, before.shape[-1]), dim=-1)
                alternatives += [list(zip(ix, vs)) for ix, vs in zip(indices.tolist(), values.tolist())]
            scores.append(TokenScores(row, [None, *chosen], alternatives if top > 0 else [None] * len(row)))
        return scores

    def stop_and_pad_ids(self, eos_token_id: int | list[int] | None = None) -> tuple[set[int], int]:
        """(token ids that end a row, the id padding is filled with): the tokenizer's, else the config's."""
        config = self.model.config
        if eos_token_id is None:
            eos_token_id = getattr(self.tokenizer, "eos_token_id", None) or getattr(config, "eos_token_id", None)
        eos_ids = set(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]) - {None}
        pad_id = _first_not_none(
            getattr(self.tokenizer, "pad_token_id", None), getattr(config, "pad_token_id", None),
            *sorted(i for i in eos_ids if i >= 0), 0,
        )
        return eos_ids, pad_id

    @_exclusive
    @torch.inference_mode()
    def prefill(self, prompt_ids: Sequence[Sequence[int]], adapters=None, pad_id: int = 0) -> tuple[torch.Tensor, DecodeState]:
        """Run the prompts, left-padded, with each row's adapter; the first step of generation.

        Prefix and prompt rows get their K/V in the cache first (mask and positions extended).
        Returns the next-token logits [B, vocab] and the :class:`DecodeState` to continue from
        with :meth:`decode_step`.
        """
        if not self.base.facts.spec.is_causal:
            raise EngineStateError(f"{self.base.facts.model_type} is an encoder; generate needs a causal LM")
        ids, mask = left_pad([list(r) for r in prompt_ids], pad_id, self.device)
        plan = self.plan(adapters, ids.shape[0])
        cache = new_cache(self.model)
        step = {"input_ids": ids, "attention_mask": mask, "position_ids": positions_from_mask(mask), "use_cache": True,
                cache_argument(self.model): cache}
        prefix_cache.add_virtual_inputs(self.model, plan, self._adapters, step, self.prompt_as_cache)
        full_mask = step["attention_mask"]
        step["attention_mask"] = attention_masks(self.model, full_mask, step["position_ids"], self.base.dtype)
        with use_plan(plan):
            out = self.model(**step)
        step["attention_mask"] = full_mask
        state = DecodeState(cache, step["attention_mask"], step["position_ids"][:, -1:], plan.entries, plan)
        return out.logits[:, -1, :], state

    @_exclusive
    @torch.inference_mode()
    def decode_step(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``tokens`` [B]) and return the next-token logits [B, vocab].

        ``state`` is advanced in place (cache, mask and positions grow by one); its routing plan is
        rebuilt here when its rows changed.
        """
        if state.plan is None:
            state.plan = self.plan(list(state.entries), state.batch_size)
        ones = torch.ones((state.batch_size, 1), dtype=state.mask.dtype, device=state.mask.device)
        state.mask = torch.cat([state.mask, ones], dim=1)
        state.positions = state.positions + 1
        step = {"input_ids": tokens.view(-1, 1),
                "attention_mask": attention_masks(self.model, state.mask, state.positions, self.base.dtype),
                "position_ids": state.positions, "use_cache": True, cache_argument(self.model): state.cache}
        with use_plan(state.plan):
            out = self.model(**step)
        return out.logits[:, -1, :]

    # ----------------------------------------------------------------- merging
    @_exclusive
    def merge(self, name: str) -> None:
        """Fold the LoRA ``name`` into the base weights in place (zero added latency).

        The original tensors are kept aside; :meth:`unmerge` copies them back bit for bit.
        While merged, every row must use ``name``. All new tensors are computed before any is
        written, so a failure leaves the weights untouched.
        """
        self._require(name)
        if self._merged is not None:
            raise EngineStateError(f"{self._merged!r} is already merged; call unmerge() first")
        adapter = self._adapters[name]
        if not isinstance(adapter, LoraAdapter):
            raise UnsupportedAdapterError(f"{name!r} is a {adapter.kind} adapter; only LoRA-family adapters can be merged")
        in_place.merge(self.model, name, adapter, self._merge_backup)
        self._merged = name

    @_exclusive
    def unmerge(self) -> None:
        """Restore the base weights exactly (copies kept at merge time, never a subtraction)."""
        in_place.restore(self._merge_backup)
        self._merge_backup.clear()
        self._merged = None


def _first_not_none(*values):
    return next(v for v in values if v is not None)
