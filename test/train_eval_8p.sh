#!/bin/bash
# 8 devices, evaluation: torchrun --nproc_per_node=$NPROC (8) validate.py on the val/ split (each device a shard,
# exact counts), with the model, image size and preprocessing the checkpoint was trained with (MODEL, IMG_SIZE
# override them).
#     bash test/train_eval_8p.sh DATA_PATH CKPT_PATH
#     bash test/train_eval_8p.sh --data_path=DATA_PATH --pth_path=CKPT_PATH
# CKPT_PATH: a .pth.tar file, or a run folder (its model_best.pth.tar, else last.pth.tar).
# Overrides (CPU, CI): NPROC MODEL BATCH_SIZE IMG_SIZE DEVICE AMP WORKERS OUTPUT_ROOT (README.md, "Launch scripts").
# shellcheck source=test/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
VAN_DISTRIBUTED=1
van_init eval 8 "$@"
van_prepare_run_dir 0
van_run_eval
van_report
