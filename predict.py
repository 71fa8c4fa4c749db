#!/usr/bin/env python3
"""Classify images with a trained VAN: top-k class names and probabilities per image.

    python predict.py IMG_OR_DIR [IMG_OR_DIR ...] --checkpoint output/EXP/model_best.pth.tar [--topk 5] [--json]
    python predict.py photos/ --model van_b2 --pretrained            # official ImageNet weights (class indices)

Directories are walked (image files by extension); files named on the command line are always tried.
An unreadable file is reported on stderr by name and skipped; the exit status is 1 when nothing could be read.
The checkpoint's class names, model name and training input size are used unless given here. Inference runs on
the fused model (BatchNorm and layer scales folded into the convolutions; --no-fuse runs the plain model).
"""
import argparse
import json
import os
import sys
from types import SimpleNamespace

import torch

from models.fast_ops import compile_inference
from vancls import builders
from vancls.checkpoint import clean_state_dict, load_checkpoint_file, load_model_weights
from vancls.config import UsageError, parse_with_config, run_cli
from vancls.data import IMG_EXTENSIONS, build_transform, load_class_map, open_rgb
from vancls.device import DEVICE_CHOICES, setup_distributed

# Data options that default to the values the model was trained with (saved in our checkpoints' `args`).
_DATA_KEYS = ('input_size', 'img_size', 'crop_pct', 'mean', 'std', 'interpolation')


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='VAN prediction', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file of option dest names -> values')
    p.add_argument('inputs', nargs='+', metavar='IMG_OR_DIR', help='image files and/or folders (walked)')
    p.add_argument('--model', default='', help='default: the checkpoint\'s model')
    p.add_argument('--checkpoint', default='', help='our .pth.tar, an official .pth.tar or an exported .safetensors')
    p.add_argument('--pretrained', action='store_true', help='the official ImageNet weights (no --checkpoint)')
    p.add_argument('--use-ema', action='store_true', help='the EMA weights of the checkpoint')
    p.add_argument('--class-map', default='', help='text file of class names, one per line (default: checkpoint\'s)')
    p.add_argument('--topk', type=int, default=5)
    p.add_argument('--img-size', type=int, default=None, help='default: the training size saved in the checkpoint')
    p.add_argument('--input-size', type=int, nargs=3, default=None, metavar='N')
    p.add_argument('--crop-pct', type=float, default=None)
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('--device', default='auto', choices=DEVICE_CHOICES)
    p.add_argument('--fast-path', default='auto', help='execution mode of the fused model (see models/fast_ops.py)')
    p.add_argument('--no-fuse', action='store_true', help='run the unfused model')
    p.add_argument('--compile', action='store_true', help='torch.compile the model (Inductor freezing on CPU)')
    p.add_argument('--json', action='store_true', help='print one JSON document instead of text')
    p.add_argument('--trust-checkpoint', action='store_true')
    return p


def checkpoint_meta(path: str, trust: bool = False) -> dict:
    """model name, num_classes, class names and training args stored with the weights (where there are any)."""
    if path.endswith('.safetensors'):
        from safetensors import safe_open
        try:
            with safe_open(path, framework='pt') as f:
                md = f.metadata() or {}
                head = f.get_slice('head.weight').get_shape() if 'head.weight' in f.keys() else None
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError
            raise UsageError(f'{path}: not a readable safetensors file ({type(e).__name__}: {e})') from None
        return {'arch': md.get('model'), 'num_classes': int(head[0]) if head else None,
                'class_names': json.loads(md['class_names']) if md.get('class_names') else None,
                'args': json.loads(md['data_args']) if md.get('data_args') else {}}
    ckpt = load_checkpoint_file(path, trust=trust)
    try:
        head = clean_state_dict(ckpt).get('head.weight')
    except ValueError:
        head = None
    ckpt = ckpt if isinstance(ckpt, dict) else {}
    return {'arch': ckpt.get('arch'), 'num_classes': int(head.shape[0]) if head is not None else None,
            'class_names': ckpt.get('class_names'), 'args': ckpt.get('args') or {}}


def load_trained_model(args):
    """(model in eval mode on the CPU, meta, data_config) from --checkpoint / --pretrained and the data options.

    meta: model (name), num_classes, class_names (list of str, or indices as str when the file has none),
    and `data_args`, the data options used (the command line's, else the checkpoint's training values).
    """
    if not (args.checkpoint or args.pretrained):
        raise UsageError('give --checkpoint PATH (or --pretrained for the official weights)')
    meta = checkpoint_meta(args.checkpoint, args.trust_checkpoint) if args.checkpoint else \
        {'arch': None, 'num_classes': None, 'class_names': None, 'args': {}}
    name = args.model or meta['arch']
    if not name:
        raise UsageError(f'{args.checkpoint} does not name its model: give --model (van_b0 .. van_b6)')
    builders.check_model_name(name)
    class_names = load_class_map(args.class_map) if getattr(args, 'class_map', '') else meta['class_names']
    num_classes = meta['num_classes'] or (len(class_names) if class_names else 1000)
    if class_names is not None and len(class_names) != num_classes:
        raise UsageError(f'{len(class_names)} class names for a model with {num_classes} classes')
    build_args = SimpleNamespace(model=name, trust_checkpoint=args.trust_checkpoint, pretrained_path='')
    model = builders.create_model(build_args, num_classes, pretrained=args.pretrained and not args.checkpoint)
    if args.checkpoint:
        load_model_weights(model, args.checkpoint, trust=args.trust_checkpoint, use_ema=getattr(args, 'use_ema', False))
    model.eval()
    data_args = {}
    for key in _DATA_KEYS:
        value = getattr(args, key, None)
        data_args[key] = value if value not in (None, '') else meta['args'].get(key)
    if getattr(args, 'input_size', None) or getattr(args, 'img_size', None):  # a size given here wins outright
        data_args['input_size'] = getattr(args, 'input_size', None)
        data_args['img_size'] = getattr(args, 'img_size', None)
    data_config = builders.resolve_data_config(SimpleNamespace(model=name, **data_args))
    return model, {'model': name, 'num_classes': num_classes, 'data_args': data_args,
                   'class_names': [str(c) for c in class_names] if class_names else
                   [str(i) for i in range(num_classes)]}, data_config


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
    model, meta, data_config = load_trained_model(args)
    model.to(device)
    if hasattr(model, 'set_fast_path'):
        try:
            model.set_fast_path(args.fast_path)
        except ValueError as e:
            raise UsageError(f'--fast-path: {e}') from None
    if not args.no_fuse and hasattr(model, 'fuse'):
        model = model.fuse()
    if args.compile:
        model = compile_inference(model, device.type)
    transform = build_transform(args, data_config, is_training=False, use_prefetcher=False)
    names, k = meta['class_names'], min(args.topk, meta['num_classes'])

    files, errors = collect_files(args.inputs)
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
        with torch.no_grad():
            probs = model(torch.stack(batch).to(device)).float().softmax(dim=-1)
        top_p, top_i = probs.topk(k, dim=-1)
        for path, ps, idxs in zip(paths, top_p.tolist(), top_i.tolist()):
            pred = {'path': path, 'topk': [{'class': names[i], 'index': i, 'prob': p} for p, i in zip(ps, idxs)]}
            predictions.append(pred)
            if not args.json:
                print(path)
                for rank, t in enumerate(pred['topk'], 1):
                    print(f'  {rank}. {100 * t["prob"]:6.2f}%  {t["class"]}')
    if args.json:
        print(json.dumps({'model': meta['model'], 'checkpoint': args.checkpoint or 'pretrained',
                          'input_size': list(data_config['input_size']), 'fused': not args.no_fuse,
                          'predictions': predictions,
                          'errors': [{'path': p, 'error': e} for p, e in errors]}, indent=2))
    if not predictions:
        print(f'error: none of the {len(files) or len(args.inputs)} input(s) could be read as an image',
              file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(run_cli(main, parse_with_config(get_args_parser())))
