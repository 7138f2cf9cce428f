"""Shared pieces of the benchmarks: the real length mix they run on, and the machine they
ran on."""

from __future__ import annotations

import os
import platform
import random
from pathlib import Path

from leantune.data.encode import Encoded, encode
from leantune.data.formats import Example, SHAREGPT_ROLES
from leantune.embedded import sharegpt_rows


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


# The CPU features that decide which kernels and precisions are fast here.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni")


def cpu_info() -> dict:
    """The CPU model, core count and its :data:`CPU_FLAGS` (from ``/proc/cpuinfo``), for
    every benchmark's JSON: the machines here vary, and so do their timings."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:  # not Linux: the model name from platform, no flags
        pass
    return {"model": model, "cores": os.cpu_count(),
            "flags": [f for f in CPU_FLAGS if f in flags]}
