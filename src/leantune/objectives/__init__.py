"""Training objectives: each computes a loss sum and its normalizer from a collated batch
(:class:`~leantune.objectives.base.Objective`); the training loop, evaluation and Fast
Forward call them without knowing which one runs. Next-token cross-entropy
(:class:`~leantune.objectives.sft.NextToken`) serves SFT and continual pre-training."""

from leantune.objectives.base import Objective
from leantune.objectives.sft import NextToken

__all__ = ["NEXT_TOKEN", "NextToken", "Objective"]

#: the default objective: next-token cross-entropy over target tokens, chunked
NEXT_TOKEN = NextToken()
