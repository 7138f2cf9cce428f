"""Training precision, chosen by measuring this machine, and its peak FLOP/s for MFU.

``train.precision``:

- ``fp32``: weights, activations and gradients in float32 (exact; the parity tests' home).
- ``bf16-mixed``: every trainable weight stays float32 (the master copy AdamW updates);
  each forward runs under ``torch.autocast(device, bfloat16)``, so matmuls take bf16 inputs
  and accumulate in fp32, while norms, softmax and the loss stay fp32. The frozen base is
  held in bfloat16 where autocast would cast it for every matmul anyway: on CUDA the
  whole base is loaded in bf16 (what QLoRA-style users expect); on CPU the frozen
  ``nn.Linear`` weights are cast once after loading (:func:`frozen_linears_to`), while
  embeddings, norms and a head tied to the embeddings stay fp32, so the residual stream
  is fp32 as it was. That removes autocast's bf16 copy of every frozen weight at each
  forward (autocast caches casts of trainable weights only) and halves their memory.
  An explicit ``model.dtype`` overrides both.
- ``bf16``: everything in bfloat16 (``model.dtype: bfloat16``), no autocast.
- ``auto``: ``bf16-mixed`` where bf16 matmuls are fast, else ``fp32``. The choice is a
  measurement, not a CPU-name table: :func:`linear_ratio` times ``F.linear`` at the
  model's own shapes (hidden -> intermediate, intermediate -> hidden, hidden -> hidden,
  hidden -> vocab) in fp32 and under bf16 autocast from bf16 weights (as bf16-mixed holds
  the frozen base), over at least :data:`MIN_TOKENS` tokens (a step's matmuls see
  hundreds), and picks bf16-mixed when it is at least :data:`MIN_RATIO` times faster.
  What it measured on the CPU kinds met so far is in BENCHMARKS.md.

The peak for MFU (:func:`matmul_peak`) is the best of a few square ``torch.matmul`` runs
(2048^3 on CPU, 8192^3 on CUDA) in the run's compute dtype, at the run's thread count.
Both measurements are cached per machine (CPU model and flags, or GPU name; threads;
torch version) in ``$LEANTUNE_CACHE/machine.json``, so they cost a second or two once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from leantune.common.files import write_json
from leantune.model.load import config_size, first_line, text_config

log = logging.getLogger(__name__)

MIN_RATIO = 1.25  # bf16-mixed's linear speed-up needed to pay for its fp32 elementwise work
TARGET_FLOPS = 2e9  # per timed matmul: long enough to time, short enough at 7B shapes
MIN_TOKENS = 256    # rows per timed matmul: fewer would time the weight's cast, not a step's


@dataclass
class Precision:
    """The run's precision: what was asked, what is used, why, and the peak FLOP/s."""

    requested: str
    used: str                 # fp32 | bf16-mixed | bf16
    reason: str
    ratio: float | None       # bf16-mixed / fp32 F.linear throughput at the model's shapes
    peak_flops: float | None  # matmul FLOP/s in the compute dtype, for MFU
    peak_method: str | None

    @property
    def autocast(self) -> torch.dtype | None:
        return torch.bfloat16 if self.used == "bf16-mixed" else None

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float32 if self.used == "fp32" else torch.bfloat16

    def weight_dtype(self, requested: str, trains_base: bool, cuda: bool) -> str:
        """``model.dtype`` for loading the base: an explicit one wins, else by precision."""
        if requested != "auto":
            return requested
        if self.used == "bf16" or (self.used == "bf16-mixed" and cuda and not trains_base):
            return "bfloat16"
        return "float32"

    def prepare(self, model: torch.nn.Module, device_type: str, frozen_half: bool = True) -> None:
        """Make ``model`` (adapter applied, before the optimizer) train in this precision:
        for bf16-mixed, fp32 master weights, the frozen linear weights in bf16 (unless
        ``frozen_half`` is False: an explicit ``model.dtype``) and autocast forwards;
        nothing otherwise."""
        if self.used == "bf16-mixed":  # AdamW updates fp32 master weights
            master_weights_fp32(model)
            if frozen_half:
                frozen_linears_to(model, torch.bfloat16)
        autocast_forward(model, self.autocast, device_type)

    def to_dict(self) -> dict:
        return asdict(self)


# The CPU features that decide which kernels and precisions are fast here.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni")


def cpu_info() -> dict:
    """The CPU model, core count and its :data:`CPU_FLAGS` (from ``/proc/cpuinfo``), for
    every benchmark's JSON: the machines here vary, and so do their timings."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:  # not Linux: the model name from platform, no flags
        pass
    return {"model": model, "cores": os.cpu_count(),
            "flags": [f for f in CPU_FLAGS if f in flags]}


def machine_key(device: torch.device) -> str:
    """What the measurements depend on: the chip, its features, threads, torch."""
    if device.type == "cuda":
        chip = torch.cuda.get_device_name(device)
    else:
        info = cpu_info()
        chip = f"{info['model']} [{' '.join(info['flags'])}]"
        # Kernels capped below the chip's features (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA)
        # time as another CPU would: their figures are kept apart.
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
        chip += f" aten:{torch.backends.cpu.get_cpu_capability()}" + (f" onednn:{isa}" if isa else "")
    return f"{chip} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def _cache_path() -> Path:
    root = os.environ.get("LEANTUNE_CACHE", "~/.cache/leantune")
    return Path(root).expanduser() / "machine.json"


def cached(key: str, measure) -> float:
    """``measure()`` once per machine and ``key``; later calls read the cache."""
    path = _cache_path()
    try:
        store = json.loads(path.read_text())
    except (OSError, ValueError):
        store = {}
    if key not in store:
        store[key] = measure()
        try:  # a read-only home still trains: the figure is just measured again next time
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, store, indent=1)
        except OSError:
            pass
    return store[key]


def _best_seconds(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up: first-touch allocation, kernel selection
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tick = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - tick)
    return best


def peak_size(device: torch.device) -> int:
    """The side of :func:`matmul_peak`'s square matmul: 8192 on CUDA, 2048 on CPU (AMX
    reached 1.4 TFLOP/s in bf16 at 1024 and 2.4 at 2048 on 2 cores: a smaller square
    understates the peak and overstates MFU)."""
    return 8192 if device.type == "cuda" else 2048


def matmul_peak(dtype: torch.dtype, device: torch.device, reps: int = 5) -> float:
    """Best square-matmul FLOP/s in ``dtype`` (n = :func:`peak_size`)."""
    n = peak_size(device)
    g = torch.Generator(device).manual_seed(0)  # never the global RNG: runs stay seeded
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    with torch.no_grad():
        return 2 * n**3 / _best_seconds(lambda: a @ b, device, reps)


def model_shapes(config) -> list[tuple[int, int]]:
    """``(in, out)`` of the model's main linear maps, from its transformers config (the
    text tower of a composite one): hidden -> intermediate -> hidden, hidden -> hidden,
    hidden -> vocab. A per-layer intermediate size (a list) counts by its most common
    entry; a missing one is taken as 4 x hidden.

    Raises:
        ValueError: the config names no hidden size or vocabulary size.
    """
    text = text_config(config)
    hidden = config_size(text, "hidden_size", "d_model", "n_embd", "dim", "embed_dim")
    vocab = config_size(text, "vocab_size")
    if hidden is None or vocab is None:
        raise ValueError(f"{type(text).__name__} names no hidden_size or vocab_size")
    inner = config_size(text, "intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size",
                        "moe_intermediate_size") or 4 * hidden
    return [(hidden, inner), (inner, hidden), (hidden, hidden), (hidden, vocab)]


def linear_ratio(shapes: list[tuple[int, int]], device: torch.device, reps: int = 3) -> float:
    """Throughput of ``F.linear`` under bf16 autocast (fp32 input, bf16 weight: the frozen
    base as bf16-mixed holds it) over plain fp32, at ``shapes``; the token count per shape
    is chosen for ~:data:`TARGET_FLOPS` per call, at least :data:`MIN_TOKENS`."""
    seconds = {"fp32": 0.0, "bf16-mixed": 0.0}
    g = torch.Generator(device).manual_seed(0)  # never the global RNG: runs stay seeded
    for fan_in, fan_out in shapes:
        tokens = int(min(4096, max(MIN_TOKENS, TARGET_FLOPS / (2 * fan_in * fan_out))))
        x = torch.randn(tokens, fan_in, device=device, generator=g)
        w = torch.randn(fan_out, fan_in, device=device, generator=g) / fan_in**0.5
        with torch.no_grad():
            seconds["fp32"] += _best_seconds(lambda x=x, w=w: F.linear(x, w), device, reps)

            half = w.to(torch.bfloat16)

            def mixed(x=x, w=half):
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    return F.linear(x, w)

            seconds["bf16-mixed"] += _best_seconds(mixed, device, reps)
    return seconds["fp32"] / seconds["bf16-mixed"]


def choose(requested: str, model_dtype: str, config, device: torch.device) -> Precision:
    """Resolve ``train.precision`` for this machine and model (see the module docstring)."""
    key = machine_key(device)
    ratio, used = None, requested
    if requested == "auto" and model_dtype in ("bfloat16", "float16"):
        used, reason = "bf16", f"model.dtype={model_dtype} asks for half-precision weights"
    elif requested == "auto":
        used, ratio, reason = measure_auto(config, device, key)
    else:
        reason = "asked for"
    dtype = torch.float32 if used == "fp32" else torch.bfloat16
    name = str(dtype).removeprefix("torch.")
    n = peak_size(device)
    peak = cached(f"{key} | matmul peak {name} {n}^3", lambda: matmul_peak(dtype, device))
    method = (f"best of 5 torch.matmul {n}x{n}x{n} in {name}, {torch.get_num_threads()} "
              f"threads, cached in {_cache_path()}")
    return Precision(requested, used, reason, ratio, peak, method)


def measure_auto(config, device: torch.device, key: str) -> tuple[str, float | None, str]:
    """``auto``'s choice for this model here: ``(used, ratio, reason)``. A measurement that
    cannot be taken (sizes the config does not give, a kernel that fails) falls back to
    fp32, the precision every model runs in, and the reason says why."""
    try:
        shapes = model_shapes(config)
        ratio = cached(f"{key} | linear bf16-mixed/fp32 (bf16 weights) {shapes}",
                       lambda: linear_ratio(shapes, device))
    except (ValueError, TypeError, RuntimeError) as e:
        reason = (f"could not time bf16 at this model's shapes ({type(e).__name__}: "
                  f"{first_line(e)}); fp32 is the safe choice")
        log.warning("train.precision=auto: %s", reason)
        return "fp32", None, reason
    used = "bf16-mixed" if ratio >= MIN_RATIO else "fp32"
    return used, ratio, (f"bf16 autocast ran the model's linear layers at {ratio:.2f}x fp32 "
                         f"here ({'>=' if used != 'fp32' else '<'} {MIN_RATIO})")


def fall_back(precision: Precision, reason: str, device: torch.device) -> Precision:
    """``precision`` turned to fp32 (its peak for MFU measured in fp32), for ``reason``."""
    fp32 = choose("fp32", "auto", None, device)
    return replace(fp32, requested=precision.requested, reason=reason, ratio=precision.ratio)


def autocast_forward(model: torch.nn.Module, dtype: torch.dtype | None, device_type: str) -> None:
    """Run every call of ``model`` under ``torch.autocast(device_type, dtype)`` (None: as
    is). It patches the instance's ``forward`` (as Accelerate's mixed precision does), so
    training, evaluation, probing, scoring and sampling all share it, and DDP's
    ``self.module(...)`` reaches it; and its ``generate``, which PEFT's models run through
    the inner model's forward, past the patched one (the frozen linears are bf16 and would
    meet fp32 inputs). The dtype is read at each call from ``model.leantune_autocast``, so
    :func:`in_fp32` can switch it off for a block."""
    if dtype is None:
        return

    def under_autocast(call):
        @functools.wraps(call)
        def run(*args, **kwargs):
            now = model.leantune_autocast
            # enabled=False also overrides an autocast around the call (Accelerate's).
            with torch.autocast(device_type, dtype=now or dtype, enabled=now is not None):
                return call(*args, **kwargs)
        return run

    model.forward = under_autocast(model.forward)
    if callable(getattr(model, "generate", None)):
        model.generate = under_autocast(model.generate)
    model.leantune_autocast = dtype


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DistributedDataParallel
    return model


HALF = (torch.bfloat16, torch.float16)


def _half_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t for t in [*model.parameters(), *model.buffers()] if t.dtype in HALF]


def fp32_obstacle(model: torch.nn.Module) -> str | None:
    """Why :func:`in_fp32` cannot make ``model`` compute in float32, or None when it can:
    weights sharded by FSDP (each process holds a slice, and FSDP's own policy sets the
    compute dtype), 4-bit layers whose kernels compute in half precision, or too little
    free memory for float32 copies of the half-precision weights (the model must fit
    twice: its float32 size free, CPU RAM or GPU memory)."""
    from torch.distributed.tensor import DTensor

    model = _unwrapped(model)
    if any(isinstance(p, DTensor) for p in model.parameters()):
        return "FSDP shards the weights"
    if any(getattr(m, "compute_dtype", None) in HALF for m in model.modules()):
        return "its 4-bit layers compute in half precision"
    need = 4 * sum(t.numel() for t in _half_tensors(model))
    if need == 0:
        return None
    device = next(model.parameters()).device
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil  # Accelerate's own dependency

        free = psutil.virtual_memory().available
    if free < 2 * need:
        return (f"float32 copies of its half-precision weights need {need / 2**30:.1f} GiB "
                f"and {free / 2**30:.1f} GiB is free")
    return None


def to_fp32(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.dtype]]:
    """Make ``model`` compute in float32 from now on: autocast off, half-precision weights
    and buffers cast up in place (the same Parameter objects: an optimizer built on them
    is unaffected). Returns what was cast, with its dtype. Check :func:`fp32_obstacle`
    first."""
    model = _unwrapped(model)
    half = [(t, t.dtype) for t in _half_tensors(model)]
    for t, _ in half:
        t.data = t.data.float()
    if getattr(model, "leantune_autocast", None) is not None:
        model.leantune_autocast = None
    return half


@contextlib.contextmanager
def in_fp32(model: torch.nn.Module) -> Iterator[None]:
    """:func:`to_fp32` for the block, undone afterwards (bf16 -> fp32 -> bf16 is exact, so
    the run goes on with the very same weights and its own autocast)."""
    autocast = getattr(_unwrapped(model), "leantune_autocast", None)
    half = to_fp32(model)
    try:
        yield
    finally:
        for t, dtype in half:
            t.data = t.data.to(dtype)
        if autocast is not None:
            _unwrapped(model).leantune_autocast = autocast


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype ``model``'s matmuls run in: its autocast dtype, else its weights'."""
    model = _unwrapped(model)
    return getattr(model, "leantune_autocast", None) or next(model.parameters()).dtype


def master_weights_fp32(model: torch.nn.Module) -> int:
    """Cast every trainable parameter to float32 (bf16-mixed's master weights); the count."""
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            cast += 1
    return cast


def frozen_linears_to(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast the frozen float32 weights and biases of every ``nn.Linear`` in ``model`` to
    ``dtype`` in place; the count cast. A parameter that another kind of module also holds
    (a head tied to the input embeddings) stays as it is: the embeddings' output feeds the
    fp32 residual stream."""
    shared = {id(p) for m in model.modules() if type(m) is not torch.nn.Linear  # noqa: E721
              for p in m.parameters(recurse=False)}
    cast = 0
    for m in model.modules():
        if type(m) is not torch.nn.Linear:  # noqa: E721 (4-bit and other subclasses: no)
            continue
        for p in m.parameters(recurse=False):
            if not p.requires_grad and p.dtype == torch.float32 and id(p) not in shared:
                p.data = p.data.to(dtype)
                cast += 1
    return cast
