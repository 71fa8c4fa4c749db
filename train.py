#!/usr/bin/env python3
"""Train VAN on an ImageFolder tree (or the built-in digits set) with the reference recipe.

    python train.py [DATA_DIR] --model van_b2 --amp                         # 1 device
    torchrun --nproc_per_node=8 train.py DATA_DIR --model van_b2 --amp       # 8 devices
    torchrun --nnodes=2 --node-rank=R --rdzv-endpoint=HOST:PORT --nproc_per_node=8 train.py ...   # multi-node

Defaults are the reference's ImageNet recipe (AdamW lr 1e-3, wd 0.05, 300 epochs + 10 cooldown, cosine,
5 warm-up epochs, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8, cutmix 1.0, smoothing 0.1).
"""
import argparse
import os
import sys
import time

import torch

from vancls import builders
from vancls.checkpoint import (CheckpointManager, check_writable, find_auto_resume, load_model_weights,
                               load_state_dict_checked,
                               remove_stale_temporaries, plain, resume_position, rng_state, set_rng_state)
from vancls.config import UsageError, run_cli
from vancls.data import build_datasets, build_loader, resolve_data_dir
from vancls.device import Amp, DEVICE_CHOICES, cleanup_distributed, peak_memory_mb, setup_distributed
from vancls.engine import EpochState, evaluate, train_one_epoch
from vancls.reports import RunReport, save_args, setup_logging, write_json

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='VAN training', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file of option dest names -> values')
    p.add_argument('data_dir', nargs='?', default=None, metavar='DATA_DIR',
                   help='ImageFolder root with train/ and val/ (or validation/); default: digits under data/digits')
    g = p.add_argument_group('data')
    g.add_argument('--dataset', default='folder', help='folder (ImageFolder tree) or synthetic (random tensors)')
    g.add_argument('--train-split', default='train')
    g.add_argument('--val-split', default='val', help='falls back to val/ or validation/')
    g.add_argument('--class-map', default='', help='text file: one class folder name per line, in index order')
    g.add_argument('--img-size', type=int, default=None, help='input image size (default: the model\'s, 224)')
    g.add_argument('--input-size', type=int, nargs=3, default=None, metavar='N', help='C H W, overrides --img-size')
    g.add_argument('--in-chans', type=int, default=None)
    g.add_argument('--crop-pct', type=float, default=None)
    g.add_argument('--mean', type=float, nargs='+', default=None)
    g.add_argument('--std', type=float, nargs='+', default=None)
    g.add_argument('--interpolation', default='', help='eval resize interpolation (default: the model\'s, bicubic)')
    g.add_argument('-b', '--batch-size', type=int, default=128, help='per device')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None)
    g.add_argument('-j', '--workers', type=int, default=8, help='data loader processes per device')
    g.add_argument('--pin-mem', action='store_true')
    g = p.add_argument_group('model')
    g.add_argument('--model', default='van_b0', help='van_b0..van_b6, van_tiny/small/base/large')
    g.add_argument('--pretrained', action='store_true', help='start from the official ImageNet weights')
    g.add_argument('--pretrained-path', default='', help='local file of the official weights (offline)')
    g.add_argument('--initial-checkpoint', default='', help='start from these weights (head dropped if classes differ)')
    g.add_argument('--num-classes', type=int, default=None, help='default: the number of class folders')
    g.add_argument('--drop', type=float, default=0.0, help='MLP dropout (drop_rate)')
    g.add_argument('--drop-path', type=float, default=0.1, help='stochastic depth rate')
    g.add_argument('--fast-path', default='none', help='execution mode of the model\'s ops (see benchmark.py)')
    g.add_argument('--grad-checkpointing', action='store_true', help='recompute activations per block')
    g.add_argument('--trust-checkpoint', action='store_true',
                   help='allow checkpoints that need full unpickling (can run code: only for files you trust)')
    g = p.add_argument_group('optimizer')
    g.add_argument('--opt', default='adamw', help='any timm optimizer name')
    g.add_argument('--opt-eps', type=float, default=None)
    g.add_argument('--opt-betas', type=float, nargs='+', default=None)
    g.add_argument('--opt-impl', default='auto', choices=('auto', 'fused', 'foreach', 'plain'),
                   help='AdamW kernel: fused where available, else foreach')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=0.05)
    g.add_argument('--clip-grad', type=float, default=None)
    g.add_argument('--clip-mode', default='norm', choices=('norm', 'value', 'agc'))
    g.add_argument('--layer-decay', type=float, default=None)
    g = p.add_argument_group('schedule')
    g.add_argument('--sched', default='cosine')
    g.add_argument('--lr', type=float, default=1e-3)
    g.add_argument('--warmup-lr', type=float, default=1e-6)
    g.add_argument('--min-lr', type=float, default=1e-5 / 10)
    g.add_argument('--epochs', type=int, default=300)
    g.add_argument('--warmup-epochs', type=int, default=5)
    g.add_argument('--cooldown-epochs', type=int, default=10, help='added after --epochs (only when epochs > 5)')
    g.add_argument('--decay-epochs', type=float, default=100)
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1)
    g.add_argument('--start-epoch', type=int, default=None)
    g.add_argument('--max-steps', type=int, default=None, help='cap on optimizer steps per epoch (performance runs)')
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
    g.add_argument('--model-ema-decay', type=float, default=0.99996)
    g.add_argument('--model-ema-force-cpu', action='store_true')
    g = p.add_argument_group('misc')
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--log-interval', type=int, default=50)
    g.add_argument('--recovery-interval', type=int, default=0, help='save recovery.pth.tar every N optimizer steps')
    g.add_argument('--checkpoint-hist', type=int, default=10)
    g.add_argument('--device', default='auto', choices=DEVICE_CHOICES)
    g.add_argument('--amp', action='store_true', help='mixed precision (float16 + GradScaler on cuda/npu, bf16 on cpu)')
    g.add_argument('--amp-dtype', default=None, choices=('float16', 'bfloat16'))
    g.add_argument('--amp-impl', default='native', choices=('native', 'apex'))
    g.add_argument('--channels-last', action='store_true')
    g.add_argument('--compile', action='store_true', help='torch.compile the model')
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
    return p


def check_args(args):
    builders.check_model_name(args.model)
    builders.check_optimizer_name(args.opt)
    if args.batch_size < 1 or args.grad_accum_steps < 1:
        raise UsageError('--batch-size and --grad-accum-steps must be >= 1')
    if args.epochs < 1:
        raise UsageError(f'--epochs must be >= 1, got {args.epochs}')
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise UsageError(f'mixup/cutmix need an even --batch-size, got {args.batch_size}')


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


def main(args):
    check_args(args)
    env = setup_distributed(args.device)
    try:
        return _train(args, env)
    finally:
        cleanup_distributed()


def _train(args, env):
    from models.timm_compat import create_scheduler as create_scheduler_v2  # timm 0.4.12 .. 1.x
    from timm.utils import ModelEmaV2, distribute_bn, random_seed

    args.data_dir = resolve_data_dir(args.data_dir) if args.dataset != 'synthetic' else args.data_dir
    exp_name = args.experiment or f'{time.strftime("%Y%m%d-%H%M%S")}-{args.model}'
    out_dir = os.path.join(args.output, exp_name)
    if env.is_main:
        check_writable(out_dir)
        remove_stale_temporaries(out_dir)
    logger = setup_logging(os.path.join(out_dir, 'train.log') if env.is_main else None, env.is_main)
    random_seed(args.seed, env.rank)  # python, numpy and torch: mixup draws from numpy, drop path from torch

    amp = Amp(env.device, enabled=args.amp, dtype=args.amp_dtype, impl=args.amp_impl)
    use_prefetcher = env.device.type != 'cpu' and args.dataset != 'synthetic'
    data_config = builders.resolve_data_config(args)  # command line first, then the model's pretrained_cfg
    train_ds, val_ds, class_names = build_datasets(args, data_config, use_prefetcher)
    num_classes = args.num_classes or len(class_names)
    if args.num_classes and args.dataset != 'synthetic' and args.num_classes < len(class_names):
        raise UsageError(f'--num-classes {args.num_classes} is smaller than the {len(class_names)} class folders')

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
    if args.fast_path != 'none' and hasattr(model, 'set_fast_path'):
        model.set_fast_path(args.fast_path)

    optimizer = builders.create_optimizer(args, model, env.device)
    model, optimizer = amp.attach_apex(model, optimizer)
    mixup_fn = builders.create_mixup(args, num_classes)
    train_loss_fn = builders.create_train_loss(args, mixup_fn is not None).to(env.device)
    model_ema = ModelEmaV2(model, decay=args.model_ema_decay,
                           device='cpu' if args.model_ema_force_cpu else None) if args.model_ema else None

    epochs_total = num_total_epochs(args)
    lr_scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        cooldown_epochs=0, decay_rate=args.decay_rate, min_lr=args.min_lr, warmup_lr=args.warmup_lr,
        warmup_epochs=args.warmup_epochs, step_on_epochs=True)

    # Resume: weights, optimizer, scaler, scheduler, EMA, position in the epoch, and the RNG states.
    ckpt_mgr = CheckpointManager(out_dir, max_history=args.checkpoint_hist,
                                 decreasing=args.eval_metric == 'loss') if env.is_main else None
    start_epoch, start_step, resume_ckpt = args.start_epoch or 0, 0, None
    resume_path = find_auto_resume(out_dir, args.trust_checkpoint) if args.resume == 'auto' else args.resume
    if resume_path:
        resume_ckpt = load_model_weights(model, resume_path, trust=args.trust_checkpoint)
        if not args.no_resume_opt:
            optimizer.load_state_dict(resume_ckpt['optimizer'])
            amp.load_state_dict(resume_ckpt.get('scaler') or {})
            if resume_ckpt.get('scheduler'):
                lr_scheduler.load_state_dict(resume_ckpt['scheduler'])
            start_epoch, start_step = resume_position(resume_ckpt)
        if model_ema is not None and isinstance(resume_ckpt.get('state_dict_ema'), dict):
            load_state_dict_checked(model_ema.module, resume_ckpt['state_dict_ema'], source=f'{resume_path} (EMA)')
        if ckpt_mgr is not None:
            ckpt_mgr.best_metric, ckpt_mgr.best_epoch = resume_ckpt.get('best_metric'), resume_ckpt.get('best_epoch')
        logger.info(f'Resumed from {resume_path}: epoch {start_epoch}, step {start_step}')

    train_model = model
    if args.compile:
        train_model = torch.compile(model)
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [env.device.index] if env.device.type in ('cuda', 'npu') else None
        train_model = DDP(train_model, device_ids=ids)

    re_args = (args.reprob, args.remode, args.recount)
    train_loader, train_sampler = build_loader(
        train_ds, args.batch_size, env, is_training=True, workers=args.workers, seed=args.seed,
        use_prefetcher=use_prefetcher, data_config=data_config, pin_memory=args.pin_mem, re_args=re_args)
    eval_loader, _ = build_loader(
        val_ds, args.validation_batch_size or args.batch_size, env, is_training=False, workers=args.workers,
        seed=args.seed, use_prefetcher=use_prefetcher, data_config=data_config, pin_memory=args.pin_mem)
    steps_per_epoch = (len(train_sampler) // args.batch_size) // args.grad_accum_steps
    if steps_per_epoch < 1:
        raise UsageError(f'{len(train_ds)} training images give no full batch of {args.batch_size} per device '
                         f'x {env.world_size} devices: lower --batch-size')
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)

    if env.is_main:
        save_args(args, os.path.join(out_dir, 'args.yaml'))
        logger.info(f'Model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, '
                    f'{num_classes} classes; device {env.device} x {env.world_size} ({env.backend or "single"}); '
                    f'AMP {amp.dtype_name if args.amp else "off"}; {len(train_ds)} train / {len(val_ds)} val images; '
                    f'{epochs_total} epochs of {steps_per_epoch} steps; output {out_dir}')
    report = RunReport(out_dir, tensorboard=args.log_tensorboard) if env.is_main else None

    def state_dict_for_save(epoch, step_in_epoch, num_updates, metric=None, epoch_state=None):
        return {
            'epoch': epoch, 'step_in_epoch': step_in_epoch, 'num_updates': num_updates, 'arch': args.model,
            'state_dict': model.state_dict(), 'optimizer': optimizer.state_dict(), 'scaler': amp.state_dict(),
            'scheduler': lr_scheduler.state_dict(),
            'state_dict_ema': model_ema.module.state_dict() if model_ema is not None else None,
            'metric': metric, 'args': plain(vars(args)), 'class_names': list(class_names),
            'num_classes': num_classes, 'rng': rng_state(env.device), 'version': 1,
            'meters': epoch_state.state_dict() if epoch_state is not None else None,
        }

    num_updates = start_epoch * steps_per_epoch + start_step
    epoch_state = EpochState()
    if resume_ckpt is not None and start_step > 0 and resume_ckpt.get('meters'):
        epoch_state = EpochState(**resume_ckpt['meters'])
    if resume_ckpt is not None and not args.no_resume_opt and resume_ckpt.get('rng'):
        set_rng_state(resume_ckpt['rng'], env.device)  # last thing before training: nothing below draws from it
    totals = {'images': 0, 'seconds': 0.}
    eval_metrics, train_metrics = {}, {}
    recovery = None
    if args.recovery_interval > 0 and env.is_main:
        def recovery(step, updates, state):
            ckpt_mgr.save_recovery(state_dict_for_save(epoch, step, updates, epoch_state=state))
    elif args.recovery_interval > 0:
        def recovery(step, updates, state):  # other ranks: nothing to write
            return None

    for epoch in range(start_epoch, epochs_total):
        lr_scheduler.step(epoch)
        train_sampler.set_epoch(epoch, start=(start_step if epoch == start_epoch else 0)
                                * args.batch_size * args.grad_accum_steps)
        train_ds.set_epoch(epoch)
        if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            mixup_fn.mixup_enabled = False
        train_metrics, num_updates = train_one_epoch(
            epoch, train_model, train_loader, optimizer, train_loss_fn, amp, env, steps_per_epoch,
            lr_scheduler=lr_scheduler, model_ema=model_ema, mixup_fn=mixup_fn,
            start_step=start_step if epoch == start_epoch else 0, num_updates=num_updates,
            grad_accum_steps=args.grad_accum_steps, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
            log_interval=args.log_interval, channels_last=args.channels_last, state=epoch_state,
            on_step=recovery, recovery_interval=args.recovery_interval)
        epoch_state = EpochState()
        totals['images'] += train_metrics['timed_images']
        totals['seconds'] += train_metrics['timed_seconds']
        bad = len(train_ds.bad_files) + len(getattr(val_ds, 'bad_files', []))
        if args.max_bad_images >= 0 and bad > args.max_bad_images:
            raise UsageError(f'{bad} unreadable images found (more than --max-bad-images {args.max_bad_images}); '
                             f'run python -m vancls.check_data {args.data_dir} to list them')
        if env.distributed and args.dist_bn:
            distribute_bn(model, env.world_size, args.dist_bn == 'reduce')
        metric = None
        if not args.no_eval:
            eval_metrics = evaluate(model, eval_loader, env, amp, args.channels_last)
            if model_ema is not None and not args.model_ema_force_cpu:
                if env.distributed and args.dist_bn:
                    distribute_bn(model_ema, env.world_size, args.dist_bn == 'reduce')
                eval_metrics = evaluate(model_ema.module, eval_loader, env, amp, args.channels_last, 'Test (EMA)')
            metric = eval_metrics[args.eval_metric]
        if env.is_main:
            is_best = ckpt_mgr.save_epoch(state_dict_for_save(epoch, 0, num_updates, metric), epoch, metric)
            report.add_epoch({
                'epoch': epoch, 'lr': train_metrics['lr'], 'train_loss': train_metrics['loss'],
                'eval_loss': eval_metrics.get('loss'), 'eval_top1': eval_metrics.get('top1'),
                'eval_top5': eval_metrics.get('top5'), 'train_img_per_sec': train_metrics['img_per_sec'],
                'bad_images': bad})
            logger.info(f'Epoch {epoch}: train loss {train_metrics["loss"]:.4f}, '
                        f'{train_metrics["img_per_sec"]:.1f} img/s, bad images {bad}'
                        + (' (new best)' if is_best else ''))
    in_sync = ranks_in_sync(model, env)
    if env.is_main:
        report.close()
        best_metric, best_epoch = ckpt_mgr.best_metric, ckpt_mgr.best_epoch
        fps = totals['images'] / totals['seconds'] if totals['seconds'] > 0 else 0.
        results = {
            'model': args.model, 'device': env.device.type, 'world_size': env.world_size,
            'global_batch': args.batch_size * env.world_size * args.grad_accum_steps, 'epochs': epochs_total,
            'best_top1': best_metric if args.eval_metric == 'top1' else None, 'best_metric': best_metric,
            'eval_metric': args.eval_metric, 'best_epoch': best_epoch,
            'final_top1': eval_metrics.get('top1'), 'final_top5': eval_metrics.get('top5'),
            'final_loss': eval_metrics.get('loss'), 'train_loss': train_metrics.get('loss'),
            'train_img_per_sec': fps, 'peak_memory_mb': peak_memory_mb(env.device),
            'amp': amp.dtype_name if args.amp else None, 'skipped_steps': amp.skipped_steps,
            'bad_images': len(train_ds.bad_files) + len(getattr(val_ds, 'bad_files', [])),
            'output_dir': out_dir, 'num_classes': num_classes, 'ranks_in_sync': in_sync,
        }
        write_json(results, os.path.join(out_dir, 'results.json'))
        logger.info(f'Training throughput: FPS: {fps:.2f}')
        if best_metric is not None:
            logger.info(f'*** Best metric: {best_metric} (epoch {best_epoch})')
        return results
    return None


if __name__ == '__main__':
    sys.exit(run_cli(main, get_args_parser))
