"""What the loop reads, for either kind of data (``data.mode``): training micro-batches,
the held-out sets evaluated at every eval, the Fast Forward set, and counts.

- ``examples``: rows are examples (fine-tuning), split into train / eval / FF rows and
  batched by :class:`~leantune.packing.batching.Batcher`.
- ``corpus``: raw text (continual pre-training), tokenized once into cached shards and
  fed as windows by :class:`~leantune.train.replay.CorpusFeed`, with replay of an earlier
  corpus. Whole documents of each corpus are held out for eval (and FF).

Every corpus of ``data.eval_corpora`` (and the replayed one) adds a held-out set, so
forgetting of old data and adaptation to the new are both measured at every eval.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate import Accelerator

from leantune.config import Config, ConfigError
from leantune.data.corpus import build_corpus
from leantune.data.dataset import build_splits
from leantune.data.encode import Encoded
from leantune.data.formats import Example
from leantune.data.preference import EncodedPreference
from leantune.data.preference_sets import build_preference_splits
from leantune.data.prompt_sets import build_prompt_splits, probe_examples
from leantune.data.sources import DataError, set_name
from leantune.data.windows import TokenCorpus, Windows, document_chunks, held_out
from leantune.packing.batching import Batcher
from leantune.packing.pairs import PairBatcher
from leantune.packing.probe_compare import Rows
from leantune.train.fast_forward import ff_set_size
from leantune.train.replay import CorpusFeed
from leantune.train.rollouts import Rollouts
from leantune.train.state import TrainState, epoch_plan, micro_batches


@dataclass
class EvalSet:
    """A held-out set: ``role`` is ``data`` (from data.path or data.eval_path), ``replay``
    or ``extra`` (data.eval_corpora). A preference run's are pairs."""

    name: str
    role: str
    examples: list[Encoded] | list[EncodedPreference]


@dataclass
class TrainData:
    batcher: Batcher | PairBatcher  # lays out training rows (examples mode), eval, FF
    eval_sets: list[EvalSet]      # the first is the main one (summary's eval_loss)
    ff: list[Encoded] | list[EncodedPreference]
    prompts_from: list[Example]   # held-out rows that can serve as generation prompts
    stats: dict                   # counts for summary.json
    feed: CorpusFeed | None = None
    keys: dict[str, str] = field(default_factory=dict)  # corpus content keys per stream
    rollouts: Rollouts | None = None  # grpo: the batches are sampled (the batcher: probes)

    def steps(self, cfg: Config, world: int) -> int:
        """``train.max_steps``, or the optimizer steps of ``train.epochs`` passes."""
        if cfg.train.max_steps is not None:
            return cfg.train.max_steps
        if self.rollouts is not None:
            return self.rollouts.steps(cfg.train.epochs)
        if self.feed is not None:
            return self.feed.steps(cfg.train.epochs,
                                   cfg.train.batch_size * world * cfg.train.grad_accum)
        per_epoch = math.ceil(len(epoch_plan(self.batcher.unit_lengths, cfg, world, 0))
                              / cfg.train.grad_accum)
        return max(1, math.ceil(cfg.train.epochs * per_epoch))

    def micro_batches(self, cfg: Config, state: TrainState, acc: Accelerator, total_steps: int
                      ) -> Iterator[dict[str, torch.Tensor]]:
        if self.feed is None:
            return micro_batches(self.batcher, cfg, state, acc)
        t = cfg.train
        return self.feed.micro_batches(state, t.batch_size, t.grad_accum, acc.num_processes,
                                       acc.process_index, total_steps, t.seed, acc.device)

    def use_padding(self) -> None:
        """Lay every training micro-batch out padded (the packing probe found packing
        inexact on this model)."""
        b = self.batcher
        self.batcher = (b.with_layout("none") if isinstance(b, PairBatcher)
                        else Batcher.build(b.examples, "none", b.max_length, b.pad_id))
        if self.feed is not None:
            self.feed.mode = "none"
        if self.rollouts is not None:
            self.rollouts.mode = "none"

    @property
    def num_train(self) -> str:
        if self.rollouts is not None:
            return f"{len(self.rollouts.splits.train)} train prompts"
        if self.feed is None:
            return f"{len(self.batcher.examples)} train examples"
        return " + ".join(f"{len(w)} {name} windows" for name, w in self.feed.windows.items())


def build_data(cfg: Config, tokenizer, mode: str, acc: Accelerator, shared: bool = True
               ) -> TrainData:
    """Everything the loop reads, for ``cfg.data.mode`` and ``cfg.objective``; ``mode``
    is the packing layout asked for (the model's probe may turn it off later), ``shared``
    whether pairs may hold their prompt once."""
    d = cfg.data
    ff_n = (ff_set_size(cfg.fast_forward, cfg.train.batch_size * cfg.train.grad_accum)
            if cfg.fast_forward.enabled else 0)
    taken: set[str] = set()
    if d.mode == "corpus":
        data = corpus_data(cfg, tokenizer, mode, ff_n, taken, acc)
    elif cfg.objective.kind == "grpo":
        data = prompt_data(cfg, tokenizer, mode, acc)
    elif cfg.objective.kind != "sft":
        splits = build_preference_splits(d, tokenizer, cfg.train.seed, cfg.objective.kind,
                                         ff_n)
        pairs = PairBatcher(splits.train, mode, d.max_length, tokenizer.pad_token_id,
                            shared=shared and cfg.objective.shared_prompt)
        data = TrainData(pairs, [EvalSet(set_name(d.eval_path or d.path, taken), "data",
                                         splits.eval)], splits.ff, [],
                         splits.to_dict() | {"format": splits.format})
    else:
        splits = build_splits(d, tokenizer, cfg.train.seed, ff_n)
        batcher = Batcher.build(splits.train, mode, d.max_length, tokenizer.pad_token_id,
                                d.packing_strategy)
        data = TrainData(batcher, [EvalSet(set_name(d.eval_path or d.path, taken), "data",
                                           splits.eval)], splits.ff, splits.eval_examples,
                         splits.stats.to_dict() | {"format": splits.format})
    for name, path in d.eval_corpora.items():
        if name in taken:
            raise ConfigError(f"data.eval_corpora: {name!r} already names a held-out set "
                              f"({sorted(taken)}); choose another name")
        corpus = open_corpus(cfg, path, tokenizer, acc)
        (docs,) = held_out(corpus, [eval_budget(cfg, corpus)])
        taken.add(name)
        data.eval_sets.append(EvalSet(name, "extra", document_chunks(
            corpus, docs, d.max_length, d.eval_tokens)))
        data.stats.setdefault("corpora", {})[name] = corpus_stats(corpus, docs)
    return data


def prompt_data(cfg: Config, tokenizer, mode: str, acc: Accelerator) -> TrainData:
    """GRPO's prompts: sampled from at every step by the rollout stage; the batcher holds
    the first prompts with a stand-in completion, what the packing probe and the start-up
    checks run on."""
    splits = build_prompt_splits(cfg.data, tokenizer, cfg.train.seed,
                                 cfg.objective.max_completion_length)
    probe = probe_examples(splits.train[:PROBE_PROMPTS], tokenizer, cfg.data.max_length)
    batcher = Batcher.build(probe, mode, cfg.data.max_length, tokenizer.pad_token_id)
    return TrainData(batcher, [], [], [], splits.stats | {"format": "prompts"},
                     rollouts=Rollouts(cfg, splits, tokenizer, acc))


def corpus_data(cfg: Config, tokenizer, mode: str, ff_n: int, taken: set[str],
                acc: Accelerator) -> TrainData:
    """Corpus mode: windows of data.path (and the replayed corpus), held-out documents."""
    d, length = cfg.data, cfg.data.max_length
    main = open_corpus(cfg, d.path, tokenizer, acc)
    eval_docs, ff_docs = held_out(main, [eval_budget(cfg, main) if d.eval_path is None
                                         else (0, 0), (ff_n * length, ff_n * length)])
    if ff_n and not len(ff_docs):
        raise DataError(d.path, "corpus", None, "no document left for the Fast Forward set "
                        "(fast_forward.eval_examples)")
    batcher = Batcher.build([], mode, length, tokenizer.pad_token_id)
    data = TrainData(batcher, [], document_chunks(main, ff_docs, length, ff_n * length), [],
                     {"format": "corpus", "corpora": {}})
    name, windows = _stream(data, d.path, main, eval_docs, ff_docs, length=length,
                            stream="data", taken=taken)
    windows = {"data": windows}
    if d.eval_path is None:
        data.eval_sets.append(EvalSet(name, "data", document_chunks(main, eval_docs, length,
                                                                    d.eval_tokens)))
    else:
        other = open_corpus(cfg, d.eval_path, tokenizer, acc)
        data.eval_sets.append(EvalSet(set_name(d.eval_path, taken), "data", document_chunks(
            other, np.arange(other.num_documents), length, d.eval_tokens)))
    if d.replay.path is not None:
        old = open_corpus(cfg, d.replay.path, tokenizer, acc)
        (old_docs,) = held_out(old, [eval_budget(cfg, old)])
        old_name, windows["replay"] = _stream(data, d.replay.path, old, old_docs,
                                              length=length, stream="replay", taken=taken)
        data.eval_sets.append(EvalSet(old_name, "replay", document_chunks(
            old, old_docs, length, d.eval_tokens)))
    data.feed = CorpusFeed(windows, d.replay, mode, tokenizer.pad_token_id)
    return data


def _stream(data: TrainData, path: str, corpus: TokenCorpus, *held: np.ndarray, length: int,
            stream: str, taken: set[str]) -> tuple[str, Windows]:
    """A set name and the training windows of ``corpus`` without its ``held`` documents,
    recorded in ``data``'s counts and content keys."""
    windows = Windows.over(corpus, length, np.concatenate(held))
    if not len(windows):
        raise DataError(path, "corpus", None, f"fewer than data.max_length={length} tokens "
                        f"left for training after the held-out documents ({windows.num_tokens})")
    name = set_name(path, taken)
    data.stats["corpora"][name] = corpus_stats(corpus, *held) | {"train_windows": len(windows)}
    data.keys[stream] = corpus.key
    return name, windows


def open_corpus(cfg: Config, path: str, tokenizer, acc: Accelerator) -> TokenCorpus:
    """The tokenized corpus at ``path`` (one process tokenizes, the others wait and reuse).

    Raises:
        DataError: bad rows or files were skipped when this corpus was cached and
            ``data.skip_bad_rows`` is false now.
    """
    d = cfg.data
    with acc.main_process_first():
        directory = build_corpus(path, tokenizer, d.cache_dir, d.text_field, d.glob, d.split,
                                 d.skip_bad_rows, progress=acc.is_main_process and
                                 cfg.train.progress)
    corpus = TokenCorpus(directory)
    if corpus.meta["bad_skipped"] and not d.skip_bad_rows:
        raise DataError(path, "corpus", None, f"{corpus.meta['bad_skipped']} bad rows or files "
                        f"(first: {corpus.meta['bad_samples'][0]}); fix them or set "
                        "data.skip_bad_rows=true")
    return corpus


def eval_budget(cfg: Config, corpus: TokenCorpus) -> tuple[int, int]:
    """``(tokens, documents)`` held out of a corpus for eval: ``data.eval_tokens``, in at
    most ``eval_fraction`` of the documents (at least one) and ``eval_examples``."""
    d = cfg.data
    docs = max(1, math.floor(d.eval_fraction * corpus.num_documents)) if d.eval_fraction else 0
    if d.eval_examples is not None:
        docs = min(docs, d.eval_examples)
    return d.eval_tokens, docs


def corpus_stats(corpus: TokenCorpus, *held: np.ndarray) -> dict:
    return {"tokens": corpus.num_tokens, "documents": corpus.num_documents,
            "held_out_documents": sum(len(h) for h in held),
            "empty_skipped": corpus.meta["empty_skipped"],
            "bad_skipped": corpus.meta["bad_skipped"], "key": corpus.key}


PROBE_PAIRS = 2  # pairs whose completions the packing probe checks
PROBE_PROMPTS = 16  # grpo: prompts (with a stand-in completion) the probe can draw on


def first_rows(data, cfg: Config, world: int) -> Rows:
    """Process 0's first micro-batch of epoch 0 (as :class:`~leantune.train.data.TrainData`
    would hand it out), as packed rows of examples. Of a preference run, the completions
    of its first :data:`PROBE_PAIRS` pairs: the shared-prompt layout, which does not
    restart positions, has a check of its own (:func:`~leantune.packing.trees.check_trees`)."""
    if data.feed is not None:
        per_micro = cfg.train.batch_size * world
        units = data.feed.step_units(TrainState(), per_micro * cfg.train.grad_accum, 1,
                                     cfg.train.seed)
        return data.feed.packed_rows(units[:per_micro][::world])
    plan = epoch_plan(data.batcher.unit_lengths, cfg, world, 0)
    first = next(b for b in plan if len(b) >= world)[::world]
    if isinstance(data.batcher, PairBatcher):
        first = first[:PROBE_PAIRS]
    return data.batcher.packed_rows(first)
