"""The preference losses against their formulas computed independently in float64 on
plain numbers, against TRL's own loss code where TRL has it as a function of the
log-probabilities (CPO's SimPO, ORPO's odds ratio), and DPO's fixed point: log 2 when
the policy is the reference."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from leantune.objectives.preference import PairLogps, dpo, ipo, kto, log_odds, orpo, rewards, simpo


def pairs(seed: int = 0, n: int = 6, reference: bool = True) -> PairLogps:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 30, (2, n), generator=g).double()
    logps = -torch.rand(2, n, generator=g, dtype=torch.float64) * tokens * 3
    ref = -torch.rand(2, n, generator=g, dtype=torch.float64) * tokens * 3
    return PairLogps(logps[0], logps[1], tokens[0], tokens[1],
                     *(ref if reference else (None, None)))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dpo_is_log_2_where_the_policy_is_the_reference():
    p = pairs()
    same = PairLogps(p.chosen, p.rejected, p.chosen_tokens, p.rejected_tokens,
                     p.chosen.clone(), p.rejected.clone())
    assert torch.equal(dpo(same, beta=0.1), torch.full((6,), math.log(2), dtype=torch.float64))


def test_each_loss_equals_its_formula():
    p, beta, gamma, nll = pairs(), 0.3, 0.7, 0.5
    for i in range(6):
        c, r, nc, nr = (float(t[i]) for t in (p.chosen, p.rejected, p.chosen_tokens,
                                              p.rejected_tokens))
        rc, rr = c - float(p.ref_chosen[i]), r - float(p.ref_rejected[i])
        assert float(dpo(p, beta)[i]) == pytest.approx(-math.log(sig(beta * (rc - rr))))
        assert float(dpo(p, beta, nll)[i]) == pytest.approx(
            -math.log(sig(beta * (rc - rr))) - nll * c / nc)
        assert float(ipo(p, beta)[i]) == pytest.approx((rc / nc - rr / nr - 1 / (2 * beta)) ** 2)
        assert float(simpo(p, beta, gamma)[i]) == pytest.approx(
            -math.log(sig(beta * (c / nc - r / nr) - gamma)))
        pc, pr = math.exp(c / nc), math.exp(r / nr)  # per-token probabilities
        odds = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
        assert float(orpo(p, beta)[i]) == pytest.approx(-c / nc - beta * math.log(sig(odds)))


def test_log_odds_stays_finite_near_certainty():
    near = torch.tensor([-1e-9, -1e-4, -0.5, -20.0], dtype=torch.float64)
    direct = [math.log(math.exp(x) / (1 - math.exp(x))) for x in near.tolist()]
    assert log_odds(near).tolist() == pytest.approx(direct, rel=1e-6)
    assert torch.isfinite(log_odds(torch.tensor([-1e-7], dtype=torch.float32))).all()


def test_kto_uses_a_clamped_baseline_and_the_label_weights():
    r = torch.tensor([0.5, -0.2, 1.0, -1.5], dtype=torch.float64)
    good = torch.tensor([True, True, False, False])
    for kl in (0.3, -0.4):  # a negative estimate counts as 0
        z0 = max(kl, 0.0)
        got = kto(r, good, torch.tensor(kl, dtype=torch.float64), beta=0.2,
                  desirable_weight=1.5, undesirable_weight=0.5)
        want = [1.5 * (1 - sig(0.2 * (x - z0))) if g else 0.5 * (1 - sig(0.2 * (z0 - x)))
                for x, g in zip(r.tolist(), good.tolist())]
        assert got.tolist() == pytest.approx(want)


def test_rewards_carry_trls_names_and_values():
    p = pairs()
    got = rewards(p, beta=0.1)
    assert set(got) == {"rewards/chosen", "rewards/rejected", "rewards/margins",
                        "rewards/accuracies", "logps/chosen", "logps/rejected"}
    rc, rr = p.margins()
    torch.testing.assert_close(got["rewards/margins"], 0.1 * (rc - rr))
    assert got["rewards/accuracies"].tolist() == (rc > rr).double().tolist()
    # reference-free (SimPO, ORPO): per-token means, β ℓ̄, as TRL's CPO and ORPO trainers log
    free = rewards(pairs(reference=False), beta=2.0, normalized=True)
    mean = pairs().means()[0]
    torch.testing.assert_close(free["rewards/chosen"], 2.0 * mean)
    torch.testing.assert_close(free["logps/chosen"], mean)


def _trl(cls_path: str):
    pytest.importorskip("trl")
    import importlib

    module, name = cls_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def test_simpo_equals_trls_cpo_simpo_loss():
    cpo = _trl("trl.experimental.cpo.CPOTrainer")
    p = pairs(reference=False)
    mc, mr = p.means()
    self = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.7, beta=2.0,
                           label_smoothing=0.0, accelerator=SimpleNamespace(device="cpu"))
    theirs = cpo.cpo_loss(self, mc, mr)[0]
    torch.testing.assert_close(simpo(p, beta=2.0, gamma=0.7), theirs)


def test_orpos_odds_ratio_term_equals_trls():
    trainer = _trl("trl.experimental.orpo.ORPOTrainer")
    p = pairs(reference=False)
    mc, mr = p.means()
    self = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    theirs = trainer.odds_ratio_loss(self, mc, mr)[0]  # β log σ(log odds ratio), per pair
    torch.testing.assert_close(orpo(p, beta=0.1), -mc - theirs)
