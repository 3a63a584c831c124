"""What the OpenAI-compatible endpoints accept, and the OpenAI error shape of what they refuse.

Requests are checked with pydantic; a malformed field answers 400 naming the field. Fields of the
OpenAI API that adaptkit does not implement are refused when set to anything but their default
(never silently ignored); unknown fields are ignored, as other OpenAI-compatible servers do.
Extensions: ``adapters`` (a weighted mix ``{name: weight}`` for this request, ``ak.Mix``),
``top_k``, ``ignore_eos`` (vLLM's names) and ``timeout`` (seconds).

Errors use OpenAI's shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adaptkit.errors import (
    AdapterFormatError,
    AdapterMismatchError,
    AdaptkitError,
    EngineStateError,
    InvalidArgumentError,
    QueueFullError,
    RequestError,
    UnknownAdapterError,
    UnsupportedAdapterError,
)
from adaptkit.generation import Penalties

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
MAX_CHOICES = 16  # n and best_of
MAX_LOGPROBS = 20  # OpenAI's bound on logprobs / top_logprobs


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields common to completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # vLLM: -1 or 0 = off
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)  # extension (vLLM's name)
    min_tokens: int = Field(default=0, ge=0)  # extension (vLLM's name)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False
    adapters: dict[str, float] | None = None
    timeout: float | None = Field(default=None, gt=0.0)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise RequestError("stop: at most 4 non-empty strings", param="stop")
        return stops

    def check_supported(self) -> None:
        refused = {("n", "stream with n > 1"): self.stream and self.n > 1}
        refused.update(self._refused())
        for (param, what), is_set in refused.items():
            if is_set:
                raise RequestError(f"{what} is not supported by adaptkit serve; leave {param} at its default",
                                   param=param)

    def penalties(self, vocab_size: int) -> Penalties | None:
        """The request's logit shaping (None when it asks for none); ``logit_bias`` keys are token ids."""
        bias = []
        for key, value in (self.logit_bias or {}).items():
            if not str(key).isdigit() or int(key) >= vocab_size:
                raise RequestError(f"logit_bias: key {key!r} is not a token id in [0, {vocab_size})", param="logit_bias")
            bias.append((int(key), float(value)))
        try:
            penalties = Penalties(self.presence_penalty, self.frequency_penalty, self.repetition_penalty,
                                  tuple(bias), self.min_tokens)
        except InvalidArgumentError as exc:
            raise RequestError(str(exc), param="logit_bias") from exc
        return penalties if penalties.active else None

    def _refused(self) -> dict[tuple[str, str], bool]:
        """{(field, what is refused): whether this request asks for it}."""
        return {}


class ClassifyRequest(BaseModel):
    """``POST /classify`` (vLLM's shape): ``input`` one text or a list of texts, ``model`` an adapter (PET, or
    one on a base with a sequence-classification head) or the base's name."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str]
    adapters: dict[str, float] | None = None

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if not texts or any(not t for t in texts):
            raise RequestError("input: give one or more non-empty texts", param="input")
        return texts


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    suffix: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)  # 0: echo the prompt (and its logprobs) only

    def prompts(self) -> list[str | list[int]]:
        """One prompt (text or token ids) per choice."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RequestError("prompt: must not be empty", param="prompt")
        return prompts

    def choices(self) -> int:
        """Completions generated per prompt: ``best_of`` (the best ``n`` of them are returned), else ``n``."""
        if self.best_of is not None and self.best_of < self.n:
            raise RequestError(f"best_of ({self.best_of}) must be at least n ({self.n})", param="best_of")
        return self.best_of or self.n

    def _refused(self) -> dict[tuple[str, str], bool]:
        return {("suffix", "suffix"): bool(self.suffix),
                ("best_of", "stream with best_of > n"): self.stream and self.choices() > self.n,
                ("max_tokens", "max_tokens 0 without echo"): self.max_tokens == 0 and not self.echo,
                ("stream", "stream with max_tokens 0"): self.stream and self.max_tokens == 0}


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def top(self) -> int | None:
        """Alternatives per token to report (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def _refused(self) -> dict[tuple[str, str], bool]:
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise RequestError(f"top_logprobs must be within [0, {MAX_LOGPROBS}]", param="top_logprobs")
        return {("top_logprobs", "top_logprobs without logprobs"): self.top_logprobs is not None and not self.logprobs,
                ("tools", "tools"): bool(self.tools),
                ("tool_choice", "tool_choice"): self.tool_choice not in (None, "none"),
                ("response_format", "response_format"): self.response_format not in (None, {"type": "text"})}


class LoadAdapterRequest(BaseModel):
    """``POST /v1/load_lora_adapter`` (vLLM's names; any adapter kind)."""

    lora_name: str
    lora_path: str


class UnloadAdapterRequest(BaseModel):
    """``POST /v1/unload_lora_adapter``."""

    lora_name: str
    lora_int_id: int | None = None


def parse(model: type[BaseModel], body: bytes):
    """Validate a JSON body; RequestError (400) naming the first bad field."""
    try:
        return model.model_validate_json(body or b"")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        if first.get("type") == "json_invalid" or not where:
            raise RequestError(f"the body is not valid JSON: {first.get('msg')}", param=None) from None
        raise RequestError(f"{where}: {first.get('msg')}", param=where) from None


def check_adapter_name(name: str, taken: str) -> None:
    """A runtime-loaded adapter's name: 1-64 letters, digits, '_' or '-', not the base model's name."""
    if not ADAPTER_NAME.match(name) or name == taken:
        raise RequestError(f"lora_name {name!r} must be 1-64 letters, digits, '_' or '-' and not the base "
                           f"model's name {taken!r}", param="lora_name")


def adapter_taken_error(name: str) -> RequestError:
    """400 for a runtime load under a name already served."""
    return RequestError(f"an adapter named {name!r} is already served; unload it first", param="lora_name")


def unknown_model_error(name: str, param: str, known: list[str]) -> RequestError:
    """404 for a request naming a model (adapter) nobody serves, with the list of those served."""
    return RequestError(f"the model {name!r} does not exist; known models: {', '.join(known)}", param=param,
                        status=404, code="model_not_found")


def contained_adapter_path(adapter_dir: str | os.PathLike, lora_path: str) -> Path:
    """The real path of ``lora_path`` (relative to ``adapter_dir``, or absolute inside it), checked to stay inside.

    Refused: any ``..`` component, absolute paths elsewhere, and symlinks (the folder itself or any
    file in it) whose target is outside ``adapter_dir``.
    """
    root = Path(adapter_dir).resolve(strict=True)
    if "\x00" in lora_path:
        raise RequestError("lora_path contains a NUL character", param="lora_path", status=400)
    given = Path(lora_path)
    if ".." in given.parts:
        raise RequestError(f"lora_path {lora_path!r}: '..' is not allowed", param="lora_path", status=400)
    candidate = given if given.is_absolute() else root / given
    try:
        real = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        raise RequestError(f"lora_path {lora_path!r} does not exist under the adapter directory",
                           param="lora_path", status=404, code="adapter_not_found") from None
    inside = [real] + ([p.resolve() for p in real.rglob("*")] if real.is_dir() else [])
    if any(not p.is_relative_to(root) for p in inside):
        raise RequestError(f"lora_path {lora_path!r} leads outside the adapter directory; only paths inside "
                           "--adapter-dir can be loaded", param="lora_path", status=400)
    return real


def read_client_adapter(read, path: Path, given: str):
    """``read(path)`` of an adapter a client named: whatever fails in its files is the client's 400."""
    try:
        return read(path)
    except AdaptkitError:
        raise
    except Exception as exc:  # a reader tripping over malformed content (a missing key, a wrong type)
        raise RequestError(f"lora_path {given!r} cannot be read as an adapter: {type(exc).__name__}: {exc}",
                           param="lora_path", status=400) from exc


# adaptkit error -> (HTTP status, OpenAI error type, code)
_STATUS = [
    (QueueFullError, 429, "rate_limit_exceeded", "queue_full"),
    (UnknownAdapterError, 404, "invalid_request_error", "model_not_found"),
    (EngineStateError, 409, "invalid_request_error", None),
    ((InvalidArgumentError, UnsupportedAdapterError, AdapterFormatError, AdapterMismatchError), 400,
     "invalid_request_error", None),
]


def error_body(exc: BaseException) -> tuple[int, dict]:
    """(HTTP status, OpenAI error JSON) for an exception raised while serving a request."""
    if isinstance(exc, RequestError):
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        if exc.status == 429:
            kind = "rate_limit_exceeded"
        return exc.status, _body(str(exc), kind, exc.param, exc.code)
    for classes, status, kind, code in _STATUS:
        if isinstance(exc, classes):
            return status, _body(str(exc), kind, None, code)
    if isinstance(exc, AdaptkitError):
        return 400, _body(str(exc), "invalid_request_error", None, None)
    return 500, _body(f"internal error: {type(exc).__name__}: {exc}", "server_error", None, None)


def _body(message: str, kind: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
