"""Default targets on mixture-of-experts models leave routers and gates alone, and a model
PEFT cannot wrap fails in one line that says what to do."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Llama4TextConfig,
    MambaConfig,
    MixtralConfig,
    Qwen2MoeConfig,
)

from leantune import cli
from leantune.adapters import build_adapter
from leantune.adapters.targets import all_linear_targets, linear_layers
from leantune.config import AdapterConfig

from conftest import make_tokenizer

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300, pad_token_id=0)
MOE = {
    "mixtral": (MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2),
                {"mlp.gate"}),
    "qwen2_moe": (Qwen2MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=16, shared_expert_intermediate_size=16),
                  {"mlp.gate", "mlp.shared_expert_gate"}),
    "llama4_text": (Llama4TextConfig(**SMALL, intermediate_size_mlp=64, head_dim=8,
                                     num_local_experts=4, num_experts_per_tok=1),
                    {"feed_forward.router"}),
}


@pytest.mark.parametrize("arch", sorted(MOE))
def test_lora_defaults_skip_moe_routers_and_the_wrapped_model_runs(arch):
    config, routers = MOE[arch]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    router_names = {n for n, _ in base.named_modules() if any(n.endswith("." + r)
                                                              for r in routers)}
    assert router_names  # the test model does have them (a Linear or not)
    names = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    kept = set(linear_layers(base))
    assert kept == names - router_names - {"lm_head"}
    targets = all_linear_targets(base)
    model = build_adapter(AdapterConfig(method="lora", target_modules="all-linear")).apply(base)
    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules()
               if hasattr(m, "lora_A")}
    assert wrapped == kept, targets
    out = model(input_ids=torch.tensor([[5, 6, 7, 8, 9]]), use_cache=False)
    assert out.logits.isfinite().all()


def test_peft_refusal_is_one_line_with_the_fix(tmp_path, capsys, caplog):
    """Mamba: PEFT refuses LoRA on out_proj (its kernels read the weight directly). The
    default targets leave it out and train; naming it is exit 2 in one line."""
    tok = make_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(MambaConfig(
        hidden_size=32, num_hidden_layers=2, vocab_size=len(tok), state_size=4, pad_token_id=0,
        bos_token_id=1, eos_token_id=4)).save_pretrained(tmp_path / "mamba")
    tok.save_pretrained(tmp_path / "mamba")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": " b"}\n' * 8)
    common = [f"model.name_or_path={tmp_path / 'mamba'}", f"data.path={data}",
              "train.progress=false", "train.max_steps=1", "eval.generate=0"]
    assert cli.main(["train", *common, f"train.output_dir={tmp_path / 'auto'}"]) == 0
    assert "PEFT does not wrap out_proj on mamba" in caplog.text
    assert "LoRA goes on dt_proj, in_proj, x_proj" in caplog.text
    capsys.readouterr()
    rc = cli.main(["train", *common, f"train.output_dir={tmp_path / 'run'}",
                   "adapter.target_modules=[in_proj,out_proj,x_proj]"])
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("leantune: error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err
    line = errors[0]
    for part in ("adapter.method=lora", "PEFT cannot wrap MambaForCausalLM", "out_proj",
                 "incompatible", "adapter.target_modules", "adapter.method=full",
                 "in_proj, out_proj, x_proj"):
        assert part in line, (part, line)
    assert "base_layer" not in line  # the layers listed are the model's own, not PEFT's


def test_fused_moe_experts_take_lora_without_dropout(tmp_path, caplog):
    """DeepSeek-V3 on transformers 5: PEFT maps the gate/up/down_proj targets to the routed
    experts' fused 3-D weights, whose wrapper refuses dropout. LoRA's defaults still
    wrap it (dropout 0, said once), and PEFT's own loading reads the adapter back."""
    from peft import PeftModel
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(**SMALL | {"num_key_value_heads": 4}, n_routed_experts=4,
                              num_experts_per_tok=2, moe_intermediate_size=16,
                              n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                              q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                              v_head_dim=16, n_group=1, topk_group=1)
    torch.manual_seed(0)
    model = build_adapter(AdapterConfig(method="lora")).apply(
        AutoModelForCausalLM.from_config(config))
    assert "fused mixture-of-experts weights (down_proj, gate_up_proj)" in caplog.text
    peft_config = model.peft_config["default"]
    assert peft_config.lora_dropout == 0 and peft_config.target_parameters
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model.eval()
    expected = model(input_ids=ids, use_cache=False).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(0)
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_config(config),
                                      tmp_path / "adapter").eval()
    torch.testing.assert_close(again(input_ids=ids, use_cache=False).logits, expected)


def test_a_preset_target_that_fails_alone_is_left_out(caplog):
    """DeepSeek-V4's o_a_proj subclasses nn.Linear but multiplies per head group: under
    LoRA it fails the first forward. The preset's other targets take the adapter (said
    once); naming o_a_proj is still refused in one line."""
    from leantune.bench.tiny_models import build_tiny
    from leantune.config import ConfigError

    model = build_adapter(AdapterConfig(method="lora")).apply(build_tiny("deepseek_v4",
                                                                         vocab=300))
    targets = model.peft_config["default"].target_modules
    assert "o_a_proj" not in targets and {"o_b_proj", "q_a_proj", "up_proj"} <= set(targets)
    assert "o_a_proj fails under PEFT's lora wrapper on DeepseekV4ForCausalLM" in caplog.text
    assert any("o_b_proj" in n and hasattr(m, "lora_A") for n, m in model.named_modules())
    with pytest.raises(ConfigError, match=r"PEFT cannot wrap DeepseekV4ForCausalLM's modules "
                                          r"\[o_a_proj, o_b_proj\]: the wrapped model fails"):
        build_adapter(AdapterConfig(method="lora", target_modules=["o_a_proj", "o_b_proj"])
                      ).apply(build_tiny("deepseek_v4", vocab=300))
