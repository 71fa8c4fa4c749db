#!/bin/bash
# 1 device, accuracy: VAN-B2 (van_base), 128 images per device, lr 1e-3, drop path 0.1, AMP,
# --epochs (300) + 10 cooldown epochs, evaluated every epoch; Final Train Accuracy is the best top-1.
# An unfinished run of this script in the output folder is resumed (RESUME=0 starts afresh).
#     bash test/train_full_1p.sh --data_path=/data/imagenet [--device_id=0] [--batch_size=128] [--epochs=300]
# Overrides (CPU, CI): NPROC MODEL BATCH_SIZE EPOCHS MAX_STEPS IMG_SIZE DEVICE AMP WORKERS RESUME OUTPUT_ROOT.
# shellcheck source=test/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
van_init full 1 "$@"
RESUME=${RESUME:-1}
van_prepare_run_dir "$RESUME"
if [[ $RESUME == 1 ]]; then van_run_train --resume auto; else van_run_train; fi
van_report
