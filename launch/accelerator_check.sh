#!/usr/bin/env bash
# One check of a GPU or TPU VM, in about 10 minutes on one H100/H200 or TPU host:
#   1. `bench train` of the paper models in bfloat16 at batch 32 (224 px), beside timm in
#      PyTorch where PyTorch is installed, and one step on the demo's real input pipeline;
#   2. `bench lower --compile` of the paper models' train and eval steps on this backend
#      (op counts, per-device memory and FLOPs of the compiled programs);
#   3. a 200-step run of the demo config.
# Every measurement prints one JSON line on stdout (progress and errors go to stderr), so
#   launch/accelerator_check.sh | tee accelerator_check.jsonl
# keeps the figures. Install first: pip install -e '.[cuda12,test]' (GPU) or '.[tpu]'.
#
# Environment: OUT (scratch folder, default a new temporary one), PEAK_TFLOPS (the chip's
# peak bf16 TFLOP/s, for MFU; H100 SXM 989, H200 989, TPU v4 275, v5e 197), MODELS (a
# space-separated subset of the paper models), STEP_TIMEOUT (seconds per command, 240).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi

OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
STEP_TIMEOUT="${STEP_TIMEOUT:-240}"
MODELS="${MODELS:-resnet50 densenet121 convnext_base swin_base_patch4_window7_224 vit_base_patch16_224 unet_resnet50 upernet_swin_base_patch4_window7_224}"
PEAK=()
[[ -n "${PEAK_TFLOPS:-}" ]] && PEAK=(--peak_tflops="$PEAK_TFLOPS")
export TF_CPP_MIN_LOG_LEVEL=2
# Compilations are part of what is measured: a cache from an earlier run would hide them.
COMPILE_CACHE=(--compilation_cache=)
failures=0

# The config file whose paper setting builds `model` (its data set's example shapes only
# are read by `bench lower`: nothing is downloaded or prepared).
paper_config() {
  case "$1" in
    resnet*) echo "configs/resnet50.py:data=chestxray14" ;;
    densenet*) echo "configs/densenet121.py:data=chestxray14" ;;
    convnext*) echo "configs/convnext.py:data=chestxray14" ;;
    swin*|vit*) echo "configs/swin.py:data=chestxray14" ;;
    unet_*) echo "configs/unet_resnet50.py:data=jsrt_lungs" ;;
    upernet_swin*) echo "configs/upernet_swin.py:data=jsrt_lungs" ;;
    *) echo "no paper config for $1" >&2; return 1 ;;
  esac
}

# Runs one measurement with a time limit; a failure is reported as a JSON line too.
measure() {
  local name="$1"; shift
  echo "== $name: $*" >&2
  local out
  out="$(timeout "$STEP_TIMEOUT" "$@" 2> "$OUT/$name.log")"
  local status=$?
  if [[ $status -ne 0 ]]; then
    failures=$((failures + 1))
    printf '{"check": "%s", "error": "exit status %d", "log": "%s"}\n' "$name" "$status" \
      "$OUT/$name.log"
  fi
  [[ -n "$out" ]] && echo "$out"
}

python -c 'import jax; print(jax.devices())' >&2 || exit 1

# 1. Train steps: paper models, bf16, batch 32, 224 px (random batches), timm beside them.
torch_flags=()
python -c 'import torch, timm' 2> /dev/null && torch_flags=(--compare_torch)
for model in $MODELS; do
  case "$model" in
    unet_*|upernet_*) compare=() ;;  # timm has no segmentation models to compare with
    *) compare=("${torch_flags[@]}") ;;
  esac
  measure "train_$model" python -m medbench_jax.bench train --model="$model" --batch=32 \
    --image_size=224 --dtype=bfloat16 --steps=20 "${PEAK[@]}" "${compare[@]}" \
    "${COMPILE_CACHE[@]}"
done
# The input pipeline feeding a paper model's train step (the phantom data of the demo).
measure train_real_input python -m medbench_jax.bench train --config=configs/resnet50.py \
  --model=resnet50 --batch=32 --dtype=bfloat16 --steps=50 --real_input "${PEAK[@]}" \
  "${COMPILE_CACHE[@]}"

# 2. Lowered and compiled on this backend.
for model in $MODELS; do
  config="$(paper_config "$model")" || continue
  measure "lower_$model" python -m medbench_jax.bench lower --config="$config" \
    --model="$model" --compile --config.model.dtype=bfloat16 --config.input.batch_size=32 \
    --config.input.eval_batch_size=32
done

# 3. The demo config for 200 steps, end to end (data generation, training, evaluation).
measure demo_200_steps bash -c "python -m medbench_jax.main --config=configs/swin.py \
  --workdir='$OUT/demo' --config.train.max_steps=200 ${COMPILE_CACHE[*]} >&2 && \
  python -c 'import json, sys; r = json.load(open(sys.argv[1])); \
print(json.dumps({\"check\": \"demo_200_steps\", \"summary\": r[\"summary\"], \
\"cost\": r[\"cost\"], \"devices\": r[\"provenance\"][\"devices\"]}))' '$OUT/demo/results.json'"

echo "accelerator check: $failures failed; logs in $OUT" >&2
exit $((failures > 0))
