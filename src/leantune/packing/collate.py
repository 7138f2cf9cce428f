"""Collators: encoded examples in, model-ready tensors out.

Two layouts, both with ``labels`` aligned to ``input_ids`` (the loss shifts them) and
bookkeeping that is no model input unless the model asks for it: a ``token_mask`` of
real (non-pad) tokens, ``example_index`` (which example of the batch each token belongs
to, in the order given; -1 on pads: per-sequence sums), and where each example's prompt
lies, ``prompt_position`` (0 .. n-1 over an example's ``n`` prompt tokens, -1 elsewhere)
and ``prompt_length`` (``n`` there, 0 elsewhere), from which ReFT derives the positions
it edits:

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


def prompt_length(e: Encoded) -> int:
    """Tokens before the first target; the whole example when every token is a target
    (plain text) or none is."""
    first = next((i for i, t in enumerate(e.labels) if t != IGNORE), 0)
    return first or len(e.input_ids)


def prompt_columns(e: Encoded) -> tuple[list[int], list[int]]:
    """``(prompt_position, prompt_length)`` for each token of ``e``."""
    n, total = prompt_length(e), len(e.input_ids)
    return list(range(n)) + [-1] * (total - n), [n] * n + [0] * (total - n)


def collate_padded(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch.

    Returns:
        ``input_ids`` [B, T] (pad_id where padded), ``attention_mask`` [B, T] (1 = real),
        ``labels`` [B, T] (-100 where padded or not a target), ``token_mask``,
        ``example_index`` (row i: example i), ``prompt_position`` and ``prompt_length``,
        all [B, T], and ``num_examples`` (a 0-dim count).
    """
    longest = max(len(e.input_ids) for e in examples)
    shape = (len(examples), longest)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    where, length = torch.full(shape, -1, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    index = torch.full(shape, -1, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
        index[i, :n] = i
        columns = prompt_columns(e)
        where[i, :n], length[i, :n] = torch.tensor(columns[0]), torch.tensor(columns[1])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "token_mask": mask.bool(), "example_index": index, "prompt_position": where,
            "prompt_length": length, "num_examples": torch.tensor(len(examples))}


def collate_packed(examples: list[Encoded], bins: list[list[int]], pad_id: int,
                   restart_positions: bool = True) -> dict[str, torch.Tensor]:
    """One row per bin of example indices (into ``examples``), padded to the longest row.

    Args:
        restart_positions: False gives naive packing (positions run on across examples,
            so attention crosses example boundaries): only for showing why it is wrong.

    Returns:
        ``input_ids``, ``position_ids``, ``labels``, ``token_mask``, ``example_index`` (the
        index into ``examples``), ``prompt_position``, ``prompt_length``, each [rows, T]
        (every packed example with its own prompt), and ``num_examples``.
    """
    keys = ("input_ids", "labels", "position_ids", "example_index", "prompt_position",
            "prompt_length")
    rows = []
    for b in bins:
        row: dict[str, list[int]] = {k: [] for k in keys}
        for i in b:
            e = examples[i]
            start = 0 if restart_positions else len(row["position_ids"])
            where, length = prompt_columns(e)
            for k, v in zip(keys, (e.input_ids, [IGNORE] + e.labels[1:],
                                   range(start, start + len(e.input_ids)),
                                   [i] * len(e.input_ids), where, length)):
                row[k] += v
        rows.append(row)
    longest = max(len(r["input_ids"]) for r in rows)
    cap = max(len(examples[i].input_ids) for b in bins for i in b)  # the longest example
    fill = {"input_ids": pad_id, "labels": IGNORE, "position_ids": 0, "example_index": -1,
            "prompt_position": -1, "prompt_length": 0}
    out = {k: torch.full((len(rows), longest), fill[k], dtype=torch.long) for k in keys}
    token_mask = torch.zeros((len(rows), longest), dtype=torch.bool)
    for r, row in enumerate(rows):
        n = len(row["input_ids"])
        for k in keys:
            out[k][r, :n] = torch.tensor(row[k])
        out["position_ids"][r, n:] = pad_positions(longest - n, cap)
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


def collate_rows(rows: list[list[Encoded]], pad_id: int, restart_positions: bool = True
                 ) -> dict[str, torch.Tensor]:
    """:func:`collate_packed` with one row per given group of examples (a pre-packed bin, a
    corpus window's document pieces)."""
    flat = [e for row in rows for e in row]
    bins, k = [], 0
    for row in rows:
        bins.append(list(range(k, k + len(row))))
        k += len(row)
    return collate_packed(flat, bins, pad_id, restart_positions)
