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
from leantune.model.flops import FlopModel
from leantune.model.logprobs import count_targets
from leantune.objectives import NEXT_TOKEN, Objective
from leantune.packing.batching import Batcher, select_batches
from leantune.packing.pairs import PairBatcher
from leantune.train.step import StepResult


@dataclass
class TrainState:
    """Everything besides weights, optimizer and RNG that a resumed run needs."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # global micro-batches of `epoch` taken since `segments`
    world: int = 1           # processes that took them (the global batch is per-process x world)
    batch_size: int | None = None  # their per-process micro-batch (None: saved before it was kept)
    # Earlier parts of `epoch` run with another global batch, as [world, micro-batches,
    # per-process batch] (older checkpoints: [world, micro-batches]): a run resumed on
    # another number of processes or train.batch_size re-batches what is left of the epoch.
    segments: list[list[int]] = field(default_factory=list)
    planned_steps: int | None = None  # the run's total steps, as planned when this state was saved
    target_tokens: int = 0
    real_tokens: int = 0     # non-pad input tokens
    positions: int = 0       # input positions processed, pads included
    rows: int = 0            # micro-batch rows processed
    examples: int = 0        # examples processed (several per row when packed)
    train_flops: int = 0     # steps' forward + backward, a live reference's forward included
    reference_flops: int = 0  # of which a preference loss's reference (and its cache)
    eval_flops: int = 0
    train_seconds: float = 0.0
    last_loss: float = math.nan
    eval_loss_before: float | None = None
    eval_history: list[dict] = field(default_factory=list)  # every eval record so far
    task_history: list[dict] = field(default_factory=list)  # multiple-choice accuracy records
    ff_accepted_per_stage: list[int] = field(default_factory=list)  # one entry per FF stage
    ff_flops: int = 0
    ff_seconds: float = 0.0
    last_lr: float | None = None
    nonfinite_steps: list[int] = field(default_factory=list)  # steps skipped: NaN/inf
    # Corpus mode: each stream's position [epoch, window], windows taken per stream, the
    # replay rounding carried over, and the content key of the corpus each position is in.
    streams: dict[str, list[int]] = field(default_factory=dict)
    windows: dict[str, int] = field(default_factory=dict)
    replay_carry: float = 0.0
    data_keys: dict[str, str] = field(default_factory=dict)
    # GRPO: sampling's seconds, completion tokens and forward FLOPs (not in train_*), and
    # with num_iterations > 1 the rollouts still being reused (a resume reuses them too).
    rollout_seconds: float = 0.0
    rollout_tokens: int = 0
    rollout_flops: int = 0
    tied_groups: int = 0
    groups: int = 0
    grpo_pending: dict | None = None
    # A run annealed from a checkpoint: the step it started at and the LR multiplier there.
    anneal_at: int | None = None
    anneal_start: float = 1.0

    @property
    def ff_stages(self) -> int:
        return len(self.ff_accepted_per_stage)

    @property
    def ff_steps_accepted(self) -> int:
        return sum(self.ff_accepted_per_stage)

    @property
    def padding_fraction(self) -> float:
        return 1 - self.real_tokens / max(self.positions, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / max(self.train_seconds, 1e-9)

    def account(self, micro: list[dict[str, torch.Tensor]], result: StepResult,
                flop_model: FlopModel, acc: Accelerator, seconds: float,
                objective: Objective = NEXT_TOKEN) -> None:
        """Add one optimizer step's tokens (all processes), FLOPs and time; a reference
        forward the objective ran counts as one forward more."""
        local = torch.tensor([[int(b["token_mask"].sum()), b["input_ids"].numel(),
                               flop_model.train(*b["input_ids"].shape, heads=count_targets(b)),
                               b["input_ids"].shape[0], int(b["num_examples"]),
                               count_targets(b),
                               flop_model.forward(*b["input_ids"].shape, count_targets(b))
                               if objective.live_reference(b) else 0] for b in micro],
                             dtype=torch.float64, device=acc.device).sum(0)
        real, positions, flops, rows, examples, targets, ref = acc.reduce(local, "sum").tolist()
        self.reference_flops += int(ref)
        flops += ref
        self.step += 1
        self.last_loss = result.loss
        self.target_tokens += int(targets)
        self.real_tokens += int(real)
        self.positions += int(positions)
        self.train_flops += int(flops)
        self.rows += int(rows)
        self.examples += int(examples)
        self.train_seconds += seconds


    def account_ff(self, record: dict) -> None:
        """Add one Fast Forward stage (a record of :meth:`FastForward.after_step`)."""
        self.ff_accepted_per_stage.append(record["ff_accepted"])
        self.ff_flops += record["ff_flops"]
        self.ff_seconds += record["ff_seconds"]


def epoch_plan(lengths: list[int], cfg: Config, world: int, epoch: int,
               batch_size: int | None = None) -> list[list[int]]:
    """The global micro-batches (unit indices) of one epoch, for all processes together;
    ``batch_size``: per process (default ``train.batch_size``)."""
    budget = cfg.data.token_budget * world if cfg.data.token_budget else None
    return select_batches(lengths, (batch_size or cfg.train.batch_size) * world,
                          cfg.train.seed, epoch, cfg.data.batching, budget,
                          padded=cfg.data.packing == "none")


def remaining_plan(lengths: list[int], cfg: Config, state: TrainState) -> list[list[int]]:
    """The global micro-batches of ``state.epoch`` for ``state.world`` processes, over the
    units its earlier ``segments`` (other process counts) have not taken.

    With no segments this is :func:`epoch_plan`. After a resume on another process count,
    the units left are batched afresh (same seed and epoch), so no unit of an epoch is
    taken twice or skipped.
    """
    rest = list(range(len(lengths)))
    for world, taken, *size in state.segments:
        plan = _plan_over(rest, lengths, cfg, world, state.epoch, size[0] if size else None)
        used = {i for b in plan[:taken] for i in b}
        rest = [i for i in rest if i not in used]
    return _plan_over(rest, lengths, cfg, state.world, state.epoch, state.batch_size)


def _plan_over(units: list[int], lengths: list[int], cfg: Config, world: int, epoch: int,
               batch_size: int | None = None) -> list[list[int]]:
    """:func:`epoch_plan` over the subset ``units`` of all units (indices into ``lengths``)."""
    plan = epoch_plan([lengths[i] for i in units], cfg, world, epoch, batch_size)
    return [[units[j] for j in b] for b in plan]


def change_world(state: TrainState, world: int, batch_size: int | None = None,
                 by_tokens: bool = False) -> bool:
    """Carry the data position over to ``world`` processes of ``batch_size`` each (None:
    the size it had). When the epoch's plan changes, the part of the epoch taken so far
    becomes a segment and the rest is re-batched for the new global batch; the plan is
    the same when the global batch ``world x batch_size`` is (and, with a token budget
    per process (``by_tokens``), the process count too), so 2 processes of 2 rows go on
    as 1 of 4 exactly where they were.

    Returns:
        Whether the plan changed (the rest of the epoch is re-batched).
    """
    size = batch_size or state.batch_size

    def plan(w: int, b: int | None) -> tuple:
        return (w * b if b else w, w if by_tokens or not b else None)

    changed = plan(world, size) != plan(state.world, state.batch_size or size)
    if changed:
        if state.batch_in_epoch:
            state.segments.append([state.world, state.batch_in_epoch,
                                   *([state.batch_size] if state.batch_size else [])])
        state.batch_in_epoch = 0
    state.world, state.batch_size = world, size
    return changed


def micro_batches(batcher: Batcher | PairBatcher, cfg: Config, state: TrainState, acc: Accelerator
                  ) -> Iterator[dict[str, torch.Tensor]]:
    """This process's micro-batches, forever, resuming at ``state``'s data position.

    Process ``r`` takes every ``num_processes``-th unit of each global micro-batch,
    starting at ``r``.
    """
    world, rank = acc.num_processes, acc.process_index
    lengths = batcher.unit_lengths
    change_world(state, world, cfg.train.batch_size,  # a no-op unless build_run has not
                 cfg.data.token_budget is not None)
    while True:
        batches = remaining_plan(lengths, cfg, state)
        while state.batch_in_epoch < len(batches):
            indices = batches[state.batch_in_epoch]
            state.batch_in_epoch += 1
            if len(indices) < world:  # too small to give every process a unit
                continue
            batch = batcher.collate(indices[rank::world])
            yield {k: v.to(acc.device) for k, v in batch.items()}
        state.epoch += 1
        state.batch_in_epoch, state.segments = 0, []
