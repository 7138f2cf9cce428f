"""One optimizer step: forward and backward over the step's micro-batches, with the loss
normalized by the target tokens of the whole step across micro-batches and processes.

``loss = sum over all target tokens of -log p(token) / N_step``, where ``N_step`` counts
the targets of every micro-batch on every process. Each micro-batch backpropagates
``sum_i / N_step * world_size`` (DDP averages gradients over processes, and the
``world_size`` factor undoes that), so the accumulated gradient is exactly that of one
big batch - never a mean of per-batch means (transformers#34191).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from leantune.data.collate import MODEL_KEYS
from leantune.data.encode import IGNORE
from leantune.train.chunked_loss import chunked_head, linear_cross_entropy
from leantune.train.head import head_at


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model gets: ids, mask or positions (no labels, no bookkeeping), and never a
    KV cache: with one, transformers ignores packed position_ids."""
    return {k: v for k, v in batch.items() if k in MODEL_KEYS} | {"use_cache": False}


def targets(batch: dict[str, torch.Tensor]) -> int:
    """Positions that predict a target: where the LM head runs."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens and their count; chunked
    (:mod:`~leantune.train.chunked_loss`) where that applies to ``model``."""
    _, loss, n = forward_loss(model, batch, chunked=True)
    return loss, n


def forward_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                 full_logits: bool = False, chunked: bool = False
                 ) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """Logits, the summed next-token cross-entropy over target tokens, and their count.

    Position t predicts labels[t + 1]; -100 is ignored. The LM head runs only at the N
    positions that predict a target (:func:`~leantune.train.head.head_at`), and the logits
    are those, ``[N, V]`` in row-major order; with ``full_logits`` it runs everywhere and
    they are ``[B, T, V]`` (a model that prepends ``n`` virtual tokens, prompt tuning,
    returns ``n + T`` positions; the last T, aligned with the labels, are returned).
    With ``chunked`` (and a head it applies to), the head and the loss run together in
    chunks and the logits are None.
    """
    # Shift the labels rather than the logits: slicing [B, T, V] logits would copy them.
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
    select = None if full_logits else labels != IGNORE
    head = chunked_head(model) if chunked and not full_logits else None
    hidden: list[torch.Tensor] | None = [] if head is not None else None
    with head_at(model, select, hidden):
        logits = model(**model_inputs(batch)).logits
    if hidden:  # the head saw no rows: it runs inside the loss
        return None, linear_cross_entropy(hidden[-1], head, labels[select]), int(select.sum())
    if logits.dim() == 2:  # [N, V]: the head ran at the selected positions only
        targets = labels[select]
    else:
        logits = logits[:, -labels.shape[1]:]
        targets = labels.flatten()
    loss = F.cross_entropy(logits.flatten(0, -2).float(), targets, ignore_index=IGNORE,
                           reduction="sum")
    return logits, loss, int((labels != IGNORE).sum())


@dataclass
class StepResult:
    loss: float          # mean over the step's target tokens, all processes
    target_tokens: int   # all processes
    grad_norm: float | None
    applied: bool = True  # False: the loss or gradient was not finite, no update was made


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: list[dict[str, torch.Tensor]], accelerator: Accelerator,
               max_grad_norm: float | None) -> StepResult:
    """Accumulate gradients over ``micro_batches`` and take one optimizer step.

    A non-finite loss or gradient norm (NaN/inf: the same on every process, both being
    reduced over them) makes no update at all: the gradients are dropped, so the weights
    and optimizer moments stay as they were (``applied=False``).
    """
    local = sum(targets(b) for b in micro_batches)
    total = int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum"))
    scale = accelerator.num_processes / max(total, 1)
    summed = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(micro_batches):
        # Gradients are all-reduced once, on the last micro-batch of the step.
        sync = i == len(micro_batches) - 1
        with accelerator.no_sync(model) if not sync else nullcontext():
            loss, _ = loss_sum(model, batch)
            accelerator.backward(loss * scale)
        summed += loss.detach()
    mean = float(accelerator.reduce(summed, "sum")) / max(total, 1)
    grad_norm = None
    if max_grad_norm is not None:
        params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = float(accelerator.clip_grad_norm_(params, max_grad_norm))
    applied = math.isfinite(mean) and (grad_norm is None or math.isfinite(grad_norm))
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(mean, total, grad_norm, applied)
