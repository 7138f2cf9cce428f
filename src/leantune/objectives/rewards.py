"""Rewards a program can check, for RL on completions (GRPO), called as TRL calls them:
``fn(prompts, completions, **columns) -> list[float | None]``, one value per completion,
``columns`` the prompt rows' other keys (e.g. ``answer``), each a list aligned with the
completions. ``None`` means the function does not apply to that completion (TRL's
convention): it adds nothing to the weighted sum.

Built-ins (``objective.rewards`` names):

- ``exact_match``: 1.0 when the completion's final answer (:func:`final_answer`),
  normalized, equals the ``answer`` column's, normalized; else 0.0.
- ``numeric_match``: 1.0 when the completion's final answer is a number equal to the
  ``answer`` column's (relative 1e-6); else 0.0.
- ``format``: 1.0 when the completion states a final answer in a form
  :func:`final_answer` reads (``<answer>…</answer>``, ``\\boxed{…}``, ``#### …`` or
  "the answer is …"); else 0.0.

Any other entry is ``path/to/file.py:function``, loaded from that file.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from leantune.common.text import normalize

RewardFn = Callable[..., list]

_TAGGED = [re.compile(r"<answer>(.*?)</answer>", re.S), re.compile(r"\\boxed\{([^{}]*)\}"),
           re.compile(r"####\s*(.+)"), re.compile(r"answer is\s*:?\s*(.+)", re.I)]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


class RewardError(RuntimeError):
    """A reward function that cannot be loaded, raised, or returned the wrong thing."""


def text_of(completion) -> str:
    """A completion's text: the string itself, or a conversation's last message's content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def final_answer(text: str) -> str | None:
    """The answer a completion states: the last ``<answer>…</answer>``, ``\\boxed{…}``,
    ``#### …`` or "the answer is …" (its first line), or None when it states none."""
    for pattern in _TAGGED:
        found = pattern.findall(text)
        if found:
            return found[-1].strip().splitlines()[0] if found[-1].strip() else ""
    return None


def as_number(text: str | None) -> float | None:
    """The last number in ``text`` (thousands commas dropped), or None."""
    found = _NUMBER.findall(text or "")
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def exact_match(prompts, completions, answer, **_) -> list[float]:
    return [float(a is not None and normalize(a) == normalize(str(ref)))
            for a, ref in zip((final_answer(text_of(c)) for c in completions), answer)]


def numeric_match(prompts, completions, answer, **_) -> list[float]:
    out = []
    for c, ref in zip(completions, answer):
        got, want = as_number(final_answer(text_of(c))), as_number(str(ref))
        out.append(float(got is not None and want is not None
                         and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)))
    return out


def format_reward(prompts, completions, **_) -> list[float]:
    return [float(final_answer(text_of(c)) is not None) for c in completions]


BUILT_IN: dict[str, RewardFn] = {"exact_match": exact_match, "numeric_match": numeric_match,
                                 "format": format_reward}


def load_reward(spec: str) -> tuple[str, RewardFn]:
    """``(name, function)`` for a built-in name or ``path/to/file.py:function`` (named by
    the function).

    Raises:
        RewardError: an unknown name, a missing file, or no such function in it.
    """
    if spec in BUILT_IN:
        return spec, BUILT_IN[spec]
    path, _, name = spec.rpartition(":")
    if not path.endswith(".py") or not name:
        raise RewardError(f"objective.rewards: {spec!r} is neither a built-in "
                          f"({', '.join(BUILT_IN)}) nor path/to/file.py:function")
    if not Path(path).is_file():
        raise RewardError(f"objective.rewards: {spec!r}: no such file {path}")
    module_spec = importlib.util.spec_from_file_location(f"leantune_reward_{Path(path).stem}",
                                                         path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # the user's own reward code, asked for by name
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"objective.rewards: {path} has no function {name!r}")
    return name, fn  # logged as rewards/NAME/mean, as TRL names a function's figures


def score(rewards: Sequence[tuple[str, RewardFn]], weights: Sequence[float], prompts: list,
          completions: list, columns: dict[str, list]) -> tuple[list[float], dict[str, list]]:
    """Each completion's weighted reward ``sum_f w_f r_f`` (a ``None`` adds nothing) and
    each function's values (``None`` as NaN).

    Raises:
        RewardError: naming the function that raised, or returned other than one number
            (or None) per completion.
    """
    total = [0.0] * len(completions)
    each: dict[str, list] = {}
    for (name, fn), weight in zip(rewards, weights, strict=True):
        try:
            values = fn(prompts=prompts, completions=completions, **columns)
        except Exception as e:  # noqa: BLE001 - the user's function: say which one failed
            raise RewardError(f"reward {name} raised {type(e).__name__}: {e}") from e
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise RewardError(f"reward {name} returned {got} values for "
                              f"{len(completions)} completions")
        if any(v is not None and not isinstance(v, (int, float)) for v in values):
            raise RewardError(f"reward {name} returned a value that is not a number or None")
        each[name] = [math.nan if v is None else float(v) for v in values]
        total = [t + (0.0 if v is None else weight * float(v)) for t, v in zip(total, values)]
    return total, each
