#!/bin/bash
# 1 device, performance: VAN-B2 (van_base), 128 images per device, AMP, 1 epoch capped at MAX_STEPS (500) steps,
# no evaluation. FPS = global images / time of the steps after the first 5.
#     bash test/train_performance_1p.sh --data_path=/data/imagenet [--device_id=0] [--batch_size=128]
# Overrides (CPU, CI): NPROC MODEL BATCH_SIZE MAX_STEPS IMG_SIZE DEVICE AMP WORKERS OUTPUT_ROOT (README.md, "Launch scripts").
# shellcheck source=test/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
van_init perf 1 "$@"
van_prepare_run_dir 0
van_run_train --no-eval --checkpoint-hist 0
van_report
