#!/bin/bash
# 1 device, fine-tuning: start from --pth_path= (a checkpoint of these scripts or the official VAN weights) on a
# data set that may have another number of classes: every weight is loaded except the classifier head, which
# is re-initialized when its number of classes differs. VAN-B2 (van_base), 128 per device, lr 1e-3, AMP,
# --epochs (30) + 10 cooldown epochs, evaluated every epoch; Final Train Accuracy is the best top-1.
#     bash test/train_finetune_1p.sh --data_path=/data/my_set --pth_path=/path/model_best.pth.tar [--epochs=30]
# Overrides (CPU, CI): NPROC MODEL BATCH_SIZE EPOCHS MAX_STEPS IMG_SIZE DEVICE AMP WORKERS LR OUTPUT_ROOT.
# shellcheck source=test/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
van_init finetune 1 "$@"
van_prepare_run_dir 0
van_run_train --initial-checkpoint "$pth_path"
van_report
