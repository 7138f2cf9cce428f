"""Offline packing: group examples into bins of at most ``capacity`` tokens.

A pure function, lengths in and bins of example indices out; the collator
turns each bin into one row whose ``position_ids`` restart at every example. No example is
split or truncated here: callers truncate to ``capacity`` first.

Strategies, for ``n`` examples and ``C = capacity``:

- ``"bfd"`` best-fit-decreasing. Longest first (a stable sort, so ties keep index order);
  each example goes into the open bin with the least space left that still holds it, else
  into a new bin. Among bins with equal space left, the one that reached that space first
  wins (the same rule as TRL's ``pack_dataset``, so both give the same bins). Open bins wait
  in one FIFO queue per remaining space ``r``; a max segment tree over ``r`` whose leaf
  ``r`` holds ``r`` while queue ``r`` is non-empty (and leaf ``C`` always holds ``C``: a
  fresh bin) finds the smallest ``r >= length`` in one root-to-leaf descent.
  O(n log n) for the sort plus O(n log C) for the placement.
- ``"ffd"`` first-fit-decreasing. Same order; the oldest open bin that holds the example.
  A max segment tree over bins (leaf ``b`` holds the space left in bin ``b``; bins not yet
  opened hold ``C``) finds the leftmost bin with enough space in one descent. O(n log n).
- ``"greedy"``. Original order; fill the current bin, start a new one when the next example
  does not fit. O(n). Keeps neighbouring examples together, wastes more space.

Both decreasing strategies use at most 11/9 of the optimal number of bins plus a
constant (Johnson 1973). On 1M lognormal lengths (mean 118, capacity 256) they open the
same number of bins, 99.5 % full (``benchmarks/pack_lengths.py``); ``"bfd"`` is the
default, as in TRL, whose ``pack_dataset(strategy="bfd")`` it reproduces bin for bin when
TRL sees the whole dataset in one batch.
"""

from __future__ import annotations

import gc
from collections import defaultdict, deque
from collections.abc import Sequence
from typing import Literal

import numpy as np

Strategy = Literal["bfd", "ffd", "greedy"]


def pack(lengths: Sequence[int], capacity: int, strategy: Strategy = "bfd") -> list[list[int]]:
    """Group example indices into bins whose summed lengths are <= capacity.

    Pure apart from one thing: the cyclic garbage collector is paused while the bins are
    built, and put back as it was.

    Args:
        lengths: Token count of each example, ``1 <= lengths[i] <= capacity``.
        capacity: Most tokens in one bin (the row length), ``>= 1``.
        strategy: ``"bfd"`` (default), ``"ffd"`` or ``"greedy"``; see the module docstring.

    Returns:
        Bins of indices into ``lengths``. Every index appears exactly once; within a bin,
        indices are in the order they were placed (longest first for ``"bfd"``/``"ffd"``,
        original order for ``"greedy"``). Bins are in the order they were opened.

    Raises:
        ValueError: ``capacity < 1``, an unknown strategy, or a length outside
            ``[1, capacity]`` (the message names the first such index and its length).
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    if strategy not in ("bfd", "ffd", "greedy"):
        raise ValueError(f"unknown packing strategy {strategy!r}; use 'bfd', 'ffd' or 'greedy'")
    sizes = np.asarray(lengths, dtype=np.int64)
    bad = (sizes < 1) | (sizes > capacity)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"lengths[{i}] = {int(sizes[i])} is outside [1, capacity={capacity}]; "
            "drop empty examples and truncate long ones before packing"
        )
    # The bins are up to n new lists and hold no cycles; in a process with many live objects
    # (torch, transformers, datasets) the collector's passes over them took longer than the
    # packing itself (1M lengths: greedy 0.15 s -> 1 s, bfd 1.4 s -> 2.5 s).
    collecting = gc.isenabled()
    gc.disable()
    try:
        if strategy == "greedy":
            return _greedy(sizes.tolist(), capacity)
        # Stable sort on the negated lengths: longest first, ties in index order.
        order = np.argsort(-sizes, kind="stable")
        place = _best_fit if strategy == "bfd" else _first_fit
        return place(order.tolist(), sizes[order].tolist(), capacity)
    finally:
        if collecting:
            gc.enable()


def packing_efficiency(lengths: Sequence[int], bins: Sequence[Sequence[int]], capacity: int) -> float:
    """Fraction of the ``len(bins) * capacity`` token slots that hold real tokens.

    Returns ``sum(lengths) / (len(bins) * capacity)``, or 1.0 when there are no bins.
    """
    if not bins:
        return 1.0
    return float(np.sum(np.asarray(lengths, dtype=np.int64))) / (len(bins) * capacity)


def _greedy(lengths: list[int], capacity: int) -> list[list[int]]:
    bins: list[list[int]] = []
    space = 0
    for i, n in enumerate(lengths):
        if n > space:
            bins.append([])
            space = capacity
        bins[-1].append(i)
        space -= n
    return bins


# A max segment tree is a flat list: node k has children 2k and 2k+1, the leaves sit at
# [size, 2 * size). Both loops below inline the descent, which is their hot path.


def _max_tree(leaves: int, fill: int) -> tuple[list[int], int]:
    size = 1 << max(leaves - 1, 0).bit_length()
    return [fill] * (2 * size), size


def _set_leaf(tree: list[int], size: int, leaf: int, value: int) -> None:
    k = size + leaf
    tree[k] = value
    k >>= 1
    while k:
        a, b = tree[2 * k], tree[2 * k + 1]
        top = a if a >= b else b
        if tree[k] == top:  # the ancestors were right before, so they still are
            return
        tree[k] = top
        k >>= 1


def _best_fit(order: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    tree, size = _max_tree(capacity + 1, 0)
    _set_leaf(tree, size, capacity, capacity)  # a fresh bin always fits
    waiting: defaultdict[int, deque[int]] = defaultdict(deque)  # space left -> open bins, FIFO
    bins: list[list[int]] = []
    for i, n in zip(order, lengths):
        k = 1
        while k < size:  # descend to the leftmost leaf r with tree value >= n: smallest r >= n
            k <<= 1
            if tree[k] < n:
                k += 1
        space = k - size
        if space == capacity:
            b = len(bins)
            bins.append([i])
        else:
            queue = waiting[space]
            b = queue.popleft()
            bins[b].append(i)
            if not queue:
                _set_leaf(tree, size, space, 0)
        space -= n
        if space:
            queue = waiting[space]
            if not queue:
                _set_leaf(tree, size, space, space)
            queue.append(b)
    return bins


def _first_fit(order: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    # Leaf b is bin b; every bin not yet opened holds `capacity`, so the descent opens the
    # next new bin exactly when no open bin fits. There are at most n bins.
    tree, size = _max_tree(len(order), capacity)
    bins: list[list[int]] = []
    for i, n in zip(order, lengths):
        k = 1
        while k < size:
            k <<= 1
            if tree[k] < n:
                k += 1
        b = k - size
        if b == len(bins):
            bins.append([i])
        else:
            bins[b].append(i)
        _set_leaf(tree, size, b, tree[k] - n)
    return bins
