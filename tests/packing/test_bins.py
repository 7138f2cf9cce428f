"""Packing: every example lands in exactly one bin within capacity, BFD/FFD match a
brute-force quadratic reference bin for bin, and BFD packs a realistic length
distribution almost full in well under a second per 100k examples."""

from __future__ import annotations

import gc
import random
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leantune.packing.bins import pack, packing_efficiency


def reference(lengths: list[int], capacity: int, best: bool) -> list[list[int]]:
    """Quadratic BFD (``best``) or FFD, straight from the definition.

    Longest first, ties in index order. FFD takes the oldest bin that fits; BFD the bin
    with the least space left, and among equals the one that reached that space first.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    space: list[int] = []
    since: list[int] = []  # step at which each bin's space last changed
    for step, i in enumerate(order):
        fits = [b for b in range(len(bins)) if space[b] >= lengths[i]]
        if not fits:
            bins.append([])
            space.append(capacity)
            since.append(step)
            fits = [len(bins) - 1]
        b = min(fits, key=lambda b: (space[b], since[b])) if best else fits[0]
        bins[b].append(i)
        space[b] -= lengths[i]
        since[b] = step
    return bins


@st.composite
def problems(draw, max_n: int = 300):
    capacity = draw(st.integers(1, 64))
    lengths = draw(st.lists(st.integers(1, capacity), max_size=max_n))
    return lengths, capacity


@settings(max_examples=200, deadline=None)
@given(problems(), st.sampled_from(["bfd", "ffd", "greedy"]))
def test_every_index_once_and_bins_within_capacity(problem, strategy):
    lengths, capacity = problem
    bins = pack(lengths, capacity, strategy)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert all(b for b in bins) and all(load <= capacity for load in loads)
    # A bin is only opened when the example fits nowhere else (greedy: not in the current
    # bin), so no two bins (greedy: no two neighbours) would fit into one.
    pairs = zip(loads, loads[1:]) if strategy == "greedy" else zip(sorted(loads)[:1], sorted(loads)[1:2])
    assert all(a + b > capacity for a, b in pairs)


@settings(max_examples=300, deadline=None)
@given(problems(max_n=60))
def test_bfd_and_ffd_match_brute_force(problem):
    lengths, capacity = problem
    assert pack(lengths, capacity, "bfd") == reference(lengths, capacity, best=True)
    assert pack(lengths, capacity, "ffd") == reference(lengths, capacity, best=False)


def test_match_brute_force_on_many_ties():
    rng = random.Random(0)
    for _ in range(200):
        capacity = rng.randint(2, 16)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 120))]
        assert pack(lengths, capacity, "bfd") == reference(lengths, capacity, best=True)
        assert pack(lengths, capacity, "ffd") == reference(lengths, capacity, best=False)


@pytest.mark.parametrize("strategy", ["bfd", "ffd"])
def test_known_optimum(strategy):
    # 6+4 and 5+3+2: two full bins, the optimum.
    assert pack([6, 5, 4, 3, 2], 10, strategy) == [[0, 2], [1, 3, 4]]
    # Three of a kind that pair up exactly with their complements.
    bins = pack([2, 8, 3, 7, 5, 5], 10, strategy)
    assert bins == [[1, 0], [3, 2], [4, 5]]
    assert packing_efficiency([2, 8, 3, 7, 5, 5], bins, 10) == 1.0


def test_bfd_picks_the_tightest_bin_ffd_the_first():
    # 5 -> bin 0 (2 left); 3 -> bin 1 (4 left); 3 -> bin 1 (1 left). The last 1 fits both:
    # FFD takes bin 0, the oldest; BFD takes bin 1, which has less space left.
    lengths, capacity = [5, 3, 3, 1], 7
    assert pack(lengths, capacity, "ffd") == [[0, 3], [1, 2]]
    assert pack(lengths, capacity, "bfd") == [[0], [1, 2, 3]]


def test_decreasing_order_is_stable():
    # Equal lengths are placed in index order.
    assert pack([2, 3, 2, 3, 2], 6, "bfd") == [[1, 3], [0, 2, 4]]
    assert pack([4, 4, 4], 4, "ffd") == [[0], [1], [2]]


def test_greedy_keeps_order():
    lengths = [3, 3, 5, 2, 9, 1, 10]
    bins = pack(lengths, 10, "greedy")
    assert bins == [[0, 1], [2, 3], [4, 5], [6]]
    assert [i for b in bins for i in b] == list(range(len(lengths)))


def test_empty_and_single():
    assert pack([], 8) == [] and pack([], 8, "ffd") == [] and pack([], 8, "greedy") == []
    assert pack([1], 1) == [[0]] and pack([1], 1, "ffd") == [[0]]
    assert pack(np.array([4, 4, 1]), 4) == [[0], [1], [2]]


@pytest.mark.parametrize("strategy", ["bfd", "ffd", "greedy"])
def test_errors_name_the_offending_index(strategy):
    with pytest.raises(ValueError, match=r"lengths\[2\] = 0"):
        pack([3, 4, 0, 9], 8, strategy)
    with pytest.raises(ValueError, match=r"lengths\[1\] = 9 .*capacity=8"):
        pack([3, 9, 0], 8, strategy)
    with pytest.raises(ValueError, match="lengths\\[0\\] = -1"):
        pack([-1], 8, strategy)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        pack([1], 0, strategy)


def test_unknown_strategy():
    with pytest.raises(ValueError, match="unknown packing strategy 'nfd'"):
        pack([1], 4, "nfd")  # type: ignore[arg-type]


def test_garbage_collector_state_is_restored():
    assert gc.isenabled()
    pack([1, 2, 3], 4)
    assert gc.isenabled()
    gc.disable()
    try:
        pack([1, 2, 3], 4, "greedy")
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_packing_efficiency():
    assert packing_efficiency([6, 5, 4, 3, 2], [[0, 2], [1, 3, 4]], 10) == 1.0
    assert packing_efficiency([3, 3], [[0], [1]], 4) == 0.75
    assert packing_efficiency([], [], 4) == 1.0


def test_same_bins_as_trl_pack_dataset():
    """TRL's BFD uses the same order and tie rule, so it must give the same bins."""
    datasets = pytest.importorskip("datasets")
    trl_data_utils = pytest.importorskip("trl.data_utils")
    rng = random.Random(3)
    lengths = [rng.randint(1, 32) for _ in range(500)]
    # Token i marks example i, so a packed row can be read back as example indices.
    ds = datasets.Dataset.from_dict({"input_ids": [[i] * n for i, n in enumerate(lengths)]})
    packed = trl_data_utils.pack_dataset(ds, seq_length=32, strategy="bfd")
    trl_bins = []
    for row, seq_lengths in zip(packed["input_ids"], packed["seq_lengths"]):
        starts = np.cumsum([0] + list(seq_lengths[:-1]))
        trl_bins.append([row[s] for s in starts])
    assert pack(lengths, 32, "bfd") == trl_bins


@pytest.mark.slow
def test_bfd_packs_200k_lognormal_lengths_fast_and_full():
    rng = np.random.default_rng(0)
    lengths = np.clip(np.rint(rng.lognormal(4.64, 0.6, 200_000)), 1, 256).astype(np.int64)
    assert 110 < lengths.mean() < 125
    start = time.perf_counter()
    bins = pack(lengths, 256, "bfd")
    elapsed = time.perf_counter() - start
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert packing_efficiency(lengths, bins, 256) >= 0.99
    assert elapsed < 10
