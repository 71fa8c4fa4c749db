"""Command-line options shared by the CLIs, each declared once, and the one way every CLI parses and runs.

The option groups below are added to each CLI's parser by `add_options(parser, 'model', 'data', ...)`; a CLI
declares only the options that are its own. `-c/--config FILE.yaml` supplies defaults (keys are the options'
dest names) that the command line still overrides. `run_cli` turns user errors into one line and an exit status.
"""
import argparse
import os
import sys

import yaml

from .device import AMP_DTYPES, DEVICE_CHOICES


class UsageError(ValueError):
    """Bad user input; printed as one line and exit status 2."""


def _model(g):
    g.add_argument('--model', '-m', default=None,
                   help='van_b0..van_b6, van_tiny/small/base/large (default: the checkpoint\'s model, else van_b0)')
    g.add_argument('--pretrained', action='store_true', help='start from the official ImageNet weights')
    g.add_argument('--pretrained-path', default='', help='local file of the official weights (offline)')
    g.add_argument('--num-classes', type=int, default=None,
                   help='default: from the checkpoint, else the number of class folders')
    g.add_argument('--in-chans', type=int, default=None, help='input channels (default 3)')
    g.add_argument('--trust-checkpoint', action='store_true',
                   help='allow checkpoints that need full unpickling (can run code: only for files you trust)')


def _speed(g):
    g.add_argument('--fast-path', default='auto',
                   help='how the model\'s ops execute: auto picks what measured fastest for the device and input '
                        'size (docs/PERFORMANCE.md); none is the reference\'s execution')
    g.add_argument('--compile', action='store_true', help='torch.compile the model')


def _input(g):
    g.add_argument('--img-size', type=int, default=None,
                   help='input image size (default: the checkpoint\'s training size, else the model\'s, 224)')
    g.add_argument('--input-size', type=int, nargs=3, default=None, metavar='N', help='C H W, overrides --img-size')
    g.add_argument('--crop-pct', type=float, default=None, help='eval center-crop fraction (default: the model\'s)')
    g.add_argument('--mean', type=float, nargs='+', default=None)
    g.add_argument('--std', type=float, nargs='+', default=None)
    g.add_argument('--interpolation', default='', help='eval resize interpolation (default: the model\'s, bicubic)')
    g.add_argument('--class-map', default='', help='text file: one class folder name per line, in index order')
    g.add_argument('-b', '--batch-size', type=int, default=128, help='per device')


def _loader(g):
    g.add_argument('--dataset', '-d', default='folder', help='folder (ImageFolder tree) or synthetic (random tensors)')
    g.add_argument('-j', '--workers', type=int, default=None,
                   help='data loader processes per device (default: the CPUs available per process, at most 8)')
    g.add_argument('--pin-mem', action='store_true')


def _device(g):
    g.add_argument('--device', default='auto', choices=DEVICE_CHOICES)
    g.add_argument('--amp', action='store_true',
                   help='mixed precision: float16 + loss scaling on cuda/npu; bfloat16 on a CPU with native bf16 '
                        '(fp32 otherwise)')
    g.add_argument('--amp-dtype', default=None, choices=tuple(AMP_DTYPES), help='force this autocast dtype')
    g.add_argument('--amp-impl', default='native', choices=('native', 'apex'))
    g.add_argument('--channels-last', action='store_true')
    g.add_argument('--seed', type=int, default=42)


def _checkpoint(g):
    g.add_argument('--checkpoint', default='', help='our checkpoint, an official .pth.tar or a .safetensors file')
    g.add_argument('--use-ema', action='store_true', help='the EMA weights of the checkpoint')


_GROUPS = {'model': _model, 'speed': _speed, 'input': _input, 'loader': _loader, 'device': _device,
           'checkpoint': _checkpoint}


def add_options(parser: argparse.ArgumentParser, *groups: str) -> argparse.ArgumentParser:
    """Add shared option groups (the keys of _GROUPS) to `parser`; returns it."""
    for name in groups:
        _GROUPS[name](parser.add_argument_group(name))
    return parser


def new_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file of option dest names -> values')
    return p


def parse_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse argv; values from `-c FILE.yaml` become defaults that the command line still overrides."""
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='')
    known, remaining = config_parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config(known.config, parser))
    args = parser.parse_args(remaining)
    args.config = known.config
    return args


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f'--config {path}: file not found')
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UsageError(f'--config {path}: not valid YAML ({str(e).splitlines()[0]})') from None
    if not isinstance(cfg, dict):
        raise UsageError(f'--config {path}: expected a mapping of option names to values')
    known = {a.dest for a in parser._actions}
    unknown = sorted(k for k in cfg if k not in known)
    if unknown:
        raise UsageError(f'--config {path}: unknown key(s) {", ".join(unknown)} '
                         f'(keys are option dest names, e.g. lr, weight_decay, drop_path)')
    return cfg


def run_cli(main, get_args_parser, argv=None) -> int:
    """Parse argv (with -c) with the parser that `get_args_parser()` builds, run main(args), and turn user errors
    into one line on stderr and a non-zero exit status instead of a traceback."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .device import DeviceError
    from .engine import NonFiniteLossError
    try:
        args = parse_with_config(get_args_parser(), argv)
        result = main(args)
        return result if isinstance(result, int) else 0
    except (UsageError, DataError, DeviceError, CheckpointError, NonFiniteLossError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2 if isinstance(e, (UsageError, DataError)) else 1
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
