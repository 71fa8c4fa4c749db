"""The reference's command lines on our CLIs: every option of its train.py and validate.py (timm 0.4.12's, which
VAN-Classification and the Ascend port keep) that ours do not declare.

`add_reference_options(parser, script)` adds them to train.py's or validate.py's parser (group "reference
compatibility"), with the reference's names, types and defaults; `apply_reference_options(args, script)`, called
first in main(), maps each to what this port does, or raises UsageError (one line: the reason and what to use
instead). REFERENCE_OPTIONS is the table. Options both sides have are ours; README ("Coming from the reference or
the port") lists where a default differs and why.

What the options then do lives with the concern it belongs to: the schedule options in
builders.create_scheduler, --bn-tf/--bn-momentum/--bn-eps in builders.configure_batchnorm, --log-wandb in
reports.with_wandb. Only validate.py's reference options that wrap the model (--torchscript, --valid-labels,
--real-labels: eval_model) stay here.
"""
import argparse
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .config import UsageError

_logger = logging.getLogger('vancls')

GROUP_TITLE = 'reference compatibility'
SCRIPTS = ('train', 'validate')
TRAIN, VALIDATE, BOTH = ('train',), ('validate',), SCRIPTS
_FLAG = {'action': 'store_true'}

# timm's TensorFlow-style BatchNorm values (--bn-tf): momentum 1 - 0.99, eps 1e-3.
BN_TF_MOMENTUM, BN_TF_EPS = 0.01, 1e-3


@dataclass(frozen=True)
class RefOption:
    """One reference option. `accepted`: the values that work unchanged here (the reference's default, or values
    with the same effect); any other value is refused with `refusal` (why, and what to use instead). Options
    without `accepted` are mapped by apply_reference_options."""
    flags: Tuple[str, ...]
    scripts: Tuple[str, ...]
    kwargs: Dict[str, Any]
    help: str
    accepted: Optional[tuple] = None
    refusal: str = ''

    @property
    def dest(self) -> str:
        return self.kwargs.get('dest') or self.flags[0].lstrip('-').replace('-', '_')


def _opt(flags, scripts, help, accepted=None, refusal='', **kwargs) -> RefOption:
    return RefOption(tuple(flags.split()), scripts, kwargs, help, accepted, refusal)


_AUGMIX = ('AugMix split augmentation (--aug-splits/--jsd-loss/--split-bn/--resplit) is not part of this port: its '
           'data pipeline makes one view per image; the VAN recipe does not use it, leave these off')

REFERENCE_OPTIONS: Tuple[RefOption, ...] = (
    # ---- precision, devices, launch
    _opt('--native-amp', BOTH, 'the reference\'s torch.cuda.amp: same as --amp --amp-dtype float16', **_FLAG),
    _opt('--apex-amp', BOTH, 'apex O1: --amp --amp-impl apex in train.py (needs apex); float16 autocast in '
         'validate.py (what O1 does at inference)', **_FLAG),
    _opt('--local-rank --local_rank', BOTH, 'passed by torch.distributed.launch (--local-rank on torch >= 2.0, '
         '--local_rank before); checked against LOCAL_RANK', type=int, default=None, dest='local_rank'),
    _opt('--num-gpu', VALIDATE, 'only 1: several devices are torchrun --nproc_per_node=N validate.py (sharded, '
         'exact counts)', accepted=(1,), refusal='validate.py uses one device per process (the reference used '
         'DataParallel); run torchrun --nproc_per_node=N validate.py ... instead', type=int, default=1),
    _opt('--no-prefetcher', BOTH, 'load batches without the device-side prefetcher (the CPU never has one)', **_FLAG),
    _opt('--use-multi-epochs-loader', TRAIN, 'accepted, no effect: it only kept loader workers alive between epochs '
         '(the same batches); workers here start each epoch so that they see the epoch\'s augmentation seeds',
         **_FLAG),
    _opt('--worker-seeding', TRAIN, 'all only: every loader stream is reseeded per sample from --seed',
         accepted=('all',), refusal='loader workers here reseed python, numpy and torch for every sample from --seed '
         '(reproducible with any worker count); drop the flag', default='all'),
    _opt('--no-ddp-bb', TRAIN, 'DDP without broadcast_buffers (BatchNorm statistics stay per rank until the '
         'end-of-epoch --dist-bn)', **_FLAG),
    _opt('--torchscript', BOTH, 'validate.py: torch.jit.script the model; train.py: refused, use --compile',
         **_FLAG),
    _opt('--legacy-jit', VALIDATE, 'the legacy TorchScript executor, as timm\'s set_jit_legacy (affects '
         '--torchscript only)', **_FLAG),
    _opt('--log-wandb', TRAIN, 'log each epoch\'s row (as summary.csv) to Weights & Biases; needs the wandb package',
         **_FLAG),
    _opt('--log-freq', VALIDATE, 'accepted, no effect: validate.py logs the totals once at the end', type=int,
         default=10),
    # ---- data
    _opt('--dataset-download', BOTH, 'download a torch/NAME or tfds/NAME (also hfids/) data set into DATA_DIR if it '
         'is not there, as timm\'s train.py (no effect on folders, tars and wds/ shards)', **_FLAG),
    _opt('--real-labels', VALIDATE, 'ImageNet-ReaL: top-1/top-5 against this real.json (the validation images must '
         'be named ILSVRC2012_val_<8 digits>.JPEG); the usual accuracies move to original_top1/original_top5',
         default=''),
    _opt('--valid-labels', VALIDATE, 'text file of class indices (one per line): score only these logits, in this '
         'order (ImageNet-A/-R style subsets; the folders are those classes)', default=''),
    _opt('--tf-preprocessing', VALIDATE, 'refused', accepted=(False,), refusal='TensorFlow-style preprocessing was '
         'for weights ported from TensorFlow; VAN\'s were trained with the PyTorch pipeline used here, drop the flag',
         **_FLAG),
    _opt('--test-pool', VALIDATE, 'refused', accepted=(False,), refusal='timm\'s test-time pooling head needs a '
         'model with a replaceable pooling layer; VAN averages its features over every position at any input size: '
         'evaluate a larger size with --img-size instead', **_FLAG),
    _opt('--tta', TRAIN, '0 only', accepted=(0,), refusal='test-time augmentation is not implemented here (and was '
         'not used by the reference recipe); leave it 0', type=int, default=0),
    _opt('--aug-repeats', TRAIN, '0 only', accepted=(0,), refusal='repeated augmentation (timm\'s RepeatAugSampler) '
         'is not implemented: the resumable sampler here gives each image once per epoch; the VAN recipe does not '
         'use it, leave it 0', type=int, default=0),
    _opt('--aug-splits', TRAIN, '0 only', accepted=(0,), refusal=_AUGMIX, type=int, default=0),
    _opt('--jsd-loss', TRAIN, 'refused (AugMix)', accepted=(False,), refusal=_AUGMIX, **_FLAG),
    _opt('--split-bn', TRAIN, 'refused (AugMix)', accepted=(False,), refusal=_AUGMIX, **_FLAG),
    _opt('--resplit', TRAIN, 'refused (AugMix)', accepted=(False,), refusal=_AUGMIX, **_FLAG),
    _opt('--save-images', TRAIN, 'refused', accepted=(False,), refusal='saving augmented training batches as '
         'images is not implemented in this training loop; drop the flag', **_FLAG),
    _opt('--epoch-repeats', TRAIN, '0 only', accepted=(0.,), refusal='repeating the data set within an epoch is '
         'not implemented (the epoch, the schedule and resume count passes over the data); raise --epochs instead',
         type=float, default=0.),
    # ---- model
    _opt('--gp', BOTH, 'global pool: avg (what VAN does) or unset', accepted=(None, 'avg'), refusal='VAN\'s head '
         'averages its features over all positions; only avg is available', default=None),
    _opt('--drop-connect', TRAIN, 'deprecated alias of --drop-path (as in timm): sets the stochastic depth rate',
         type=float, default=None),
    _opt('--drop-block', TRAIN, 'refused: VAN has no DropBlock', accepted=(None, 0.), refusal='VAN has no DropBlock '
         'layers (the reference\'s timm passed it to the model, which fails); use --drop-path or --drop',
         type=float, default=None),
    _opt('--bn-tf', TRAIN, f'BatchNorm momentum {BN_TF_MOMENTUM} and eps {BN_TF_EPS} (TensorFlow\'s) in every '
         'BatchNorm of the model; the reference\'s timm applied it only to EfficientNet/MobileNetV3, not VAN', **_FLAG),
    _opt('--bn-momentum', TRAIN, 'momentum of every BatchNorm of the model (the reference\'s timm ignored it for '
         'VAN)', type=float, default=None),
    _opt('--bn-eps', TRAIN, 'eps of every BatchNorm of the model (the reference\'s timm ignored it for VAN)',
         type=float, default=None),
    # ---- loss
    _opt('--bce-target-thresh', TRAIN, 'with --bce-loss: binarize the (mixed) targets at this threshold',
         type=float, default=None),
    # ---- schedule (timm's scheduler factory: scheduler_options)
    _opt('--lr-noise', TRAIN, 'lr noise between these fractions of --epochs (one value: from it to the end)',
         type=float, nargs='+', default=None, metavar='PCT'),
    _opt('--lr-noise-pct', TRAIN, 'lr noise limit (fraction of the lr)', type=float, default=0.67),
    _opt('--lr-noise-std', TRAIN, 'lr noise standard deviation', type=float, default=1.0),
    _opt('--lr-cycle-mul', TRAIN, 'accepted: with one cycle (--lr-cycle-limit 1) it has no effect, as in the '
         'reference', type=float, default=1.0),
    _opt('--lr-cycle-decay', TRAIN, 'accepted: with one cycle (--lr-cycle-limit 1) it has no effect, as in the '
         'reference', type=float, default=0.5),
    _opt('--lr-cycle-limit', TRAIN, '1 only', accepted=(1,), refusal='schedules with restarts (more than one cycle) '
         'lengthen the run, which the epoch count, resume and the launch scripts here do not follow; keep 1 and '
         'set --epochs', type=int, default=1),
    _opt('--lr-k-decay', TRAIN, 'k of the cosine/tanh schedule\'s k-decay', type=float, default=1.0),
    _opt('--patience-epochs', TRAIN, 'patience of --sched plateau', type=int, default=10),
)


def options_for(script: str) -> List[RefOption]:
    if script not in SCRIPTS:
        raise ValueError(f'script must be one of {SCRIPTS}, got {script!r}')
    return [o for o in REFERENCE_OPTIONS if script in o.scripts]


def add_reference_options(parser: argparse.ArgumentParser, script: str) -> argparse.ArgumentParser:
    """Add the reference's options that `parser` does not declare yet (an option ours already has stays ours)."""
    existing = {s for action in parser._actions for s in action.option_strings}
    group = parser.add_argument_group(GROUP_TITLE, 'options of the reference\'s (timm 0.4.12\'s) scripts: each '
                                                   'works as there, or stops with the reason and what to use')
    for opt in options_for(script):
        if not existing.intersection(opt.flags):
            group.add_argument(*opt.flags, help=opt.help, **opt.kwargs)
    return parser


def _value(args, opt: RefOption):
    return getattr(args, opt.dest, opt.kwargs.get('default', False if opt.kwargs.get('action') else None))


def reference_option(args, dest: str):
    """args.dest for a reference option, or its default from REFERENCE_OPTIONS when this CLI's parser does not
    declare it (the reference options' counterpart of config.option: each default is written once, in the table)."""
    opt = next((o for o in REFERENCE_OPTIONS if o.dest == dest), None)
    if opt is None:
        raise KeyError(f'{dest} is not a reference option (vancls/reference_compat.REFERENCE_OPTIONS)')
    return _value(args, opt)


def apply_reference_options(args: argparse.Namespace, script: str) -> argparse.Namespace:
    """Map the reference options in `args` onto ours (in place; returns args), or raise UsageError."""
    for opt in options_for(script):
        if opt.accepted is not None and _value(args, opt) not in opt.accepted:
            if opt.kwargs.get('action') == 'store_true':
                raise UsageError(f'{opt.flags[0]}: {opt.refusal}')
            shown = ', '.join('unset' if v is None else str(v) for v in opt.accepted)
            raise UsageError(f'{opt.flags[0]} {_value(args, opt)}: {opt.refusal} (accepted here: {shown})')
    _apply_launch(args)
    _apply_amp(args, script)
    if getattr(args, 'torchscript', False) and script == 'train':
        raise UsageError('--torchscript: training a TorchScript model is not supported here; use --compile '
                         '(torch.compile) for a compiled training step, or validate.py --torchscript for evaluation')
    if script == 'train':
        _apply_train(args)
    else:
        _apply_validate(args)
    return args


def _apply_launch(args):
    """torch.distributed.launch passes --local-rank=N (torch >= 2.0) or --local_rank=N, and sets LOCAL_RANK too
    (unless a torch < 1.9 launch without --use_env): the device follows LOCAL_RANK, which must agree."""
    flag = getattr(args, 'local_rank', None)
    if flag is None:
        return
    env = os.environ.get('LOCAL_RANK')
    if env is None:
        os.environ['LOCAL_RANK'] = str(flag)
    elif env.strip() != str(flag):
        raise UsageError(f'--local-rank {flag} differs from LOCAL_RANK={env} set by the launcher; drop --local-rank '
                         f'(torchrun and torch.distributed.launch set LOCAL_RANK)')


def _apply_amp(args, script):
    apex, native = getattr(args, 'apex_amp', False), getattr(args, 'native_amp', False)
    if not (apex or native):
        return
    args.amp = True
    if apex and script == 'train':  # the reference preferred apex when both were given
        args.amp_impl = 'apex'
        return
    if args.amp_dtype not in (None, 'float16'):
        flag = '--apex-amp' if apex else '--native-amp'
        raise UsageError(f'{flag} is float16 mixed precision but --amp-dtype {args.amp_dtype} was given; use '
                         f'--amp --amp-dtype {args.amp_dtype} alone')
    args.amp_dtype = 'float16'


def _apply_train(args):
    if args.drop_connect is not None:
        _logger.warning(f'--drop-connect is deprecated (as in timm): using it as --drop-path {args.drop_connect}')
        args.drop_path = args.drop_connect
    if args.bce_target_thresh is not None and not args.bce_loss:
        raise UsageError(f'--bce-target-thresh {args.bce_target_thresh} applies to the binary cross-entropy loss '
                         'only; add --bce-loss, or drop it')
    if args.log_wandb and importlib.util.find_spec('wandb') is None:
        raise UsageError('--log-wandb: the wandb package is not installed (pip install wandb, then wandb login); or '
                         'drop it: every epoch is in summary.csv, and --log-tensorboard writes TensorBoard events')
    if args.lr_noise is not None and not 1 <= len(args.lr_noise) <= 2:
        raise UsageError(f'--lr-noise takes one or two fractions of --epochs, got {len(args.lr_noise)} values')
    for flag, value in (('--bn-momentum', args.bn_momentum), ('--bn-eps', args.bn_eps)):
        if value is not None and not value > 0:
            raise UsageError(f'{flag} must be > 0, got {value}')
    if args.output == '':  # timm's default: --output '' wrote under ./output/train/
        args.output = os.path.join('.', 'output', 'train')


def _apply_validate(args):
    if args.legacy_jit:
        names = ('_jit_set_profiling_executor', '_jit_set_profiling_mode', '_jit_override_can_fuse_on_gpu')
        if not all(hasattr(torch._C, n) for n in names):
            raise UsageError(f'--legacy-jit: torch {torch.__version__} has no legacy TorchScript executor; drop it')
        torch._C._jit_set_profiling_executor(False)
        torch._C._jit_set_profiling_mode(False)
        torch._C._jit_override_can_fuse_on_gpu(True)
    if args.torchscript and args.compile:
        raise UsageError('--torchscript and --compile both compile the model: choose one')
    for flag, path in (('--real-labels', args.real_labels), ('--valid-labels', args.valid_labels)):
        if path and not os.path.isfile(path):
            raise UsageError(f'{flag} {path}: file not found')


# ---------------------------------------------------------------------------------------------- validate.py hooks

class _EvalOutputs(nn.Module):
    """The model with validate.py's reference options on its logits: --valid-labels keeps only those classes (in
    the file's order), --real-labels hands every batch's logits to `record`."""

    def __init__(self, model: nn.Module, indices: Optional[List[int]] = None,
                 record: Optional[Callable[[torch.Tensor], None]] = None):
        super().__init__()
        self.model, self.record = model, record
        device = next(model.parameters()).device
        self.indices = None if indices is None else torch.tensor(indices, dtype=torch.long, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.indices is not None:
            out = out.index_select(1, self.indices)
        if self.record is not None:
            self.record(out.float())
        return out


def _read_valid_labels(path: str, num_classes: int) -> List[int]:
    try:
        with open(path) as f:
            indices = [int(line) for line in f if line.strip()]
    except ValueError as e:
        raise UsageError(f'--valid-labels {path}: expected one class index per line ({e})') from None
    bad = [i for i in indices if not 0 <= i < num_classes]
    if not indices or bad:
        raise UsageError(f'--valid-labels {path}: expected class indices in 0..{num_classes - 1}, '
                         f'{"none found" if not indices else f"got {bad[:5]}"}')
    return indices


def _real_labels(path: str, dataset, env, num_classes: int):
    """timm's RealLabelsImagenet over `dataset`'s files, checked: one process, matching names and count."""
    import json
    from timm.data import RealLabelsImagenet
    if not hasattr(dataset, 'samples'):
        raise UsageError('--real-labels needs an ImageFolder data set (not --dataset synthetic)')
    if env.world_size > 1:
        raise UsageError('--real-labels matches the images to the file in order: run validate.py as one process '
                         '(no torchrun)')
    filenames = [os.path.basename(p) for p, _ in dataset.samples]
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f'--real-labels {path}: not a readable JSON list ({e})') from None
    if not isinstance(entries, list) or len(entries) != len(filenames):
        raise UsageError(f'--real-labels {path}: {len(entries) if isinstance(entries, list) else "no"} entries for '
                         f'{len(filenames)} validation images (the file lists the labels of every ImageNet '
                         f'validation image, in order)')
    expected = {f'ILSVRC2012_val_{i + 1:08d}.JPEG' for i in range(len(entries))}
    unknown = [n for n in filenames if n not in expected]
    if unknown:
        raise UsageError(f'--real-labels: validation image {unknown[0]} is not named ILSVRC2012_val_<8 digits>.JPEG '
                         f'(as the ReaL file indexes them); {len(unknown)} such files')
    return RealLabelsImagenet(filenames, real_json=path, topk=(1, min(5, num_classes)))


def eval_model(args, model: nn.Module, dataset, env, num_classes: int) -> Tuple[nn.Module, Callable[[dict], dict]]:
    """validate.py's --torchscript, --valid-labels and --real-labels: (the model to evaluate, finish), where
    finish(results) puts the ReaL accuracies into the results dict (and returns it)."""
    if getattr(args, 'torchscript', False):
        try:
            model = torch.jit.script(model)
        except Exception as e:  # noqa: BLE001 - TorchScript raises many error types for unsupported code
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UsageError(f'--torchscript: torch.jit.script failed for {args.model} ({type(e).__name__}: {first});'
                             f' evaluate without it, or with --compile') from None
    indices = None
    if getattr(args, 'valid_labels', ''):
        indices = _read_valid_labels(args.valid_labels, num_classes)
        if len(indices) != len(dataset.classes):
            raise UsageError(f'--valid-labels {args.valid_labels}: {len(indices)} classes, but the data has '
                             f'{len(dataset.classes)} class folders (one per listed index, in the same order)')
    real = None
    if getattr(args, 'real_labels', ''):
        real = _real_labels(args.real_labels, dataset, env, len(dataset.classes))
    if indices is not None or real is not None:
        model = _EvalOutputs(model, indices, real.add_result if real is not None else None)

    def finish(results: dict) -> dict:
        if real is not None:
            results.update(original_top1=results['top1'], original_top5=results['top5'], real_labels=args.real_labels,
                           top1=real.get_accuracy(1), top5=real.get_accuracy(real.topk[-1]))
        return results
    return model, finish
