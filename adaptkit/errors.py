"""Every user-facing failure of adaptkit is an ``AdaptkitError``.

Messages name the file, key or value at fault, what was expected, and how to fix it. The CLI
prints ``error: <message>`` on one line and exits non-zero.
"""

from __future__ import annotations


class AdaptkitError(Exception):
    """Base class of all adaptkit errors."""


class AdapterFormatError(AdaptkitError):
    """An adapter folder or file is missing, unreadable, or not in a known layout."""


class UnsupportedAdapterError(AdaptkitError):
    """The adapter uses a kind or an option adaptkit does not implement."""


class AdapterMismatchError(AdaptkitError):
    """The adapter was made for another base (architecture, shapes, module names)."""


class BaseModelError(AdaptkitError):
    """The base model folder cannot be loaded."""


class UnknownAdapterError(AdaptkitError):
    """A name refers to no loaded adapter."""


class EngineStateError(AdaptkitError):
    """The engine cannot do this in its present state (e.g. a LoRA is merged)."""


class OutputExistsError(AdaptkitError):
    """An output path already exists and overwriting was not asked for."""


class OutputWriteError(AdaptkitError):
    """An output could not be written (disk full, read-only folder, ...); nothing was left behind."""


class InvalidArgumentError(AdaptkitError):
    """An argument value is out of range or of the wrong form."""


class TrainingError(AdaptkitError):
    """A training step cannot do what it must (e.g. no gradient reaches a trainable tensor)."""


class MissingDependencyError(AdaptkitError):
    """An optional package a feature needs is not installed (the message names the pip command)."""


class QueueFullError(AdaptkitError):
    """The server's request queue is full; the client should retry later (HTTP 429)."""


class RequestError(AdaptkitError):
    """An HTTP request cannot be served as sent; names the field at fault and the HTTP status to answer."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code
