"""``--format gguf-lora``: the LoRA adapter alone in llama.cpp's adapter format. Its deltas
``B A`` added to the base's GGUF tensors give the merged model's GGUF tensors (PEFT did
that merge), in GGUF names and RoPE row order; methods the format cannot hold are refused.
llama.cpp applying the file itself is tested in test_gguf_llama_cpp.py (opt-in)."""

from __future__ import annotations

import numpy as np
import pytest

from leantune.cli import main
from leantune.export.gguf.writer import write_gguf

from conftest import train_tiny_run


def tensors(path) -> dict[str, np.ndarray]:
    import gguf

    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
            for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("arch, overrides", [
    ("llama", ()), ("qwen2", ()),
    ("mistral", ("adapter.r=4", "adapter.alpha=16", "adapter.use_rslora=true"))])
def test_base_plus_lora_deltas_is_the_merged_model(tmp_path, arch, overrides, capsys):
    import gguf

    run_dir, merged = train_tiny_run(tmp_path, arch, overrides)
    assert main(["export", str(run_dir), "--format", "gguf-lora", "--out", str(tmp_path)]) == 0
    assert "--lora" in capsys.readouterr().out
    lora_file = tmp_path / "lora-f32.gguf"
    fields = gguf.GGUFReader(lora_file).fields
    assert fields["general.type"].contents() == "adapter"
    assert fields["adapter.type"].contents() == "lora"
    assert "adapter.lora.alpha" not in fields  # PEFT's scaling is folded into B
    write_gguf(tmp_path / "base", tmp_path / "base.gguf", "f32")
    write_gguf(merged, tmp_path / "merged.gguf", "f32")
    base, want, lora = (tensors(tmp_path / f) for f in ("base.gguf", "merged.gguf",
                                                         "lora-f32.gguf"))
    adapted = {n.removesuffix(".lora_a") for n in lora if n.endswith(".lora_a")}
    assert {"blk.0.attn_q.weight", "blk.1.ffn_down.weight"} <= adapted
    for name, w in want.items():
        got = base[name]
        if name in adapted:
            got = got + lora[name + ".lora_b"] @ lora[name + ".lora_a"]
        assert np.allclose(got, w, atol=1e-6), name


def refused(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_dora_is_refused_with_the_reason(tmp_path, capsys):
    run_dir, _ = train_tiny_run(tmp_path, "llama", ("adapter.use_dora=true",))
    err = refused(["export", str(run_dir), "--format", "gguf-lora", "--out", str(tmp_path)],
                  capsys)
    assert "DoRA cannot be written" in err and "--format gguf writes" in err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def test_methods_without_lora_layers_and_bad_quants_are_refused(tmp_path, capsys):
    run_dir, _ = train_tiny_run(tmp_path, "llama", ("adapter.method=ia3",))
    out = ["--out", str(tmp_path / "a.gguf")]
    assert "no LoRA layers" in refused(["export", str(run_dir), "--format", "gguf-lora", *out],
                                       capsys)
    assert "choose from f32, f16, bf16, q8_0" in refused(
        ["export", str(run_dir), "--format", "gguf-lora", "--quant", "q4_0", *out], capsys)
    assert "--quant applies to --format gguf" in refused(
        ["export", str(run_dir), "--quant", "q8_0", "--out", str(tmp_path / "hf")], capsys)
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "hf").exists()
