"""Learning-rate schedules as pure functions of the optimizer step.

``lr(step) = peak_lr * schedule(step)``; ``step`` counts optimizer steps from 0 (the step
about to be taken). With ``W`` warmup steps, ``N`` total steps and floor
``m = min_lr_ratio``:

- warmup (``step < W``): ``(step + 1) / W``
- after it, with progress ``p = (step - W) / max(1, N - W)`` in [0, 1]:
    - constant: ``1``
    - linear:   ``m + (1 - m) * (1 - p)``
    - cosine:   ``m + (1 - m) * (1 + cos(pi * p)) / 2``
- wsd (warmup-stable-decay): ``1`` until the last ``D`` steps, then ``decay(q)`` from 1
  to m with ``q = (step - (N - D)) / D``
- infinite (Ibrahim et al. 2024, arXiv 2403.08763): a cosine cooldown from 1 to
  ``c = const_lr_ratio`` over ``C`` steps after warmup, then ``c`` constant, then the last
  ``D`` steps anneal from c to m with ``decay`` (``D = 0``: constant to the end, so the
  run can be resumed with more steps and its past LRs do not move)
- anneal (``anneal_at = s0``, from a checkpoint, any kind): from ``s0`` on, ``decay``
  from the multiplier the checkpoint trained at (``anneal_start``) to m at ``N``

where ``decay(q)`` (``decay_shape``) goes from 1 at q = 0 to 0 at q = 1, scaled onto
[m, start]: linear ``1 - q``, cosine ``(1 + cos(pi q)) / 2``, sqrt ``1 - sqrt(q)``.
``W``, ``C`` and ``D`` are given in steps, or as ratios of ``N`` (``schedule.*_ratio``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from leantune.config import ScheduleConfig

SHAPES = {"linear": lambda q: 1.0 - q,
          "cosine": lambda q: 0.5 * (1.0 + math.cos(math.pi * q)),
          "sqrt": lambda q: 1.0 - math.sqrt(q)}
KINDS = ("constant", "linear", "cosine", "wsd", "infinite")


def steps_or_ratio(steps: int, ratio: float, total: int) -> int:
    """A phase length: ``steps`` when > 0, else ``round(ratio * total)``."""
    return steps if steps > 0 else round(ratio * total)


def _decay(step: int, start: int, length: int, high: float, low: float, shape: str) -> float:
    """From ``high`` at ``start`` to ``low`` at ``start + length`` (clamped after)."""
    q = min(1.0, max(0.0, (step - start) / max(1, length)))
    return low + (high - low) * SHAPES[shape](q)


@dataclass(frozen=True)
class Schedule:
    """The LR multiplier of every optimizer step: ``schedule(step) -> float``.

    Attributes:
        kind: constant | linear | cosine | wsd | infinite.
        total: ``N``, the run's optimizer steps.
        warmup, cooldown, decay: phase lengths in steps (``W``, ``C``, ``D``).
        anneal_at: the step a run annealed from a checkpoint starts at (``s0``), or None.
        anneal_start: the multiplier at ``anneal_at`` (the checkpoint's LR / peak).
    """

    kind: str = "cosine"
    total: int = 1
    warmup: int = 0
    min_ratio: float = 0.0
    decay: int = 0
    decay_shape: str = "linear"
    const_ratio: float = 0.5
    cooldown: int = 0
    anneal_at: int | None = None
    anneal_start: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown schedule {self.kind!r}; expected {', '.join(KINDS)}")

    @classmethod
    def of(cls, cfg: ScheduleConfig, total: int, anneal_at: int | None = None,
           anneal_start: float = 1.0) -> Schedule:
        """The schedule ``cfg`` describes for a run of ``total`` steps."""
        return cls(cfg.kind, total, steps_or_ratio(cfg.warmup_steps, cfg.warmup_ratio, total),
                   cfg.min_lr_ratio, steps_or_ratio(cfg.decay_steps, cfg.decay_ratio, total),
                   cfg.decay_shape, cfg.const_lr_ratio,
                   steps_or_ratio(cfg.cooldown_steps, cfg.cooldown_ratio, total),
                   anneal_at, anneal_start)

    def __call__(self, step: int) -> float:
        m, n = self.min_ratio, self.total
        if self.anneal_at is not None and step >= self.anneal_at:
            return _decay(step, self.anneal_at, n - self.anneal_at, self.anneal_start, m,
                          self.decay_shape)
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind in ("linear", "cosine"):
            return _decay(step, self.warmup, n - self.warmup, 1.0, m, self.kind)
        if self.kind == "wsd":
            start = n - self.decay
            return 1.0 if step < start else _decay(step, start, self.decay, 1.0, m,
                                                   self.decay_shape)
        if self.decay and step >= n - self.decay:  # infinite: the final anneal
            return _decay(step, n - self.decay, self.decay, self.const_ratio, m, self.decay_shape)
        return _decay(step, self.warmup, self.cooldown, 1.0, self.const_ratio, "cosine")

    def values(self) -> list[float]:
        """The multiplier of every step of the run, ``[self(0), ..., self(total - 1)]``."""
        return [self(s) for s in range(self.total)]
