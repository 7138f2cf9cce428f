"""Checkable rewards, called as TRL calls them: the built-ins read a stated final answer
(tags, boxed, ####, "the answer is"), a user's file:function loads by name, and a
function that raises or returns the wrong length stops with its name."""

from __future__ import annotations

import math

import pytest

from leantune.objectives.rewards import (
    RewardError,
    final_answer,
    load_reward,
    score,
)


@pytest.mark.parametrize("text, want", [
    ("so <answer> 42 </answer>", "42"),
    ("x = \\boxed{7}", "7"),
    ("work...\n#### 1,234", "1,234"),
    ("Therefore the answer is: Paris.\nMore text", "Paris."),
    ("I think 12", None),
    ("<answer>1</answer> then <answer>2</answer>", "2"),
])
def test_the_final_answer_is_what_the_completion_states(text, want):
    assert final_answer(text) == want


def test_built_ins_on_text_and_conversations():
    completions = ["The answer is 1,000.", [{"role": "assistant", "content": "#### 7"}],
                   "no idea", "The answer is Paris"]
    answers = ["1000", "7.0", "3", "paris"]
    _, exact = load_reward("exact_match")
    _, numeric = load_reward("numeric_match")
    _, fmt = load_reward("format")
    assert exact(None, completions, answer=answers) == [0.0, 0.0, 0.0, 1.0]
    assert numeric(None, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0]
    assert fmt(None, completions) == [1.0, 1.0, 0.0, 1.0]


def test_a_users_file_function_loads_and_weights_sum(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("def short(prompts, completions, **kw):\n"
                    "    return [None if c == '' else float(len(c) < 5) for c in completions]\n")
    rewards = [load_reward("format"), load_reward(f"{path}:short")]
    total, each = score(rewards, [1.0, 0.5], ["p"] * 3, ["abc", "", "the answer is 4"], {})
    assert total == [0.5, 0.0, 1.0]
    assert each["format"] == [0.0, 0.0, 1.0]
    assert each["short"][0] == 1.0 and math.isnan(each["short"][1])


def test_bad_reward_functions_are_named(tmp_path):
    with pytest.raises(RewardError, match="neither a built-in"):
        load_reward("nonsense")
    with pytest.raises(RewardError, match="no such file"):
        load_reward(str(tmp_path / "none.py") + ":f")
    path = tmp_path / "bad.py"
    path.write_text("def boom(prompts, completions, **kw):\n    raise KeyError('answer')\n"
                    "def short(prompts, completions, **kw):\n    return [1.0]\n")
    with pytest.raises(RewardError, match="no function 'missing'"):
        load_reward(f"{path}:missing")
    for name, problem in (("boom", "raised KeyError"), ("short", "returned 1 values for 2")):
        with pytest.raises(RewardError, match=f"reward .*{name} {problem}"):
            score([load_reward(f"{path}:{name}")], [1.0], ["p", "q"], ["a", "b"], {})
