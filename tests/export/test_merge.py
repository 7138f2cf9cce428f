"""``leantune export``: the merged standalone model gives base + adapter's logits, loads
with plain transformers (no PEFT), keeps the chat template, and never overwrites."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from leantune.cli import main
from leantune.export import ExportError, export_run

from conftest import train_tiny_run


@pytest.fixture(scope="module", params=["lora", "dora"])
def trained_run(request, llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    return train_tiny_run(tmp, "llama", [f"adapter.use_dora={request.param == 'dora'}"],
                          base=llama_dir)[0]


@pytest.mark.parametrize("via_cli", [False, True])
def test_merged_model_matches_base_plus_adapter(trained_run, llama_dir, tmp_path, via_cli,
                                                capsys):
    out = tmp_path / "merged"
    if via_cli:
        assert main(["export", str(trained_run), "--out", str(out)]) == 0
        assert str(out) in capsys.readouterr().out
    else:
        export_run(trained_run, out)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.config.use_cache is True
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32),
        trained_run / "adapter").eval()
    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    ids = torch.randint(5, 200, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, before = (m(input_ids=ids).logits for m in (adapted, merged, base))
    assert not torch.allclose(want, before, atol=1e-4)  # the adapter really changes outputs
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == AutoTokenizer.from_pretrained(trained_run / "adapter").chat_template


def test_export_refuses_to_overwrite_and_names_bad_runs(trained_run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_run(trained_run, out)
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")]) == 2
    assert "not a leantune run directory" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
