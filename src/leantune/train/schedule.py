"""Learning-rate schedules as pure functions of the optimizer step.

``lr(step) = peak_lr * lr_multiplier(step, ...)``; ``step`` counts optimizer steps from 0
(the step about to be taken). With ``W`` warmup steps, ``N`` total steps and floor
``m = min_lr_ratio``:

- warmup (``step < W``): ``(step + 1) / W``
- after it, with progress ``p = (step - W) / max(1, N - W)`` in [0, 1]:
    - constant: ``1``
    - linear:   ``m + (1 - m) * (1 - p)``
    - cosine:   ``m + (1 - m) * (1 + cos(pi * p)) / 2``
"""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, steps: int, ratio: float) -> int:
    """Warmup length: ``steps`` when > 0, else ``round(ratio * total_steps)``."""
    return steps if steps > 0 else round(ratio * total_steps)


def lr_multiplier(step: int, total_steps: int, warmup: int = 0, kind: str = "cosine",
                  min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (see the module docstring)."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if kind == "linear":
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)
    if kind == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}; expected constant, linear or cosine")
