"""The launch check: the distributed strategy ``accelerate launch`` asked for against the
one the ``Accelerator`` runs, refused where the difference matters for memory, warned
where it does not, and recorded (``summary.json``'s ``strategy``).

Accelerate drops a requested strategy without a word when it cannot run it: an FSDP
launch on CPU becomes ``MULTI_CPU`` data parallelism, every process holding the whole
model. The launcher tells its processes what was asked only through environment
variables (accelerate 1.16, ``accelerate/utils/launch.py``):

- ``prepare_multi_gpu_env`` (the torchrun launcher, used for ``--multi_gpu`` and for
  FSDP unless ``--cpu`` is passed) sets ``ACCELERATE_USE_FSDP=true``, ``FSDP_VERSION``,
  ``FSDP_SHARDING_STRATEGY`` (read by FSDP1) and ``FSDP_RESHARD_AFTER_FORWARD`` (FSDP2);
  torchrun sets ``WORLD_SIZE`` and ``LOCAL_RANK``. It does not pass ``use_cpu`` on.
- ``prepare_deepspeed_cmd_env`` sets ``ACCELERATE_USE_DEEPSPEED=true``.
- ``prepare_simple_launcher_cmd_env`` (``--cpu``, or no multi-process flag) always sets
  ``ACCELERATE_USE_CPU`` and starts one process, or ``mpirun``'s; for
  ``--num_processes`` > 1 it sets ``MASTER_ADDR`` / ``MASTER_PORT`` but passes no count.

``AcceleratorState`` (``accelerate/state.py``) turns ``ACCELERATE_USE_FSDP`` into
``DistributedType.FSDP`` only when ``_prepare_backend`` found an accelerator process
group (``MULTI_GPU``, ``MULTI_NPU``, ...); on CPU it returns ``MULTI_CPU`` (gloo) and the
FSDP branch is never taken. DeepSpeed likewise needs ``not cpu``. FSDP2 itself runs on
CPU processes (``fully_shard`` on a CPU mesh, gloo's all-gather and reduce-scatter), so
:func:`shard_on_cpu` sets the state Accelerate would have set there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, str_to_bool

from leantune.config import ConfigError

log = logging.getLogger(__name__)

# Accelerate's _prepare_backend reads the world size from these, first found first (MPI's
# launchers, then torchrun's).
WORLD_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE")

DEEPSPEED_REFUSED = (
    "accelerate launch with DeepSpeed is not supported: its engine steps the optimizer inside "
    "backward, past leantune's non-finite check and gradient accumulation; shard with FSDP "
    "instead (--config_file examples/accelerate/fsdp.yaml)")

# Why Accelerate runs something else than the FSDP asked for, by what it runs.
NOT_FSDP_BECAUSE = {
    DistributedType.MULTI_CPU: "Accelerate runs FSDP only on GPUs and other accelerators, and "
                               "on CPU joins the processes as MULTI_CPU data parallelism (gloo)",
    DistributedType.NO: "Accelerate found no process group and runs a single process",
}


def launch_request(env: Mapping[str, str] = os.environ, cpu: bool | None = None
                   ) -> dict | None:
    """What the launcher asked for, read from the environment it set (see the module's
    docstring): ``{"type": "FSDP" | None, "sharding": str | None, "processes": int | None}``,
    or None when nothing was asked (a plain ``leantune train``).

    Call it before the ``Accelerator`` exists: ``Accelerator()`` on a DeepSpeed launch
    fails with an ImportError where deepspeed is not installed, and on MPI it rewrites
    ``WORLD_SIZE``. A DeepSpeed launch is refused here (:data:`DEEPSPEED_REFUSED`), and
    FSDP1 on CPU (``cpu``; default: no CUDA device), which Accelerate's FSDP1 plugin
    cannot even be built for; FSDP2 runs there (:func:`shard_on_cpu`).

    Raises:
        ConfigError: the launch asked for DeepSpeed, or for FSDP1 on CPU.
    """
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ConfigError(DEEPSPEED_REFUSED)
    fsdp = env.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    cpu = not torch.cuda.is_available() if cpu is None else cpu
    if fsdp and cpu and requested_fsdp(env).startswith("FSDP1"):
        raise ConfigError(
            f"accelerate launch asked for {requested_fsdp(env)} on CPU processes: leantune "
            "shards CPU processes with FSDP2 only; set fsdp_config.fsdp_version: 2 "
            "(examples/accelerate/fsdp_cpu.yaml)")
    processes = next((int(env[k]) for k in WORLD_SIZE_VARS if k in env), None)
    # The simple launcher's trace of --num_processes > 1: it starts one process anyway.
    simple_many = "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env and processes is None
    if not (fsdp or processes is not None or simple_many):
        return None
    return {"type": "FSDP" if fsdp else None,
            "sharding": requested_fsdp(env) if fsdp else None,
            "processes": processes}


def requested_fsdp(env: Mapping[str, str]) -> str:
    """The FSDP sharding the launch asked for, in :func:`fsdp_sharding`'s words; the same
    variables and defaults ``FullyShardedDataParallelPlugin.__post_init__`` reads."""
    version = int(env.get("FSDP_VERSION", "1"))
    if version == 2:
        reshard = str_to_bool(env.get("FSDP_RESHARD_AFTER_FORWARD", "true"), to_bool=True)
        return f"FSDP2 reshard_after_forward={reshard}"
    return f"FSDP1 {env.get('FSDP_SHARDING_STRATEGY', 'FULL_SHARD').upper()}"


def fsdp_sharding(acc: Accelerator) -> str | None:
    """The sharding the running FSDP plugin applies; None when FSDP is not running."""
    if acc.distributed_type != DistributedType.FSDP:
        return None
    plugin = acc.state.fsdp_plugin
    if plugin.fsdp_version == 2:
        return f"FSDP2 reshard_after_forward={plugin.reshard_after_forward}"
    return f"FSDP1 {plugin.sharding_strategy.name}"


def shard_on_cpu(acc: Accelerator, requested: dict | None) -> bool:
    """Run the FSDP2 a launch asked for on CPU processes, where Accelerate would run DDP.

    ``AcceleratorState`` never promotes ``MULTI_CPU`` to FSDP (see the module's
    docstring), although everything FSDP2 needs runs on CPU: ``fully_shard`` on a CPU
    device mesh, gloo's all-gather and reduce-scatter, ``torch.distributed.checkpoint``.
    So when a launch asked for FSDP2 and Accelerate joined several CPU processes, this
    sets the state Accelerate would have set on GPUs: ``distributed_type = FSDP`` and the
    plugin built from the launcher's variables, as ``Accelerator()`` builds it, and
    ``PartialState``'s type too, as ``AcceleratorState`` does on GPUs. From then
    on Accelerate's own FSDP2 paths run (``prepare``, ``save_state``, ``get_state_dict``).
    Call it right after the ``Accelerator`` is made, before ``prepare``.

    Returns:
        True when FSDP2 now runs on CPU processes; False when there was nothing to do.
        (FSDP1 on CPU is refused before, by :func:`launch_request`.)
    """
    if (requested is None or requested["type"] != "FSDP" or acc.num_processes < 2
            or acc.distributed_type != DistributedType.MULTI_CPU):
        return False
    plugin = FullyShardedDataParallelPlugin()  # reads FSDP_* from the launcher's environment
    if acc.state.mixed_precision != "no":
        plugin.set_mixed_precision(acc.state.mixed_precision)
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    # As AcceleratorState does on GPUs: every later AcceleratorState() (the optimizer's
    # wrapper makes one) copies PartialState's type over its own.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    log.info("FSDP2 on %d CPU processes (gloo): Accelerate's FSDP state set by leantune",
             acc.num_processes)
    return True


def check_strategy(acc: Accelerator, requested: dict | None) -> dict:
    """Compare the launch's request (:func:`launch_request`) with what ``acc`` runs.

    Refuses where the difference matters for memory: FSDP asked for but not run over
    several processes (each would hold the whole model and its optimizer state), or
    DeepSpeed running. Warns, in one log line, where it does not: FSDP not run on a single
    process (nothing to shard over), or another process count than asked for.

    Returns:
        ``summary.json``'s ``strategy``: the type Accelerate runs, its process count, its
        sharding (None unless FSDP), what the launch asked for, and the warning, if any.

    Raises:
        ConfigError: the launch's sharding is not what runs, or DeepSpeed runs.
    """
    if acc.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError(DEEPSPEED_REFUSED)
    warning = None
    if requested is not None:
        warning = fsdp_mismatch(acc, requested) or count_mismatch(acc, requested)
    if warning:
        log.warning(warning)
    return {"type": acc.distributed_type.value, "processes": acc.num_processes,
            "sharding": fsdp_sharding(acc), "requested": requested, "warning": warning}


def fsdp_mismatch(acc: Accelerator, requested: dict) -> str | None:
    """The warning when FSDP was asked for and one process runs without it; None when
    FSDP was not asked for or runs.

    Raises:
        ConfigError: FSDP was asked for and several processes run without it.
    """
    running, n = acc.distributed_type, acc.num_processes
    if requested["type"] != "FSDP" or running == DistributedType.FSDP:
        return None
    because = NOT_FSDP_BECAUSE.get(running, "Accelerate did not set FSDP up")
    if n > 1:
        raise ConfigError(
            f"accelerate launch asked for {requested['sharding']} over {n} processes but "
            f"Accelerate runs {running.value}: {because}, so every process would hold the "
            f"whole model; launch without FSDP (accelerate launch --multi_gpu "
            f"--num_processes {n}, gloo data parallelism on CPU) or run FSDP on GPUs")
    return (f"accelerate launch asked for {requested['sharding']} but Accelerate runs "
            f"{running.value} ({because}): one process has nothing to shard over")


def count_mismatch(acc: Accelerator, requested: dict) -> str | None:
    """The warning when another number of processes joined than the launch asked for
    (the global batch changes, the memory per process does not); None when they agree."""
    n = acc.num_processes
    if requested["processes"] not in (None, n):
        return (f"the launch asked for {requested['processes']} processes but {n} joined: "
                f"the global batch is train.batch_size x {n}")
    if requested["type"] is None and requested["processes"] is None and n == 1:
        # Only the simple launcher's MASTER_ADDR trace makes such a request (launch_request).
        return ("accelerate launch set MASTER_ADDR, as it does for --num_processes > 1, but "
                "its simple launcher (--cpu, or no --multi_gpu) starts one process: 1 process "
                "runs; on CPU, start several with --multi_gpu --num_processes N")
    return None
