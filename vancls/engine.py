"""The train and eval loops.

Throughput is measured as the port does: global images (batch x world size) over wall time, skipping the
first `WARMUP_STEPS` steps of each epoch (compilation, allocator and loader warm-up).
"""
import contextlib
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import faults
from .device import Amp, DistEnv, all_reduce_sum, synchronize

_logger = logging.getLogger('vancls')
WARMUP_STEPS = 5


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and step."""


@dataclass
class EpochState:
    """Running sums of one training epoch; saved in recovery checkpoints so a resumed epoch reports the same."""
    loss_sum: float = 0.
    loss_count: int = 0
    timed_images: int = 0
    timed_seconds: float = 0.
    data_seconds: float = 0.
    extra: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return dict(loss_sum=self.loss_sum, loss_count=self.loss_count, timed_images=self.timed_images,
                    timed_seconds=self.timed_seconds, data_seconds=self.data_seconds)


def _progress(epoch: int, step: int, total: int):
    """A one-line progress bar, only when stdout is a terminal (logs and pipes get the log-interval lines)."""
    if sys.stdout.isatty():
        width = 30
        done = int(width * step / max(total, 1))
        sys.stdout.write(f'\r{epoch}: [{"#" * done}{"." * (width - done)}] {step}/{total}')
        sys.stdout.write('\n' if step >= total else '')
        sys.stdout.flush()


def train_one_epoch(
        epoch: int, model, loader, optimizer, loss_fn, amp: Amp, env: DistEnv, total_steps: int, *,
        lr_scheduler=None, model_ema=None, mixup_fn=None, start_step: int = 0, num_updates: int = 0,
        grad_accum_steps: int = 1, clip_grad: Optional[float] = None, clip_mode: str = 'norm',
        log_interval: int = 50, channels_last: bool = False, state: Optional[EpochState] = None,
        on_step: Optional[Callable[[int, int, EpochState], None]] = None, recovery_interval: int = 0,
        max_steps: Optional[int] = None,
):
    """Train one epoch of `total_steps` optimizer steps from step `start_step`; returns (metrics, num_updates).

    `on_step(step_in_epoch, num_updates, state)` runs every `recovery_interval` optimizer steps (recovery
    checkpoints; not on the epoch's last step, whose state the end-of-epoch checkpoint holds).
    The loss is checked for NaN/inf without a per-step device sync: the first bad step is recorded on the device
    and checked at each log interval, before any checkpoint, and at the end of the epoch.
    """
    state = state or EpochState()
    model.train()
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    global_batch = None
    first_bad = torch.full((), -1, dtype=torch.long, device=env.device)
    loss_sum_dev = torch.zeros((), dtype=torch.float64, device=env.device)
    loss_count = 0
    step = start_step
    micro = 0
    timer_start = None
    t_data = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)

    def check_finite():
        bad = int(first_bad.item())
        if env.distributed:
            t = torch.tensor([bad if bad >= 0 else 2 ** 62], device=env.device if env.backend != 'gloo' else 'cpu')
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            bad = int(t.item()) if int(t.item()) < 2 ** 62 else -1
        if bad >= 0:
            raise NonFiniteLossError(f'non-finite loss at epoch {epoch}, step {bad + 1}/{total_steps}: stopping; '
                                     f'the last good checkpoint is kept (lower --lr, use --clip-grad, or check data)')

    for inputs, targets in loader:
        if step >= total_steps:
            break
        data_time = time.perf_counter() - t_data
        if inputs.device != env.device:  # the prefetcher already delivers on the device
            inputs, targets = inputs.to(env.device, non_blocking=True), targets.to(env.device, non_blocking=True)
        if mixup_fn is not None:
            inputs, targets = mixup_fn(inputs, targets)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        if global_batch is None:
            global_batch = inputs.shape[0] * env.world_size * grad_accum_steps
        last_micro = (micro + 1) % grad_accum_steps == 0
        skip_sync = env.distributed and not last_micro and hasattr(model, 'no_sync')
        with model.no_sync() if skip_sync else contextlib.nullcontext():
            with amp.autocast():
                output = model(inputs)
                loss = loss_fn(output, targets)
            if faults.nan_loss(num_updates) and last_micro:
                loss = loss * float('nan')
            finite = torch.isfinite(loss.detach())
            first_bad = torch.where((first_bad < 0) & ~finite, torch.full_like(first_bad, step), first_bad)
            loss_sum_dev += loss.detach().double()
            loss_count += 1
            amp.backward(loss / grad_accum_steps, optimizer)
        micro += 1
        if not last_micro:
            t_data = time.perf_counter()
            continue
        amp.step(optimizer, model.parameters(), clip_grad=clip_grad, clip_mode=clip_mode)
        optimizer.zero_grad(set_to_none=True)
        if model_ema is not None:
            model_ema.update(model)
        num_updates += 1
        step += 1
        faults.after_update(num_updates)
        state.data_seconds += data_time
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)

        # Throughput: start the clock after the warm-up steps of this epoch.
        if step - start_step == WARMUP_STEPS:
            synchronize(env.device)
            timer_start = time.perf_counter()
        last_step = step >= total_steps
        if step % log_interval == 0 or last_step:
            check_finite()
            synchronize(env.device)
            loss_val = loss.item()
            fps = 0.
            if timer_start is not None and step - start_step > WARMUP_STEPS:
                fps = (step - start_step - WARMUP_STEPS) * global_batch / (time.perf_counter() - timer_start)
            lr = optimizer.param_groups[0]['lr']
            if env.is_main:
                _logger.info(f'Train: {epoch} [{step:>4d}/{total_steps}] loss: {loss_val:.4f} lr: {lr:.3e} '
                             f'FPS: {fps:.2f} data: {data_time * 1000:.1f}ms')
        elif env.is_main:
            _progress(epoch, step, total_steps)
        if on_step is not None and recovery_interval > 0 and step % recovery_interval == 0 and not last_step:
            check_finite()  # never save a checkpoint after a non-finite loss
            state.loss_sum += float(loss_sum_dev.item())
            state.loss_count += loss_count
            loss_sum_dev.zero_()
            loss_count = 0
            on_step(step, num_updates, state)
        t_data = time.perf_counter()

    check_finite()
    synchronize(env.device)
    if timer_start is not None and step - start_step > WARMUP_STEPS:
        state.timed_images += (step - start_step - WARMUP_STEPS) * global_batch
        state.timed_seconds += time.perf_counter() - timer_start
    state.loss_sum += float(loss_sum_dev.item())
    state.loss_count += loss_count
    loss_sum, loss_count_all = all_reduce_sum([state.loss_sum, state.loss_count], env)
    metrics = {
        'loss': loss_sum / max(loss_count_all, 1),
        'img_per_sec': state.timed_images / state.timed_seconds if state.timed_seconds > 0 else 0.,
        'timed_images': state.timed_images, 'timed_seconds': state.timed_seconds,
        'lr': optimizer.param_groups[0]['lr'], 'steps': step,
    }
    return metrics, num_updates


@torch.no_grad()
def evaluate(model, loader, env: DistEnv, amp: Amp, channels_last: bool = False, log_prefix: str = 'Test'):
    """Top-1, top-5 and mean cross-entropy over the whole (unpadded, sharded) set; exact counts over ranks."""
    model.eval()
    loss_fn = torch.nn.CrossEntropyLoss(reduction='sum')
    sums = torch.zeros(4, dtype=torch.float64, device=env.device)  # loss, correct1, correct5, count
    timed, t0 = 0, None
    for i, (inputs, targets) in enumerate(loader):
        if inputs.device != env.device:
            inputs, targets = inputs.to(env.device, non_blocking=True), targets.to(env.device, non_blocking=True)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        # Time the batches after the first WARMUP_STEPS; a set of fewer batches is timed whole.
        if i == 0 or i == WARMUP_STEPS:
            synchronize(env.device)
            t0, timed = time.perf_counter(), 0
        timed += inputs.shape[0]
        with amp.autocast():
            output = model(inputs)
        output = output.float()
        k = min(5, output.shape[1])
        top = output.topk(k, dim=1).indices
        correct = top.eq(targets[:, None])
        sums += torch.stack([loss_fn(output, targets).double(), correct[:, :1].sum().double(),
                             correct.sum().double(), torch.tensor(float(targets.numel()), dtype=torch.float64,
                                                                  device=sums.device)])
    synchronize(env.device)
    seconds = time.perf_counter() - t0 if t0 is not None else 0.
    if env.distributed:
        s = sums.cpu() if env.backend == 'gloo' else sums
        dist.all_reduce(s, op=dist.ReduceOp.SUM)
        sums = s
    loss, c1, c5, n = sums.tolist()
    ips = all_reduce_sum([timed / seconds if seconds > 0 else 0.], env)[0]
    if n == 0:
        raise RuntimeError('evaluation set is empty')
    metrics = {'loss': loss / n, 'top1': 100. * c1 / n, 'top5': 100. * c5 / n, 'num_images': int(n),
               'img_per_sec': ips}
    if env.is_main:
        _logger.info(f'{log_prefix}: loss {metrics["loss"]:.4f} top1 {metrics["top1"]:.3f} '
                     f'top5 {metrics["top5"]:.3f} ({int(n)} images)')
    return metrics
