"""Sampled completions as a training micro-batch for GRPO, plus the per-completion and
per-token values the loss reads (:mod:`leantune.objectives.grpo`). Three layouts:

- ``none`` / ``online``: each prompt + completion one example (labels on the completion
  only), padded or packed as any examples are (:mod:`leantune.packing.collate`);
- ``trees``: each prompt once with its group's completions as branches
  (:mod:`leantune.packing.trees`): a group of ``G`` completions of ``c`` tokens after a
  ``p``-token prompt costs ``p + G c`` positions instead of ``G (p + c)`` (on the
  example's additions, 54 + 8 x 12 = 150 against 528: 3.5x fewer), with the same
  log-probabilities where the model honours the tree mask (checked at start-up).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leantune.data.encode import IGNORE, Encoded
from leantune.packing.batching import pack_batch
from leantune.packing.collate import collate_packed, collate_padded
from leantune.packing.trees import Tree, collate_trees


@dataclass
class Rollout:
    """One sampled completion of a prompt, and what its loss needs."""

    prompt: list[int]
    completion: list[int]
    advantage: float = 0.0
    group: int = 0  # rollouts of one prompt share a group (a tree in the trees layout)
    old: list[float] | None = None  # the sampling policy's per-token log-probs (mu > 1)
    ref: list[float] | None = None  # the reference's (beta > 0)

    def example(self) -> Encoded:
        return Encoded(self.prompt + self.completion,
                       [IGNORE] * len(self.prompt) + self.completion)


def collate_rollouts(rollouts: list[Rollout], mode: str, max_length: int, pad_id: int,
                     count: int, mask_dtype: torch.dtype = torch.bool
                     ) -> dict[str, torch.Tensor]:
    """One micro-batch: padded (``mode`` none), packed into rows of ``max_length``, or as
    trees (module docstring; ``mask_dtype``: the tree mask's), with ``grpo_advantages``
    ``[E]``, ``grpo_old_logps`` / ``grpo_ref_logps`` ``[N]`` where every rollout has them
    (examples in the batch's order, each one's completion tokens in order), and
    ``grpo_count``: the micro-batch's share of the loss normalizer (``count``, which may
    cover completions left out of the forward)."""
    if mode == "trees":
        batch, rollouts = collate_groups(rollouts, max_length, pad_id, mask_dtype)
    else:
        examples = [r.example() for r in rollouts]
        if mode == "none":
            batch = collate_padded(examples, pad_id)
        else:
            bins = pack_batch([len(e.input_ids) for e in examples], max_length)
            batch = collate_packed(examples, bins, pad_id)
    batch["grpo_advantages"] = torch.tensor([r.advantage for r in rollouts], dtype=torch.float32)
    for key, values in (("grpo_old_logps", [r.old for r in rollouts]),
                        ("grpo_ref_logps", [r.ref for r in rollouts])):
        if all(v is not None for v in values):
            batch[key] = torch.tensor([x for v in values for x in v], dtype=torch.float32)
    batch["grpo_count"] = torch.tensor(count)
    return batch


def grouped(rollouts: list[Rollout]) -> list[list[Rollout]]:
    """The rollouts by group, in order of first appearance."""
    groups: dict[int, list[Rollout]] = {}
    for r in rollouts:
        groups.setdefault(r.group, []).append(r)
    return list(groups.values())


def tree_shape(rollouts: list[Rollout], max_length: int) -> tuple[int, int]:
    """``(rows, width)`` of the trees layout; ``(rows, max_length)`` bounds the packed
    one. Trees save each group ``(G - 1) p`` prompt positions but attend over whole
    trees: with long completions a tree row costs more attention than it saves."""
    lengths = [len(rs[0].prompt) + sum(len(r.completion) for r in rs)
               for rs in grouped(rollouts)]
    bins = pack_batch(lengths, max(max_length, *lengths))
    return len(bins), max(sum(lengths[i] for i in b) for b in bins)


def packed_shape(rollouts: list[Rollout], max_length: int) -> tuple[int, int]:
    lengths = [len(r.prompt) + len(r.completion) for r in rollouts]
    bins = pack_batch(lengths, max_length)
    return len(bins), max(sum(lengths[i] for i in b) for b in bins)


def collate_groups(rollouts: list[Rollout], max_length: int, pad_id: int,
                   mask_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], list[Rollout]]:
    """Tree rows (one tree per group, packed into rows as wide as ``max_length`` or the
    widest tree) and the rollouts in the order of the batch's branches."""
    members = grouped(rollouts)
    trees = [Tree(rs[0].prompt, [r.completion for r in rs]) for rs in members]
    bins = pack_batch([t.length for t in trees], max(max_length, *(t.length for t in trees)))
    batch, _ = collate_trees([[trees[i] for i in b] for b in bins], pad_id, mask_dtype)
    return batch, [r for b in bins for i in b for r in members[i]]
