"""The speed benchmark's arms on a tiny model: leantune's chunked and plain losses train
to the same model, leantune's padded step matches the bare HF+PEFT loop's update, bf16
arms run, and a child process reports its own figures (the whole path `bench speed`
takes)."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator

from leantune.bench import speed
from leantune.bench.speed_arms import bare_arm, leantune_arm, setup
from leantune.data.encode import IGNORE


@pytest.fixture(scope="module")
def examples_file(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in [7, 30, 12, 25, 9, 40, 16, 5, 33, 21, 8, 14]:
        ids = torch.randint(5, 200, (n,), generator=g).tolist()
        rows.append([ids, [IGNORE] + ids[1:]])
    path = tmp_path_factory.mktemp("speed") / "examples.json"
    path.write_text(json.dumps(rows))
    return str(path)


def spec_for(llama_dir, examples_file, impl, layout, precision="fp32", chunked=True,
             method="lora"):
    return {"name": f"{impl} {layout}", "impl": impl, "method": method, "layout": layout,
            "precision": precision, "chunked": chunked, "model": llama_dir, "examples": 8,
            "eval_examples": 4, "batch_size": 4, "max_length": 64, "lr": 1e-2,
            "examples_file": examples_file}


def run(spec):
    acc = Accelerator(cpu=True)
    spec = spec | {"examples": 8}
    source, tokenizer, data, _ = setup(spec | {"examples": 12})
    train, held_out = data[:8], data[8:]
    return (leantune_arm if spec["impl"] == "leantune" else bare_arm)(
        spec, source, tokenizer, train, held_out, acc)


def test_chunked_and_plain_loss_train_the_same_model(llama_dir, examples_file):
    chunked = run(spec_for(llama_dir, examples_file, "leantune", "online"))
    plain = run(spec_for(llama_dir, examples_file, "leantune", "online", chunked=False))
    assert chunked["eval_loss"] == pytest.approx(plain["eval_loss"], abs=1e-4)
    assert chunked["flops"] == plain["flops"] > 0 and chunked["precision_used"] == "fp32"


@pytest.mark.parametrize("method", ["lora", "full"])
def test_padded_step_matches_the_bare_loop(llama_dir, examples_file, method):
    ours = run(spec_for(llama_dir, examples_file, "leantune", "none", method=method))
    bare = run(spec_for(llama_dir, examples_file, "bare", "padded", method=method))
    assert ours["optimizer_steps"] == bare["optimizer_steps"] == 2
    assert ours["eval_loss"] == pytest.approx(bare["eval_loss"], abs=1e-3)


def test_bf16_arms_run_close_to_fp32(llama_dir, examples_file):
    fp32 = run(spec_for(llama_dir, examples_file, "leantune", "online"))
    for impl, layout in (("leantune", "online"), ("bare", "padded")):
        mixed = run(spec_for(llama_dir, examples_file, impl, layout, precision="bf16-mixed"))
        assert mixed["eval_loss"] == pytest.approx(fp32["eval_loss"], rel=0.05)


def test_a_child_arm_and_the_summary(llama_dir, examples_file, tmp_path):
    results = speed.bench_speed(llama_dir, examples=8, eval_examples=4, batch_size=4,
                                max_length=64, rounds=1, lr=1e-2,
                                arms=["leantune fp32", "bare HF+PEFT fp32"],
                                out=tmp_path / "speed.json", examples_file=examples_file)
    med = results["median"]
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["median"].keys() == med.keys() == {"leantune fp32", "bare HF+PEFT fp32"}
    ours = med["leantune fp32"]
    assert ours["peak_memory_bytes"] > 0 and 0 < ours["mfu"] < 1
    assert ours["speed_vs_bare_fp32"] == pytest.approx(
        ours["tokens_per_second"] / med["bare HF+PEFT fp32"]["tokens_per_second"])
    assert results["setup"]["cpu"]["model"] and results["setup"]["peak_flops"]["fp32"] > 0
    assert "| leantune fp32 | fp32 |" in speed.format_table(results)
    with pytest.raises(ValueError, match="unknown arm"):
        speed.bench_speed(llama_dir, arms=["nope"])


def test_a_bf16_base_under_bf16_mixed(llama_dir, examples_file):
    spec = spec_for(llama_dir, examples_file, "leantune", "online", precision="bf16-mixed")
    result = run(spec | {"base_dtype": "bfloat16"})
    fp32 = run(spec_for(llama_dir, examples_file, "leantune", "online"))
    assert result["precision_used"] == "bf16-mixed"
    assert result["eval_loss"] == pytest.approx(fp32["eval_loss"], rel=0.05)


def test_arm_names_survive_the_comma_separated_flag():
    assert all("," not in name for name in speed.ARMS)
