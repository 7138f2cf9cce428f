"""Multiple-choice accuracy by log-likelihood, with lm-evaluation-harness's definitions.

Each choice ``i`` of a document is one request ``(context_i, continuation_i)``, tokenized
as lm-evaluation-harness tokenizes it for a causal LM: trailing spaces of the context move
to the continuation, ``whole = tok(context + continuation)``, ``ctx = tok(context)`` and
the continuation is ``whole[len(ctx):]``; a request longer than ``max_length`` loses
tokens from the left of its context. Its score is

    ll_i = sum over continuation tokens t of log p(t | everything before it)

and, over the ``n`` documents of a task,

- ``acc = mean(argmax_i ll_i == gold)``;
- ``acc_norm = mean(argmax_i ll_i / len(choice_i) == gold)``, ``len`` in characters of
  the bare choice text (lm-evaluation-harness's ``acc_norm``);
- each with a 95 % Wilson score interval, and the macro average over tasks with a normal
  interval from the tasks' standard errors (``sqrt(sum SE_t^2) / T``).

The choices of a document that share a context are scored in one row (the context once,
each continuation a branch: :mod:`leantune.eval.choice_trees`); the other requests are batched
longest first and packed into rows when the packing probe finds packing exact on the
model, else padded.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from leantune.data.encode import Encoded
from leantune.data.tasks import ChoiceDoc
from leantune.eval.choice_trees import build_trees, tree_loglikelihoods
from leantune.eval.requests import requests
from leantune.eval.shard import gather_scores, my_share
from leantune.model.flops import FlopModel
from leantune.model.load import evaluating
from leantune.model.logprobs import dense, target_logprobs
from leantune.packing.batching import pack_batch
from leantune.packing.collate import collate_padded, collate_rows
from leantune.packing.trees import check_trees

log = logging.getLogger(__name__)

Z95 = 1.959964


@torch.no_grad()
def loglikelihoods(model: torch.nn.Module, encoded: list[Encoded], batch_size: int,
                   mode: str, max_length: int, pad_id: int, acc: Accelerator) -> list[float]:
    """The summed target log-probability of every request (sharded over processes, the
    result gathered on all of them), ``batch_size`` requests per forward, laid out
    ``online`` (packed) or ``none`` (padded)."""
    device = next(model.parameters()).device
    mine = my_share(len(encoded), acc, key=lambda i: -len(encoded[i].input_ids))
    scores: dict[int, float] = {}
    with evaluating(model):
        for k in range(0, len(mine), batch_size):
            ids = mine[k:k + batch_size]
            if mode == "none":
                rows = [[i] for i in ids]
                batch = collate_padded([encoded[i] for i in ids], pad_id)
            else:
                bins = pack_batch([len(encoded[i].input_ids) for i in ids], max_length)
                rows = [[ids[j] for j in b] for b in bins]
                batch = collate_rows([[encoded[i] for i in r] for r in rows], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            lp = dense(target_logprobs(model, batch), batch).cpu()
            for r, row in enumerate(rows):
                offset = 0
                for i in row:
                    n = len(encoded[i].input_ids)
                    scores[i] = float(lp[r, offset:offset + n].sum())
                    offset += n
    return gather_scores(scores, len(encoded), acc)


def wilson(p: float, n: int, z: float = Z95) -> list[float]:
    """The Wilson score interval of a proportion ``p`` of ``n`` trials."""
    if n == 0:
        return [math.nan, math.nan]
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def score_docs(docs: list[ChoiceDoc], lls: list[float]) -> dict:
    """``acc``, ``acc_norm`` (with 95 % intervals) and the per-document predictions from
    the requests' log-likelihoods ``lls`` (in :func:`requests`' order)."""
    k, hits, hits_norm, preds = 0, 0, 0, []
    for d in docs:
        ll = lls[k:k + len(d.choices)]
        k += len(d.choices)
        pred = max(range(len(ll)), key=ll.__getitem__)
        pred_norm = max(range(len(ll)), key=lambda i: ll[i] / max(len(d.choices[i]), 1))
        hits += pred == d.gold
        hits_norm += pred_norm == d.gold
        preds.append(pred)
    n = len(docs)
    acc, acc_norm = hits / max(n, 1), hits_norm / max(n, 1)
    return {"docs": n, "acc": acc, "acc_ci": wilson(acc, n), "acc_norm": acc_norm,
            "acc_norm_ci": wilson(acc_norm, n), "predictions": preds}


def macro(tasks: dict[str, dict]) -> dict:
    """Unweighted mean of the tasks' ``acc`` and ``acc_norm``, with a normal 95 % interval
    from their standard errors ``sqrt(p (1 - p) / n)``."""
    out = {"tasks": len(tasks)}
    for key in ("acc", "acc_norm"):
        ps = [(t[key], t["docs"]) for t in tasks.values() if t["docs"]]
        if not ps:
            out[key], out[f"{key}_ci"] = math.nan, [math.nan, math.nan]
            continue
        mean = sum(p for p, _ in ps) / len(ps)
        se = math.sqrt(sum(p * (1 - p) / n for p, n in ps)) / len(ps)
        out[key], out[f"{key}_ci"] = mean, [mean - Z95 * se, mean + Z95 * se]
    return out


@dataclass
class ChoiceScorer:
    """Scores lists of documents on one model: its tokenizer, row length, layout.

    ``share_context``: documents whose choices share a context are scored as one tree row
    each (:mod:`leantune.eval.choice_trees`), once checked on this model to give the same
    log-likelihoods as one row per choice (checked on the first call; a mismatch turns it
    off with a warning). Off for prompt tuning, whose virtual tokens a custom mask does not
    cover.
    """

    tokenizer: object
    max_length: int
    batch_size: int
    mode: str                       # online | none: the layout of one row per choice
    acc: Accelerator
    flop_model: FlopModel | None = None  # to count the forwards' FLOPs
    share_context: bool = True
    _checked: bool = False

    def score(self, model: torch.nn.Module, docs: list[ChoiceDoc]) -> dict:
        """:func:`score_docs` of ``docs``, plus ``tokens`` scored and their forward
        ``flops`` (each request counted alone, the head at its continuation, as
        :meth:`FlopModel.forward_examples` does)."""
        encoded = requests(docs, self.tokenizer, self.max_length)
        starts = [0]
        for d in docs:
            starts.append(starts[-1] + len(d.choices))
        trees = (build_trees(docs, self.tokenizer, self.max_length) if self.share_context
                 else [None] * len(docs))
        if not self._checked and any(trees):
            self._check(model, trees)
        lls: list[float | None] = [None] * len(encoded)
        if self.share_context:
            shared = [i for i, t in enumerate(trees) if t is not None]
            for i, branch in zip(shared, tree_loglikelihoods(
                    model, [trees[i] for i in shared], self.batch_size, self.max_length,
                    self.tokenizer.pad_token_id, self.acc)):
                lls[starts[i]:starts[i + 1]] = branch
        rest = [j for j, ll in enumerate(lls) if ll is None]
        for j, ll in zip(rest, self._flat(model, [encoded[j] for j in rest])):
            lls[j] = ll
        flops = self.flop_model.forward_examples(encoded) if self.flop_model else None
        return score_docs(docs, lls) | {"tokens": sum(len(e.input_ids) for e in encoded),
                                        "flops": flops}

    def _flat(self, model: torch.nn.Module, encoded: list[Encoded]) -> list[float]:
        return loglikelihoods(model, encoded, self.batch_size, self.mode, self.max_length,
                              self.tokenizer.pad_token_id, self.acc)

    def _check(self, model: torch.nn.Module, trees: list, n: int = 8) -> None:
        """Tree rows against one row per choice on the first ``n`` shared documents
        (:func:`~leantune.packing.trees.check_trees`); one row per choice from then on
        where they differ."""
        self._checked = True
        reason = check_trees(model, [t for t in trees if t is not None][:n],
                             self.tokenizer.pad_token_id, self.max_length)
        if reason is not None:
            log.warning("scoring choices on a shared context: %s; scoring one row per choice",
                        reason)
            self.share_context = False
