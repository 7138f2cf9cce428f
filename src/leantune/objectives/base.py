"""A training objective: what it computes from a collated batch, and what its loss sum is
normalized by.

The loop is objective-agnostic. Over one optimizer step with micro-batches ``m`` on every
process, it asks the objective for each micro-batch's loss **sum** and **count** (the
units the loss is an average over: target tokens for next-token losses, pairs for a
preference loss, sequences for a sequence-level one), and backpropagates

    loss = sum_m loss_sum(m) / sum_m count(m)      (all micro-batches, all processes)

so gradient accumulation and data parallelism give exactly the gradient of one big
batch, never a mean of per-batch means. Held-out evaluation and Fast Forward's FF set
read the same two numbers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Tally:
    """Running sums of an objective's figures (``rewards/margins``, ...), each with its own
    count, so :meth:`means` gives each figure's mean over what it was measured on."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, values: torch.Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(values.detach().sum())
        self.counts[key] = self.counts.get(key, 0) + values.numel()

    def means(self) -> dict[str, float]:
        return {k: v / self.counts[k] for k, v in self.sums.items() if self.counts[k]}

    def merge(self, other: Tally) -> Tally:
        """This tally plus ``other``'s (another process's), in place."""
        for k, v in other.sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + other.counts[k]
        return self


class Objective(ABC):
    """One training objective (see the module docstring for the contract)."""

    #: the name runs record, e.g. ``"sft"``
    name: str = ""
    #: what :meth:`count` counts: ``"target_tokens"``, ``"pairs"`` or ``"sequences"``
    unit: str = "target_tokens"
    #: whether the loss compares with a frozen reference model
    needs_reference: bool = False

    @abstractmethod
    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """The units in ``batch`` that its loss sum covers (the normalizer's share)."""

    @abstractmethod
    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's loss, summed over its :meth:`count` units: a differentiable scalar."""

    def live_reference(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether computing this batch's loss runs a reference forward (FLOP accounting)."""
        return False

    @property
    def tally(self) -> Tally:
        """The figures measured since the last :meth:`take_metrics` (none for SFT)."""
        if "_tally" not in self.__dict__:
            self._tally = self.new_tally()
        return self._tally

    def new_tally(self) -> Tally:
        return Tally()

    def take_tally(self) -> Tally:
        """The figures since the last call; a fresh tally goes on."""
        out = self.tally
        self._tally = self.new_tally()
        return out

    def take_metrics(self) -> dict[str, float]:
        """Each figure's mean since the last call (this process's), and a fresh tally."""
        return self.take_tally().means()

    @contextmanager
    def separate_tally(self) -> Iterator[Tally]:
        """Figures measured within the block go to the tally yielded (an evaluation's),
        not into the training steps' running one."""
        saved, self._tally = self.tally, self.new_tally()
        try:
            yield self._tally
        finally:
            self._tally = saved
