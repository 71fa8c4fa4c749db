#!/usr/bin/env bash
# The measurements behind `--fast-path auto` on the CPU (docs/PERFORMANCE.md, "What auto picks"): prints numbers,
# asserts nothing.
#
#   bash benchmarks/cpu_auto.sh [OUT_DIR] [RUNS]       (defaults: output/bench_cpu_auto, 3)
#
# 1. Kernels: van_b0 @224 batch 32 training steps (fwd + bwd + AdamW), none vs nhwc vs nhwc_lka interleaved in one
#    process with the same allocator policy (retain, train.py's), RUNS separate processes. The first process
#    compiles nhwc_lka's kernels cold (reported as its cold compile time); later ones hit Inductor's disk cache.
# 2. Allocator: the plain path ('none') under glibc's default policy vs train.py's 'retain', RUNS alternated
#    processes (the policy is process-wide, so it cannot be interleaved in one process).
# 3. Digits: van_b0 @32 training steps, none vs nhwc vs nhwc_lka interleaved, RUNS processes.
# 4. Inference (validate.py, predict.py): van_b0 @224 batch 32 forward passes, the same three, RUNS processes.
# Each run's ratios are printed by benchmark.py; --summarize prints them together at the end.
# For a cold compile in the first process, point TORCHINDUCTOR_CACHE_DIR at an empty folder.
# AVX2-only CPUs can be emulated on an AVX-512 one: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 bash ...
set -u
cd "$(dirname "$0")/.."
OUT=${1:-output/bench_cpu_auto}
RUNS=${2:-3}
PY=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-5}
mkdir -p "$OUT"
for i in $(seq 1 "$RUNS"); do
    "$PY" benchmark.py --model van_b0 --img-size 224 -b 32 --mode train --compare none,nhwc,nhwc_lka \
        --warmup 2 --steps "$STEPS" --malloc retain --no-memory --json-out "$OUT/kernels_224_$i.json" \
        | tail -6
done
for i in $(seq 1 "$RUNS"); do
    for policy in default retain; do
        "$PY" benchmark.py --model van_b0 --img-size 224 -b 32 --mode train --config none --warmup 2 \
            --steps "$STEPS" --malloc "$policy" --no-memory --json-out "$OUT/malloc_${policy}_$i.json" | tail -3
    done
done
for i in $(seq 1 "$RUNS"); do
    "$PY" benchmark.py --model van_b0 --img-size 32 -b 32 --mode train --compare none,nhwc,nhwc_lka \
        --warmup 3 --steps 20 --malloc retain --no-memory --json-out "$OUT/kernels_32_$i.json" | tail -6
done
for i in $(seq 1 "$RUNS"); do
    "$PY" benchmark.py --model van_b0 --img-size 224 -b 32 --mode infer --compare none,nhwc,nhwc_lka \
        --warmup 2 --steps "$STEPS" --malloc retain --no-memory --json-out "$OUT/infer_224_$i.json" | tail -6
done
"$PY" benchmark.py --summarize "$OUT"/*.json
