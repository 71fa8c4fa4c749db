#!/bin/bash
# 1 device, fine-tuning: start from --pth_path= (a checkpoint of these scripts or the official VAN weights) on a
# data set that may have another number of classes: every weight is loaded except the classifier head, which is
# re-initialized when its number of classes differs, at 0.001 x the usual scale. The hyperparameters are the 384 px
# fine-tuning recipe (configs/van_b2_ft384.yaml): 384 px, 16 per device, lr 5e-5, weight decay 1e-8, no mixup or
# cutmix, no warm-up and no cooldown, --epochs (30); the checkpoint's model (MODEL overrides it), AMP, evaluated
# every epoch; Final Train Accuracy is the best top-1. The recipe's global batch is 512 (4 x 8 devices x 16):
# train.py warns that 16 differs and names the fixes, e.g. `-- --grad-accum-steps 32` to keep the recipe on one
# device.
#     bash test/train_finetune_1p.sh --data_path=/data/my_set --pth_path=/path/model_best.pth.tar [--epochs=30]
# Overrides (CPU, CI): NPROC MODEL BATCH_SIZE EPOCHS MAX_STEPS IMG_SIZE DEVICE AMP WORKERS LR OUTPUT_ROOT; anything
# after `--` goes to train.py and wins over the recipe file.
LR=${LR:-5e-5}
BATCH_SIZE=${BATCH_SIZE:-16}
IMG_SIZE=${IMG_SIZE:-384}
# shellcheck source=test/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
van_init finetune 1 "$@"
van_prepare_run_dir 0
van_run_train -c "$VAN_ROOT/configs/van_b2_ft384.yaml" --initial-checkpoint "$pth_path"
van_report
