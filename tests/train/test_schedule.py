"""LR schedules: the multiplier at its breakpoints, against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from leantune.config import ScheduleConfig
from leantune.train.schedule import Schedule, steps_or_ratio


def test_warmup_ramps_linearly_to_one():
    # W = 4: steps 0..3 give 1/4, 2/4, 3/4, 4/4; the decay starts at 1 on step W.
    assert [Schedule("cosine", 20, 4)(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert Schedule("cosine", 20, 4)(4) == 1.0
    assert Schedule("linear", 20, 4)(4) == 1.0


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine", "wsd", "infinite"])
def test_warmup_is_the_same_for_every_kind(kind):
    s = Schedule(kind, 100, 10, 0.3, decay=10, cooldown=20)
    assert s(0) == pytest.approx(0.1)
    assert s(4) == pytest.approx(0.5)


def test_cosine_start_midpoint_end():
    # N = 110, W = 10: progress p = (step - 10) / 100; midpoint at step 60, end at 110.
    m = 0.1
    s = Schedule("cosine", 110, 10, m)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx((1 + m) / 2)
    assert s(35) == pytest.approx(m + (1 - m) * (1 + math.cos(math.pi / 4)) / 2)
    assert s(110) == pytest.approx(m)
    assert s(500) == pytest.approx(m)  # clamped past the end


def test_cosine_without_warmup_or_floor():
    s = Schedule("cosine", 10)
    assert s(0) == 1.0
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(0.0, abs=1e-12)


def test_linear_start_midpoint_end():
    s = Schedule("linear", 100, 0, 0.2)
    assert s(0) == pytest.approx(1.0)
    assert s(50) == pytest.approx(0.6)  # (1 + m) / 2
    assert s(25) == pytest.approx(0.8)  # m + (1-m) * 3/4
    assert s(100) == pytest.approx(0.2)


def test_constant_after_warmup():
    assert [Schedule("constant", 10, 2, 0.5)(s) for s in (0, 1, 2, 9, 50)] == [
        0.5, 1.0, 1.0, 1.0, 1.0]


def test_schedule_is_monotone_after_warmup():
    for kind in ("linear", "cosine"):
        values = Schedule(kind, 50, 5, 0.1).values()[5:]
        assert all(a >= b for a, b in zip(values, values[1:]))


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="constant, linear, cosine, wsd, infinite"):
        Schedule("exponential", 10)


def test_phase_lengths_prefer_explicit_steps():
    assert steps_or_ratio(7, 0.5, 1000) == 7
    assert steps_or_ratio(0, 0.03, 1000) == 30
    assert steps_or_ratio(0, 0.34, 10) == 3
    assert steps_or_ratio(0, 0.0, 1000) == 0
    cfg = ScheduleConfig(kind="infinite", warmup_ratio=0.1, cooldown_steps=25, decay_ratio=0.2)
    assert Schedule.of(cfg, 200) == Schedule("infinite", 200, 20, 0.0, 40, "linear", 0.5, 25)


@pytest.mark.parametrize("shape, quarter", [("linear", 0.75), ("cosine", (1 + math.cos(
    math.pi / 4)) / 2), ("sqrt", 0.5)])
def test_wsd_holds_the_peak_then_decays_over_the_last_steps(shape, quarter):
    # N = 100, W = 10, D = 20: stable on steps 10..79, decay over 80..100.
    m = 0.1
    s = Schedule("wsd", 100, 10, m, decay=20, decay_shape=shape)
    assert s(9) == 1.0  # last warmup step
    assert s(10) == 1.0 and s(79) == 1.0
    assert s(80) == pytest.approx(1.0)
    # A quarter of the way (step 85): linear 3/4, sqrt 1 - 1/2, cosine (1 + cos(pi/4)) / 2.
    assert s(85) == pytest.approx(m + (1 - m) * quarter)
    assert s(100) == pytest.approx(m)


def test_infinite_cools_down_holds_then_anneals():
    # N = 200, W = 10, C = 50 (steps 10..60), constant c = 0.4 until step 180, then a
    # linear anneal over the last D = 20 steps to m = 0.05.
    f = Schedule("infinite", 200, 10, 0.05, decay=20, const_ratio=0.4, cooldown=50)
    assert f(0) == pytest.approx(0.1) and f(10) == pytest.approx(1.0)
    assert f(35) == pytest.approx(0.4 + 0.6 * 0.5)  # halfway through the cosine cooldown
    assert f(60) == pytest.approx(0.4) and f(120) == pytest.approx(0.4)
    assert f(179) == pytest.approx(0.4)
    assert f(190) == pytest.approx(0.05 + 0.35 * 0.5)  # halfway through the anneal
    assert f(200) == pytest.approx(0.05)


def test_infinite_without_anneal_is_the_same_whatever_the_length():
    """Phases in steps and D = 0: extending the run (resume with more steps) leaves every
    LR already used where it was."""
    short = Schedule("infinite", 100, 10, 0.0, decay=0, const_ratio=0.3, cooldown=40)
    longer = Schedule("infinite", 1000, 10, 0.0, decay=0, const_ratio=0.3, cooldown=40)
    assert short.values() == longer.values()[:100]
    assert longer(999) == pytest.approx(0.3)


@pytest.mark.parametrize("shape, half", [("linear", 0.5), ("cosine", 0.5),
                                         ("sqrt", 1 - math.sqrt(0.5))])
def test_anneal_from_a_checkpoint_decays_from_its_lr(shape, half):
    # A constant-phase checkpoint at s0 = 300 (multiplier 0.4) annealed over 100 steps to
    # m = 0.1: 0.4 at 300, m + 0.3 * decay(1/2) at 350, m at 400; steps before 300 keep
    # the schedule they trained with.
    base = Schedule("infinite", 400, 10, 0.1, decay=0, decay_shape=shape, const_ratio=0.4,
                    cooldown=50)
    s = Schedule("infinite", 400, 10, 0.1, decay=0, decay_shape=shape, const_ratio=0.4,
                 cooldown=50, anneal_at=300, anneal_start=base(299))
    assert [s(k) for k in range(300)] == [base(k) for k in range(300)]
    assert s(300) == pytest.approx(0.4)
    assert s(350) == pytest.approx(0.1 + 0.3 * half)
    assert s(400) == pytest.approx(0.1)
