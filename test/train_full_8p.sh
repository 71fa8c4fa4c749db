#!/bin/bash
# 8 devices, accuracy: torchrun --nproc_per_node=$NPROC (8) --max-restarts=$MAX_RESTARTS (3), VAN-B2 (van_base),
# 128 images per device (global 1024), lr 1e-3, drop path 0.1, AMP, --epochs (300) + 10 cooldown epochs,
# evaluated every epoch; Final Train Accuracy is the best top-1.
# train.py runs with --resume auto: a restarted worker group, or a rerun of this script after a crash, continues
# from the newest checkpoint of the run (RESUME=0 starts afresh; RECOVERY_INTERVAL=N also saves every N steps).
#     bash test/train_full_8p.sh --data_path=/data/imagenet [--batch_size=128] [--epochs=300]
# Overrides (CPU, CI): NPROC MODEL BATCH_SIZE EPOCHS MAX_STEPS IMG_SIZE DEVICE AMP WORKERS RESUME MAX_RESTARTS.
# shellcheck source=test/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
VAN_DISTRIBUTED=1
van_init full 8 "$@"
RESUME=${RESUME:-1}
VAN_MAX_RESTARTS=${MAX_RESTARTS:-3}
van_check_int MAX_RESTARTS "$VAN_MAX_RESTARTS" 0
van_prepare_run_dir "$RESUME"
args=()
if [[ $RESUME == 1 ]]; then args+=(--resume auto); fi
if [[ -n $RECOVERY_INTERVAL ]]; then args+=(--recovery-interval "$RECOVERY_INTERVAL"); fi
van_run_train "${args[@]}"
van_report
