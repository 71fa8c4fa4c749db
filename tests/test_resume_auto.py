"""Resume without guessing (train.py --resume auto names its run from the options that define it) and no waiting
for nothing (a stop signal before any step since the last checkpoint exits at once)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import FAST_TRAIN_ARGS, ROOT, cli_env


def _args(**over):
    import train
    from vancls.config import parse_with_config
    argv = ['data', '--resume', 'auto'] + [x for k, v in over.items() for x in (f'--{k.replace("_", "-")}', str(v))]
    args = parse_with_config(train.get_args_parser(), argv)
    train.check_args(args)  # what main() does before naming the run (the model's default, ...)
    return args


def test_experiment_name_is_a_function_of_what_is_trained():
    import train
    base = train.experiment_name(_args())
    assert base.startswith('van_b0-data-') and base == train.experiment_name(_args())
    # where and how fast it runs: the same run
    for k, v in dict(workers=0, output='/elsewhere', device='cpu', fast_path='none', log_interval=1,
                     recovery_interval=5).items():
        assert train.experiment_name(_args(**{k: v})) == base, k
    # what it trains: another run
    for k, v in dict(lr=0.1, epochs=3, seed=1, batch_size=16, model='van_b1').items():
        assert train.experiment_name(_args(**{k: v})) != base, k
    named = _args(experiment='mine')
    assert train.experiment_name(named) == 'mine'
    dated = _args()
    dated.resume = ''
    assert train.experiment_name(dated).endswith('-van_b0') and train.experiment_name(dated)[:8].isdigit()


_ARMED = """
import os, signal, sys, time
from vancls.preempt import PreemptionHandler
with PreemptionHandler('TERM') as preempt:
    if sys.argv[1] == 'stepped':
        preempt.arm(lambda sig: 'never', sys.argv[2])
        assert not preempt.should_stop()  # a step boundary: from now on a signal waits for the next one
        os.kill(os.getpid(), signal.SIGTERM)
        assert preempt.should_stop() and preempt.exit_status == 143
        print('stopped at the step boundary')
        sys.exit(0)
    preempt.arm(lambda sig: f'Preempted by {sig.name} before any step', sys.argv[2])
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler ends the process here
    print('not reached')
"""


def test_signal_before_any_step_exits_at_once(tmp_path):
    log = tmp_path / 'train.log'
    r = subprocess.run([sys.executable, '-c', _ARMED, 'armed', str(log)], cwd=ROOT, env=cli_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 143 and r.stdout == 'Preempted by SIGTERM before any step\n', (r.stdout, r.stderr)
    assert 'nothing trained since the last checkpoint' in r.stderr
    assert log.read_text().rstrip().endswith(' INFO Preempted by SIGTERM before any step')
    r = subprocess.run([sys.executable, '-c', _ARMED, 'stepped', str(log)], cwd=ROOT, env=cli_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and 'stopped at the step boundary' in r.stdout, (r.stdout, r.stderr)


def _no_kernels() -> bool:
    from models import fast_ops
    return not fast_ops.FAST_PATHS_AVAILABLE


@pytest.mark.slow
@pytest.mark.skipif(_no_kernels(), reason='fast-path kernels need torch >= 2.4: no compiling first step to signal')
def test_sigterm_during_the_first_compiling_step_exits_within_5_s(tmp_path):
    """224 px with the compiled kernels and an empty Inductor cache: the first step compiles for tens of seconds.
    A SIGTERM then ends the run at once (exit 143, the Preempted line), not after the step."""
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), '--dataset', 'synthetic', '--img-size', '224', '-b', '8',
           '--fast-path', 'nhwc_lka', '--epochs', '1', '--max-steps', '3', '--no-eval', '--workers', '0',
           '--device', 'cpu', '--output', str(tmp_path), '--experiment', 'x', '--log-interval', '1']
    env = cli_env(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / 'inductor'))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith('Model van_b0'):
            break
    time.sleep(3)  # inside the first step's compile
    assert proc.poll() is None, ''.join(lines)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    took = time.monotonic() - sent
    assert proc.returncode == 143, rest[-3000:]
    assert 'Preempted by SIGTERM before any step since the last checkpoint' in rest, rest[-3000:]
    assert not any(ln.startswith('Train: 0 [') for ln in rest.splitlines()), 'a step completed: not the case tested'
    assert took < 5, f'exited {took:.1f} s after the signal'


@pytest.mark.oldtorch
@pytest.mark.slow
def test_torchrun_restart_without_experiment_resumes(tmp_path, digits_dir):
    """torchrun --max-restarts 1 and --resume auto without --experiment: rank 1 is killed after epoch 0's
    checkpoint; the restarted group continues that run (same folder) and trains only epoch 1."""
    args = [*FAST_TRAIN_ARGS, '-b', '16', '--epochs', '2', '--max-steps', '4', '--workers', '0', '--resume', 'auto',
            '--output', str(tmp_path)]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '--max-restarts=1',
           os.path.join(ROOT, 'train.py'), digits_dir, *args]
    # rank 1 is SIGKILLed right after its 5th optimizer update (epoch 1's first), once (vancls/faults.py)
    env = cli_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE='1', VANCLS_FAULT='kill:update=5:rank=1',
                  VANCLS_FAULT_ONCE=str(tmp_path / 'killed'))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    folders = os.listdir(tmp_path)
    runs = [f for f in folders if f.startswith('van_b0-')]
    assert len(runs) == 1, folders
    log = open(tmp_path / runs[0] / 'train.log').read()
    assert 'Resumed from' in log and 'epoch 1, step 0' in log, log[-3000:]
    assert os.path.exists(tmp_path / runs[0] / 'results.json')
    # The same command, uninterrupted (another --output: not part of the run's name): bitwise the same weights.
    ref = tmp_path / 'uninterrupted'
    r = subprocess.run(cmd[:-1] + [str(ref)], cwd=ROOT, env=cli_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE='1'),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert os.listdir(ref) == runs  # the same name: the options that define the run are the same
    import torch
    a = torch.load(tmp_path / runs[0] / 'last.pth.tar', weights_only=True)['state_dict']
    b = torch.load(ref / runs[0] / 'last.pth.tar', weights_only=True)['state_dict']
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_failed_run_leaves_no_empty_folder(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), str(tmp_path / 'missing'), '--output',
                        str(tmp_path / 'out'), '--device', 'cpu'], env=cli_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and 'missing' in r.stderr, r.stderr[-2000:]
    assert not os.listdir(tmp_path / 'out'), os.listdir(tmp_path / 'out')


@pytest.mark.slow
def test_two_nodes_static_rendezvous_rank_0_on_node_0(tmp_path, digits_dir):
    """The README's multi-node command (static rendezvous: --master-addr/--master-port) on two 'nodes' of this
    machine, each with its own --output: --node-rank is honoured, so global rank 0, which writes the checkpoints,
    is node 0's process."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', f'--node-rank={node}',
               '--nproc_per_node=1', '--master-addr=127.0.0.1', f'--master-port={port}',
               os.path.join(ROOT, 'train.py'), digits_dir, *FAST_TRAIN_ARGS, '-b', '16', '--epochs', '1',
               '--max-steps', '2', '--workers', '0', '--no-eval', '--output', str(tmp_path / f'node{node}'),
               '--experiment', 'e']
        procs.append(subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert os.path.isfile(tmp_path / 'node0' / 'e' / 'last.pth.tar')
    assert not os.path.exists(tmp_path / 'node1' / 'e' / 'last.pth.tar')
