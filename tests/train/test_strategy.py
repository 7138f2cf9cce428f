"""The launch check (issue 27 point 4): a launch whose sharding Accelerate does not run is
refused in one line, a difference that does not matter for memory is warned about, and
the strategy run is recorded. The environments are the ones ``accelerate launch`` sets
(accelerate 1.16); one real launch asks for FSDP2 over two CPU processes."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import leantune
from leantune.cli import main
from leantune.config import ConfigError
from leantune.train.strategy import check_strategy, fsdp_sharding, launch_request

# What accelerate launch's torchrun launcher sets for `distributed_type: FSDP` with
# `fsdp_version: 2` and 2 processes (printed by a launched script), trimmed.
FSDP2_LAUNCH = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                "FSDP_SHARDING_STRATEGY": "FULL_SHARD", "FSDP_RESHARD_AFTER_FORWARD": "true",
                "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0", "RANK": "0"}
LAUNCH_VARS = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_CPU",
               "FSDP_VERSION", "FSDP_SHARDING_STRATEGY", "FSDP_RESHARD_AFTER_FORWARD",
               "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE",
               "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def bare_env(monkeypatch):
    """No launcher's variables: a plain ``leantune train``."""
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def joined(kind: DistributedType, processes: int) -> SimpleNamespace:
    """An Accelerator's view of a process group this test process cannot join."""
    return SimpleNamespace(distributed_type=kind, num_processes=processes)


def test_fsdp_on_two_cpu_processes_is_refused(bare_env):
    for name, value in FSDP2_LAUNCH.items():
        bare_env.setenv(name, value)
    requested = launch_request()
    assert requested == {"type": "FSDP", "sharding": "FSDP2 reshard_after_forward=True",
                         "processes": 2}
    with pytest.raises(ConfigError) as refused:
        check_strategy(joined(DistributedType.MULTI_CPU, 2), requested)
    message = str(refused.value)
    assert "\n" not in message
    assert re.search(r"asked for FSDP2 .* over 2 processes but Accelerate runs MULTI_CPU: "
                     r"Accelerate runs FSDP only on GPUs .* data parallelism .* whole model; "
                     r"launch without FSDP \(accelerate launch --multi_gpu --num_processes 2",
                     message), message


def test_fsdp1_on_cpu_is_refused_before_the_accelerator(bare_env):
    """Accelerate cannot build its FSDP1 plugin for CPU processes (sync_module_states);
    the launch is refused in one line first. The same launch on GPUs is taken."""
    bare_env.setenv("ACCELERATE_USE_FSDP", "true")
    bare_env.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match=r"^accelerate launch asked for FSDP1 FULL_SHARD on "
                                          r"CPU processes: .*fsdp_version: 2"):
        launch_request(cpu=True)
    assert launch_request(cpu=False)["sharding"] == "FSDP1 FULL_SHARD"


def test_fsdp_in_one_process_warns_and_records(bare_env, caplog):
    bare_env.setenv("ACCELERATE_USE_FSDP", "true")
    bare_env.setenv("FSDP_VERSION", "1")
    bare_env.setenv("FSDP_SHARDING_STRATEGY", "shard_grad_op")
    requested = launch_request(cpu=False)  # as a one-GPU machine reads it
    with caplog.at_level(logging.WARNING, logger="leantune.train.strategy"):
        record = check_strategy(Accelerator(cpu=True), requested)  # Accelerate drops FSDP
    assert record["type"] == "NO" and record["processes"] == 1 and record["sharding"] is None
    assert record["requested"] == {"type": "FSDP", "sharding": "FSDP1 SHARD_GRAD_OP",
                                   "processes": None}
    assert [r.getMessage() for r in caplog.records] == [record["warning"]]
    assert "asked for FSDP1 SHARD_GRAD_OP but Accelerate runs NO" in record["warning"]


def test_requested_sharding_reads_what_the_plugin_reads(bare_env):
    """The request and the running plugin, made from the same variables, read alike."""
    for name, value in FSDP2_LAUNCH.items():
        bare_env.setenv(name, value)
    bare_env.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    acc = SimpleNamespace(distributed_type=DistributedType.FSDP,
                          state=SimpleNamespace(fsdp_plugin=FullyShardedDataParallelPlugin()))
    assert fsdp_sharding(acc) == launch_request()["sharding"] == (
        "FSDP2 reshard_after_forward=False")


def test_deepspeed_is_refused_in_one_line(bare_env, llama_dir, tmp_path, capsys):
    deepspeed = "DeepSpeed is not supported.*steps the optimizer inside backward.*fsdp.yaml"
    with pytest.raises(ConfigError, match=deepspeed):
        check_strategy(joined(DistributedType.DEEPSPEED, 2), None)
    bare_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match=deepspeed):
        launch_request()
    # Refused before the Accelerator (which would fail importing deepspeed) and the run
    # directory exist: one line, exit 2.
    assert main(["train", f"model.name_or_path={llama_dir}", "data.path=unused.jsonl",
                 f"train.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("leantune: error: accelerate launch with DeepSpeed") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_plain_run_records_one_process_without_warning(bare_env, caplog):
    with caplog.at_level(logging.WARNING, logger="leantune.train.strategy"):
        record = check_strategy(Accelerator(cpu=True), launch_request())
    assert record == {"type": "NO", "processes": 1, "sharding": None, "requested": None,
                      "warning": None}
    assert not caplog.records
    assert json.loads(json.dumps(record)) == record


def test_process_counts_that_differ_are_warned(bare_env):
    bare_env.setenv("WORLD_SIZE", "4")
    record = check_strategy(joined(DistributedType.MULTI_CPU, 2), launch_request())
    assert record["warning"].startswith("the launch asked for 4 processes but 2 joined")
    # accelerate launch --cpu --num_processes 2: the simple launcher starts one process,
    # leaving only MASTER_ADDR behind.
    bare_env.delenv("WORLD_SIZE")
    bare_env.setenv("ACCELERATE_USE_CPU", "True")
    bare_env.setenv("MASTER_ADDR", "127.0.0.1")
    record = check_strategy(joined(DistributedType.NO, 1), launch_request())
    assert record["requested"] == {"type": None, "sharding": None, "processes": None}
    assert "simple launcher" in record["warning"] and "--multi_gpu" in record["warning"]


@pytest.mark.slow
def test_fsdp1_launch_on_two_cpu_processes_is_refused(llama_dir, tmp_path):
    """FSDP2 runs on CPU processes (tests/train/test_fsdp.py); FSDP1 does not (its
    FullyShardedDataParallel wants an accelerator device), so both processes refuse it
    before the run directory exists. torchrun's agent reports the failed child (exit code
    2) with its own traceback and exits 1: that part is the launcher's."""
    config = tmp_path / "fsdp1_cpu.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\n"
                      "num_machines: 1\nmachine_rank: 0\nnum_processes: 2\n"
                      "mixed_precision: 'no'\nuse_cpu: true\nfsdp_config:\n"
                      "  fsdp_version: 1\n  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
                      "  fsdp_sharding_strategy: FULL_SHARD\n"
                      "  fsdp_state_dict_type: SHARDED_STATE_DICT\n")
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "add 1 2"},
                                             {"role": "assistant", "content": "3"}]}) + "\n")
    bin_dir = Path(sys.executable).parent
    done = subprocess.run(
        [str(bin_dir / "accelerate"), "launch", "--config_file", str(config),
         "--main_process_port", "29536", str(bin_dir / "leantune"), "train",
         f"model.name_or_path={llama_dir}", f"data.path={data}", "train.max_steps=2",
         "train.progress=false", f"train.output_dir={tmp_path / 'run'}"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=240)
    errors = [line for line in done.stderr.splitlines() if line.startswith("leantune: error:")]
    assert errors, done.stderr[-3000:]
    assert all(re.fullmatch(r"leantune: error: accelerate launch asked for FSDP1 FULL_SHARD "
                            r"on CPU processes: leantune shards CPU processes with FSDP2 only; "
                            r"set fsdp_config.fsdp_version: 2 .*fsdp_cpu.yaml\)", line)
               for line in errors), errors
    assert re.search(r"exitcode\s*:\s*2 ", done.stderr), done.stderr[-3000:]
    assert done.returncode == 1  # torchrun's ChildFailedError, raised by accelerate launch
    assert str(Path(leantune.__file__).parent) not in done.stderr  # no traceback of ours
    assert not (tmp_path / "run").exists()  # no run directory, so no checkpoint
