"""Held-out loss: the objective's loss over a whole set, normalized as in training (for
next-token cross-entropy: the mean over every target token, token-weighted, so long
examples count for their length), and its perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from accelerate import Accelerator

from leantune.data.encode import Encoded
from leantune.data.preference import EncodedPreference
from leantune.model.load import evaluating
from leantune.objectives import NEXT_TOKEN, Objective


def positions(item: Encoded | EncodedPreference) -> int:
    """Tokens of an example, or of a pair's prompt and completions."""
    if isinstance(item, EncodedPreference):
        return len(item.prompt) + item.num_targets
    return len(item.input_ids)


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: list, batch_size: int,
             collate: Callable[[list], dict[str, torch.Tensor]],
             accelerator: Accelerator, objective: Objective = NEXT_TOKEN) -> dict[str, float]:
    """Loss and perplexity of ``model`` on ``examples`` (sharded over processes), in
    batches of ``batch_size`` examples laid out by ``collate`` (padded or packed). The
    items may be preference pairs (a pair objective's units), never split.

    Returns:
        ``{"loss", "perplexity", "target_tokens"}``; loss is NaN for an empty set.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    # Sorting by length keeps padding (and so wasted compute) low; the mean is unaffected.
    mine = sorted(examples[rank::world], key=positions)
    total, count = torch.zeros((), device=accelerator.device), 0
    with evaluating(model):
        for i in range(0, len(mine), batch_size):
            batch = collate(mine[i : i + batch_size])
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            total += objective.loss_sum(model, batch)
            count += objective.count(batch)
    total = float(accelerator.reduce(total, "sum"))
    count = int(accelerator.reduce(torch.tensor(count, device=accelerator.device), "sum"))
    loss = total / count if count else math.nan
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)) if count else math.nan,
            "target_tokens": count}
