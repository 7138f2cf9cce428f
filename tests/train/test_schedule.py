"""LR schedules: the multiplier at its breakpoints, against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from leantune.train.schedule import lr_multiplier, warmup_steps


def test_warmup_ramps_linearly_to_one():
    # W = 4: steps 0..3 give 1/4, 2/4, 3/4, 4/4; the decay starts at 1 on step W.
    assert [lr_multiplier(s, 20, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(4, 20, 4, "cosine") == 1.0
    assert lr_multiplier(4, 20, 4, "linear") == 1.0


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_warmup_is_the_same_for_every_kind(kind):
    assert lr_multiplier(0, 100, 10, kind, 0.3) == pytest.approx(0.1)
    assert lr_multiplier(4, 100, 10, kind, 0.3) == pytest.approx(0.5)


def test_cosine_start_midpoint_end():
    # N = 110, W = 10: progress p = (step - 10) / 100; midpoint at step 60, end at 110.
    m = 0.1
    assert lr_multiplier(10, 110, 10, "cosine", m) == pytest.approx(1.0)
    assert lr_multiplier(60, 110, 10, "cosine", m) == pytest.approx((1 + m) / 2)
    assert lr_multiplier(35, 110, 10, "cosine", m) == pytest.approx(
        m + (1 - m) * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_multiplier(110, 110, 10, "cosine", m) == pytest.approx(m)
    assert lr_multiplier(500, 110, 10, "cosine", m) == pytest.approx(m)  # clamped past the end


def test_cosine_without_warmup_or_floor():
    assert lr_multiplier(0, 10) == 1.0
    assert lr_multiplier(5, 10) == pytest.approx(0.5)
    assert lr_multiplier(10, 10) == pytest.approx(0.0, abs=1e-12)


def test_linear_start_midpoint_end():
    m = 0.2
    assert lr_multiplier(0, 100, 0, "linear", m) == pytest.approx(1.0)
    assert lr_multiplier(50, 100, 0, "linear", m) == pytest.approx(0.6)  # (1 + m) / 2
    assert lr_multiplier(25, 100, 0, "linear", m) == pytest.approx(0.8)  # m + (1-m) * 3/4
    assert lr_multiplier(100, 100, 0, "linear", m) == pytest.approx(m)


def test_constant_after_warmup():
    assert [lr_multiplier(s, 10, 2, "constant", 0.5) for s in (0, 1, 2, 9, 50)] == [
        0.5, 1.0, 1.0, 1.0, 1.0]


def test_schedule_is_monotone_after_warmup():
    for kind in ("linear", "cosine"):
        values = [lr_multiplier(s, 50, 5, kind, 0.1) for s in range(5, 51)]
        assert all(a >= b for a, b in zip(values, values[1:]))


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="constant, linear, cosine, wsd or infinite"):
        lr_multiplier(5, 10, 0, "exponential")


def test_warmup_steps_prefers_explicit_steps():
    assert warmup_steps(1000, 7, 0.5) == 7
    assert warmup_steps(1000, 0, 0.03) == 30
    assert warmup_steps(10, 0, 0.34) == 3
    assert warmup_steps(1000, 0, 0.0) == 0


@pytest.mark.parametrize("shape, quarter", [("linear", 0.75), ("cosine", (1 + math.cos(
    math.pi / 4)) / 2), ("sqrt", 0.5)])
def test_wsd_holds_the_peak_then_decays_over_the_last_steps(shape, quarter):
    # N = 100, W = 10, decay_ratio 0.2: stable on steps 10..79, decay over 80..100.
    m, kw = 0.1, {"decay_ratio": 0.2, "decay_shape": shape}
    assert lr_multiplier(9, 100, 10, "wsd", m, **kw) == 1.0  # last warmup step
    assert lr_multiplier(10, 100, 10, "wsd", m, **kw) == 1.0
    assert lr_multiplier(79, 100, 10, "wsd", m, **kw) == 1.0
    assert lr_multiplier(80, 100, 10, "wsd", m, **kw) == pytest.approx(1.0)
    # A quarter of the way (step 85): linear 3/4, sqrt 1 - 1/2, cosine (1 + cos(pi/4)) / 2.
    assert lr_multiplier(85, 100, 10, "wsd", m, **kw) == pytest.approx(m + (1 - m) * quarter)
    assert lr_multiplier(100, 100, 10, "wsd", m, **kw) == pytest.approx(m)


def test_infinite_cools_down_holds_then_anneals():
    # N = 200, W = 10, cooldown 0.25 (50 steps: 10..60), constant c = 0.4 until step 180,
    # then a linear anneal over the last 20 steps to m = 0.05.
    kw = {"decay_ratio": 0.1, "const_lr_ratio": 0.4, "cooldown_ratio": 0.25}
    f = lambda s: lr_multiplier(s, 200, 10, "infinite", 0.05, **kw)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(10) == pytest.approx(1.0)
    assert f(35) == pytest.approx(0.4 + 0.6 * 0.5)  # halfway through the cosine cooldown
    assert f(60) == pytest.approx(0.4) and f(120) == pytest.approx(0.4)
    assert f(179) == pytest.approx(0.4)
    assert f(190) == pytest.approx(0.05 + 0.35 * 0.5)  # halfway through the anneal
    assert f(200) == pytest.approx(0.05)
