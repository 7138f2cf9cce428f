"""KTO (arXiv 2402.01306) as a training objective, over unpaired completions judged
desirable or not.

Each example ``i`` is a prompt ``x_i`` with its completion ``y_i`` and label, collated as
a pair whose second sequence is a *mismatched* completion ``y′_i`` (another example's,
fixed when the data is built: :mod:`leantune.data.preference_sets`) after ``x_i``. With
``r = ℓ_θ(y|x) − ℓ_ref(y|x)``, the KL baseline is the batch's mean over its mismatched
sequences, ``z₀ = max(0, mean_i r(x_i, y′_i))`` (averaged over processes while training,
as TRL gathers it; no gradient), and each completion's loss is
``w_d (1 − σ(β (r − z₀)))`` when desirable, ``w_u (1 − σ(β (z₀ − r)))`` when not
(:func:`~leantune.objectives.preference.kto`), summed over completions and normalized by
their count.

Held out, each evaluation batch's own KL estimate is used (processes hold different
numbers of eval batches, so no reduction over them): the held-out KTO loss depends on
``eval.batch_size`` and the process count, as TRL's evaluation loss depends on its eval
batches; the log-probs and rewards do not.

Where this differs from TRL's ``KTOTrainer``: TRL pairs each example with the previous
one's completion within its batch (``y′_i = y_{i−1}``, batches in data order); here the
mismatched completion is fixed per example from a seeded shuffle, so it does not depend
on how examples are batched (and a cached reference can hold its log-prob too). The KL
estimate is the same kind of mean over mismatched pairs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from leantune.model.logprobs import sequence_logprobs
from leantune.objectives.base import Objective, Tally
from leantune.objectives.preference import DEFAULTS, kto
from leantune.objectives.reference import Reference, as_reference, reference_logps


class KTOTally(Tally):
    """KTO's figures, with TRL's ``rewards/margins``: the desirable completions' mean
    reward less the undesirable ones'."""

    def means(self) -> dict[str, float]:
        out = super().means()
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


class KTOObjective(Objective):
    """KTO over collated (completion, mismatched completion) pairs with ``desirable``.

    Args:
        reference: where the reference's log-probs come from (as for
            :class:`~leantune.objectives.preference.PairObjective`).
        reduce: sums a tensor over processes (``accelerator.reduce(t, "sum")``); used for
            the KL baseline while training, when every process runs the same micro-batches.
    """

    name = "kto"
    unit = "completions"
    needs_reference = True

    def __init__(self, reference: Reference | None, chunked: bool = True,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 beta: float | None = None, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0):
        self.reference = as_reference(reference)
        if self.reference is None:
            raise ValueError("kto compares with a reference: give reference=")
        self.chunked, self.reduce = chunked, reduce
        self.knobs = {"beta": DEFAULTS["kto"]["beta"] if beta is None else beta,
                      "desirable_weight": desirable_weight,
                      "undesirable_weight": undesirable_weight}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["num_examples"]) // 2

    def new_tally(self) -> Tally:
        return KTOTally()

    def live_reference(self, batch: dict[str, torch.Tensor]) -> bool:
        return "ref_logps" not in batch

    def kl_baseline(self, mismatched: torch.Tensor, training: bool) -> torch.Tensor:
        """``mean r(x, y′)`` over this micro-batch (and every process's, while training)."""
        total = torch.stack([mismatched.detach().sum(),
                             torch.tensor(float(len(mismatched)), device=mismatched.device)])
        if training and self.reduce is not None:
            total = self.reduce(total)
        return total[0] / total[1].clamp(min=1)

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        sums, _ = sequence_logprobs(model, batch, self.chunked)
        ref = reference_logps(self.reference, model, batch, self.chunked)
        r = sums[0::2] - ref[0::2]
        kl = self.kl_baseline(sums[1::2] - ref[1::2], model.training)
        good = batch["desirable"].bool()
        beta = self.knobs["beta"]
        losses = kto(r, good, kl, **self.knobs)
        t = self.tally
        t.add("kl", kl.clamp(min=0).reshape(1))
        t.add("rewards/chosen", beta * r[good])
        t.add("rewards/rejected", beta * r[~good])
        t.add("logps/chosen", sums[0::2][good])
        t.add("logps/rejected", sums[0::2][~good])
        return losses.sum()
