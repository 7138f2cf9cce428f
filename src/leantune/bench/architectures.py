"""``leantune bench architectures``: ``leantune train`` with its defaults on a tiny random
model of every causal-LM architecture transformers knows.

For each model type (and :data:`~leantune.bench.tiny_models.VARIANTS`) a tiny model and a
tiny tokenizer are saved to a temporary directory beside a small chat data set, and the
command's own entry trains on them for two steps, packed (``data.packing=online``, the
default), under each precision (``auto`` as this machine chooses it, and ``bf16-mixed``)
and each method (LoRA with its default targets, and ``full``). Everything else is the
default: the precision measurement, the packing probe, the chunked-loss start-up check,
the head-at-targets hook, eval before and after, a generated reply, the report.

Verdicts, per architecture, precision and method:

- ``exact``: trained packed (``summary.json``'s packing ``used`` is not ``none``), and an
  independent fp32 check finds packed rows equal to padded ones;
- ``padded``: trained with packing off, for the reason the run gives (``note`` says when
  the independent check finds packing exact there: a needless fallback, not a bug);
- ``refused``: the command exited 2 with a one-line message (a user error);
- ``TRACEBACK``: anything else raised (a bug): the exception, its first line and the last
  frame in leantune or transformers;
- ``SILENT``: trained packed though the independent check finds packing inexact (a bug);
- ``timeout``: over the architecture's time budget.

An architecture whose tiny model cannot be built at all is ``not built``, with the reason.
The independent check (:func:`independent_check`) runs once per architecture and method,
on the tiny model itself: three hard layouts, each padded (one example per row) and
packed (leantune's collator), comparing every example's summed loss and the gradients of
every trainable weight (LoRA's B matrices randomized: B = 0 hides a lot).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import platform
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import transformers

import leantune
from leantune.bench.common import cpu_info
from leantune.bench.packing_check import MAX_LENGTH, check_method
from leantune.bench.tiny_models import (
    all_kinds,
    build_tiny,
    chat_rows,
    save_tiny,
    tiny_tokenizer,
    write_chat_data,
)
from leantune.model.load import first_line

PRECISIONS = ("auto", "bf16-mixed")
METHODS = ("lora", "full")
# What a tiny run needs beyond the defaults: two steps of 8 examples of at most 128 tokens.
TINY_RUN = ("train.max_steps=2", "train.batch_size=8", f"data.max_length={MAX_LENGTH}",
            "train.progress=false", "eval.generate=1")
VERDICTS = ("exact", "padded", "refused", "TRACEBACK", "SILENT", "timeout", "not run")

# ``leantune.cli.main``: argv (after ``leantune``) -> exit status. Passed in, since the
# command imports the benches and not the other way round.
Entry = Callable[[list[str]], int]


class Timeout(BaseException):
    """An architecture over its time budget (a BaseException, so that no ``except
    Exception`` on the way swallows it)."""


# --- one architecture through `leantune train` -------------------------------------------


# Where the frames a traceback is reported by live: leantune's and transformers' sources.
ROOTS = tuple(Path(m.__file__).resolve().parent for m in (leantune, transformers))


def error_record(e: BaseException) -> dict:
    """``{"error": "Type: first line", "where": frame, "via": frame}``: ``where`` the last
    frame in leantune or transformers (else the last frame), ``via`` the last in leantune
    when ``where`` is not (which stage of the run called into the model), each as
    ``package/path.py:line (function)``."""
    frames = [(f, _root(f)) for f in traceback.extract_tb(e.__traceback__)]
    where = ([f for f, root in frames if root] or [f for f, _ in frames] or [None])[-1]
    ours = [f for f, root in frames if root == ROOTS[0]]
    via = ours[-1] if ours and ours[-1] is not where else None
    return {"error": f"{type(e).__name__}: {first_line(e)[:300]}", "where": _frame(where),
            "via": _frame(via)}


def _root(frame: traceback.FrameSummary) -> Path | None:
    path = Path(frame.filename).resolve()
    return next((root for root in ROOTS if path.is_relative_to(root)), None)


def _frame(frame: traceback.FrameSummary | None) -> str | None:
    """``package/path.py:line (function)`` (the full path outside the two packages)."""
    if frame is None:
        return None
    root = _root(frame)
    path = Path(frame.filename).resolve()
    name = path.relative_to(root.parent).as_posix() if root else frame.filename
    return f"{name}:{frame.lineno} ({frame.name})"


def train_run(entry: Entry, argv: list[str], out_dir: Path) -> dict:
    """``leantune train *argv`` through ``entry``, its output captured; the run's verdict
    before the independent check (``exact`` / ``padded`` / ``refused`` / ``TRACEBACK``)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = entry(["train", *argv, f"train.output_dir={out_dir}"])
    except (Exception, SystemExit) as e:  # noqa: BLE001 - a traceback is what this looks for
        return {"verdict": "TRACEBACK"} | error_record(e)
    finally:
        gc.collect()  # ~800 runs in one process: nothing of one may outlive it
    if status == 2:
        lines = stderr.getvalue().strip().splitlines() or ["(no message)"]
        return {"verdict": "refused", "message": lines[-1].removeprefix("leantune: error: ")}
    if status != 0:
        return {"verdict": "TRACEBACK", "error": f"exit status {status}", "where": None,
                "via": None}
    summary = json.loads((out_dir / "summary.json").read_text())
    packing, probe = summary["packing"], summary["packing"].get("probe")
    return {"verdict": "padded" if packing["used"] == "none" else "exact",
            "reason": packing["reason"], "packing": packing["used"],
            "probe": probe and {k: probe[k] for k in ("errors", "judged", "run_dtype",
                                                      "run_errors", "seconds")},
            "precision": {k: summary["precision"][k] for k in ("used", "reason")},
            "head_at_targets": summary["head_at_targets"],
            "chunked_loss": summary["chunked_loss"], "loss": summary["final_train_loss"]}


def judge(run: dict, check: dict) -> dict:
    """The run's verdict against the independent check: packed but inexact is SILENT;
    padded where packing is exact is noted (needless, not wrong)."""
    if "error" in check:
        return run | {"note": f"independent check failed: {check['error']}"}
    if run["verdict"] == "exact" and not check["exact"]:
        return run | {"verdict": "SILENT"}
    if run["verdict"] == "padded" and check["exact"]:
        return run | {"note": "needless: the independent check finds packing exact"}
    return run


def run_architecture(model_type: str, changes: dict | None, entry: Entry, work: Path,
                     precisions: Iterable[str] = PRECISIONS, methods: Iterable[str] = METHODS,
                     extra: Iterable[str] = (), report: Callable[[str, dict], None] | None = None
                     ) -> dict:
    """Build, save and train one architecture under every precision and method.

    Args:
        work: an empty directory for the model, the data and the runs.
        extra: more ``section.key=value`` overrides for every run (after :data:`TINY_RUN`).
        report: called with ``"precision/method"`` and the run's record as each finishes.

    Returns:
        ``{"class", "attn", "runs": {"precision/method": record}, "checks": {method: ...}}``,
        or ``{"verdict": "not built", "why": ...}``. A :class:`Timeout` (the caller's
        alarm) ends it: the run it interrupts stays ``timeout``, the rest ``not run``.
    """
    tokenizer = tiny_tokenizer()
    try:
        model = build_tiny(model_type, changes, vocab=len(tokenizer))
    except Timeout:
        return {"verdict": "not built", "why": "over the time budget while building"}
    except Exception as e:  # noqa: BLE001 - a model the shrinker cannot make is listed
        why = error_record(e)
        return {"verdict": "not built", "why": f"{why['error']} ({why['where']})"}
    record = {"class": type(model).__name__, "attn": model.config._attn_implementation,
              "runs": {f"{p}/{m}": {"verdict": "not run"} for p in precisions for m in methods},
              "checks": {}}
    try:
        model_dir = save_tiny(work / "model", model, tokenizer)
        data = write_chat_data(work / "chat.jsonl", chat_rows())
        base = [f"model.name_or_path={model_dir}", f"data.path={data}", *TINY_RUN]
        for key in record["runs"]:
            precision, method = key.split("/")
            record["runs"][key] = {"verdict": "timeout"}  # until it finishes
            run = train_run(entry, [*base, f"train.precision={precision}",
                                    f"adapter.method={method}", *extra],
                            work / f"run-{precision}-{method}")
            if run["verdict"] in ("exact", "padded"):
                if method not in record["checks"]:
                    record["checks"][method] = check_method(model, method, len(tokenizer))
                run = judge(run, record["checks"][method])
            record["runs"][key] = run
            if report:
                report(key, run)
    except Timeout:
        record["timed_out"] = True  # the run it stopped stays "timeout", the rest "not run"
    return record


# --- the sweep -----------------------------------------------------------------------------


def select_kinds(only: str | None) -> dict[str, tuple[str, dict | None]]:
    """Every model type and variant, or those of the comma-separated ``only`` (a name
    that is neither is taken as a model type, which then fails to build if unknown)."""
    kinds = all_kinds()
    if only is None:
        return kinds
    return {k: kinds.get(k, (k, None)) for k in (n.strip() for n in only.split(",")) if k}


def bench_architectures(entry: Entry, kinds: dict[str, tuple[str, dict | None]], out: Path,
                        precisions: Iterable[str] = PRECISIONS,
                        methods: Iterable[str] = METHODS, timeout: int = 300,
                        keep_cache: bool = False, command: str = "") -> dict:
    """Run every architecture of ``kinds`` (name -> (model type, changes)) in turn, each
    within ``timeout`` seconds, printing a line per run and writing ``out`` (JSON) after
    each architecture, so an interrupted sweep keeps what ran.

    ``train.precision=auto``'s measurement is cached in a temporary ``LEANTUNE_CACHE``
    (the sweep's own, measured once) unless ``keep_cache`` (the user's cache).
    """
    precisions, methods = list(precisions), list(methods)
    payload = {"command": command, "cpu": cpu_info(), "torch": torch.__version__,
               "transformers": transformers.__version__, "python": platform.python_version(),
               "max_length": MAX_LENGTH, "overrides": list(TINY_RUN), "timeout": timeout,
               "counts": {}, "results": {}}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="leantune-architectures-") as tmp, \
            _cache(None if keep_cache else Path(tmp) / "cache"), _quiet_with_alarm():
        for i, (kind, (model_type, changes)) in enumerate(kinds.items()):
            work = Path(tmp) / f"{i:03d}"
            work.mkdir()
            tick = time.perf_counter()
            signal.alarm(timeout)
            try:
                record = run_architecture(
                    model_type, changes, entry, work, precisions, methods,
                    report=lambda key, run, kind=kind: print(run_line(kind, key, run), flush=True))
            finally:
                signal.alarm(0)
            shutil.rmtree(work, ignore_errors=True)  # the runs' checkpoints: disk, not memory
            if "runs" not in record:
                print(f"{kind:34s} not built: {record['why'][:160]}", flush=True)
            payload["results"][kind] = {"type": model_type, **record,
                                        "seconds": round(time.perf_counter() - tick, 2),
                                        "rss_mb": _rss_mb()}
            payload["counts"] = count_verdicts(payload["results"])
            out.write_text(json.dumps(payload, indent=1) + "\n")
    return payload


@contextlib.contextmanager
def _quiet_with_alarm() -> Iterator[None]:
    """For the block: no log records below ERROR and no progress bars (a line per run
    says what matters), and SIGALRM raising :class:`Timeout`."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    logging.disable(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.utils.logging.enable_progress_bar()
        logging.disable(logging.NOTSET)
        signal.signal(signal.SIGALRM, previous)


def _alarm(*_) -> None:
    raise Timeout()


@contextlib.contextmanager
def _cache(path: Path | None) -> Iterator[None]:
    """``LEANTUNE_CACHE`` set to ``path`` for the block (None: left as it is)."""
    old = os.environ.get("LEANTUNE_CACHE")
    if path is not None:
        os.environ["LEANTUNE_CACHE"] = str(path)
    try:
        yield
    finally:
        if path is not None and old is None:
            del os.environ["LEANTUNE_CACHE"]
        elif path is not None:
            os.environ["LEANTUNE_CACHE"] = old


def _rss_mb() -> float | None:
    """This process's resident memory now (Linux), to see that runs do not accumulate."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines()
                    if x.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None
    return round(int(line.split()[1]) / 1024, 1)


def run_line(kind: str, key: str, run: dict) -> str:
    """One printed line: architecture, precision/method, verdict, precision used and why."""
    verdict = run["verdict"]
    if verdict == "TRACEBACK":  # the frames in full: they say where to look
        detail = (f"{run['error'][:100]} at {run['where']}"
                  + (f" via {run['via']}" if run.get("via") else ""))
    else:
        detail = {"padded": run.get("reason") or "", "refused": run.get("message", ""),
                  "SILENT": "packed, but the independent check finds it inexact"
                  }.get(verdict, "")[:400]
    note = f" [{run['note']}]" if run.get("note") else ""
    used = run.get("precision", {}).get("used") or ""
    return f"{kind:34s} {key:16s} {verdict:9s} {used:10s} {detail}{note}"


def count_verdicts(results: dict) -> dict:
    """``{"precision/method": {verdict: n}, "not built": n, "needless padding": n}``."""
    counts: dict = {"not built": 0, "needless padding": 0}
    for record in results.values():
        if "runs" not in record:
            counts["not built"] += 1
            continue
        for key, run in record["runs"].items():
            by = counts.setdefault(key, {})
            by[run["verdict"]] = by.get(run["verdict"], 0) + 1
            counts["needless padding"] += bool(run.get("note", "").startswith("needless"))
    return counts


def format_table(payload: dict) -> str:
    """Verdict counts per precision and method, then every bug (TRACEBACK, SILENT)."""
    counts = payload["counts"]
    keys = [k for k in counts if "/" in k]
    lines = [f"{'':16s} " + " ".join(f"{v:>9s}" for v in VERDICTS)]
    lines += [f"{k:16s} " + " ".join(f"{counts[k].get(v, 0):9d}" for v in VERDICTS)
              for k in keys]
    unbuilt = [k for k, r in payload["results"].items() if "runs" not in r]
    lines.append(f"not built: {len(unbuilt)}" + (f" ({', '.join(unbuilt)})" if unbuilt else "")
                 + "; padded needlessly (the independent check finds packing exact): "
                 f"{counts['needless padding']}")
    for kind, record in payload["results"].items():
        for key, run in record.get("runs", {}).items():
            if run["verdict"] in ("TRACEBACK", "SILENT", "timeout"):
                lines.append(run_line(kind, key, run))
    return "\n".join(lines)
