"""Held-out loss: the mean next-token cross-entropy over every target token of the set
(token-weighted, so long examples count for their length), and its perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from accelerate import Accelerator

from leantune.data.encode import Encoded
from leantune.train.step import loss_sum


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: list[Encoded], batch_size: int,
             collate: Callable[[list[Encoded]], dict[str, torch.Tensor]],
             accelerator: Accelerator) -> dict[str, float]:
    """Loss and perplexity of ``model`` on ``examples`` (sharded over processes), in
    batches of ``batch_size`` examples laid out by ``collate`` (padded or packed).

    Returns:
        ``{"loss", "perplexity", "target_tokens"}``; loss is NaN for an empty set.
    """
    was_training = model.training
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    # Sorting by length keeps padding (and so wasted compute) low; the mean is unaffected.
    mine = sorted(examples[rank::world], key=lambda e: len(e.input_ids))
    total, count = torch.zeros((), device=accelerator.device), 0
    for i in range(0, len(mine), batch_size):
        batch = collate(mine[i : i + batch_size])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        loss, n = loss_sum(model, batch)
        total += loss
        count += n
    total = float(accelerator.reduce(total, "sum"))
    count = int(accelerator.reduce(torch.tensor(count, device=accelerator.device), "sum"))
    model.train(was_training)
    loss = total / count if count else math.nan
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)) if count else math.nan,
            "target_tokens": count}
