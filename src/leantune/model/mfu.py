"""Model FLOPs utilization: the model's FLOPs per second over the matmul peak measured on
this machine (:mod:`leantune.model.precision`), as a number and as the line the summary
and the report print. No heavy imports: the report reads it without torch's models."""

from __future__ import annotations


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilization: ``flops / seconds / peak`` (None when unmeasured)."""
    return flops / seconds / peak if peak and seconds > 0 else None


def mfu_text(m: dict | None) -> str | None:
    """``12.3 % of 259 GFLOP/s (float32 matmul peak)``: achieved over the measured peak."""
    if not m or m.get("fraction") is None:
        return None
    return (f"{100 * m['fraction']:.1f} % ({m['achieved_flops_per_second'] / 1e9:.1f} of "
            f"{m['peak_flops_per_second'] / 1e9:.0f} GFLOP/s, {m['compute_dtype']} matmul peak)")
