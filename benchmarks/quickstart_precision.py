"""The README's quickstart at its defaults against ``train.precision=fp32``, as users run it.

    python benchmarks/quickstart_precision.py [--rounds 2] [--arm NAME=key=value,...] [--out OUT.json]

Each arm is ``leantune train examples/quickstart.yaml`` in a fresh process and output
directory (the model, data and held-out set of the README's first command; evaluation
before and after as configured); arms alternate within a round, in reverse order in
every other round, so drift on a shared machine falls on both. Reported per arm from
its ``summary.json``: tokens/s over the training steps, MFU, held-out loss before and
after, peak memory, the precision ``auto`` chose; then the median tokens/s over rounds
and its ratio to the fp32 arm's. Run alone: timings are the machine's. Default arms:
``default`` (no override) and ``fp32`` (``train.precision=fp32``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from leantune.model.precision import cpu_info

ARMS = {"default": [], "fp32": ["train.precision=fp32"]}


def run_arm(overrides: list[str], out_dir: Path) -> dict:
    """One ``leantune train`` of the quickstart; the figures of its summary.json."""
    cmd = ["leantune", "train", "examples/quickstart.yaml", f"train.output_dir={out_dir}",
           "train.progress=false", *overrides]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    s = json.loads((out_dir / "summary.json").read_text())
    mfu = s.get("mfu") or {}
    return {"tokens_per_second": s["tokens_per_second"], "mfu": mfu.get("fraction"),
            "eval_loss": s["eval_loss"], "peak_memory_bytes": s["peak_memory_bytes"],
            "precision": s["precision"]["used"], "wall_seconds": s["wall_seconds"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--arm", action="append", default=[],
                    help="NAME=key=value,key=value: another arm (its overrides)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    arms = dict(ARMS)
    for spec in args.arm:
        name, _, overrides = spec.partition("=")
        arms[name] = [o for o in overrides.split(",") if o]
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(arms) if r % 2 == 0 else list(reversed(arms))
            for name in order:
                runs[name].append(run_arm(arms[name], Path(tmp) / f"{name}-{r}"))
                print(f"round {r + 1} {name}: {runs[name][-1]['tokens_per_second']:.1f} "
                      f"tokens/s", flush=True)
    median = {n: statistics.median(x["tokens_per_second"] for x in v) for n, v in runs.items()}
    out = {"cpu": cpu_info(), "arms": arms, "runs": runs, "median_tokens_per_second": median,
           "vs_fp32": {n: median[n] / median["fp32"] for n in arms}}
    print("| arm | precision | tokens/s per round | median | x fp32 | MFU | held-out loss "
          "before -> after | peak memory (GiB) |")
    for name, v in runs.items():
        loss = v[0]["eval_loss"]
        speeds = ", ".join(f"{x['tokens_per_second']:.1f}" for x in v)
        mfus = ", ".join(f"{100 * x['mfu']:.1f} %" for x in v if x["mfu"])
        peaks = ", ".join(f"{x['peak_memory_bytes'] / 2**30:.2f}" for x in v)
        print(f"| {name} | {v[0]['precision']} | {speeds} | {median[name]:.1f} | "
              f"{out['vs_fp32'][name]:.2f} | {mfus} | "
              f"{loss['before']:.4f} -> {loss['after']:.4f} | {peaks} |")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
