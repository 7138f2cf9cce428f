"""One optimizer step: forward and backward over the step's micro-batches, with the
objective's loss normalized by its count over the whole step, across micro-batches and
processes (:mod:`leantune.objectives.base`).

``loss = sum_m loss_sum(m) / N_step``, where ``N_step`` counts the objective's units
(target tokens for SFT) of every micro-batch on every process. Each micro-batch
backpropagates ``loss_sum(m) / N_step * world_size`` (DDP averages gradients over
processes, and the ``world_size`` factor undoes that), so the accumulated gradient is
exactly that of one big batch - never a mean of per-batch means (transformers#34191).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from leantune.objectives import NEXT_TOKEN, Objective


@dataclass
class StepResult:
    loss: float          # mean over the step's units (target tokens for SFT), all processes
    count: int           # the objective's units of the step, all processes
    grad_norm: float | None
    applied: bool = True  # False: the loss or gradient was not finite, no update was made


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: list[dict[str, torch.Tensor]], accelerator: Accelerator,
               max_grad_norm: float | None, objective: Objective = NEXT_TOKEN) -> StepResult:
    """Accumulate gradients over ``micro_batches`` and take one optimizer step.

    A non-finite loss or gradient norm (NaN/inf: the same on every process, both being
    reduced over them) makes no update at all: the gradients are dropped, so the weights
    and optimizer moments stay as they were (``applied=False``).
    """
    local = sum(objective.count(b) for b in micro_batches)
    total = int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum"))
    scale = accelerator.num_processes / max(total, 1)
    summed = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(micro_batches):
        # Gradients are all-reduced once, on the last micro-batch of the step.
        sync = i == len(micro_batches) - 1
        with accelerator.no_sync(model) if not sync else nullcontext():
            loss = objective.loss_sum(model, batch)
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
