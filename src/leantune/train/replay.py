"""Feeding corpus windows to the loop, with replay of an earlier corpus.

Every optimizer step takes ``S = batch_size * processes * grad_accum`` windows. With
replay (Ibrahim et al. 2024, arXiv 2403.08763) a fraction ``x(step)`` of them comes from
the earlier corpus D0 and the rest from the new one, D1: the step count and the tokens per
step stay what they were without replay (compute-equivalent), and D1's share shrinks by
as much. Windows being whole, a step takes ``n = round(carry + S * x)`` replay windows and
carries the rounding over (``carry <- carry + S * x - n``), so over any run the replayed
fraction is the mean of ``x`` to within half a window.

Each corpus has its own stream: its windows in a random order per epoch, seeded by
``(train.seed, corpus, epoch)``, and a position ``[epoch, index]``. Positions and the
carry live in the run's state, so a resumed run takes exactly the windows an
uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from leantune.config import ReplayConfig
from leantune.data.encode import Encoded
from leantune.data.windows import Windows
from leantune.packing.collate import collate_padded, collate_rows


def replay_ratio(step: int, total_steps: int, cfg: ReplayConfig) -> float:
    """The replayed fraction of step ``step`` (0-based) of ``total_steps``: ``ratio``, or
    from ``ratio`` at the first step to ``final_ratio`` at the last, linearly or along a half
    cosine."""
    start = cfg.ratio
    end = start if cfg.final_ratio is None else cfg.final_ratio
    q = step / max(1, total_steps - 1)
    if cfg.schedule == "constant":
        return start
    if cfg.schedule == "linear":
        return start + (end - start) * q
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * q))


def replay_windows(carry: float, per_step: int, ratio: float) -> tuple[int, float]:
    """``(n, carry')``: replay windows this step and the rounding carried to the next."""
    due = carry + per_step * ratio
    n = min(per_step, max(0, math.floor(due + 0.5)))
    return n, due - n


@dataclass
class WindowOrder:
    """A corpus' windows in a seeded random order, epoch after epoch."""

    count: int
    seed: int
    salt: int
    _cache: tuple[int, np.ndarray] | None = field(default=None, repr=False)

    def epoch(self, e: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != e:
            rng = np.random.default_rng([self.seed, self.salt, e])
            self._cache = (e, rng.permutation(self.count))
        return self._cache[1]

    def take(self, k: int, pos: list[int]) -> list[int]:
        """The next ``k`` windows from ``pos = [epoch, index]``, which moves past them."""
        out = []
        while len(out) < k:
            order = self.epoch(pos[0])
            got = order[pos[1]:pos[1] + k - len(out)]
            out += got.tolist()
            pos[1] += len(got)
            if pos[1] == self.count:
                pos[0], pos[1] = pos[0] + 1, 0
        return out


@dataclass
class CorpusFeed:
    """Micro-batches of windows from ``data.path`` and, with replay, ``data.replay.path``.

    Attributes:
        windows: training windows by stream name ("data", and "replay" when replaying).
        mode: layout of a micro-batch: ``online`` (one row per window, positions restarting
            at every document), ``naive`` (one row per window, positions running on:
            attention crosses documents), ``none`` (one padded row per document piece).
    """

    windows: dict[str, Windows]
    replay: ReplayConfig
    mode: str
    pad_id: int
    _orders: dict[str, WindowOrder] = field(default_factory=dict, repr=False)

    def steps(self, epochs: float, per_step: int) -> int:
        """Optimizer steps for ``epochs`` passes over ``data.path``'s windows (replay does
        not add steps: it takes a share of them)."""
        return max(1, math.ceil(epochs * len(self.windows["data"]) / per_step))

    def packed_rows(self, units: list[tuple[str, int]]) -> list[list[Encoded]]:
        """The document pieces of each window ``units`` (``(stream, window index)`` pairs)."""
        return [self.windows[s].examples(i) for s, i in units]

    def collate(self, units: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        """The micro-batch of windows ``units`` (``(stream, window index)`` pairs)."""
        per_window = self.packed_rows(units)
        if self.mode == "none":
            return collate_padded([e for w in per_window for e in w], self.pad_id)
        return collate_rows(per_window, self.pad_id, restart_positions=self.mode != "naive")

    def step_units(self, state, per_step: int, total_steps: int, seed: int
                   ) -> list[tuple[str, int]]:
        """The windows of the coming optimizer step (all processes), moving ``state``'s
        stream positions, replay carry and window counts past them."""
        n_replay = 0
        if "replay" in self.windows:
            ratio = replay_ratio(state.step, total_steps, self.replay)
            n_replay, state.replay_carry = replay_windows(state.replay_carry, per_step, ratio)
        units = []
        for salt, (name, k) in enumerate((("data", per_step - n_replay), ("replay", n_replay))):
            if k:
                order = self._orders.setdefault(
                    name, WindowOrder(len(self.windows[name]), seed, salt))
                pos = state.streams.setdefault(name, [0, 0])
                units += [(name, i) for i in order.take(k, pos)]
                state.windows[name] = state.windows.get(name, 0) + k
        return units

    def micro_batches(self, state, batch_size: int, grad_accum: int, world: int, rank: int,
                      total_steps: int, seed: int, device) -> Iterator[dict[str, torch.Tensor]]:
        """This process's micro-batches, forever: per step, ``grad_accum`` of them, each
        ``batch_size`` windows (process ``r`` takes every ``world``-th window from ``r``)."""
        per_micro = batch_size * world
        while True:
            units = self.step_units(state, per_micro * grad_accum, total_steps, seed)
            for j in range(grad_accum):
                mine = units[j * per_micro:(j + 1) * per_micro][rank::world]
                yield {k: v.to(device) for k, v in self.collate(mine).items()}
