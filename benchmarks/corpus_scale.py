"""Raw-text corpora at scale: leantune's token shards against HF datasets' own way.

    python benchmarks/corpus_scale.py [--gigabytes 1] [--rounds 1] [--windows 400]

A JSONL corpus of ``--gigabytes`` of real text (Python's standard library sources and
ShareGPT conversations from the embedded default, cycled until the size is reached) is
tokenized with SmolLM2's tokenizer (49,152 tokens) two ways, each in a fresh process so
its peak resident memory is its own, alternately over ``--rounds``:

- ``leantune``: :func:`~leantune.data.corpus.build_corpus` (streamed reading, batched
  fast-tokenizer calls on every core, ``uint16`` memory-mapped shards);
- ``datasets``: ``load_dataset("json")`` then ``Dataset.map(tokenize, batched=True,
  num_proc=2)`` (arrow files), the usual recipe.

Then windows of ``--max-length`` tokens are read back at random through the training
path (:class:`~leantune.train.replay.CorpusFeed`, 8 windows per micro-batch, positions
restarting at every document), with the process's resident memory before and after.
Results go to ``benchmarks/results/corpus_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "corpus_scale.json"


def make_corpus(path: Path, gigabytes: float) -> dict:
    """Cycle real documents into ``path`` until it holds ``gigabytes`` of JSONL."""
    import sysconfig

    from leantune.data.embedded import sharegpt_rows

    docs = [p.read_text(encoding="utf-8", errors="replace")
            for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
            if "site-packages" not in p.parts][:2000]
    docs += ["\n\n".join(t.get("value", "") for t in row.record.get("conversations") or []
                         if isinstance(t, dict) and isinstance(t.get("value"), str))
             for _, row in zip(range(4000), sharegpt_rows())]
    docs = [json.dumps({"text": d}) + "\n" for d in docs if d.strip()]
    target, written, lines = int(gigabytes * 2**30), 0, 0
    with path.open("w") as f:
        while written < target:
            for line in docs:
                f.write(line)
                written += len(line.encode())
                lines += 1
                if written >= target:
                    break
    return {"bytes": path.stat().st_size, "documents": lines}


def child(code: str) -> dict:
    """Run ``code`` in a fresh Python; it prints one JSON line with its peak RSS and that
    of its largest child process (datasets' map workers), and this adds the wall time."""
    tick = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return out | {"seconds": time.perf_counter() - tick}


LEANTUNE = """
import json, resource, time
from transformers import AutoTokenizer
from leantune.data.corpus import build_corpus
from leantune.data.windows import TokenCorpus
tok = AutoTokenizer.from_pretrained({tok!r})
tick = time.perf_counter()
d = build_corpus({path!r}, tok, {cache!r}, progress=False)
c = TokenCorpus(d)
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({{"build_seconds": time.perf_counter() - tick, "tokens": c.num_tokens,
                  "documents": c.num_documents, "dir": str(d),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "largest_worker_rss_mb": kids / 1024}}))
"""

DATASETS = """
import json, os, resource, time
os.environ["HF_DATASETS_CACHE"] = {cache!r}
import datasets
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained({tok!r})
tick = time.perf_counter()
ds = datasets.load_dataset("json", data_files={path!r}, split="train")
ds = ds.map(lambda b: tok(b["text"]), batched=True, num_proc=2, remove_columns=["text"])
tokens = sum(len(x) for x in ds.with_format("numpy")["input_ids"])
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({{"build_seconds": time.perf_counter() - tick, "tokens": int(tokens),
                  "documents": len(ds),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "largest_worker_rss_mb": kids / 1024}}))
"""


def read_windows(directory: str, max_length: int, batches: int) -> dict:
    """Random micro-batches of 8 windows through the training feed, timed, with RSS."""
    import numpy as np

    from leantune.config import ReplayConfig
    from leantune.data.windows import TokenCorpus, Windows, held_out
    from leantune.train.metrics import resident_bytes
    from leantune.train.replay import CorpusFeed

    before = resident_bytes()
    corpus = TokenCorpus(Path(directory))
    (docs,) = held_out(corpus, [(16384, 1000)])
    feed = CorpusFeed({"data": Windows.over(corpus, max_length, docs)}, ReplayConfig(),
                      "online", 0)
    n = len(feed.windows["data"])
    rng = np.random.default_rng(0)
    tick = time.perf_counter()
    rows = 0
    for _ in range(batches):
        batch = feed.collate([("data", int(i)) for i in rng.integers(0, n, 8)])
        rows += batch["input_ids"].shape[0]
    seconds = time.perf_counter() - tick
    return {"windows": n, "batches": batches, "ms_per_batch": 1000 * seconds / batches,
            "rss_before_mb": before / 2**20, "rss_after_mb": resident_bytes() / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    from leantune.config import ModelConfig
    from leantune.model.load import resolve_local

    tok = resolve_local(ModelConfig())  # the embedded SmolLM2 (dequantized once, cached)
    results = {"setup": vars(args), "runs": []}
    with tempfile.TemporaryDirectory(prefix="leantune-corpus-scale-") as tmp:
        path = Path(tmp) / "corpus.jsonl"
        results["corpus"] = make_corpus(path, args.gigabytes)
        print(f"corpus: {results['corpus']}", flush=True)
        for r in range(args.rounds):
            order = ("leantune", "datasets") if r % 2 == 0 else ("datasets", "leantune")
            for name in order:
                code = (LEANTUNE if name == "leantune" else DATASETS).format(
                    tok=tok, path=str(path), cache=f"{tmp}/{name}-cache-{r}")
                run = {"round": r, "method": name} | child(code)
                print(json.dumps(run), flush=True)
                results["runs"].append(run)
                if name == "leantune":
                    results["read"] = read_windows(run["dir"], args.max_length, args.batches)
                    print(json.dumps(results["read"]), flush=True)
                Path(args.out).write_text(json.dumps(results, indent=1))
    results["peak_rss_self_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
