"""Weights and optimizer state across the line between FSDP2-sharded runs and the rest.

A checkpoint is written as its run was laid out: Accelerate's sharded
``torch.distributed.checkpoint`` (DCP) directories under FSDP2, whole tensors otherwise.
DCP re-shards by itself onto another number of FSDP2 processes; what it does not do,
this module does, so a run resumes (or starts ``train.init_from``) on any layout:

- sharded checkpoint -> unsharded run (one process, or DDP): :func:`load_dcp_unsharded`
  reads the DCP directories into whole tensors (``torch.distributed.checkpoint``'s
  ``get_/set_model_state_dict`` and ``get_/set_optimizer_state_dict`` map the keys);
- whole checkpoint -> sharded run: :func:`full_weights_into_shards` lets the adapters'
  own loaders (PEFT's key mapping, the full model's, ReFT's) load whole tensors into
  DTensor parameters, each process keeping its shard, and :func:`shard_optimizer_state`
  does the same for the optimizer's moments.

:func:`reshard` puts FSDP2's sharded parameters back in place, which whatever writes the
weights outside a training step needs first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

FSDP_MODEL_DIR, FSDP_OPTIMIZER_DIR = "pytorch_model_fsdp_0", "optimizer_0"  # Accelerate's names


def sharded(acc) -> bool:
    """Whether parameters and optimizer state are split across processes."""
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are DTensors (FSDP2 shards)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def saved_sharded(accelerate_dir: Path) -> bool:
    """Whether ``Accelerator.save_state`` wrote ``accelerate_dir`` under FSDP (as DCP)."""
    return (accelerate_dir / FSDP_MODEL_DIR).is_dir()


def reshard(model: torch.nn.Module) -> None:
    """Put FSDP2's sharded parameters back in every sharded module of ``model``; nothing
    without FSDP2.

    FSDP2 all-gathers a module's parameters for its forward and swaps them in for the
    sharded ones; the root module keeps them gathered after its forward (its backward
    would need them at once) until a backward reshards it. What writes the sharded
    parameters between a forward and a backward (Fast Forward's candidate steps, a
    checkpoint being loaded) would otherwise be unseen by the next forward, and a list of
    ``model.parameters()`` taken then holds the gathered copies, not the parameters the
    optimizer steps.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Whole ``value`` as this process's shard of a tensor laid out like DTensor
    ``param`` (no communication: every process holds the whole value)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements,
                             src_data_rank=None)


@contextmanager
def full_weights_into_shards(model: torch.nn.Module) -> Iterator[None]:
    """Within it, ``load_state_dict`` on ``model`` or any of its modules takes whole
    tensors for FSDP2-sharded parameters: a pre-hook on every module with DTensor
    parameters replaces each whole tensor with this process's shard of it. Nothing
    changes for a model that is not sharded."""
    from torch.distributed.tensor import DTensor

    def hook(module, state_dict, prefix, *_):
        for name, param in module.named_parameters(recurse=False):
            value = state_dict.get(prefix + name)
            if isinstance(param, DTensor) and torch.is_tensor(value) \
                    and not isinstance(value, DTensor):
                state_dict[prefix + name] = _shard_like(value, param)

    handles = [m.register_load_state_dict_pre_hook(hook) for m in model.modules()
               if any(isinstance(p, DTensor) for p in m.parameters(recurse=False))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def shard_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Cut, in place, a whole ``optimizer.state_dict()`` (AdamW's ``exp_avg`` and
    ``exp_avg_sq`` of every parameter, by its index) to the shards of ``optimizer``'s
    DTensor parameters, so ``optimizer.load_state_dict(state)`` fits a sharded run."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, moments in state["state"].items():
        param = params[index]
        if not isinstance(param, DTensor):
            continue
        for key, value in moments.items():
            if torch.is_tensor(value) and value.shape == param.shape:
                moments[key] = _shard_like(value, param)


def load_dcp_unsharded(accelerate_dir: Path, model: torch.nn.Module,
                       optimizer: torch.optim.Optimizer | None) -> None:
    """Restore the model (and optimizer) that ``Accelerator.save_state`` wrote under FSDP
    into an unsharded ``model`` and ``optimizer``: DCP reads every process's shards into
    whole tensors (a collective under DDP: every process reads all of it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    weights = {"model": get_model_state_dict(model)}
    dcp.load(weights, checkpoint_id=str(accelerate_dir / FSDP_MODEL_DIR))
    set_model_state_dict(model, weights["model"])
    if optimizer is None:
        return
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper, if any
    # get_optimizer_state_dict gives a fresh AdamW its (zero) moments to load into.
    moments = {"optimizer": get_optimizer_state_dict(model, inner)}
    dcp.load(moments, checkpoint_id=str(accelerate_dir / FSDP_OPTIMIZER_DIR))
    set_optimizer_state_dict(model, inner, moments["optimizer"])
