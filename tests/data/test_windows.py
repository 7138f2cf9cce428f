"""Windows over a tokenized corpus honour document boundaries (positions restart, no
document's first token is predicted from another's, the loss equals each document's own),
and held-out documents are fixed by the corpus alone and never trained on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from leantune.config import ModelConfig, ReplayConfig
from leantune.data.corpus import build_corpus
from leantune.data.encode import IGNORE
from leantune.data.windows import TokenCorpus, Windows, document_chunks, held_out
from leantune.model.load import load_model
from leantune.packing.collate import collate_padded
from leantune.train.replay import CorpusFeed

from conftest import loss_sum

WORDS = "the quick brown fox jumps over a lazy dog def add return numbers hello".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer) -> TokenCorpus:
    """40 documents of 3 to 40 words."""
    rng = np.random.default_rng(0)
    tmp = tmp_path_factory.mktemp("corpus")
    rows = [{"text": " ".join(rng.choice(WORDS, rng.integers(3, 41)))} for _ in range(40)]
    (tmp / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return TokenCorpus(build_corpus(str(tmp / "c.jsonl"), tokenizer, str(tmp / "cache"),
                                    progress=False))


def kept_stream(corpus: TokenCorpus, excluded) -> tuple[list[int], set[int]]:
    """Tokens of the documents not excluded, back to back, and where each one starts."""
    tokens, starts = [], set()
    for d in range(corpus.num_documents):
        if d not in set(excluded):
            starts.add(len(tokens))
            tokens += corpus.document(d).tolist()
    return tokens, starts


@pytest.mark.parametrize("length", [16, 37, 64])
def test_windows_cover_the_kept_documents_split_at_every_document_start(corpus, length):
    excluded = [0, 5, 6, 7, 39]  # at the start, a run of three, at the end
    windows = Windows.over(corpus, length, np.asarray(excluded))
    stream, starts = kept_stream(corpus, excluded)
    assert windows.num_tokens == len(stream) and len(windows) == len(stream) // length
    for i in range(len(windows)):
        segments = windows.segments(i)
        assert sum(map(len, segments)) == length and all(len(s) for s in segments)
        flat = np.concatenate(segments).tolist()
        assert flat == stream[i * length:(i + 1) * length]
        # A segment starts exactly where the window starts or a document starts.
        cut = np.cumsum([0] + [len(s) for s in segments[:-1]]) + i * length
        assert set(cut[1:].tolist()) == {s for s in starts if i * length < s < (i + 1) * length}


def test_packed_window_positions_and_labels_restart_at_documents(corpus, tokenizer):
    windows = Windows.over(corpus, 48)
    feed = CorpusFeed({"data": windows}, ReplayConfig(), "online", tokenizer.pad_token_id)
    batch = feed.collate([("data", 0), ("data", 1)])
    assert batch["input_ids"].shape == (2, 48) and "attention_mask" not in batch
    for row, w in enumerate((0, 1)):
        lengths = [len(s) for s in windows.segments(w)]
        starts = np.cumsum([0] + lengths[:-1])
        want = torch.cat([torch.arange(n) for n in lengths])
        assert torch.equal(batch["position_ids"][row], want)
        ignored = (batch["labels"][row] == IGNORE).nonzero().flatten().tolist()
        assert ignored == starts.tolist()  # every segment's first token, nothing else
    naive = CorpusFeed({"data": windows}, ReplayConfig(), "naive", 0).collate([("data", 0)])
    assert torch.equal(naive["position_ids"][0], torch.arange(48))


def test_window_loss_is_the_sum_of_each_documents_own_loss(corpus, tokenizer, llama_dir):
    """Exact document masking: a packed window's summed loss equals that of its pieces run
    one per row, padded (a computation that cannot see across documents)."""
    model = load_model(ModelConfig(name_or_path=llama_dir, dtype="float32"))
    windows = Windows.over(corpus, 64)
    feed = CorpusFeed({"data": windows}, ReplayConfig(), "online", tokenizer.pad_token_id)
    units = [("data", i) for i in range(4)]
    pieces = [e for _, i in units for e in windows.examples(i)]
    assert len(pieces) > 6  # several documents per window
    with torch.no_grad():
        packed, n_packed = loss_sum(model, feed.collate(units))
        alone, n_alone = loss_sum(model, collate_padded(pieces, tokenizer.pad_token_id))
        none_mode = CorpusFeed({"data": windows}, ReplayConfig(), "none", 0)
        padded, n_padded = loss_sum(model, none_mode.collate(units))
        naive = CorpusFeed({"data": windows}, ReplayConfig(), "naive", 0)
        crossed, _ = loss_sum(model, naive.collate(units))
    assert n_packed == n_alone == n_padded == sum(len(p.input_ids) - 1 for p in pieces)
    assert packed.item() == pytest.approx(alone.item(), rel=1e-5)
    assert padded.item() == pytest.approx(alone.item(), rel=1e-5)
    assert abs(crossed.item() - alone.item()) > 1e-3  # attention across documents differs


def test_held_out_documents_depend_on_the_corpus_only(corpus):
    eval_docs, ff_docs = held_out(corpus, [(200, 10), (100, 100)])
    again, _ = held_out(corpus, [(200, 10), (5, 1)])
    assert eval_docs.tolist() == again.tolist()  # the FF budget does not move eval's
    assert not set(eval_docs.tolist()) & set(ff_docs.tolist())
    lengths = np.diff(corpus.doc_starts)
    assert 200 <= lengths[eval_docs].sum() < 200 + lengths.max() and len(eval_docs) <= 10
    assert len(held_out(corpus, [(10**9, 3)])[0]) == 3  # the document cap
    assert len(held_out(corpus, [(10**9, 10**9)])[0]) == corpus.num_documents - 1


def test_held_out_documents_are_never_in_a_training_window(corpus):
    (docs,) = held_out(corpus, [(300, 40)])
    windows = Windows.over(corpus, 16, docs)
    trained = np.concatenate([np.concatenate(windows.segments(i)) for i in range(len(windows))])
    stream, _ = kept_stream(corpus, docs.tolist())
    assert trained.tolist() == stream[:len(trained)] and len(stream) - len(trained) < 16
    chunks = document_chunks(corpus, docs, 16)
    held = [corpus.document(int(d)).tolist() for d in docs]
    assert [t for c in chunks for t in c.input_ids] == [t for h in held for t in h]


def test_document_chunks_respect_the_token_budget(corpus):
    docs = np.arange(corpus.num_documents)
    chunks = document_chunks(corpus, docs, 8, budget=50)
    assert 50 <= sum(len(c.input_ids) for c in chunks) < 58
    assert all(1 < len(c.input_ids) <= 8 and c.labels == c.input_ids for c in chunks)
