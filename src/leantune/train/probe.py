"""The packing probe: on this model, backend and dtype, at the shapes the run will use,
packed rows give what padded rows give - or the run is trained padded, with a warning.

Probed before the first step (:func:`probe_batches`):

1. the run's own first micro-batch (process 0's), laid out exactly as training lays it
   out: the same rows, row width and pad tails (skipped when it packs nothing: one
   example per row and no pad tail is padding's own layout);
2. unless that batch already has both, a row of exactly ``data.max_length`` tokens
   holding several examples (the later ones starting deep into the row), beside a short
   row whose pad tail is longer than any example of the batch.

No row of the run is wider than ``max_length``, so probing that width up front covers
every later row: there is no re-probe. Each batch runs twice, packed (positions
restarting at every example, no attention mask) and padded (one example per row, with an
attention mask), and :func:`compare_layouts` measures

- ``logits``: ``max |Δ logits| / max |logits|`` over every real token;
- ``loss``: ``|Δ L| / |L|`` for the summed target cross-entropy ``L``;
- ``grads``: ``||Δ g|| / ||g||`` over every trainable tensor after one backward of ``L``
  (summed over processes), and whether loss and gradients are finite.

The model is in eval mode (both layouts must compute the same function: no dropout) and
the RNG is restored afterwards, so a probed run takes the same steps as an unprobed one.
Its seconds and FLOPs (two forward+backward passes per batch) go to ``summary.json``.

Some dependence on the index in the row is too small to see through bf16 rounding, or
sits past any width a user might probe; :func:`row_index_hazard` reads those from the
config first (Llama-4's NoPE-layer temperature, Inkling's log scaling).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
from accelerate import Accelerator

from leantune.config import Config
from leantune.data.collate import collate_padded, collate_rows
from leantune.data.encode import Encoded
from leantune.model import evaluating, first_line
from leantune.train.flops import FlopModel
from leantune.train.precision import compute_dtype
from leantune.train.step import forward_loss

log = logging.getLogger(__name__)

Rows = list[list[Encoded]]  # the examples of each row of one packed micro-batch


@dataclass(frozen=True)
class Tolerance:
    """Largest relative differences that are rounding, not contamination."""

    logits: float
    loss: float
    grads: float


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    """fp32: 1e-4 on logits and gradients, 1e-5 on the summed loss; half precision: 3e-2,
    1e-3, 2e-2. Rounding measured on tiny Llama/Qwen2/GPT-2 LoRA models and SmolLM2-135M:
    fp32 1e-7 to 1e-6 throughout; bf16 up to 8e-3 on logits, 2e-3 to 4e-3 on gradients,
    3e-7 on the loss. Contamination seen on models that cannot pack (Mamba, MPT, RWKV, hybrids)
    is 1e-2 to 1 on logits and gradients."""
    if dtype == torch.float32:
        return Tolerance(logits=1e-4, loss=1e-5, grads=1e-4)
    return Tolerance(logits=3e-2, loss=1e-3, grads=2e-2)


def row_index_hazard(config, max_length: int) -> str | None:
    """Why this model cannot pack rows of ``max_length`` exactly, read from its config:
    attention that depends on the index of a token in the row, not on its position.

    - Llama-4 (``attn_temperature_tuning``): NoPE layers scale queries by
      ``1 + attn_scale * log1p(floor((i + 1) / floor_scale))`` with ``i`` the index in
      the row, which differs from the position once ``i + 1 >= floor_scale``.
    - Inkling (``log_scaling_n_floor``): full-attention layers scale by
      ``1 + alpha * log(max((i + 1) / n_floor, 1))``, which moves once ``i + 1 > n_floor``.

    Returns None when no such term can be reached within ``max_length`` tokens.
    """
    c = config.get_text_config()
    floor_scale = getattr(c, "floor_scale", None)
    nope = not all(getattr(c, "no_rope_layers", None) or [1])
    if getattr(c, "attn_temperature_tuning", False) and nope and max_length >= floor_scale:
        return (f"{c.model_type}'s NoPE layers scale attention by the index in the row "
                f"(attn_temperature_tuning, floor_scale={floor_scale}), not by position_ids: "
                f"packed rows of up to data.max_length={max_length} tokens would change it")
    n_floor = getattr(c, "log_scaling_n_floor", None)
    if n_floor is not None and max_length > n_floor:
        return (f"{c.model_type} scales attention by the index in the row (log_scaling_n_floor="
                f"{n_floor}), not by position_ids: packed rows of up to data.max_length="
                f"{max_length} tokens would change it")
    return None


def full_width_rows(material: list[Encoded], max_length: int) -> Rows:
    """Two rows made of ``material``: one of exactly ``max_length`` tokens from several
    examples (the first cut to at most half the row, the last cut to fit), and one
    holding only a prefix of the shortest example, at most a quarter of the row (a pad
    tail longer than any example in the batch). Empty when the material cannot fill the
    first row."""
    row, used = [], 0
    for e in material:
        take = min(len(e.input_ids), max_length - used,
                   max_length if row else max(1, max_length // 2))
        row.append(_prefix(e, take))
        used += take
        if used == max_length:
            break
    if used < max_length or len(row) < 2:
        return []
    shortest = min(material, key=lambda e: len(e.input_ids))
    return [row, [_prefix(shortest, max(1, max_length // 4))]]


def _prefix(e: Encoded, n: int) -> Encoded:
    return Encoded(e.input_ids[:n], e.labels[:n])


def _widths(rows: Rows) -> list[int]:
    return [sum(len(e.input_ids) for e in r) for r in rows]


def probe_batches(first: Rows, max_length: int) -> list[Rows]:
    """What to probe: the run's first micro-batch ``first`` when it packs anything (a row
    with several examples, or a pad tail: otherwise it is padding's own layout), and the
    rows of :func:`full_width_rows` made from its examples unless ``first`` already has
    both a pad tail and a ``max_length``-wide row of several examples."""
    widths = _widths(first)
    pad_tail = min(widths) < max(widths)
    full = any(len(r) > 1 and w == max_length for r, w in zip(first, widths))
    batches = [first] if pad_tail or any(len(r) > 1 for r in first) else []
    if not (pad_tail and full):
        batches += [extra] if (extra := full_width_rows([e for r in first for e in r],
                                                        max_length)) else []
    return batches


def first_rows(data, cfg: Config, world: int) -> Rows:
    """Process 0's first micro-batch of epoch 0 (as :class:`~leantune.train.data.TrainData`
    would hand it out), as packed rows of examples."""
    from leantune.train.state import TrainState, epoch_plan

    if data.feed is not None:
        per_micro = cfg.train.batch_size * world
        units = data.feed.step_units(TrainState(), per_micro * cfg.train.grad_accum, 1,
                                     cfg.train.seed)
        return data.feed.packed_rows(units[:per_micro][::world])
    plan = epoch_plan(data.batcher.unit_lengths, cfg, world, 0)
    first = next(b for b in plan if len(b) >= world)
    return data.batcher.packed_rows(first[::world])


def _layout(model: torch.nn.Module, batch: dict, spans: list[tuple[int, int, int]],
            trainable: list[torch.Tensor], backward: bool):
    """Real-token logits (one tensor, in ``spans`` order), the summed loss, and the
    gradients of ``trainable`` (None without ``backward``, or when the model's eval-mode
    forward builds no graph, as Reformer's reversible layers do)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.set_grad_enabled(backward):
        logits, loss, _ = forward_loss(model, batch, full_logits=True)
        real = torch.cat([logits[r, o:o + n].float() for r, o, n in spans]).detach()
        grads = None
        if backward and loss.grad_fn is not None:
            loss.backward()
            grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                     for p in trainable]
            for p in trainable:
                p.grad = None
    return real, loss.detach().float(), grads


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a (possibly FSDP-sharded) tensor."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def compare_layouts(model: torch.nn.Module, rows: Rows, pad_id: int,
                    intervene: tuple[int, int] | None, backward: bool,
                    acc: Accelerator | None = None) -> dict:
    """Packed against padded on the examples of ``rows`` (see the module docstring).

    Returns:
        ``{"logits", "loss", "grads"}`` relative errors (``grads`` None without a
        backward), ``finite`` / ``padded_finite``: whether each layout's loss and
        gradients are finite, and ``backward``; or only ``{"error"}`` when the packed
        forward raises (padded runs first: what it raises propagates).
    """
    flat = [e for r in rows for e in r]
    packed_spans, padded_spans = [], []
    for r, row in enumerate(rows):
        offset = 0
        for e in row:
            packed_spans.append((r, offset, len(e.input_ids)))
            padded_spans.append((len(padded_spans), 0, len(e.input_ids)))
            offset += len(e.input_ids)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ref, ref_loss, ref_grads = _layout(model, collate_padded(flat, pad_id, intervene),
                                       padded_spans, trainable, backward)
    backward = ref_grads is not None
    try:
        got, got_loss, got_grads = _layout(model, collate_rows(rows, pad_id,
                                                               intervene=intervene),
                                           packed_spans, trainable, backward)
    except Exception as e:  # noqa: BLE001 - the padded layout ran: packing is the cause
        return {"error": f"{type(e).__name__}: {first_line(e)}"}
    sums = torch.zeros(4, dtype=torch.float64, device=ref.device)  # |Δg|², |g|², bad g: both
    for a, b in zip(got_grads or [], ref_grads or []):
        a, b = _local(a).double(), _local(b).double()
        sums += torch.stack([(a - b).square().sum(), b.square().sum(),
                             (~a.isfinite()).sum().double(), (~b.isfinite()).sum().double()])
    if acc is not None and acc.num_processes > 1:
        sums = acc.reduce(sums, "sum")
    d2, g2, bad, ref_bad = sums.tolist()
    return {
        "logits": float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)),
        "loss": float((got_loss - ref_loss).abs() / ref_loss.abs().clamp_min(1e-12)),
        "grads": math.sqrt(d2 / g2) if backward and g2 > 0 else (0.0 if backward else None),
        "finite": bool(got_loss.isfinite()) and bad == 0,
        "padded_finite": bool(ref_loss.isfinite()) and ref_bad == 0,
        "backward": backward, "error": None,
    }


def _describe(rows: Rows) -> dict:
    widths = _widths(rows)
    return {"rows": len(rows), "width": max(widths), "examples": sum(map(len, rows)),
            "longest_example": max(len(e.input_ids) for r in rows for e in r)}


def _flops(flop_model: FlopModel, rows: Rows, backward: bool) -> int:
    d = _describe(rows)
    cost = flop_model.train if backward else flop_model.forward
    return cost(d["rows"], d["width"]) + cost(d["examples"], d["longest_example"])


def run_probe(model: torch.nn.Module, batches: list[Rows], pad_id: int,
              intervene: tuple[int, int] | None, backward: bool = True,
              acc: Accelerator | None = None, flop_model: FlopModel | None = None) -> dict:
    """:func:`compare_layouts` on each of ``batches``; the worst errors, whether they are
    within :func:`tolerance_for` the model's compute dtype, and what it cost.

    Returns:
        ``{"exact", "reason", "errors", "tolerance", "batches", "backward", "seconds",
        "flops", "dtype"}``; ``reason`` says why it is not exact (None when it is).
    """
    tick = time.perf_counter()
    dtype = compute_dtype(model)  # bf16-mixed: its matmuls' rounding, not the fp32 weights'
    tol = tolerance_for(dtype)
    flop_model = flop_model or FlopModel.of(model)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with evaluating(model), torch.random.fork_rng(devices=devices):
        results = [compare_layouts(model, rows, pad_id, intervene, backward, acc)
                   for rows in batches]
    errors = [r["error"] for r in results if r["error"] is not None]
    results = [r for r in results if r["error"] is None]
    worst = {k: max((r[k] for r in results if r[k] is not None), default=None)
             for k in ("logits", "loss", "grads")}
    finite, padded_finite = all(r["finite"] for r in results), all(
        r["padded_finite"] for r in results)
    backward = backward and all(r["backward"] for r in results)
    reason, note = None, None
    if errors:
        reason = f"the model's forward fails on packed rows ({errors[0]})"
    elif not padded_finite:  # not packing's doing; the first step will stop and say so
        note = "padded loss or gradients are not finite either: not packing's doing"
    elif not finite:
        reason = ("packed loss or gradients are not finite where padded ones are (a pad or "
                  "packed segment meets an operation that is undefined there)")
    else:
        over = [f"{k} {worst[k]:.1e} > {getattr(tol, k):.0e}" for k in ("logits", "loss", "grads")
                if worst[k] is not None and worst[k] > getattr(tol, k)]
        if over:
            reason = f"packed rows differ from padded ones ({', '.join(over)})"
    return {"exact": reason is None, "reason": reason, "note": note, "errors": worst,
            "finite": finite, "padded_finite": padded_finite, "tolerance": asdict(tol),
            "dtype": str(dtype).removeprefix("torch."), "backward": backward,
            "batches": [_describe(rows) for rows in batches],
            "seconds": time.perf_counter() - tick,
            "flops": sum(_flops(flop_model, rows, backward) for rows in batches)}


def describe_probe(report: dict) -> str:
    """One log line: what was probed, what it found, what it cost."""
    shapes = " and ".join(f"{b['rows']} x {b['width']} ({b['examples']} examples)"
                          for b in report["batches"]) or "nothing (no row holds two examples)"
    e = report["errors"]
    found = ", ".join(f"{k} {v:.1e}" for k, v in e.items() if v is not None)
    what = "forward + backward" if report["backward"] else "forward"
    verdict = "exact" if report["exact"] else report["reason"]
    return (f"packing probe ({what}, {report['dtype']}): packed vs padded on {shapes}: "
            f"{found}: {verdict}; {report['seconds']:.1f} s, {report['flops'] / 1e9:.1f} GFLOP")


def resolve_packing(requested: str, model: torch.nn.Module, adapter, batches: list[Rows],
                    pad_id: int, max_length: int, backward: bool = True,
                    acc: Accelerator | None = None, flop_model: FlopModel | None = None) -> dict:
    """The packing mode to use: ``requested`` when this model keeps packed examples
    apart (:func:`row_index_hazard`, then :func:`run_probe` on ``batches``), else
    ``none``, with a warning naming the reason. Never contaminates silently.

    Returns:
        ``{"requested", "used", "exact", "reason", "probe"}`` (``probe``: the report, or
        None when nothing was probed).
    """
    decision = {"requested": requested, "used": "none", "exact": False, "reason": None,
                "probe": None}
    if requested == "none":
        return decision
    if adapter is not None and not adapter.packs:
        log.warning("adapter.method=%s adds tokens to each row, not to each example: packed "
                    "rows would share them; using data.packing=none", adapter.name)
        return decision | {"reason": f"adapter.method={adapter.name} does not pack"}
    hazard = row_index_hazard(model.config, max_length)
    if hazard is not None:
        log.warning("%s; falling back to data.packing=none", hazard)
        return decision | {"reason": hazard}
    report = run_probe(model, batches, pad_id, adapter.positions if adapter else None,
                       backward, acc, flop_model)
    log.info(describe_probe(report))
    decision |= {"exact": report["exact"], "reason": report["reason"], "probe": report}
    if requested == "naive":
        log.warning("data.packing=naive: attention crosses example boundaries")
        return decision | {"used": "naive"}
    if not report["exact"]:
        log.warning("this model/attention backend does not keep packed examples apart: %s; "
                    "falling back to data.packing=none", report["reason"])
        return decision
    return decision | {"used": requested}
