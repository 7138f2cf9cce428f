"""Fast Forward (Rahamim et al., EMNLP 2024, arXiv 2409.04206): every ``interval``
optimizer steps, repeat the last update while a tiny held-out loss keeps falling.

With ``theta_t`` the trainable tensors after optimizer step ``t`` and
``delta = theta_t - theta_{t-1}`` (the step's update, in parameter space; LoRA's A and B
move separately), a stage tries ``theta_t + k * delta`` for k = 1, 2, ... and keeps the
largest k whose FF-set loss is still strictly lower (by more than ``min_improvement``)
than that of k - 1. The first k that is not better is reverted: the stage ends at the best
point it saw (the reference implementation keeps the worsening step). Each candidate is
computed from ``theta_t`` as ``theta_t + k * delta`` rather than by repeated addition, so
a revert restores the accepted point exactly.

Only trainable tensors move; optimizer moments and the LR schedule clock are untouched.
Under gradient accumulation ``delta`` is one optimizer step's update; under DDP every
process holds the same parameters and :func:`~leantune.evaluate.evaluate` reduces the
FF-set loss over processes, so every process takes the same decisions.

Cost ledger, kept apart from training: each FF-set evaluation is one forward over the set
(the stage's first evaluation measures ``theta_t`` itself), and each candidate written is
one add per trainable parameter.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from leantune.config import FastForwardConfig


@dataclass
class StageResult:
    """One FF stage: ``accepted`` steps kept, and the FF-set losses it measured
    (``losses[0]`` at the start, then one per candidate)."""

    accepted: int
    losses: list[float]

    @property
    def evaluations(self) -> int:
        return len(self.losses)

    @property
    def writes(self) -> int:
        """Candidates written, plus the revert when the stage ended on a rejected one."""
        return self.evaluations - 1 + (self.accepted < self.evaluations - 1)

    @property
    def loss_before(self) -> float:
        return self.losses[0]

    @property
    def loss_after(self) -> float:
        return min(self.losses)


@torch.no_grad()
def run_stage(params: list[torch.Tensor], delta: list[torch.Tensor], loss_fn: Callable[[], float],
              max_steps: int, min_improvement: float = 0.0,
              on_accept: Callable[[int], bool] | None = None) -> StageResult:
    """Move ``params`` (in place) along ``delta`` while ``loss_fn()`` keeps falling.

    Args:
        params: the trainable tensors, at ``theta_t``.
        delta: their last update, same shapes.
        loss_fn: the FF-set loss at the current ``params``.
        max_steps: most steps accepted (a safety bound).
        min_improvement: a step must lower the loss by more than this to be kept.
        on_accept: called with the count after each accepted step; True ends the stage
            there (a benchmark stops once its target is met).
    """
    anchor = [p.detach().clone() for p in params]
    losses = [loss_fn()]
    best, accepted = losses[0], 0
    while accepted < max_steps:
        _set(params, anchor, delta, accepted + 1)
        losses.append(loss_fn())
        if not losses[-1] < best - min_improvement:
            _set(params, anchor, delta, accepted)  # revert the step that did not help
            break
        best, accepted = losses[-1], accepted + 1
        if on_accept is not None and on_accept(accepted):
            break
    return StageResult(accepted, losses)


def _set(params: list[torch.Tensor], anchor: list[torch.Tensor], delta: list[torch.Tensor],
         k: int) -> None:
    for p, a, d in zip(params, anchor, delta):
        torch.add(a, d, alpha=k, out=p.data)


def stage_due(step: int, burn_in: int, interval: int) -> bool:
    """Whether an FF stage follows optimizer step ``step`` (1-based): after steps
    ``burn_in + interval``, ``burn_in + 2 * interval``, ..."""
    return step > burn_in and (step - burn_in) % interval == 0


@dataclass
class FastForward:
    """Fast Forward inside a training loop: :meth:`before_step` keeps ``theta_{t-1}`` when
    a stage will follow step ``t``, :meth:`after_step` runs that stage.

    ``loss_fn`` measures the FF-set loss; ``eval_flops`` is what one such measurement
    costs (a forward over the FF set).
    """

    cfg: FastForwardConfig
    params: list[torch.Tensor]
    loss_fn: Callable[[], float]
    eval_flops: int
    on_accept: Callable[[int], bool] | None = None
    _before: list[torch.Tensor] | None = field(default=None, repr=False)

    def before_step(self, step: int) -> None:
        """Call before optimizer step ``step`` (1-based)."""
        if stage_due(step, self.cfg.burn_in, self.cfg.interval):
            self._before = [p.detach().clone() for p in self.params]

    @property
    def pending(self) -> bool:
        """Whether a stage follows the step just taken."""
        return self._before is not None

    def after_step(self) -> dict | None:
        """Call after the optimizer step: the stage's record, or None if none was due."""
        if self._before is None:
            return None
        tick = time.perf_counter()
        delta, self._before = self._before, None
        for d, p in zip(delta, self.params):  # d = theta_t - theta_{t-1}, in the kept buffer
            d.neg_().add_(p.detach())
        stage = run_stage(self.params, delta, self.loss_fn, self.cfg.max_steps_per_stage,
                          self.cfg.min_improvement, self.on_accept)
        numel = sum(p.numel() for p in self.params)
        return {"ff_accepted": stage.accepted, "ff_loss_before": stage.loss_before,
                "ff_loss_after": stage.loss_after, "ff_evaluations": stage.evaluations,
                "ff_flops": stage.evaluations * self.eval_flops + stage.writes * numel,
                "ff_seconds": time.perf_counter() - tick}
