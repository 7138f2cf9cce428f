"""The packing probe under bf16: exactness is judged where rounding cannot hide a leak.

A controlled cross-example leak (each position of the first layer's output gets ``eps``
times the running mean of the row before it: nothing for padded rows, a little of the
earlier examples for packed ones) shows what each rule can see: under bf16 autocast a
leak of ~1e-3 is buried in rounding and the bf16 tolerance passes it; judged in fp32 it
is plain. Where fp32 is impossible (FSDP-sharded weights), a noise floor measured on the
same examples tightens the bf16 tolerance."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import leantune.packing.probe as probe
from leantune.data.encode import IGNORE, Encoded
from leantune.model.load import evaluating
from leantune.model.precision import autocast_forward, compute_dtype
from leantune.model.rounding import tolerance_for
from leantune.packing.probe import run_probe
from leantune.packing.probe_compare import compare_layouts

BF16 = tolerance_for(torch.bfloat16)


class RunningMeanLeak:
    """Forward hook: ``h_t += eps * mean(h_0..h_t)`` along the row (causal, so a padded
    row only sees its own example; a packed row sees the examples before it too)."""

    def __init__(self, eps: float):
        self.eps = eps

    def __call__(self, module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        n = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype)[None, :, None]
        h = h + self.eps * h.cumsum(1) / n
        return (h, *output[1:]) if isinstance(output, tuple) else h


def leaky_llama(eps: float, autocast: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, use_cache=False), attn_implementation="sdpa")
    model.model.layers[0].register_forward_hook(RunningMeanLeak(eps))
    if autocast:
        autocast_forward(model, torch.bfloat16, "cpu")
    return model.eval()


def rows() -> list[list[Encoded]]:
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in [40, 30, 20, 12, 9, 25]:
        ids = torch.randint(3, 300, (n,), generator=g).tolist()
        examples.append(Encoded(ids, [IGNORE] * (n // 3) + ids[n // 3:]))
    return [examples[:3], examples[3:]]


def within(errors: dict, tol) -> bool:
    return all(errors[k] <= getattr(tol, k) for k in ("logits", "loss", "grads"))


def test_a_leak_of_1e_3_hides_in_bf16_and_shows_in_fp32():
    model = leaky_llama(3e-3)
    with evaluating(model):
        in_bf16 = compare_layouts(model, rows(), 0, backward=True)
    assert within(in_bf16, BF16)  # what judging in the run's bf16 used to accept
    report = run_probe(model, [rows()], 0)
    assert report["dtype"] == "float32" and report["run_dtype"] == "bfloat16"
    assert report["judged"] == "float32" and not report["exact"]
    assert report["errors"]["logits"] > 5e-4 and report["errors"]["grads"] > 5e-4
    assert "packed rows differ from padded ones" in report["reason"]
    assert compute_dtype(model) == torch.bfloat16  # the run goes on in its own precision


def test_exact_in_fp32_and_guarded_in_bf16():
    report = run_probe(leaky_llama(0.0), [rows()], 0)
    assert report["exact"] and report["judged"] == "float32", report
    assert report["errors"]["logits"] < 1e-6 and report["errors"]["grads"] < 1e-6
    guard = report["run_errors"]  # the second pass, in the run's own precision
    assert guard is not None and 0 < guard["logits"] < BF16.logits
    single = run_probe(leaky_llama(0.0, autocast=False), [rows()], 0)
    assert single["run_errors"] is None and single["flops"] * 2 == report["flops"]


def test_half_weights_are_judged_in_fp32_and_restored_bit_for_bit():
    model = leaky_llama(3e-3, autocast=False).bfloat16()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = run_probe(model, [rows()], 0)
    assert report["judged"] == "float32" and report["run_dtype"] == "bfloat16"
    assert not report["exact"]
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("eps, exact", [(0.0, True), (3e-2, False)])
def test_without_fp32_a_noise_floor_judges(monkeypatch, eps, exact):
    monkeypatch.setattr(probe, "fp32_obstacle", lambda model: "FSDP shards the weights")
    report = run_probe(leaky_llama(eps), [rows()], 0)
    assert report["judged"] == "bfloat16 against a noise floor (FSDP shards the weights)"
    assert report["noise"]["grads"] > 0  # padded vs alone in bf16: rounding, measured
    tol = report["tolerance"]
    assert tol["grads"] == pytest.approx(max(1e-4, probe.NOISE_FACTOR * report["noise"]["grads"]))
    assert tol["grads"] < BF16.grads
    assert report["exact"] == exact, report
    if not exact:  # a leak of ~1e-2 that the bf16 tolerance alone would have let through
        assert report["errors"]["grads"] < BF16.grads


def test_the_bf16_guard_judges_finiteness_not_rounding():
    """Exactness is decided in fp32; the run-precision pass only guards against values
    that are not finite there (bf16 rounding through a deep model is large and no leak)."""
    exact = {"errors": {"logits": 1e-7, "loss": 0.0, "grads": 2e-7}, "finite": True,
             "padded_finite": True, "backward": True, "error": None}
    rounding = exact | {"errors": {"logits": 2e-2, "loss": 9e-3, "grads": 4e-2}}
    fp32 = tolerance_for(torch.float32)
    assert probe.verdict(exact, fp32, rounding, torch.bfloat16) == (None, None)
    reason, _ = probe.verdict(exact, fp32, rounding | {"finite": False}, torch.bfloat16)
    assert reason == ("in bfloat16, packed loss or gradients are not finite where padded "
                      "ones are")
    reason, _ = probe.verdict(exact, fp32, rounding | {"error": "RuntimeError: x"},
                              torch.bfloat16)
    assert reason.startswith("in bfloat16, the model's forward fails on packed rows")
