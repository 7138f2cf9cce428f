"""The examples and the README stay true to the code."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from leantune.config import Config, load_config, reference_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_reference_lists_every_option_with_its_default():
    data = yaml.safe_load((ROOT / "examples/reference.yaml").read_text())
    for section in dataclasses.fields(Config):
        names = {f.name for f in dataclasses.fields(section.default_factory)}
        assert set(data[section.name]) == names, section.name
    assert load_config(ROOT / "examples/reference.yaml") == Config()
    assert (ROOT / "examples/reference.yaml").read_text() == reference_yaml()


@pytest.mark.parametrize("name", ["quickstart.yaml", "own_data.yaml", "task.yaml",
                                  "dpo.yaml", "grpo.yaml"])
def test_examples_load(name):
    cfg = load_config(ROOT / "examples" / name)
    assert cfg.adapter.method == "lora"


def test_task_example_trains_and_scores_the_same_tasks():
    cfg = load_config(ROOT / "examples" / "task.yaml")
    from leantune.config.tasks import parse_task_path, task_names

    assert parse_task_path(cfg.data.path, "train")[0] == task_names(cfg.eval.tasks)


def test_dpo_example_trains_pairs_of_the_tasks_it_scores():
    cfg = load_config(ROOT / "examples" / "dpo.yaml")
    from leantune.config.tasks import parse_task_path, task_names

    assert (cfg.objective.kind, cfg.adapter.method, cfg.objective.reference) == ("dpo", "lora",
                                                                                 "auto")
    assert parse_task_path(cfg.data.path, "train")[0] == task_names(cfg.eval.tasks)


def test_continual_example_loads():
    cfg = load_config(ROOT / "examples" / "continual.yaml")
    assert (cfg.data.mode, cfg.data.replay.ratio, cfg.schedule.kind) == ("corpus", 0.25,
                                                                         "infinite")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    assert "pytest" in ci
    assert ci in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("name", ["fsdp.yaml", "multi_gpu.yaml"])
def test_accelerate_configs_are_valid_and_state_their_launch_command(name):
    from accelerate.commands.config.config_args import ClusterConfig

    path = ROOT / "examples" / "accelerate" / name
    cluster = ClusterConfig.from_yaml_file(str(path))  # unknown keys raise
    assert cluster.num_processes == 4 and cluster.mixed_precision == "bf16"
    if name == "fsdp.yaml":
        assert cluster.distributed_type == "FSDP" and cluster.fsdp_config["fsdp_version"] == 2
    command = (f"accelerate launch --config_file examples/accelerate/{name} $(which leantune) "
               "train my.yaml")
    assert command in path.read_text() and command in (ROOT / "README.md").read_text()


def test_cpu_fsdp_config_is_valid_and_states_its_launch_command():
    from accelerate.commands.config.config_args import ClusterConfig

    path = ROOT / "examples" / "accelerate" / "fsdp_cpu.yaml"
    cluster = ClusterConfig.from_yaml_file(str(path))  # unknown keys raise
    assert (cluster.distributed_type, cluster.use_cpu, cluster.mixed_precision) == (
        "FSDP", True, "no")
    assert cluster.fsdp_config["fsdp_version"] == 2 and cluster.num_processes == 2
    command = ("accelerate launch --config_file examples/accelerate/fsdp_cpu.yaml "
               "$(which leantune) train my.yaml")
    assert command in path.read_text() and command in (ROOT / "README.md").read_text()
    assert "examples/slurm/train.sbatch" in (ROOT / "README.md").read_text()


def test_readme_export_commands_parse():
    """Every `leantune export` line the README shows (GGUF included) is a valid command."""
    import shlex

    from leantune.cli import build_parser

    lines = [line.split("#")[0].split("&&")[0].strip()
             for line in (ROOT / "README.md").read_text().splitlines()
             if line.startswith("leantune export") and "[" not in line]
    assert len(lines) >= 4
    for line in lines:
        args = build_parser().parse_args(shlex.split(line)[1:])
        assert args.func.__name__ == "cmd_export", line


def test_grpo_example_samples_problems_it_can_score():
    from leantune.data.prompt_sets import problem_source
    from leantune.objectives.rewards import load_reward

    cfg = load_config(ROOT / "examples" / "grpo.yaml")
    assert cfg.objective.kind == "grpo" and not cfg.fast_forward.enabled
    rows = problem_source(cfg.data.path)
    names = [load_reward(spec)[0] for spec in cfg.objective.rewards]
    assert names == ["numeric_match"] and all("answer" in r.record for r in rows)
