"""Checkpoint on a signal: preemption costs at most one optimizer step.

Schedulers stop a job with a signal and a grace period before SIGKILL: SLURM sends SIGTERM (and, with
`--signal=USR1@120`, SIGUSR1 ahead of the time limit), Kubernetes SIGTERM, torchrun forwards SIGTERM/SIGINT
(and whatever `--signals-to-handle` lists) to its workers, a terminal sends SIGINT. train.py installs a
`PreemptionHandler` for the `--preempt-signals` set; every rank calls `should_stop()` at each optimizer-step
boundary, all ranks stop at the same boundary, rank 0 writes the recovery checkpoint (the one
`--recovery-interval` writes), and the process exits with `exit_status` = 128 + the signal's number, the
status the shell, SLURM, Kubernetes and torchrun report for a process ended by that signal.

The handler only records the signal. Raising from it (Python's default for SIGINT is a KeyboardInterrupt)
would abandon whatever the main thread is doing at that moment, a checkpoint write included; polling the flag
at a step boundary sees a consistent state. Every signal after the first is counted and ignored, through the
save and until the process has exited (a second SIGTERM from a scheduler must not cut the save or the shutdown
short); SIGKILL, or SIGQUIT when it is not in the set, still ends the process at once.
"""
import logging
import os
import signal
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

from .errors import UsageError

_logger = logging.getLogger('vancls')

DEFAULT_SIGNALS = 'TERM,INT,USR1'
# Signals that mean "stop" to a scheduler or a user; KILL and STOP cannot be caught, the rest mean other things.
STOP_SIGNALS = ('TERM', 'INT', 'USR1', 'USR2', 'HUP', 'QUIT')


def parse_signals(spec: Optional[str], flag: str = '--preempt-signals') -> tuple:
    """'TERM,USR1' / 'SIGTERM,sigusr1' -> (Signals.SIGTERM, Signals.SIGUSR1); 'none' or '' -> ()."""
    if spec is None or spec.strip().lower() in ('', 'none'):
        return ()
    found = []
    for item in spec.split(','):
        name = item.strip().upper()
        name = name[3:] if name.startswith('SIG') else name
        if name not in STOP_SIGNALS:
            raise UsageError(f'{flag} {spec}: {item.strip() or "(empty)"!r} is not accepted '
                             f'(a comma list of {", ".join(STOP_SIGNALS)}, or none)')
        sig = signal.Signals[f'SIG{name}']
        if sig not in found:
            found.append(sig)
    return tuple(found)


def _write_stderr(text: str):
    """os.write, not logging: the main thread may be inside a write to the same buffered stream, and a buffered
    writer refuses a re-entrant call from a signal handler."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


def exit_status(sig: signal.Signals) -> int:
    """128 + signal number: 143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1 (Linux numbering)."""
    return 128 + int(sig)


def loader_worker_init(worker_id: int = 0):
    """DataLoader `worker_init_fn`: keep loader workers alive while the main process finishes its step and saves.

    A signal sent to a whole process group (torchrun's agent uses killpg, a terminal's Ctrl-C reaches the
    foreground group) would otherwise also hit the loader workers: SIGINT/SIGUSR1 end them (default action),
    and the main process's DataLoader then raises "worker exited unexpectedly" at an arbitrary point, possibly
    mid-save. A new session takes the worker out of those groups; the stop signals are ignored for deliveries
    that reach every process anyway (SLURM signals the whole step). SIGTERM keeps torch's worker handler: the
    main process still ends its workers with it, and the workers exit by themselves when the main process is gone.
    """
    try:
        os.setsid()
    except OSError:  # already a session leader
        pass
    for name in STOP_SIGNALS:
        if name != 'TERM':
            signal.signal(getattr(signal, f'SIG{name}'), signal.SIG_IGN)


class PreemptionHandler:
    """Install with `with PreemptionHandler(signals, env) as preempt:`. The previous handlers come back when the
    block ends without a stop. After a stop the process is about to exit: the signals are then ignored (SIG_IGN,
    which Python's finalization keeps, where it resets Python-level handlers to the default action);
    `restore()` undoes that.

    `should_stop()` is collective on distributed runs: every rank must call it at every optimizer-step boundary
    (the same number of times), so that ranks that saw the signal at different steps still stop at the same one.
    """

    def __init__(self, signals=DEFAULT_SIGNALS, env=None):
        self.signals = parse_signals(signals) if isinstance(signals, str) or signals is None else tuple(signals)
        self.env = env
        self.received: Optional[signal.Signals] = None  # the first signal this process got
        self.agreed: Optional[signal.Signals] = None  # the signal every rank stops for (the largest number seen)
        self.ignored = 0  # signals after the first (ignored)
        self.received_at: Optional[float] = None  # time.monotonic() of the first signal
        self._previous = {}
        self._pid = os.getpid()
        self._group = None
        self._farewell = None  # set by arm(): a signal now ends the process at once, with this line

    def __enter__(self):
        self.install()
        return self

    def __exit__(self, *exc):
        if self.agreed is None:
            self.restore()
        else:
            for sig in self._previous:
                signal.signal(sig, signal.SIG_IGN)

    @property
    def distributed(self) -> bool:
        return self.env is not None and getattr(self.env, 'distributed', False)

    def install(self):
        if not self.signals:
            return
        if threading.current_thread() is not threading.main_thread():
            _logger.warning('--preempt-signals: not installed (signal handlers need the main thread)')
            return
        if self.distributed and self.env.backend != 'gloo':
            # The flag is a CPU int: a gloo side group reduces it without a device sync per step (nccl/hccl need
            # device tensors). Created here, at the same point on every rank, as new_group requires.
            self._group = dist.new_group(backend='gloo')
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self):
        """Put the previous handlers back (a later signal then acts as it did before install)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:  # a forked child that inherited the handler (a loader worker): not ours
            return
        sig = signal.Signals(signum)
        rank = getattr(self.env, 'rank', 0) if self.env is not None else 0
        if self.received is None and self.agreed is None and self._farewell is not None:
            self._exit_at_once(sig, rank)
        if self.received is None and self.agreed is None:
            self.received, self.received_at = sig, time.monotonic()
            note = 'stopping after the current optimizer step to write a recovery checkpoint'
        else:
            self.ignored += 1
            note = 'ignored: already stopping (the checkpoint is written first)'
        _write_stderr(f'[rank {rank}] received {sig.name}: {note}\n')

    def arm(self, farewell, log_file: Optional[str] = None):
        """Nothing has trained since the last checkpoint (or the start): a signal from now on ends the process at
        once, with `farewell(signal)` (the line to log) on stdout and appended to `log_file`. Called at the start of
        each epoch, after every rank has passed the epoch-end save's stop check (a collective), so that all ranks
        are armed together; the first step boundary disarms it.

        The handler exits itself (os._exit) instead of raising: an exception raised from a signal handler surfaces
        wherever the main thread is, and inside a weakref callback or __del__ (torch.compile runs many) Python
        prints and drops it, so the run would go on. With nothing to save there is nothing to unwind; the
        interpreter's shutdown would only wait for torch.compile's workers to finish the compile in flight."""
        self._farewell, self._log_file = farewell, log_file

    def _exit_at_once(self, sig: signal.Signals, rank: int):
        _write_stderr(f'[rank {rank}] received {sig.name}: nothing trained since the last checkpoint, exiting now\n')
        if rank == 0:
            line = self._farewell(sig)
            try:
                os.write(1, f'{line}\n'.encode())
                if self._log_file:
                    fd = os.open(self._log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                    try:  # the format of train.log's other lines (vancls/reports.setup_logging)
                        os.write(fd, f'{time.strftime("%Y-%m-%d %H:%M:%S")},000 INFO {line}\n'.encode())
                    finally:
                        os.close(fd)
            except OSError:
                pass
        os._exit(exit_status(sig))

    def should_stop(self) -> bool:
        """True when any rank has received one of the signals (one all_reduce of one int on distributed runs)."""
        self._farewell = None  # a step has completed: a signal now waits for the step boundary
        if self.agreed is not None:
            return True
        if not self.signals:
            return False  # the same on every rank: no collective needed
        code = int(self.received or 0)
        if self.distributed:
            flag = torch.tensor([code], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            code = int(flag.item())
        if code:
            self.agreed = signal.Signals(code)
        return self.agreed is not None

    @property
    def exit_status(self) -> int:
        return exit_status(self.agreed) if self.agreed is not None else 0

    def finish(self):
        """After the checkpoint is written: wait until every rank is here (rank 0 wrote the file)."""
        if self.distributed:
            dist.barrier(group=self._group)

    def describe(self, epoch: int, step: int, total_steps: int, num_updates: int, path: str,
                 command: str = '--resume auto') -> str:
        """The one log line of a preemption: signal, position, file, exit status."""
        after = (f' {time.monotonic() - self.received_at:.1f} s after the signal'
                 if self.received_at is not None else '')
        ignored = f'; {self.ignored} further signal(s) ignored' if self.ignored else ''
        return (f'Preempted by {self.agreed.name} at epoch {epoch}, step {step}/{total_steps} (update {num_updates}): '
                f'checkpoint {path} written{after}{ignored}; '
                f'exit status {self.exit_status}, continue with: {command}')
