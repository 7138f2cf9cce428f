"""How far two computations of the same numbers may differ by rounding alone: one table
for every check that compares two ways of computing a model's outputs (the packing
probe, the loss shortcuts' start-up check, shared-context choice scoring, the
future-token leak test of a loaded model).

Relative differences, per dtype the computation ran in:

=========  =======  ===========  =========
dtype      logits   summed loss  gradients
=========  =======  ===========  =========
float32    1e-4     1e-5         1e-4
half       3e-2     1e-3         2e-2
=========  =======  ===========  =========

Rounding itself stays one to three orders of magnitude below these (fp32 ~1e-7 to 1e-6;
bf16 up to ~1e-2 on logits through deep models), and the leaks they must catch are 1e-2
and up on models that cannot pack; the figures are in BENCHMARKS.md (the architecture
sweep).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    """Largest relative differences that are rounding, not a real difference."""

    logits: float
    loss: float
    grads: float


FP32 = Tolerance(logits=1e-4, loss=1e-5, grads=1e-4)
HALF = Tolerance(logits=3e-2, loss=1e-3, grads=2e-2)


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    """The table's row for a computation in ``dtype`` (anything but fp32 counts as half)."""
    return FP32 if dtype == torch.float32 else HALF
