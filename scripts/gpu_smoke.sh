#!/usr/bin/env bash
# GPU smoke test, by hand on one GPU machine (about 5-10 minutes with the install): every role on CUDA in bf16 on
# a tiny model, two PPO episodes with weight sync, printing what it measured. Without a GPU it says so and stops.
#   scripts/gpu_smoke.sh [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_smoke: skipped: no nvidia-smi on this machine (needs one NVIDIA GPU)"
    exit 0
fi
make install >/dev/null
OUT=$(mktemp -d -t relay-gpu-smoke-XXXXXX)
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
.venv/bin/relay data demo "$OUT/data" -t tiny >"$OUT/data.log" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
status=0
timeout 900 .venv/bin/python scripts/gpu_smoke.py --data "$OUT/data/prompt" --out "$OUT/run" "$@" >"$OUT/ppo.log" 2>&1 \
    || status=$?
grep -E '^(gpu_smoke|  )' "$OUT/ppo.log" || true  # the script's own lines; Ray's and vLLM's stay in the log
if [ "$status" -ne 0 ]; then echo "gpu_smoke: failed ($status); log: $OUT/ppo.log"; tail -20 "$OUT/ppo.log"; exit 1; fi
echo "gpu_smoke: outputs and logs in $OUT"
