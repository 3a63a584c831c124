"""Chat messages as a prompt: the tokenizer's chat template when it has one, else a documented fallback.

The fallback is one line per message, then the assistant's turn::

    system: You are terse.
    user: Hello
    assistant:

tokenized like a completion prompt (with the tokenizer's special tokens, e.g. BOS). The server's chat
route, ``adaptkit generate --chat`` and the demo all render chats here, so they agree token for token.
"""

from __future__ import annotations

from collections.abc import Sequence


def chat_text(tokenizer, messages: Sequence[dict]) -> tuple[str, bool]:
    """The prompt text of ``messages`` ([{"role", "content"}]) up to the assistant's turn, and whether
    the tokenizer's special tokens still need adding (only for the fallback: a template writes its own)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True), False
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:", True


def chat_prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of the chat ``messages`` up to the assistant's turn."""
    text, add_special = chat_text(tokenizer, messages)
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])
