#!/usr/bin/env python3
"""Train VAN on an ImageFolder tree (or the built-in digits set) with the reference recipe.

    python train.py [DATA_DIR] --model van_b2 --amp                         # 1 device
    torchrun --nproc_per_node=8 train.py DATA_DIR --model van_b2 --amp       # 8 devices
    torchrun --nnodes=2 --node-rank=R --rdzv-endpoint=HOST:PORT --nproc_per_node=8 train.py ...   # multi-node

Defaults are the reference's ImageNet recipe (AdamW lr 1e-3, wd 0.05, 300 epochs + 10 cooldown, cosine,
5 warm-up epochs, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8, cutmix 1.0, smoothing 0.1).
"""
import gc
import logging
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from vancls import builders, reference_compat
from vancls.checkpoint import (LAST, RECOVERY, CheckpointError, CheckpointManager, check_writable, find_auto_resume,
                               find_newest_checkpoint, load_model_weights, load_optimizer_state,
                               load_state_dict_checked, model_state_dict, plain, read_checkpoint,
                               remove_stale_temporaries, resume_position, rng_state, set_rng_state,
                               training_checkpoint)
from vancls.config import DEFAULT_MODEL, DEFAULTS, UsageError, add_options, new_parser, run_cli
from vancls.data import build_datasets, build_loader, resolve_data_dir
from vancls.device import (Amp, cleanup_distributed, default_workers, leave_together, peak_memory_mb,
                           setup_distributed)
from vancls.engine import EpochState, TrainLoop, evaluate, train_one_epoch
from vancls.preempt import PreemptionHandler, parse_signals
from vancls.reports import RunReport, save_args, setup_logging, with_wandb, write_json


def get_args_parser():
    p = new_parser('VAN training')
    p.add_argument('data_dir', nargs='?', default=None, metavar='DATA_DIR',
                   help='ImageFolder root with train/ and val/ (or validation/); none: the demo (the digits under '
                        'data/digits, written once, with the recipe of configs/demo.yaml unless -c is given)')
    add_options(p, 'model', 'input', 'loader', 'speed', 'device')
    g = p.add_argument_group('data')
    g.add_argument('--train-split', default='train')
    g.add_argument('--val-split', default=DEFAULTS['val_split'], help='falls back to val/ or validation/')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None)
    g = p.add_argument_group('model (training)')
    g.add_argument('--initial-checkpoint', default='', help='start from these weights (head dropped if classes differ)')
    g.add_argument('--drop', type=float, default=DEFAULTS['drop'], help='MLP dropout (drop_rate)')
    g.add_argument('--drop-path', type=float, default=DEFAULTS['drop_path'],
                   help='stochastic depth rate (the reference recipe\'s for van_b0-b2; its parser default, unset, '
                        'meant 0)')
    g.add_argument('--grad-checkpointing', action='store_true', help='recompute activations per block')
    g.add_argument('--head-init-scale', type=float, default=DEFAULTS['head_init_scale'],
                   help='scale the new classifier head\'s initial weight and bias (fine-tuning: 0.001; default 1)')
    g = p.add_argument_group('optimizer')
    g.add_argument('--opt', default=DEFAULTS['opt'], help='any timm optimizer name')
    g.add_argument('--opt-eps', type=float, default=None)
    g.add_argument('--opt-betas', type=float, nargs='+', default=None)
    g.add_argument('--opt-impl', default=DEFAULTS['opt_impl'], choices=('auto', 'fused', 'foreach', 'plain'),
                   help='AdamW kernel: fused where available, else foreach')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=0.05)
    g.add_argument('--clip-grad', type=float, default=None)
    g.add_argument('--clip-mode', default='norm', choices=('norm', 'value', 'agc'))
    g.add_argument('--layer-decay', type=float, default=None)
    g = p.add_argument_group('schedule')
    g.add_argument('--sched', default='cosine')
    g.add_argument('--lr', type=float, default=DEFAULTS['lr'],
                   help='learning rate; wins over --lr-base (default: scaled from --lr-base, else 1e-3, the '
                        'reference\'s for a global batch of 1024)')
    g.add_argument('--lr-base', type=float, default=None,
                   help='lr for a global batch of --lr-base-size, scaled to this run\'s global batch '
                        '(per device x devices x --grad-accum-steps), as timm\'s train.py does')
    g.add_argument('--lr-base-size', type=int, default=1024, help='the global batch --lr-base is meant for')
    g.add_argument('--lr-base-scale', default='linear', choices=('linear', 'sqrt'),
                   help='scale --lr-base by the batch ratio (linear) or its square root (sqrt)')
    g.add_argument('--warmup-lr', type=float, default=1e-6)
    g.add_argument('--min-lr', type=float, default=1e-6, help='the lr at the end of the schedule and in the cooldown')
    g.add_argument('--epochs', type=int, default=DEFAULTS['epochs'],
                   help='epochs of the lr schedule (--cooldown-epochs follow)')
    g.add_argument('--warmup-epochs', type=int, default=5)
    g.add_argument('--cooldown-epochs', type=int, default=DEFAULTS['cooldown_epochs'], help='added after --epochs (only when epochs > 5)')
    g.add_argument('--decay-epochs', type=float, default=100)
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1)
    g.add_argument('--start-epoch', type=int, default=None)
    g.add_argument('--max-steps', type=int, default=DEFAULTS['max_steps'], help='cap on optimizer steps per epoch (performance runs)')
    g = p.add_argument_group('augmentation')
    g.add_argument('--no-aug', action='store_true')
    g.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0])
    g.add_argument('--ratio', type=float, nargs=2, default=[3. / 4., 4. / 3.])
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--vflip', type=float, default=0.)
    g.add_argument('--color-jitter', type=float, default=0.4)
    g.add_argument('--aa', default='rand-m9-mstd0.5-inc1', help='AutoAugment/RandAugment policy; none disables')
    g.add_argument('--reprob', type=float, default=0.25)
    g.add_argument('--remode', default='pixel')
    g.add_argument('--recount', type=int, default=1)
    g.add_argument('--mixup', type=float, default=0.8)
    g.add_argument('--cutmix', type=float, default=1.0)
    g.add_argument('--cutmix-minmax', type=float, nargs=2, default=None)
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', default='batch', choices=('batch', 'pair', 'elem'))
    g.add_argument('--mixup-off-epoch', type=int, default=0, help='turn mixup off from this epoch (0: never)')
    g.add_argument('--smoothing', type=float, default=0.1)
    g.add_argument('--train-interpolation', default='random')
    g.add_argument('--bce-loss', action='store_true')
    g = p.add_argument_group('batch norm and EMA')
    g.add_argument('--sync-bn', action='store_true')
    g.add_argument('--dist-bn', default='reduce', choices=('reduce', 'broadcast', ''))
    g.add_argument('--model-ema', action='store_true')
    g.add_argument('--model-ema-decay', type=float, default=0.9998, help='per optimizer step (the reference\'s)')
    g.add_argument('--model-ema-force-cpu', action='store_true')
    g = p.add_argument_group('misc')
    g.add_argument('--log-interval', type=int, default=50)
    g.add_argument('--recovery-interval', type=int, default=0, help='save recovery.pth.tar every N optimizer steps')
    g.add_argument('--preempt-signals', default=DEFAULTS['preempt_signals'],
                   help='on these signals (comma list of TERM, INT, USR1, USR2, HUP, QUIT; none: off) all ranks '
                        'stop after the current optimizer step, save recovery.pth.tar and exit with 128 + signal')
    g.add_argument('--checkpoint-hist', type=int, default=10)
    g.add_argument('--grad-accum-steps', type=int, default=1)
    g.add_argument('--output', default='./output')
    g.add_argument('--experiment', default='')
    g.add_argument('--eval-metric', default='top1', choices=('top1', 'top5', 'loss'))
    g.add_argument('--resume', default='', help='PATH, or auto: the newest loadable checkpoint of the experiment')
    g.add_argument('--no-resume-opt', action='store_true', help='resume weights only')
    g.add_argument('--no-eval', action='store_true', help='skip evaluation (performance runs)')
    g.add_argument('--log-tensorboard', action='store_true')
    g.add_argument('--max-bad-images', type=int, default=100,
                   help='stop when more unreadable images than this were found (-1: no limit)')
    reference_compat.add_reference_options(p, 'train')
    p.implied_config = demo_config_if_no_data
    return p


# The demo recipe (digits, van_b0, 32 px): `python train.py` with no DATA_DIR, and `make demo`.
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'demo.yaml')


def demo_config_if_no_data(args) -> str:
    """No DATA_DIR and no -c: the demo, on the built-in digits set with the demo recipe (not the ImageNet recipe,
    which would take about a day on the digits)."""
    return DEMO_CONFIG if args.data_dir is None and args.dataset != 'synthetic' else ''


def check_args(args):
    args.model = args.model or DEFAULT_MODEL
    builders.check_model_name(args.model)
    builders.check_optimizer_name(args.opt)
    if args.batch_size < 1 or args.grad_accum_steps < 1:
        raise UsageError('--batch-size and --grad-accum-steps must be >= 1')
    if args.epochs < 1:
        raise UsageError(f'--epochs must be >= 1, got {args.epochs}')
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise UsageError(f'mixup/cutmix need an even --batch-size, got {args.batch_size}')
    parse_signals(args.preempt_signals)  # a bad name fails here, before any work


def num_total_epochs(args) -> int:
    """The reference trains --epochs then --cooldown-epochs at min lr; runs of <= 5 epochs skip the cooldown."""
    return args.epochs + (args.cooldown_epochs if args.epochs > 5 else 0)


def ranks_in_sync(model, env) -> bool:
    """Whether every rank ends with bitwise the same weights and buffers (DDP keeps them so; checked, not assumed)."""
    if not env.distributed:
        return True
    import torch.distributed as dist
    # Per-tensor float64 sums and sums of squares: identical tensors give identical values on every rank.
    local = torch.stack([torch.stack([t.double().sum(), t.double().square().sum()])
                         for t in model.state_dict().values() if t.is_floating_point()]).flatten()
    local = local.to(env.device if env.backend != 'gloo' else 'cpu')
    gathered = [torch.empty_like(local) for _ in range(env.world_size)]
    dist.all_gather(gathered, local)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


@dataclass
class Run:
    """One training run: what setup() builds and the position that resume() and the epoch loop advance."""
    args: Any
    env: Any
    out_dir: str
    logger: Any
    amp: Amp
    train_ds: Any
    val_ds: Any
    class_names: list
    model: torch.nn.Module  # unwrapped: what is saved and evaluated
    loop: TrainLoop  # its model is the wrapped one (torch.compile, DDP)
    train_sampler: Any
    eval_loader: Any
    ckpt_mgr: Optional[CheckpointManager]
    start_epoch: int = 0
    start_step: int = 0
    num_updates: int = 0
    epoch_state: Optional[EpochState] = None
    resume_rng: Optional[dict] = None
    resumed_row: Optional[dict] = None  # summary.csv's row of the epoch the resumed checkpoint ended
    report: Optional[RunReport] = None
    notes: list = field(default_factory=list)  # logged by announce(), after resume: a failed resume writes nothing
    lr_warning: Optional[str] = None  # likewise
    totals: dict = field(default_factory=lambda: {'images': 0, 'seconds': 0.})
    train_metrics: dict = field(default_factory=dict)
    eval_metrics: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def checkpoint(self, epoch: int, step_in_epoch: int, metric: Optional[float] = None,
                   epoch_state: Optional[EpochState] = None, rng_ranks: Optional[list] = None,
                   summary_row: Optional[dict] = None) -> dict:
        """The training state as a checkpoint dict (vancls/checkpoint.training_checkpoint).
        `rng_ranks`: every rank's RNG states (rng_states_of_ranks), so that each rank resumes with its own."""
        loop = self.loop
        return training_checkpoint(
            position={'epoch': epoch, 'step_in_epoch': step_in_epoch, 'num_updates': self.num_updates},
            model=self.model, optimizer=loop.optimizer, scheduler=loop.lr_scheduler, scaler=self.amp.state_dict(),
            ema_model=loop.model_ema.module if loop.model_ema is not None else None, args=self.args,
            class_names=self.class_names, metric=metric, rng_ranks=rng_ranks, device=self.env.device,
            meters=epoch_state.state_dict() if epoch_state is not None else None, summary_row=summary_row)


def main(args):
    reference_compat.apply_reference_options(args, 'train')
    check_args(args)
    env = setup_distributed(args.device)
    run = None
    try:
        run = setup(args, env)
        resume(run)
        if run.start_epoch >= num_total_epochs(args):
            run.logger.info(f'Nothing to train: {run.out_dir} holds a finished run of {num_total_epochs(args)} '
                            f'epochs; pass --experiment NAME (or another --output) to train a new one')
            return 0
        announce(run)
        with PreemptionHandler(args.preempt_signals, env) as preempt:
            run.loop.should_stop = preempt.should_stop
            status = train_epochs(run, preempt)
        result = status or finish(run)
        leave_together(env)
        return result
    except BaseException:
        remove_if_empty(os.path.join(args.output, args.experiment) if args.experiment and env.is_main else None)
        raise
    finally:
        # The DDP wrapper holds the process group: drop it first, so that destroying the group joins gloo's
        # threads now, not during interpreter shutdown (torch 2.1 aborted a rank there: SIGABRT, 'terminate called
        # without an active exception').
        run = None
        gc.collect()
        cleanup_distributed()


# Options that do not change what a run trains (where it runs, how fast, what it logs): `--resume auto` finds the
# same run again when only these differ between the first command and the rerun.
_NOT_RUN_DEFINING = frozenset((
    'resume', 'experiment', 'output', 'config', 'workers', 'pin_mem', 'no_prefetcher', 'device', 'local_rank',
    'fast_path', 'compile', 'channels_last', 'opt_impl', 'grad_checkpointing', 'log_interval', 'log_tensorboard',
    'log_wandb', 'recovery_interval', 'preempt_signals', 'checkpoint_hist', 'max_bad_images', 'trust_checkpoint',
    'no_resume_opt', 'use_multi_epochs_loader'))


def experiment_name(args) -> str:
    """--experiment, else with --resume auto `<model>-<data>-<hash of the options that define the run>` (the same
    command finds its run again after a crash, a preemption or a torchrun restart), else `<date>-<time>-<model>`."""
    if args.experiment:
        return args.experiment
    if args.resume != 'auto':
        return f'{time.strftime("%Y%m%d-%H%M%S")}-{args.model}'
    import hashlib
    import json
    defining = {k: v for k, v in plain(vars(args)).items() if k not in _NOT_RUN_DEFINING}
    defining['data_dir'] = os.path.abspath(args.data_dir) if args.data_dir else None
    digest = hashlib.sha1(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:8]
    data = 'synthetic' if args.dataset == 'synthetic' else os.path.basename(os.path.normpath(args.data_dir or 'data'))
    return f'{args.model}-{data}-{digest}'


def setup_output(args, env):
    """(output folder, logger): the folder is checked writable and cleaned of a killed save's temporaries."""
    args.experiment = experiment_name(args)
    out_dir = os.path.join(args.output, args.experiment)
    if env.is_main:
        check_writable(out_dir)
        remove_stale_temporaries(out_dir)
    return out_dir, setup_logging(os.path.join(out_dir, 'train.log') if env.is_main else None, env.is_main)


def build_model(args, env, num_classes: int):
    """The model to train: weights, checkpointing, SyncBN, device, memory layout."""
    model = builders.create_model(args, num_classes, pretrained=args.pretrained)
    if args.initial_checkpoint:
        load_model_weights(model, args.initial_checkpoint, trust=args.trust_checkpoint, drop_head='auto')
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if args.sync_bn and env.distributed:
        if env.device.type == 'cpu':
            raise UsageError('--sync-bn needs cuda or npu (SyncBatchNorm has no CPU/gloo kernel)')
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(env.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def no_buffer_sync_kwargs(no_sync: bool) -> dict:
    """DDP's keyword for --no-ddp-bb (no buffer broadcast each forward): forward_sync_buffers where torch has it
    (its broadcast_buffers is deprecated there), else broadcast_buffers. Nothing when buffers are synced (default)."""
    if not no_sync:
        return {}
    import inspect
    from torch.nn.parallel import DistributedDataParallel as DDP
    name = 'forward_sync_buffers' if 'forward_sync_buffers' in inspect.signature(DDP).parameters else 'broadcast_buffers'
    return {name: False}


def wrap_model(model, args, env):
    """torch.compile, then DDP: the module that trains (the unwrapped one is saved and evaluated)."""
    wrapped = torch.compile(model) if args.compile else model
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [env.device.index] if env.device.type in ('cuda', 'npu') else None
        wrapped = DDP(wrapped, device_ids=ids, **no_buffer_sync_kwargs(args.no_ddp_bb))
    return wrapped


def setup(args, env) -> Run:
    """Build everything a run needs: output folder, data, model, optimizer, schedule, EMA, loaders."""
    from timm.utils import ModelEmaV2, random_seed

    args.data_dir = resolve_data_dir(args.data_dir) if args.dataset != 'synthetic' else args.data_dir
    args.lr, _, lr_warning = builders.resolve_lr(args, env.world_size)
    out_dir, logger = setup_output(args, env)
    random_seed(args.seed, env.rank)  # python, numpy and torch: mixup draws from numpy, drop path from torch
    amp = Amp(env.device, enabled=args.amp, dtype=args.amp_dtype, impl=args.amp_impl)
    use_prefetcher = env.device.type != 'cpu' and args.dataset != 'synthetic' and not args.no_prefetcher
    data_config = builders.resolve_data_config(args)  # command line first, then the model's pretrained_cfg
    train_ds, val_ds, class_names = build_datasets(args, data_config, use_prefetcher, need_eval=not args.no_eval)
    if args.num_classes and args.dataset != 'synthetic' and args.num_classes < len(class_names):
        raise UsageError(f'--num-classes {args.num_classes} is smaller than the {len(class_names)} class folders')
    model = build_model(args, env, args.num_classes or len(class_names))
    builders.configure_batchnorm(model, args)  # --bn-tf/--bn-momentum/--bn-eps
    optimizer = builders.create_optimizer(args, model, env.device)
    model, optimizer = amp.attach_apex(model, optimizer)
    mixup_fn = builders.create_mixup(args, model.num_classes)
    lr_scheduler = builders.create_scheduler(args, optimizer)

    workers = default_workers() if args.workers is None else args.workers
    loader_args = dict(workers=workers, seed=args.seed, use_prefetcher=use_prefetcher, data_config=data_config,
                       pin_memory=args.pin_mem)
    train_loader, train_sampler = build_loader(train_ds, args.batch_size, env, is_training=True,
                                               re_args=(args.reprob, args.remode, args.recount), **loader_args)
    eval_loader, _ = build_loader(val_ds, args.validation_batch_size or args.batch_size, env, is_training=False,
                                  **loader_args)
    steps_per_epoch = (len(train_sampler) // args.batch_size) // args.grad_accum_steps
    if steps_per_epoch < 1:
        raise UsageError(f'{len(train_ds)} training images give no full batch of {args.batch_size} per device '
                         f'x {env.world_size} devices: lower --batch-size')
    # The fast path is chosen knowing the run's length (forward passes), before torch.compile and DDP wrap it.
    steps_per_epoch = min(steps_per_epoch, args.max_steps or steps_per_epoch)
    forward_passes = num_total_epochs(args) * steps_per_epoch * args.grad_accum_steps
    fast_path = builders.set_fast_path(model, args.fast_path, forward_passes, data_config['input_size'][-1], amp=amp,
                                       batch_size=args.batch_size)
    loop = TrainLoop(
        model=wrap_model(model, args, env), loader=train_loader, optimizer=optimizer,
        loss_fn=builders.create_train_loss(args, mixup_fn is not None).to(env.device), amp=amp, env=env,
        steps_per_epoch=steps_per_epoch, lr_scheduler=lr_scheduler,
        model_ema=ModelEmaV2(model, decay=args.model_ema_decay, device='cpu' if args.model_ema_force_cpu else None)
        if args.model_ema else None,
        mixup_fn=mixup_fn, grad_accum_steps=args.grad_accum_steps, clip_grad=args.clip_grad,
        clip_mode=args.clip_mode, log_interval=args.log_interval, channels_last=args.channels_last,
        recovery_interval=args.recovery_interval)
    ckpt_mgr = CheckpointManager(out_dir, max_history=args.checkpoint_hist,
                                 decreasing=args.eval_metric == 'loss') if env.is_main else None
    return Run(args=args, env=env, out_dir=out_dir, logger=logger, amp=amp, train_ds=train_ds, val_ds=val_ds,
               class_names=class_names, model=model, loop=loop, train_sampler=train_sampler, eval_loader=eval_loader,
               ckpt_mgr=ckpt_mgr, start_epoch=args.start_epoch or 0, notes=[fast_path], lr_warning=lr_warning)


def resume(run: Run):
    """--resume PATH|auto: weights, optimizer, scaler, scheduler, EMA, the position in the epoch and the RNG states.
    The RNG states are put back last, in train_epochs, right before the first step (nothing may draw after).
    A file without some of them (the reference's timm saver keeps no RNG, scheduler or in-epoch position, and an
    apex loss scale) resumes from what it has; the log line says what was restored and what was not."""
    args, loop = run.args, run.loop
    if args.resume == 'auto':
        path, ckpt = find_auto_resume(run.out_dir, args.trust_checkpoint)
        if not path:
            run.notes.append(f'--resume auto: no checkpoint under {run.out_dir}: starting a new run')
    else:
        path, ckpt = args.resume, (read_checkpoint(args.resume, args.trust_checkpoint) if args.resume else None)
    if not path:
        run.num_updates = run.start_epoch * loop.steps_per_epoch
        return
    load_model_weights(run.model, path, checkpoint=ckpt)
    restored, missing = ['weights'], []
    if not args.no_resume_opt:
        if not isinstance(ckpt.get('optimizer'), dict) or 'epoch' not in ckpt:
            raise CheckpointError(f'{path} has no optimizer state and epoch (a weights file): start from it with '
                                  f'--initial-checkpoint, or resume the weights only with --no-resume-opt')
        load_optimizer_state(loop.optimizer, ckpt['optimizer'])
        restored += ['optimizer', 'epoch']
        restore_loss_scale(run.amp, ckpt, restored, missing)
        if ckpt.get('scheduler'):
            loop.lr_scheduler.load_state_dict(ckpt['scheduler'])
            restored.append('scheduler')
        else:
            missing.append('the scheduler state (recomputed from the epoch)')
        run.start_epoch, run.start_step = resume_position(ckpt)
        ranks = ckpt.get('rng_ranks') or []  # per rank (mixup and drop path draw per rank); older files: rank 0's
        run.resume_rng = ranks[run.env.rank] if len(ranks) == run.env.world_size else ckpt.get('rng')
        if run.resume_rng:
            restored.append('RNG states')
        else:
            missing.append('the RNG states (augmentation, mixup and drop-path draws differ from an uninterrupted run)')
        if 'step_in_epoch' not in ckpt:
            missing.append(f'a position inside an epoch (continues at the start of epoch {run.start_epoch})')
    if loop.model_ema is not None and isinstance(ckpt.get('state_dict_ema'), dict):
        load_state_dict_checked(loop.model_ema.module, model_state_dict(ckpt['state_dict_ema'], path),
                                source=f'{path} (EMA)')
        restored.append('EMA weights')
    if run.ckpt_mgr is not None:
        run.ckpt_mgr.best_metric, run.ckpt_mgr.best_epoch = ckpt.get('best_metric'), ckpt.get('best_epoch')
    run.resumed_row = ckpt.get('summary_row')
    if run.start_step > 0 and ckpt.get('meters'):
        run.epoch_state = EpochState(**ckpt['meters'])
    run.num_updates = ckpt.get('num_updates', run.start_epoch * loop.steps_per_epoch + run.start_step)
    run.logger.info(f'Resumed from {path}: epoch {run.start_epoch}, step {run.start_step}; restored: '
                    f'{", ".join(restored)}' + (f'; not in the file: {"; ".join(missing)}' if missing else ''))


def restore_loss_scale(amp: Amp, ckpt: dict, restored: list, missing: list):
    """The loss scale of a checkpoint into this run's scaler: ours (`scaler`), timm's NativeScaler (`amp_scaler`:
    the reference's --amp with native AMP) or apex's (`amp`). A saved scale this run has no use for (no loss
    scaling here, or the other AMP implementation) is listed as not restored."""
    native = ckpt.get('scaler') or ckpt.get('amp_scaler')
    key = 'scaler' if ckpt.get('scaler') else 'amp_scaler'
    if ckpt.get('amp') and amp.impl == 'apex':
        amp.load_state_dict({'apex': ckpt['amp']})
        restored.append('loss scale (apex)')
    elif native and amp.scaler.is_enabled():
        amp.load_state_dict(native)
        restored.append(f'loss scale ({native.get("scale")}, from {key})')
    elif native:
        missing.append(f'the loss scale saved in {key} (this run uses no loss scaling: precision {amp.precision})')
    elif ckpt.get('amp'):
        missing.append('the apex loss scale (amp; this run uses native AMP, whose scale starts afresh)')


def announce(run: Run):
    """Rank 0: args.yaml, the run's summary line, and the per-epoch report files."""
    if not run.env.is_main:
        return
    args, env, loop = run.args, run.env, run.loop
    save_args(args, os.path.join(run.out_dir, 'args.yaml'))
    run.logger.info(f'Global batch {args.batch_size * env.world_size * args.grad_accum_steps} ({args.batch_size} '
                    f'per device x {env.world_size} devices x {args.grad_accum_steps} accumulation steps), '
                    f'lr {args.lr:g}')
    for note in run.notes:
        run.logger.info(note)
    if run.lr_warning:
        run.logger.warning(f'warning: {run.lr_warning}')
    run.logger.info(
        f'Model {args.model}: {sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M params, '
        f'{run.num_classes} classes; device {env.device} x {env.world_size} ({env.backend or "single"}); '
        f'precision {run.amp.precision}; {len(run.train_ds)} train / {len(run.val_ds)} val images; '
        f'{num_total_epochs(args)} epochs of {loop.steps_per_epoch} steps; output {run.out_dir}')
    run.report = with_wandb(RunReport(run.out_dir, tensorboard=args.log_tensorboard), args, run.out_dir)
    if run.resumed_row:
        run.report.restore_row(run.resumed_row)


def rng_states_of_ranks(env) -> list:
    """Every rank's RNG states, in rank order (collective: every rank calls it at the same point)."""
    state = rng_state(env.device)
    if not env.distributed:
        return [state]
    import io
    import torch.distributed as dist
    buf = io.BytesIO()
    torch.save(state, buf)  # as bytes: all_gather_object fails to unpickle tensors in this torch (legacy storages)
    states = [None] * env.world_size
    dist.all_gather_object(states, buf.getvalue())
    return [torch.load(io.BytesIO(b), weights_only=True) for b in states]


def _save_recovery(run: Run, epoch: int):
    """on_step for --recovery-interval and for a preemption stop: rank 0 writes recovery.pth.tar at this step."""
    def on_step(step, num_updates, state):
        run.num_updates = num_updates
        rng_ranks = rng_states_of_ranks(run.env)
        if run.ckpt_mgr is not None:
            run.ckpt_mgr.save_recovery(run.checkpoint(epoch, step, epoch_state=state, rng_ranks=rng_ranks))
    return on_step


def continue_command(args) -> str:
    """The command line that continues this run after a preemption: this one, with --resume auto (and the
    experiment's name when the folder was named by the date). Under torchrun, the workers' part of it."""
    argv = sys.argv[1:] if sys.argv and sys.argv[0].endswith('train.py') else None
    if argv is None:  # called in-process (tests): no command line to repeat
        return f'--resume auto --experiment {args.experiment}'
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == '--resume':
            skip = True
        elif not a.startswith('--resume='):
            kept.append(a)
    kept += ['--resume', 'auto']
    if not any(a == '--experiment' or a.startswith('--experiment=') for a in argv) and args.resume != 'auto':
        kept += ['--experiment', args.experiment]  # the folder was named by the date: name it
    python = 'python' if shutil.which('python') == sys.executable else sys.executable
    launcher = (f'torchrun --nproc_per_node={os.environ["LOCAL_WORLD_SIZE"]} (and the same torchrun options) '
                if 'TORCHELASTIC_RUN_ID' in os.environ else f'{python} ')
    return launcher + shlex.join([sys.argv[0]] + kept)


def at_once_line(run: Run):
    """The line a stop signal before any step since the last checkpoint logs (vancls.preempt: the process then
    ends at once). Built when the epoch starts, so the signal handler only formats it."""
    newest = find_newest_checkpoint(run.out_dir) if run.env.is_main else None
    where = (f'the newest checkpoint {newest} is the resume point' if newest else
             'no checkpoint yet: the run starts from the beginning')
    command = continue_command(run.args)
    return lambda sig: (f'Preempted by {sig.name} before any step since the last checkpoint (nothing to save): '
                        f'{where}; exit status {128 + int(sig)}, continue with: {command}')


def remove_if_empty(folder: Optional[str]):
    """A run that failed before writing anything leaves no empty output folder behind (and no log handler that
    would create train.log in it again)."""
    if not folder or not os.path.isdir(folder) or os.listdir(folder):
        return
    logger = logging.getLogger('vancls')
    for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)
                    and os.path.dirname(h.baseFilename) == os.path.abspath(folder)]:
        logger.removeHandler(handler)
        handler.close()
    try:
        os.rmdir(folder)
    except OSError:
        pass


def stop_preempted(run: Run, preempt: PreemptionHandler, epoch: int, step: int, checkpoint: str) -> int:
    """After an agreed preemption stop: every rank waits for rank 0's checkpoint; one log line; the exit status."""
    preempt.finish()
    if run.env.is_main:
        run.report.close()
        run.logger.info(preempt.describe(epoch, step, run.loop.steps_per_epoch, run.num_updates,
                                         os.path.join(run.out_dir, checkpoint), continue_command(run.args)))
    return preempt.exit_status


def train_epochs(run: Run, preempt: Optional[PreemptionHandler] = None) -> Optional[int]:
    """The epoch loop: train, check bad images, sync BN, evaluate, checkpoint and report each epoch. Returns the
    exit status when a preemption signal stopped it (vancls.preempt), else None."""
    from timm.utils import distribute_bn
    args, env, loop = run.args, run.env, run.loop
    if run.resume_rng:
        set_rng_state(run.resume_rng, env.device)  # last thing before training: nothing below draws from it first
    for epoch in range(run.start_epoch, num_total_epochs(args)):
        if preempt is not None:  # nothing trained since the checkpoint (or the start): a signal exits at once
            preempt.arm(at_once_line(run), os.path.join(run.out_dir, 'train.log') if env.is_main else None)
        start = run.start_step if epoch == run.start_epoch else 0
        loop.lr_scheduler.step(epoch)
        run.train_sampler.set_epoch(epoch, start=start * args.batch_size * args.grad_accum_steps)
        run.train_ds.set_epoch(epoch)
        if loop.mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            loop.mixup_fn.mixup_enabled = False
        loop.on_step = _save_recovery(run, epoch)  # every --recovery-interval steps, and at a preemption stop
        run.train_metrics, run.num_updates = train_one_epoch(
            loop, epoch, start_step=start, num_updates=run.num_updates,
            state=run.epoch_state if epoch == run.start_epoch else None)
        if run.train_metrics['preempted']:
            return stop_preempted(run, preempt, epoch, run.train_metrics['steps'], RECOVERY)
        run.totals['images'] += run.train_metrics['timed_images']
        run.totals['seconds'] += run.train_metrics['timed_seconds']
        bad = count_bad_images(run)
        if env.distributed and args.dist_bn:
            distribute_bn(run.model, env.world_size, args.dist_bn == 'reduce')
        metric = evaluate_epoch(run)
        rng_ranks = rng_states_of_ranks(env)
        if env.is_main:
            m, e = run.train_metrics, run.eval_metrics
            row = {'epoch': epoch, 'lr': m['lr'], 'train_loss': m['loss'], 'eval_loss': e.get('loss'),
                   'eval_top1': e.get('top1'), 'eval_top5': e.get('top5'), 'train_img_per_sec': m['img_per_sec'],
                   'bad_images': bad}
            # The checkpoint carries the epoch's row: a run stopped between the save and the row's write gets it
            # back on resume (RunReport.restore_row) instead of a summary without that epoch.
            is_best = run.ckpt_mgr.save_epoch(run.checkpoint(epoch, 0, metric, rng_ranks=rng_ranks, summary_row=row),
                                              epoch, metric)
            run.report.add_epoch(row)
            run.logger.info(f'Epoch {epoch}: train loss {m["loss"]:.4f}, {m["img_per_sec"]:.1f} img/s, '
                            f'bad images {bad}' + (' (new best)' if is_best else ''))
        if preempt is not None and preempt.should_stop():  # a signal during evaluation or the save: already saved
            return stop_preempted(run, preempt, epoch, loop.steps_per_epoch, LAST)
    return None


def count_bad_images(run: Run) -> int:
    """Unreadable images found so far (train and eval); stops the run past --max-bad-images."""
    bad = len(run.train_ds.bad_files) + len(getattr(run.val_ds, 'bad_files', []))
    if 0 <= run.args.max_bad_images < bad:
        raise UsageError(f'{bad} unreadable images found (more than --max-bad-images {run.args.max_bad_images}); '
                         f'run python -m vancls.check_data {run.args.data_dir} to list them')
    return bad


def evaluate_epoch(run: Run) -> Optional[float]:
    """Evaluate the model (and the EMA model, whose result then counts); returns --eval-metric or None."""
    from timm.utils import distribute_bn
    args, env, loop = run.args, run.env, run.loop
    if args.no_eval:
        return None
    run.eval_metrics = evaluate(builders.inference_model(run.model, args.fuse), run.eval_loader, env, run.amp,
                                args.channels_last)
    if loop.model_ema is not None and not args.model_ema_force_cpu:
        if env.distributed and args.dist_bn:
            distribute_bn(loop.model_ema, env.world_size, args.dist_bn == 'reduce')
        run.eval_metrics = evaluate(builders.inference_model(loop.model_ema.module, args.fuse), run.eval_loader,
                                    env, run.amp, args.channels_last, 'Test (EMA)')
    return run.eval_metrics[args.eval_metric]


def finish(run: Run) -> Optional[dict]:
    """results.json and the port's closing log lines (rank 0); every rank checks the ranks ended in sync."""
    args, env = run.args, run.env
    in_sync = ranks_in_sync(run.model, env)
    if not env.is_main:
        return None
    run.report.close()
    best_metric, best_epoch = run.ckpt_mgr.best_metric, run.ckpt_mgr.best_epoch
    fps = run.totals['images'] / run.totals['seconds'] if run.totals['seconds'] > 0 else 0.
    e = run.eval_metrics
    results = {
        'model': args.model, 'device': env.device.type, 'world_size': env.world_size,
        'global_batch': args.batch_size * env.world_size * args.grad_accum_steps, 'epochs': num_total_epochs(args),
        'best_top1': best_metric if args.eval_metric == 'top1' else None, 'best_metric': best_metric,
        'eval_metric': args.eval_metric, 'best_epoch': best_epoch,
        'final_top1': e.get('top1'), 'final_top5': e.get('top5'), 'final_loss': e.get('loss'),
        'train_loss': run.train_metrics.get('loss'), 'train_img_per_sec': fps,
        'peak_memory_mb': peak_memory_mb(env.device), 'amp': run.amp.dtype_name if run.amp.enabled else None,
        'amp_precision': run.amp.precision, 'skipped_steps': run.amp.skipped_steps,
        'bad_images': len(run.train_ds.bad_files) + len(getattr(run.val_ds, 'bad_files', [])),
        'output_dir': run.out_dir, 'num_classes': run.num_classes, 'ranks_in_sync': in_sync,
    }
    write_json(results, os.path.join(run.out_dir, 'results.json'))
    run.logger.info(f'Training throughput: FPS: {fps:.2f}')
    if best_metric is not None:
        run.logger.info(f'*** Best metric: {best_metric} (epoch {best_epoch})')
    return results


if __name__ == '__main__':
    sys.exit(run_cli(main, get_args_parser))
