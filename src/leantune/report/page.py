"""The report's HTML: one self-contained file (CSS inline, plots embedded as base64 PNG),
so it opens from disk, from an archive or as an e-mail attachment, with nothing beside it.
"""

from __future__ import annotations

import base64
import datetime
import html
import json

import yaml

from leantune.model.mfu import mfu_text
from leantune.report.plots import Plot
from leantune.report.runs import RunLog

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1080px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 3px 9px; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; } th { background: #f4f4f4; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.92em; }
.muted { color: #777; } .better { color: #176317; } .worse { color: #a11; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; font-size: 12px; white-space: pre-wrap; }
"""


def esc(value) -> str:
    return html.escape(str(value))


def fmt(value, kind: str = "") -> str:
    """A figure for a table cell: ``kind`` is '', 'int', 'sci', 'pct', 'gib', 's' or 'loss'."""
    if value is None:
        return '<span class="muted">–</span>'
    if kind == "int":
        return f"{int(value):,}"
    if kind == "sci":
        return f"{value:.3g}"
    if kind == "pct":
        return f"{100 * value:.1f} %"
    if kind == "gib":
        return f"{value / 2**30:.2f} GiB"
    if kind == "s":
        return (f"{value:.2g} s" if value < 10 else f"{value:.0f} s" if value < 120
                else f"{value / 60:.1f} min")
    if kind == "loss":
        return f"{value:.4f}"
    return esc(value)


def summary_rows(run: RunLog) -> list[tuple[str, str]]:
    """(label, cell HTML) of the run's headline figures, from ``summary.json`` when the run
    finished, else from its last logged step."""
    s = run.summary or {}
    last = run.steps[-1] if run.steps else {}
    cfg_adapter = run.config.get("adapter") or {}
    loss = s.get("eval_loss") or {}
    ff = (f"{s['ff_stages']} stages, {s['ff_steps_accepted']} steps accepted"
          if s.get("ff_stages") else "–" if s else None)
    return [
        ("status", "finished" if s else '<span class="worse">no summary.json (running or '
                                        'stopped)</span>'),
        ("method", fmt(s.get("method", cfg_adapter.get("method")))),
        ("model", fmt(s.get("model", (run.config.get("model") or {}).get("name_or_path")))),
        ("optimizer steps", fmt(s.get("optimizer_steps", last.get("step")), "int")),
        ("tokens trained on", fmt((s.get("train_tokens") or {}).get("total", last.get("tokens")),
                                  "int")),
        ("FLOPs: training", fmt(s.get("train_flops", last.get("train_flops")), "sci")),
        ("FLOPs: Fast Forward", fmt(s.get("ff_flops", last.get("ff_flops")), "sci")),
        ("FLOPs: evaluation", fmt(s.get("eval_flops"), "sci")),
        ("Fast Forward", fmt(ff)),
        ("wall time", fmt(s.get("wall_seconds", last.get("elapsed_seconds")), "s")),
        ("tokens/s (training)", fmt(s.get("tokens_per_second", last.get("tokens_per_second")),
                                    "sci")),
        ("precision", fmt(precision_text(s.get("precision")))),
        ("MFU (training)", fmt(mfu_text(s.get("mfu")))),
        ("packing", packing_cell(s.get("packing"))),
        ("padding", fmt(s.get("padding_fraction", last.get("padding_fraction")), "pct")),
        ("peak memory", fmt(s.get("peak_memory_bytes", last.get("peak_memory_bytes")), "gib")),
        ("trainable / total params", fmt(
            f"{s['trainable_params']:,} / {s['total_params']:,} "
            f"({100 * s['trainable_params'] / s['total_params']:.3g} %)"
            if s.get("total_params") else None)),
        ("held-out loss before → after", _before_after(loss.get("before"), loss.get("after"))),
        ("final training loss", fmt(s.get("final_train_loss", last.get("loss")), "loss")),
        ("non-finite steps skipped", fmt(s.get("nonfinite_skipped"), "int")),
    ]


def precision_text(p: dict | None) -> str | None:
    if not p:
        return None
    return f"{p['used']} (train.precision={p['requested']}: {p['reason']})"


def packing_cell(packing: dict | None) -> str:
    """The layout used, why when it is not the one asked for, and the probe's cost."""
    if not packing:
        return fmt(None)
    cell = esc(packing["used"])
    if packing["used"] != packing["requested"]:
        cell += f' <span class="worse">(asked {esc(packing["requested"])}: ' \
                f'{esc(packing.get("reason"))})</span>'
    probe = packing.get("probe")
    if probe:
        cell += (f'<br><span class="muted">probe: {"exact" if probe["exact"] else "inexact"}, '
                 f'{probe["seconds"]:.1f} s, {probe["flops"]:.3g} FLOPs</span>')
    return cell


def _before_after(before, after) -> str:
    if before is None or after is None:
        return fmt(after if before is None else before, "loss")
    delta = after - before
    css = "better" if delta < 0 else "worse"
    return f'{before:.4f} → {after:.4f} <span class="{css}">({delta:+.4f})</span>'


def summary_table(runs: list[RunLog]) -> str:
    rows = [summary_rows(r) for r in runs]
    head = "".join(f"<th>{esc(r.name)}</th>" for r in runs)
    body = "".join(f"<tr><th>{label}</th>" + "".join(f"<td>{r[i][1]}</td>" for r in rows)
                   + "</tr>" for i, (label, _) in enumerate(rows[0]))
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def table(columns: list[str], rows: list[list[str]], heading: str = "", empty: str = "") -> str:
    """An HTML table (cells are HTML already), under an ``<h2>`` when ``heading`` is given;
    ``empty`` when there are no rows."""
    if not rows:
        return empty
    head = "".join(f"<th>{c}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return (f"<h2>{heading}</h2>" if heading else "") + f"<table><tr>{head}</tr>{body}</table>"


def eval_table(runs: list[RunLog]) -> str:
    """Every held-out set of every run: role, size, loss before and after, and the change
    (forgetting on old data shows as a rise)."""
    rows = []
    for run in runs:
        sets = (run.summary or {}).get("eval_sets") or _sets_from_log(run)
        for name, row in sets.items():
            before, after = (row.get("before") or {}), (row.get("after") or {})
            rows.append([esc(run.name), esc(name), fmt(row.get("role")),
                         fmt(row.get("examples"), "int"),
                         fmt(before.get("target_tokens") or after.get("target_tokens"), "int"),
                         _before_after(before.get("loss"), after.get("loss")),
                         fmt(after.get("perplexity"), "sci")])
    return table(["run", "data set", "role", "examples", "target tokens", "loss before → after",
                  "perplexity after"], rows,
                 empty='<p class="muted">No held-out evaluation was logged.</p>')


def _sets_from_log(run: RunLog) -> dict:
    """Per-set first and last evaluation, for a run without ``summary.json``."""
    sets: dict[str, dict] = {}
    for e in run.evals:
        for name, r in e["eval_sets"].items():
            sets.setdefault(name, {"before": r})["after"] = r
    return sets


def evaluation_table(runs: list[RunLog]) -> str:
    """``leantune eval RUN_DIR`` results (``eval.json``), when the run has them."""
    rows = [[esc(run.name), esc(name), fmt(r.get("examples"), "int"),
             fmt(r.get("target_tokens"), "int"), fmt(r.get("loss"), "loss"),
             fmt(r.get("perplexity"), "sci"), fmt(r.get("exact_match"), "pct"),
             fmt(r.get("contains_match"), "pct"), fmt(r.get("answer_match"), "pct"),
             fmt(r.get("generated"), "int")]
            for run in runs for name, r in ((run.evaluation or {}).get("datasets") or {}).items()]
    return table(["run", "data set", "examples", "target tokens", "loss", "perplexity",
                  "exact match", "contains match", "answer match", "generated"], rows,
                 "leantune eval")


def _acc(r: dict | None, key: str = "acc") -> str:
    if not r:
        return fmt(None)
    lo, hi = r[f"{key}_ci"]
    return f'{100 * r[key]:.1f} % <span class="muted">[{100 * lo:.1f}, {100 * hi:.1f}]</span>'


def task_table(runs: list[RunLog]) -> str:
    """Multiple-choice accuracy (95 % intervals): ``eval.tasks`` before and after training
    (``summary.json``), and ``leantune eval`` on choice sets and tasks (``eval.json``)."""
    rows = []
    for run in runs:
        acc = (run.summary or {}).get("task_accuracy") or {}
        before, after = acc.get("before") or {}, acc.get("after") or {}
        names = list((after or before).get("tasks", {}))
        for name in names + (["macro"] if names else []):
            b = before.get("macro") if name == "macro" else before.get("tasks", {}).get(name)
            a = after.get("macro") if name == "macro" else after.get("tasks", {}).get(name)
            docs = None if name == "macro" else (a or b)["docs"]
            rows.append([esc(run.name), "training", esc(name), fmt(docs, "int"), _acc(b),
                         _acc(a), _acc(b, "acc_norm"), _acc(a, "acc_norm")])
        evaluation = run.evaluation or {}
        scored = dict(evaluation.get("choices") or {})
        if scored:
            scored["macro"] = evaluation["macro"] | {"docs": None}
        for name, r in scored.items():
            rows.append([esc(run.name), "leantune eval", esc(name), fmt(r.get("docs"), "int"),
                         fmt(None), _acc(r), fmt(None), _acc(r, "acc_norm")])
    return table(["run", "scored by", "task", "documents", "acc before", "acc after",
                  "acc_norm before", "acc_norm after"], rows, "Task accuracy")


def ff_table(runs: list[RunLog]) -> str:
    rows = [[esc(run.name), str(s["step"]), str(s["ff_accepted"]),
             _before_after(s.get("ff_loss_before"), s.get("ff_loss_after")),
             fmt(s.get("ff_evaluations"), "int"), fmt(s.get("ff_flops"), "sci"),
             fmt(s.get("ff_seconds"), "s"), esc(s.get("ff_stopped") or "–")]
            for run in runs for s in run.ff]
    return table(["run", "after step", "steps accepted", "FF-set loss", "evaluations", "FLOPs",
                  "time", "stopped"], rows, "Fast Forward stages")


def replay_table(runs: list[RunLog]) -> str:
    rows = [[esc(run.name), esc(r["path"]), f"{fmt(r['ratio'], 'pct')} ({esc(r['schedule'])})",
             fmt(r["fraction"], "pct"), esc(json.dumps(r["windows"]))]
            for run in runs if (r := (run.summary or {}).get("replay"))]
    return table(["run", "replayed from", "asked", "replayed (counted)", "windows per stream"],
                 rows, "Replay")


def samples_section(runs: list[RunLog], limit: int = 3) -> str:
    parts = []
    for run in runs:
        for s in ((run.summary or {}).get("samples") or [])[:limit]:
            parts.append(f"<h3>{esc(run.name)}</h3><p><b>prompt</b></p><pre>{esc(s['prompt'])}</pre>"
                         + (f"<p><b>before</b></p><pre>{esc(s['before'])}</pre>"
                            if s.get("before") is not None else "")
                         + f"<p><b>after</b></p><pre>{esc(s['after'])}</pre>")
    return "<h2>Held-out prompts answered</h2>" + "".join(parts) if parts else ""


def rollouts_section(runs: list[RunLog], last: int = 2) -> str:
    """A GRPO run's last sampled groups (``rollouts.jsonl``): the prompt, each completion
    and its reward."""
    parts = []
    for run in runs:
        path = run.path / "rollouts.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text().splitlines()[-last:]:
            r = json.loads(line)
            prompt = r["prompt"] if isinstance(r["prompt"], str) else "\n".join(
                m["content"] for m in r["prompt"])
            rows = "".join(f"<tr><td>{fmt(c['reward'], 'sci')}</td><td><pre>{esc(c['text'])}</pre>"
                           "</td></tr>" for c in r["completions"])
            parts.append(f"<h3>{esc(run.name)}: generation {r['generation']}</h3>"
                         f"<pre>{esc(prompt)}</pre><table><tr><th>reward</th>"
                         f"<th>completion</th></tr>{rows}</table>")
    return "<h2>Sampled completions (GRPO)</h2>" + "".join(parts) if parts else ""


def figure(plot: Plot) -> str:
    data = base64.b64encode(plot.path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{esc(plot.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption><b>{esc(plot.title)}.</b> {esc(plot.caption)} "
            f'<span class="muted">({esc(plot.path.name)})</span></figcaption></figure>')


def render(runs: list[RunLog], plots: list[Plot], note: str = "") -> str:
    """The whole page."""
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    names = ", ".join(esc(r.name) for r in runs)
    configs = "".join(f"<details><summary>{esc(r.name)}: config.yaml</summary><pre>"
                      f"{esc(yaml.safe_dump(r.config, sort_keys=False))}</pre></details>"
                      for r in runs if r.config)
    figures = "".join(figure(p) for p in plots) or (
        f'<p class="muted">{esc(note or "No plots.")}</p>')
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>leantune report: {names}</title><style>{CSS}</style></head><body>"
            f"<h1>leantune report</h1><p class='muted'>{names} · written {when}"
            + "".join(f"<br>{esc(r.name)}: {esc(r.path.resolve())}" for r in runs) + "</p>"
            f"<h2>Summary</h2>{summary_table(runs)}"
            f"<h2>Curves</h2>{figures}"
            f"<h2>Held-out data sets</h2>{eval_table(runs)}{evaluation_table(runs)}"
            f"{task_table(runs)}"
            f"{ff_table(runs)}{replay_table(runs)}{samples_section(runs)}{rollouts_section(runs)}"
            f"<h2>Configuration</h2>{configs or '<p class=muted>none</p>'}"
            "</body></html>\n")
