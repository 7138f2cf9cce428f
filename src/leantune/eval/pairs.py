"""Held-out preference pairs: how often a model prefers the chosen completion, and by how
much. For a trained run with an adapter the margin is reference-relative, as the DPO
family optimizes it: ``(ℓ_c − ℓ_c^ref) − (ℓ_r − ℓ_r^ref)`` with the reference the same
model with its adapter switched off; for a bare model (or full fine-tuning) it is the raw
log-probability margin ``ℓ_c − ℓ_r``. Reported: accuracy (margin > 0) with its 95 %
Wilson interval, the mean margin with a normal 95 % interval, and the pairs kept and
dropped (:mod:`leantune.data.preference`).
"""

from __future__ import annotations

import math
import statistics

import torch
from accelerate import Accelerator

from leantune.adapters.base import Adapter
from leantune.data.preference import (
    EncodedPreference,
    PreferenceStats,
    detect_preference_format,
    encode_preference,
    to_preference,
)
from leantune.data.preference_sets import is_pair_file
from leantune.data.rows import DataError
from leantune.data.sources import read_rows
from leantune.eval.multiple_choice import Z95, wilson
from leantune.eval.shard import gather_scores, my_share
from leantune.model.load import evaluating
from leantune.model.logprobs import sequence_logprobs
from leantune.packing.collate import collate_padded

__all__ = ["is_pair_file", "pair_margins", "read_pairs", "score_pairs"]


def read_pairs(path: str, tokenizer, max_length: int, limit: int | None
               ) -> tuple[list[EncodedPreference], PreferenceStats]:
    """The pairs of ``path`` tokenized (at most ``limit``), and what was dropped."""
    stats, pairs = PreferenceStats(), []
    for row in read_rows(path):
        if limit is not None and len(pairs) >= limit:
            break
        fmt = detect_preference_format(row.record)
        if fmt != "pairs":
            raise DataError(row.source, row.where, None, "expected a preference pair "
                            "(chosen and rejected); an unpaired row has nothing to compare")
        encoded = encode_preference(to_preference(row, fmt), tokenizer, max_length, stats)
        if encoded is not None:
            pairs.append(encoded)
    return pairs, stats


@torch.no_grad()
def pair_margins(model: torch.nn.Module, pairs: list[EncodedPreference], batch_size: int,
                 pad_id: int, adapter: Adapter | None, acc: Accelerator) -> tuple[list[float], str]:
    """Each pair's margin (sharded over processes, gathered on all), and which kind:
    ``reference`` (the adapter switched off) or ``logp`` (raw)."""
    relative = adapter is not None and type(adapter).disabled is not Adapter.disabled
    mine = my_share(len(pairs), acc, key=lambda i: -len(pairs[i].prompt))
    device = next(model.parameters()).device
    margins: dict[int, float] = {}
    with evaluating(model):
        for k in range(0, len(mine), batch_size):
            ids = mine[k:k + batch_size]
            batch = collate_padded([e for i in ids for e in pairs[i].examples()], pad_id)
            batch = {key: v.to(device) for key, v in batch.items()}
            sums, _ = sequence_logprobs(model, batch)
            if relative:
                with adapter.disabled(model):
                    sums = sums - sequence_logprobs(model, batch)[0]
            for j, i in enumerate(ids):
                margins[i] = float(sums[2 * j] - sums[2 * j + 1])
    return gather_scores(margins, len(pairs), acc), "reference" if relative else "logp"


def score_pairs(model: torch.nn.Module, tokenizer, adapter: Adapter | None, path: str,
                max_length: int, batch_size: int, acc: Accelerator,
                limit: int | None = None, relative: bool = True) -> dict:
    """Pair accuracy and mean margin of ``model`` on the pairs of ``path``; with
    ``relative`` False, the raw log-prob margin even for a run with an adapter (comparable
    with its base model and across objectives)."""
    pairs, stats = read_pairs(path, tokenizer, max_length, limit)
    margins, kind = pair_margins(model, pairs, batch_size, tokenizer.pad_token_id,
                                 adapter if relative else None, acc) if pairs else ([], "logp")
    n = len(margins)
    accuracy = sum(m > 0 for m in margins) / n if n else math.nan
    mean = statistics.fmean(margins) if n else math.nan
    half = Z95 * statistics.stdev(margins) / math.sqrt(n) if n > 1 else math.nan
    return {"path": path, "pairs": n, "margin_kind": kind, "accuracy": accuracy,
            "accuracy_ci": wilson(accuracy, n) if n else [math.nan, math.nan],
            "margin": mean, "margin_ci": [mean - half, mean + half],
            "rows": stats.rows, "truncated": stats.truncated,
            "dropped": stats.dropped_prompt_too_long + stats.dropped_same_completions}
