"""Where a training step's time goes, by op class, in the run's real code path.

    python benchmarks/profile_step.py [--config CONFIG] [--steps 4] [--unfused] [--out OUT.json]
                                      [key=value ...]

Builds the run as ``leantune train CONFIG`` would (default: examples/quickstart.yaml),
takes two warm-up steps, then profiles ``--steps`` optimizer steps with torch.profiler and
sums each op's *self* CPU time into classes: matmul (every mm, wherever it runs),
attention (SDPA forward and backward), dropout
(the adapter's dropout forward and its masks' backward), norms (RMSNorm / LayerNorm
forwards), loss (the chunked head's log-softmax, matmuls apart), optimizer (AdamW under
``Optimizer.step``), casts (dtype copies not in those), elementwise (the rest: residual
adds, activations, LoRA's scaling, backward of norms and activations). An op belongs to
the innermost such scope around it: module forwards tagged here, autograd nodes,
custom autograd functions. Under ``train.compile=true`` inductor's fused kernels show as
one event per compiled graph call ("fused (compiled)"); its matmuls and attention stay
separate ops and count as above. ``--unfused`` runs PEFT's own LoRA forward in place of
the fused layer (the code before it). Prints a table and tokens/s;
``--out`` writes it with the CPU model and flags. Run alone: timings are the machine's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from leantune.config import load_config
from leantune.model.precision import cpu_info
from leantune.train.build import build_run
from leantune.train.step import train_step

try:  # the fused LoRA layer (the code before it, run by PYTHONPATH=<worktree>/src, had none)
    from leantune.adapters import lora_kernel
    from leantune.adapters.lora_kernel import unfuse_lora_layers
except ImportError:
    lora_kernel = None

    def unfuse_lora_layers(model) -> int:
        return 0

try:  # train.compile's steps (the code before it had train_step alone)
    from leantune.train.loop import run_step
except ImportError:
    run_step = None

CLASSES = ("matmul", "attention", "casts", "dropout", "norms", "loss", "optimizer",
           "lora (fused)", "elementwise", "fused (compiled)")
MATMUL = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm",
          "mkldnn::_linear_pointwise"}
CASTS = {"aten::copy_", "aten::_to_copy"}
# Scopes (module forwards tagged by :func:`tag_modules`, autograd nodes, custom functions)
# that own every op under them, matmuls apart.
SCOPES = (("Optimizer.step", "optimizer"), ("Dropout", "dropout"), ("LoRALinear", "lora (fused)"),
          ("RMSNorm", "norms"), ("LayerNorm", "norms"), ("_LinearLogProbs", "loss"),
          ("WhereBackward", "dropout"), ("NativeDropoutBackward", "dropout"),
          ("Attention", "attention"), ("scaled_dot_product", "attention"))


def tag_modules(model: torch.nn.Module, dropout: bool) -> None:
    """Open a profiler scope named after the module class around the forward of every
    norm and (``dropout``) dropout, so their ops are counted by what they belong to. Not
    the fused LoRA layer's dropout: a hook on it sends the layer back to PEFT's path."""
    for m in model.modules():
        name = type(m).__name__
        if (dropout and name in ("FastDropout", "Dropout")) or name.endswith(
                ("RMSNorm", "LayerNorm")):
            m.register_forward_pre_hook(
                lambda mod, args, name=name: setattr(
                    mod, "_scope", torch.profiler.record_function(name).__enter__()))
            m.register_forward_hook(lambda mod, args, out: mod._scope.__exit__(None, None, None))


def tag_fused_lora() -> None:
    """Scopes for the fused LoRA layer: its dropout masks count as dropout, its other
    non-matmul ops (input casts, masked copies, gradient casts) as "lora (fused)"; the
    backward is the autograd node ``LoRALinearBackward`` already."""
    if lora_kernel is None:
        return
    mask, forward = lora_kernel.keep_mask, lora_kernel.LoRALinear.forward

    def scoped_mask(*args):
        with torch.profiler.record_function("Dropout mask"):
            return mask(*args)

    def scoped_forward(*args):
        with torch.profiler.record_function("LoRALinear"):
            return forward(*args)

    lora_kernel.keep_mask = scoped_mask
    lora_kernel.LoRALinear.forward = staticmethod(scoped_forward)


def op_class(event) -> str:
    name = event.name
    if name in MATMUL:
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    parent = event.cpu_parent
    while parent is not None:
        for key, cls in SCOPES:
            if key in parent.name and (cls != "attention" or name not in CASTS):
                return cls
        parent = parent.cpu_parent
    if name in CASTS:
        return "casts"
    return "elementwise"


def classify(prof) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """Self CPU seconds per class, and the top ops ``(name, seconds, calls)``."""
    seconds: dict[str, float] = defaultdict(float)
    ops: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        fused = e.name.startswith("## Call CompiledFxGraph")  # inductor's kernels, one event
        if not fused and not e.name.startswith(("aten::", "mkldnn::")):
            continue
        s = e.self_cpu_time_total / 1e6
        seconds["fused (compiled)" if fused else op_class(e)] += s
        ops[e.name][0] += s
        ops[e.name][1] += 1
    top = sorted(((n, v[0], v[1]) for n, v in ops.items()), key=lambda t: -t[1])[:12]
    return dict(seconds), top


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="examples/quickstart.yaml")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out")
    ap.add_argument("--unfused", action="store_true", help="PEFT's own LoRA layer forward")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, ["train.progress=false", "eval.before=false",
                                    "checkpoint.every=null", "eval.generate=0",
                                    f"train.output_dir=/tmp/leantune-profile-{time.time_ns()}",
                                    *args.overrides])
    run = build_run(cfg)
    batches = run.data.micro_batches(cfg, run.state, run.acc, run.steps)
    run.model.train()
    if args.unfused:
        unfuse_lora_layers(run.model)
    if not cfg.train.compile:  # inside compiled layers they are fused, and a hook would break it
        tag_modules(run.model, dropout=args.unfused)
        tag_fused_lora()

    def step() -> int:
        micro = [next(batches) for _ in range(cfg.train.grad_accum)]
        if run_step is not None:
            run_step(run, micro)
        else:
            train_step(run.model, run.optimizer, micro, run.acc, cfg.optim.max_grad_norm,
                       run.objective)
        return sum(int(b["input_ids"].numel()) if "position_ids" not in b
                   else int(b["position_ids"].numel()) for b in micro)

    step()  # warm-up: allocations, kernel choice (and train.compile's compile)
    step()
    tokens, tick = 0, time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            tokens += step()
    wall = time.perf_counter() - tick
    seconds, top = classify(prof)
    total = sum(seconds.values())
    out = {"cpu": cpu_info(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "config": args.config, "overrides": args.overrides, "unfused": args.unfused,
           "steps": args.steps,
           "precision": run.precision.used, "tokens": tokens, "wall_s": wall,
           "tokens_per_s_profiled": tokens / wall,
           "classes_s": {c: round(seconds.get(c, 0.0), 3) for c in CLASSES},
           "top_ops": [{"op": n, "s": round(s, 3), "calls": c} for n, s, c in top]}
    print(f"precision {run.precision.used}: {tokens} tokens in {wall:.1f} s under the "
          f"profiler ({tokens / wall:.0f} tokens/s)")
    for c in CLASSES:
        v = seconds.get(c, 0.0)
        print(f"  {c:12s} {v:7.2f} s  {100 * v / max(total, 1e-9):5.1f} %")
    for n, s, c in top:
        print(f"    {n:40s} {s:7.2f} s  {c:6d} calls")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
