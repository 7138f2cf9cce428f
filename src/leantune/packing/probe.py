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
attention mask), and :func:`~leantune.packing.probe_compare.compare_layouts` measures the
difference in logits, summed loss and one backward's gradients. :func:`run_probe` judges
it in fp32 whatever the run's precision, wherever the weights allow (bf16 rounding would
hide a leak), with a second pass in the run's own precision as a guard against
non-finite values.

The model is in eval mode (both layouts must compute the same function: no dropout) and
the RNG is restored afterwards, so a probed run takes the same steps as an unprobed one.
Its seconds and FLOPs (two forward+backward passes per batch and precision) go to
``summary.json``.

Some dependence on the index in the row is too small to see through bf16 rounding, or
sits past any width a user might probe; :func:`row_index_hazard` reads those from the
config first (Llama-4's NoPE-layer temperature, Inkling's log scaling).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import torch
from accelerate import Accelerator

from leantune.data.encode import Encoded
from leantune.model.flops import FlopModel
from leantune.model.load import evaluating
from leantune.model.precision import compute_dtype, fp32_obstacle, in_fp32
from leantune.model.rounding import Tolerance, tolerance_for
from leantune.packing.probe_compare import Rows, compare_layouts, worst

log = logging.getLogger(__name__)

# A half-precision difference up to this many times the noise floor (padded against
# alone, same examples, same precision) is rounding; see :func:`noise_tolerance`. Measured
# under bf16 autocast on tiny Llama, Qwen2/3, GPT-2, Mistral, Phi and Gemma models (3 seeds,
# 2 probe batches each): packed-vs-padded never exceeded padded-vs-alone (ratio <= 1.0 on
# logits, loss and gradients), so 2 leaves a margin and still tightens bf16's gradient
# tolerance from 2e-2 to ~4e-3.
NOISE_FACTOR = 2


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


def _describe(rows: Rows) -> dict:
    widths = _widths(rows)
    return {"rows": len(rows), "width": max(widths), "examples": sum(map(len, rows)),
            "longest_example": max(len(e.input_ids) for r in rows for e in r)}


def _flops(flop_model: FlopModel, rows: Rows, backward: bool, kind: str) -> int:
    """FLOPs of running ``rows``' examples laid out as ``kind`` (forward, + backward)."""
    d = _describe(rows)
    cost = flop_model.train if backward else flop_model.forward
    if kind == "packed":
        return cost(d["rows"], d["width"])
    if kind == "padded":
        return cost(d["examples"], d["longest_example"])
    return sum(cost(1, len(e.input_ids)) for r in rows for e in r)


def fp32_blocked(model: torch.nn.Module, acc: Accelerator | None) -> str | None:
    """:func:`fp32_obstacle`, agreed on by every process (each runs the same collectives,
    so all judge the same way: any process's obstacle holds for all)."""
    obstacle = fp32_obstacle(model)
    if acc is not None and acc.num_processes > 1:
        device = next(model.parameters()).device
        anywhere = acc.reduce(torch.tensor(float(obstacle is not None), device=device), "sum")
        if float(anywhere) > 0 and obstacle is None:
            obstacle = "another process cannot compute in float32"
    return obstacle


def run_probe(model: torch.nn.Module, batches: list[Rows], pad_id: int, backward: bool = True,
              acc: Accelerator | None = None, flop_model: FlopModel | None = None) -> dict:
    """Packed against padded (:func:`~leantune.packing.probe_compare.compare_layouts`) on each
    of ``batches``, judged where rounding cannot hide a leak, and what it cost.

    Whether packing keeps examples apart is a property of the model's code, not of the
    precision, and bf16 rounding (up to ~1e-2 on logits) would hide a leak of 1e-3, so:

    - an fp32 run is judged in fp32 (:func:`tolerance_for`);
    - a bf16 run is judged in fp32 where :func:`~leantune.model.precision.in_fp32` can
      make it compute so (a CPU run's fp32 base with its autocast off; half weights cast
      up when the model fits twice), then run once more in its own precision as a
      guard against non-finite values: packed loss and gradients must be finite there
      where padded ones are (their differences are reported, not judged);
    - otherwise (FSDP-sharded weights, 4-bit layers computing in bf16, no room) it is
      judged in its own precision against a noise floor measured on the same examples,
      padded against each example alone: a difference is rounding up to
      ``max(fp32 tolerance, NOISE_FACTOR x noise)`` (never more than the bf16 tolerance).

    Returns:
        ``{"exact", "reason", "note", "errors", "finite", "padded_finite", "tolerance",
        "dtype" (what it was judged in), "run_dtype", "judged", "run_errors", "noise",
        "backward", "batches", "seconds", "flops"}``; ``reason`` says why it is not exact
        (None when it is).
    """
    tick = time.perf_counter()
    run_dtype = compute_dtype(model)  # bf16-mixed: its matmuls' rounding, not its weights'
    flop_model = flop_model or FlopModel.of(model)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []

    def compare(got: str = "packed") -> dict:
        return worst([compare_layouts(model, rows, pad_id, backward, acc, got)
                      for rows in batches])

    guard = noise = obstacle = None
    kinds = ["padded", "packed"]
    with evaluating(model), torch.random.fork_rng(devices=devices):
        if run_dtype != torch.float32:
            obstacle = fp32_blocked(model, acc)
        if run_dtype == torch.float32 or obstacle is None:
            with in_fp32(model):
                judged = compare()
            tol, dtype = tolerance_for(torch.float32), torch.float32
            if run_dtype != torch.float32:
                guard, kinds = compare(), kinds * 2
        else:
            judged, noise = compare(), compare("alone")
            tol, dtype = noise_tolerance(noise["errors"]), run_dtype
            kinds += ["padded", "alone"]
    reason, note = verdict(judged, tol, guard, run_dtype)
    names = {t: str(t).removeprefix("torch.") for t in (dtype, run_dtype)}
    return {"exact": reason is None, "reason": reason, "note": note,
            "errors": judged["errors"], "finite": judged["finite"],
            "padded_finite": judged["padded_finite"], "tolerance": asdict(tol),
            "dtype": names[dtype], "run_dtype": names[run_dtype],
            "judged": (names[dtype] if obstacle is None
                       else f"{names[dtype]} against a noise floor ({obstacle})"),
            "run_errors": guard and guard["errors"], "noise": noise and noise["errors"],
            "backward": backward and judged["backward"],
            "batches": [_describe(rows) for rows in batches],
            "seconds": time.perf_counter() - tick,
            "flops": sum(_flops(flop_model, rows, backward, k) for rows in batches
                         for k in kinds)}


def noise_tolerance(noise: dict) -> Tolerance:
    """What counts as rounding in half precision, from the padded-against-alone noise
    floor measured on the same examples: ``min(bf16, max(fp32, NOISE_FACTOR x noise))``."""
    low, high = tolerance_for(torch.float32), tolerance_for(torch.bfloat16)
    return Tolerance(**{k: min(getattr(high, k), max(getattr(low, k),
                                                     NOISE_FACTOR * (noise[k] or 0.0)))
                        for k in ("logits", "loss", "grads")})


def verdict(judged: dict, tol: Tolerance, guard: dict | None, run_dtype: torch.dtype
            ) -> tuple[str | None, str | None]:
    """``(reason, note)`` from :func:`~leantune.packing.probe_compare.worst` of the judged
    comparison and of the run-precision ``guard`` (None: there was none): the reason
    packing is not exact (None when it is), and a note for what is not packing's doing."""
    if judged["error"]:
        return f"the model's forward fails on packed rows ({judged['error']})", None
    if not judged["padded_finite"]:  # not packing's doing; the first step will stop and say so
        return None, "padded loss or gradients are not finite either: not packing's doing"
    if not judged["finite"]:
        return ("packed loss or gradients are not finite where padded ones are (a pad or "
                "packed segment meets an operation that is undefined there)"), None
    if over := _over(judged["errors"], tol):
        return f"packed rows differ from padded ones ({over})", None
    if guard is None:
        return None, None
    # The guard's differences are not judged: exactness was, in fp32, and bf16 rounding
    # through a deep model (SmolLM2's 30 layers: 9e-3 on the summed loss) is no leak.
    name = str(run_dtype).removeprefix("torch.")
    if guard["error"]:
        return f"in {name}, the model's forward fails on packed rows ({guard['error']})", None
    if guard["padded_finite"] and not guard["finite"]:
        return f"in {name}, packed loss or gradients are not finite where padded ones are", None
    return None, None


def _over(errors: dict, tol: Tolerance) -> str:
    return ", ".join(f"{k} {errors[k]:.1e} > {getattr(tol, k):.0e}"
                     for k in ("logits", "loss", "grads")
                     if errors[k] is not None and errors[k] > getattr(tol, k))


def describe_probe(report: dict) -> str:
    """One log line: what was probed, what it found, what it cost."""
    shapes = " and ".join(f"{b['rows']} x {b['width']} ({b['examples']} examples)"
                          for b in report["batches"]) or "nothing (no row holds two examples)"
    found = _found(report["errors"])
    if report["run_errors"] is not None:
        found += f"; in the run's {report['run_dtype']}: {_found(report['run_errors'])}"
    what = "forward + backward" if report["backward"] else "forward"
    ruling = "exact" if report["exact"] else report["reason"]
    return (f"packing probe ({what}, judged in {report['judged']}): packed vs padded on "
            f"{shapes}: {found}: {ruling}; {report['seconds']:.1f} s, "
            f"{report['flops'] / 1e9:.1f} GFLOP")


def _found(errors: dict) -> str:
    return ", ".join(f"{k} {v:.1e}" for k, v in errors.items() if v is not None)


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
    report = run_probe(model, batches, pad_id, backward, acc, flop_model)
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
