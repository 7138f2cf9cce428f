"""What a run carries from step to step: counters, the data position, and the batches
that follow from them. Everything here travels in a checkpoint's ``trainer_state.json``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from leantune.config import Config
from leantune.data.collate import collate_padded, epoch_batches
from leantune.data.encode import Encoded
from leantune.train.flops import FlopModel
from leantune.train.step import StepResult


@dataclass
class TrainState:
    """Everything besides weights, optimizer and RNG that a resumed run needs."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # global micro-batches of `epoch` already consumed
    target_tokens: int = 0
    real_tokens: int = 0     # non-pad input tokens
    positions: int = 0       # input positions processed, pads included
    train_flops: int = 0
    eval_flops: int = 0
    train_seconds: float = 0.0
    last_loss: float = math.nan
    eval_loss_before: float | None = None
    eval_history: list[dict] = field(default_factory=list)  # every eval record so far

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / max(self.train_seconds, 1e-9)

    def account(self, micro: list[dict[str, torch.Tensor]], result: StepResult,
                flop_model: FlopModel, acc: Accelerator, seconds: float) -> None:
        """Add one optimizer step's tokens (all processes), FLOPs and time."""
        local = torch.tensor([[int(b["attention_mask"].sum()), b["input_ids"].numel(),
                               flop_model.train(*b["input_ids"].shape)] for b in micro],
                             dtype=torch.float64, device=acc.device).sum(0)
        real, positions, flops = acc.reduce(local, "sum").tolist()
        self.step += 1
        self.last_loss = result.loss
        self.target_tokens += result.target_tokens
        self.real_tokens += int(real)
        self.positions += int(positions)
        self.train_flops += int(flops)
        self.train_seconds += seconds


def micro_batches(train: list[Encoded], cfg: Config, state: TrainState, acc: Accelerator,
                  pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """This process's micro-batches, forever, resuming at ``state``'s data position.

    Each global micro-batch holds ``batch_size * num_processes`` examples; process ``r``
    takes every ``num_processes``-th one starting at ``r``.
    """
    world, rank = acc.num_processes, acc.process_index
    while True:
        batches = epoch_batches(len(train), cfg.train.batch_size * world, cfg.train.seed,
                                state.epoch)
        while state.batch_in_epoch < len(batches):
            indices = batches[state.batch_in_epoch]
            state.batch_in_epoch += 1
            if len(indices) < world:  # too small to give every process an example
                continue
            batch = collate_padded([train[i] for i in indices[rank::world]], pad_id)
            yield {k: v.to(acc.device) for k, v in batch.items()}
        state.epoch += 1
        state.batch_in_epoch = 0


def total_steps(cfg: Config, n_train: int, world: int) -> int:
    """``train.max_steps``, or the optimizer steps of ``train.epochs`` passes."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    per_epoch = math.ceil(math.ceil(n_train / (cfg.train.batch_size * world)) / cfg.train.grad_accum)
    return max(1, math.ceil(cfg.train.epochs * per_epoch))
