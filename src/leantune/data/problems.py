"""Problems with answers a program can check, generated offline from a seed: prompt rows
for RL with checkable rewards (``{"prompt": messages, "answer": str}``; the reward
functions of :mod:`leantune.objectives.rewards` read ``answer``).

- ``add``: ``a + b`` with ``digits``-digit operands;
- ``count``: how many times a letter occurs in a short word list.

Every prompt asks to end with "The answer is" and the number, which the ``format`` reward
checks and ``numeric_match`` reads. (Asked for "The answer is N.", SmolLM2-135M-Instruct
writes exactly that, N included.) Its greedy replies, 32 problems each, seed 0: ``add``
with 1 digit 28 % right (every reply in the asked form), 2 digits 3 %, ``count`` 0 %.
"""

from __future__ import annotations

import random

ASK = "End your reply with the sentence 'The answer is' followed by the number."
WORDS = ("apple", "banana", "cherry", "grape", "lemon", "mango", "olive", "peach", "pear",
         "plum", "melon", "kiwi")


def _add(rng: random.Random, digits: int) -> tuple[str, str]:
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    return f"What is {a} + {b}? {ASK}", str(a + b)


def _count(rng: random.Random, digits: int) -> tuple[str, str]:
    words = rng.sample(WORDS, k=3 + digits)
    letter = rng.choice(sorted(set("".join(words))))
    n = sum(w.count(letter) for w in words)
    return (f"How many times does the letter '{letter}' occur in: {', '.join(words)}? "
            f"{ASK}", str(n))


KINDS = {"add": _add, "count": _count}


def problem_rows(kind: str, n: int, seed: int = 0, digits: int = 1) -> list[dict]:
    """``n`` prompt rows of ``kind`` (``add`` or ``count``), the same for the same seed.

    Raises:
        ValueError: an unknown kind, or ``digits`` < 1.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown problem kind {kind!r}; choose from {sorted(KINDS)}")
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    rng = random.Random(f"{kind}:{digits}:{seed}")
    rows = []
    for _ in range(n):
        prompt, answer = KINDS[kind](rng, digits)
        rows.append({"prompt": [{"role": "user", "content": prompt}], "answer": answer})
    return rows
