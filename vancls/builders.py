"""Model, optimizer, loss and mixup from the parsed arguments (shared by train.py, validate.py, predict.py, export.py)."""
import json
import logging
import os
from types import SimpleNamespace
from typing import Optional, Tuple

import torch
import torch.nn as nn

import models  # noqa: F401 - registers the VAN names with timm
from models.van import VAN_NAMES
from .checkpoint import checkpoint_meta, load_model_weights, model_state_dict, read_checkpoint
from .config import UsageError

_logger = logging.getLogger('vancls')


def check_model_name(name: str):
    if name not in VAN_NAMES:
        raise UsageError(f'--model {name!r} is not a VAN model; choose one of: {", ".join(VAN_NAMES)}')


def create_model(args, num_classes: int, pretrained: bool = False, **extra) -> nn.Module:
    """A VAN from the registry; `--pretrained` loads the official weights (`--pretrained-path` for a local file)."""
    import timm
    check_model_name(args.model)
    kwargs = dict(num_classes=num_classes, **extra)
    for name, dest in (('drop_rate', 'drop'), ('drop_path_rate', 'drop_path')):
        if getattr(args, dest, None) is not None:
            kwargs[name] = getattr(args, dest)
    if getattr(args, 'in_chans', None):
        kwargs['in_chans'] = args.in_chans
    if getattr(args, 'head_init_scale', None) is not None:
        kwargs['head_init_scale'] = args.head_init_scale
    if pretrained and getattr(args, 'pretrained_path', None):
        # Read here (safe on every torch, --trust-checkpoint honoured); timm then adapts the input conv and keeps
        # the file's head only when it fits num_classes.
        path = args.pretrained_path
        state_dict = model_state_dict(read_checkpoint(path, getattr(args, 'trust_checkpoint', False)), path)
        head = state_dict.get('head.weight')
        kwargs['pretrained_cfg_overlay'] = dict(state_dict=state_dict,
                                                num_classes=head.shape[0] if head is not None else 1000)
    return timm.create_model(args.model, pretrained=pretrained, **kwargs)


def check_optimizer_name(name: str):
    from models.timm_compat import list_optimizers
    available = list_optimizers()
    if name.lower() not in available:
        raise UsageError(f'--opt {name!r} is not a timm optimizer; choose one of: {", ".join(available)}')


def fused_adamw_works(device: torch.device) -> bool:
    """Whether torch's fused AdamW kernel runs on this device type (CPU: torch >= 2.4; one tiny step to tell)."""
    if device.type not in ('cuda', 'cpu'):
        return False
    p = nn.Parameter(torch.zeros(1, device=device))
    p.grad = torch.zeros(1, device=device)
    try:
        torch.optim.AdamW([p], fused=True).step()
    except (RuntimeError, TypeError):
        return False
    return True


def create_optimizer(args, model: nn.Module, device: torch.device):
    """timm's optimizer factory (weight decay skips 1-D params, as in the reference); fused AdamW where it exists.

    `--opt-impl auto` uses torch's fused AdamW kernel on cuda/cpu (measured 3-6x faster optimizer steps on this
    project's CPU), foreach elsewhere; `--opt-impl plain` gives the per-parameter loop of the reference.
    """
    from models.timm_compat import create_optimizer as create_optimizer_v2  # timm 0.4.12 .. 1.x
    check_optimizer_name(args.opt)
    kwargs = {}
    if args.opt_eps is not None:
        kwargs['eps'] = args.opt_eps
    if args.opt_betas is not None:
        kwargs['betas'] = tuple(args.opt_betas)
    impl = getattr(args, 'opt_impl', 'auto')
    if args.opt.lower() in ('adamw', 'adam') and impl != 'plain':
        fused_ok = impl in ('auto', 'fused') and fused_adamw_works(device)
        if impl == 'fused' and not fused_ok:
            raise UsageError(f'--opt-impl fused: torch {torch.__version__} has no fused AdamW on {device.type}; '
                             f'use --opt-impl auto (foreach) or plain')
        kwargs['fused' if fused_ok else 'foreach'] = True
    elif impl == 'plain':
        kwargs['foreach'] = False if args.opt.lower() in ('adamw', 'adam', 'sgd', 'momentum') else None
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                               momentum=args.momentum, layer_decay=args.layer_decay, **kwargs)


# The reference recipe: lr 1e-3 for a global batch of 1024 (128 per device x 8 devices).
RECIPE_LR, RECIPE_GLOBAL_BATCH = 1e-3, 1024


def resolve_lr(args, world_size: int) -> Tuple[float, int, Optional[str]]:
    """(lr, global batch, warning or None): the learning rate a run uses, with the meaning of timm's train.py.

    global batch = --batch-size (per device) x devices x --grad-accum-steps. An explicit --lr wins. Else --lr-base
    is scaled by global batch / --lr-base-size (--lr-base-scale linear) or by its square root (sqrt). Else the
    reference's 1e-3. The warning says when the global batch differs from --lr-base-size (the batch the lr is
    meant for) and nothing scaled the lr, with both fixes.
    """
    global_batch = args.batch_size * world_size * args.grad_accum_steps
    for flag, value in (('--lr', args.lr), ('--lr-base', args.lr_base)):
        if value is not None and not value > 0:
            raise UsageError(f'{flag} must be > 0, got {value}')
    if args.lr_base_size < 1:
        raise UsageError(f'--lr-base-size must be >= 1, got {args.lr_base_size}')
    if args.lr_base_scale not in ('linear', 'sqrt'):
        raise UsageError(f'--lr-base-scale must be linear or sqrt, got {args.lr_base_scale!r}')
    if args.lr is None and args.lr_base is not None:
        ratio = global_batch / args.lr_base_size
        return args.lr_base * (ratio ** 0.5 if args.lr_base_scale == 'sqrt' else ratio), global_batch, None
    lr = RECIPE_LR if args.lr is None else args.lr
    if global_batch == args.lr_base_size:
        return lr, global_batch, None
    per_step = args.batch_size * world_size
    steps = args.lr_base_size // per_step if args.lr_base_size % per_step == 0 else None
    accum = (f'--grad-accum-steps {steps}' if steps else
             f'--batch-size and --grad-accum-steps with batch x {world_size} devices x steps = {args.lr_base_size}')
    drop = ' (without --lr, which wins)' if args.lr is not None else ''
    warning = (f'global batch {global_batch} differs from the {args.lr_base_size} that lr {lr:g} is meant for '
               f'(--lr-base-size) and nothing scales the lr: pass --lr-base {lr:g}{drop} to scale it to the global '
               f'batch, or {accum} to reach {args.lr_base_size}')
    return lr, global_batch, warning


def create_scheduler(args, optimizer):
    """The per-epoch lr schedule over --epochs; train.py then trains --cooldown-epochs more at the schedule's end
    value (min lr), as the reference does. step(epoch) is called at the start of each epoch."""
    from models.timm_compat import create_scheduler as timm_create  # timm 0.4.12 .. 1.x
    from .reference_compat import scheduler_options
    scheduler, _ = timm_create(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs, cooldown_epochs=0,
        decay_rate=args.decay_rate, min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
        step_on_epochs=True, **scheduler_options(args))  # the reference's --lr-noise, --lr-k-decay, ...
    return scheduler


def create_mixup(args, num_classes: int):
    """timm's Mixup/CutMix (with label smoothing folded into the soft targets), or None when both are off."""
    if not (args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None):
        return None
    from models.timm_compat import create_mixup as Mixup  # timm 0.4.12's Mixup makes its targets on cuda
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=num_classes)


def create_train_loss(args, mixup_active: bool) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if args.bce_loss:
        from models.timm_compat import binary_cross_entropy_cls
        try:
            BinaryCrossEntropy = binary_cross_entropy_cls()
        except ValueError as e:
            raise UsageError(str(e)) from None
        return BinaryCrossEntropy(smoothing=0. if mixup_active else args.smoothing,
                                  target_threshold=getattr(args, 'bce_target_thresh', None))
    if mixup_active:
        return SoftTargetCrossEntropy()  # smoothing is already in mixup's targets
    if args.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def resolve_data_config(args, pretrained_cfg: Optional[dict] = None) -> dict:
    """Input size, interpolation, mean/std and crop_pct: command line first, then `pretrained_cfg` (default: the
    model's)."""
    from models.timm_compat import resolve_data_config as timm_resolve  # timm 0.4.12 .. 1.x
    from models.van import default_cfgs
    if pretrained_cfg is None:
        check_model_name(args.model)
        pretrained_cfg = default_cfgs[args.model]
    cfg_args = {k: getattr(args, k, None) for k in ('input_size', 'img_size', 'crop_pct', 'mean', 'std',
                                                    'interpolation', 'in_chans')}
    return timm_resolve(cfg_args, pretrained_cfg=dict(pretrained_cfg))


# Data options that default to the values the model was trained with (saved in our checkpoints' `args`).
_DATA_KEYS = ('input_size', 'img_size', 'crop_pct', 'mean', 'std', 'interpolation')


# timm's prefix for a model folder shared as timm does (export.py --format timm): --model local-dir:DIR
LOCAL_DIR = 'local-dir:'


def _load_local_dir(args):
    """load_trained_model for --model local-dir:DIR: timm.create_model('local-dir:DIR', pretrained=True) builds the
    model from DIR/config.json and loads DIR/model.safetensors; class names are its label_names."""
    import timm
    from .data import load_class_map
    folder = args.model[len(LOCAL_DIR):]
    cfg_file = os.path.join(folder, 'config.json')
    if not os.path.isfile(cfg_file):
        raise UsageError(f'--model {args.model}: {cfg_file} not found (expected a folder written by '
                         f'export.py --format timm)')
    if args.checkpoint or args.pretrained:
        raise UsageError(f'--model {args.model} holds its weights: drop --checkpoint / --pretrained')
    try:
        with open(cfg_file) as f:
            arch = json.load(f)['architecture']
    except (ValueError, KeyError, TypeError):
        raise UsageError(f'{cfg_file}: not a timm model config (no "architecture")') from None
    check_model_name(arch)
    model = timm.create_model(args.model, pretrained=True).eval()
    cfg = dict(model.pretrained_cfg)
    names = load_class_map(args.class_map) if getattr(args, 'class_map', '') else cfg.get('label_names')
    names = [str(c) for c in names] if names else [str(i) for i in range(model.num_classes)]
    if len(names) != model.num_classes:
        raise UsageError(f'{len(names)} class names for a model with {model.num_classes} classes')
    data_args = {k: getattr(args, k, None) for k in _DATA_KEYS}
    data_args = {k: v for k, v in data_args.items() if v not in (None, '')}
    data_config = resolve_data_config(SimpleNamespace(**data_args), pretrained_cfg=cfg)
    return model, {'model': arch, 'num_classes': model.num_classes, 'data_args': data_args,
                   'class_names': names}, data_config


def load_trained_model(args):
    """(model in eval mode on the CPU, meta, data_config) from --checkpoint / --pretrained / --model local-dir:DIR
    and the data options, for the inference CLIs (predict.py, export.py).

    meta: model (name), num_classes, class_names (list of str, or indices as str when the file has none), and
    data_args, the data options used (the command line's, else the checkpoint's training values).
    """
    from .data import load_class_map
    if (args.model or '').startswith(LOCAL_DIR):
        return _load_local_dir(args)
    if not (args.checkpoint or args.pretrained):
        raise UsageError('give --checkpoint PATH (or --pretrained for the official weights, or --model '
                         'local-dir:DIR for a folder of export.py --format timm)')
    ckpt = read_checkpoint(args.checkpoint, args.trust_checkpoint) if args.checkpoint else None
    meta = checkpoint_meta(ckpt)
    name = args.model or meta['arch']
    if not name:
        raise UsageError(f'{args.checkpoint} does not name its model: give --model (van_b0 .. van_b6)')
    check_model_name(name)
    class_names = load_class_map(args.class_map) if getattr(args, 'class_map', '') else meta['class_names']
    num_classes = getattr(args, 'num_classes', None) or meta['num_classes'] or (len(class_names) if class_names else 1000)
    if class_names is not None and len(class_names) != num_classes:
        raise UsageError(f'{len(class_names)} class names for a model with {num_classes} classes')
    build_args = SimpleNamespace(model=name, pretrained_path=getattr(args, 'pretrained_path', ''),
                                 in_chans=getattr(args, 'in_chans', None))
    model = create_model(build_args, num_classes, pretrained=args.pretrained and not args.checkpoint)
    if ckpt is not None:
        load_model_weights(model, args.checkpoint, use_ema=getattr(args, 'use_ema', False), checkpoint=ckpt)
    model.eval()
    data_args = {}
    for key in _DATA_KEYS:
        value = getattr(args, key, None)
        data_args[key] = value if value not in (None, '') else meta['args'].get(key)
    if getattr(args, 'input_size', None) or getattr(args, 'img_size', None):  # a size given here wins outright
        data_args['input_size'] = getattr(args, 'input_size', None)
        data_args['img_size'] = getattr(args, 'img_size', None)
    data_config = resolve_data_config(SimpleNamespace(model=name, **data_args))
    return model, {'model': name, 'num_classes': num_classes, 'data_args': data_args,
                   'class_names': [str(c) for c in class_names] if class_names else
                   [str(i) for i in range(num_classes)]}, data_config


def set_fast_path(model: nn.Module, mode: str, steps: Optional[int] = None, img_size: Optional[int] = None) -> str:
    """--fast-path for every CLI; returns a line saying what runs. 'auto' is resolved here, knowing the run
    (`steps` forward passes and the input size; None: unknown): compiled kernels only where the run pays for their
    compile (models/fast_ops.auto_mode)."""
    from models.fast_ops import auto_mode
    if not hasattr(model, 'set_fast_path'):
        return f'fast path: {type(model).__name__} has none'
    note = f'fast path {mode}'
    try:
        if mode == 'auto':
            device = next(model.parameters()).device.type
            mode = auto_mode(device, steps, img_size)
            note = (f'fast path auto: {mode} ({device}, {img_size or "?"} px, '
                    f'{steps if steps is not None else "unknown"} forward passes)')
        model.set_fast_path(mode)
    except ValueError as e:
        raise UsageError(f'--fast-path: {e}') from None
    return note
