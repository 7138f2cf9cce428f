"""Every choice of a question in one row (:mod:`leantune.packing.trees`): the shared
context once, each continuation a branch that attends to the context and to itself only,
so each branch's log-likelihood is the one it has in a row of its own, for ``C + sum
|x_i|`` positions instead of ``k C + sum |x_i|`` (BoolQ: about half; HellaSwag: about a
third fewer). :class:`~leantune.eval.multiple_choice.ChoiceScorer` checks on the first
documents that the result equals one row per choice before relying on it, and falls back
otherwise.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from leantune.data.tasks import ChoiceDoc
from leantune.eval.requests import encode_pair
from leantune.eval.shard import gather_scores, my_share
from leantune.model.load import evaluating
from leantune.model.logprobs import logprobs_at
from leantune.packing.batching import pack_batch
from leantune.packing.trees import Tree, collate_trees, mask_dtype_for


def build_trees(docs: list[ChoiceDoc], tokenizer, max_length: int) -> list[Tree | None]:
    """A :class:`Tree` per document whose choices share one context and fit in
    ``max_length`` positions (None for the others: WinoGrande's one context per choice,
    or too long), tokenized as :func:`~leantune.eval.requests.encode_pair` does."""
    trees = []
    for d in docs:
        pairs = [encode_pair(tokenizer, c, x) for c, x in zip(d.contexts, d.continuations)]
        ctx = pairs[0][0]
        tree = Tree(ctx, [x for _, x in pairs])
        shared = all(c == ctx for c, _ in pairs) and ctx and all(tree.branches)
        trees.append(tree if shared and tree.length <= max_length else None)
    return trees


@torch.no_grad()
def tree_loglikelihoods(model: torch.nn.Module, trees: list[Tree], batch_size: int,
                        max_length: int, pad_id: int, acc: Accelerator) -> list[list[float]]:
    """Every branch's summed log-likelihood, per tree (sharded over processes, gathered on
    all of them): ``batch_size`` trees per forward, longest first, side by side in rows of
    at most ``max_length`` positions."""
    device = next(model.parameters()).device
    mask_dtype = mask_dtype_for(model)
    mine = my_share(len(trees), acc, key=lambda i: -trees[i].length)
    scores: dict[int, list[float]] = {}
    with evaluating(model):
        for k in range(0, len(mine), batch_size):
            chunk = mine[k:k + batch_size]
            rows = [[chunk[j] for j in b]
                    for b in pack_batch([trees[i].length for i in chunk], max_length)]
            order = [i for row in rows for i in row]  # the order the targets come in
            batch, targets = collate_trees([[trees[i] for i in row] for row in rows], pad_id,
                                           mask_dtype)
            flat = [tgt for tree in targets for branch in tree for tgt in branch]
            row_ix, at, tok = (torch.tensor(col, device=device) for col in zip(*flat))
            batch = {key: v.to(device) for key, v in batch.items()}
            lp = logprobs_at(model, batch, row_ix, at, tok).cpu()
            n = 0
            for i, tree in zip(order, targets):
                scores[i] = []
                for branch in tree:
                    scores[i].append(float(lp[n:n + len(branch)].double().sum()))
                    n += len(branch)
    return gather_scores(scores, len(trees), acc)

