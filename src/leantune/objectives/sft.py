"""Next-token cross-entropy over target tokens: supervised fine-tuning (prompt tokens
masked, so only completions are targets) and continual pre-training (every token of raw
text a target) are the same objective on differently labelled batches::

    loss_sum = -sum over target tokens t of log p(t | everything before it)
    count    = number of target tokens

Token-weighted: long examples count for their length, as in the pre-training loss.
"""

from __future__ import annotations

import torch

from leantune.model.logprobs import count_targets, target_logprobs
from leantune.objectives.base import Objective


class NextToken(Objective):
    """The SFT / continual pre-training loss. With ``chunked`` (the default) the LM head
    and log-softmax run in chunks where the head allows it
    (:mod:`leantune.model.chunked_loss`): the same numbers without ``[N, V]`` logits."""

    name = "sft"
    unit = "target_tokens"

    def __init__(self, chunked: bool = True):
        self.chunked = chunked

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return count_targets(batch)

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return -target_logprobs(model, batch, chunked=self.chunked).sum()
