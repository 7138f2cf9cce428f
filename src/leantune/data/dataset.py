"""From a data config to encoded train and eval sets, with counts of what was read,
skipped, truncated and dropped (all reported in ``summary.json``).
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field

from leantune.config import DataConfig
from leantune.data.encode import Encoded, encode
from leantune.data.formats import Example, detect_format, to_example
from leantune.data.sources import DataError, read_rows

log = logging.getLogger(__name__)


@dataclass
class DataStats:
    """What happened to the rows of ``data.path``.

    Every row read lands in exactly one of ``bad_rows_skipped``, ``dropped_too_long``,
    ``dropped_no_target``, ``train_examples``, ``eval_examples`` and ``ff_examples``
    (the Fast Forward set) (unless ``max_examples``
    left it out or the eval rows come from ``eval_path``); ``truncated`` counts kept
    examples that were cut.
    """

    rows_read: int = 0
    bad_rows_skipped: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    ff_examples: int = 0
    bad_row_samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Splits:
    """Encoded train / eval sets, the Examples eval came from (for prompts), and the Fast
    Forward set (held out of the training rows; empty unless asked for)."""

    train: list[Encoded]
    eval: list[Encoded]
    eval_examples: list[Example]
    stats: DataStats
    format: str
    ff: list[Encoded] = field(default_factory=list)


def load_examples(path: str, cfg: DataConfig, has_chat_template: bool, stats: DataStats
                  ) -> tuple[list[Example], str]:
    """Read and convert every row of ``path``; bad rows raise or are skipped and counted."""
    fmt = None if cfg.format == "auto" else cfg.format
    examples = []

    def skip(error: DataError) -> None:
        stats.bad_rows_skipped += 1
        if len(stats.bad_row_samples) < 5:
            stats.bad_row_samples.append(str(error))

    def unreadable(error: DataError) -> None:  # a JSONL line that is not JSON is a bad row too
        stats.rows_read += 1
        skip(error)

    for row in read_rows(path, cfg.split, unreadable if cfg.skip_bad_rows else None):
        stats.rows_read += 1
        try:
            fmt = fmt or detect_format(row.record, row)
            examples.append(to_example(row, fmt, has_chat_template, cfg.system_prompt))
        except DataError as e:
            if not cfg.skip_bad_rows:
                raise
            skip(e)
    if not stats.rows_read:
        raise DataError(path, "file", None, "empty: no rows to train on")
    if not examples:
        raise DataError(path, "file", None, f"no usable rows ({stats.bad_rows_skipped} of "
                        f"{stats.rows_read} malformed and skipped)")
    return examples, fmt


def encode_all(examples: list[Example], tokenizer, cfg: DataConfig, stats: DataStats
               ) -> tuple[list[Encoded], list[Example]]:
    """Encode examples, applying ``cfg.truncation``; returns the kept ones and their sources."""
    kept, sources = [], []
    for ex in examples:
        enc, truncated = encode(ex, tokenizer, cfg.max_length, cfg.train_on)
        if truncated and cfg.truncation == "drop":
            stats.dropped_too_long += 1
            continue
        if enc.num_targets == 0:  # e.g. a prompt longer than max_length: nothing to learn
            stats.dropped_no_target += 1
            continue
        stats.truncated += truncated
        kept.append(enc)
        sources.append(ex)
    return kept, sources


def nothing_left(stats: DataStats, cfg: DataConfig) -> str:
    """Why no training example survived encoding, and what to change."""
    fix = f"raise data.max_length (now {cfg.max_length})"
    if stats.dropped_too_long:
        fix += " or use data.truncation=right"
    if stats.dropped_no_target:
        fix += " or shorten the prompts" + (" (or train on all tokens: data.train_on=all)"
                                            if cfg.train_on != "all" else "")
    return (f"no training example left after encoding: {stats.dropped_too_long} longer than "
            f"data.max_length and dropped (data.truncation=drop), {stats.dropped_no_target} "
            f"with no target token inside it; {fix}")


def build_splits(cfg: DataConfig, tokenizer, seed: int, ff_examples: int = 0) -> Splits:
    """Load, subsample, split (seeded) and encode the data of ``cfg``.

    The shuffled rows go: eval (unless ``eval_path``), then rows for the Fast Forward set
    until it holds ``ff_examples`` usable ones, then train; the three never share a row.

    Raises:
        DataError: a malformed row (unless ``skip_bad_rows``), or nothing left to train on.
    """
    stats = DataStats()
    has_template = tokenizer.chat_template is not None
    examples, fmt = load_examples(cfg.path, cfg, has_template, stats)
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    if cfg.max_examples is not None:
        order = order[: cfg.max_examples]
    if cfg.eval_path is not None:
        eval_ex, _ = load_examples(cfg.eval_path, cfg, has_template, DataStats())
        eval_ex, n_eval = eval_ex[: cfg.eval_examples], 0  # a None cap keeps them all
    else:
        n_eval = round(len(order) * cfg.eval_fraction)
        if cfg.eval_examples is not None:
            n_eval = min(n_eval, cfg.eval_examples)
        eval_ex = [examples[i] for i in order[:n_eval]]
    # The FF set takes rows in order until it holds ff_examples usable ones: a row encoding
    # to no target (a long prompt) would otherwise leave it smaller than asked, or empty.
    ff, taken = [], n_eval
    while len(ff) < ff_examples and taken < len(order):
        ff += encode_all([examples[order[taken]]], tokenizer, cfg, stats)[0]
        taken += 1
    train_ex = [examples[i] for i in order[taken:]]
    train, _ = encode_all(train_ex, tokenizer, cfg, stats)
    if ff_examples and not ff:
        raise DataError(cfg.path, "file", None, "no usable row left for the Fast Forward set "
                        "(fast_forward.eval_examples)")
    eval_enc, eval_src = encode_all(eval_ex, tokenizer, cfg, stats)
    if not train:
        raise DataError(cfg.path, "file", None, nothing_left(stats, cfg))
    if stats.truncated * 2 > len(train):  # the run would mostly learn from cut-off examples
        log.warning("%d of %d examples are longer than data.max_length=%d and were cut "
                    "(data.truncation=right)", stats.truncated, len(train) + len(eval_enc),
                    cfg.max_length)
    stats.train_examples, stats.eval_examples = len(train), len(eval_enc)
    stats.ff_examples = len(ff)
    log.info("data: %d rows (%s), %d train / %d eval examples, %d truncated, %d dropped, "
             "%d bad rows skipped", stats.rows_read, fmt, len(train), len(eval_enc),
             stats.truncated, stats.dropped_too_long + stats.dropped_no_target,
             stats.bad_rows_skipped)
    return Splits(train, eval_enc, eval_src, stats, fmt, ff)
