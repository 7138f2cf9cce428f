"""Preference data in TRL's formats, read and tokenized as TRL tokenizes it.

Formats, detected from a row's keys:

================  ===========================================  ==============================
format            keys                                         example
================  ===========================================  ==============================
``pairs``         ``chosen``, ``rejected``, ``prompt``?        UltraFeedback, HH-RLHF
``unpaired``      ``prompt``, ``completion``, ``label``        KTO's binary feedback
================  ===========================================  ==============================

Each field is text or chat messages (``[{role, content}]``), the same kind in one row.
Without a ``prompt`` (HH-RLHF's ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` strings, or two
conversations that share their first turns) the prompt is the longest shared beginning
of ``chosen`` and ``rejected`` (TRL's ``extract_prompt``): whole turns for messages; for
text, the shared characters, backed up to before a final space.

Tokenization (TRL's ``DPOTrainer``, so both see the same tokens): text completions get
the tokenizer's EOS appended; ``prompt``, ``prompt + chosen`` and ``prompt + rejected``
are tokenized whole (chat messages through the chat template, the prompt with the
generation prompt), and the completion starts where the tokenized prompt stops being a
prefix of both (a merge across the boundary moves that token into the completions).

Truncation keeps the start (TRL's ``keep_start``): each of ``prompt + chosen`` and
``prompt + rejected`` is cut to ``max_length`` tokens from the end, so long completions
lose their ends and the prompt is kept whole. Dropped and counted instead:

- a pair whose prompt alone fills ``max_length`` (no completion token would be left);
- a pair whose chosen and rejected completions are the same tokens (no preference).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from leantune.data.encode import IGNORE, Encoded
from leantune.data.rows import DataError, Row

PREFERENCE_FORMATS = ("pairs", "unpaired")


@dataclass
class Preference:
    """One row: ``prompt`` with a ``chosen`` and a ``rejected`` completion (``pairs``), or
    one ``chosen`` completion judged good or bad by ``label`` (``unpaired``). Fields are
    text, or lists of chat messages."""

    source: str
    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict] | None = None
    label: bool | None = None

    @property
    def chat(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass
class EncodedPreference:
    """Token ids: the shared prompt, and each completion (``rejected`` None when unpaired)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int] | None = None
    label: bool | None = None
    #: the reference's summed log-probs of (chosen, rejected), once computed (a cached
    #: reference, or a held-out set's, which never changes)
    ref: tuple[float, ...] | None = None

    @property
    def num_targets(self) -> int:
        """Completion tokens: what the pair's log-probs sum over."""
        return len(self.chosen) + len(self.rejected or [])

    def examples(self) -> list[Encoded]:
        """``prompt + completion`` for each completion (chosen first), the completion the
        only targets: what a pair objective collates, as two neighbouring examples."""
        return [Encoded(self.prompt + c, [IGNORE] * len(self.prompt) + c)
                for c in (self.chosen, self.rejected) if c is not None]


@dataclass
class PreferenceStats:
    """What reading a preference file kept and dropped."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_prompt_too_long: int = 0
    dropped_same_completions: int = 0
    drops: list[str] = field(default_factory=list)  # the first few dropped rows' sources


def detect_preference_format(record: Any) -> str | None:
    """``pairs`` or ``unpaired`` from a record's keys; None when it is neither."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if {"chosen", "rejected"} <= keys:
        return "pairs"
    if {"prompt", "completion", "label"} <= keys:
        return "unpaired"
    return None


def _text_or_messages(row: Row, name: str, allow_empty: bool = False) -> str | list[dict]:
    value = row.record.get(name) if isinstance(row.record, dict) else None
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            raise DataError(row.source, row.where, name, "empty")
        return value
    if isinstance(value, list):
        for i, turn in enumerate(value):
            where = f"{name}[{i}]"
            if not isinstance(turn, dict):
                raise DataError(row.source, row.where, where, "expected an object")
            if turn.get("role") not in ("system", "user", "assistant", "tool"):
                raise DataError(row.source, row.where, f"{where}.role",
                                f"unknown role {turn.get('role')!r}; expected system, user, "
                                "assistant or tool")
            if not isinstance(turn.get("content"), str):
                raise DataError(row.source, row.where, f"{where}.content", "expected a string")
        if not value and not allow_empty:
            raise DataError(row.source, row.where, name, "empty list of messages")
        return value
    got = "missing" if value is None else f"expected text or a list of messages, got {type(value).__name__}"
    raise DataError(row.source, row.where, name, got)


def shared_prompt(chosen: str | list[dict], rejected: str | list[dict]
                  ) -> tuple[str | list[dict], str | list[dict], str | list[dict]]:
    """``(prompt, chosen, rejected)`` with the prompt the longest shared beginning (TRL's
    ``extract_prompt``: whole turns of messages; characters of text, backed up to before
    a final space so the completion keeps it)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str) and 0 < n < min(len(chosen), len(rejected)) \
            and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def to_preference(row: Row, fmt: str) -> Preference:
    """One row of ``fmt`` as a :class:`Preference`.

    Raises:
        DataError: a missing, mistyped or empty field, or text mixed with messages,
            naming file, line and field.
    """
    source = f"{row.source}, {row.where}"
    if not isinstance(row.record, dict):
        raise DataError(row.source, row.where, None,
                        f"expected an object, got {type(row.record).__name__}")
    if fmt == "unpaired":
        label = row.record.get("label")
        if not isinstance(label, bool):
            raise DataError(row.source, row.where, "label", "expected true or false")
        p = Preference(source, _text_or_messages(row, "prompt", allow_empty=True),
                       _text_or_messages(row, "completion"), label=label)
    elif fmt == "pairs":
        chosen, rejected = _text_or_messages(row, "chosen"), _text_or_messages(row, "rejected")
        if "prompt" in row.record:
            p = Preference(source, _text_or_messages(row, "prompt", allow_empty=True),
                           chosen, rejected)
        else:
            if type(chosen) is not type(rejected):
                raise DataError(row.source, row.where, "rejected",
                                "text and messages mixed with 'chosen'")
            p = Preference(source, *shared_prompt(chosen, rejected))
            if not p.chosen or not p.rejected:
                raise DataError(row.source, row.where, "chosen" if not p.chosen else "rejected",
                                "nothing after the prompt it shares with the other completion")
    else:
        raise ValueError(f"unknown preference format {fmt!r}; expected one of {PREFERENCE_FORMATS}")
    fields = [p.prompt, p.chosen] + ([p.rejected] if p.rejected is not None else [])
    if len({isinstance(f, list) for f in fields if f != "" and f != []}) > 1:
        raise DataError(row.source, row.where, None, "text and chat messages mixed in one row")
    return p


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _tokens(tokenizer, value: str | list[dict], generation_prompt: bool = False) -> list[int]:
    if isinstance(value, list):
        out = tokenizer.apply_chat_template(value, tokenize=True, return_dict=True,
                                            add_generation_prompt=generation_prompt)
        return list(out["input_ids"])
    return list(tokenizer(value)["input_ids"])


def encode_preference(p: Preference, tokenizer, max_length: int, stats: PreferenceStats
                      ) -> EncodedPreference | None:
    """Token ids of ``p`` as TRL's ``DPOTrainer`` makes them, truncated to keep the start;
    None (counted in ``stats``) for a pair that has to be dropped (module docstring)."""
    stats.rows += 1
    completions = [p.chosen] + ([p.rejected] if p.rejected is not None else [])
    if not p.chat:
        eos = tokenizer.eos_token or ""
        completions = [c if c.endswith(eos) else c + eos for c in completions]
    # Text: the prompt is tokenized even when empty (a BOS it gets is shared); an empty
    # conversation has nothing for the chat template to render.
    prompt_ids = [] if p.prompt == [] else _tokens(tokenizer, p.prompt, generation_prompt=True)
    whole = [_tokens(tokenizer, p.prompt + c) for c in completions]
    start = min(common_prefix_length(prompt_ids, w) for w in whole)
    prompt_ids = prompt_ids[:start]
    if len(prompt_ids) >= max_length:
        stats.dropped_prompt_too_long += 1
        _note(stats, p)
        return None
    parts = [w[start:] for w in whole]
    cut = [part[:max_length - len(prompt_ids)] for part in parts]
    if len(cut) == 2 and cut[0] == cut[1]:
        stats.dropped_same_completions += 1
        _note(stats, p)
        return None
    stats.truncated += any(len(c) < len(part) for c, part in zip(cut, parts))
    stats.kept += 1
    return EncodedPreference(prompt_ids, cut[0], cut[1] if len(cut) == 2 else None, p.label)


def _note(stats: PreferenceStats, p: Preference) -> None:
    if len(stats.drops) < 5:
        stats.drops.append(p.source)
