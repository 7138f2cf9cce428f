"""The ``leantune`` command end to end on a tiny Llama: train from a YAML file, inspect
the run directory, generate with the result; bad keys fail in one line; --help lists
every option."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from leantune.cli import main
from leantune.config import Config, load_config
from leantune.config.parsing import option_lines

STEP_FILES = ["adapter/adapter_config.json", "adapter/adapter_model.safetensors",
              "optimizer.pt", "rng.pt", "trainer_state.json"]


def write_data(path) -> str:
    with path.open("w") as f:
        for i in range(24):
            a, b = i % 10, (3 * i) % 10
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"add {a} {b}"},
                {"role": "assistant", "content": f"The answer is {a + b}."}]}) + "\n")
    return str(path)


def test_train_then_generate(llama_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""
model:
  name_or_path: {llama_dir}
data:
  path: {write_data(tmp_path / "add.jsonl")}
  eval_fraction: 0.25
adapter:
  r: 4
optim:
  lr: 1.0e-2
train:
  output_dir: {run_dir}
  batch_size: 4
  max_steps: 5
  progress: false
checkpoint:
  every: 2
  keep_last_n: 2
eval:
  generate: 1
  max_new_tokens: 4
""")
    assert main(["train", str(config), "eval.batch_size=3"]) == 0
    out = capsys.readouterr().out
    assert f"run directory: {run_dir}" in out and "held-out loss: before" in out
    assert "reply after training:" in out
    assert f"report: {run_dir / 'report' / 'index.html'}" in out
    assert "loss.png" in (run_dir / "report" / "index.html").read_text()

    resolved = load_config(run_dir / "config.yaml")
    assert resolved == load_config(config, ["eval.batch_size=3"])
    assert resolved.eval.batch_size == 3 and resolved.optim.lr == 1e-2

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(steps)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["optimizer_steps"] == 5 and summary["method"] == "lora"
    assert len(summary["samples"]) == 1

    # checkpoint.every=2 with keep_last_n=2: step 4 and the final step 5 remain.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-4", "step-5"]
    for step in ("step-4", "step-5"):
        for f in STEP_FILES:
            assert (run_dir / "checkpoints" / step / f).is_file(), (step, f)
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (run_dir / "adapter" / f).is_file()

    assert main(["generate", str(run_dir), "--prompt", "add 2 3", "--max-new-tokens", "6"]) == 0
    reply = capsys.readouterr().out
    assert reply.endswith("\n") and reply.count("\n") == 1

    # The same greedy reply from PEFT and transformers directly.
    tok = AutoTokenizer.from_pretrained(run_dir / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir),
                                      run_dir / "adapter").eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "add 2 3"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        new = model.generate(**ids, max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, ids["input_ids"].shape[1]:]
    assert reply.strip() == tok.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("where", ["yaml", "override"])
def test_bad_config_key_is_one_line_exit_2(tmp_path, capsys, monkeypatch, where):
    monkeypatch.chdir(tmp_path)  # the default train.output_dir is relative
    if where == "yaml":
        bad = tmp_path / "bad.yaml"
        bad.write_text("optim:\n  lrr: 0.1\n")
        argv = ["train", str(bad)]
    else:
        argv = ["train", "optim.lrr=0.1"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("leantune: error:") and "'optim.lrr'" in lines[0]
    assert "lr" in lines[0].split("did you mean", 1)[1]
    assert not (tmp_path / "runs").exists()  # failed before touching the disk


def _bad_input(case: str, llama_dir: str, tmp: Path) -> tuple[list[str], str]:
    """Overrides that set up one bad input, and the phrase its error must contain."""
    data = write_data(tmp / "ok.jsonl")
    model = tmp / "model"
    shutil.copytree(llama_dir, model)
    if case == "empty dataset":
        (tmp / "empty.jsonl").write_text("")
        return [f"data.path={tmp / 'empty.jsonl'}"], "empty: no rows to train on"
    if case == "all longer than max_length":
        return ["data.max_length=8", "data.truncation=drop"], "raise data.max_length (now 8)"
    if case == "no chat template":
        config = json.loads((model / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (model / "tokenizer_config.json").write_text(json.dumps(config))
        (model / "chat_template.jinja").unlink(missing_ok=True)
        return [f"data.path={data}"], "need a tokenizer with a chat template"
    if case == "model dir without weights":
        (model / "model.safetensors").unlink()
        return [], "has a config.json but no weights"
    if case == "missing model dir":
        return [f"model.name_or_path={tmp / 'typo'}"], "no such directory"
    raise ValueError(case)


@pytest.mark.parametrize("case", ["empty dataset", "all longer than max_length",
                                  "no chat template", "model dir without weights",
                                  "missing model dir"])
def test_bad_model_or_data_is_one_line_exit_2(case, llama_dir, tmp_path, capsys):
    overrides, phrase = _bad_input(case, llama_dir, tmp_path)
    argv = ["train", f"model.name_or_path={tmp_path / 'model'}",
            f"data.path={write_data(tmp_path / 'ok.jsonl')}",
            f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1",
            "train.progress=false", *overrides]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("leantune: error:") and phrase in last, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    keys = [key for section in dataclasses.fields(Config)
            for key, *_ in option_lines(section.default_factory, f"{section.name}.")]
    assert "data.replay.ratio" in keys  # nested sections are walked
    for key in keys:
        assert f"{key} (" in text, key


def test_bench_subcommands_parse_their_own_options():
    from leantune.cli import (
        build_parser,
        cmd_bench_adapters,
        cmd_bench_fast_forward,
        cmd_bench_packing,
    )

    args = build_parser().parse_args(["bench", "fast-forward", "--steps", "3", "--lr", "5e-5"])
    assert args.func is cmd_bench_fast_forward and (args.steps, args.lr) == (3, 5e-5)
    args = build_parser().parse_args(["bench", "packing", "--micro-tokens", "2048", "--no-trl"])
    assert args.func is cmd_bench_packing and (args.micro_tokens, args.trl) == (2048, False)
    args = build_parser().parse_args(["bench", "adapters", "--methods", "lora,full"])
    assert args.func is cmd_bench_adapters and args.methods == "lora,full" and args.set == []
    args = build_parser().parse_args(["bench", "reft", "--set", "optim.lr=4e-3"])
    assert args.methods == "lora_r8,loreft,direft" and args.set == ["optim.lr=4e-3"]
    assert args.out == "benchmarks/results/reft.json"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "packing", "--steps", "3"])


def test_continual_pretraining_from_the_cli(llama_dir, tmp_path, capsys):
    """A corpus with replay from YAML, then ``--resume`` with overrides after the flag."""
    for name, words in (("code", "def add return a b 0 1 2"), ("prose", "the quick fox")):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(
            {"text": " ".join(words.split()[(i + k) % len(words.split())] for k in range(30))})
            + "\n" for i in range(30)))
    run_dir = tmp_path / "run"
    config = tmp_path / "cpt.yaml"
    config.write_text(f"""
model: {{name_or_path: {llama_dir}}}
data:
  mode: corpus
  path: {tmp_path / "code.jsonl"}
  max_length: 32
  cache_dir: {tmp_path / "cache"}
  replay: {{path: {tmp_path / "prose.jsonl"}, ratio: 0.25}}
adapter: {{method: full}}
schedule: {{kind: infinite, warmup_steps: 1, cooldown_steps: 2, decay_ratio: 0}}
train: {{output_dir: {run_dir}, batch_size: 4, max_steps: 4, progress: false}}
""")
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    assert "  code (data, " in out and "  prose (replay, " in out
    assert "replayed: 25.0% of the windows ({'data': 12, 'replay': 4})" in out
    assert main(["train", str(config), "--resume", "train.max_steps=6", "eval.before=false"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["optimizer_steps"] == 6 and summary["start"]["kind"] == "resume"
    assert summary["replay"]["windows"] == {"data": 18, "replay": 6}
    lrs = [json.loads(line).get("lr") for line in (run_dir / "metrics.jsonl").read_text()
           .splitlines()]
    # full fine-tuning peaks at 2e-5; the constant phase holds 0.5 of it
    assert [x for x in lrs if x is not None][3:] == pytest.approx([1e-5] * 3)
