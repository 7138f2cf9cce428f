"""The typed config: YAML and dotted overrides are views of the dataclasses, and bad keys
or values fail at load time with a message that names the key and what is allowed."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from leantune.config import (
    Config,
    ConfigError,
    ModelConfig,
    describe_options,
    load_config,
    parse_override,
)


def write_yaml(tmp_path, data) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def load_error(overrides: list[str] = (), path: str | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


def test_no_file_no_overrides_gives_the_defaults():
    assert load_config() == Config()


def test_yaml_then_overrides(tmp_path):
    path = write_yaml(tmp_path, {"optim": {"lr": 0.001}, "schedule": {"kind": "linear"},
                                 "train": {"batch_size": 4, "seed": 7}})
    cfg = load_config(path, ["optim.lr=1e-4", "train.batch_size=2", "optim.betas=[0.8, 0.95]",
                             "optim.max_grad_norm=null", "adapter.target_modules=[q_proj, v_proj]",
                             "data.eval_examples=", "eval.every=10"])
    assert cfg.optim.lr == 1e-4 and type(cfg.optim.lr) is float
    assert cfg.schedule.kind == "linear" and cfg.train.seed == 7  # file values not overridden
    assert cfg.train.batch_size == 2  # the override wins over the file
    assert cfg.optim.betas == [0.8, 0.95]
    assert cfg.optim.max_grad_norm is None
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.eval_examples is None  # an empty value is null
    assert cfg.eval.every == 10
    assert cfg.model == ModelConfig()  # untouched sections keep their defaults


def test_yaml_1_1_exponent_without_dot_and_ints_become_floats(tmp_path):
    # YAML 1.1 reads `1e-4` as a string; an int for a float field is widened.
    path = write_yaml(tmp_path, "optim:\n  lr: 1e-4\n  weight_decay: 1\ntrain:\n  epochs: 2\n")
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.epochs) == (1e-4, 1.0, 2.0)
    assert all(type(v) is float for v in (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.epochs))


def test_parse_override():
    assert parse_override("optim.lr=1e-4") == (["optim", "lr"], "1e-4")  # float-ed by the check
    assert parse_override(" data.path = a=b.jsonl") == (["data", "path"], "a=b.jsonl")
    assert parse_override("optim.betas=[0.9, 0.99]") == (["optim", "betas"], [0.9, 0.99])
    assert parse_override("train.max_steps=null") == (["train", "max_steps"], None)
    for bad in ("optim.lr", "lr=1", ".lr=1", "optim..lr=1"):
        with pytest.raises(ConfigError, match="section.key"):
            parse_override(bad)


@pytest.mark.parametrize("override, key, suggestion", [
    ("optim.lrr=1", "optim.lrr", "lr"),
    ("data.max_lenght=8", "data.max_lenght", "max_length"),
    ("optimm.lr=1", "optimm", "optim"),
])
def test_unknown_key_names_it_and_suggests_the_closest(override, key, suggestion):
    msg = load_error([override])
    assert f"unknown config key {key!r}" in msg
    assert f"did you mean {suggestion}" in msg


def test_unknown_key_in_yaml_file(tmp_path):
    msg = load_error(path=write_yaml(tmp_path, {"train": {"batchsize": 4}}))
    assert "'train.batchsize'" in msg and "did you mean batch_size" in msg
    # With nothing close, the message still lists the valid keys of the section.
    msg = load_error(["logging.zzz=1"])
    assert "'logging.zzz'" in msg and "did you mean" not in msg and "valid: level" in msg


def test_bad_literal_names_key_and_allowed_values():
    msg = load_error(["schedule.kind=cosinus"])
    assert "schedule.kind" in msg and "'cosinus'" in msg
    assert "['constant', 'linear', 'cosine', 'wsd', 'infinite']" in msg
    msg = load_error(["data.format=csv"])
    assert "data.format" in msg
    assert all(repr(f) in msg for f in ("auto", "text", "prompt_completion", "instruction",
                                        "messages", "sharegpt"))


@pytest.mark.parametrize("override, key, expected", [
    ("train.batch_size=eight", "train.batch_size", "expected an integer"),
    ("train.batch_size=true", "train.batch_size", "expected an integer"),  # bool is not an int
    ("train.batch_size=2.5", "train.batch_size", "expected an integer"),
    ("optim.lr=fast", "optim.lr", "expected a number"),
    ("optim.lr=true", "optim.lr", "expected a number"),
    ("train.resume=1", "train.resume", "expected true or false"),
    ("train.resume=yes please", "train.resume", "expected true or false"),
    ("data.path=123", "data.path", "expected a string"),
    ("optim.betas=0.9", "optim.betas", "expected a list"),
    ("optim.betas=[0.9, high]", "optim.betas[1]", "expected a number"),
    ("train.max_steps=ten", "train.max_steps", "expected an integer, got 'ten' (or null)"),
])
def test_wrong_types_name_the_key(override, key, expected):
    msg = load_error([override])
    assert msg.startswith(f"{key}:") and expected in msg


def test_malformed_files_and_sections(tmp_path):
    assert "not valid YAML" in load_error(path=write_yaml(tmp_path, "optim: [unclosed\n"))
    assert "top level must be a mapping" in load_error(path=write_yaml(tmp_path, "- a\n- b\n"))
    assert "expected a mapping" in load_error(path=write_yaml(tmp_path, {"optim": 5}))
    assert "expected a mapping" in load_error(["optim.lr=1"], write_yaml(tmp_path, {"optim": 5}))


@pytest.mark.parametrize("override, key", [
    ("train.batch_size=0", "train.batch_size"),
    ("train.grad_accum=-1", "train.grad_accum"),
    ("data.max_length=0", "data.max_length"),
    ("data.eval_fraction=1.0", "data.eval_fraction"),
    ("data.eval_fraction=-0.1", "data.eval_fraction"),
    ("data.max_examples=0", "data.max_examples"),
    ("data.eval_examples=-1", "data.eval_examples"),
    ("schedule.warmup_ratio=1", "schedule.warmup_ratio"),
    ("schedule.min_lr_ratio=1.5", "schedule.min_lr_ratio"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("train.max_steps=0", "train.max_steps"),
    ("eval.every=0", "eval.every"),
    ("checkpoint.keep_last_n=0", "checkpoint.keep_last_n"),
    ("train.epochs=0", "train.epochs"),
    ("fast_forward.interval=0", "fast_forward.interval"),
    ("fast_forward.eval_examples=0", "fast_forward.eval_examples"),
    ("fast_forward.max_steps_per_stage=0", "fast_forward.max_steps_per_stage"),
    ("fast_forward.burn_in=-1", "fast_forward.burn_in"),
    ("fast_forward.min_improvement=-0.1", "fast_forward.min_improvement"),
    ("schedule.decay_ratio=1.5", "schedule.decay_ratio"),
    ("schedule.const_lr_ratio=-0.1", "schedule.const_lr_ratio"),
    ("adapter.positions=f7+x3", "adapter.positions"),
    ("adapter.layers=[]", "adapter.layers"),
    ("adapter.target_modules=attn", "adapter.target_modules"),
    ("adapter.use_dora=true adapter.method=ia3", "adapter.use_dora"),
    ("adapter.prompt_init=text", "adapter.prompt_init_text"),
])
def test_range_checks(override, key):
    assert load_error(override.split(" ")).startswith(f"{key}:")


def test_infinite_schedule_phases_must_fit_in_the_run():
    msg = load_error(["schedule.kind=infinite", "schedule.warmup_ratio=0.2",
                      "schedule.cooldown_ratio=0.7", "schedule.decay_ratio=0.2"])
    assert msg.startswith("schedule.cooldown_ratio:") and "must not exceed 1" in msg


def test_range_edges_that_are_allowed():
    cfg = load_config(overrides=["data.eval_fraction=0", "data.eval_examples=0", "train.epochs=0",
                                 "train.max_steps=5", "schedule.min_lr_ratio=1"])
    assert (cfg.data.eval_fraction, cfg.data.eval_examples, cfg.train.max_steps) == (0.0, 0, 5)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(overrides=[
        "optim.lr=3e-5", "optim.eps=1e-10", "optim.betas=[0.9, 0.95]", "optim.max_grad_norm=null",
        "data.path=some/file.jsonl", "data.format=messages", "data.max_examples=100",
        "data.system_prompt=Be brief.", "adapter.target_modules=[q_proj]", "adapter.alpha=8",
        "train.max_steps=3", "train.epochs=0.5", "eval.every=2", "logging.level=debug",
        "model.gguf_file=model.gguf",
    ])
    path = tmp_path / "resolved.yaml"
    cfg.save(path)
    again = load_config(path)
    assert again == cfg
    assert again != Config()  # the overrides really changed something that had to survive
    Config().save(path)
    assert load_config(path) == Config()


def section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def fields_of(cls: type, prefix: str):
    """``(dotted key, field)`` of every leaf field, nested sections walked."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from fields_of(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def test_describe_options_covers_every_field():
    text = describe_options()
    sections = section_classes()
    assert len(sections) >= 9
    for name, cls in sections.items():
        assert dataclasses.is_dataclass(cls)
        assert f"{name}:" in text.splitlines()
        for key, f in fields_of(cls, f"{name}."):
            line = next((ln for ln in text.splitlines() if ln.strip().startswith(f"{key} (")),
                        None)
            assert line is not None, f"{key} missing from describe_options()"
            assert f.metadata["help"] and line.endswith(f.metadata["help"])


def test_nested_sections_and_mappings_from_yaml_and_overrides(tmp_path):
    path = write_yaml(tmp_path, {"data": {"mode": "corpus", "replay": {"path": "old.jsonl"},
                                          "eval_corpora": {"old": "old.jsonl"}}})
    cfg = load_config(path, ["data.replay.ratio=0.25", "data.eval_corpora={a: a.txt}"])
    assert cfg.data.replay.path == "old.jsonl" and cfg.data.replay.ratio == 0.25
    assert cfg.data.eval_corpora == {"a": "a.txt"}  # the override replaces the mapping
    assert load_config(overrides=["data.replay.ratio=0.1", "data.replay.path=x",
                                  "data.mode=corpus"]).data.replay.ratio == 0.1
    msg = load_error(["data.replay.ration=0.1"])
    assert "'data.replay.ration'" in msg and "did you mean ratio" in msg
    assert load_error(["data.eval_corpora=[a.txt]"]).startswith("data.eval_corpora: expected a "
                                                                "mapping")
    assert load_error(["data.eval_corpora={a: 3}"]).startswith("data.eval_corpora.a: expected "
                                                               "a string")
    assert load_error(["optim.lr.x=1"]).startswith("optim.lr: expected a number")


@pytest.mark.parametrize("old, new", [("optim.schedule=wsd", "schedule.kind"),
                                      ("optim.warmup_steps=3", "schedule.warmup_steps")])
def test_moved_keys_name_their_new_place(old, new):
    assert load_error([old]) == f"{old.split('=')[0]}: this option is now {new}"


@pytest.mark.parametrize("overrides, key", [
    (["data.replay.path=old.jsonl"], "data.replay.path"),  # replay needs corpus mode
    (["data.mode=corpus", "data.replay.ratio=0.25"], "data.replay.path"),
    (["data.mode=corpus", "data.replay.path=x", "data.replay.ratio=1"], "data.replay.ratio"),
    (["data.mode=corpus", "data.replay.path=x", "data.replay.final_ratio=-0.5"],
     "data.replay.final_ratio"),
    (["train.init_from=a", "schedule.anneal_from=b"], "train.init_from"),
    (["data.mode=corpus", "data.packing=offline"], "data.packing"),
    (["data.eval_tokens=0"], "data.eval_tokens"),
    (["schedule.decay_steps=-1"], "schedule.decay_steps"),
    (["schedule.anneal_from=ckpt", "schedule.decay_ratio=0"], "schedule.decay_steps"),
])
def test_continual_pretraining_checks(overrides, key):
    assert load_error(overrides).startswith(f"{key}:")


@pytest.mark.parametrize("overrides, key", [
    (["objective.kind=dpo", "objective.beta=0"], "objective.beta"),
    (["objective.kind=simpo", "objective.gamma=-1"], "objective.gamma"),
    (["objective.kind=kto", "objective.desirable_weight=0"], "objective.desirable_weight"),
    (["objective.kind=simpo", "objective.reference=copy"], "objective.reference"),
    (["objective.kind=dpo", "objective.reference=adapter_off", "adapter.method=full"],
     "objective.reference"),
    (["objective.kind=dpo", "data.mode=corpus"], "data.mode"),
    (["objective.kind=orpo", "data.packing=offline"], "data.packing"),
    (["objective.kind=ppo"], "objective.kind"),
    (["objective.kind=grpo", "objective.beta=-0.1"], "objective.beta"),
    (["objective.kind=grpo", "objective.max_completion_length=0"],
     "objective.max_completion_length"),
    (["objective.kind=grpo", "objective.rewards=[]"], "objective.rewards"),
    (["objective.kind=grpo", "data.mode=corpus"], "data.mode"),
])
def test_objective_checks_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_a_preference_objective_defaults_to_a_smaller_learning_rate():
    sft, dpo = load_config(None, []), load_config(None, ["objective.kind=dpo"])
    assert dpo.optim.lr == pytest.approx(sft.optim.lr / 10)
    assert load_config(None, ["objective.kind=dpo", "optim.lr=1e-3"]).optim.lr == 1e-3
    assert dpo.objective.reference == "auto" and dpo.objective.shared_prompt
    grpo = load_config(None, ["objective.kind=grpo"])
    assert grpo.optim.lr == pytest.approx(sft.optim.lr / 2) and grpo.objective.beta is None
