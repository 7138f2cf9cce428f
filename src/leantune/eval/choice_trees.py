"""Every choice of a question in one row: the shared context once, each continuation a
branch that attends to the context and to itself only.

For a document whose choices share their context ``c`` (``C`` tokens) with continuations
``x_1 .. x_k`` the row is ``c x_1 x_2 .. x_k`` with

- positions ``0 .. C-1`` for the context and ``C .. C+|x_i|-1`` for every branch ``x_i``;
- an attention mask in which context token ``j`` sees context tokens ``<= j`` and branch
  token ``j`` of ``x_i`` sees the whole context and the tokens of ``x_i`` up to ``j``;
- the first token of every branch predicted from the context's last position, the others
  from the branch token before them.

Each branch then sees exactly the ids, positions and attention it would see in a row of
its own, so its log-likelihood is the same, for ``C + sum |x_i|`` positions instead of
``k C + sum |x_i|`` (BoolQ: about half; HellaSwag: about a third fewer). The mask is a
custom 4D additive mask, which transformers uses as given; :class:`~leantune.
multiple_choice.ChoiceScorer` checks on the first documents that the result equals one row
per choice before relying on it, and falls back otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator

from leantune.data.tasks import ChoiceDoc
from leantune.eval.requests import encode_pair
from leantune.eval.shard import gather_scores, my_share
from leantune.model.head import head_at
from leantune.model.load import evaluating
from leantune.model.logprobs import model_inputs
from leantune.packing.batching import pack_batch


@dataclass
class Tree:
    """A shared context and one branch (continuation ids) per choice."""

    context: list[int]
    branches: list[list[int]]

    @property
    def length(self) -> int:
        return len(self.context) + sum(map(len, self.branches))


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


def collate_trees(rows: list[list[Tree]], pad_id: int, mask_dtype: torch.dtype
                  ) -> tuple[dict[str, torch.Tensor], list[list[tuple]]]:
    """Right-padded rows, each holding the trees of ``rows[r]`` side by side (block-
    diagonal, like packed examples), and, per tree (in row order) and branch, the
    ``(row, position predicting it, token)`` of every branch token.

    Returns:
        ``input_ids`` / ``position_ids`` [B, T], ``attention_mask`` [B, 1, T, T] (bool:
        True where attended; or additive in ``mask_dtype``: 0 / its minimum; pads attend
        to themselves only), and ``prompt_position`` / ``prompt_length`` [B, T]: each
        context is its tree's prompt (as :mod:`leantune.packing.collate` marks prompts).
    """
    width = max(sum(t.length for t in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    allowed = torch.zeros((len(rows), width, width), dtype=torch.bool)
    allowed[:, torch.arange(width), torch.arange(width)] = True  # pads see themselves
    prompt = torch.full((len(rows), width), -1, dtype=torch.long)
    length = torch.zeros((len(rows), width), dtype=torch.long)
    targets = []
    for r, row in enumerate(rows):
        at = 0
        for t in row:
            targets.append(_place(t, r, at, ids, pos, allowed, prompt, length))
            at += t.length
    if mask_dtype == torch.bool:
        mask = allowed
    else:
        mask = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill(
            ~allowed, torch.finfo(mask_dtype).min)
    return {"input_ids": ids, "position_ids": pos, "attention_mask": mask[:, None],
            "prompt_position": prompt, "prompt_length": length}, targets


def _place(t: Tree, r: int, at: int, ids, pos, allowed, prompt, length) -> list[list[tuple]]:
    """Write tree ``t`` into row ``r`` from position ``at``; its branches' targets."""
    n = len(t.context)
    ids[r, at:at + n] = torch.tensor(t.context)
    pos[r, at:at + n] = torch.arange(n)
    allowed[r, at:at + n, at:at + n] = torch.ones(n, n, dtype=torch.bool).tril()
    prompt[r, at:at + n], length[r, at:at + n] = torch.arange(n), n
    start, branches = at + n, []
    for x in t.branches:
        end = start + len(x)
        ids[r, start:end] = torch.tensor(x)
        pos[r, start:end] = torch.arange(n, n + len(x))
        allowed[r, start:end, at:at + n] = True
        allowed[r, start:end, start:end] = torch.ones(len(x), len(x), dtype=torch.bool).tril()
        branches.append([(r, at + n - 1 if j == 0 else start + j - 1, tok)
                         for j, tok in enumerate(x)])
        start = end
    return branches


@torch.no_grad()
def tree_loglikelihoods(model: torch.nn.Module, trees: list[Tree], batch_size: int,
                        max_length: int, pad_id: int, acc: Accelerator) -> list[list[float]]:
    """Every branch's summed log-likelihood, per tree (sharded over processes, gathered on
    all of them): ``batch_size`` trees per forward, longest first, side by side in rows of
    at most ``max_length`` positions."""
    device = next(model.parameters()).device
    # sdpa takes a boolean mask (faster than an additive one); eager adds the mask.
    dtype = next(model.parameters()).dtype
    mask_dtype = torch.bool if model.config._attn_implementation == "sdpa" else (
        dtype if dtype.is_floating_point else torch.float32)
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
            # The head runs only where a branch token is predicted; a context's last
            # position predicts every branch's first token, so positions repeat.
            select = torch.zeros(batch["input_ids"].shape, dtype=torch.bool, device=device)
            select[row_ix, at] = True
            with head_at(model, select):
                batch = {key: v.to(device) for key, v in batch.items()}
                logits = model(**model_inputs(batch, model)).logits
            if logits.dim() == 2:  # [N, V] in row-major order of ``select``
                logits = logits[select.flatten().cumsum(0).sub(1).view(select.shape)[row_ix, at]]
            else:
                logits = logits[row_ix, at]
            lp = logits.float().log_softmax(-1).gather(-1, tok[:, None])[:, 0].cpu()
            n = 0
            for i, tree in zip(order, targets):
                scores[i] = []
                for branch in tree:
                    scores[i].append(float(lp[n:n + len(branch)].double().sum()))
                    n += len(branch)
    return gather_scores(scores, len(trees), acc)

