"""The quickstart step's matmul shapes alone: how close each comes to the matmul peak.

    python benchmarks/matmul_shapes.py [--tokens 768] [--rank 16]

MFU is measured against the best 2048³ matmul in the compute dtype (what leantune
reports). This times, in fp32 and in bf16, every shape a quickstart step multiplies
(SmolLM2-135M's projections at ``--tokens`` rows, LoRA's rank-``--rank`` factors, a
341-row chunk of the 49,152-entry head) and gives each as a fraction of that peak: what
the step's MFU could reach if nothing but matmuls ran. Backward multiplies the same
shapes transposed (``dX = dY W``), so the forward shapes stand for it. Results go to
``benchmarks/results/matmul_shapes.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "matmul_shapes.json"
HIDDEN, INTERMEDIATE, KV, VOCAB, HEAD_ROWS = 576, 1536, 192, 49152, 341  # SmolLM2-135M


def gflops(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Best of 3 timings of ``[m, k] @ [k, n]``, each repeated for about ``seconds``."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    tick = time.perf_counter()
    a @ b
    reps = max(3, int(seconds / max(time.perf_counter() - tick, 1e-6)))
    best = float("inf")
    for _ in range(3):
        tick = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - tick) / reps)
    return 2 * m * k * n / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=768)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    from leantune.bench.all import machine

    t, r = args.tokens, args.rank
    shapes = {"q, o": (t, HIDDEN, HIDDEN), "k, v": (t, HIDDEN, KV),
              "gate, up": (t, HIDDEN, INTERMEDIATE), "down": (t, INTERMEDIATE, HIDDEN),
              "LoRA A": (t, HIDDEN, r), "LoRA B (attention)": (t, r, HIDDEN),
              "LoRA B (MLP)": (t, r, INTERMEDIATE), "head chunk": (HEAD_ROWS, HIDDEN, VOCAB)}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peak = {name: gflops(2048, 2048, 2048, dt) for name, dt in dtypes.items()}
    rows = []
    for name, (m, k, n) in shapes.items():
        got = {d: gflops(m, k, n, dt) for d, dt in dtypes.items()}
        rows.append({"shape": name, "m": m, "k": k, "n": n, "gflops": got,
                     "of_peak": {d: got[d] / peak[d] for d in got},
                     "bf16_over_fp32": got["bf16"] / got["fp32"]})
    lines = [f"peak (2048³): fp32 {peak['fp32']:.0f}, bf16 {peak['bf16']:.0f} GFLOP/s", "",
             "| shape | m × k × n | fp32 GFLOP/s (of peak) | bf16 GFLOP/s (of peak) | bf16 / fp32 |",
             "|---|---|---|---|---|"]
    for row in rows:
        g, f = row["gflops"], row["of_peak"]
        lines.append(f"| {row['shape']} | {row['m']} × {row['k']} × {row['n']} | "
                     f"{g['fp32']:.0f} ({100 * f['fp32']:.0f} %) | "
                     f"{g['bf16']:.0f} ({100 * f['bf16']:.0f} %) | {row['bf16_over_fp32']:.2f} |")
    # One decoder layer's forward: q, o, k, v, gate, up, down, and LoRA's A and B on
    # each of the 7 (all-linear): how fast its matmuls alone would run, FLOP-weighted.
    # LoRA A reads the 576-wide input of q, k, v, o, gate and up (down's: 1536-wide); k
    # and v's B are taken at q's width (LoRA's FLOPs are ~3 % of the layer's).
    uses = {"q, o": 2, "k, v": 2, "gate, up": 2, "down": 1, "LoRA A": 6,
            "LoRA B (attention)": 4, "LoRA B (MLP)": 2}
    layer = {}
    for d in dtypes:
        flops = seconds = 0.0
        for row in rows:
            n = uses.get(row["shape"], 0)
            f = n * 2 * row["m"] * row["k"] * row["n"]
            flops, seconds = flops + f, seconds + f / (row["gflops"][d] * 1e9)
        lora_a_down = 2 * t * INTERMEDIATE * r  # down's A reads the 1536-wide input
        flops += lora_a_down
        seconds += lora_a_down / (rows[4]["gflops"][d] * 1e9)
        layer[d] = flops / seconds / 1e9 / peak[d]
    lines += ["", f"a decoder layer's forward matmuls alone (base + LoRA on all 7): "
              f"{100 * layer['fp32']:.0f} % of the fp32 peak, {100 * layer['bf16']:.0f} % "
              "of the bf16 peak"]
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine(), "tokens": t, "rank": r,
                                          "peak_gflops": peak, "shapes": rows,
                                          "layer_of_peak": layer, "table": text},
                                         indent=1))
    print(machine()["summary"])
    print(text)


if __name__ == "__main__":
    main()
