"""Model, optimizer, loss and mixup from the parsed arguments (shared by train.py, validate.py, predict.py, export.py)."""
import dataclasses
import json
import logging
import os
from types import SimpleNamespace
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

import models  # noqa: F401 - registers the VAN names with timm
from models.van import VAN_NAMES
from .checkpoint import checkpoint_meta, load_model_weights, model_state_dict, read_checkpoint
from .config import DEFAULT_MODEL, UsageError, option

_logger = logging.getLogger('vancls')


def check_model_name(name: str):
    if name not in VAN_NAMES:
        raise UsageError(f'--model {name!r} is not a VAN model; choose one of: {", ".join(VAN_NAMES)}')


def create_model(args, num_classes: int, pretrained: bool = False, **extra) -> nn.Module:
    """A VAN from the registry; `--pretrained` loads the official weights (`--pretrained-path` for a local file)."""
    import timm
    check_model_name(args.model)
    kwargs = dict(num_classes=num_classes, **extra)
    for name, dest in (('drop_rate', 'drop'), ('drop_path_rate', 'drop_path')):  # training CLIs only
        if getattr(args, dest, None) is not None:
            kwargs[name] = getattr(args, dest)
    if option(args, 'in_chans'):
        kwargs['in_chans'] = args.in_chans
    if option(args, 'head_init_scale') is not None:
        kwargs['head_init_scale'] = args.head_init_scale
    if pretrained and option(args, 'pretrained_path'):
        # Read here (safe on every torch, --trust-checkpoint honoured); timm then adapts the input conv and keeps
        # the file's head only when it fits num_classes.
        path = args.pretrained_path
        # Pretrained weights follow timm's rule: the file's EMA weights when it has them (models/_helpers.py).
        state_dict = model_state_dict(read_checkpoint(path, option(args, 'trust_checkpoint')), path,
                                      use_ema='prefer')
        head = state_dict.get('head.weight')
        kwargs['pretrained_cfg_overlay'] = dict(state_dict=state_dict,
                                                num_classes=head.shape[0] if head is not None else 1000)
    return timm.create_model(args.model, pretrained=pretrained, **kwargs)


def configure_batchnorm(model: nn.Module, args) -> int:
    """--bn-tf, then --bn-momentum / --bn-eps, on every BatchNorm of `model`; returns how many were changed."""
    from .reference_compat import BN_TF_EPS, BN_TF_MOMENTUM, reference_option  # the reference's --bn-tf
    momentum, eps = (BN_TF_MOMENTUM, BN_TF_EPS) if reference_option(args, 'bn_tf') else (None, None)
    if reference_option(args, 'bn_momentum') is not None:
        momentum = args.bn_momentum
    if reference_option(args, 'bn_eps') is not None:
        eps = args.bn_eps
    if momentum is None and eps is None:
        return 0
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        if momentum is not None:
            m.momentum = momentum
        if eps is not None:
            m.eps = eps
    return len(norms)


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

    `--opt-impl auto` uses torch's fused AdamW kernel on cuda/cpu (faster optimizer steps: docs/PERFORMANCE.md),
    foreach elsewhere; `--opt-impl plain` gives the per-parameter loop of the reference.
    """
    from models.timm_compat import create_optimizer as create_optimizer_v2  # timm 0.4.12 .. 1.x
    check_optimizer_name(args.opt)
    kwargs = {}
    if args.opt_eps is not None:
        kwargs['eps'] = args.opt_eps
    if args.opt_betas is not None:
        kwargs['betas'] = tuple(args.opt_betas)
    impl = option(args, 'opt_impl')
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


# The reference recipe's lr, for its global batch of 128 per device x 8 devices (--lr-base-size's default).
RECIPE_LR = 1e-3


def resolve_lr(args, world_size: int) -> Tuple[float, int, Optional[str]]:
    """(lr, global batch, warning or None): the learning rate a run uses, with the meaning of timm's train.py.

    global batch = --batch-size (per device) x devices x --grad-accum-steps. An explicit --lr wins. Else --lr-base
    is scaled by global batch / --lr-base-size (--lr-base-scale linear) or by its square root (sqrt). Else the
    reference's 1e-3. The warning says when that default lr meets a global batch other than --lr-base-size (the
    batch it is meant for), with both fixes; an lr the user chose (--lr, --lr-base) is theirs and gets none.
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
    if args.lr is not None:
        return args.lr, global_batch, None
    lr = RECIPE_LR
    if global_batch == args.lr_base_size:
        return lr, global_batch, None
    per_step = args.batch_size * world_size
    steps = args.lr_base_size // per_step if args.lr_base_size % per_step == 0 else None
    accum = (f'--grad-accum-steps {steps}' if steps else
             f'--batch-size and --grad-accum-steps with batch x {world_size} devices x steps = {args.lr_base_size}')
    warning = (f'global batch {global_batch} differs from the {args.lr_base_size} that lr {lr:g} is meant for '
               f'(--lr-base-size) and nothing scales the lr: pass --lr-base {lr:g} to scale it to the global '
               f'batch, {accum} to reach {args.lr_base_size}, or --lr to choose the lr yourself')
    return lr, global_batch, warning


def _scheduler_options(args) -> Dict[str, Any]:
    """Keyword arguments for timm's create_scheduler_v2 from the reference's schedule options that differ from
    timm's behaviour without them (the reference's --lr-noise, --lr-k-decay, --patience-epochs; an empty dict for the
    reference recipe)."""
    out: Dict[str, Any] = {}
    from .reference_compat import reference_option
    if reference_option(args, 'lr_noise') is not None:
        noise = list(args.lr_noise)
        out.update(noise=noise if len(noise) > 1 else noise[0], noise_pct=args.lr_noise_pct,
                   noise_std=args.lr_noise_std, noise_seed=args.seed)
    if reference_option(args, 'lr_k_decay') != 1.0:  # the defaults: what timm does without the option
        out['k_decay'] = args.lr_k_decay
    if reference_option(args, 'patience_epochs') != 10:
        out['patience_epochs'] = args.patience_epochs
    return out


def create_scheduler(args, optimizer):
    """The per-epoch lr schedule over --epochs; train.py then trains --cooldown-epochs more at the schedule's end
    value (min lr), as the reference does. step(epoch) is called at the start of each epoch."""
    from models.timm_compat import create_scheduler as timm_create  # timm 0.4.12 .. 1.x
    scheduler, _ = timm_create(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs, cooldown_epochs=0,
        decay_rate=args.decay_rate, min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
        step_on_epochs=True, **_scheduler_options(args))
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
        from .reference_compat import reference_option
        try:
            BinaryCrossEntropy = binary_cross_entropy_cls()
        except ValueError as e:
            raise UsageError(str(e)) from None
        return BinaryCrossEntropy(smoothing=0. if mixup_active else args.smoothing,
                                  target_threshold=reference_option(args, 'bce_target_thresh'))
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
    cfg_args = {k: option(args, k) for k in ('input_size', 'img_size', 'crop_pct', 'mean', 'std', 'interpolation',
                                             'in_chans')}
    return timm_resolve(cfg_args, pretrained_cfg=dict(pretrained_cfg))


# Data options that default to the values the model was trained with (our checkpoints' `args`, the data_args of
# export.py's .safetensors, the config.json of a timm folder): evaluation preprocesses as training did.
DATA_KEYS = ('input_size', 'img_size', 'crop_pct', 'mean', 'std', 'interpolation')

# timm's prefix for a model folder shared as timm does (export.py --format timm): --model local-dir:DIR
LOCAL_DIR = 'local-dir:'


def _given(value) -> bool:
    return value not in (None, '', [])


def _read_local_dir(args) -> Tuple[dict, Callable]:
    """(what a timm folder says about its model, a function building the model with its weights) for
    --model local-dir:DIR, the folder export.py --format timm writes (config.json + model.safetensors)."""
    import timm
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
    model = timm.create_model(args.model, pretrained=True)  # timm reads config.json and model.safetensors
    cfg = model.pretrained_cfg
    stored = {'arch': arch, 'num_classes': model.num_classes, 'class_names': cfg.get('label_names'),
              'args': {k: cfg.get(k) for k in ('input_size', 'crop_pct', 'mean', 'std', 'interpolation')},
              'source': folder}
    return stored, lambda name, num_classes: model


def _read_checkpoint_source(args) -> Tuple[dict, Callable]:
    """(what --checkpoint FILE says about its model, a function building the model with its weights); for
    --pretrained without a checkpoint, the official weights (timm's pretrained loading)."""
    ckpt = read_checkpoint(args.checkpoint, args.trust_checkpoint) if args.checkpoint else None
    stored = dict(checkpoint_meta(ckpt), source=args.checkpoint or 'the official weights')

    def build(name, num_classes):
        model = create_model(SimpleNamespace(model=name, in_chans=args.in_chans, trust_checkpoint=args.trust_checkpoint,
                                             pretrained_path=option(args, 'pretrained_path')),
                             num_classes, pretrained=args.pretrained and not args.checkpoint)
        if ckpt is not None:
            load_model_weights(model, args.checkpoint, use_ema=args.use_ema, checkpoint=ckpt)
        return model
    return stored, build


def _model_name(args, stored: dict) -> str:
    """--model, else the model the file holds; a --model that contradicts the file is an error naming both."""
    from models.van import canonical_variant
    name, arch, source = args.model, stored['arch'], stored['source']
    if name and name.startswith(LOCAL_DIR):
        name = arch
    elif name:
        check_model_name(name)  # not a VAN name at all: say so first
    if name and arch and canonical_variant(name) != canonical_variant(arch):
        raise UsageError(f'--model {name} does not match {source}, which holds {arch}: drop --model (the file '
                         f'names its model) or pass --model {arch}')
    name = name or arch
    if not name:
        if args.checkpoint:
            raise UsageError(f'{args.checkpoint} does not name its model and its weights match no VAN variant: '
                             f'give --model (one of {", ".join(VAN_NAMES)})')
        name = DEFAULT_MODEL  # --pretrained without --model: the parser's documented default
    check_model_name(name)
    return name


def _eval_data_config(args, name: str, stored: dict, pretrained_cfg: Optional[dict]) -> Tuple[dict, dict, list]:
    """(data options used, timm data config, notes): each option from the command line, else the value the model
    was trained with, else the model's default. One note per flag that overrides a stored training value."""
    stored_args = stored['args'] or {}
    data_args, notes = {}, []
    for key in DATA_KEYS:
        given, trained = option(args, key), stored_args.get(key)
        data_args[key] = given if _given(given) else trained
        if _given(given) and _given(trained) and list(given if isinstance(given, (list, tuple)) else [given]) != \
                list(trained if isinstance(trained, (list, tuple)) else [trained]):
            notes.append(f'--{key.replace("_", "-")} {given} overrides the value {stored["source"]} was '
                         f'trained with ({trained})')
    if _given(option(args, 'img_size')) or _given(option(args, 'input_size')):
        data_args['input_size'] = option(args, 'input_size')  # a size given here wins outright
        data_args['img_size'] = option(args, 'img_size')
    return data_args, resolve_data_config(SimpleNamespace(model=name, **data_args), pretrained_cfg), notes


def load_trained_model(args):
    """The one evaluation-model builder (validate.py, predict.py, export.py, and --model local-dir:DIR): returns
    (model in eval mode on the CPU, meta, data_config) from --checkpoint / --pretrained / --model local-dir:DIR.

    Defaults, each decided here once: the model is --model, else the one the file holds (an error when they
    differ); the class count is --num-classes, else the file's head, else the number of stored class names, else
    1000 (the official weights); the class names are --class-map, else the file's; the input size, crop,
    mean/std and interpolation are the flags, else the values the model was trained with, else the model's.
    meta: model (name), num_classes, class_names (list of str; indices as str when the file has none),
    stored_class_names (the file's, or None), data_args (the data options used), notes (one line per flag that
    overrides a stored training value: the caller logs them).
    """
    from .data import load_class_map
    if (args.model or '').startswith(LOCAL_DIR):
        stored, build = _read_local_dir(args)
    elif args.checkpoint or args.pretrained:
        stored, build = _read_checkpoint_source(args)
    else:
        raise UsageError('give --checkpoint PATH (or --pretrained for the official weights, or --model '
                         'local-dir:DIR for a folder of export.py --format timm)')
    name = _model_name(args, stored)
    class_names = load_class_map(args.class_map) if option(args, 'class_map') else stored['class_names']
    num_classes = (option(args, 'num_classes') or stored['num_classes']
                   or (len(class_names) if class_names else 1000))
    if class_names is not None and len(class_names) != num_classes:
        raise UsageError(f'{len(class_names)} class names for a model with {num_classes} classes')
    model = build(name, num_classes).eval()
    data_args, data_config, notes = _eval_data_config(args, name, stored, dict(model.pretrained_cfg)
                                               if (args.model or '').startswith(LOCAL_DIR) else None)
    names = [str(c) for c in class_names] if class_names else [str(i) for i in range(num_classes)]
    return model, {'model': name, 'num_classes': num_classes, 'data_args': data_args, 'class_names': names,
                   'stored_class_names': names if class_names else None, 'notes': notes}, data_config


def prepare_inference(model: nn.Module, args, device: torch.device, forward_passes: Optional[int],
                      img_size: int, amp) -> nn.Module:
    """A trained model made ready to evaluate: device, fast path and precision (auto knows the job), fusing
    (--fuse), memory layout, compiling. The one place the inference CLIs do this."""
    from models.fast_ops import compile_inference
    model.to(device).eval()
    # --compile / --no-compile decide; by default (None) the auto plan does (not with --torchscript, which scripts
    # the model itself)
    compile_flag = option(args, 'compile')
    if compile_flag is None and getattr(args, 'torchscript', False):
        compile_flag = False
    _logger.info(set_fast_path(model, args.fast_path, forward_passes, img_size, kind='infer', amp=amp,
                               batch_size=args.batch_size, can_freeze=compile_flag is None))
    plan = model.auto_plan() if hasattr(model, 'auto_plan') else None
    model = inference_model(model, option(args, 'fuse'))
    if option(args, 'channels_last'):
        model.to(memory_format=torch.channels_last)
    if compile_flag or (compile_flag is None and plan is not None and plan.freeze):
        key = model.frozen_graph_key(img_size, args.batch_size, amp.precision) \
            if hasattr(model, 'frozen_graph_key') else None
        model = compile_inference(model, device.type, batch_size=args.batch_size, cache_key=key)
    return model


def inference_model(model: nn.Module, fuse: bool) -> nn.Module:
    """The model that evaluates: with `fuse`, VAN.fuse()'s inference-only copy (BatchNorm and layer scales folded,
    same kernels); else the model itself. Also train.py's evaluation, each epoch (the weights change)."""
    return model.fuse() if fuse and hasattr(model, 'fuse') else model


def set_fast_path(model: nn.Module, mode: str, steps: Optional[int] = None, img_size: Optional[int] = None,
                  kind: str = 'train', amp=None, batch_size: Optional[int] = None, can_freeze: bool = False) -> str:
    """--fast-path (and, for `--amp` without a dtype on the CPU, the precision) for every CLI; returns a line saying
    what runs and why. 'auto' is decided by the one planner (models/fast_ops.plan_auto) for this job: `steps`
    planned forward passes of `batch_size` images of `img_size` px (None: unknown), `kind` 'train' or 'infer', in
    the precision of `amp` (vancls.device.Amp; None: float32); `can_freeze`: the caller compiles the model with
    frozen weights if the plan says so (prepare_inference)."""
    from models.fast_ops import FastPathJob, faster_precision
    if not hasattr(model, 'set_fast_path'):
        return f'fast path: {type(model).__name__} has none'
    device = next(model.parameters()).device.type
    job = FastPathJob(device, kind, steps, img_size, amp.precision if amp is not None else 'float32', batch_size,
                      can_freeze=can_freeze)
    bf16_by_default = amp is not None and amp.enabled and amp.impl == 'native' and not amp.dtype_given \
        and job.precision == 'bfloat16'
    if bf16_by_default and faster_precision(model.complete_job(job), mode) == 'float32':
        amp.use_float32(f'predicted faster than bfloat16 on this CPU for this job ({img_size or "?"} px, {kind}; '
                        'docs/PERFORMANCE.md)')
        job = dataclasses.replace(job, precision='float32')
    try:
        model.set_fast_path(mode, job)
    except ValueError as e:
        raise UsageError(f'--fast-path: {e}') from None
    if mode != 'auto':
        return f'fast path {mode}'
    return (f'fast path auto: {model.fast_path} ({device}, {kind}, {img_size or "?"} px, {job.precision}, '
            f'{steps if steps is not None else "unknown"} forward passes): {model.auto_plan().describe()}')
