"""Scoring a list of items on several processes: each process takes every
``world``-th item, and the scores come back to every process in the items' order."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from accelerate import Accelerator
from accelerate.utils import gather_object

T = TypeVar("T")


def my_share(n: int, acc: Accelerator, key: Callable[[int], float]) -> list[int]:
    """The indices of ``n`` items this process scores (``rank, rank + world, ...``),
    sorted by ``key`` (e.g. longest first, so batches waste little padding)."""
    return sorted(range(n)[acc.process_index::acc.num_processes], key=key)


def gather_scores(scores: dict[int, T], n: int, acc: Accelerator) -> list[T]:
    """Every process's ``{index: score}`` merged, as a list of ``n`` scores in item order."""
    if acc.num_processes > 1:
        merged: dict[int, T] = {}
        for part in gather_object([scores]):
            merged |= part
        scores = merged
    return [scores[i] for i in range(n)]
