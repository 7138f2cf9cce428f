"""Run reports: ``leantune report RUN_DIR [RUN_DIR ...]``, also written at the end of
``leantune train``.

One run: ``RUN_DIR/report/index.html`` and its PNGs beside it. Several runs: one page that
overlays them, in ``--out`` (default ``./report``). The HTML embeds its plots, so the page
alone is the whole report; the PNGs are there for slides and papers.
"""

from __future__ import annotations

import logging
from pathlib import Path

from leantune.common.files import write_text
from leantune.report.runs import ReportError, RunLog, load_run, load_runs

__all__ = ["ReportError", "RunLog", "load_run", "load_runs", "report_after_training",
           "write_report"]

log = logging.getLogger(__name__)


def write_report(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write the report of ``run_dirs`` into ``out``; returns the page's path.

    ``out`` defaults to ``RUN_DIR/report`` for one run and ``./report`` for several.
    Without matplotlib (the ``plot`` extra) the page has the tables and no plots.
    """
    from leantune.report.page import render

    runs = load_runs(list(run_dirs))
    out = Path(out) if out else (Path(run_dirs[0]) / "report" if len(runs) == 1
                                 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        from leantune.report.plots import write_plots

        plots, note = write_plots(runs, out), ""
    except ImportError:
        plots, note = [], "matplotlib is not installed: no plots (pip install 'leantune[plot]')"
        log.info(note)
    page = out / "index.html"
    write_text(page, render(runs, plots, note))
    return page


def report_after_training(run_dir: str | Path) -> Path | None:
    """``write_report([run_dir])`` for a run that has just finished. The run itself is
    saved by then: a report that fails is logged, not raised (None), and ``leantune
    report RUN_DIR`` can write it again."""
    try:
        page = write_report([run_dir])
    except Exception as e:  # noqa: BLE001 - nothing of the run depends on it
        log.error("the run is saved, but its report failed (%s: %s); retry with "
                  "`leantune report %s`", type(e).__name__, e, run_dir)
        return None
    log.info("report: %s", page)
    return page
