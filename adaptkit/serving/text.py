"""Text out of the server: generated tokens turned into text as they arrive (chat prompts: ``adaptkit.chat``)."""

from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    """Generated token ids -> text, emitted piece by piece, cut at the first stop string.

    Each :meth:`add` decodes all tokens so far (``skip_special_tokens=True``, as ``Engine.generate``)
    and returns the text not returned before. An incomplete UTF-8 sequence at the end is held
    back, and so are the last ``len(longest stop) - 1`` characters, which might begin a stop string.
    The pieces concatenate to :attr:`text`, the final text.
    """

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.tokens: list[int] = []
        self.text = ""  # returned so far
        self.stopped = False  # a stop string was found; nothing more is returned

    def add(self, token_id: int) -> str:
        """Take one token; the new text that is safe to send now."""
        if self.stopped:
            return ""
        self.tokens.append(token_id)
        decoded = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = self._stop_at(decoded)
        if cut is not None:
            self.stopped = True
            return self._release(decoded[:cut])
        if decoded.endswith("\ufffd"):
            return ""
        hold = max((len(s) for s in self.stops), default=1) - 1
        return self._release(decoded[: len(decoded) - hold] if hold else decoded)

    def finish(self) -> str:
        """The text still held back, at the end of generation."""
        if self.stopped:
            return ""
        decoded = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = self._stop_at(decoded)
        if cut is not None:
            self.stopped = True
            decoded = decoded[:cut]
        return self._release(decoded)

    def _stop_at(self, decoded: str) -> int | None:
        # a stop string can only appear in text not yet returned, or straddle its start
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        found = [i for i in (decoded.find(s, start) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _release(self, upto: str) -> str:
        # byte-level BPE text only grows at the end, so ``upto`` extends what was returned
        piece = upto[len(self.text) :]
        self.text += piece
        return piece
