"""The packing benchmark's parts on a tiny model: every mode trains from the same start,
none and online end identical, and the summary's ratios are computed from the runs."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from leantune.adapters import build_adapter
from leantune.bench.packing import MODES, format_table, run_mode, summarize
from leantune.config import AdapterConfig
from leantune.data.encode import IGNORE, Encoded


def test_modes_share_a_start_and_online_matches_padding(llama_dir):
    g = torch.Generator().manual_seed(0)
    data = [Encoded(ids := torch.randint(5, 200, (n,), generator=g).tolist(), [IGNORE] + ids[1:])
            for n in [7, 30, 12, 25, 9, 40, 16, 5, 33, 21, 8, 14]]
    model = build_adapter(AdapterConfig(r=4, dropout=0.0)).apply(
        AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32))
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    acc = Accelerator(cpu=True)
    runs = {m: [run_mode(model, init, m, data[:8], data[8:], 4, 64, 0, 1e-2, acc)]
            for m in MODES}
    assert runs["online"][0]["eval_loss"] == pytest.approx(runs["none"][0]["eval_loss"], abs=1e-5)
    assert runs["online"][0]["padding_fraction"] < runs["none"][0]["padding_fraction"]
    assert runs["offline"][0]["optimizer_steps"] < runs["none"][0]["optimizer_steps"]
    med = summarize(runs)["median"]
    assert med["none"]["speedup_vs_none"] == 1.0
    assert med["online"]["speedup_vs_none"] == pytest.approx(
        runs["online"][0]["tokens_per_second"] / runs["none"][0]["tokens_per_second"])
    assert "| online |" in format_table({"median": med})



def test_split_rows_gives_the_same_update_as_one_micro_batch(llama_dir):
    from leantune.bench.packing import split_rows
    from leantune.packing.batching import Batcher
    from leantune.train.step import train_step

    g = torch.Generator().manual_seed(1)
    data = [Encoded(ids := torch.randint(5, 200, (n,), generator=g).tolist(), [IGNORE] + ids[1:])
            for n in [30, 28, 25, 22, 19, 12, 9, 6]]
    batch = Batcher.build(data, "offline", 32, 0, "bfd").collate([0, 1, 2, 3])
    parts = split_rows(batch, 2 * batch["input_ids"].shape[1])
    assert [p["input_ids"].shape[0] for p in parts] == [2, 2]
    assert torch.equal(torch.cat([p["labels"] for p in parts]), batch["labels"])
    acc = Accelerator(cpu=True)
    after = []
    for micro in ([batch], parts):
        model = build_adapter(AdapterConfig(r=4, dropout=0.0)).apply(
            AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32))
        torch.manual_seed(0)
        for p in model.parameters():  # B = 0 at init: give both runs the same nonzero start
            if p.requires_grad:
                p.data = torch.randn(p.shape) * 0.05
        trainable = [p for p in model.parameters() if p.requires_grad]
        result = train_step(model, torch.optim.SGD(trainable, lr=1.0), micro, acc, None)
        after.append((result, torch.cat([p.detach().flatten() for p in trainable])))
    (one, w_one), (split, w_split) = after
    assert one.count == split.count
    assert one.loss == pytest.approx(split.loss, abs=1e-5)
    assert torch.allclose(w_one, w_split, atol=1e-6)
