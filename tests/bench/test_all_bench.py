"""``leantune bench all``: every bench in BENCHMARKS.md's order with its documented
settings, each writing into the chosen directory; one failing does not stop the rest."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from leantune.bench.all import BENCHES, run_all
from leantune.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def test_every_documented_bench_command_is_run_with_its_settings():
    """The commands BENCHMARKS.md shows are the ones `bench all` runs."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    shown = {re.sub(r"\s+", " ", m.strip()) for m in re.findall(
        r"^(?:leantune bench|python benchmarks/)([^#\n]*)", text, flags=re.M)}
    shown = {c for c in shown if c.split()[0] != "all"}
    ran = set()
    for _, args in BENCHES:
        first = args[0].removeprefix("script:")
        ran.add(" ".join([first, *args[1:]]))
    assert ran == shown


def test_runs_in_order_into_the_out_dir_and_keeps_going(tmp_path, capsys):
    calls = []

    def fake(argv):
        calls.append(argv)
        args = build_parser().parse_args(["bench", *argv])  # every argv is a valid command
        print(f"table of {argv[0]}")
        if argv[0] == "adapters":
            raise RuntimeError("out of memory")
        assert Path(args.out).parent == tmp_path
        return 0

    record = run_all(fake, tmp_path, scripts=tmp_path / "none")
    assert [c[0] for c in calls] == ["packing", "architectures", "fast-forward", "fast-forward",
                                     "adapters", "reft", "tasks", "tasks", "tasks", "continual",
                                     "speed", "preference", "grpo"]
    assert calls[1] == ["architectures", "--out", str(tmp_path / "architectures.json")]
    assert calls[4][:3] == ["adapters", "--rounds", "2"]
    assert calls[3][calls[3].index("--data") + 1].startswith("task:")
    assert "--plot" in calls[2] and calls[2][calls[2].index("--plot") + 1] == str(
        tmp_path / "fast_forward.png")
    status = {b["name"]: b.get("status", b.get("skipped")) for b in record["benches"]}
    assert status == {"packing": 0, "pack_lengths": "script not found", "architectures": 0,
                      "fast_forward": 0, "fast_forward_tasks": 0, "adapters": 1, "reft": 0,
                      "tasks": 0, "tasks_sweep": 0, "tasks_curves": 0, "continual": 0,
                      "corpus_scale": "script not found", "speed": 0,
                      "profile_fp32": "script not found",
                      "profile_fp32_unfused": "script not found",
                      "profile_bf16": "script not found",
                      "profile_bf16_unfused": "script not found",
                      "profile_bf16_compiled": "script not found",
                      "quickstart_precision": "script not found",
                      "matmul_shapes": "script not found", "preference": 0,
                      "grpo": 0, "scaling": "script not found"}
    assert json.loads((tmp_path / "all.json").read_text())["benches"] == record["benches"]
    tables = (tmp_path / "TABLES.md").read_text()
    assert "table of reft" in tables and "error: RuntimeError: out of memory" in tables
    assert "All together:" in tables


def test_only_a_subset_and_unknown_names(tmp_path):
    calls = []
    run_all(lambda argv: calls.append(argv) or 0, tmp_path, only=["reft"])
    assert [c[0] for c in calls] == ["reft"]
    with pytest.raises(ValueError, match="unknown bench nope; choose from packing"):
        run_all(lambda argv: 0, tmp_path, only=["nope"])


def test_the_command_runs_each_bench_through_its_own_parser(tmp_path, monkeypatch):
    """`leantune bench all` parses each bench's arguments as `leantune bench` does, and
    hands `bench architectures` the command's entry to train through."""
    import leantune.bench.cli as bench_cli
    from leantune.cli import main

    seen = []
    monkeypatch.setattr(bench_cli, "cmd_bench_architectures",
                        lambda args: seen.append((args.out, args.cli_main)) or 0)
    args = build_parser().parse_args(["bench", "all", "--only", "architectures",
                                      "--out-dir", str(tmp_path)])
    assert args.func(args) == 0
    assert seen == [(str(tmp_path / "architectures.json"), main)]
