"""Shared pieces of the benchmarks: the real length mix they run on, and a per-phase
peak-memory meter (the process-wide peak RSS only ever grows, so it cannot tell two
phases of one process apart)."""

from __future__ import annotations

import os
import random
import threading
import time

from leantune.data.encode import Encoded, encode
from leantune.data.formats import Example, SHAREGPT_ROLES
from leantune.embedded import sharegpt_rows

PAGE = os.sysconf("SC_PAGE_SIZE")


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


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self.base = interval, 0, 0
        self._stop = threading.Event()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = _rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def delta(self) -> int:
        return self.peak - self.base
