"""Learning-rate schedules as pure functions of the optimizer step.

``lr(step) = peak_lr * lr_multiplier(step, ...)``; ``step`` counts optimizer steps from 0
(the step about to be taken). With ``W`` warmup steps, ``N`` total steps and floor
``m = min_lr_ratio``:

- warmup (``step < W``): ``(step + 1) / W``
- after it, with progress ``p = (step - W) / max(1, N - W)`` in [0, 1]:
    - constant: ``1``
    - linear:   ``m + (1 - m) * (1 - p)``
    - cosine:   ``m + (1 - m) * (1 + cos(pi * p)) / 2``
- wsd (warmup-stable-decay): ``1`` until the last ``D = round(decay_ratio * N)`` steps,
  then ``decay(q)`` from 1 to m with ``q = (step - (N - D)) / D``
- infinite (Ibrahim et al. 2024): a cosine cooldown from 1 to ``c = const_lr_ratio`` over
  ``C = round(cooldown_ratio * N)`` steps after warmup, then ``c`` constant, then the
  last ``D`` steps anneal from c to m with ``decay``

where ``decay(q)`` (``decay_shape``) goes from 1 at q = 0 to 0 at q = 1, scaled onto
[m, start]: linear ``1 - q``, cosine ``(1 + cos(pi q)) / 2``, sqrt ``1 - sqrt(q)``.
"""

from __future__ import annotations

import math

SHAPES = {"linear": lambda q: 1.0 - q,
          "cosine": lambda q: 0.5 * (1.0 + math.cos(math.pi * q)),
          "sqrt": lambda q: 1.0 - math.sqrt(q)}


def warmup_steps(total_steps: int, steps: int, ratio: float) -> int:
    """Warmup length: ``steps`` when > 0, else ``round(ratio * total_steps)``."""
    return steps if steps > 0 else round(ratio * total_steps)


def _decay(step: int, start: int, length: int, high: float, low: float, shape: str) -> float:
    """From ``high`` at ``start`` to ``low`` at ``start + length`` (clamped after)."""
    q = min(1.0, max(0.0, (step - start) / max(1, length)))
    return low + (high - low) * SHAPES[shape](q)


def lr_multiplier(step: int, total_steps: int, warmup: int = 0, kind: str = "cosine",
                  min_lr_ratio: float = 0.0, decay_ratio: float = 0.1,
                  decay_shape: str = "linear", const_lr_ratio: float = 0.5,
                  cooldown_ratio: float = 0.3) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (see the module docstring)."""
    if step < warmup:
        return (step + 1) / warmup
    m, n = min_lr_ratio, total_steps
    if kind == "constant":
        return 1.0
    if kind in ("linear", "cosine"):
        return _decay(step, warmup, n - warmup, 1.0, m, kind)
    decay = round(decay_ratio * n)
    if kind == "wsd":
        return 1.0 if step < n - decay else _decay(step, n - decay, decay, 1.0, m, decay_shape)
    if kind == "infinite":
        if step >= n - decay:
            return _decay(step, n - decay, decay, const_lr_ratio, m, decay_shape)
        return _decay(step, warmup, round(cooldown_ratio * n), 1.0, const_lr_ratio, "cosine")
    raise ValueError(f"unknown schedule {kind!r}; expected constant, linear, cosine, wsd or "
                     "infinite")
