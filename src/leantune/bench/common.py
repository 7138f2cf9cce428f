"""Shared pieces of the benchmarks: the real length mix they run on, and the machine they
ran on."""

from __future__ import annotations

import random

from leantune.data.embedded import sharegpt_rows
from leantune.data.encode import Encoded, encode
from leantune.data.formats import SHAREGPT_ROLES, Example
from leantune.model.precision import CPU_FLAGS, cpu_info  # noqa: F401 (the benches' import)


def sharegpt_exchanges(tokenizer, n: int, max_length: int, seed: int = 0,
                       train_on: str = "all") -> list[Encoded]:
    """``n`` single user->assistant exchanges from the embedded ShareGPT, encoded.

    Single exchanges rather than whole conversations give the long-tailed length mix the
    packing paper targets (most short, a few up to ``max_length``).
    """
    pairs = []
    for row in sharegpt_rows():
        turns = row.record.get("conversations") or []
        for a, b in zip(turns, turns[1:]):
            if (SHAREGPT_ROLES.get(a.get("from")) == "user"
                    and SHAREGPT_ROLES.get(b.get("from")) == "assistant"
                    and isinstance(a.get("value"), str) and isinstance(b.get("value"), str)
                    and a["value"].strip() and b["value"].strip()):
                pairs.append((a["value"], b["value"]))
    random.Random(seed).shuffle(pairs)
    out = []
    for user, reply in pairs:
        ex = Example("sharegpt", messages=[{"role": "user", "content": user},
                                           {"role": "assistant", "content": reply}])
        enc, _ = encode(ex, tokenizer, max_length, train_on)
        if enc.num_targets:
            out.append(enc)
        if len(out) == n:
            break
    return out


def task_examples(tokenizer, spec: str, split: str, n: int, max_length: int,
                  seed: int = 0) -> list[Encoded]:
    """``n`` prompt/completion rows of ``task:SPEC`` (its ``split``), shuffled by ``seed``,
    encoded with the loss on the answer (the gold continuation and EOS)."""
    from leantune.data.formats import to_example
    from leantune.data.sources import read_rows

    rows = list(read_rows(f"task:{spec}:{split}"))
    random.Random(seed).shuffle(rows)
    return [encode(to_example(row, "prompt_completion", False), tokenizer, max_length,
                   "completion")[0] for row in rows[:n]]



