"""The parts of a preference run (``objective.kind`` dpo / ipo / simpo / orpo / kto): the
objective with its reference, the pairs as training data, the layout checked at
start-up, and the reference log-probs computed once.

Layout (:mod:`leantune.packing.pairs`): with packing exact on the model (the packing
probe, on the run's first pairs laid out one row per completion), pairs are packed with
their prompt shared when ``objective.shared_prompt`` and the model honours the tree mask
(:func:`~leantune.packing.trees.check_trees` on the first pairs); else packed one row
per completion; else padded. Each fallback is logged with its reason and recorded in
``summary.json`` (``packing.pairs``).

Reference log-probs (:mod:`leantune.objectives.reference`): the held-out and Fast Forward
sets' are computed once at start-up, whatever the mode; with ``reference=cached`` the
training pairs' are too, before the first step, and kept in
``RUN_DIR/reference_logps.safetensors`` so a resumed run reads them back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from leantune.adapters import Adapter
from leantune.common.files import atomic_file
from leantune.config import Config, ConfigError
from leantune.data.preference import EncodedPreference
from leantune.data.preference_sets import is_pair_file
from leantune.eval.loss import positions
from leantune.eval.shard import gather_scores
from leantune.model.load import evaluating
from leantune.model.logprobs import sequence_logprobs
from leantune.objectives import NEXT_TOKEN, Objective
from leantune.objectives.grpo import GRPOObjective
from leantune.objectives.kto import KTOObjective
from leantune.objectives.preference import PairObjective
from leantune.objectives.reference import AdapterOff, Cached, FrozenCopy, Reference
from leantune.packing.pairs import PairBatcher
from leantune.packing.trees import check_trees, mask_dtype_for, pair_tree

log = logging.getLogger(__name__)

CACHE_FILE = "reference_logps.safetensors"
CHECK_PAIRS = 4  # pairs the tree-mask check runs on


def reference_mode(cfg: Config, adapter: Adapter) -> str | None:
    """``objective.reference`` resolved: None for a loss without one; ``auto`` is
    ``adapter_off`` with a fresh adapter, and ``cached`` for full fine-tuning (no second
    model in memory, and one reference forward per pair in all) or a run that starts
    from an earlier run's weights (``train.init_from``: an SFT adapter trained on, whose
    starting point, not the bare base, is the reference, as TRL takes a given adapter's
    initial copy)."""
    kind, mode = cfg.objective.kind, cfg.objective.reference
    if kind in ("sft", "simpo", "orpo") or (kind == "grpo" and not cfg.objective.beta):
        return None
    if kind == "grpo" and mode == "auto":  # fresh samples every step: never cached
        return "adapter_off" if adapter.name != "full" and cfg.train.init_from is None else "copy"
    if mode == "auto":
        fresh = adapter.name != "full" and cfg.train.init_from is None
        return "adapter_off" if fresh else "cached"
    return mode


def build_objective(cfg: Config, adapter: Adapter, model: torch.nn.Module,
                    acc: Accelerator) -> Objective:
    """The run's objective; ``model`` (unwrapped) is what ``copy`` copies."""
    o = cfg.objective
    if o.kind == "sft":
        return NEXT_TOKEN
    if o.kind == "grpo":
        return GRPOObjective(o.loss_type, o.beta or 0.0, o.epsilon, o.epsilon_high,
                             o.temperature, cfg.train.chunked_loss)
    mode = reference_mode(cfg, adapter)
    # A copy of an adapter run computes as the base, unless the run starts from an
    # earlier run's adapter: then that is the reference.
    fresh = adapter.name != "full" and cfg.train.init_from is None
    disabled = adapter.disabled if fresh else None
    reference: Reference | None = None
    if mode == "adapter_off":
        reference = AdapterOff(adapter.disabled)
    elif mode == "copy":
        reference = FrozenCopy(model, disabled)
    elif mode == "cached":
        reference = Cached()
    beta = {} if o.beta is None else {"beta": o.beta}
    if o.kind == "kto":
        return KTOObjective(reference, reduce=lambda t: acc.reduce(t, "sum"), beta=o.beta,
                            desirable_weight=o.desirable_weight,
                            undesirable_weight=o.undesirable_weight)
    knobs = beta | ({"gamma": o.gamma} if o.kind == "simpo" else {}) | (
        {"nll": o.nll} if o.kind in ("dpo", "ipo") else {})
    return PairObjective(o.kind, reference, **knobs)


def check_sft_data(cfg: Config) -> None:
    """An SFT run given preference rows: say which objective reads them."""
    if cfg.objective.kind == "sft" and cfg.data.mode == "examples" and is_pair_file(
            cfg.data.path):
        raise ConfigError(f"data.path: {cfg.data.path} holds preference rows and "
                          "objective.kind=sft; set objective.kind=dpo (or ipo, simpo, orpo; "
                          "kto for prompt/completion/label rows)")


def check_pair_layout(model: torch.nn.Module, batcher: PairBatcher,
                      first: list[EncodedPreference]) -> tuple[PairBatcher, dict]:
    """The batcher in the layout the model supports (module docstring) and the record of
    the decision."""
    batcher = replace(batcher, mask_dtype=mask_dtype_for(model))
    record = {"layout": batcher.layout, "shared_prompt_check": None}
    if not batcher.uses_trees:
        return batcher, record
    trees = [pair_tree(p.prompt, p.chosen, p.rejected or []) for p in first[:CHECK_PAIRS]]
    reason = check_trees(model, trees, batcher.pad_id, batcher.max_length)
    record["shared_prompt_check"] = reason or "exact"
    if reason is not None:
        log.warning("pairs: the shared-prompt layout is not exact on this model (%s); each "
                    "completion gets a row of its own", reason)
        batcher = batcher.with_layout(shared=False)
        record["layout"] = batcher.layout
    return batcher, record


@torch.no_grad()
def compute_reference(model: torch.nn.Module, pairs: list[EncodedPreference],
                      collate: Callable[[list], dict[str, torch.Tensor]], batch_size: int,
                      reference: Reference | None, acc: Accelerator
                      ) -> list[tuple[float, float]]:
    """Each pair's reference log-probs ``(chosen, rejected)``, gathered on every process.
    ``reference`` None: the model as it is now (full fine-tuning before its first step).

    Sharded, sorted and batched as :func:`~leantune.eval.loss.evaluate` does with the same
    ``collate``, so a held-out pair's reference is computed in the very rows its policy
    log-probs will be: at step 0, with the policy equal to the reference, every margin is
    exactly 0 and DPO's held-out loss exactly log 2."""
    mine = sorted(range(len(pairs))[acc.process_index::acc.num_processes],
                  key=lambda i: positions(pairs[i]))
    out: dict[int, tuple[float, float]] = {}
    with evaluating(model):
        for k in range(0, len(mine), batch_size):
            ids = mine[k:k + batch_size]
            batch = collate([_bare(pairs[i]) for i in ids])
            batch = {key: v.to(acc.device) for key, v in batch.items()}
            if reference is None:
                sums = sequence_logprobs(model, batch, True)[0]
            else:
                sums = reference.logps(model, batch, True)
            for j, o in enumerate(batch["pair_order"].tolist()):
                out[ids[o]] = (float(sums[2 * j]), float(sums[2 * j + 1]))
    return gather_scores(out, len(pairs), acc)


def _bare(p: EncodedPreference) -> EncodedPreference:
    return EncodedPreference(p.prompt, p.chosen, p.rejected, p.label)


def fill_references(run, collate: Callable[[list], dict[str, torch.Tensor]]) -> None:
    """Reference log-probs of the held-out and FF pairs, and with ``cached`` of the
    training pairs (read back from the run directory when it has them), each set laid
    out by ``collate`` as the held-out sets are."""
    objective, data = run.objective, run.data
    if not objective.needs_reference:
        return
    mode = reference_mode(run.cfg, run.adapter)
    sets = {f"eval/{s.name}": s.examples for s in data.eval_sets} | {"ff": data.ff}
    if mode == "cached":
        sets["train"] = data.batcher.pairs
    path = run.run_dir / CACHE_FILE
    saved = load_file(str(path)) if path.exists() else {}
    model = run.acc.unwrap_model(run.model)
    live = objective.reference  # cached: the starting weights (a fresh adapter switched off)
    if mode == "cached":
        fresh = run.adapter.name != "full" and run.start.kind == "fresh"
        live = AdapterOff(run.adapter.disabled) if fresh else None
    if mode == "cached" and run.resumed and not saved:
        raise ConfigError(f"objective.reference=cached: {path} is missing, and a resumed run "
                          "cannot compute the reference again from trained weights")
    fresh = {}
    for name, pairs in sets.items():
        if not pairs:
            continue
        if name in saved and len(saved[name]) == len(pairs):
            values = saved[name].tolist()
        else:
            values = compute_reference(model, pairs, collate, run.cfg.eval.batch_size,
                                       live, run.acc)
            fresh[name] = torch.tensor(values, dtype=torch.float64)
            run.state.reference_flops += sum(
                run.flop_model.forward_examples(p.examples()) for p in pairs)
        for p, v in zip(pairs, values):
            p.ref = tuple(v)
    if mode == "cached" and fresh and run.acc.is_main_process:
        with atomic_file(path) as tmp:
            save_file({k: v.contiguous() for k, v in (saved | fresh).items()}, str(tmp))
    run.acc.wait_for_everyone()
