"""Turn a raw row into an :class:`Example`: either chat ``messages`` (rendered later with
the tokenizer's chat template) or plain text ``segments`` marked as target or not.

Formats (``data.format``), detected from the first row's keys when ``auto``:

=====================  =====================================  ===========================
format                 keys                                   loss on (train_on=completion)
=====================  =====================================  ===========================
``text``               ``text``                               every token
``prompt_completion``  ``prompt``, ``completion``             the completion + EOS
``instruction``        ``instruction``, ``input``?, ``output``  the output (assistant turn)
``messages``           ``messages``: [{role, content}]        assistant turns
``sharegpt``           ``conversations``: [{from, value}]     assistant (gpt) turns
=====================  =====================================  ===========================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from leantune.data.sources import DataError, Row

FORMATS = ("text", "prompt_completion", "instruction", "messages", "sharegpt")

# ShareGPT dumps name the assistant after whichever product produced the turn.
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
    "bing": "assistant", "bard": "assistant", "assistant": "assistant", "system": "system",
}
CHAT_ROLES = ("system", "user", "assistant")
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass
class Example:
    """A row ready to render: exactly one of ``messages`` and ``segments`` is set.

    Attributes:
        source: where the row came from, e.g. ``"data.jsonl, line 7"``.
        messages: chat turns ``{"role": ..., "content": ...}``.
        segments: plain-text pieces ``(text, is_target)``; EOS is added by the encoder
            after a final target segment.
    """

    source: str
    messages: list[dict[str, str]] | None = None
    segments: list[tuple[str, bool]] | None = None


def detect_format(record: Any, row: Row) -> str:
    """Name the format of ``record`` from its keys, or raise DataError listing them."""
    if not isinstance(record, dict):
        raise DataError(row.source, row.where, None, f"expected an object, got {type(record).__name__}")
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"instruction", "output"} <= keys:
        return "instruction"
    if "text" in keys:
        return "text"
    raise DataError(row.source, row.where, None, f"cannot tell the format from keys {sorted(keys)}; "
                    "expected text | prompt+completion | instruction+output | messages | "
                    "conversations")


def _field(row: Row, name: str, *, required: bool = True, allow_empty: bool = False) -> str:
    rec = row.record
    if not isinstance(rec, dict):
        raise DataError(row.source, row.where, None, f"expected an object, got {type(rec).__name__}")
    if name not in rec or rec[name] is None:
        if required:
            raise DataError(row.source, row.where, name, "missing")
        return ""
    value = rec[name]
    if not isinstance(value, str):
        raise DataError(row.source, row.where, name, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(row.source, row.where, name, "empty")
    return value


def _turns(row: Row, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict]:
    turns = row.record.get(key) if isinstance(row.record, dict) else None
    if not isinstance(turns, list) or not turns:
        raise DataError(row.source, row.where, key, "expected a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(row.source, row.where, where, "expected an object")
        role = turn.get(role_key)
        if role not in roles:
            raise DataError(row.source, row.where, f"{where}.{role_key}",
                            f"unknown role {role!r}; expected one of {sorted(roles)}")
        content = turn.get(text_key)
        if not isinstance(content, str):
            raise DataError(row.source, row.where, f"{where}.{text_key}",
                            f"expected a string, got {type(content).__name__}")
        messages.append({"role": roles[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(row.source, row.where, key, "no assistant turn")
    return messages


def to_example(row: Row, fmt: str, has_chat_template: bool, system_prompt: str | None = None
               ) -> Example:
    """Convert one row of format ``fmt`` to an Example.

    ``instruction`` rows become a user/assistant exchange when the tokenizer has a chat
    template, and Alpaca-style plain text otherwise.

    Raises:
        DataError: a missing, mistyped or empty field, naming file, line and field.
    """
    source = f"{row.source}, {row.where}"
    if fmt == "text":
        return Example(source, segments=[(_field(row, "text"), True)])
    if fmt == "prompt_completion":
        prompt = _field(row, "prompt", allow_empty=True)
        return Example(source, segments=[(prompt, False), (_field(row, "completion"), True)])
    if fmt == "instruction":
        instruction = _field(row, "instruction")
        inp = _field(row, "input", required=False, allow_empty=True)
        output = _field(row, "output")
        if has_chat_template:
            user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
            return Example(source, messages=_with_system(messages, system_prompt))
        template = ALPACA_PROMPT_INPUT if inp.strip() else ALPACA_PROMPT
        return Example(source, segments=[(template.format(instruction=instruction, input=inp), False),
                                         (output, True)])
    if fmt == "messages":
        roles = {r: r for r in CHAT_ROLES}
        messages = _turns(row, "messages", "role", "content", roles)
    elif fmt == "sharegpt":
        messages = _turns(row, "conversations", "from", "value", SHAREGPT_ROLES)
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if not has_chat_template:
        raise DataError(row.source, row.where, None, "chat rows need a tokenizer with a chat "
                        "template; this one has none (use a chat model or set one with "
                        "tokenizer.chat_template)")
    return Example(source, messages=_with_system(messages, system_prompt))


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]
