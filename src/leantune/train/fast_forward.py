"""Fast Forward (Rahamim et al., EMNLP 2024, arXiv 2409.04206): every ``interval``
optimizer steps, repeat the last update while a tiny held-out loss keeps falling.

With ``theta_t`` the trainable tensors after optimizer step ``t`` and
``delta = theta_t - theta_{t-1}`` (the step's update, in parameter space; LoRA's A and B
move separately), a stage tries ``theta_t + k * delta`` for k = 1, 2, ... and keeps the
largest k whose FF-set loss is still strictly lower (by more than ``min_improvement``)
than that of k - 1, **and** lower on each half of the FF set. The first k that is not
better is reverted: the stage ends at the best point it saw (the reference
implementation keeps the worsening step). Each candidate is
computed from ``theta_t`` as ``theta_t + k * delta`` rather than by repeated addition, so
a revert restores the accepted point exactly.

Only trainable tensors move; optimizer moments and the LR schedule clock are untouched.
Under gradient accumulation ``delta`` is one optimizer step's update; under DDP every
process holds the same parameters and :func:`~leantune.eval.loss.evaluate` reduces the
FF-set loss over processes, so every process takes the same decisions.

Three rules bound what a tiny FF set can do, by construction rather than by tuning:

- **Both halves must agree.** The FF set is split in two halves of about equal target
  tokens; a step is kept only if each half's loss falls. Late in a decayed schedule the
  update is tiny and the FF-set loss along it is flat, so a lone 32-example mean keeps
  "improving" on noise for up to ``max_steps_per_stage`` steps, moving the model to the
  FF set's minimum rather than the data's; where the halves disagree, the gain is noise
  and the stage stops.
- **A stage runs only where an evaluation is cheap next to a step.** An accepted FF step
  moves the model about as far as the optimizer step it repeats, so when one FF-set
  evaluation (``e``) costs more than ``max_eval_cost`` (0.5) of that step's FLOPs ``F``,
  no FF step can save what it costs and the stage is skipped (SmolLM2's quickstart:
  4-example steps, an FF set of 8, ``e ~ F``).
- **A stage never costs more than ``max_cost`` times the training it follows.** With
  ``F`` the FLOPs of the optimizer step just taken and ``e`` those of one FF-set
  evaluation (plus its parameter write), a stage makes at most
  ``floor(max_cost * interval * F / e)`` evaluations, and none at all when that is
  under 2 (the opening one and one candidate). Since stages come every ``interval``
  steps, Fast Forward's FLOPs never exceed ``max_cost`` times the training FLOPs
  (``max_cost`` 1: at most half the run's compute).

Cost ledger, kept apart from training: each FF-set evaluation is one forward over the set
(the stage's first evaluation measures ``theta_t`` itself), and each candidate written is
one add per trainable parameter.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from leantune.config import FastForwardConfig
from leantune.objectives import Objective
from leantune.objectives.base import Tally

log = logging.getLogger(__name__)


class FFLoss(NamedTuple):
    """The FF-set loss (token-weighted over the whole set) and each part's (its halves)."""

    loss: float
    parts: tuple[float, ...]


def as_ff_loss(value: float | FFLoss) -> FFLoss:
    return value if isinstance(value, FFLoss) else FFLoss(float(value), (float(value),))


@dataclass
class StageResult:
    """One FF stage: ``accepted`` steps kept, the FF-set losses it measured (``losses[0]``
    at the start, then one per candidate), and why it ``stopped``: ``worse`` (the set's
    loss did not fall), ``disagree`` (it fell but a half's did not), ``max_steps``,
    ``cost`` (the evaluation budget), ``target`` (``on_accept`` said so) or ``skipped``
    (the budget allowed no candidate)."""

    accepted: int
    losses: list[float]
    stopped: str = "worse"

    @property
    def evaluations(self) -> int:
        return len(self.losses)

    @property
    def writes(self) -> int:
        """Candidates written, plus the revert when the stage ended on a rejected one."""
        return max(self.evaluations - 1, 0) + (self.accepted < self.evaluations - 1)

    @property
    def loss_before(self) -> float:
        return self.losses[0] if self.losses else math.nan

    @property
    def loss_after(self) -> float:
        return min(self.losses) if self.losses else math.nan


@torch.no_grad()
def run_stage(params: list[torch.Tensor], delta: list[torch.Tensor],
              loss_fn: Callable[[], float | FFLoss], max_steps: int,
              min_improvement: float = 0.0, on_accept: Callable[[int], bool] | None = None,
              max_evaluations: int | None = None) -> StageResult:
    """Move ``params`` (in place) along ``delta`` while ``loss_fn()`` keeps falling.

    Args:
        params: the trainable tensors, at ``theta_t``.
        delta: their last update, same shapes.
        loss_fn: the FF-set loss at the current ``params``: a float, or an
            :class:`FFLoss` whose every part must fall too for a step to be kept.
        max_steps: most steps accepted (a safety bound).
        min_improvement: a step must lower the loss (and each part's) by more than this
            to be kept.
        on_accept: called with the count after each accepted step; True ends the stage
            there (a benchmark stops once its target is met).
        max_evaluations: most calls of ``loss_fn`` (the opening one included); under 2
            the stage is skipped and ``params`` stay as they are.
    """
    if max_evaluations is not None and max_evaluations < 2:
        return StageResult(0, [], "skipped")
    anchor = [p.detach().clone() for p in params]
    best = as_ff_loss(loss_fn())
    losses, accepted, stopped = [best.loss], 0, "max_steps"
    while accepted < max_steps:
        if max_evaluations is not None and len(losses) >= max_evaluations:
            stopped = "cost"
            break
        _set(params, anchor, delta, accepted + 1)
        now = as_ff_loss(loss_fn())
        losses.append(now.loss)
        fell = now.loss < best.loss - min_improvement
        if not (fell and all(a < b - min_improvement for a, b in zip(now.parts, best.parts))):
            _set(params, anchor, delta, accepted)  # revert the step that did not help
            stopped = "disagree" if fell else "worse"
            break
        best, accepted = now, accepted + 1
        if on_accept is not None and on_accept(accepted):
            stopped = "target"
            break
    return StageResult(accepted, losses, stopped)


def _set(params: list[torch.Tensor], anchor: list[torch.Tensor], delta: list[torch.Tensor],
         k: int) -> None:
    for p, a, d in zip(params, anchor, delta):
        torch.add(a, d, alpha=k, out=p.data)


def stage_due(step: int, burn_in: int, interval: int) -> bool:
    """Whether an FF stage follows optimizer step ``step`` (1-based): after steps
    ``burn_in + interval``, ``burn_in + 2 * interval``, ..."""
    return step > burn_in and (step - burn_in) % interval == 0


def ff_set_size(cfg: FastForwardConfig, examples_per_step: int) -> int:
    """``fast_forward.eval_examples``, or when it is None, the paper's ratio of FF set to
    optimizer step (32 to 512 sequences, 1:16) held between 8 and 32:
    ``clamp(ceil(examples_per_step / 16), 8, 32)``."""
    if cfg.eval_examples is not None:
        return cfg.eval_examples
    return min(max(math.ceil(examples_per_step / 16), 8), 32)


def split_halves(examples: Sequence, target_tokens: Callable[[object], int] | None = None
                 ) -> list[list]:
    """Two halves of about equal target tokens (``target_tokens(example)``, default
    ``Encoded.num_targets``; alternating down the sorted list); one part when there is a
    single example."""
    target_tokens = target_tokens or (lambda e: e.num_targets)
    ranked = sorted(examples, key=target_tokens, reverse=True)
    halves = [ranked[0::2], ranked[1::2]]
    return [h for h in halves if h]


def halves_loss(parts: list[list], measure: Callable[[list], dict],
                objective: Objective | None = None,
                means: Callable[[Tally], dict[str, float]] = Tally.means
                ) -> Callable[[], FFLoss]:
    """An FF loss function over ``parts``: ``measure(examples)`` gives ``{"loss",
    "target_tokens"}`` (:func:`~leantune.eval.loss.evaluate`); the whole set's loss is the
    parts' count-weighted mean, so it equals one evaluation of the whole set.

    A preference ``objective`` that measures the chosen completions' log-probs
    (``logps/chosen``) adds their negated mean as one more part: a step that lowers the
    loss while the chosen completions grow less likely (likelihood displacement) is not
    kept. ``means`` turns the tally into figures (over every process: each must decide
    alike)."""

    def loss() -> FFLoss:
        with (objective.separate_tally() if objective is not None else nullcontext()) as tally:
            results = [measure(p) for p in parts]
        tokens = sum(r["target_tokens"] for r in results)
        whole = sum(r["loss"] * r["target_tokens"] for r in results) / max(tokens, 1)
        chosen = means(tally).get("logps/chosen") if tally is not None else None
        guard = () if chosen is None else (-chosen,)
        return FFLoss(whole, tuple(r["loss"] for r in results) + guard)

    return loss


@dataclass
class FastForward:
    """Fast Forward inside a training loop: :meth:`before_step` keeps ``theta_{t-1}`` when
    a stage will follow step ``t``, :meth:`after_step` runs that stage.

    ``loss_fn`` measures the FF-set loss (a float or an :class:`FFLoss`); ``eval_flops``
    is what one such measurement costs (a forward over the FF set).
    """

    cfg: FastForwardConfig
    params: list[torch.Tensor]
    loss_fn: Callable[[], float | FFLoss]
    eval_flops: int
    on_accept: Callable[[int], bool] | None = None
    _before: list[torch.Tensor] | None = field(default=None, repr=False)
    _warned: bool = field(default=False, repr=False)

    @property
    def numel(self) -> int:
        """Trainable scalars: what one candidate write costs."""
        return sum(p.numel() for p in self.params)

    def before_step(self, step: int) -> None:
        """Call before optimizer step ``step`` (1-based)."""
        if stage_due(step, self.cfg.burn_in, self.cfg.interval):
            self._before = [p.detach().clone() for p in self.params]

    @property
    def pending(self) -> bool:
        """Whether a stage follows the step just taken."""
        return self._before is not None

    def budget(self, step_flops: int | None) -> int | None:
        """Most FF-set evaluations a stage may make after a step of ``step_flops``:
        ``floor(max_cost * interval * step_flops / (eval_flops + numel))``, and 0 when one
        evaluation costs more than ``max_eval_cost * step_flops``; None (no bound) when
        the step's FLOPs are not given or both settings are None."""
        if step_flops is None:
            return None
        per_eval = self.eval_flops + self.numel
        limit = self.cfg.max_eval_cost
        if limit is not None and per_eval > limit * step_flops:
            if not self._warned:
                self._warned = True
                log.warning(
                    "Fast Forward: one FF-set evaluation costs %.2f of a training step (more "
                    "than fast_forward.max_eval_cost=%g), so no FF step could pay for itself "
                    "and stages are skipped; a larger train.batch_size or train.grad_accum "
                    "lets them run", per_eval / max(step_flops, 1), limit)
            return 0
        if self.cfg.max_cost is None:
            return None
        return math.floor(self.cfg.max_cost * self.cfg.interval * step_flops / per_eval)

    def after_step(self, step_flops: int | None = None) -> dict | None:
        """Call after the optimizer step, with its training FLOPs (all processes), which
        set the stage's budget: the stage's record, or None if none was due."""
        if self._before is None:
            return None
        tick = time.perf_counter()
        delta, self._before = self._before, None
        for d, p in zip(delta, self.params):  # d = theta_t - theta_{t-1}, in the kept buffer
            d.neg_().add_(p.detach())
        budget = self.budget(step_flops)
        stage = run_stage(self.params, delta, self.loss_fn, self.cfg.max_steps_per_stage,
                          self.cfg.min_improvement, self.on_accept, budget)
        return {"ff_accepted": stage.accepted, "ff_loss_before": stage.loss_before,
                "ff_loss_after": stage.loss_after, "ff_evaluations": stage.evaluations,
                "ff_stopped": stage.stopped, "ff_budget": budget,
                "ff_flops": stage.evaluations * self.eval_flops + stage.writes * self.numel,
                "ff_seconds": time.perf_counter() - tick}
