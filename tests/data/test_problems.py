"""Generated problems: seeded, the stated answer right, and read back by the rewards."""

from __future__ import annotations

import pytest

from leantune.data.problems import problem_rows
from leantune.objectives.rewards import load_reward


@pytest.mark.parametrize("kind", ["add", "count"])
def test_rows_are_seeded_and_their_answers_check(kind):
    rows = problem_rows(kind, 20, seed=3, digits=2)
    assert rows == problem_rows(kind, 20, seed=3, digits=2) != problem_rows(kind, 20, seed=4,
                                                                          digits=2)
    for row in rows:
        text = row["prompt"][0]["content"]
        if kind == "add":
            a, b = (int(x) for x in text.split("What is ")[1].split("?")[0].split(" + "))
            assert row["answer"] == str(a + b) and 10 <= a <= 99
        else:
            letter = text.split("'")[1]
            words = text.split(": ")[1].split("?")[0].split(", ")
            assert row["answer"] == str(sum(w.count(letter) for w in words))
    _, numeric = load_reward("numeric_match")
    replies = [f"Let me see.\nThe answer is {r['answer']}." for r in rows]
    assert numeric(None, replies, answer=[r["answer"] for r in rows]) == [1.0] * len(rows)


def test_unknown_kinds_and_digits_are_refused():
    with pytest.raises(ValueError, match="unknown problem kind 'mul'"):
        problem_rows("mul", 3)
    with pytest.raises(ValueError, match="digits"):
        problem_rows("add", 3, digits=0)
