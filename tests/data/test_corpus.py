"""Raw-text corpora: documents read from every kind of source, tokenized into shards that
decode back to the original text, cached by content, and bad input named precisely."""

from __future__ import annotations

import json

import numpy as np
import pytest

import leantune.data.corpus as corpus_mod
from leantune.data.corpus import build_corpus, encode_documents, iter_documents, tokenize_corpus
from leantune.data.sources import DataError
from leantune.data.windows import TokenCorpus

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "def add(a, b):\n    return a + b  # numbers 0 1 2",
         "What is the capital of France? Paris, of course.\n\nHello!",
         "  leading spaces and ünïcödé bytes ✓",
         "x"]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def decode_documents(corpus: TokenCorpus, tokenizer) -> list[str]:
    """Every document's text: the tokens minus the EOS appended after each."""
    docs = [corpus.document(i).tolist() for i in range(corpus.num_documents)]
    assert all(d[-1] == tokenizer.eos_token_id for d in docs)
    return [tokenizer.decode(d[:-1]) for d in docs]


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def test_jsonl_shards_decode_to_the_original_text(tmp_path, tokenizer, cache):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in TEXTS])
    corpus = TokenCorpus(build_corpus(path, tokenizer, cache, progress=False))
    assert decode_documents(corpus, tokenizer) == TEXTS
    assert corpus.meta["dtype"] == "uint16" and corpus.shards[0].dtype == np.uint16
    expected = [len(tokenizer(t)["input_ids"]) + 1 for t in TEXTS]
    assert np.diff(corpus.doc_starts).tolist() == expected
    assert corpus.num_tokens == sum(expected) == corpus.meta["tokens"]


def test_directory_of_files_one_document_each_hidden_skipped(tmp_path, tokenizer, cache):
    root = tmp_path / "src"
    (root / "pkg" / ".git").mkdir(parents=True)
    for i, text in enumerate(TEXTS[:3]):
        (root / "pkg" / f"m{i}.py").write_text(text)
    (root / "notes.txt").write_text("not a .py file")
    (root / "pkg" / ".git" / "x.py").write_text("hidden")
    corpus = TokenCorpus(build_corpus(str(root), tokenizer, cache, pattern="**/*.py",
                                      progress=False))
    assert decode_documents(corpus, tokenizer) == TEXTS[:3]  # sorted file order
    everything = TokenCorpus(build_corpus(str(root), tokenizer, cache, progress=False))
    assert everything.key != corpus.key  # the glob is part of what the key covers
    assert sorted(decode_documents(everything, tokenizer)) == sorted(TEXTS[:3] + [
        "not a .py file"])


def test_chat_rows_join_their_turns_and_empty_documents_are_counted(tmp_path, tokenizer,
                                                                    cache):
    rows = [{"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]},
            {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
            {"text": "   \n"}, {"text": "plain"}]
    corpus = TokenCorpus(build_corpus(write_jsonl(tmp_path / "chat.jsonl", rows), tokenizer,
                                      cache, progress=False))
    assert decode_documents(corpus, tokenizer) == ["hi\n\nhello", "a\n\nb", "plain"]
    assert corpus.meta["empty_skipped"] == 1


def test_many_shards_read_back_across_their_boundaries(tmp_path, tokenizer, cache,
                                                       monkeypatch):
    monkeypatch.setattr(corpus_mod, "SHARD_TOKENS", 30)
    monkeypatch.setattr(corpus_mod, "BATCH_CHARS", 40)  # a few documents per batch
    texts = [f"{t} {i}" for i in range(6) for t in TEXTS]
    corpus = TokenCorpus(build_corpus(write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in
                                                                           texts]),
                                      tokenizer, cache, progress=False))
    assert len(corpus.shards) > 3 and len(corpus.meta["shards"]) == len(corpus.shards)
    assert decode_documents(corpus, tokenizer) == texts
    whole = np.concatenate([np.asarray(s) for s in corpus.shards]).astype(np.int64)
    for start, end in [(0, corpus.num_tokens), (25, 95), (29, 31), (10, 10)]:
        assert corpus.tokens(start, end).tolist() == whole[start:end].tolist()


class BigVocab:
    """A stand-in tokenizer with ids beyond uint16: one id per character, offset."""

    eos_token_id = 70_000

    def __len__(self) -> int:
        return 70_001

    def __call__(self, texts, add_special_tokens, verbose):
        return {"input_ids": [[66_000 + ord(c) for c in t] for t in texts]}


def test_large_vocabularies_get_uint32(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "abc"}, {"text": "de"}])
    meta = tokenize_corpus(path, BigVocab(), tmp_path / "out", progress=False)
    # build_corpus adds the cache key; written here by hand to read the shards back.
    (tmp_path / "out" / "corpus.json").write_text(json.dumps(meta | {"key": "0" * 32}))
    corpus = TokenCorpus(tmp_path / "out")
    assert meta["dtype"] == "uint32"
    assert corpus.document(0).tolist() == [66_097, 66_098, 66_099, 70_000]
    assert corpus.document(1).tolist() == [66_100, 66_101, 70_000]


class EndsSomeWithEos:
    """Returns fixed ids; like tokenizers whose post-processor appends EOS, some already
    end with it (9)."""

    eos_token_id = 9

    def __call__(self, texts, add_special_tokens, verbose):
        return {"input_ids": [[1, 2, 9], [3], [9], [4, 5]][:len(texts)]}


def test_eos_is_appended_once():
    tokens, lengths = encode_documents(EndsSomeWithEos(), ["a", "b", "c", "d"], np.dtype("uint16"))
    assert tokens.tolist() == [1, 2, 9, 3, 9, 9, 4, 5, 9]
    assert lengths.tolist() == [3, 2, 1, 3] and tokens.dtype == np.uint16


def test_cached_corpus_is_reused_and_a_change_rebuilds(tmp_path, tokenizer, cache, monkeypatch):
    path = tmp_path / "c.jsonl"
    write_jsonl(path, [{"text": t} for t in TEXTS])
    first = build_corpus(str(path), tokenizer, cache, progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as m:
        m.setattr(corpus_mod, "tokenize_corpus", refuse)
        assert build_corpus(str(path), tokenizer, cache, progress=False) == first
    write_jsonl(path, [{"text": t} for t in TEXTS[:-1]] + [{"text": "changed"}])
    second = build_corpus(str(path), tokenizer, cache, progress=False)
    assert second != first and decode_documents(TokenCorpus(second), tokenizer)[-1] == "changed"
    # The text field is part of the key too (it changes what a document is).
    assert corpus_mod.corpus_key(str(path), "**/*", "train", "text", tokenizer,
                                 tmp_path / "k") != corpus_mod.corpus_key(
        str(path), "**/*", "train", "body", tokenizer, tmp_path / "k")
    # Nothing half-written is left behind.
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]


def test_an_interrupted_build_leaves_no_cache_entry(tmp_path, tokenizer, cache, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in TEXTS])

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus_mod, "encode_documents", die)
    with pytest.raises(KeyboardInterrupt):
        build_corpus(path, tokenizer, cache, progress=False)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["digests.json"]


def test_bad_rows_name_file_line_and_field(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "ok"}, {"body": "no text"}])
    with pytest.raises(DataError) as e:
        list(iter_documents(path))
    assert str(e.value) == (f"{path}, line 2, field 'text': missing (the row has ['body']; set "
                            "data.text_field)")
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": 5}])
    with pytest.raises(DataError, match=r"line 1, field 'text': expected a string, got int"):
        list(iter_documents(path))
    path = write_jsonl(tmp_path / "e.jsonl", [{"messages": [{"role": "user", "content": 3}]}])
    with pytest.raises(DataError, match=r"field 'messages\[0\].content'"):
        list(iter_documents(path))


def test_non_utf8_files_fail_or_are_skipped_and_counted(tmp_path, tokenizer, cache):
    root = tmp_path / "src"
    root.mkdir()
    (root / "a.txt").write_text("fine")
    (root / "b.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(DataError, match=r"b\.txt, file: not UTF-8"):
        build_corpus(str(root), tokenizer, cache, progress=False)
    corpus = TokenCorpus(build_corpus(str(root), tokenizer, cache, skip_bad=True, progress=False))
    assert decode_documents(corpus, tokenizer) == ["fine"]
    assert corpus.meta["bad_skipped"] == 1 and "b.txt" in corpus.meta["bad_samples"][0]


def test_nothing_to_read_is_a_clear_error(tmp_path, tokenizer, cache):
    with pytest.raises(DataError, match="no document with any text"):
        build_corpus(write_jsonl(tmp_path / "c.jsonl", [{"text": " "}]), tokenizer, cache,
                     progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no file matches data.glob='\*\*/\*.py'"):
        build_corpus(str(tmp_path / "empty"), tokenizer, cache, pattern="**/*.py",
                     progress=False)
    with pytest.raises(FileNotFoundError):
        list(iter_documents(str(tmp_path / "missing.txt")))
