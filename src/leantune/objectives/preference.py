"""The preference losses, per pair, from summed completion log-probabilities.

For a prompt ``x`` with completions ``y_c`` (chosen) and ``y_r`` (rejected): ``ℓ`` is a
completion's summed log-probability under the policy, ``|y|`` its tokens, ``ℓ̄ = ℓ / |y|``,
``r = ℓ − ℓ_ref`` (the reference's log-probability subtracted) and ``Δ = r_c − r_r``:

=========  ====================================================  =========================
loss       per pair                                              paper
=========  ====================================================  =========================
DPO        ``−log σ(β Δ)``                                       arXiv 2305.18290
IPO        ``(r_c/|y_c| − r_r/|y_r| − 1/(2β))²``                 arXiv 2310.12036
SimPO      ``−log σ(β (ℓ̄_c − ℓ̄_r) − γ)``, no reference           arXiv 2405.14734
ORPO       ``−ℓ̄_c − λ log σ(log odds(ℓ̄_c) − log odds(ℓ̄_r))``    arXiv 2403.07691
KTO        desirable ``w_d (1 − σ(β (r − z₀)))``,                arXiv 2402.01306
           undesirable ``w_u (1 − σ(β (z₀ − r)))``
=========  ====================================================  =========================

with ``log odds(p) = log p − log(1 − p)`` taken at ``log p = ℓ̄`` (computed as
``ℓ̄ − log(1 − exp ℓ̄)``, stable near 0), and KTO's baseline ``z₀ = max(0, mean r(x, y′))``
over completions paired with another example's prompt (its KL estimate; no gradient).

IPO divides by completion length as TRL does (the IPO authors' normalized form). Where
ours differs from TRL's: ORPO's NLL term is each pair's mean token NLL of the chosen
completion, summed over pairs and divided by the pairs. TRL's ``ORPOTrainer`` averages
it over every chosen token of a batch, prompt tokens included; the completion alone is
the ORPO paper's SFT term (and what leantune's SFT trains on), and per pair keeps the
loss independent of how pairs are batched, accumulated and packed, as every leantune
objective is (:mod:`leantune.objectives.base`). Where chosen completions have equal
lengths and the prompt is left out, the two agree. An optional ``nll`` weight adds
``nll · (−ℓ̄_c)`` to DPO and IPO (RPO, arXiv 2404.19733: against the chosen completion's
likelihood falling), off by default.

:func:`rewards` gives the per-pair figures TRL logs under ``rewards/*`` and ``logps/*``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from leantune.model.logprobs import sequence_logprobs
from leantune.objectives.base import Objective
from leantune.objectives.reference import Reference, as_reference, reference_logps

# The published defaults: DPO and IPO β 0.1 (TRL), SimPO β 2.0 and γ 1.0 (γ/β 0.5, the
# SimPO paper's Llama-3 range), ORPO λ 0.1 (the ORPO paper), KTO β 0.1 with weights 1.
DEFAULTS = {"dpo": {"beta": 0.1}, "ipo": {"beta": 0.1}, "simpo": {"beta": 2.0, "gamma": 1.0},
            "orpo": {"beta": 0.1}, "kto": {"beta": 0.1}}


@dataclass
class PairLogps:
    """Per pair ``[P]``: summed completion log-probs of the policy and (where the loss
    uses one) the reference, and the completions' token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    def margins(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r_c, r_r)``: log-ratios to the reference."""
        if self.ref_chosen is None or self.ref_rejected is None:
            raise ValueError("this loss compares with a reference: ref_chosen / ref_rejected")
        return self.chosen - self.ref_chosen, self.rejected - self.ref_rejected

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ℓ̄_c, ℓ̄_r)``: per-token mean log-probs."""
        return (self.chosen / self.chosen_tokens.clamp(min=1),
                self.rejected / self.rejected_tokens.clamp(min=1))


def dpo(p: PairLogps, beta: float = 0.1, nll: float = 0.0) -> torch.Tensor:
    """``−log σ(β Δ)`` per pair (+ ``nll · (−ℓ̄_c)``)."""
    rc, rr = p.margins()
    return -F.logsigmoid(beta * (rc - rr)) + nll * -p.means()[0]


def ipo(p: PairLogps, beta: float = 0.1, nll: float = 0.0) -> torch.Tensor:
    """``(r_c/|y_c| − r_r/|y_r| − 1/(2β))²`` per pair (+ ``nll · (−ℓ̄_c)``)."""
    rc, rr = p.margins()
    delta = rc / p.chosen_tokens.clamp(min=1) - rr / p.rejected_tokens.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2 + nll * -p.means()[0]


def simpo(p: PairLogps, beta: float = 2.0, gamma: float = 1.0) -> torch.Tensor:
    """``−log σ(β (ℓ̄_c − ℓ̄_r) − γ)`` per pair; no reference."""
    mc, mr = p.means()
    return -F.logsigmoid(beta * (mc - mr) - gamma)


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 − p))`` at ``log p = mean_logp`` (< 0), stable as p approaches 1:
    ``log(1 − p) = log(−expm1(log p))``."""
    return mean_logp - torch.log(-torch.expm1(mean_logp))


def orpo(p: PairLogps, beta: float = 0.1) -> torch.Tensor:
    """``−ℓ̄_c − λ log σ(log odds(ℓ̄_c) − log odds(ℓ̄_r))`` per pair, ``λ = beta``."""
    mc, mr = p.means()
    return -mc - beta * F.logsigmoid(log_odds(mc.float()) - log_odds(mr.float()))


def kto(logratios: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
        beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
        ) -> torch.Tensor:
    """KTO per completion ``[N]``: ``logratios`` ``r = ℓ − ℓ_ref``, ``desirable`` the
    labels (bool), ``kl`` the batch's baseline estimate ``mean r(x, y′)`` (clamped at 0,
    no gradient)."""
    z0 = kl.detach().clamp(min=0)
    good = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios)))
    return torch.where(desirable, good, bad)


def rewards(p: PairLogps, beta: float, normalized: bool = False) -> dict[str, torch.Tensor]:
    """TRL's per-pair figures: ``rewards/chosen`` ``β r_c``, ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracies`` (chosen above rejected), ``logps/chosen``,
    ``logps/rejected``. Without a reference (``normalized``: SimPO and ORPO, whose implicit
    reward is length-normalized) the log-probs are per-token means ``ℓ̄`` and the rewards
    ``β ℓ̄``, as TRL's CPO and ORPO trainers log them."""
    if normalized:
        lc, lr = p.means()
        rc, rr = lc, lr
    else:
        lc, lr = p.chosen, p.rejected
        rc, rr = p.margins() if p.ref_chosen is not None else (lc, lr)
    chosen, rejected = (beta * rc).detach(), (beta * rr).detach()
    return {"rewards/chosen": chosen, "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected,
            "rewards/accuracies": (chosen > rejected).float(),
            "logps/chosen": lc.detach(), "logps/rejected": lr.detach()}


LOSSES = {"dpo": dpo, "ipo": ipo, "simpo": simpo, "orpo": orpo}
WITH_REFERENCE = ("dpo", "ipo")


class PairObjective(Objective):
    """DPO, IPO, SimPO or ORPO as a training objective over batches of pairs: examples
    ``2i`` (chosen) and ``2i + 1`` (rejected) of a collated batch share their prompt, in
    any layout (padded or packed: :func:`~leantune.model.logprobs.sequence_logprobs`).
    The loss is summed over pairs and normalized by their count.

    Args:
        reference: for DPO and IPO, where the reference's log-probs come from
            (:mod:`leantune.objectives.reference`; a context factory such as
            :meth:`~leantune.adapters.base.Adapter.disabled` is taken as ``adapter_off``).
            A batch that carries ``ref_logps`` (a cached reference) needs none.
        knobs: the loss's own settings (``beta``, SimPO's ``gamma``, DPO/IPO's ``nll``).
    """

    unit = "pairs"

    def __init__(self, kind: str, reference: Reference | None = None, chunked: bool = True,
                 **knobs: float):
        if kind not in LOSSES:
            raise ValueError(f"unknown pair loss {kind!r}; expected one of {sorted(LOSSES)}")
        self.name, self.knobs, self.chunked = kind, DEFAULTS[kind] | knobs, chunked
        self.needs_reference = kind in WITH_REFERENCE
        self.reference = as_reference(reference)
        if self.needs_reference and self.reference is None:
            raise ValueError(f"{kind} compares with a reference: give reference=")

    def live_reference(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether this batch costs a reference forward (none when it carries its own)."""
        return self.needs_reference and "ref_logps" not in batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["num_examples"]) // 2

    def pair_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> PairLogps:
        """The batch's pairs: policy log-probs (with gradient) and the reference's."""
        sums, counts = sequence_logprobs(model, batch, self.chunked)
        ref = (None, None)
        if self.needs_reference:
            ref_sums = reference_logps(self.reference, model, batch, self.chunked)
            ref = (ref_sums[0::2], ref_sums[1::2])
        return PairLogps(sums[0::2], sums[1::2], counts[0::2], counts[1::2], *ref)

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        p = self.pair_logps(model, batch)
        figures = rewards(p, self.knobs["beta"], normalized=not self.needs_reference)
        for key, value in figures.items():
            self.tally.add(key, value)  # means over pairs: TRL's rewards/* and logps/*
        if self.name == "orpo":  # ORPO's two terms, as TRL's ORPOTrainer logs them
            mc, mr = p.means()
            self.tally.add("nll_loss", -mc.detach())
            self.tally.add("log_odds_ratio", F.logsigmoid(log_odds(mc.float().detach())
                                                          - log_odds(mr.float().detach())))
        # Whether the model itself ranks chosen first (no reference): comparable before
        # training, when every reward margin is 0, and between objectives.
        self.tally.add("logps/accuracies", (p.chosen > p.rejected).float())
        return LOSSES[self.name](p, **self.knobs).sum()
