#!/usr/bin/env bash
# VAN on one NVIDIA GPU (H100/H200): plain vs fast execution, train (bf16) and inference, one table at the end.
#
#   bash benchmarks/gpu.sh [OUT_DIR]        (default OUT_DIR: output/bench_gpu)
#
# Budget: under 5 minutes on an H100/H200 (each run is capped by `timeout`; a run that fails or times out
# is reported and skipped, the table shows what finished). Configurations (see vancls/benchmark.py):
#   none                 the reference's execution: eager fp32 NCHW (every ratio is against it)
#   none+cl+amp          the usual GPU recipe: channels_last + bf16 autocast, plain modules
#   nhwc+amp+fusedadam   the NHWC fast path (channels_last convs, 1x1 on small maps as GEMMs), bf16, fused AdamW
#   nhwc_lka+amp+fusedadam   the same with LKA's dilated 7x7 as compiled shifted multiply-adds (Triton
#                        kernels from Inductor; cold compile reported; van_b0 only: the budget)
#   nhwc+fuse+amp        inference: BatchNorm and layer scales folded (VAN.fuse()), NHWC, bf16
# Memory: van_b2 training with and without gradient checkpointing (activation memory column).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-output/bench_gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
DEV=${DEVICE:-cuda}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
# Sizes and limits can be overridden, e.g. a CPU dry run of the same commands:
#   DEVICE=cpu IMG=32 BT=2 BI=2 BM=2 STEPS=1 WARMUP=1 TSCALE=20 bash benchmarks/gpu.sh /tmp/gpu_dry
IMG=${IMG:-224}
BT=${BT:-128}   # train batch
BI=${BI:-256}   # inference batch
BM=${BM:-32}    # memory (checkpointing) batch
TSCALE=${TSCALE:-1}
T0=$(date +%s)

run() {  # run NAME TIMEOUT_S ARGS...
  local name=$1 limit=$(( $2 * TSCALE )); shift 2
  echo "=== $name ($(( $(date +%s) - T0 ))s elapsed)"
  if ! timeout "$limit" "$PY" -m vancls.benchmark --device "$DEV" --warmup "$WARMUP" --steps "$STEPS" \
        --json-out "$OUT/$name.json" "$@"; then
    echo "!!! $name failed or timed out (limit ${limit}s)"
  fi
}

run b0_train 50 --model van_b0 --img-size "$IMG" -b "$BT" --mode train \
  --compare none,none+cl+amp,nhwc+amp+fusedadam
run b0_train_lka 80 --model van_b0 --img-size "$IMG" -b "$BT" --mode train \
  --compare none,nhwc_lka+amp+fusedadam
run b0_infer 30 --model van_b0 --img-size "$IMG" -b "$BI" --mode infer \
  --compare none,none+cl+amp,nhwc+amp,nhwc+fuse+amp
run b2_train 60 --model van_b2 --img-size "$IMG" -b "$BT" --mode train \
  --compare none,none+cl+amp,nhwc+amp+fusedadam
run b2_infer 30 --model van_b2 --img-size "$IMG" -b "$BI" --mode infer \
  --compare none,none+cl+amp,nhwc+amp,nhwc+fuse+amp
run b2_memory 30 --model van_b2 --img-size "$IMG" -b "$BM" --mode train --steps 3 --warmup 2 \
  --compare nhwc+amp,nhwc+amp+ckpt --baseline nhwc+amp

echo "=== all runs: $(( $(date +%s) - T0 ))s"
"$PY" -m vancls.benchmark --summarize "$OUT"/b0_train.json "$OUT"/b0_train_lka.json "$OUT"/b0_infer.json \
  "$OUT"/b2_train.json "$OUT"/b2_infer.json "$OUT"/b2_memory.json | tee "$OUT/summary.txt"
