#!/usr/bin/env python3
"""Classify images with a trained VAN: top-k class names and probabilities per image.

    python predict.py IMG_OR_DIR [IMG_OR_DIR ...] --checkpoint output/EXP/model_best.pth.tar [--topk 5] [--json]
    python predict.py photos/ --model van_b2 --pretrained            # official ImageNet weights (class indices)

Directories are walked (image files by extension); files named on the command line are always tried.
An unreadable file is reported on stderr by name and skipped; the exit status is 1 when nothing could be read.
The checkpoint's class names, model name and training input size are used unless given here. Inference runs on
the fused model (BatchNorm and layer scales folded into the convolutions; --no-fuse runs the plain model).
"""
import json
import os
import sys

import torch

from vancls import builders
from vancls.config import UsageError, add_options, new_parser, run_cli
from vancls.data import build_transform
from vancls.samples import IMG_EXTENSIONS, open_rgb
from vancls.device import Amp, setup_distributed


def get_args_parser():
    p = new_parser('VAN prediction')
    p.add_argument('inputs', nargs='+', metavar='IMG_OR_DIR', help='image files and/or folders (walked)')
    add_options(p, 'model', 'checkpoint', 'input', 'speed', 'device')
    p.add_argument('--topk', type=int, default=5)
    p.add_argument('--json', action='store_true', help='print one JSON document instead of text')
    return p


def collect_files(inputs):
    """(image paths in command-line order, directories walked in sorted order, [(path, error)] for missing paths)."""
    files, errors = [], []
    for item in inputs:
        if os.path.isdir(item):
            found = []
            for dirpath, dirnames, filenames in os.walk(item, followlinks=True):
                dirnames.sort()
                found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS)]
            if not found:
                errors.append((item, 'folder holds no image files'))
            files += found
        elif os.path.isfile(item):
            files.append(item)
        else:
            errors.append((item, 'no such file or folder'))
    return files, errors


def main(args):
    if args.topk < 1 or args.batch_size < 1:
        raise UsageError('--topk and --batch-size must be >= 1')
    device = setup_distributed(args.device).device  # one process: selects the device (CPU allocator policy too)
    amp = Amp(device, enabled=args.amp, dtype=args.amp_dtype)
    model, meta, data_config = builders.load_trained_model(args)
    for note in meta['notes']:
        print(note, file=sys.stderr)
    files, errors = collect_files(args.inputs)
    model = builders.prepare_inference(model, args, device, -(-len(files) // args.batch_size),
                                       data_config['input_size'][-1], amp)
    transform = build_transform(args, data_config, is_training=False, use_prefetcher=False)
    names, k = meta['class_names'], min(args.topk, meta['num_classes'])

    for path, err in errors:
        print(f'warning: {path}: {err}', file=sys.stderr)
    predictions = []
    for start in range(0, len(files), args.batch_size):
        batch, paths = [], []
        for path in files[start:start + args.batch_size]:
            try:
                batch.append(transform(open_rgb(path)))
                paths.append(path)
            except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError
                errors.append((path, f'{type(e).__name__}: {e}'))
                print(f'warning: skipped unreadable image {path} ({type(e).__name__}: {e})', file=sys.stderr)
        if not batch:
            continue
        inputs = torch.stack(batch).to(device)
        if args.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), amp.autocast():
            probs = model(inputs).float().softmax(dim=-1)
        top_p, top_i = probs.topk(k, dim=-1)
        for path, ps, idxs in zip(paths, top_p.tolist(), top_i.tolist()):
            pred = {'path': path, 'topk': [{'class': names[i], 'index': i, 'prob': p} for p, i in zip(ps, idxs)]}
            predictions.append(pred)
            if not args.json:
                print(path)
                for rank, t in enumerate(pred['topk'], 1):
                    print(f'  {rank}. {100 * t["prob"]:6.2f}%  {t["class"]}')
    if args.json:
        source = args.checkpoint or ('pretrained' if args.pretrained else args.model)  # or --model local-dir:DIR
        print(json.dumps({'model': meta['model'], 'checkpoint': source,
                          'input_size': list(data_config['input_size']), 'fused': args.fuse,
                          'predictions': predictions,
                          'errors': [{'path': p, 'error': e} for p, e in errors]}, indent=2))
    if not predictions:
        print(f'error: none of the {len(files) or len(args.inputs)} input(s) could be read as an image',
              file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(run_cli(main, get_args_parser))
