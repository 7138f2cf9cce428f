"""Trees: a shared context and its branches in one row, each branch attending to the
context and to itself only. Multiple-choice scoring lays a question's choices out this
way, and a preference pair its chosen and rejected completions after their prompt.

For a context ``c`` (``C`` tokens) with branches ``x_1 .. x_k`` the row is
``c x_1 x_2 .. x_k`` with

- positions ``0 .. C-1`` for the context and ``C .. C+|x_i|-1`` for every branch ``x_i``;
- an attention mask in which context token ``j`` sees context tokens ``<= j`` and branch
  token ``j`` of ``x_i`` sees the whole context and the tokens of ``x_i`` up to ``j``;
- the first token of every branch predicted from the context's last position, the others
  from the branch token before them.

Each branch then sees exactly the ids, positions and attention it would see in a row of
its own, so its log-probabilities are the same. The mask is a custom 4D mask, which
transformers uses as given (sdpa: boolean; eager: additive); users of trees check once
that a model honours it before relying on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leantune.data.encode import IGNORE, Encoded
from leantune.model.load import evaluating, first_line
from leantune.model.logprobs import sequence_logprobs
from leantune.model.rounding import tolerance_for
from leantune.packing.batching import pack_batch
from leantune.packing.collate import collate_padded


@dataclass
class Tree:
    """A shared context and one branch (continuation ids) per choice."""

    context: list[int]
    branches: list[list[int]]

    @property
    def length(self) -> int:
        return len(self.context) + sum(map(len, self.branches))


def collate_trees(rows: list[list[Tree]], pad_id: int, mask_dtype: torch.dtype
                  ) -> tuple[dict[str, torch.Tensor], list[list[tuple]]]:
    """Right-padded rows, each holding the trees of ``rows[r]`` side by side (block-
    diagonal, like packed examples), and, per tree (in row order) and branch, the
    ``(row, position predicting it, token)`` of every branch token.

    Returns:
        ``input_ids`` / ``position_ids`` [B, T], ``attention_mask`` [B, 1, T, T] (bool:
        True where attended; or additive in ``mask_dtype``: 0 / its minimum; pads attend
        to themselves only), ``prompt_position`` / ``prompt_length`` [B, T] (each context
        is its tree's prompt, as :mod:`leantune.packing.collate` marks prompts),
        ``token_mask`` [B, T], and the targets as tensors ``target_row``, ``target_at``,
        ``target_token``, ``target_branch`` [N] (the branch's index, trees in row order
        then branches) with ``num_examples`` the branches: what
        :func:`~leantune.model.logprobs.sequence_logprobs` sums per branch.
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
    flat = [(*tgt, b) for b, branch in enumerate(br for tree in targets for br in tree)
            for tgt in branch]
    row, at, token, branch = (torch.tensor(col, dtype=torch.long) for col in zip(*flat))
    real = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, row_trees in enumerate(rows):
        real[r, :sum(t.length for t in row_trees)] = True
    return {"input_ids": ids, "position_ids": pos, "attention_mask": mask[:, None],
            "prompt_position": prompt, "prompt_length": length, "token_mask": real,
            "target_row": row, "target_at": at, "target_token": token, "target_branch": branch,
            "num_examples": torch.tensor(sum(len(t) for t in targets))}, targets


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


def mask_dtype_for(model: torch.nn.Module) -> torch.dtype:
    """The tree mask's dtype for ``model``: boolean under sdpa (faster than an additive
    one), else additive in the model's floating dtype."""
    dtype = next(model.parameters()).dtype
    if model.config._attn_implementation == "sdpa":
        return torch.bool
    return dtype if dtype.is_floating_point else torch.float32


def pair_tree(prompt: list[int], chosen: list[int], rejected: list[int]) -> Tree:
    """A preference pair as a tree: its prompt once, the chosen and the rejected completion
    as branches (in that order: branches ``2i`` and ``2i + 1`` of a batch are pair ``i``)."""
    if not prompt:
        raise ValueError("a pair tree needs a prompt: its last token predicts each "
                         "completion's first")
    return Tree(prompt, [chosen, rejected])


def check_trees(model: torch.nn.Module, trees: list[Tree], pad_id: int, max_length: int
                ) -> str | None:
    """Why tree rows cannot stand in for rows of their own on ``model`` (None: they can):
    each branch's summed log-probability in tree rows of at most ``max_length`` positions,
    against ``context + branch`` in a padded row of its own, within rounding
    (:func:`~leantune.model.rounding.tolerance_for` the model's dtype, on logits); or the
    error a backend without custom 4D masks raises. No gradient; eval mode."""
    own = [Encoded(t.context + b, [IGNORE] * len(t.context) + b)
           for t in trees for b in t.branches]
    bins = pack_batch([t.length for t in trees], max(max_length, *(t.length for t in trees)))
    rows, order = [[trees[i] for i in b] for b in bins], [i for b in bins for i in b]
    device = next(model.parameters()).device
    with torch.no_grad(), evaluating(model):
        want, _ = sequence_logprobs(model, {k: v.to(device) for k, v in
                                            collate_padded(own, pad_id).items()})
        try:
            batch, _ = collate_trees(rows, pad_id, mask_dtype_for(model))
            got, _ = sequence_logprobs(model, {k: v.to(device) for k, v in batch.items()})
        except Exception as e:  # noqa: BLE001 - a backend without custom masks (flash-attn)
            return f"{type(e).__name__}: {first_line(e)}"
    per_tree, k = {}, 0
    for i in order:  # tree rows hold the trees in this order: back to the given one
        per_tree[i], k = got[k:k + len(trees[i].branches)], k + len(trees[i].branches)
    got = torch.cat([per_tree[i] for i in range(len(trees))])
    worst = float(((got - want).abs() / want.abs().clamp(min=1.0)).max())
    if worst > tolerance_for(next(model.parameters()).dtype).logits:
        return (f"a shared context gives log-probs {worst:.1e} (relative) from rows of "
                "their own: the model does not honour the tree mask")
    return None
