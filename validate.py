#!/usr/bin/env python3
"""Evaluate a VAN checkpoint (this project's or the official .pth.tar) on an ImageFolder split.

    python validate.py DATA_DIR --model van_b2 --checkpoint model_best.pth.tar [--amp] [--use-ema]
    torchrun --nproc_per_node=8 validate.py DATA_DIR --model van_b2 --checkpoint ...   # sharded, exact counts
"""
import argparse
import json
import os
import sys

import torch

from models.fast_ops import compile_inference
from vancls import builders
from vancls.checkpoint import load_model_weights, read_checkpoint
from vancls.config import UsageError, run_cli
from vancls.data import build_datasets, build_loader
from vancls.device import Amp, DEVICE_CHOICES, cleanup_distributed, setup_distributed
from vancls.engine import evaluate
from vancls.reports import setup_logging, write_json


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='VAN evaluation', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file of option dest names -> values')
    p.add_argument('data_dir', metavar='DATA_DIR', help='ImageFolder root holding the split to evaluate')
    p.add_argument('--dataset', default='folder', help='folder or synthetic')
    p.add_argument('--split', dest='val_split', default='val', help='split folder (falls back to val/, validation/)')
    p.add_argument('--class-map', default='')
    p.add_argument('--model', default='van_b0', help='van_b0..van_b6, van_tiny/small/base/large')
    p.add_argument('--checkpoint', default='', help='our checkpoint or an official .pth.tar')
    p.add_argument('--pretrained', action='store_true', help='the official ImageNet weights')
    p.add_argument('--pretrained-path', default='')
    p.add_argument('--use-ema', action='store_true', help='evaluate the EMA weights of the checkpoint')
    p.add_argument('--num-classes', type=int, default=None, help='default: from the checkpoint, else the data')
    p.add_argument('--img-size', type=int, default=None)
    p.add_argument('--input-size', type=int, nargs=3, default=None)
    p.add_argument('--crop-pct', type=float, default=None)
    p.add_argument('--mean', type=float, nargs='+', default=None)
    p.add_argument('--std', type=float, nargs='+', default=None)
    p.add_argument('--interpolation', default='')
    p.add_argument('-b', '--batch-size', type=int, default=128)
    p.add_argument('-j', '--workers', type=int, default=4)
    p.add_argument('--pin-mem', action='store_true')
    p.add_argument('--device', default='auto', choices=DEVICE_CHOICES)
    p.add_argument('--amp', action='store_true')
    p.add_argument('--amp-dtype', default=None, choices=('float16', 'bfloat16'))
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--compile', action='store_true',
                   help='torch.compile the model (on CPU with Inductor freezing: weights as constants, see '
                        'models/fast_ops.compile_inference); fastest on CPU: --fast-path nhwc_lka --fuse --compile')
    p.add_argument('--fuse', action='store_true', help='fold BatchNorm and layer scale (inference-only model)')
    p.add_argument('--fast-path', default='none')
    p.add_argument('--trust-checkpoint', action='store_true')
    p.add_argument('--results-file', default='', help='write the metrics as JSON here')
    p.add_argument('--seed', type=int, default=42)
    return p


def main(args):
    builders.check_model_name(args.model)
    if not (args.checkpoint or args.pretrained):
        raise UsageError('give --checkpoint PATH (or --pretrained for the official weights)')
    env = setup_distributed(args.device)
    try:
        return _validate(args, env)
    finally:
        cleanup_distributed()


def _checkpoint_meta(ckpt) -> dict:
    """num_classes and class names stored in our checkpoints (official files have no class names)."""
    from vancls.checkpoint import clean_state_dict
    try:
        head = clean_state_dict(ckpt).get('head.weight')
    except ValueError:
        head = None
    return {'class_names': ckpt.get('class_names') if isinstance(ckpt, dict) else None,
            'num_classes': int(head.shape[0]) if head is not None else None}


def _validate(args, env):
    logger = setup_logging(None, env.is_main)
    amp = Amp(env.device, enabled=args.amp, dtype=args.amp_dtype)
    # Evaluation uses the train-time options the dataset builder expects, with no augmentation.
    args.train_split = 'train'
    args.validation_batch_size = args.batch_size
    data_config = builders.resolve_data_config(args)
    use_prefetcher = env.device.type != 'cpu' and args.dataset != 'synthetic'
    ckpt = read_checkpoint(args.checkpoint, args.trust_checkpoint) if args.checkpoint else None
    meta = _checkpoint_meta(ckpt) if ckpt is not None else {}
    class_names = meta.get('class_names')
    if args.dataset != 'synthetic' and not os.path.isdir(args.data_dir):
        raise UsageError(f'data directory not found: {args.data_dir}')
    # Our checkpoints carry their class names: evaluate in that order (the folders must hold the same classes).
    _, val_ds, data_classes = build_datasets(args, data_config, use_prefetcher, need_train=False,
                                             class_names=None if args.class_map else class_names)
    num_classes = args.num_classes or meta.get('num_classes') or len(data_classes)
    model = builders.create_model(args, num_classes, pretrained=args.pretrained and not args.checkpoint)
    if args.checkpoint:
        load_model_weights(model, args.checkpoint, use_ema=args.use_ema, checkpoint=ckpt)
    model.to(env.device).eval()
    if args.fast_path != 'none' and hasattr(model, 'set_fast_path'):
        model.set_fast_path(args.fast_path)  # before fuse(): the fused copy follows the model's fast path
    if args.fuse:
        if not hasattr(model, 'fuse'):
            raise UsageError('--fuse: this model has no fuse()')
        model = model.fuse()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        model = compile_inference(model, env.device.type)
    loader, _ = build_loader(val_ds, args.batch_size, env, is_training=False, workers=args.workers, seed=args.seed,
                             use_prefetcher=use_prefetcher, data_config=data_config, pin_memory=args.pin_mem)
    metrics = evaluate(model, loader, env, amp, args.channels_last)
    results = {'model': args.model, 'checkpoint': args.checkpoint, 'top1': metrics['top1'], 'top5': metrics['top5'],
               'loss': metrics['loss'], 'img_per_sec': metrics['img_per_sec'], 'num_images': metrics['num_images'],
               'bad_images': len(val_ds.bad_files), 'device': env.device.type, 'world_size': env.world_size,
               'use_ema': args.use_ema}
    if env.is_main:
        logger.info(json.dumps(results, indent=2))
        if args.results_file:
            write_json(results, args.results_file)
    return results


if __name__ == '__main__':
    sys.exit(run_cli(main, get_args_parser))
