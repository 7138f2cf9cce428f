"""A tokenized corpus read back from its memory-mapped shards: held-out documents, and
fixed-length training windows over the rest.

Windows: the documents that are not held out, back to back, cut into windows of
``length`` tokens (the last partial one dropped). A window is returned as its document
*segments* - it is split wherever a document starts - so the collator's packing path
restarts ``position_ids`` at every document and never predicts a document's first token
from the one before: attention and loss stay inside documents, exactly as if each
segment were its own sequence.

Held-out documents depend only on the corpus (a random order seeded by its content key)
and the eval size, never on the run's seed: every run that trains on, replays or
evaluates a corpus holds out the same documents, so a corpus trained on before is
evaluated on text no run of it has seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leantune.data.encode import Encoded


class TokenCorpus:
    """A shard directory written by :func:`~leantune.data.corpus.build_corpus`.

    Attributes:
        key: the content key (cache directory name).
        doc_starts: int64 [documents + 1], where each document starts in the token stream
            (the last entry is the token count). In RAM; the tokens stay on disk.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "corpus.json").read_text())
        self.key: str = self.meta["key"]
        self.shards = [np.memmap(self.directory / s["file"], dtype=self.meta["dtype"], mode="r",
                                 shape=(s["tokens"],)) for s in self.meta["shards"] if s["tokens"]]
        self.shard_starts = np.cumsum([0] + [len(s) for s in self.shards])
        lengths = np.load(self.directory / "documents.npy")
        self.doc_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_starts[-1])

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts) - 1

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens ``[start, end)`` of the whole stream (int64), across shards if need be."""
        out = []
        k = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        while start < end:
            local = start - self.shard_starts[k]
            take = min(end, self.shard_starts[k + 1]) - start
            out.append(self.shards[k][local:local + take])
            start += take
            k += 1
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

    def document(self, i: int) -> np.ndarray:
        return self.tokens(int(self.doc_starts[i]), int(self.doc_starts[i + 1]))


def held_out(corpus: TokenCorpus, budgets: list[tuple[int, int]]) -> list[np.ndarray]:
    """Groups of whole documents held out of training, e.g. ``[eval, fast_forward]``.

    Documents are taken in a random order seeded by the corpus' key. Group ``g`` with
    budget ``(tokens, max_docs)`` takes documents until it holds ``tokens`` tokens (its
    last one may overshoot) or ``max_docs`` documents. At least one document always stays
    for training.

    Returns:
        One sorted int64 array of document indices per group.
    """
    n = corpus.num_documents
    order = np.random.default_rng(int(corpus.key[:16], 16)).permutation(n)
    lengths = np.diff(corpus.doc_starts)
    groups, k = [], 0
    for tokens, max_docs in budgets:
        taken, total = [], 0
        while total < tokens and len(taken) < max_docs and k < n - 1:
            taken.append(int(order[k]))
            total += int(lengths[order[k]])
            k += 1
        groups.append(np.sort(np.asarray(taken, dtype=np.int64)))
    return groups


def document_chunks(corpus: TokenCorpus, docs: np.ndarray, length: int,
                    budget: int | None = None) -> list[Encoded]:
    """Held-out documents as examples of at most ``length`` tokens (every token a target),
    stopping once ``budget`` tokens are in."""
    out, total = [], 0
    for d in docs:
        ids = corpus.document(int(d)).tolist()
        for i in range(0, len(ids), length):
            if budget is not None and total >= budget:
                return out
            piece = ids[i:i + length]
            if len(piece) > 1:  # a lone token predicts nothing
                out.append(Encoded(piece, list(piece)))
                total += len(piece)
    return out


@dataclass
class Windows:
    """Windows of ``length`` tokens over a corpus' documents minus ``excluded`` ones.

    The kept documents form runs of consecutive documents; ``run_tokens`` [R, 2] holds
    each run's [start, end) in the token stream, and ``run_offsets`` [R + 1] where each
    run starts in the kept stream (the windows' own coordinates).
    """

    corpus: TokenCorpus
    length: int
    run_tokens: np.ndarray
    run_offsets: np.ndarray

    @classmethod
    def over(cls, corpus: TokenCorpus, length: int, excluded: np.ndarray | None = None
             ) -> Windows:
        n = corpus.num_documents
        cut = np.unique(excluded) if excluded is not None else np.zeros(0, np.int64)
        first = np.concatenate([[0], cut + 1])  # each run: documents first .. last - 1
        last = np.concatenate([cut, [n]])
        keep = first < last
        runs = np.stack([corpus.doc_starts[first[keep]], corpus.doc_starts[last[keep]]], axis=1)
        offsets = np.concatenate([[0], np.cumsum(runs[:, 1] - runs[:, 0])])
        return cls(corpus, length, runs, offsets)

    @property
    def num_tokens(self) -> int:
        """Tokens in the kept documents."""
        return int(self.run_offsets[-1])

    def __len__(self) -> int:
        return self.num_tokens // self.length

    def segments(self, i: int) -> list[np.ndarray]:
        """Window ``i`` as its document pieces, in order; together ``length`` tokens."""
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} of {len(self)}")
        start, end = i * self.length, (i + 1) * self.length
        r = int(np.searchsorted(self.run_offsets, start, side="right")) - 1
        pieces = []
        while start < end:
            lo = int(self.run_tokens[r, 0] + start - self.run_offsets[r])
            hi = int(min(self.run_tokens[r, 1], lo + end - start))
            starts = self.corpus.doc_starts
            inner = starts[np.searchsorted(starts, lo, side="right"):
                           np.searchsorted(starts, hi, side="left")]
            tokens = self.corpus.tokens(lo, hi)
            pieces += np.split(tokens, (inner - lo).tolist())
            start += hi - lo
            r += 1
        return pieces

    def examples(self, i: int) -> list[Encoded]:
        """Window ``i``'s segments as examples (every token a target)."""
        return [Encoded(p.tolist(), p.tolist()) for p in self.segments(i)]
