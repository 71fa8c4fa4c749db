"""The train and eval loops.

Throughput is measured as the port does: global images (batch x world size) over wall time, skipping the
first `WARMUP_STEPS` steps of each epoch (compilation, allocator and loader warm-up). An epoch of no more steps
than that is timed whole (and says so), so that a short run still reports a throughput.
"""
import contextlib
import logging
import sys
import time
from dataclasses import InitVar, asdict, dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from . import faults
from .device import Amp, DistEnv, all_reduce_sum, synchronize
from .errors import NonFiniteLossError  # one module for the error classes

_logger = logging.getLogger('vancls')
WARMUP_STEPS = 5


@dataclass
class EpochState:
    """Running sums of one training epoch; saved in recovery checkpoints so a resumed epoch reports the same."""
    loss_sum: float = 0.
    loss_count: int = 0
    timed_images: int = 0
    timed_seconds: float = 0.
    # Accepted and dropped: recovery checkpoints written before it was removed (it was never reported) hold it.
    data_seconds: InitVar[float] = 0.

    def state_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainLoop:
    """What stays the same over the epochs of one run: the objects a training step uses and the loop's settings.

    `on_step(step_in_epoch, num_updates, state)` runs every `recovery_interval` optimizer steps (recovery
    checkpoints; not on the epoch's last step, whose state the end-of-epoch checkpoint holds), and at the step
    where `should_stop()` (vancls.preempt; called by every rank at every step boundary) returns True; the epoch
    then ends there with metrics['preempted'] True.
    """
    model: torch.nn.Module  # possibly wrapped (DDP, torch.compile)
    loader: Any
    optimizer: torch.optim.Optimizer
    loss_fn: Callable
    amp: Amp
    env: DistEnv
    steps_per_epoch: int
    lr_scheduler: Any = None
    model_ema: Any = None
    mixup_fn: Optional[Callable] = None
    grad_accum_steps: int = 1
    clip_grad: Optional[float] = None
    clip_mode: str = 'norm'
    log_interval: int = 50
    channels_last: bool = False
    recovery_interval: int = 0
    on_step: Optional[Callable[[int, int, EpochState], None]] = None
    should_stop: Optional[Callable[[], bool]] = None


def _progress(epoch: int, step: int, total: int):
    """A one-line progress bar, only when stdout is a terminal (logs and pipes get the log-interval lines)."""
    if sys.stdout.isatty():
        width = 30
        done = int(width * step / max(total, 1))
        sys.stdout.write(f'\r{epoch}: [{"#" * done}{"." * (width - done)}] {step}/{total}')
        sys.stdout.write('\n' if step >= total else '')
        sys.stdout.flush()


class _FiniteCheck:
    """NaN/inf detection without a per-step device sync: the first bad step is recorded on the device and read
    back only at log intervals, before any checkpoint, and at the end of the epoch.

    Rule: every rank must call `check()` at the same steps (they are deterministic: log interval, recovery
    interval, end of epoch), because on distributed runs it is an all-reduce: a rank that skipped it would
    leave the others waiting forever. All ranks then raise together, so none is left in a collective.
    """

    def __init__(self, env: DistEnv, epoch: int, total_steps: int):
        self.env, self.epoch, self.total_steps = env, epoch, total_steps
        self.first_bad = torch.full((), -1, dtype=torch.long, device=env.device)

    def record(self, loss: torch.Tensor, step: int):
        bad = ~torch.isfinite(loss.detach())
        self.first_bad = torch.where((self.first_bad < 0) & bad, torch.full_like(self.first_bad, step),
                                     self.first_bad)

    def check(self):
        bad = int(self.first_bad.item())
        if self.env.distributed:
            t = torch.tensor([bad if bad >= 0 else 2 ** 62], device=_collective_device(self.env))
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            bad = int(t.item()) if int(t.item()) < 2 ** 62 else -1
        if bad >= 0:
            raise NonFiniteLossError(f'non-finite loss at epoch {self.epoch}, step {bad + 1}/{self.total_steps}: '
                                     f'stopping; the last good checkpoint is kept (lower --lr, use --clip-grad, '
                                     f'or check data)')


def _collective_device(env: DistEnv) -> torch.device:
    return env.device if env.backend != 'gloo' else torch.device('cpu')


def _throughput_window(step: int, start_step: int, timer_start: Optional[float], first_start: float):
    """(optimizer steps timed, when their clock started, whether the warm-up is included): the steps after the
    WARMUP_STEPS of this epoch, or all its steps when it has not run more than those."""
    if timer_start is not None and step - start_step > WARMUP_STEPS:
        return step - start_step - WARMUP_STEPS, timer_start, False
    return step - start_step, first_start, True


def _forward_backward(loop: TrainLoop, inputs, targets, last_micro: bool, num_updates: int):
    """One micro-batch: forward under autocast, loss, backward (gradient all-reduce only on the last micro-batch
    of an accumulation). Returns the (unscaled) loss."""
    skip_sync = loop.env.distributed and not last_micro and hasattr(loop.model, 'no_sync')
    with loop.model.no_sync() if skip_sync else contextlib.nullcontext():
        with loop.amp.autocast():
            loss = loop.loss_fn(loop.model(inputs), targets)
        if faults.nan_loss(num_updates) and last_micro:
            loss = loss * float('nan')
        loop.amp.backward(loss / loop.grad_accum_steps, loop.optimizer)
    return loss


def _optimizer_step(loop: TrainLoop, num_updates: int) -> int:
    loop.amp.step(loop.optimizer, loop.model.parameters(), clip_grad=loop.clip_grad, clip_mode=loop.clip_mode)
    loop.optimizer.zero_grad(set_to_none=True)
    if loop.model_ema is not None:
        loop.model_ema.update(loop.model)
    num_updates += 1
    faults.after_update(num_updates)
    if loop.lr_scheduler is not None:
        loop.lr_scheduler.step_update(num_updates=num_updates)
    return num_updates


def train_one_epoch(loop: TrainLoop, epoch: int, start_step: int = 0, num_updates: int = 0,
                    state: Optional[EpochState] = None):
    """Train one epoch of `loop.steps_per_epoch` optimizer steps from step `start_step`; returns
    (metrics, num_updates). `state` carries the sums of a resumed epoch."""
    state = state or EpochState()
    env, total_steps = loop.env, loop.steps_per_epoch
    loop.model.train()
    finite = _FiniteCheck(env, epoch, total_steps)
    loss_sum_dev = torch.zeros((), dtype=torch.float64, device=env.device)
    loss_count, step, micro, global_batch, timer_start, first_start = 0, start_step, 0, None, None, None
    preempted = False
    t_data = time.perf_counter()
    loop.optimizer.zero_grad(set_to_none=True)

    def flush_loss():  # device-side loss sums into the (checkpointed) epoch state
        nonlocal loss_count
        state.loss_sum += float(loss_sum_dev.item())
        state.loss_count += loss_count
        loss_sum_dev.zero_()
        loss_count = 0

    for inputs, targets in loop.loader:
        if step >= total_steps:
            break
        data_time = time.perf_counter() - t_data
        if inputs.device != env.device:  # the prefetcher already delivers on the device
            inputs, targets = inputs.to(env.device, non_blocking=True), targets.to(env.device, non_blocking=True)
        if loop.mixup_fn is not None:
            inputs, targets = loop.mixup_fn(inputs, targets)
        if loop.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        if global_batch is None:
            global_batch = inputs.shape[0] * env.world_size * loop.grad_accum_steps
            synchronize(env.device)
            first_start = time.perf_counter()  # the clock of an epoch too short to skip its warm-up
        micro += 1
        last_micro = micro % loop.grad_accum_steps == 0
        loss = _forward_backward(loop, inputs, targets, last_micro, num_updates)
        finite.record(loss, step)
        loss_sum_dev += loss.detach().double()
        loss_count += 1
        if not last_micro:
            t_data = time.perf_counter()
            continue
        num_updates = _optimizer_step(loop, num_updates)
        step += 1

        # Throughput: start the clock after the warm-up steps of this epoch.
        if step - start_step == WARMUP_STEPS:
            synchronize(env.device)
            timer_start = time.perf_counter()
        last_step = step >= total_steps
        if step % loop.log_interval == 0 or last_step:
            finite.check()
            synchronize(env.device)
            timed_steps, clock, _ = _throughput_window(step, start_step, timer_start, first_start)
            fps = timed_steps * global_batch / (time.perf_counter() - clock)
            if env.is_main:
                _logger.info(f'Train: {epoch} [{step:>4d}/{total_steps}] loss: {loss.item():.4f} '
                             f'lr: {loop.optimizer.param_groups[0]["lr"]:.3e} FPS: {fps:.2f} '
                             f'data: {data_time * 1000:.1f}ms')
        elif env.is_main:
            _progress(epoch, step, total_steps)
        preempted = loop.should_stop is not None and loop.should_stop()
        if loop.on_step is not None and (preempted or (loop.recovery_interval > 0 and not last_step
                                                       and step % loop.recovery_interval == 0)):
            finite.check()  # never save a checkpoint after a non-finite loss
            flush_loss()
            loop.on_step(step, num_updates, state)
        if preempted:
            break
        t_data = time.perf_counter()

    finite.check()
    synchronize(env.device)
    if step > start_step:
        timed_steps, clock, whole = _throughput_window(step, start_step, timer_start, first_start)
        state.timed_images += timed_steps * global_batch
        state.timed_seconds += time.perf_counter() - clock
        if whole and env.is_main and not preempted:
            _logger.info(f'Train: epoch {epoch} ran {timed_steps} steps, not more than the {WARMUP_STEPS} warm-up '
                         f'steps that throughput skips: its FPS is over all of them (warm-up included)')
    flush_loss()
    loss_sum, loss_count_all = all_reduce_sum([state.loss_sum, state.loss_count], env)
    metrics = {
        'loss': loss_sum / max(loss_count_all, 1),
        'img_per_sec': state.timed_images / state.timed_seconds if state.timed_seconds > 0 else 0.,
        'timed_images': state.timed_images, 'timed_seconds': state.timed_seconds,
        'lr': loop.optimizer.param_groups[0]['lr'], 'steps': step, 'preempted': preempted,
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
        faults.during_eval()  # fault injection (VANCLS_FAULT=signal:eval=N): a signal while evaluating
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
        sums = sums.to(_collective_device(env))
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
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
