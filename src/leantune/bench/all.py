"""``leantune bench all``: every benchmark of BENCHMARKS.md, one after another, on one
machine, with the settings its tables were made with.

Each bench writes its own ``<out_dir>/<name>.json`` (and plot) as when run alone; this
adds ``<out_dir>/all.json`` (each bench's command, wall time and exit status) and
``<out_dir>/TABLES.md`` (every table the benches print, in order). The two scripts under
``benchmarks/`` (bin packing of 1 M lengths, a 1 GB corpus) run when the current directory
is a clone that has them, else they are skipped with a note.

Benches are run in turn, never beside each other: each measures its baseline and ours
alternately in one process, and a second bench on the same cores would skew both.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from leantune.bench.common import cpu_info

# (name, the arguments after `leantune bench`, or a script under benchmarks/) in the order
# BENCHMARKS.md reads; the settings are those its tables were measured with.
BENCHES: list[tuple[str, list[str]]] = [
    ("packing", ["packing"]),
    ("pack_lengths", ["script:pack_lengths.py"]),
    ("architectures", ["architectures"]),
    ("fast_forward", ["fast-forward"]),
    ("fast_forward_tasks", ["fast-forward", "--data", "task:arc_easy,piqa,socialiqa,boolq",
                            "--batch-size", "16", "--max-length", "256", "--lr", "1e-3",
                            "--steps", "40", "--r", "8", "--alpha", "16",
                            "--test-examples", "64"]),
    ("adapters", ["adapters", "--rounds", "2"]),
    ("reft", ["reft", "--rounds", "2"]),
    ("tasks", ["tasks"]),
    ("tasks_sweep", ["tasks", "--variants",
                     "lora_r8_lr1e-3,loreft@optim.lr=3e-3,loreft@adapter.r=32"]),
    ("tasks_curves", ["tasks", "--variants",
                      "lora_r8_lr1e-3@train.max_steps=120@eval.tasks_every=40,"
                      "loreft@train.max_steps=120@eval.tasks_every=40,"
                      "loreft@adapter.positions=l1"]),
    ("continual", ["continual"]),
    ("corpus_scale", ["script:corpus_scale.py", "--gigabytes", "1", "--rounds", "2"]),
    ("speed", ["speed"]),
    ("profile_fp32", ["script:profile_step.py", "train.precision=fp32"]),
    ("profile_fp32_unfused", ["script:profile_step.py", "--unfused", "train.precision=fp32"]),
    ("profile_bf16", ["script:profile_step.py", "train.precision=bf16-mixed"]),
    ("profile_bf16_unfused", ["script:profile_step.py", "--unfused",
                              "train.precision=bf16-mixed"]),
    ("profile_bf16_compiled", ["script:profile_step.py", "train.precision=bf16-mixed",
                               "train.compile=true"]),
    ("quickstart_precision", ["script:quickstart_precision.py", "--rounds", "2"]),
    ("matmul_shapes", ["script:matmul_shapes.py"]),
    ("preference", ["preference"]),
    ("grpo", ["grpo"]),
    ("scaling", ["script:scaling.py", "--rounds", "2"]),
]
PLOTTED = {"fast_forward", "fast_forward_tasks", "continual"}


def bench_argv(name: str, args: list[str], out_dir: Path) -> list[str]:
    """The full argument list of one bench, writing into ``out_dir``."""
    argv = args + ["--out", str(out_dir / f"{name}.json")]
    if name in PLOTTED:
        argv += ["--plot", str(out_dir / f"{name}.png")]
    return argv


def run_all(run_bench: Callable[[list[str]], int], out_dir: Path, only: list[str] | None = None,
            scripts: Path = Path("benchmarks")) -> dict:
    """Run every bench (or those named in ``only``) in turn; returns ``all.json``'s content.

    ``run_bench(argv)`` runs ``leantune bench *argv`` in this process and returns its exit
    status; what it prints is echoed and kept for ``TABLES.md``.
    """
    known = [name for name, _ in BENCHES]
    unknown = sorted(set(only or []) - set(known))
    if unknown:
        raise ValueError(f"unknown bench {', '.join(unknown)}; choose from {', '.join(known)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine(), "benches": []}
    tables = [f"# leantune bench all\n\n{record['machine']['summary']}\n"]
    started = time.time()
    for name, args in BENCHES:
        if only and name not in only:
            continue
        argv = bench_argv(name, args, out_dir)
        script = args[0].removeprefix("script:") if args[0].startswith("script:") else None
        if script and not (scripts / script).exists():
            print(f"== {name}: skipped ({scripts / script} not found: run from a clone)")
            record["benches"].append({"name": name, "skipped": "script not found"})
            continue
        command = ([sys.executable, str(scripts / script)] + argv[1:] if script
                   else ["leantune", "bench"] + argv)
        print(f"== {name}: {' '.join(command)}", flush=True)
        tick = time.time()
        status, printed = (_run_script(command) if script else _run_here(run_bench, argv))
        seconds = time.time() - tick
        print(f"== {name}: {'done' if status == 0 else f'FAILED ({status})'} in "
              f"{_minutes(seconds)}", flush=True)
        record["benches"].append({"name": name, "command": " ".join(command),
                                  "status": status, "seconds": seconds})
        tables.append(f"## {name}\n\n`{' '.join(command)}` ({_minutes(seconds)})\n\n"
                      f"```\n{printed.strip()}\n```\n")
        _write(out_dir, record, tables, time.time() - started)  # a crash keeps what ran
    return _write(out_dir, record, tables, time.time() - started)


def _run_here(run_bench: Callable[[list[str]], int], argv: list[str]) -> tuple[int, str]:
    """Run one bench in this process, echoing what it prints and keeping a copy."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, buffer)):
        try:
            status = run_bench(argv)
        except Exception as e:  # one bench failing should not lose the others
            print(f"error: {type(e).__name__}: {e}")
            status = 1
    return status, buffer.getvalue()


def _run_script(command: list[str]) -> tuple[int, str]:
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(proc.stdout, end="")
    return proc.returncode, proc.stdout


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


def _write(out_dir: Path, record: dict, tables: list[str], seconds: float) -> dict:
    record["seconds"] = seconds
    (out_dir / "all.json").write_text(json.dumps(record, indent=2) + "\n")
    (out_dir / "TABLES.md").write_text(
        "\n".join(tables) + f"\nAll together: {_minutes(seconds)}.\n")
    return record


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


def machine() -> dict:
    import torch

    cpu = cpu_info()
    summary = (f"{cpu['cores']} cores ({cpu['model']}; {', '.join(cpu['flags']) or 'no AVX2'}), "
               f"torch {torch.__version__}, python {platform.python_version()}, "
               + ("GPU: " + torch.cuda.get_device_name() if torch.cuda.is_available()
                  else "no GPU"))
    return {"summary": summary, "cores": os.cpu_count(), "cpu": cpu, "torch": torch.__version__}
