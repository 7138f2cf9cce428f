"""Collators: encoded examples in, model-ready tensors out.

Two layouts, both with ``labels`` aligned to ``input_ids`` (the loss shifts them) and a
``token_mask`` of real (non-pad) tokens that is bookkeeping only, never a model input:

- padded: one example per row, right-padded, with an ``attention_mask``.
- packed: several examples per row (``bins``), ``position_ids`` restarting at 0 at every
  example and NO ``attention_mask``, so transformers builds a block-causal mask from the
  position restarts (eager/sdpa/flex) or takes the varlen path (flash-attention). Each
  example's first label is -100: it would be predicted from the previous example.
  Rows shorter than the longest are filled with pad tokens whose positions restart at
  0 too, so they form a segment of their own that no real token attends to.
"""

from __future__ import annotations

import torch

from leantune.data.encode import IGNORE, Encoded

# Keys of a collated batch that the model takes; the rest is bookkeeping.
MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


def collate_padded(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch.

    Returns:
        ``input_ids`` [B, T] (pad_id where padded), ``attention_mask`` [B, T] (1 = real),
        ``labels`` [B, T] (-100 where padded or not a target), ``token_mask`` [B, T],
        ``num_examples`` (a 0-dim count).
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
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "token_mask": mask.bool(), "num_examples": torch.tensor(len(examples))}


def collate_packed(examples: list[Encoded], bins: list[list[int]], pad_id: int,
                   restart_positions: bool = True) -> dict[str, torch.Tensor]:
    """One row per bin of example indices (into ``examples``), padded to the longest row.

    Args:
        restart_positions: False gives naive packing (positions run on across examples,
            so attention crosses example boundaries): only for showing why it is wrong.

    Returns:
        ``input_ids``, ``position_ids``, ``labels``, ``token_mask``, each [rows, T], and
        ``num_examples``.
    """
    rows = []
    for b in bins:
        ids, labels, pos = [], [], []
        for i in b:
            e = examples[i]
            ids += e.input_ids
            labels += [IGNORE] + e.labels[1:]
            start = 0 if restart_positions else len(pos)
            pos += range(start, start + len(e.input_ids))
        rows.append((ids, labels, pos))
    longest = max(len(r[0]) for r in rows)
    out = {k: torch.full((len(rows), longest), v, dtype=torch.long)
           for k, v in (("input_ids", pad_id), ("labels", IGNORE), ("position_ids", 0))}
    token_mask = torch.zeros((len(rows), longest), dtype=torch.bool)
    for r, (ids, labels, pos) in enumerate(rows):
        n = len(ids)
        out["input_ids"][r, :n] = torch.tensor(ids)
        out["labels"][r, :n] = torch.tensor(labels)
        out["position_ids"][r, :n] = torch.tensor(pos)
        out["position_ids"][r, n:] = torch.arange(longest - n)  # pads: a segment of their own
        token_mask[r, :n] = True
    return out | {"token_mask": token_mask, "num_examples": torch.tensor(sum(map(len, bins)))}
