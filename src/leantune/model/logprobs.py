"""Log-probabilities of a batch's target tokens: the one place where the next-token shift,
the LM head and the log-softmax meet. Training objectives, the held-out loss, Fast
Forward's FF set, multiple-choice scores, the packing probe and the start-up checks all
read them from here.

A collated batch (:mod:`leantune.packing.collate`) holds ``input_ids`` ``[B, T]``,
``labels`` ``[B, T]`` (``-100`` where no prediction is scored) and an ``attention_mask``
or packed ``position_ids``. Position ``t`` predicts ``labels[t + 1]``::

    lp[b, t] = log softmax(head(h[b, t]))[labels[b, t + 1]]     where labels[b, t + 1] != -100

Three ways to compute the same numbers:

- **at targets** (default): the head runs only at the ``N`` target positions
  (:func:`~leantune.model.head.head_at`), logits ``[N, V]``;
- **chunked**: head and log-softmax together, in chunks of targets, so the ``[N, V]``
  logits never exist (:mod:`leantune.model.chunked_loss`), where the head is a plain
  linear layer;
- **everywhere**: the model's own ``[B, T, V]`` logits (:func:`forward_logits`), the
  reference the other two are checked against at start-up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from leantune.data.encode import IGNORE
from leantune.model.chunked_loss import chunked_head, linear_log_probs
from leantune.model.head import head_at
from leantune.model.precision import compute_dtype

# What every model's forward takes from a batch; the rest is bookkeeping, which a model
# may ask for by name (``batch_inputs``: ReFT reads where the prompts lie).
MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, torch.Tensor], model: torch.nn.Module | None = None
                 ) -> dict[str, torch.Tensor]:
    """What ``model`` gets: ids, mask or positions (no labels), the bookkeeping keys it
    names in ``batch_inputs``, and never a KV cache: with one, transformers ignores packed
    position_ids."""
    while model is not None and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module  # DistributedDataParallel, DeepSpeedEngine
    keys = MODEL_KEYS + tuple(getattr(model, "batch_inputs", ()))
    return {k: v for k, v in batch.items() if k in keys} | {"use_cache": False}


def next_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, T]``: at position t the label it predicts, ``labels[t + 1]`` (-100 at the end).
    The labels are shifted rather than the logits: slicing ``[B, T, V]`` would copy them."""
    return F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Positions that predict a target: where the LM head runs (a tree batch lists them)."""
    if "target_token" in batch:
        return len(batch["target_token"])
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[N]`` fp32 ``log softmax(logits)[targets]`` for logits ``[N, V]``, targets ``[N]``."""
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def forward_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits at every position, ``[B, T, V]`` (a model that prepends ``n``
    virtual tokens, prompt tuning, returns ``n + T``: the last T, aligned with the labels)."""
    logits = model(**model_inputs(batch, model)).logits
    return logits[:, -batch["labels"].shape[1]:]


def target_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                    chunked: bool = False) -> torch.Tensor:
    """``[N]`` fp32, differentiable: the log-probability of every target token of
    ``batch``, in row-major order of the targets' positions; the head runs at those
    positions only, or (``chunked``, where it applies) inside the log-softmax, chunk by
    chunk."""
    labels = next_labels(batch)
    select = labels != IGNORE
    head = chunked_head(model) if chunked else None
    hidden: list[torch.Tensor] | None = [] if head is not None else None
    with head_at(model, select, hidden):
        logits = model(**model_inputs(batch, model)).logits
    if hidden:  # the head saw no rows: it runs inside the log-softmax
        return linear_log_probs(hidden[-1], head, labels[select], compute_dtype(model))
    if logits.dim() == 3:  # the head was not reached as expected: it ran everywhere
        logits = logits[:, -labels.shape[1]:][select]
    return token_logprobs(logits, labels[select])


def select_positions(shape: torch.Size, row: torch.Tensor, at: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(select [B, T] bool, order [N])`` for positions ``(row[i], at[i])`` that may
    repeat: where the head runs, and each position's index among the selected ones
    (row-major), which maps the head's ``[M, ...]`` output back to the ``N`` targets."""
    select = torch.zeros(shape, dtype=torch.bool, device=row.device)
    select[row, at] = True
    return select, select.flatten().cumsum(0).sub(1).view(shape)[row, at]


def logprobs_at(model: torch.nn.Module, batch: dict[str, torch.Tensor], row: torch.Tensor,
                at: torch.Tensor, tokens: torch.Tensor, chunked: bool = False) -> torch.Tensor:
    """``[N]`` fp32, differentiable: ``log p(tokens[i])`` predicted at position
    ``(row[i], at[i])``, for layouts whose targets are not the next position's label (a
    tree's context end predicts every branch's first token: positions may repeat). The
    head runs at the distinct positions only, or (``chunked``) inside the log-softmax."""
    select, order = select_positions(batch["input_ids"].shape, row, at)
    head = chunked_head(model) if chunked else None
    hidden: list[torch.Tensor] | None = [] if head is not None else None
    with head_at(model, select, hidden):
        logits = model(**model_inputs(batch, model)).logits
    if hidden:
        return linear_log_probs(hidden[-1][order], head, tokens, compute_dtype(model))
    if logits.dim() == 2:  # [M, V], row-major over the selected positions
        return token_logprobs(logits[order], tokens)
    return token_logprobs(logits[:, -select.shape[1]:][row, at], tokens)


def sequence_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                      chunked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums, counts)``, each ``[E]`` for the batch's ``E`` examples (in the order they
    were collated: ``example_index``; a tree batch's branches: ``target_branch``): the
    summed log-probability of each example's target tokens (differentiable, fp32) and how
    many there are. The sequence-level quantity preference losses compare, whatever the
    layout (padded, packed, a prompt shared by its completions)."""
    if "target_at" in batch:  # a tree: targets given explicitly (leantune.packing.trees)
        owner = batch["target_branch"]
        lp = logprobs_at(model, batch, batch["target_row"], batch["target_at"],
                         batch["target_token"], chunked)
    else:
        select = next_labels(batch) != IGNORE
        owner = F.pad(batch["example_index"][:, 1:], (0, 1), value=-1)[select]
        lp = target_logprobs(model, batch, chunked)
    n = int(batch["num_examples"])
    sums = torch.zeros(n, dtype=lp.dtype, device=lp.device).index_add(0, owner, lp)
    counts = torch.zeros(n, dtype=torch.long, device=lp.device).index_add(
        0, owner, torch.ones_like(owner))
    return sums, counts


def full_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [B, T, V], summed negative log-likelihood of the targets)`` with the head
    everywhere: the reference the shortcuts are checked against."""
    logits = forward_logits(model, batch)
    labels = next_labels(batch)
    select = labels != IGNORE
    return logits, -token_logprobs(logits[select], labels[select]).sum()


def dense(values: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, T]`` float64: per-target ``values`` ``[N]`` (row-major order) placed at the
    positions that predict them, 0 elsewhere; row sums over an example's span give its
    sequence log-probability."""
    select = next_labels(batch) != IGNORE
    out = torch.zeros(select.shape, dtype=torch.float64, device=values.device)
    out[select] = values.detach().double()
    return out
