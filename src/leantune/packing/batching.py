"""Which examples share a micro-batch (sample selection) and how a micro-batch is laid
out (``data.packing``). Everything is a pure function of ``(seed, epoch)`` so a resumed
run sees exactly the batches an uninterrupted one would.

Packing modes:

- ``none``: one example per row, padded to the longest of the batch.
- ``online``: the examples of each micro-batch are packed into rows of at most
  ``max_length`` (:func:`pack_batch`): the same examples and optimizer steps as ``none``,
  fewer pad tokens.
- ``offline``: the whole training set is packed ahead of time into rows of at most
  ``max_length`` (``data.packing_strategy``); batches are made of rows, so an epoch has
  fewer optimizer steps (this changes the optimization, as the paper notes).
- ``naive``: like ``online`` but positions run on across examples, so attention crosses
  their boundaries. Kept only so benchmarks can show why it is wrong.

Selection (``data.batching``): ``random`` (a seeded shuffle cut into batches),
``length_grouped`` (shuffle, sort within windows of 50 batches, shuffle the batches),
``token_budget`` (fill each batch up to ``data.token_budget`` tokens: the longest
example times the count when padded, the sum when packed).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from leantune.data.encode import Encoded
from leantune.packing.bins import pack
from leantune.packing.collate import collate_packed, collate_padded, collate_rows

GROUP_WINDOW = 50  # batches per length-sorted window in length_grouped selection


def _rng(seed: int, epoch: int) -> random.Random:
    return random.Random(seed * 1_000_003 + epoch)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Random selection: a ``(seed, epoch)`` shuffle of ``range(n)`` cut into batches (the
    last may be smaller)."""
    order = list(range(n))
    _rng(seed, epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def select_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                   selection: str = "random", token_budget: int | None = None,
                   padded: bool = True) -> list[list[int]]:
    """Indices (into ``lengths``) of every micro-batch of one epoch."""
    if selection == "random":
        return epoch_batches(len(lengths), batch_size, seed, epoch)
    rng = _rng(seed, epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if selection == "length_grouped":
        window = batch_size * GROUP_WINDOW
        batches = []
        for w in range(0, len(order), window):
            chunk = sorted(order[w : w + window], key=lambda i: -lengths[i])
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        return batches
    if selection == "token_budget":
        if token_budget is None:
            raise ValueError("token_budget selection needs data.token_budget")
        batches, current, longest, total = [], [], 0, 0
        for i in order:
            n = lengths[i]
            cost = max(longest, n) * (len(current) + 1) if padded else total + n
            if current and cost > token_budget:
                batches.append(current)
                current, longest, total = [], 0, 0
            current.append(i)
            longest, total = max(longest, n), total + n
        return batches + ([current] if current else [])
    raise ValueError(f"unknown batch selection {selection!r}")


def pack_batch(lengths: list[int], max_length: int) -> list[list[int]]:
    """Pack one micro-batch into rows of at most ``max_length`` with the fewest positions.

    Rows are padded to the longest row, so the fewest bins is not enough: bins of
    uneven fill waste the difference. Tries best-fit-decreasing at every row width
    ``max(longest, ceil(total / k))`` for ``k`` rows and keeps the layout with the fewest
    ``rows * width`` (then the narrowest, as attention grows with width^2). Width
    ``longest`` alone gives at most padding's ``n * longest``, so this never loses to it.
    """
    total, longest = sum(lengths), max(lengths)
    best: tuple[tuple[int, int], list[list[int]]] | None = None
    for k in range(max(1, math.ceil(total / max_length)), len(lengths) + 1):
        width = max(longest, math.ceil(total / k))
        if width > max_length:
            continue
        bins = pack(lengths, width, "bfd")
        used = max(sum(lengths[i] for i in b) for b in bins)
        cost = (len(bins) * used, used)
        if best is None or cost < best[0]:
            best = (cost, bins)
        if cost[0] == total:  # no padding left to remove
            break
    return best[1]


@dataclass
class Batcher:
    """Turns selected units into model-ready micro-batches for one packing mode.

    A *unit* is what selection picks: one example, or (offline) one pre-packed row.
    """

    examples: list[Encoded]
    mode: str
    max_length: int
    pad_id: int
    units: list[list[int]]

    @classmethod
    def build(cls, examples: list[Encoded], mode: str, max_length: int, pad_id: int,
              strategy: str = "bfd") -> Batcher:
        if mode == "offline":
            units = pack([len(e.input_ids) for e in examples], max_length, strategy)
        else:
            units = [[i] for i in range(len(examples))]
        return cls(examples, mode, max_length, pad_id, units)

    @property
    def unit_lengths(self) -> list[int]:
        return [sum(len(self.examples[i].input_ids) for i in u) for u in self.units]

    def collate(self, unit_ids: list[int]) -> dict[str, torch.Tensor]:
        """The micro-batch made of ``units[unit_ids]``."""
        if self.mode == "offline":
            return collate_rows(self.packed_rows(unit_ids), self.pad_id)
        return self.collate_examples([self.examples[self.units[u][0]] for u in unit_ids],
                                     self.mode)

    def packed_rows(self, unit_ids: list[int]) -> list[list[Encoded]]:
        """The examples of each row the micro-batch ``units[unit_ids]`` has when packed
        (``offline``: the units' own bins; otherwise :func:`pack_batch`'s)."""
        if self.mode == "offline":
            return [[self.examples[i] for i in self.units[u]] for u in unit_ids]
        examples = [self.examples[self.units[u][0]] for u in unit_ids]
        bins = pack_batch([len(e.input_ids) for e in examples], self.max_length)
        return [[examples[i] for i in b] for b in bins]

    def collate_examples(self, examples: list[Encoded], mode: str) -> dict[str, torch.Tensor]:
        """Lay out ``examples`` as one micro-batch: padded, or packed per ``mode``."""
        if mode == "none":
            return collate_padded(examples, self.pad_id)
        bins = pack_batch([len(e.input_ids) for e in examples], self.max_length)
        return collate_packed(examples, bins, self.pad_id, restart_positions=mode != "naive")
