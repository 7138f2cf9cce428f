"""A preference run's data: the rows of ``data.path`` read as preference rows
(:mod:`leantune.data.preference`; a ``task:NAME`` path gives pairs of the gold answer and
a wrong one, :func:`~leantune.data.tasks.task_pair_rows`), shuffled (seeded) and split
into held-out, Fast Forward and training sets as
:func:`~leantune.data.dataset.build_splits` splits SFT rows, each row tokenized as TRL
tokenizes it.

Pair objectives (DPO, IPO, SimPO, ORPO) need ``pairs`` rows. KTO takes ``unpaired`` rows
and also pairs, each pair becoming a desirable and an undesirable example (TRL's
``unpair_preference_dataset``); each example then gets a mismatched completion for its
KL term (:func:`mismatch`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass

from leantune.config import ConfigError, DataConfig
from leantune.data.preference import (
    EncodedPreference,
    Preference,
    PreferenceStats,
    detect_preference_format,
    encode_preference,
    to_preference,
)
from leantune.data.rows import DataError
from leantune.data.sources import read_rows
from leantune.data.tasks import task_pair_rows

log = logging.getLogger(__name__)

PAIR_KINDS = ("dpo", "ipo", "simpo", "orpo")


@dataclass
class PreferenceSplits:
    """Encoded train / held-out / FF sets, the format read, and what reading kept."""

    train: list[EncodedPreference]
    eval: list[EncodedPreference]
    ff: list[EncodedPreference]
    format: str
    stats: PreferenceStats
    bad_rows_skipped: int = 0

    def to_dict(self) -> dict:
        return asdict(self.stats) | {"bad_rows_skipped": self.bad_rows_skipped,
                                     "train_examples": len(self.train),
                                     "eval_examples": len(self.eval),
                                     "ff_examples": len(self.ff)}


def read_preferences(path: str, cfg: DataConfig, kind: str, skipped: list[str]
                     ) -> tuple[list[Preference], str]:
    """Every row of ``path`` as a :class:`Preference` (bad rows raise, or with
    ``data.skip_bad_rows`` are appended to ``skipped``), and the file's format.

    Raises:
        DataError: a malformed row, a row of another format than the first's, or rows
            that are not preference rows at all.
    """
    rows, fmt = [], None

    def skip(error: DataError) -> None:
        if not cfg.skip_bad_rows:
            raise error
        skipped.append(str(error))

    source = (task_pair_rows(path, cfg.split) if path.startswith("task:")
              else read_rows(path, cfg.split, skip if cfg.skip_bad_rows else None))
    for row in source:
        found = detect_preference_format(row.record)
        try:
            if found is None:
                raise DataError(row.source, row.where, None, _not_preference(row.record, kind))
            if fmt is not None and found != fmt:
                raise DataError(row.source, row.where, None, f"a row in the {found} format, "
                                f"in a file of {fmt} rows; keep one format per file")
            rows.append(to_preference(row, found))
            fmt = found
        except DataError as e:
            skip(e)
    if not rows:
        raise DataError(path, "file", None, f"no usable preference rows ({len(skipped)} "
                        "malformed and skipped)" if skipped else "empty: no rows to train on")
    if fmt == "unpaired" and kind in PAIR_KINDS:
        raise ConfigError(f"objective.kind={kind} compares a chosen and a rejected completion, "
                          f"and {path} holds unpaired prompt/completion/label rows: use "
                          "objective.kind=kto, or pair the rows (chosen / rejected)")
    return rows, fmt or "pairs"


def _not_preference(record, kind: str) -> str:
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    return (f"not a preference row (keys {keys}); objective.kind={kind} reads "
            "{prompt, chosen, rejected}, {chosen, rejected} conversations, or KTO's "
            "{prompt, completion, label}")


def is_pair_file(path: str) -> bool:
    """Whether the first row of ``path`` is a preference row (``chosen``/``rejected`` or
    ``prompt``/``completion``/``label``)."""
    if path.startswith("task:"):
        return False  # a task trains SFT on its gold answers, or gives pairs when asked
    first = next(iter(read_rows(path)), None)
    return first is not None and detect_preference_format(first.record) is not None


def unpair(rows: list[Preference]) -> list[Preference]:
    """Each pair as two unpaired rows: the chosen completion desirable, the rejected not."""
    out = []
    for p in rows:
        if p.rejected is None:
            out.append(p)
            continue
        out += [Preference(p.source, p.prompt, p.chosen, label=True),
                Preference(p.source, p.prompt, p.rejected, label=False)]
    return out


def mismatch(items: list[EncodedPreference], seed: int, max_length: int) -> None:
    """KTO: give each unpaired example (in place) a mismatched completion as its
    ``rejected``: the next one's in a seeded shuffle, cut to fit ``max_length`` after its
    own prompt (the ``y′`` of its KL term; :mod:`leantune.objectives.kto`)."""
    order = list(range(len(items)))
    random.Random(seed + 1).shuffle(order)
    for k, i in enumerate(order):
        other = items[order[k - 1]]
        items[i].rejected = other.chosen[:max_length - len(items[i].prompt)]


def encode_rows(rows: list[Preference], tokenizer, max_length: int, stats: PreferenceStats
                ) -> list[EncodedPreference]:
    encoded = (encode_preference(p, tokenizer, max_length, stats) for p in rows)
    return [e for e in encoded if e is not None]


def build_preference_splits(cfg: DataConfig, tokenizer, seed: int, kind: str,
                            ff_examples: int = 0) -> PreferenceSplits:
    """Load, subsample, split (seeded) and encode the preference rows of ``cfg.path``.

    The shuffled rows go: held out (unless ``eval_path``), then the Fast Forward set until
    it holds ``ff_examples`` kept ones, then training; the three never share a row. For
    KTO, rows are unpaired after the split (:func:`unpair`).
    """
    skipped: list[str] = []
    rows, fmt = read_preferences(cfg.path, cfg, kind, skipped)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if cfg.max_examples is not None:
        order = order[:cfg.max_examples]
    stats = PreferenceStats()
    if cfg.eval_path is not None:
        held, _ = read_preferences(cfg.eval_path, cfg, kind, skipped)
        held, n_eval = held[:cfg.eval_examples], 0
    else:
        n_eval = round(len(order) * cfg.eval_fraction)
        if cfg.eval_examples is not None:
            n_eval = min(n_eval, cfg.eval_examples)
        held = [rows[i] for i in order[:n_eval]]
    trains = unpair if kind == "kto" else list
    ff: list[EncodedPreference] = []
    taken = n_eval
    while len(ff) < ff_examples and taken < len(order):
        ff += encode_rows(trains([rows[order[taken]]]), tokenizer, cfg.max_length, stats)
        taken += 1
    train = encode_rows(trains([rows[i] for i in order[taken:]]), tokenizer, cfg.max_length,
                        stats)
    held_out = encode_rows(trains(held), tokenizer, cfg.max_length, stats)
    if kind == "kto":
        for i, items in enumerate((train, held_out, ff)):
            mismatch(items, seed + i, cfg.max_length)
    if ff_examples and not ff:
        raise DataError(cfg.path, "file", None, "no usable row left for the Fast Forward set "
                        "(fast_forward.eval_examples)")
    if not train:
        raise DataError(cfg.path, "file", None, f"no training pair left: {stats.rows} read, "
                        f"{stats.dropped_prompt_too_long} with a prompt of data.max_length="
                        f"{cfg.max_length} tokens or more, {stats.dropped_same_completions} "
                        "with the same chosen and rejected completion")
    log.info("data: %d %s rows, %d train / %d held-out / %d FF, %d truncated, %d dropped "
             "(prompt too long: %d, same completions: %d), %d bad rows skipped", len(rows), fmt,
             len(train), len(held_out), len(ff), stats.truncated,
             stats.dropped_prompt_too_long + stats.dropped_same_completions,
             stats.dropped_prompt_too_long, stats.dropped_same_completions, len(skipped))
    return PreferenceSplits(train, held_out, ff, fmt, stats, len(skipped))
