"""Micro-batches of preference pairs, in three layouts, pairs never split across batches.

A pair is a prompt with two completions (DPO's chosen and rejected; for KTO an example's
own completion and the mismatched one its KL term reads). Layouts (``mode`` / ``shared``):

- ``none``: each completion ``prompt + completion`` in a row of its own, padded (TRL's
  ``DPOTrainer`` layout);
- ``online``, unshared: those ``2P`` sequences packed into rows, positions restarting
  (:func:`~leantune.packing.collate.collate_packed`);
- ``online``, shared: one tree per pair, ``[prompt | chosen | rejected]`` with the
  rejected branch seeing the prompt but not the chosen one
  (:mod:`leantune.packing.trees`), trees packed into rows. The prompt is computed once:
  ``P + C + R`` positions where the other layouts take ``2P + C + R``.

Every layout yields the same per-sequence log-probs in the order ``chosen_0, rejected_0,
chosen_1, ...`` of the batch's pairs as laid out: trees may be reordered by packing, and
``pair_order`` [P] gives the index (into the pairs given) of each pair laid out. Pairs
that carry a reference's log-probs (``ref``) add them as ``ref_logps`` [2P] in that
order; KTO's labels become ``desirable`` [P].

The batcher answers what :class:`~leantune.packing.batching.Batcher` answers for the loop
(``unit_lengths``, ``collate``, ``packed_rows``, ``collate_examples``), a unit being a pair.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from leantune.data.encode import Encoded
from leantune.data.preference import EncodedPreference
from leantune.packing.batching import pack_batch
from leantune.packing.collate import collate_packed, collate_padded
from leantune.packing.trees import collate_trees, pair_tree


@dataclass
class PairBatcher:
    pairs: list[EncodedPreference]
    mode: str              # none | online
    max_length: int
    pad_id: int
    shared: bool = True    # online: a tree per pair (the prompt once)
    mask_dtype: torch.dtype = torch.bool  # the tree mask's (trees.mask_dtype_for the model)

    @property
    def examples(self) -> list[EncodedPreference]:
        return self.pairs

    @property
    def units(self) -> list[list[int]]:
        return [[i] for i in range(len(self.pairs))]

    @property
    def layout(self) -> str:
        """``padded``, ``packed`` or ``packed+shared_prompt``."""
        if self.mode == "none":
            return "padded"
        return "packed+shared_prompt" if self.shared else "packed"

    def length(self, p: EncodedPreference) -> int:
        """Positions pair ``p`` takes in this layout."""
        completions = len(p.chosen) + len(p.rejected or [])
        return len(p.prompt) * (1 if self.uses_trees else 2) + completions

    @property
    def uses_trees(self) -> bool:
        return self.mode != "none" and self.shared

    @property
    def unit_lengths(self) -> list[int]:
        return [self.length(p) for p in self.pairs]

    def with_layout(self, mode: str | None = None, shared: bool | None = None) -> PairBatcher:
        """The same pairs in another layout (the probe's or the tree check's fallback)."""
        return replace(self, mode=self.mode if mode is None else mode,
                       shared=self.shared if shared is None else shared)

    def collate(self, unit_ids: list[int]) -> dict[str, torch.Tensor]:
        return self.collate_examples([self.pairs[u] for u in unit_ids], self.mode)

    def packed_rows(self, unit_ids: list[int]) -> list[list[Encoded]]:
        """The completions of ``pairs[unit_ids]`` as packed rows of examples (what the
        packing probe checks: the unshared packed layout)."""
        examples = [e for u in unit_ids for e in self.pairs[u].examples()]
        bins = pack_batch([len(e.input_ids) for e in examples], self.max_length)
        return [[examples[i] for i in b] for b in bins]

    def collate_examples(self, pairs: list[EncodedPreference], mode: str
                         ) -> dict[str, torch.Tensor]:
        """Lay out ``pairs`` as one micro-batch (module docstring)."""
        if mode != "none" and self.shared:
            lengths = [self.length(p) for p in pairs]
            # A tree may be wider than max_length (its positions never are: a branch
            # continues from the prompt); such a tree takes a row of its own.
            bins = pack_batch(lengths, max(self.max_length, *lengths))
            order = [i for b in bins for i in b]
            rows = [[pair_tree(p.prompt, p.chosen, p.rejected or []) for p in
                     (pairs[i] for i in b)] for b in bins]
            batch, _ = collate_trees(rows, self.pad_id, self.mask_dtype)
        else:
            order = list(range(len(pairs)))
            examples = [e for p in pairs for e in p.examples()]
            if mode == "none":
                batch = collate_padded(examples, self.pad_id)
            else:
                bins = pack_batch([len(e.input_ids) for e in examples], self.max_length)
                batch = collate_packed(examples, bins, self.pad_id)
        batch["pair_order"] = torch.tensor(order)
        laid = [pairs[i] for i in order]
        if all(p.ref is not None for p in laid):
            batch["ref_logps"] = torch.tensor([r for p in laid for r in p.ref],  # type: ignore[union-attr]
                                              dtype=torch.float32)
        if all(p.label is not None for p in laid):
            batch["desirable"] = torch.tensor([bool(p.label) for p in laid])
        return batch
