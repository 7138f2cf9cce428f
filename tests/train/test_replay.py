"""Replay: the replayed fraction over a run, counted from the tokens themselves; the ratio
schedule at its breakpoints; streams that resume exactly where they stopped."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch

from leantune.config import ReplayConfig
from leantune.data.corpus import build_corpus
from leantune.data.windows import TokenCorpus, Windows
from leantune.train.replay import CorpusFeed, WindowOrder, replay_ratio, replay_windows
from leantune.train.state import TrainState


def test_ratio_schedule_breakpoints():
    const = ReplayConfig(path="x", ratio=0.25)
    assert [replay_ratio(s, 11, const) for s in (0, 5, 10)] == [0.25, 0.25, 0.25]
    lin = ReplayConfig(path="x", ratio=0.3, schedule="linear", final_ratio=0.1)
    assert [replay_ratio(s, 11, lin) for s in (0, 5, 10)] == pytest.approx([0.3, 0.2, 0.1])
    cos = ReplayConfig(path="x", ratio=0.3, schedule="cosine", final_ratio=0.1)
    # Half a cosine: 0.1 + 0.2 * (1 + cos(pi q)) / 2 at q = 0, 1/4, 1/2, 1.
    assert [replay_ratio(s, 9, cos) for s in (0, 2, 4, 8)] == pytest.approx(
        [0.3, 0.1 + 0.1 * (1 + math.cos(math.pi / 4)), 0.2, 0.1])
    assert replay_ratio(3, 9, ReplayConfig(path="x", ratio=0.2, schedule="linear")) == 0.2


@pytest.mark.parametrize("per_step, ratio, steps, expected", [
    (8, 0.05, 100, 40),     # 0.4 windows a step: 40 over the run, exactly
    (8, 0.25, 10, 20),
    (12, 1 / 3, 7, 28),
    (5, 0.0, 50, 0),
])
def test_carry_makes_the_fraction_exact_over_a_run(per_step, ratio, steps, expected):
    carry, total = 0.0, 0
    for _ in range(steps):
        n, carry = replay_windows(carry, per_step, ratio)
        assert 0 <= n <= per_step
        total += n
    assert total == expected


def test_window_order_is_a_permutation_per_epoch_and_resumes():
    order = WindowOrder(10, seed=3, salt=0)
    pos = [0, 0]
    first = order.take(7, pos)
    rest = order.take(13, pos)
    assert pos == [2, 0]
    assert sorted(first + rest[:3]) == list(range(10)) and sorted(rest[3:]) == list(range(10))
    assert first + rest[:3] != rest[3:]  # a new order each epoch
    again = WindowOrder(10, seed=3, salt=0)
    assert again.take(5, [1, 5]) == rest[8:]


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory, tokenizer):
    """Corpus D1 of letters and D0 of digits (on lines of their own, so that not even the
    word-separator tokens are shared): their tokens never overlap but for EOS."""
    tmp = tmp_path_factory.mktemp("corpora")
    paths = {}
    for name, alphabet, sep in (("new", "abcdefghij", " "), ("old", "0123456789", "\n")):
        rows = [{"text": sep.join(alphabet[(i + k) % 10] * (1 + k % 3) for k in range(40))}
                for i in range(30)]
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[name] = TokenCorpus(build_corpus(str(tmp / f"{name}.jsonl"), tokenizer,
                                               str(tmp / "cache"), progress=False))
    return paths


def feed(two_corpora, tokenizer, replay: ReplayConfig) -> CorpusFeed:
    return CorpusFeed({"data": Windows.over(two_corpora["new"], 32),
                       "replay": Windows.over(two_corpora["old"], 32)}, replay, "online",
                      tokenizer.pad_token_id)


def vocabulary(corpus: TokenCorpus, eos: int) -> set[int]:
    return set(corpus.tokens(0, corpus.num_tokens).tolist()) - {eos}


@pytest.mark.parametrize("ratio, schedule, final", [(0.25, "constant", None),
                                                    (0.05, "constant", None),
                                                    (0.3, "linear", 0.0)])
def test_replayed_tokens_counted_from_the_batches(two_corpora, tokenizer, ratio, schedule,
                                                  final):
    """Every window is all letters or all digits; count them in what the feed yields."""
    cfg = ReplayConfig(path="old", ratio=ratio, schedule=schedule, final_ratio=final)
    new_vocab = vocabulary(two_corpora["new"], tokenizer.eos_token_id)
    old_vocab = vocabulary(two_corpora["old"], tokenizer.eos_token_id)
    assert new_vocab and old_vocab and not new_vocab & old_vocab
    steps, batch, accum = 40, 3, 2
    state = TrainState()
    batches = feed(two_corpora, tokenizer, cfg).micro_batches(state, batch, accum, 1, 0, steps,
                                                              7, "cpu")
    counts = {"new": 0, "old": 0}
    for _ in range(steps):
        for _ in range(accum):
            for row in next(batches)["input_ids"].tolist():
                kinds = {"new" if t in new_vocab else "old" for t in row
                         if t != tokenizer.eos_token_id}
                assert len(kinds) == 1  # a window never mixes the corpora
                counts[kinds.pop()] += len(row)
        state.step += 1  # what the loop does after each optimizer step
    expected = sum(replay_ratio(s, steps, cfg) for s in range(steps)) * batch * accum
    assert counts["old"] / 32 == round(expected)
    assert counts["old"] + counts["new"] == steps * batch * accum * 32
    assert state.windows == {"data": counts["new"] // 32, "replay": counts["old"] // 32}


def test_resumed_feed_yields_the_same_next_batches(two_corpora, tokenizer):
    """A stream stopped after k steps and rebuilt from the saved state (through JSON, as a
    checkpoint stores it) continues with exactly the batches of an unbroken one."""
    cfg = ReplayConfig(path="old", ratio=0.3)
    straight_state = TrainState()
    straight = feed(two_corpora, tokenizer, cfg).micro_batches(straight_state, 2, 2, 1, 0, 50,
                                                               1, "cpu")
    state = TrainState()
    first = feed(two_corpora, tokenizer, cfg).micro_batches(state, 2, 2, 1, 0, 50, 1, "cpu")
    for _ in range(40):  # past the end of an epoch of the new corpus's windows
        for _ in range(2):
            assert torch.equal(next(straight)["input_ids"], next(first)["input_ids"])
        straight_state.step += 1
        state.step += 1
    saved = TrainState(**json.loads(json.dumps(asdict(state))))
    assert saved.streams["data"][0] >= 1  # the new corpus wrapped into its second epoch
    resumed = feed(two_corpora, tokenizer, cfg).micro_batches(saved, 2, 2, 1, 0, 50, 1, "cpu")
    for _ in range(6):
        a, b = next(straight), next(resumed)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_processes_split_each_step_between_them(two_corpora, tokenizer):
    """Two processes with batch b see, together, the windows one process with 2b sees."""
    cfg = ReplayConfig(path="old", ratio=0.25)
    one = feed(two_corpora, tokenizer, cfg).micro_batches(TrainState(), 4, 1, 1, 0, 10, 5, "cpu")
    ranks = [feed(two_corpora, tokenizer, cfg).micro_batches(TrainState(), 2, 1, 2, r, 10, 5,
                                                             "cpu") for r in (0, 1)]
    for _ in range(3):
        whole = next(one)["input_ids"]
        parts = [next(r)["input_ids"] for r in ranks]
        assert torch.equal(torch.stack([parts[0][0], parts[1][0], parts[0][1], parts[1][1]]),
                           whole)
