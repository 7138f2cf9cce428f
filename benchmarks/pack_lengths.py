"""Offline packing speed: leantune's ``pack`` against TRL's ``pack_dataset``.

    python benchmarks/pack_lengths.py [--n 1000000] [--capacity 256] [--repeats 3]

Lengths are seeded lognormal draws (``mu=4.64, sigma=0.6``, rounded, clipped to
``[1, capacity]``: mean ~118 at capacity 256, the ShareGPT-like shape of DESIGN.md). All
lengths fit in one row, so TRL's ``"bfd"`` truncates nothing and both sides pack the same
lengths. Variants run in turn inside one process, ``repeats`` rounds, and the median is kept:

- ``leantune <strategy>``: ``pack(lengths, capacity, strategy)``, the bins of indices only.
- ``leantune bfd + rows``: the same bins, then the packed ``input_ids``/``seq_lengths``
  arrow columns TRL also builds (one ``take`` and new list offsets).
- ``trl pack_dataset bfd``: ``pack_dataset(ds, seq_length=capacity, strategy="bfd")`` as
  documented. ``Dataset.map`` feeds it 1,000 examples at a time, so it packs each block of
  1,000 on its own.
- ``trl pack_dataset bfd, one batch``: ``map_kwargs={"batch_size": None}``, the whole
  dataset in one BFD, i.e. the same problem ``pack`` solves. Its bins are checked equal to
  leantune's (token ``i`` is example ``i``'s index, so the packed rows read back as bins).

Results go to ``benchmarks/results/pack_lengths.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from leantune.packing.bins import pack

RESULTS = Path(__file__).parent / "results" / "pack_lengths.json"


def lognormal_lengths(n: int, capacity: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.lognormal(4.64, 0.6, n)), 1, capacity).astype(np.int64)


def token_table(lengths: np.ndarray) -> pa.Table:
    """An ``input_ids`` column whose every token of example ``i`` is ``i``."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    return pa.table({"input_ids": pa.LargeListArray.from_arrays(offsets, values)})


def bins_to_rows(table: pa.Table, lengths: np.ndarray, bins: list[list[int]]) -> pa.Table:
    """Packed rows as TRL returns them: concatenated ``input_ids`` and ``seq_lengths``."""
    order = np.fromiter(itertools.chain.from_iterable(bins), np.int64, len(lengths))
    sizes = np.fromiter(map(len, bins), np.int64, len(bins))
    tokens = table.column("input_ids").take(order).combine_chunks()
    seq_lengths = lengths[order]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    row_offsets = np.concatenate([[0], np.cumsum(np.add.reduceat(seq_lengths, starts[:-1]))])
    return pa.table({
        "input_ids": pa.LargeListArray.from_arrays(row_offsets, tokens.flatten()),
        "seq_lengths": pa.ListArray.from_arrays(starts.astype(np.int32), seq_lengths),
    })


def read_back_bins(packed: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(example indices in packed order, examples per row) of a packed table."""
    seq_lengths = packed.column("seq_lengths").combine_chunks()
    tokens = packed.column("input_ids").combine_chunks().flatten().to_numpy()
    flat = seq_lengths.flatten().to_numpy().astype(np.int64)
    firsts = np.concatenate([[0], np.cumsum(flat)[:-1]])
    return tokens[firsts].astype(np.int64), np.diff(seq_lengths.offsets.to_numpy())


def variants(lengths: np.ndarray, capacity: int) -> dict[str, Callable[[], int]]:
    """Name -> a call that packs and returns the number of rows."""
    runs: dict[str, Callable[[], int]] = {
        f"leantune {s}": (lambda s=s: len(pack(lengths, capacity, s))) for s in ("bfd", "ffd", "greedy")
    }
    table = token_table(lengths)
    runs["leantune bfd + rows"] = lambda: bins_to_rows(table, lengths, pack(lengths, capacity)).num_rows
    try:
        import datasets
        from trl.data_utils import pack_dataset
    except ImportError:
        return runs
    datasets.disable_progress_bars()
    ds = datasets.Dataset(table)
    runs["trl pack_dataset bfd"] = lambda: len(pack_dataset(ds, seq_length=capacity, strategy="bfd"))
    runs["trl pack_dataset bfd, one batch"] = lambda: len(
        pack_dataset(ds, seq_length=capacity, strategy="bfd", map_kwargs={"batch_size": None})
    )
    return runs


def same_bins_as_trl(lengths: np.ndarray, capacity: int) -> bool | None:
    try:
        import datasets
        from trl.data_utils import pack_dataset
    except ImportError:
        return None
    ds = datasets.Dataset(token_table(lengths))
    packed = pack_dataset(ds, seq_length=capacity, strategy="bfd", map_kwargs={"batch_size": None})
    theirs, their_sizes = read_back_bins(packed.with_format("arrow")[:])
    ours = bins_to_rows(token_table(lengths), lengths, pack(lengths, capacity))
    mine, my_sizes = read_back_bins(ours)
    return bool(np.array_equal(theirs, mine) and np.array_equal(their_sizes, my_sizes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--capacity", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    out = Path(args.out)

    lengths = lognormal_lengths(args.n, args.capacity, args.seed)
    tokens = int(lengths.sum())
    print(f"{args.n:,} lengths, mean {lengths.mean():.1f}, {tokens:,} tokens, capacity {args.capacity}")
    runs = variants(lengths, args.capacity)
    times: dict[str, list[float]] = {name: [] for name in runs}
    rows: dict[str, int] = {}
    for _ in range(args.repeats):  # round-robin, so drift in the machine hits every variant
        for name, run in runs.items():
            gc.collect()
            start = time.perf_counter()
            rows[name] = run()
            times[name].append(time.perf_counter() - start)

    results = []
    print(f"\n{'variant':34} {'median s':>9} {'rows':>9} {'efficiency':>10}")
    for name in runs:
        median = statistics.median(times[name])
        efficiency = tokens / (rows[name] * args.capacity)
        results.append({"variant": name, "median_s": median, "times_s": times[name],
                        "rows": rows[name], "efficiency": efficiency})
        print(f"{name:34} {median:9.2f} {rows[name]:9,} {efficiency:10.4f}")
    median = {r["variant"]: r["median_s"] for r in results}
    ratios = {
        f"{trl} / {ours}": median[trl] / median[ours]
        for trl, ours in [("trl pack_dataset bfd", "leantune bfd"),
                          ("trl pack_dataset bfd, one batch", "leantune bfd"),
                          ("trl pack_dataset bfd, one batch", "leantune bfd + rows")]
        if trl in median
    }
    for key, ratio in ratios.items():
        print(f"{key}: {ratio:.1f}x")
    same = same_bins_as_trl(lengths, args.capacity)
    print(f"TRL one-batch bins identical to leantune bfd: {same}")

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "compared": __doc__.split("\n\n", 2)[2].split("\n\nResults go")[0],
        "n": args.n, "capacity": args.capacity, "seed": args.seed, "repeats": args.repeats,
        "lengths": {"distribution": "lognormal(mu=4.64, sigma=0.6), rounded, clipped",
                    "mean": float(lengths.mean()), "max": int(lengths.max()), "tokens": tokens},
        "results": results, "ratios": ratios, "trl_one_batch_bins_identical": same,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "versions": _versions()},
    }, indent=2) + "\n")
    print(f"wrote {out}")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("leantune", "numpy", "pyarrow", "datasets", "trl"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


if __name__ == "__main__":
    main()
