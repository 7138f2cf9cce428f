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

import torch


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
