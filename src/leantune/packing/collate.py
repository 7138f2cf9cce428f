"""Collators: encoded examples in, model-ready tensors out.

Two layouts, both with ``labels`` aligned to ``input_ids`` (the loss shifts them) and a
``token_mask`` of real (non-pad) tokens that is bookkeeping only, never a model input
(and, for ReFT, an ``intervention_mask`` saying where each example's prompt is edited):

- padded: one example per row, right-padded, with an ``attention_mask``.
- packed: several examples per row (``bins``), ``position_ids`` restarting at 0 at every
  example and NO ``attention_mask``, so transformers builds a block-causal mask from the
  position restarts (eager/sdpa/flex) or takes the varlen path (flash-attention). Each
  example's first label is -100: it would be predicted from the previous example.
  Rows shorter than the longest are filled with pad tokens in segments of their own
  (positions restarting at 0) that no real token attends to. No pad position exceeds the
  longest example's last one: models that read the batch's largest position (Phi-3's
  long-RoPE switch, dynamic NTK scaling) then choose what they would choose padded.
"""

from __future__ import annotations

import torch

from leantune.data.encode import IGNORE, Encoded

# Keys of a collated batch that the model takes; the rest is bookkeeping.
PREFIX, SUFFIX = 1, 2  # intervention_mask values; 0 = leave the position alone


def intervention_kinds(n: int, prefix: int, suffix: int) -> list[int]:
    """Per position of an ``n``-token prompt: PREFIX for its first ``prefix`` tokens,
    SUFFIX for its last ``suffix``, else 0 (ReFT's ``f{prefix}+l{suffix}``).

    A prompt shorter than ``prefix + suffix`` is split between them (the paper's rule):
    ``prefix <- min(prefix, n // 2)`` and ``suffix <- min(suffix, ceil(n / 2))``, so no
    position is both.
    """
    if n < prefix + suffix:
        prefix, suffix = min(prefix, n // 2), min(suffix, (n + 1) // 2)
    kinds = [0] * n
    kinds[:prefix] = [PREFIX] * prefix
    if suffix:
        kinds[n - suffix:] = [SUFFIX] * suffix
    return kinds


def prompt_length(e: Encoded) -> int:
    """Tokens before the first target; the whole example when every token is a target
    (plain text) or none is."""
    first = next((i for i, t in enumerate(e.labels) if t != IGNORE), 0)
    return first or len(e.input_ids)


def _kinds(e: Encoded, intervene: tuple[int, int]) -> list[int]:
    kinds = intervention_kinds(prompt_length(e), *intervene)
    return kinds + [0] * (len(e.input_ids) - len(kinds))


def collate_padded(examples: list[Encoded], pad_id: int,
                   intervene: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch.

    Args:
        intervene: ``(prefix, suffix)`` prompt positions a ReFT edits; adds
            ``intervention_mask`` [B, T] (see :func:`intervention_kinds`).

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
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels,
           "token_mask": mask.bool(), "num_examples": torch.tensor(len(examples))}
    if intervene is not None:
        kinds = torch.zeros((len(examples), longest), dtype=torch.long)
        for i, e in enumerate(examples):
            kinds[i, :len(e.input_ids)] = torch.tensor(_kinds(e, intervene))
        out["intervention_mask"] = kinds
    return out


def collate_packed(examples: list[Encoded], bins: list[list[int]], pad_id: int,
                   restart_positions: bool = True, intervene: tuple[int, int] | None = None
                   ) -> dict[str, torch.Tensor]:
    """One row per bin of example indices (into ``examples``), padded to the longest row.

    Args:
        restart_positions: False gives naive packing (positions run on across examples,
            so attention crosses example boundaries): only for showing why it is wrong.
        intervene: as in :func:`collate_padded`; every example of a row gets its own
            prefix and suffix positions.

    Returns:
        ``input_ids``, ``position_ids``, ``labels``, ``token_mask``, each [rows, T], and
        ``num_examples``.
    """
    rows = []
    for b in bins:
        ids, labels, pos, kinds = [], [], [], []
        for i in b:
            e = examples[i]
            ids += e.input_ids
            labels += [IGNORE] + e.labels[1:]
            start = 0 if restart_positions else len(pos)
            pos += range(start, start + len(e.input_ids))
            kinds += _kinds(e, intervene) if intervene is not None else []
        rows.append((ids, labels, pos, kinds))
    longest = max(len(r[0]) for r in rows)
    cap = max(len(examples[i].input_ids) for b in bins for i in b)  # the longest example
    out = {k: torch.full((len(rows), longest), v, dtype=torch.long)
           for k, v in (("input_ids", pad_id), ("labels", IGNORE), ("position_ids", 0))}
    if intervene is not None:
        out["intervention_mask"] = torch.zeros((len(rows), longest), dtype=torch.long)
    token_mask = torch.zeros((len(rows), longest), dtype=torch.bool)
    for r, (ids, labels, pos, kinds) in enumerate(rows):
        n = len(ids)
        out["input_ids"][r, :n] = torch.tensor(ids)
        out["labels"][r, :n] = torch.tensor(labels)
        out["position_ids"][r, :n] = torch.tensor(pos)
        out["position_ids"][r, n:] = pad_positions(longest - n, cap)
        if intervene is not None:
            out["intervention_mask"][r, :n] = torch.tensor(kinds)
        token_mask[r, :n] = True
    return out | {"token_mask": token_mask, "num_examples": torch.tensor(sum(map(len, bins)))}


def pad_positions(n: int, cap: int) -> torch.Tensor:
    """Positions of an ``n``-token pad tail: ``0 .. cap-1`` repeated (the last run cut short).

    Every restart begins a new segment (transformers starts one wherever a position does
    not follow the one before), so each pad segment attends only to itself, and the
    largest position stays ``cap - 1``: a pad tail longer than every example cannot raise
    the batch's maximum position, which some models read (``max(position_ids) + 1``).
    """
    return torch.arange(n) % cap


def collate_rows(rows: list[list[Encoded]], pad_id: int, restart_positions: bool = True,
                 intervene: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """:func:`collate_packed` with one row per given group of examples (a pre-packed bin, a
    corpus window's document pieces)."""
    flat = [e for row in rows for e in row]
    bins, k = [], 0
    for row in rows:
        bins.append(list(range(k, k + len(row))))
        k += len(row)
    return collate_packed(flat, bins, pad_id, restart_positions, intervene)
