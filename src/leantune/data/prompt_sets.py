"""Prompt rows for RL with checkable rewards (``objective.kind: grpo``), in TRL's format:
``{"prompt": str | messages, ...columns}``, the other keys (``answer``, ...) handed to
the reward functions as columns.

Sources: any file :func:`~leantune.data.sources.read_rows` reads, or ``problems:KIND`` /
``problems:KIND:DIGITS`` (:mod:`leantune.data.problems`: ``add``, ``count``), whose
distinct problems are dealt out, so no held-out prompt is ever trained on.

A conversational prompt (a list of messages) is rendered with the chat template and a
generation prompt; a plain string is used as it is (as TRL does).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from leantune.data.encode import IGNORE, Encoded
from leantune.data.problems import KINDS, problem_rows
from leantune.data.rows import DataError, Row
from leantune.data.sources import read_rows

log = logging.getLogger(__name__)

PROBLEM_ROWS = 4096  # problems drawn (then deduplicated) for a problems: path
ROLES = ("system", "user", "assistant")


@dataclass
class Prompt:
    """One prompt row: ``ids`` its rendered tokens, ``columns`` its other keys."""

    prompt: str | list[dict]
    columns: dict
    ids: list[int]
    where: str = ""


@dataclass
class PromptSplits:
    train: list[Prompt]
    eval: list[Prompt]
    stats: dict = field(default_factory=dict)


def problem_source(path: str) -> list[Row]:
    """The distinct problems of ``problems:KIND[:DIGITS]``, in a fixed order."""
    parts = path.split(":")
    kind = parts[1] if len(parts) > 1 else ""
    if kind not in KINDS or len(parts) > 3 or (len(parts) == 3 and not parts[2].isdigit()):
        raise DataError(path, "", None, f"expected problems:KIND or problems:KIND:DIGITS with "
                        f"KIND one of {sorted(KINDS)}")
    digits = int(parts[2]) if len(parts) == 3 else 1
    seen, rows = set(), []
    for row in problem_rows(kind, PROBLEM_ROWS, seed=0, digits=digits):
        key = row["prompt"][0]["content"]
        if key not in seen:
            seen.add(key)
            rows.append(Row(path, f"problem {len(rows)}", row))
    return rows


def read_prompts(path: str) -> list[Row]:
    """Every row of ``path`` (a file, a dataset, or ``problems:...``)."""
    if path.startswith("problems:"):
        return problem_source(path)
    return list(read_rows(path))


def check_prompt(row: Row) -> str | list[dict]:
    """The row's prompt, or a :class:`DataError` naming its file, line and field."""
    record = row.record
    if not isinstance(record, dict) or "prompt" not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(row.source, row.where, "prompt", f"a grpo row needs a 'prompt' (text "
                        f"or a list of messages) and its answer columns; got {keys}")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in prompt):
        raise DataError(row.source, row.where, "prompt", "must be a string or a non-empty list "
                        f"of {{'role': one of {list(ROLES)}, 'content': str}} messages")
    return prompt


def render(prompt: str | list[dict], tokenizer) -> list[int]:
    """Token ids of ``prompt``: a chat with its generation prompt, or plain text."""
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def encode_prompts(rows: list[Row], tokenizer, max_prompt: int, stats: dict) -> list[Prompt]:
    out = []
    for row in rows:
        prompt = check_prompt(row)
        ids = render(prompt, tokenizer)
        if len(ids) > max_prompt:
            stats["dropped_prompt_too_long"] = stats.get("dropped_prompt_too_long", 0) + 1
            continue
        columns = {k: v for k, v in row.record.items() if k != "prompt"}
        out.append(Prompt(prompt, columns, ids, f"{row.source} {row.where}"))
    return out


def build_prompt_splits(cfg, tokenizer, seed: int, max_completion: int) -> PromptSplits:
    """Read, subsample, split (seeded) and tokenize the prompt rows of ``cfg.path``
    (``cfg``: the data section). A prompt longer than ``max_length - max_completion``
    tokens is dropped (counted): its completions would not fit.

    Raises:
        DataError: a malformed row (file, line, field), or no prompt left to train on.
    """
    rows = read_prompts(cfg.path)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if cfg.max_examples is not None:
        order = order[:cfg.max_examples]
    max_prompt = cfg.max_length - max_completion
    stats: dict = {"rows": len(rows)}
    if cfg.eval_path is not None:
        held_rows = read_prompts(cfg.eval_path)[:cfg.eval_examples]
        train_rows = [rows[i] for i in order]
    else:
        n_eval = round(len(order) * cfg.eval_fraction)
        if cfg.eval_examples is not None:
            n_eval = min(n_eval, cfg.eval_examples)
        held_rows = [rows[i] for i in order[:n_eval]]
        train_rows = [rows[i] for i in order[n_eval:]]
    train = encode_prompts(train_rows, tokenizer, max_prompt, stats)
    held = encode_prompts(held_rows, tokenizer, max_prompt, stats)
    if not train:
        raise DataError(cfg.path, "file", None, f"no prompt left to train on: {len(rows)} read, "
                        f"{stats.get('dropped_prompt_too_long', 0)} longer than data.max_length"
                        f" - objective.max_completion_length = {max_prompt} tokens")
    stats |= {"train": len(train), "eval": len(held)}
    log.info("data: %d prompt rows, %d train / %d held-out, %d dropped (prompt too long)",
             len(rows), len(train), len(held), stats.get("dropped_prompt_too_long", 0))
    return PromptSplits(train, held, stats)


def probe_examples(prompts: list[Prompt], tokenizer, max_length: int) -> list[Encoded]:
    """Prompt + a stand-in completion (the ``answer`` column, else the EOS token) per
    prompt: examples of the shape the training forward will see, for the packing probe
    and the start-up checks before any rollout exists."""
    out = []
    for p in prompts:
        tail = tokenizer(str(p.columns.get("answer", "")), add_special_tokens=False)["input_ids"]
        tail = (tail + [tokenizer.eos_token_id])[: max(1, max_length - len(p.ids))]
        ids = (p.ids + tail)[:max_length]
        out.append(Encoded(ids, [IGNORE] * len(p.ids) + ids[len(p.ids):]))
    return out
