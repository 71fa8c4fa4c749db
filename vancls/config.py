"""Command-line options shared by the CLIs, each declared once, their defaults in one table, and the one way every
CLI parses and runs.

The option groups below are added to each CLI's parser by `add_options(parser, 'model', 'data', ...)`; a CLI
declares only the options that are its own. Every default that more than one place reads is in DEFAULTS (the
parsers, benchmark.py's parser, code that reads an option some parser lacks: `option(args, name)`); the launch
scripts' defaults (test/common.sh) are checked against it by tests/test_structure.py, and where the scripts train
another recipe on purpose, SCRIPT_RECIPE says so. `-c/--config FILE.yaml` supplies defaults (keys are the options'
dest names) that the command line still overrides. `run_cli` turns user errors (vancls/errors.py) into one line and
an exit status.
"""
import argparse
import os
import sys

import yaml

from models.fast_ops import FAST_PATH_MODES
from models.van import default_cfgs
from .device import AMP_DTYPES, DEVICE_CHOICES
from .errors import USER_ERRORS, UsageError, exit_status  # UsageError: importable from here too
from .preempt import DEFAULT_SIGNALS

# The default of every option read in more than one place, by dest name. None means "decided when the run starts",
# as the option's help says (e.g. --model: the checkpoint's model, else DEFAULT_MODEL). A parser declares
# `default=DEFAULTS['x']`; code reading an option that not every CLI declares uses `option(args, 'x')`.
DEFAULTS = {
    # model
    'model': None, 'pretrained': False, 'pretrained_path': '', 'num_classes': None, 'in_chans': None,
    'trust_checkpoint': False, 'drop': 0.0, 'drop_path': 0.1, 'head_init_scale': None,
    # speed
    'fast_path': 'auto', 'fuse': True, 'compile': None,
    # input
    'img_size': None, 'input_size': None, 'crop_pct': None, 'mean': None, 'std': None, 'interpolation': '',
    'class_map': '', 'batch_size': 128,
    # loader
    'dataset': 'folder', 'workers': None, 'pin_mem': False, 'val_split': 'val',
    # device
    'device': 'auto', 'amp': False, 'amp_dtype': None, 'amp_impl': 'native', 'channels_last': False, 'seed': 42,
    # checkpoint
    'checkpoint': '', 'use_ema': False,
    # training (train.py; the launch scripts pass these)
    'epochs': 300, 'cooldown_epochs': 10, 'lr': None, 'max_steps': None, 'opt': 'adamw', 'opt_impl': 'auto',
    'preempt_signals': DEFAULT_SIGNALS,
}
DEFAULT_MODEL = 'van_b0'  # --model when neither it nor the checkpoint names a model
DEFAULT_IMG_SIZE = default_cfgs[DEFAULT_MODEL]['input_size'][-1]  # --img-size without a checkpoint: the model's

# What the launch scripts (test/common.sh) train where it is not the CLIs' default, on purpose: the Ascend port's
# recipe (van_base with mixed precision), and per script mode its length. Every other default of the scripts is
# DEFAULTS' (tests/test_structure.py parses common.sh and checks both).
SCRIPT_RECIPE = {
    'all': {'model': 'van_base', 'amp': True},
    'finetune': {'epochs': 30},  # train_finetune_1p.sh: a fine-tuning run
    'perf': {'max_steps': 500},  # train_performance_*.sh: one short epoch
}


def option(args: argparse.Namespace, name: str):
    """args.name, or DEFAULTS[name] when this CLI's parser does not declare the option."""
    return getattr(args, name, DEFAULTS[name])


def _model(g):
    g.add_argument('--model', '-m', default=DEFAULTS['model'],
                   help=f'van_b0..van_b6, van_tiny/small/base/large (default: the checkpoint\'s model, else '
                        f'{DEFAULT_MODEL})')
    g.add_argument('--pretrained', action='store_true', help='start from the official ImageNet weights')
    g.add_argument('--pretrained-path', default=DEFAULTS['pretrained_path'],
                   help='local file of the official weights (offline)')
    g.add_argument('--num-classes', type=int, default=DEFAULTS['num_classes'],
                   help='default: from the checkpoint, else the number of class folders')
    g.add_argument('--in-chans', type=int, default=DEFAULTS['in_chans'], help='input channels (default: 3)')
    g.add_argument('--trust-checkpoint', action='store_true',
                   help='allow checkpoints that need full unpickling (can run code: only for files you trust)')


def _speed(g):
    g.add_argument('--fast-path', default=DEFAULTS['fast_path'],
                   help=f'how the model\'s ops execute: {", ".join(FAST_PATH_MODES)} (none: the reference\'s '
                        f'execution; auto: what measured fastest for the device, the run\'s length and the input '
                        f'size; models/fast_ops.py, docs/PERFORMANCE.md)')
    g.add_argument('--fuse', action=argparse.BooleanOptionalAction, default=DEFAULTS['fuse'],
                   help='inference (validate.py, predict.py, train.py\'s evaluation): fold BatchNorm and layer scales '
                        'into the convolutions (VAN.fuse(): same logits within float rounding, fewer ops); '
                        '--no-fuse runs the trained modules as they are (with --fast-path none: the reference\'s '
                        'execution exactly)')
    g.add_argument('--compile', action=argparse.BooleanOptionalAction, default=DEFAULTS['compile'],
                   help='torch.compile the model (validate.py, predict.py: with its weights frozen, for batches of '
                        '--batch-size). Default: train.py does not compile; the inference CLIs compile where '
                        '--fast-path auto predicts the compile pays for itself on the job (long CPU evaluations; '
                        'docs/PERFORMANCE.md); --no-compile never compiles')


def _input(g):
    g.add_argument('--img-size', type=int, default=DEFAULTS['img_size'],
                   help=f'input image size (default: the checkpoint\'s training size, else the model\'s, '
                        f'{DEFAULT_IMG_SIZE})')
    g.add_argument('--input-size', type=int, nargs=3, default=DEFAULTS['input_size'], metavar='N',
                   help='C H W, overrides --img-size')
    g.add_argument('--crop-pct', type=float, default=DEFAULTS['crop_pct'],
                   help='eval center-crop fraction (default: the checkpoint\'s, else the model\'s)')
    g.add_argument('--mean', type=float, nargs='+', default=DEFAULTS['mean'], metavar='M',
                   help='per-channel normalization mean (default: the checkpoint\'s, else the model\'s, ImageNet\'s)')
    g.add_argument('--std', type=float, nargs='+', default=DEFAULTS['std'], metavar='S',
                   help='per-channel normalization std (default: the checkpoint\'s, else the model\'s, ImageNet\'s)')
    g.add_argument('--interpolation', default=DEFAULTS['interpolation'],
                   help='eval resize interpolation (default: the checkpoint\'s, else the model\'s, bicubic)')
    g.add_argument('--class-map', default=DEFAULTS['class_map'],
                   help='text file: one class folder name per line, in index order')
    g.add_argument('-b', '--batch-size', type=int, default=DEFAULTS['batch_size'],
                   help='images per device and step')


def _loader(g):
    g.add_argument('--dataset', '-d', default=DEFAULTS['dataset'],
                   help='folder (or \'\'): DATA_DIR is an ImageFolder tree, a .tar of one, or WebDataset shards (a '
                        'folder with _info.json, a brace pattern or a URL); wds/NAME, hfds/NAME, hfids/NAME, '
                        'torch/NAME, tfds/NAME: timm\'s readers (README, "Data at scale"); synthetic: random tensors')
    g.add_argument('-j', '--workers', type=int, default=DEFAULTS['workers'],
                   help='data loader processes per device (default: the CPUs available per process, at most 8)')
    g.add_argument('--pin-mem', action='store_true', help='page-locked host memory for the loader\'s batches')


def _device(g):
    g.add_argument('--device', default=DEFAULTS['device'], choices=DEVICE_CHOICES,
                   help='cuda, npu, cpu, or auto: an accelerator that is usable, else the CPU (the order: '
                        'vancls/device.py)')
    g.add_argument('--amp', action='store_true',
                   help='mixed precision: float16 + loss scaling on cuda/npu; bfloat16 on a CPU with native bf16 '
                        '(fp32 otherwise)')
    g.add_argument('--amp-dtype', default=DEFAULTS['amp_dtype'], choices=tuple(AMP_DTYPES),
                   help='force this autocast dtype (default: as --amp says)')
    g.add_argument('--amp-impl', default=DEFAULTS['amp_impl'], choices=('native', 'apex'),
                   help='native: torch.autocast; apex: NVIDIA apex O1 (train.py, needs apex)')
    g.add_argument('--channels-last', action='store_true', help='channels_last memory for the model and its input')
    g.add_argument('--seed', type=int, default=DEFAULTS['seed'],
                   help='seed of every random stream (weights, augmentation, loader order, sampling)')


def _checkpoint(g):
    g.add_argument('--checkpoint', default=DEFAULTS['checkpoint'],
                   help='our checkpoint, an official .pth.tar or a .safetensors file')
    g.add_argument('--use-ema', action='store_true', help='the EMA weights of the checkpoint')


_GROUPS = {'model': _model, 'speed': _speed, 'input': _input, 'loader': _loader, 'device': _device,
           'checkpoint': _checkpoint}


def add_options(parser: argparse.ArgumentParser, *groups: str) -> argparse.ArgumentParser:
    """Add shared option groups (the keys of _GROUPS) to `parser`; returns it."""
    for name in groups:
        _GROUPS[name](parser.add_argument_group(name))
    return parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's '(default: X)' after each help text, except where the text states the default itself (it says
    'default') or there is none to state (None, '', a flag's False): no line shows two defaults."""

    def _get_help_string(self, action):
        text = action.help or ''
        if 'default' in text or action.default is None or action.default is False or action.default == '':
            return text
        return super()._get_help_string(action)


def new_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file of option dest names -> values')
    return p


def parse_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse argv; values from `-c FILE.yaml` become defaults that the command line still overrides. A parser with
    an `implied_config(args) -> path or ''` attribute names the file when argv gives no -c (train.py: the demo
    recipe when no DATA_DIR is given)."""
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='')
    known, remaining = config_parser.parse_known_args(argv)
    implied = getattr(parser, 'implied_config', None)  # a CLI's config for a command line that names none
    if not known.config and implied is not None:
        known.config = implied(parser.parse_known_args(remaining)[0])
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
    into one line on stderr and a non-zero exit status instead of a traceback (vancls/errors.py)."""
    try:
        args = parse_with_config(get_args_parser(), argv)
        result = main(args)
        return result if isinstance(result, int) else 0
    except USER_ERRORS as e:
        print(f'error: {e}', file=sys.stderr)
        return exit_status(e)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
