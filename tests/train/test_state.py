"""The examples-mode data position across process counts and batch sizes: a run resumed
on another number of processes or ``train.batch_size`` re-batches what is left of the
epoch, so every unit of an epoch is taken exactly once, whatever the changes; an
unchanged global batch keeps the plan."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from leantune.config import load_config
from leantune.train.state import TrainState, change_world, epoch_plan, micro_batches, remaining_plan

LENGTHS = [random.Random(0).randint(3, 40) for _ in range(120)]


class UnitBatcher:
    """Collates a micro-batch into the unit indices it holds."""

    unit_lengths = LENGTHS

    def collate(self, units: list[int]) -> dict[str, torch.Tensor]:
        return {"units": torch.tensor(units)}


def config(selection: str):
    extra = ["data.token_budget=96", "data.max_length=48"] if selection == "token_budget" else []
    return load_config(None, [f"data.batching={selection}", "train.batch_size=3", *extra])


def take(cfg, state: TrainState, world: int, micro: int) -> list[list[int]]:
    """What ``world`` processes take in ``micro`` micro-batches: one list per process."""
    taken = []
    for rank in range(world):
        s = TrainState(**{**vars(state), "segments": [list(x) for x in state.segments]})
        acc = SimpleNamespace(num_processes=world, process_index=rank, device="cpu")
        batches = micro_batches(UnitBatcher(), cfg, s, acc)
        taken.append([int(i) for _ in range(micro) for i in next(batches)["units"]])
    vars(state).update(vars(s))  # every rank moves the position alike; keep the last
    return taken


@pytest.mark.parametrize("selection", ["random", "length_grouped", "token_budget"])
def test_every_unit_once_per_epoch_across_process_counts(selection):
    cfg = config(selection)
    state = TrainState()
    seen = []
    for world, micro in ((1, 4), (2, 3), (3, 2), (2, 1)):  # three resumes mid-epoch
        change_world(state, world)
        parts = take(cfg, state, world, micro)
        assert all(len(p) == len(parts[0]) or selection == "token_budget" for p in parts)
        seen += [i for p in parts for i in p]
    assert state.epoch == 0 and len(state.segments) == 3
    # The rest of the epoch, on 2 processes; a last batch too small to give each process a
    # unit is dropped, as in a run that never changed.
    rest = remaining_plan(LENGTHS, cfg, state)[state.batch_in_epoch:]
    seen += [i for b in rest if len(b) >= 2 for i in b]
    dropped = [i for b in rest if len(b) < 2 for i in b]
    assert len(seen) == len(set(seen))  # nothing twice
    assert sorted(seen + dropped) == list(range(len(LENGTHS))) and len(dropped) <= 1


def test_an_unchanged_process_count_keeps_the_epoch_plan():
    cfg = config("random")
    state = TrainState(world=2, batch_in_epoch=3)
    change_world(state, 2)
    assert state.segments == [] and state.batch_in_epoch == 3
    plan = epoch_plan(LENGTHS, cfg, 2, 0)
    got = take(cfg, state, 2, 2)
    assert got == [plan[3][0::2] + plan[4][0::2], plan[3][1::2] + plan[4][1::2]]


def test_one_process_then_two_covers_the_epoch_like_one_process_alone():
    cfg = config("random")
    state = TrainState()
    first = take(cfg, state, 1, 5)[0]
    alone = [i for b in epoch_plan(LENGTHS, cfg, 1, 0)[:5] for i in b]
    assert first == alone  # before the change: exactly the one-process plan
    change_world(state, 2)
    assert state.segments == [[1, 5, 3]]  # 1 process of 3 rows took 5 micro-batches
    rest = [i for p in take(cfg, state, 2, 5) for i in p]
    assert set(rest).isdisjoint(first) and len(rest) == 5 * 6
    assert len(set(rest) | set(first)) == 15 + 30


def test_a_resume_with_another_batch_size_takes_every_unit_once():
    """2 processes of 2 rows, then 1 process of 4 (the same global batch, as a user keeps
    it: the plan goes on unchanged), then 1 of 3 (re-batched: a segment records the size
    it ran with); the epoch is covered once. An earlier checkpoint's two-number segments
    are read with the config's size."""
    seen, state, plans = [], TrainState(), []
    for world, size, micro in ((2, 2, 3), (1, 4, 2), (1, 3, 4)):
        cfg = load_config(None, ["data.batching=random", f"train.batch_size={size}"])
        plans.append(change_world(state, world, size))
        seen += [i for p in take(cfg, state, world, micro) for i in p]
    assert plans == [True, False, True]  # (1 x None -> 2 x 2 is a fresh state's first)
    assert state.segments == [[1, 5, 4]] and state.batch_size == 3
    whole = epoch_plan(LENGTHS, load_config(None, ["data.batching=random",
                                                   "train.batch_size=4"]), 1, 0)
    assert sorted(seen[:5 * 4]) == sorted(i for b in whole[:5] for i in b)  # as 1 x 4 alone
    assert len(seen) == 3 * 4 + 2 * 4 + 4 * 3 == len(set(seen))  # nothing twice
    rest = remaining_plan(LENGTHS, cfg, state)[state.batch_in_epoch:]
    assert sorted(seen + [i for b in rest for i in b]) == list(range(len(LENGTHS)))
    old = TrainState(world=2, batch_in_epoch=0, segments=[[2, 3]])  # saved before sizes
    assert remaining_plan(LENGTHS, config("random"), old) == remaining_plan(
        LENGTHS, config("random"), TrainState(world=2, batch_size=3, segments=[[2, 3, 3]]))
