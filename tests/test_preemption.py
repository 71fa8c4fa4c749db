"""Checkpoint on a signal (vancls/preempt.py): real signals, sent from outside to train.py and to torchrun, stop
every rank at one optimizer-step boundary, write recovery.pth.tar, exit with 128 + the signal, and
`--resume auto` ends bitwise equal to an uninterrupted run."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import FAST_TRAIN_ARGS, ROOT, cli_env, run_cli

# 2 epochs x 8 steps of batch 16 with the reference's random augmentations (RandAugment, erasing, mixup/cutmix,
# drop path): exactness depends on the RNG states being saved and restored. A log line per step.
PREEMPT_ARGS = [*FAST_TRAIN_ARGS, '-b', '16', '--epochs', '2', '--max-steps', '8', '--seed', '7',
                '--drop-path', '0.1', '--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25', '--mixup', '0.8',
                '--cutmix', '1.0', '--smoothing', '0.1', '--log-interval', '1', '--experiment', 'run']
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']


def _shutdown_timeout_args() -> list:
    """More time for the workers' save after the launcher's SIGTERM, where torchrun has the option (torch >= 2.2;
    before, workers get its fixed 30 s)."""
    from torch.distributed.run import get_args_parser
    return ['--shutdown-timeout=300'] if '--shutdown-timeout' in get_args_parser()._option_string_actions else []


# ---------------------------------------------------------------------------------------------------------------
# In-process: the handler itself.

def test_parse_signals_accepts_names_and_none():
    from vancls.config import UsageError
    from vancls.preempt import exit_status, parse_signals
    assert parse_signals('TERM, sigusr1,INT,TERM') == (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    assert parse_signals('none') == () and parse_signals('') == ()
    assert [exit_status(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)] == [143, 130, 138]
    for bad in ('KILL', 'TERM,FOO', 'TERM,'):
        with pytest.raises(UsageError, match='--preempt-signals .*(TERM, INT, USR1, USR2, HUP, QUIT)'):
            parse_signals(bad)


def test_first_signal_recorded_later_ones_ignored_handlers_restored():
    from vancls.preempt import PreemptionHandler
    before = signal.getsignal(signal.SIGINT)
    with PreemptionHandler('INT,USR1') as preempt:
        assert not preempt.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)  # would end the process with the default action
        assert preempt.should_stop() and preempt.agreed == signal.SIGUSR1 and preempt.exit_status == 138
        os.kill(os.getpid(), signal.SIGINT)  # would raise KeyboardInterrupt with the default handler
        assert preempt.ignored == 1 and preempt.agreed == signal.SIGUSR1
        preempt.finish()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # after a stop: ignored until the process exits
    os.kill(os.getpid(), signal.SIGINT)
    preempt.restore()
    assert signal.getsignal(signal.SIGINT) is before
    with PreemptionHandler('none') as off:
        assert signal.getsignal(signal.SIGINT) is before and not off.should_stop()


def test_signal_during_save_does_not_interrupt_it(tmp_path, monkeypatch):
    """SIGINT between the complete temporary file and the rename (a real signal, VANCLS_FAULT=signal:save=1):
    with the handler the write completes; Python's default (KeyboardInterrupt) abandons it."""
    from vancls import checkpoint, faults
    from vancls.preempt import PreemptionHandler
    monkeypatch.setenv('VANCLS_FAULT', 'signal:save=1:sig=INT')
    mgr = checkpoint.CheckpointManager(str(tmp_path / 'a'))
    os.makedirs(mgr.folder)
    monkeypatch.setattr(faults, '_saves', 0)
    # Python's default handler, whatever an earlier test in this process left (a run stopped by a signal leaves
    # its signals ignored: the process is then about to exit)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            mgr.save_recovery({'epoch': 0, 'step_in_epoch': 1, 'state_dict': {'w': torch.ones(2)}})
    finally:
        signal.signal(signal.SIGINT, before)
    assert os.listdir(mgr.folder) == []  # abandoned: neither the file nor a temporary one
    monkeypatch.setattr(faults, '_saves', 0)
    with PreemptionHandler('INT') as preempt:
        os.kill(os.getpid(), signal.SIGINT)  # the first signal: what stops training
        mgr.save_recovery({'epoch': 0, 'step_in_epoch': 1, 'state_dict': {'w': torch.ones(2)}})  # the second
        assert preempt.ignored == 1
        preempt.restore()
    assert os.listdir(mgr.folder) == ['recovery.pth.tar']
    assert torch.equal(torch.load(tmp_path / 'a' / 'recovery.pth.tar', weights_only=True)['state_dict']['w'],
                       torch.ones(2))


def _agreement_worker(rank, init_file, plan, results):
    import torch.distributed as dist
    from vancls.device import DistEnv
    from vancls.preempt import PreemptionHandler
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    env = DistEnv(device=torch.device('cpu'), rank=rank, local_rank=rank, world_size=2, backend='gloo')
    with PreemptionHandler('TERM,USR1', env) as preempt:
        for step in range(1, 20):
            if plan.get((rank, step)):
                os.kill(os.getpid(), plan[(rank, step)])
            if preempt.should_stop():
                break
        preempt.finish()
    results[rank] = (step, preempt.exit_status)
    dist.destroy_process_group()


@pytest.mark.oldtorch
@pytest.mark.slow
@pytest.mark.parametrize('plan,expect', [
    ({(1, 3): signal.SIGTERM}, (3, 143)),  # one rank only: both stop at that step
    ({(0, 5): signal.SIGUSR1, (1, 7): signal.SIGTERM}, (5, 138)),  # different steps: the first one counts
    ({(0, 4): signal.SIGUSR1, (1, 4): signal.SIGTERM}, (4, 143)),  # same step, different signals: one status
])
def test_ranks_agree_on_the_step_and_the_status(tmp_path, plan, expect):
    import torch.multiprocessing as mp
    # spawn, not fork: a fork of the multi-threaded pytest worker hung once in a rank on torch 2.1 (a lock held by
    # another thread at fork time); spawned ranks start clean.
    ctx = mp.get_context('spawn')
    results = ctx.Manager().dict()
    procs = [ctx.Process(target=_agreement_worker, args=(r, str(tmp_path / 'init'), plan, results))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    hung = [p for p in procs if p.exitcode is None]
    for p in hung:
        p.kill()
    assert [p.exitcode for p in procs] == [0, 0], f'{len(hung)} rank(s) hung and were killed'
    assert results[0] == results[1] == expect


# ---------------------------------------------------------------------------------------------------------------
# Subprocesses: train.py and torchrun, signalled from outside.

class _Proc:
    """A started command whose merged output is collected line by line (so a test can wait for a line)."""

    def __init__(self, cmd, env):
        self.p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)
        self.lines = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(self.p.stdout.readline, '')),
                                        daemon=True)
        self._reader.start()

    @property
    def output(self):
        return ''.join(self.lines)

    def wait_for(self, text, timeout=600):
        end = time.monotonic() + timeout
        while text not in self.output:
            assert self.p.poll() is None, f'exited ({self.p.returncode}) before {text!r}:\n{self.output[-3000:]}'
            assert time.monotonic() < end, f'no {text!r} after {timeout} s:\n{self.output[-3000:]}'
            time.sleep(0.02)

    def wait(self, timeout=600):
        rc = self.p.wait(timeout)
        self._reader.join(30)
        return rc


def _env(**extra):
    return cli_env(PYTHONUNBUFFERED=1, **extra)


def _train_cmd(*args):
    return [sys.executable, os.path.join(ROOT, 'train.py'), *map(str, args)]


def _state(path):
    return torch.load(path, map_location='cpu', weights_only=True)['state_dict']


def _assert_bitwise_equal(ref_file, got_file):
    ref, got = _state(ref_file), _state(got_file)
    assert ref.keys() == got.keys()
    different = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not different, different[:10]


def _assert_intact(folder):
    """Every checkpoint loads; no temporary file is left."""
    names = os.listdir(folder)
    assert not [n for n in names if '.tmp' in n], names
    for n in names:
        if n.endswith('.pth.tar'):
            torch.load(os.path.join(folder, n), map_location='cpu', weights_only=True)


def _preempt_line(folder):
    lines = [ln for ln in open(os.path.join(folder, 'train.log')) if 'Preempted by' in ln]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope='module')
def reference_1p(digits_dir, module_tmp):
    out = module_tmp('ref1p')
    r = run_cli('train.py', digits_dir, *PREEMPT_ARGS, '--workers', '2', '--output', out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out / 'run' / 'last.pth.tar'


@pytest.mark.oldtorch
@pytest.mark.slow
def test_sigterm_from_outside_then_resume_is_bitwise_exact(digits_dir, tmp_path, reference_1p):
    """SIGTERM to the whole process group (what torchrun's agent and a terminal do: loader workers get it too),
    then more SIGTERMs every 20 ms until the process is gone (signals during the save)."""
    args = [digits_dir, *PREEMPT_ARGS, '--workers', '2', '--output', tmp_path]
    proc = _Proc(_train_cmd(*args), _env())
    proc.wait_for('Train: 0 [   3/8]')
    os.killpg(proc.p.pid, signal.SIGTERM)
    while proc.p.poll() is None:
        try:
            os.kill(proc.p.pid, signal.SIGTERM)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    assert proc.wait() == 143, proc.output[-3000:]
    folder = tmp_path / 'run'
    _assert_intact(folder)
    ckpt = torch.load(folder / 'recovery.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['epoch'] == 0 and 3 <= ckpt['step_in_epoch'] <= 8
    line = _preempt_line(folder)
    assert (f'Preempted by SIGTERM at epoch 0, step {ckpt["step_in_epoch"]}/8' in line
            and str(folder / 'recovery.pth.tar') in line and 'exit status 143' in line), line
    assert 'DataLoader worker' not in proc.output  # the loader workers outlived the signal

    r = run_cli('train.py', *args, '--resume', 'auto')
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'Resumed from {folder / "recovery.pth.tar"}: epoch 0, step {ckpt["step_in_epoch"]}' in r.stdout
    _assert_bitwise_equal(reference_1p, folder / 'last.pth.tar')
    assert not (folder / 'recovery.pth.tar').exists()  # superseded by the end-of-epoch checkpoints


@pytest.mark.slow
def test_signal_at_the_last_step_of_an_epoch(digits_dir, tmp_path, reference_1p):
    """SIGUSR1 right after update 8, the last step of epoch 0 (a real signal at an exact position): the stop comes
    before evaluation and the end-of-epoch save; the resumed run does them and ends bitwise equal."""
    args = [digits_dir, *PREEMPT_ARGS, '--workers', '2', '--output', tmp_path]
    r = run_cli('train.py', *args, env=cli_env(VANCLS_FAULT='signal:update=8:sig=USR1'))
    assert r.returncode == 138, r.stderr[-3000:]
    folder = tmp_path / 'run'
    assert 'Preempted by SIGUSR1 at epoch 0, step 8/8 (update 8)' in _preempt_line(folder)
    assert not (folder / 'last.pth.tar').exists() and 'Test:' not in r.stdout
    r = run_cli('train.py', *args, '--resume', 'auto')
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_bitwise_equal(reference_1p, folder / 'last.pth.tar')


@pytest.mark.slow
@pytest.mark.parametrize('fault,where', [
    ('signal:eval=3', 'evaluation'),  # SIGTERM before the 3rd batch of epoch 0's evaluation
    ('signal:save=1', 'save'),  # SIGTERM inside epoch 0's end-of-epoch save (temporary file written, not renamed)
])
def test_signal_during_evaluation_or_the_epoch_end_save(digits_dir, tmp_path, reference_1p, fault, where):
    """A signal while epoch 0 evaluates or writes its checkpoint: both finish (the evaluation's numbers are logged,
    the file is complete and renamed), the run stops there with 143, the newest checkpoint is that end-of-epoch
    one, and --resume auto ends bitwise equal to an uninterrupted run."""
    args = [digits_dir, *PREEMPT_ARGS, '--workers', '2', '--output', tmp_path]
    r = run_cli('train.py', *args, env=cli_env(VANCLS_FAULT=fault))
    assert r.returncode == 143, (where, r.stdout[-2000:], r.stderr[-3000:])
    assert '[rank 0] received SIGTERM: stopping' in r.stderr and r.stdout.count('Test:') == 1
    folder = tmp_path / 'run'
    _assert_intact(folder)
    assert not (folder / 'recovery.pth.tar').exists()
    last = torch.load(folder / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert last['epoch'] == 0 and not last.get('step_in_epoch')
    line = _preempt_line(folder)
    assert 'Preempted by SIGTERM at epoch 0, step 8/8' in line and str(folder / 'last.pth.tar') in line, line
    r = run_cli('train.py', *args, '--resume', 'auto')
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'Resumed from {folder / "last.pth.tar"}: epoch 1, step 0' in r.stdout
    _assert_bitwise_equal(reference_1p, folder / 'last.pth.tar')


@pytest.mark.slow
def test_sigint_like_ctrl_c_exits_130_with_the_checkpoint(digits_dir, tmp_path):
    """SIGINT to train.py's process group (a terminal's Ctrl-C): no KeyboardInterrupt, the current step ends,
    recovery.pth.tar is written and loads, and the status is 130 (128 + SIGINT), as a shell reports Ctrl-C."""
    args = [digits_dir, *PREEMPT_ARGS, '--workers', '2', '--output', tmp_path]
    proc = _Proc(_train_cmd(*args), _env())
    proc.wait_for('Train: 0 [   3/8]')
    os.killpg(proc.p.pid, signal.SIGINT)
    assert proc.wait() == 130, proc.output[-3000:]
    assert 'KeyboardInterrupt' not in proc.output and 'DataLoader worker' not in proc.output
    folder = tmp_path / 'run'
    _assert_intact(folder)
    ckpt = torch.load(folder / 'recovery.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['epoch'] == 0 and 3 <= ckpt['step_in_epoch'] <= 8
    line = _preempt_line(folder)
    assert (f'Preempted by SIGINT at epoch 0, step {ckpt["step_in_epoch"]}/8' in line and 'exit status 130' in line
            and str(folder / 'recovery.pth.tar') in line), line


@pytest.mark.slow
def test_preempt_signals_none_keeps_the_default_action(digits_dir, tmp_path):
    r = run_cli('train.py', digits_dir, *PREEMPT_ARGS, '--workers', '0', '--output', tmp_path,
                '--preempt-signals', 'none', env=cli_env(VANCLS_FAULT='signal:update=2'))
    assert r.returncode == -signal.SIGTERM
    assert not (tmp_path / 'run' / 'recovery.pth.tar').exists()
    r = run_cli('train.py', digits_dir, *PREEMPT_ARGS, '--preempt-signals', 'TERM,KILL', '--output', tmp_path)
    assert r.returncode == 2 and "--preempt-signals TERM,KILL: 'KILL' is not accepted" in r.stderr


# torchrun: one loader worker per rank (they are in the ranks' sessions, which the agent signals with killpg).
def _torchrun_args(digits_dir, out):
    return [os.path.join(ROOT, 'train.py'), digits_dir, *PREEMPT_ARGS, '--workers', '1', '--output', out]


@pytest.fixture(scope='module')
def reference_2p(digits_dir, module_tmp):
    out = module_tmp('ref2p')
    r = subprocess.run([*TORCHRUN, *map(str, _torchrun_args(digits_dir, out))], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return out / 'run' / 'last.pth.tar'


def _children(pid):
    kids = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    ppid = int(f.read().rsplit(')', 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                kids.append(int(entry))
    return kids


def _worker_pid(launcher_pid, rank):
    for pid in _children(launcher_pid):
        try:
            with open(f'/proc/{pid}/environ', 'rb') as f:
                environ = dict(item.split(b'=', 1) for item in f.read().split(b'\0') if b'=' in item)
        except OSError:
            continue
        if environ.get(b'RANK') == str(rank).encode():
            return pid
    raise AssertionError(f'no worker of rank {rank} under torchrun {launcher_pid}')


@pytest.mark.oldtorch
@pytest.mark.slow
def test_torchrun_launcher_sigterm_then_resume_is_bitwise_exact(digits_dir, tmp_path, reference_2p):
    cmd = [*TORCHRUN, *_shutdown_timeout_args(), *map(str, _torchrun_args(digits_dir, tmp_path))]
    proc = _Proc(cmd, _env())
    proc.wait_for('Train: 0 [   3/8]')
    os.kill(proc.p.pid, signal.SIGTERM)  # the launcher only: it forwards SIGTERM to the workers' sessions
    rc = proc.wait()
    # What happened, in order: the agent turned the signal into its SignalException (torchrun's exit status 1),
    # forwarded SIGTERM to both workers, and each stopped through the handler (not by the default action).
    assert rc == 1, proc.output[-3000:]
    assert f'SignalException: Process {proc.p.pid} got signal: {int(signal.SIGTERM)}' in proc.output
    for rank in (0, 1):
        assert f'[rank {rank}] received SIGTERM: stopping after the current optimizer step' in proc.output
    folder = tmp_path / 'run'
    _assert_intact(folder)
    ckpt = torch.load(folder / 'recovery.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['epoch'] == 0 and 3 <= ckpt['step_in_epoch'] <= 8
    line = _preempt_line(folder)
    assert f'Preempted by SIGTERM at epoch 0, step {ckpt["step_in_epoch"]}/8' in line and 'exit status 143' in line
    assert 'DataLoader worker' not in proc.output

    r = subprocess.run([*TORCHRUN, *map(str, _torchrun_args(digits_dir, tmp_path)), '--resume', 'auto'], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'Resumed from' in r.stdout and 'recovery.pth.tar' in r.stdout
    _assert_bitwise_equal(reference_2p, folder / 'last.pth.tar')


@pytest.mark.slow
def test_torchrun_sigterm_to_one_worker_restarts_and_resumes(digits_dir, tmp_path, reference_2p):
    """SIGTERM to rank 1 only: both ranks stop at the same step (rank 0 saves), exit 143, torchrun restarts the
    group (--max-restarts 1) and the new group continues from recovery.pth.tar to the same final weights."""
    cmd = [*TORCHRUN, '--max-restarts=1', *map(str, _torchrun_args(digits_dir, tmp_path)), '--resume', 'auto']
    # Each attempt its own store (pytorch/pytorch#135712; see test/common.sh).
    proc = _Proc(cmd, _env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1))
    proc.wait_for('Train: 0 [   3/8]')
    os.kill(_worker_pid(proc.p.pid, 1), signal.SIGTERM)
    assert proc.wait() == 0, proc.output[-3000:]
    folder = tmp_path / 'run'
    assert '[rank 1] received SIGTERM: stopping' in proc.output
    line = _preempt_line(folder)
    assert 'Preempted by SIGTERM at epoch 0' in line and 'exit status 143' in line
    assert 'Resumed from' in proc.output
    _assert_intact(folder)
    _assert_bitwise_equal(reference_2p, folder / 'last.pth.tar')
