"""Sample selection and micro-batch layout: deterministic, complete, within budget, and
online packing never spends more positions than padding."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leantune.data.encode import IGNORE, Encoded
from leantune.packing.batching import Batcher, pack_batch, select_batches
from leantune.packing.collate import collate_packed

LENGTHS = [5, 40, 12, 33, 7, 21, 9, 64, 3, 18, 27, 11]


def examples(lengths: list[int]) -> list[Encoded]:
    return [Encoded(list(range(10, 10 + n)), [IGNORE] + list(range(11, 10 + n))) for n in lengths]


def flat(batches: list[list[int]]) -> list[int]:
    return sorted(i for b in batches for i in b)


def test_every_selection_is_a_deterministic_partition():
    for selection in ("random", "length_grouped", "token_budget"):
        batches = select_batches(LENGTHS, 4, 0, 0, selection, token_budget=64)
        assert flat(batches) == list(range(len(LENGTHS))), selection
        assert batches == select_batches(LENGTHS, 4, 0, 0, selection, token_budget=64)
        assert batches != select_batches(LENGTHS, 4, 0, 1, selection, token_budget=64)


def test_length_grouped_batches_hold_similar_lengths():
    lengths = [1 + (i * 37) % 200 for i in range(400)]
    spread = {sel: sum(max(lengths[i] for i in b) - min(lengths[i] for i in b)
                       for b in select_batches(lengths, 8, 0, 0, sel))
              for sel in ("random", "length_grouped")}
    assert spread["length_grouped"] < spread["random"] / 5


def test_token_budget_fills_to_the_budget():
    padded = select_batches(LENGTHS, 4, 0, 0, "token_budget", token_budget=64, padded=True)
    packed = select_batches(LENGTHS, 4, 0, 0, "token_budget", token_budget=64, padded=False)
    for b in padded:
        assert max(LENGTHS[i] for i in b) * len(b) <= 64 or len(b) == 1
    for b in packed:
        assert sum(LENGTHS[i] for i in b) <= 64 or len(b) == 1
    assert len(packed) <= len(padded)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=24), st.integers(64, 256))
def test_pack_batch_never_spends_more_positions_than_padding(lengths, max_length):
    bins = pack_batch(lengths, max_length)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    widths = [sum(lengths[i] for i in b) for b in bins]
    assert max(widths) <= max_length
    assert len(bins) * max(widths) <= len(lengths) * max(lengths)


def test_collate_packed_restarts_positions_and_masks_first_labels():
    exs = examples([3, 2, 4])
    batch = collate_packed(exs, [[0, 1], [2]], pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["input_ids"].tolist() == [[10, 11, 12, 10, 11], [10, 11, 12, 13, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 11, 12, IGNORE, 11],
                                        [IGNORE, 11, 12, 13, IGNORE]]
    assert batch["token_mask"].tolist() == [[True] * 5, [True] * 4 + [False]]
    assert int(batch["num_examples"]) == 3 and "attention_mask" not in batch
    naive = collate_packed(exs, [[0, 1], [2]], pad_id=0, restart_positions=False)
    assert naive["position_ids"][0].tolist() == [0, 1, 2, 3, 4]


def test_offline_units_cover_every_example_once_and_collate_to_rows():
    exs = examples(LENGTHS)
    batcher = Batcher.build(exs, "offline", 64, 0, "bfd")
    assert flat(batcher.units) == list(range(len(LENGTHS)))
    assert all(n <= 64 for n in batcher.unit_lengths)
    assert len(batcher.units) < len(LENGTHS)
    batch = batcher.collate([0, 1])
    assert batch["input_ids"].shape[0] == 2
    assert int(batch["num_examples"]) == len(batcher.units[0]) + len(batcher.units[1])
    assert int(batch["token_mask"].sum()) == sum(batcher.unit_lengths[:2])


def test_online_and_padded_batches_hold_the_same_targets():
    exs = examples(LENGTHS[:6])
    batcher = Batcher.build(exs, "online", 128, 0)
    padded, packed = batcher.collate_examples(exs, "none"), batcher.collate(list(range(6)))
    count = lambda b: int((b["labels"][:, 1:] != IGNORE).sum())  # noqa: E731
    assert count(packed) == count(padded) == sum(e.num_targets for e in exs)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    assert torch.equal(packed["token_mask"].sum(), padded["token_mask"].sum())
