"""``leantune eval``: score a trained run (base + adapter, any method) or a plain model on
one or more data sets.

For every data set:

- loss and perplexity over its target tokens (token-weighted, packed when the model and
  backend keep packed examples apart: the same numbers as padding, less compute);
- for rows with a reference answer (a completion, or the first assistant turn after a
  user turn), batched greedy generation scored by exact match and by contains match,
  both after normalization (case, surrounding whitespace and punctuation, inner runs of
  whitespace): ``exact = norm(reply) == norm(ref)``, ``contains = norm(ref) in norm(reply)``,
  and ``answer = norm(extract(reply)) == norm(ref)``, where :func:`extract_answer` keeps
  the reply's first non-empty line after an "Answer:" / "The (correct) answer is" lead-in
  (greedy generation with answer extraction: the LoReFT paper's protocol);
- for multiple-choice rows (``prompt``, ``choices``, ``gold``) and ``--task`` names, the
  accuracy of :mod:`leantune.eval.multiple_choice`;
- for preference pairs (``chosen``, ``rejected``), the pair accuracy and margin of
  :mod:`leantune.eval.pairs`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from leantune.adapters.loading import load_target
from leantune.common.text import normalize
from leantune.config import Config, DataConfig, ModelConfig
from leantune.data.dataset import DataStats, encode_all, load_examples
from leantune.data.encode import prompt_and_reference
from leantune.data.sources import read_rows, set_name
from leantune.data.tasks import ChoiceDoc, read_choice_rows, subset
from leantune.eval.loss import evaluate
from leantune.eval.multiple_choice import ChoiceScorer, macro
from leantune.eval.pairs import is_pair_file, score_pairs
from leantune.eval.requests import requests
from leantune.model.generate import generate_rendered
from leantune.packing.batching import Batcher
from leantune.packing.probe import probe_batches, resolve_packing

ANSWER_LEADS = ("the correct answer is", "the answer is", "answer is", "answer")


def extract_answer(reply: str) -> str:
    """The answer in a free-text reply: its first non-empty line, normalized, without an
    "Answer:" / "The answer is" / "The correct answer is" lead-in."""
    line = normalize(next((x for x in reply.splitlines() if x.strip()), ""))
    for lead in ANSWER_LEADS:
        if line.startswith(lead):
            return normalize(line[len(lead):].lstrip(" :"))
    return line


def match_scores(replies: list[str], references: list[str]) -> dict[str, float | int]:
    """Exact-match, contains-match and extracted-answer accuracy of ``replies`` against
    ``references``."""
    pairs = [(r, normalize(ref)) for r, ref in zip(replies, references, strict=True)]
    n = len(pairs)
    if not n:
        return {"generated": 0, "exact_match": None, "contains_match": None,
                "answer_match": None}
    return {"generated": n,
            "exact_match": sum(normalize(r) == ref for r, ref in pairs) / n,
            "contains_match": sum(bool(ref) and ref in normalize(r) for r, ref in pairs) / n,
            "answer_match": sum(extract_answer(r) == ref for r, ref in pairs) / n}


def eval_packing(model, adapter, encoded: list, data: DataConfig, batch_size: int,
                 pad_id: int, accelerator) -> dict:
    """``online`` when packed rows equal padded ones on this set's widest batch and at
    ``data.max_length`` (a forward-only probe: eval takes no gradient), else ``none``."""
    widest = sorted(encoded, key=lambda e: len(e.input_ids))[-batch_size:]
    batcher = Batcher.build(widest, "online", data.max_length, pad_id)
    rows = batcher.packed_rows(list(range(len(widest))))
    return resolve_packing("online", model, adapter, probe_batches(rows, data.max_length),
                           pad_id, data.max_length, backward=False, acc=accelerator)


def score_set(model, tokenizer, path: str, data: DataConfig, adapter, batch_size: int,
              accelerator, generate_n: int | None, max_new_tokens: int) -> dict:
    """Loss, perplexity and (for up to ``generate_n`` rows with a reference, all if None)
    match accuracy of ``model`` on the rows of ``path``."""
    stats = DataStats()
    examples, fmt = load_examples(path, data, tokenizer.chat_template is not None, stats)
    if data.max_examples is not None:
        examples = examples[: data.max_examples]
    encoded, sources = encode_all(examples, tokenizer, data, stats)
    # Packed whenever exact here (the probe decides): the same loss as padding, less compute.
    packing = eval_packing(model, adapter, encoded, data, batch_size, tokenizer.pad_token_id,
                           accelerator) if encoded else {"used": "none"}
    mode = packing["used"]
    batcher = Batcher.build([], mode, data.max_length, tokenizer.pad_token_id)
    result = {"path": path, "format": fmt, "rows": stats.rows_read, "examples": len(encoded),
              "truncated": stats.truncated, "packing": mode,
              "dropped": stats.dropped_too_long + stats.dropped_no_target,
              **evaluate(model, encoded, batch_size,
                         lambda b: batcher.collate_examples(b, mode), accelerator)}
    asked = [pr for ex in sources if (pr := prompt_and_reference(ex, tokenizer)) is not None]
    asked = asked[:generate_n] if generate_n is not None else asked
    replies = [""] * len(asked)
    if accelerator.is_main_process:
        replies = generate_rendered(model, tokenizer, [(p, s) for p, _, s in asked],
                                    max_new_tokens, batch_size)
    result |= match_scores(replies, [ref for _, ref, _ in asked])
    result["samples"] = [{"prompt": p, "reference": ref, "reply": r}
                         for (p, ref, _), r in list(zip(asked, replies))[:3]]
    return result


def is_choice_file(path: str) -> bool:
    """Whether the first row of ``path`` is a multiple-choice row (``choices`` and
    ``gold``) rather than one of the formats training reads."""
    if path.startswith("task:"):
        return False
    first = next(iter(read_rows(path)), None)
    return first is not None and isinstance(first.record, dict) and {
        "choices", "gold"} <= set(first.record)


def choice_scorer(model, tokenizer, adapter, docs: list[ChoiceDoc], data: DataConfig,
                  batch_size: int, accelerator) -> ChoiceScorer:
    """A scorer that packs ``docs``' requests when the forward-only probe finds it exact."""
    encoded = requests(docs[:64], tokenizer, data.max_length)
    mode = eval_packing(model, adapter, encoded, data, batch_size, tokenizer.pad_token_id,
                        accelerator)["used"] if encoded else "none"
    return ChoiceScorer(tokenizer, data.max_length, batch_size, mode, accelerator,
                        share_context=adapter is None or adapter.virtual_tokens == 0)


def score_choices(model, tokenizer, adapter, docs: list[ChoiceDoc], data: DataConfig,
                  batch_size: int, accelerator, source: str) -> dict:
    """Accuracy of ``model`` on multiple-choice ``docs`` (see :mod:`leantune.eval.multiple_choice`)."""
    scorer = choice_scorer(model, tokenizer, adapter, docs, data, batch_size, accelerator)
    result = scorer.score(model, docs)
    return {"source": source, "packing": scorer.mode, **result}


def evaluate_target(target: Path, paths: list[str], overrides: dict | None = None,
                    batch_size: int | None = None, generate_n: int | None = None,
                    max_new_tokens: int | None = None, tasks: list[str] | None = None,
                    limit: int | None = None, relative_pairs: bool = True) -> dict:
    """Score ``target`` on every data set of ``paths`` (loss and match accuracy, or
    multiple-choice accuracy for rows with ``choices``) and on every task of ``tasks``
    (the validation split, ``limit`` documents each: :func:`~leantune.data.tasks.subset`);
    preference pairs get a reference-relative margin unless ``relative_pairs`` is False;
    ``overrides`` change its data options (e.g. ``{"max_length": 1024}``), by default the
    run's own (or the defaults)."""
    from accelerate import Accelerator


    model, tokenizer, cfg, adapter = load_target(target)
    cfg = cfg or Config(model=ModelConfig(name_or_path=str(target)))
    data = dataclasses.replace(cfg.data, **(overrides or {}))
    accelerator = Accelerator(cpu=next(model.parameters()).device.type == "cpu")
    batch_size = batch_size or cfg.eval.batch_size
    taken: set[str] = set()
    sets, choice_sets, pair_sets = {}, {}, {}
    for path in paths:
        name = set_name(path, taken)
        if is_pair_file(path):
            pair_sets[name] = score_pairs(model, tokenizer, adapter, path, data.max_length,
                                          batch_size, accelerator, data.max_examples,
                                          relative_pairs)
        elif is_choice_file(path):
            docs = read_choice_rows(read_rows(path))[:data.max_examples]
            choice_sets[name] = score_choices(model, tokenizer, adapter, docs, data,
                                              batch_size, accelerator, path)
        else:
            sets[name] = score_set(model, tokenizer, path, data, adapter, batch_size,
                                   accelerator, generate_n,
                                   max_new_tokens or cfg.eval.max_new_tokens)
    for task in tasks or []:
        choice_sets[task] = score_choices(model, tokenizer, adapter, subset(task, limit), data,
                                          batch_size, accelerator, f"task:{task}:validation")
    modes = {r["packing"] for r in (sets | choice_sets).values()} or {"none"}
    return {"target": str(target), "method": cfg.adapter.method if adapter else None,
            "packing": modes.pop() if len(modes) == 1 else "per set",
            "max_length": data.max_length, "datasets": sets, "choices": choice_sets,
            "pairs": pair_sets,
            "macro": macro(choice_sets) if choice_sets else None}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ci(x, ci) -> str:
    return f"{100 * x:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _columns(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


def format_table(results: dict) -> str:
    """The results as plain-text tables: one data set per line (loss and match accuracy),
    then one multiple-choice set or task per line (accuracy with its 95 % interval) and
    their macro average."""
    parts = []
    if results["datasets"]:
        rows = [("data set", "examples", "tokens", "loss", "ppl", "exact", "contains",
                 "answer", "generated")]
        for name, r in results["datasets"].items():
            rows.append((name, str(r["examples"]), f"{r['target_tokens']:,}", f"{r['loss']:.4f}",
                         f"{r['perplexity']:.2f}", _pct(r["exact_match"]),
                         _pct(r["contains_match"]), _pct(r["answer_match"]),
                         str(r["generated"])))
        parts.append(_columns(rows))
    choices = results.get("choices") or {}
    if choices:
        rows = [("task", "docs", "acc % [95% CI]", "acc_norm % [95% CI]")]
        for name, r in choices.items():
            rows.append((name, str(r["docs"]), _ci(r["acc"], r["acc_ci"]),
                         _ci(r["acc_norm"], r["acc_norm_ci"])))
        m = results["macro"]
        rows.append((f"macro ({m['tasks']})", "", _ci(m["acc"], m["acc_ci"]),
                     _ci(m["acc_norm"], m["acc_norm_ci"])))
        parts.append(_columns(rows))
    pairs = results.get("pairs") or {}
    if pairs:
        rows = [("pairs", "pairs", "accuracy % [95% CI]", "margin [95% CI]", "margin of")]
        for name, r in pairs.items():
            lo, hi = r["margin_ci"]
            rows.append((name, str(r["pairs"]), _ci(r["accuracy"], r["accuracy_ci"]),
                         f"{r['margin']:.3f} [{lo:.3f}, {hi:.3f}]",
                         "policy - reference" if r["margin_kind"] == "reference" else "log-prob"))
        parts.append(_columns(rows))
    return "\n\n".join(parts)


def default_out(target: Path) -> Path:
    """``RUN_DIR/eval.json`` for a run directory, else ``eval.json`` here."""
    return target / "eval.json" if (target / "config.yaml").is_file() else Path("eval.json")

