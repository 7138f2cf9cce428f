"""Render an :class:`Example` to text, tokenize it, and mark the target tokens.

Chat examples are rendered with the tokenizer's chat template. The character span of
assistant turn ``i`` is ``[len(render(m[:i], add_generation_prompt=True)),
len(render(m[:i+1])))``: it covers the reply and the template's end-of-turn marker (so
the model learns to stop), never the role header. An opening assistant turn (``i = 0``)
answers nothing and is not a target. Tokens whose characters overlap a target span get
``labels = input_ids``; all others get -100.
"""

from __future__ import annotations

from dataclasses import dataclass

from leantune.data.formats import Example
from leantune.data.sources import DataError

IGNORE = -100


@dataclass
class Encoded:
    """Token ids and labels of one example, both of length ``n <= max_length``."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_targets(self) -> int:
        # Position 0 is never predicted (no previous token), so it is not a target.
        return sum(1 for t in self.labels[1:] if t != IGNORE)


def _render_chat(tokenizer, messages: list[dict], **kw) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kw)


def render(example: Example, tokenizer, train_on: str = "completion"
           ) -> tuple[str, list[tuple[int, int]], bool]:
    """Return ``(text, target_char_spans, add_special_tokens)`` for one example."""
    if example.segments is not None:
        parts, spans, pos = [], [], 0
        for i, (text, is_target) in enumerate(example.segments):
            if is_target and i == len(example.segments) - 1 and tokenizer.eos_token:
                text = text + tokenizer.eos_token
            parts.append(text)
            if is_target or train_on == "all":
                spans.append((pos, pos + len(text)))
            pos += len(text)
        return "".join(parts), spans, True
    msgs = example.messages
    full = _render_chat(tokenizer, msgs)
    if train_on == "all":
        return full, [(0, len(full))], False
    spans = []
    for i, m in enumerate(msgs):
        # An opening assistant turn answers nothing, and its role header cannot be measured
        # (templates refuse an empty conversation), so it stays context, not a target.
        if m["role"] != "assistant" or i == 0:
            continue
        start_text = _render_chat(tokenizer, msgs[:i], add_generation_prompt=True)
        end_text = _render_chat(tokenizer, msgs[: i + 1])
        if not (full.startswith(start_text) and full.startswith(end_text)):
            raise DataError(example.source, "", None, "the chat template does not render turns as "
                            "prefixes of the whole conversation; use data.train_on=all")
        spans.append((len(start_text), len(end_text)))
    return full, spans, False


def _special_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The ids ``add_special_tokens=True`` puts before and after a text (e.g. ``[bos], []``);
    measured, because whether a tokenizer adds BOS (Llama) or not (GPT-2, Qwen2) varies."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    return [], []  # the specials change the text's own tokens: add none rather than guess


def encode(example: Example, tokenizer, max_length: int, train_on: str = "completion"
           ) -> tuple[Encoded, bool]:
    """Tokenize one example; returns ``(encoded, was_truncated)``.

    Uses the fast tokenizer's character offsets when available; otherwise tokenizes the
    text piece by piece at the span boundaries.
    """
    text, spans, special = render(example, tokenizer, train_on)
    if tokenizer.is_fast:
        enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        ids = enc["input_ids"]
        is_target = [any(s < e2 and e > s2 for s2, e2 in spans) and e > s
                     for s, e in enc["offset_mapping"]]
    else:
        prefix, suffix = _special_ids(tokenizer) if special else ([], [])
        ids, is_target = list(prefix), [False] * len(prefix)
        bounds = sorted({0, len(text), *(b for span in spans for b in span)})
        for a, b in zip(bounds, bounds[1:]):
            piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
            inside = any(s <= a and b <= e for s, e in spans)
            ids += piece
            is_target += [inside] * len(piece)
        ids, is_target = ids + suffix, is_target + [False] * len(suffix)
    truncated = len(ids) > max_length
    ids, is_target = ids[:max_length], is_target[:max_length]
    labels = [t if m else IGNORE for t, m in zip(ids, is_target)]
    return Encoded(ids, labels), truncated


def prompt_and_reference(example: Example, tokenizer) -> tuple[str, str, bool] | None:
    """The prompt up to the first target (ready for generation) and its reference reply.

    Returns:
        ``(prompt_text, reference_text, add_special_tokens)``, or None for a chat with no
        assistant turn that answers a user turn.
    """
    if example.segments is not None:
        prompt = "".join(t for t, target in example.segments if not target)
        reference = next((t for t, target in example.segments if target), "")
        return prompt, reference, True
    msgs = example.messages
    # The first assistant turn that answers a user turn (ShareGPT rows may open with one).
    first = next((i for i, m in enumerate(msgs)
                  if m["role"] == "assistant" and any(p["role"] == "user" for p in msgs[:i])),
                 None)
    if first is None:
        return None
    prompt = _render_chat(tokenizer, msgs[:first], add_generation_prompt=True)
    return prompt, msgs[first]["content"], False
