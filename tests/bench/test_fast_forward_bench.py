"""The Fast Forward benchmark's parts on a tiny model: both runs start from the same
weights, the FF run stops at the plain run's test loss, and the ledger adds up."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from leantune.adapters import build_adapter
from leantune.bench.fast_forward import format_summary, plot_curves, train_run
from leantune.config import AdapterConfig, FastForwardConfig
from leantune.data.encode import IGNORE, Encoded
from leantune.eval.loss import evaluate
from leantune.model.flops import FlopModel
from leantune.packing.batching import Batcher
from leantune.train.fast_forward import FastForward


def test_ff_run_stops_at_the_plain_runs_loss_and_accounts_both(llama_dir, tmp_path):
    # A learnable pattern: every example counts up by one from a random start.
    g = torch.Generator().manual_seed(0)
    data = []
    for n in torch.randint(8, 24, (64,), generator=g).tolist():
        start = int(torch.randint(5, 100, (1,), generator=g))
        ids = list(range(start, start + n))
        data.append(Encoded(ids, [IGNORE] + ids[1:]))
    train, ff_set, test = data[:40], data[40:48], data[48:]
    torch.manual_seed(0)  # LoRA's A init draws from the global RNG: keep other tests out of it
    model = build_adapter(AdapterConfig(r=4, dropout=0.0)).apply(
        AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32))
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    acc, flop_model = Accelerator(cpu=True), FlopModel.of(model)
    batcher = Batcher.build(train, "online", 64, 0)
    batches = [batcher.collate(list(range(i, i + 4))) for i in range(0, 40, 4)]

    def loss_on(examples):
        return lambda: evaluate(model, examples, 8,
                                lambda b: batcher.collate_examples(b, "online"), acc)["loss"]

    plain = train_run(model, init, batches, 1e-3, flop_model, acc, loss_on(test), test_every=5)
    assert plain["steps"] == 10 and not plain["reached"] and plain["ff_flops"] == 0
    assert [c["step"] for c in plain["curve"]] == [0, 5, 10]
    assert plain["test_loss"] < plain["curve"][0]["test_loss"]

    # 8 FF rows against 4-row steps: an evaluation costs about a step, which
    # max_eval_cost would refuse; lifted to test the bench's bookkeeping.
    ff = FastForward(FastForwardConfig(enabled=True, interval=2, max_eval_cost=None),
                     [p for p in model.parameters() if p.requires_grad], loss_on(ff_set),
                     flop_model.forward_examples(ff_set))
    fast = train_run(model, init, batches, 1e-3, flop_model, acc, loss_on(test), ff=ff,
                     target=plain["test_loss"])
    assert fast["curve"][0]["test_loss"] == plain["curve"][0]["test_loss"]  # same start
    assert fast["total_flops"] == fast["train_flops"] + fast["ff_flops"]
    assert fast["ff_flops"] > 0 and fast["ff_seconds"] <= fast["seconds"]
    # Seeded: on this pattern FF gets there in fewer optimizer steps (4 of 10; 4-6 over seeds 0-5).
    assert fast["reached"] and fast["test_loss"] <= plain["test_loss"]
    assert fast["steps"] < plain["steps"] and sum(fast["ff_accepted_per_stage"]) > 0
    results = {"setup": {"model": "tiny"}, "plain": plain, "fast_forward": fast,
               "reached_plain_test_loss": fast["reached"],
               "flops_saved": 1 - fast["total_flops"] / plain["total_flops"],
               "time_saved": 1 - fast["seconds"] / plain["seconds"]}
    assert "| + Fast Forward |" in format_summary(results)
    pytest.importorskip("matplotlib")
    plot_curves(results, tmp_path / "ff.png")
    assert (tmp_path / "ff.png").read_bytes()[:4] == b"\x89PNG"
