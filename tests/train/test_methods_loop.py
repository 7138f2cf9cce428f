"""Every method through the CLI with only ``adapter.method`` changed (and the method's
default LR): it trains, reports what it trained and what the base costs in memory,
writes its own output directory, generates, exports (or refuses to, saying why), and
resumes from a crash bit-identically even where the checkpoint is not a LoRA adapter."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

import leantune.train.loop as loop
from leantune.cli import main
from leantune.config import METHOD_LR, load_config

from conftest import Crash, crash_after_checkpoint

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
METHODS = ["lora", "qlora", "ia3", "prompt_tuning", "full", "loreft"]
MADE_OF = {"full": "config.json", "loreft": "reft_config.json"}  # else PEFT's adapter_config


@pytest.fixture(scope="module")
def config_file(llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("methods")
    data = tmp / "add.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"add {i % 10} {(3 * i) % 10}"},
        {"role": "assistant", "content": f"The answer is {i % 10 + (3 * i) % 10}."}]}) + "\n"
        for i in range(40)))
    path = tmp / "tiny.yaml"
    path.write_text(f"""
model: {{name_or_path: {llama_dir}}}
data: {{path: {data}, eval_fraction: 0.2}}
adapter: {{r: 4, num_virtual_tokens: 4}}
train: {{batch_size: 4, max_steps: 8, progress: false}}
""")
    return path


def skip_without_bnb(method: str) -> None:
    if method == "qlora" and not HAS_BNB:
        pytest.skip("bitsandbytes is not installed (pip install 'leantune[qlora]')")


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_from_the_cli(method, config_file, tmp_path, capsys):
    skip_without_bnb(method)
    run = tmp_path / "run"
    assert main(["train", str(config_file), f"adapter.method={method}",
                 f"train.output_dir={run}"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method
    assert load_config(run / "config.yaml").optim.lr == METHOD_LR[method]
    assert summary["eval_loss"]["after"] < summary["eval_loss"]["before"]

    trainable, total = summary["trainable_params"], summary["total_params"]
    assert (trainable == total) if method == "full" else (0 < trainable < total / 10)
    memory = summary["base_memory_bytes"]
    if method == "qlora":
        assert memory["loaded"] < 0.8 * memory["full_precision"]
    else:
        assert memory["loaded"] == memory["full_precision"]
    packing = summary["packing"]
    assert packing["used"] == ("none" if method == "prompt_tuning" else "online")

    saved = run / ("model" if method == "full" else "adapter")
    assert (saved / MADE_OF.get(method, "adapter_config.json")).is_file()
    assert not (run / ("adapter" if method == "full" else "model")).exists()

    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "add 2 3", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.endswith("\n")

    code = main(["export", str(run), "--out", str(tmp_path / "merged")])
    out, err = capsys.readouterr()
    if method in ("prompt_tuning", "loreft"):
        assert code == 2 and f"adapter.method={method} cannot be merged" in err
        assert not (tmp_path / "merged").exists()
    else:
        assert code == 0 and (tmp_path / "merged" / "config.json").is_file()
        assert ("dequantized" in out) == (method == "qlora")


def saved_tensors(run_dir, method: str) -> dict[str, torch.Tensor]:
    if method == "full":
        return load_file(run_dir / "model" / "model.safetensors")
    if method == "loreft":
        return load_file(run_dir / "adapter" / "reft_model.safetensors")
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("method", ["ia3", "prompt_tuning", "full", "loreft"])
def test_resume_is_bit_identical_for_every_checkpoint_format(method, config_file, tmp_path,
                                                             monkeypatch):
    overrides = [f"adapter.method={method}", "train.max_steps=4", "checkpoint.every=2",
                 "eval.before=false"]

    def cfg(out, *extra):
        return load_config(config_file, [*overrides, f"train.output_dir={out}", *extra])

    loop.train(cfg(tmp_path / "straight"))
    with monkeypatch.context() as m:
        crash_after_checkpoint(m, at_step=2)
        with pytest.raises(Crash):
            loop.train(cfg(tmp_path / "crashed"))
    loop.train(cfg(tmp_path / "crashed", "train.resume=true"))
    want, got = saved_tensors(tmp_path / "straight", method), saved_tensors(tmp_path / "crashed",
                                                                            method)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_fast_forward_steps_reft_in_its_parametrization_and_keeps_r_orthonormal(
        config_file, llama_dir, tmp_path):
    from leantune.adapters import build_adapter, load_base
    from leantune.config import ModelConfig

    run = tmp_path / "run"
    cfg = load_config(config_file, [
        "adapter.method=loreft", "schedule.kind=constant", "optim.lr=3e-3",
        "fast_forward.enabled=true", "fast_forward.interval=2", "fast_forward.eval_examples=4",
        "train.max_steps=6", f"train.output_dir={run}", "eval.before=false"])
    summary = loop.train(cfg)
    assert summary["ff_stages"] == 3 and summary["ff_steps_accepted"] > 0
    adapter = build_adapter(cfg.adapter)
    model = adapter.load(load_base(ModelConfig(name_or_path=llama_dir, dtype="float32"), adapter),
                         run / "adapter")
    for intervention in model.interventions.values():
        r = intervention.rotation.weight
        torch.testing.assert_close(r @ r.T, torch.eye(r.shape[0]), atol=1e-5, rtol=0)
