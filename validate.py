#!/usr/bin/env python3
"""Evaluate a VAN checkpoint (this project's, the reference's or the official .pth.tar) on an ImageFolder split.

    python validate.py DATA_DIR --checkpoint model_best.pth.tar [--amp] [--use-ema]
    torchrun --nproc_per_node=8 validate.py DATA_DIR --checkpoint ...   # sharded, exact counts

The model, class names and preprocessing are the checkpoint's unless given (vancls/builders.load_trained_model).
"""
import json
import math
import sys

from vancls import builders, reference_compat
from vancls.config import DEFAULTS, UsageError, add_options, new_parser, run_cli
from vancls.data import build_datasets, build_loader
from vancls.device import Amp, cleanup_distributed, default_workers, leave_together, setup_distributed
from vancls.engine import evaluate
from vancls.reports import setup_logging, write_json


def get_args_parser():
    p = new_parser('VAN evaluation')
    p.add_argument('data_dir', metavar='DATA_DIR', help='ImageFolder root holding the split to evaluate')
    p.add_argument('--split', dest='val_split', default=DEFAULTS['val_split'], help='split folder (falls back to val/, validation/)')
    add_options(p, 'model', 'checkpoint', 'input', 'loader', 'speed', 'device')
    p.add_argument('--results-file', default='', help='write the metrics as JSON here')
    return reference_compat.add_reference_options(p, 'validate')


def main(args):
    reference_compat.apply_reference_options(args, 'validate')
    if not (args.checkpoint or args.pretrained or (args.model or '').startswith(builders.LOCAL_DIR)):
        raise UsageError('give --checkpoint PATH (or --pretrained for the official weights, or --model '
                         'local-dir:DIR for a folder of export.py --format timm)')
    env = setup_distributed(args.device)
    try:
        results = _validate(args, env)
        leave_together(env)
        return results
    finally:
        cleanup_distributed()


def _validate(args, env):
    logger = setup_logging(None, env.is_main)
    # The model, its class names and the preprocessing it was trained with: the one evaluation-model builder.
    model, meta, data_config = builders.load_trained_model(args)
    for note in meta['notes']:
        logger.info(note)
    args.model = meta['model']
    amp = Amp(env.device, enabled=args.amp, dtype=args.amp_dtype)
    # Evaluation uses the train-time options the dataset builder expects, with no augmentation.
    args.train_split, args.validation_batch_size = 'train', args.batch_size
    use_prefetcher = env.device.type != 'cpu' and args.dataset != 'synthetic' and not args.no_prefetcher
    # Our checkpoints carry their class names: evaluate in that order (the folders must hold the same classes).
    _, val_ds, _ = build_datasets(args, data_config, use_prefetcher, need_train=False,
                                  class_names=None if args.class_map else meta['stored_class_names'])
    num_classes = meta['num_classes']
    num_batches = math.ceil(len(val_ds) / (args.batch_size * env.world_size))
    model = builders.prepare_inference(model, args, env.device, num_batches, data_config['input_size'][-1], amp)
    model, finish_reference = reference_compat.eval_model(args, model, val_ds, env, num_classes)
    workers = default_workers() if args.workers is None else args.workers
    loader, _ = build_loader(val_ds, args.batch_size, env, is_training=False, workers=workers, seed=args.seed,
                             use_prefetcher=use_prefetcher, data_config=data_config, pin_memory=args.pin_mem)
    metrics = evaluate(model, loader, env, amp, args.channels_last)
    results = {'model': args.model, 'checkpoint': args.checkpoint, 'top1': metrics['top1'], 'top5': metrics['top5'],
               'loss': metrics['loss'], 'img_per_sec': metrics['img_per_sec'], 'num_images': metrics['num_images'],
               'bad_images': len(val_ds.bad_files), 'device': env.device.type, 'world_size': env.world_size,
               'use_ema': args.use_ema, 'amp_precision': amp.precision}
    finish_reference(results)  # --real-labels: top1/top5 become the ReaL accuracies
    if env.is_main:
        logger.info(json.dumps(results, indent=2))
        if args.results_file:
            write_json(results, args.results_file)
    return results


if __name__ == '__main__':
    sys.exit(run_cli(main, get_args_parser))
