"""Batches: a seeded, resumable order of examples, and the collator that turns a list of
encoded examples into tensors.
"""

from __future__ import annotations

import random

import torch

from leantune.data.encode import IGNORE, Encoded


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of every micro-batch of one epoch, shuffled by ``(seed, epoch)``.

    The order depends on nothing else, so a resumed run can skip to batch ``k`` of epoch
    ``e`` and see exactly the batches an uninterrupted run would. The last batch may be
    smaller than ``batch_size``.
    """
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def collate_padded(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch.

    Returns:
        ``input_ids`` [B, T] (pad_id where padded), ``attention_mask`` [B, T] (1 = real),
        ``labels`` [B, T] (-100 where padded or not a target). Labels are aligned with
        inputs; the loss shifts them.
    """
    longest = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
