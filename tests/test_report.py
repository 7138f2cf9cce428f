"""Run reports: ``train`` ends with ``report/index.html`` and its plots; what the page and
the plots show is checked against the run's own ``metrics.jsonl`` and ``summary.json``,
and the page is rendered in headless Chromium when it is installed."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

import leantune.report.plots as plots
import leantune.train.loop as loop
from leantune.cli import main
from leantune.report import load_run, report_after_training, write_report
from leantune.report.runs import ReportError
from train.test_loop import config

from helpers import write_rows


@pytest.fixture(scope="module")
def runs(llama_dir, tmp_path_factory):
    """Two finished runs on the same data: plain LoRA, and LoRA with Fast Forward, both
    evaluated every 2 steps and logging every step."""
    root = tmp_path_factory.mktemp("report")
    chat_rows = write_rows(root / "add.jsonl", 0, 48)
    common = ["train.max_steps=8", "eval.every=2", "train.log_every=1", "optim.lr=5e-3",
              "schedule.kind=cosine", "schedule.warmup_steps=2"]
    loop.train(config(llama_dir, chat_rows, root / "plain", *common))
    loop.train(config(llama_dir, chat_rows, root / "ff", *common, "fast_forward.enabled=true",
                      "fast_forward.interval=3", "fast_forward.eval_examples=4"))
    for run_dir in (root / "plain", root / "ff"):  # as `leantune train` does after training
        assert report_after_training(run_dir) == run_dir / "report" / "index.html"
    return root / "plain", root / "ff"


def test_train_writes_a_self_contained_report(runs):
    plain, ff = runs
    for run_dir in runs:
        page = (run_dir / "report" / "index.html").read_text()
        assert "<link" not in page and not re.search(r"src=\"(?!data:)", page)  # nothing outside
        images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
        pngs = sorted((run_dir / "report").glob("*.png"))
        # Every PNG written is embedded in the page, byte for byte.
        assert sorted(base64.b64decode(i) for i in images) == sorted(p.read_bytes() for p in pngs)
    names = lambda d: {p.name for p in (d / "report").glob("*.png")}  # noqa: E731
    assert names(plain) == {"loss.png", "eval_sets.png", "lr.png", "system.png"}
    assert names(ff) == names(plain) | {"fast_forward.png"}


def test_page_shows_the_runs_own_figures(runs):
    _, ff = runs
    summary = json.loads((ff / "summary.json").read_text())
    page = (ff / "report" / "index.html").read_text()
    before, after = summary["eval_loss"]["before"], summary["eval_loss"]["after"]
    assert f"{before:.4f} → {after:.4f}" in page
    assert f"{summary['ff_stages']} stages, {summary['ff_steps_accepted']} steps accepted" in page
    # One FF table row per stage, with the accepted count the summary holds.
    rows = re.findall(r"<tr><td>ff</td><td>(\d+)</td><td>(\d+)</td>", page)
    assert [int(a) for _, a in rows] == summary["ff_accepted_per_stage"]
    assert summary["ff_stages"] >= 2
    # Precision and MFU, as the summary measured them.
    mfu = summary["mfu"]
    assert f"{100 * mfu['fraction']:.1f} % ({mfu['achieved_flops_per_second'] / 1e9:.1f} of" in page
    assert f"{summary['precision']['used']} (train.precision=auto: " in page


def test_plotted_curves_are_the_logged_values(runs):
    _, ff = runs
    run = load_run(ff)
    records = [json.loads(line) for line in (ff / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "eval_sets" not in r]
    evals = [r for r in records if "eval_sets" in r]
    fig = plots.loss_figure([run])
    by_axis = dict(zip(["step", "tokens", "flops", "seconds"], fig.axes))
    train_line, eval_line = by_axis["tokens"].lines
    assert list(train_line.get_xdata()) == [r["tokens"] for r in steps]
    assert list(train_line.get_ydata()) == [r["loss"] for r in steps]
    assert list(eval_line.get_ydata()) == [r["eval_loss"] for r in evals]
    flops = by_axis["flops"].lines[0].get_xdata()
    assert list(flops) == [r["train_flops"] + r["ff_flops"] for r in steps]
    summary = json.loads((ff / "summary.json").read_text())
    # The last held-out point sits at the run's total tokens and training + FF FLOPs.
    assert eval_line.get_xdata()[-1] == summary["train_tokens"]["total"]
    assert by_axis["flops"].lines[1].get_xdata()[-1] == summary["train_flops"] + summary["ff_flops"]


def test_positions_interpolated_for_older_logs_agree_with_logged_ones(runs, tmp_path):
    """Logs without the x-axis fields on eval lines: their places come from the steps."""
    _, ff = runs
    old = tmp_path / "old"
    shutil.copytree(ff, old)
    lines = [json.loads(x) for x in (old / "metrics.jsonl").read_text().splitlines()]
    for r in lines:
        if "eval_sets" in r:
            for key in ("tokens", "flops", "compute_seconds"):
                r.pop(key)
    (old / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    new, stripped = load_run(ff), load_run(old)
    for axis in ("tokens", "flops"):
        np.testing.assert_allclose(stripped.position(axis, stripped.evals),
                                   new.position(axis, new.evals), rtol=1e-12)


def test_planned_schedule_meets_the_used_learning_rates(runs):
    plain, _ = runs
    fig = plots.lr_figure([load_run(plain)])
    planned, used = fig.axes[0].lines
    plan = dict(zip(planned.get_xdata(), planned.get_ydata()))
    assert len(used.get_xdata()) == 8
    for step, lr in zip(used.get_xdata(), used.get_ydata()):
        assert plan[step] == pytest.approx(lr, rel=1e-12), step


def test_several_runs_overlaid_from_the_cli(runs, tmp_path, capsys):
    out = tmp_path / "compare"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    assert str(out / "index.html") in capsys.readouterr().out
    page = (out / "index.html").read_text()
    assert "<th>plain</th><th>ff</th>" in page
    fig = plots.loss_figure([load_run(d) for d in runs])
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert labels == ["plain train", "plain held-out", "ff train", "ff held-out"]
    fig = plots.fast_forward_figure([load_run(d) for d in runs])  # only ff has stages
    assert [c.get_label() for c in fig.axes[0].containers] == ["ff"]


def test_report_of_a_run_cut_short(runs, tmp_path):
    """A run with no summary.json and a last line cut mid-write still gets its page."""
    plain, _ = runs
    cut = tmp_path / "cut"
    shutil.copytree(plain, cut)
    (cut / "summary.json").unlink()
    text = (cut / "metrics.jsonl").read_text()
    (cut / "metrics.jsonl").write_text(text[: text.rstrip().rfind("\n") + 12])
    page = write_report([cut]).read_text()
    assert "no summary.json" in page and "loss.png" in page


def test_bad_run_directories_are_one_line_errors(runs, tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    plain, _ = runs
    broken = tmp_path / "broken"
    shutil.copytree(plain, broken)
    lines = (broken / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:10]
    (broken / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportError, match=r"metrics.jsonl:3: not JSON"):
        load_run(broken)


def test_without_matplotlib_the_page_keeps_its_tables(runs, tmp_path, monkeypatch):
    def missing():
        raise ImportError("no matplotlib")

    monkeypatch.setattr(plots, "_pyplot", missing)
    page = write_report([runs[0]], tmp_path / "r").read_text()
    assert "matplotlib is not installed" in page and "<h2>Summary</h2>" in page
    assert not list((tmp_path / "r").glob("*.png"))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--hide-scrollbars", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(not CHROMIUM and not os.environ.get("LEANTUNE_REQUIRE_CHROMIUM"),
                    reason="headless Chromium is not installed (Debian package chromium)")
def test_page_renders_in_headless_chromium(runs, tmp_path):
    """The browser decodes every plot, and the plots are what is drawn in their place: a
    screenshot differs from one of the same page with each plot swapped for a blank image
    of its size (same layout) over most of the rows the plots take."""
    import io

    from PIL import Image

    assert CHROMIUM, "LEANTUNE_REQUIRE_CHROMIUM is set but chromium is not installed"
    _, ff = runs
    page = (ff / "report" / "index.html").read_text()
    probe = tmp_path / "probe.html"  # the page, plus a script that counts decoded images
    probe.write_text(page.replace("</body>", (
        "<script>window.onload = () => { const i = [...document.images]; document.title = "
        "'decoded ' + i.filter(x => x.complete && x.naturalWidth > 0).length + ' of ' + "
        "i.length; };</script></body>")))
    dom = chromium("--virtual-time-budget=5000", "--dump-dom", probe.as_uri()).stdout
    assert "<title>decoded 5 of 5</title>" in dom

    def blank(match: re.Match) -> str:
        size = Image.open(io.BytesIO(base64.b64decode(match.group(1)))).size
        buffer = io.BytesIO()
        Image.new("RGB", size, "white").save(buffer, "PNG")
        return f'src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"'

    blanked = tmp_path / "blanked.html"
    blanked.write_text(re.sub(r'src="data:image/png;base64,([^"]+)"', blank, page))
    shots = {}
    for name, path in (("page", ff / "report" / "index.html"), ("blanked", blanked)):
        shots[name] = tmp_path / f"{name}.png"
        done = chromium(f"--screenshot={shots[name]}", "--window-size=1200,2400", path.as_uri())
        assert shots[name].is_file(), done.stderr[-2000:]
    a = np.asarray(Image.open(shots["page"]).convert("L"), float)
    b = np.asarray(Image.open(shots["blanked"]).convert("L"), float)
    assert a.shape == b.shape == (2400, 1200)
    differs = np.abs(a - b) > 30
    assert differs.any(axis=1).mean() > 0.4  # the plots fill most of the view's height
    assert differs.mean() > 0.01 and (b < 200).mean() > 0.002  # ink in both: text and plots
