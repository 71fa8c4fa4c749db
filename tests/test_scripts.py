"""Tests of the Ascend ModelZoo launch scripts test/*.sh (issue "test/*.sh: the Ascend ModelZoo launch scripts").

Two kinds of tests, all on the CPU:
- real runs, scaled down with the scripts' environment overrides (van_b0, 32x32 digits, batch 16, 6 steps, AMP off,
  NPROC=2 for the 8p scripts): every script trains or evaluates for real and its Final lines, ${CaseName}.log and
  results.json are checked; train_eval_8p.sh, given no MODEL or IMG_SIZE, reproduces the full run's best top-1;
  train_finetune_1p.sh starts from a 10-class checkpoint on a 5-class set; SIGTERM to train_full_8p.sh's PID and
  SIGUSR1 to its process group stop it with a recovery checkpoint (exit 143 / 138), and the rerun ends bitwise
  equal to the uninterrupted run; the README's CPU example finds the repository's .venv;
- stub runs: PYTHON points at a stand-in for the interpreter that records how train.py / validate.py / torchrun are
  called and writes a chosen results.json instead of training (everything else it hands to the real python). They
  check the defaults (van_base, 128 per device, lr 1e-3, drop path 0.1, AMP, 300(+10) epochs, 500 perf steps,
  torchrun --nproc_per_node=8 --max-restarts, --resume auto), the arguments, the model taken from the checkpoint
  (evaluation, fine-tuning), the device order of vancls.device (a fake torch_npu), and that a missing or invalid
  value in results.json, a failing or silent train.py, and bad data paths end with a non-zero exit, a clear message
  and no Final line.

OMP_NUM_THREADS=1 keeps each process on one thread: on a small shared CPU, PyTorch's default of one thread per core
in every process is ten times slower. `--aa none` (forwarded after `--`) turns RandAugment off to keep the
scaled-down runs short.
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

pytestmark = pytest.mark.slow  # every test here runs a launch script in a subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, 'test')
DIGITS = os.path.join(ROOT, 'data', 'digits')
OVERRIDES = ('NPROC', 'MODEL', 'BATCH_SIZE', 'EPOCHS', 'MAX_STEPS', 'IMG_SIZE', 'DEVICE', 'AMP', 'WORKERS', 'LR',
             'DROP_PATH', 'OUTPUT_ROOT', 'PYTHON', 'TORCHRUN', 'RESUME', 'MAX_RESTARTS', 'RECOVERY_INTERVAL',
             'NETWORK', 'ASCEND_DEVICE_ID', 'ASCEND_RT_VISIBLE_DEVICES', 'CUDA_VISIBLE_DEVICES', 'CANN_SET_ENV',
             'VAN_CANN_SOURCED')
SMALL = {'MODEL': 'van_b0', 'BATCH_SIZE': '16', 'IMG_SIZE': '32', 'MAX_STEPS': '6', 'EPOCHS': '1', 'AMP': '0',
         'WORKERS': '0', 'DEVICE': 'cpu', 'MAX_RESTARTS': '0', 'OMP_NUM_THREADS': '1'}
FAST = ['--', '--aa', 'none']
FINAL_FPS = re.compile(r'^Final Performance images/sec : (\S+)$', re.M)
FINAL_ACC = re.compile(r'^Final Train Accuracy : (\S+)$', re.M)
FINAL_E2E = re.compile(r'^E2E Training Duration sec : (\S+)$', re.M)
CASE_FIELDS = ('Network', 'RankSize', 'BatchSize', 'DeviceType', 'CaseName', 'ActualFPS', 'TrainingTime',
               'ActualLoss', 'E2ETrainingTime')


def script_env(out_root, env=None, small=True):
    e = {k: v for k, v in os.environ.items() if k not in OVERRIDES}
    e['PYTHON'] = sys.executable
    if small:
        e.update(SMALL)
    e['OUTPUT_ROOT'] = str(out_root)
    e.update(env or {})
    os.makedirs(out_root, exist_ok=True)
    return e


def run_script(name, *args, out_root, env=None, small=True, timeout=900):
    return subprocess.run(['bash', os.path.join(SCRIPTS, name), *map(str, args)], env=script_env(out_root, env, small),
                          cwd=str(out_root), capture_output=True, text=True, timeout=timeout)


class StartedScript:
    """A launch script started in a session of its own (its PID is its process group's), its output read line by
    line so that a test can signal it at a chosen step."""

    def __init__(self, name, *args, out_root, env=None):
        self.p = subprocess.Popen(['bash', os.path.join(SCRIPTS, name), *map(str, args)],
                                  env=script_env(out_root, env), cwd=str(out_root), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.out, self.err, self.returncode = [], [], None
        self._readers = [threading.Thread(target=lambda f=f, lines=lines: lines.extend(iter(f.readline, '')),
                                          daemon=True)
                         for f, lines in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self._readers:
            t.start()

    @property
    def stdout(self):
        return ''.join(self.out)

    @property
    def stderr(self):
        return ''.join(self.err)

    def wait_for(self, text, timeout=600):
        end = time.monotonic() + timeout
        while text not in self.stdout:
            assert self.p.poll() is None, f'exited ({self.p.returncode}) before {text!r}:\n{show(self)}'
            assert time.monotonic() < end, f'no {text!r} after {timeout} s:\n{show(self)}'
            time.sleep(0.02)

    def wait(self, timeout=600):
        self.returncode = self.p.wait(timeout)
        for t in self._readers:
            t.join(30)
        return self.returncode


def show(p):
    return f'exit {p.returncode}\n--- stdout (end)\n{p.stdout[-4000:]}\n--- stderr (end)\n{p.stderr[-4000:]}'


def read_case_log(path):
    fields = {}
    with open(path) as f:
        for line in f:
            key, sep, value = line.partition(' = ')
            if sep:
                fields[key.strip()] = value.strip()
    return fields


def check_success(p, out_root, script, kind, ranks, batch=16, device_id='0'):
    """Exit 0, the Final lines last, the CaseName log and results.json consistent with them; returns a dict."""
    assert p.returncode == 0, show(p)
    lines = p.stdout.rstrip('\n').splitlines()
    expected = ['Final Performance images/sec'] + (['Final Train Accuracy'] if kind != 'perf' else []) + \
               ['E2E Training Duration sec']
    assert [ln.split(' : ')[0] for ln in lines[-len(expected):]] == expected, show(p)
    fps = float(FINAL_FPS.findall(p.stdout)[-1])
    assert fps > 0 and math.isfinite(fps)
    e2e = FINAL_E2E.findall(p.stdout)[-1]
    assert re.fullmatch(r'\d+', e2e), e2e
    acc = None
    if kind != 'perf':
        acc = float(FINAL_ACC.findall(p.stdout)[-1])
        assert 0 <= acc <= 100
    else:
        assert not FINAL_ACC.search(p.stdout)

    out_dir = os.path.join(out_root, device_id)
    suffix = 'perf' if kind == 'perf' else 'acc'
    case = f'VAN_for_PyTorch_bs{batch}_{ranks}p_{suffix}'
    fields = read_case_log(os.path.join(out_dir, f'{case}.log'))
    for key in CASE_FIELDS + (('TrainAccuracy',) if kind != 'perf' else ()):
        assert fields.get(key), (key, fields)
    assert fields['CaseName'] == case and fields['RankSize'] == str(ranks) and fields['BatchSize'] == str(batch)
    assert float(fields['ActualFPS']) == fps and fields['E2ETrainingTime'] == e2e
    assert float(fields['TrainingTime']) == pytest.approx(batch * ranks / fps, rel=1e-2, abs=1e-4)
    assert math.isfinite(float(fields['ActualLoss']))
    if kind != 'perf':
        assert float(fields['TrainAccuracy']) == acc

    with open(os.path.join(out_dir, script, 'results.json')) as f:
        results = json.load(f)
    log = os.path.join(out_dir, f'eval_{device_id}.log' if kind == 'eval' else f'train_{device_id}.log')
    assert os.path.getsize(log) > 0
    if kind == 'eval':
        assert fps == pytest.approx(results['img_per_sec'], abs=0.01)
        assert acc == pytest.approx(results['top1'], abs=1e-3)
    else:
        assert fps == pytest.approx(results['train_img_per_sec'], abs=0.01)
        assert results['world_size'] == ranks and results['global_batch'] == batch * ranks
        if kind != 'perf':
            assert acc == pytest.approx(results['best_top1'], abs=1e-3)
            assert os.path.isfile(os.path.join(out_dir, script, 'model_best.pth.tar'))
        assert os.path.isfile(os.path.join(out_dir, script, 'last.pth.tar'))
    return {'fps': fps, 'acc': acc, 'e2e': int(e2e), 'fields': fields, 'results': results}


def check_failure(p, *needles):
    assert p.returncode != 0, show(p)
    assert not re.search(r'^Final ', p.stdout + p.stderr, re.M), show(p)
    err = p.stderr.strip().splitlines()
    assert err and err[-1].startswith('error: '), show(p)
    for needle in needles:
        assert needle in p.stderr, (needle, show(p))


# ------------------------------------------------------------------------------------------------------- data

def _link_subset(src, dst, per_split, classes=None):
    for split, n in per_split.items():
        for cls in sorted(os.listdir(os.path.join(src, split))):
            if classes is not None and cls not in classes:
                continue
            os.makedirs(os.path.join(dst, split, cls))
            for name in sorted(os.listdir(os.path.join(src, split, cls)))[:n]:
                os.symlink(os.path.join(src, split, cls, name), os.path.join(dst, split, cls, name))
    return dst


@pytest.fixture(scope='module')
def digits():
    if not os.path.isfile(os.path.join(DIGITS, '.complete')):
        subprocess.run([sys.executable, '-m', 'vancls.digits', DIGITS], cwd=ROOT, check=True)
    return DIGITS


@pytest.fixture(scope='module')
def small_digits(digits, module_tmp):
    """20 train / 10 val images per class (symlinks): 2 ranks x 16 x 6 steps fit in one epoch; evaluation is short."""
    return _link_subset(digits, str(module_tmp('data') / 'digits_small'), {'train': 20, 'val': 10})


@pytest.fixture(scope='module')
def five_digits(digits, module_tmp):
    """Classes 0-4 only: a data set with another number of classes for fine-tuning (100 train, 50 val)."""
    return _link_subset(digits, str(module_tmp('data') / 'digits5'), {'train': 20, 'val': 10},
                        classes={'0', '1', '2', '3', '4'})


# train_full_8p.sh, 2 processes, 2 epochs of 6 steps, a log line per step: the uninterrupted run, and the command
# that the signal tests interrupt and run again.
FULL_8P_ENV = {'NPROC': '2', 'EPOCHS': '2'}
FULL_8P_ARGS = [*FAST, '--log-interval', '1']


@pytest.fixture(scope='module')
def full_8p(small_digits, module_tmp):
    out = module_tmp('full8p')
    p = run_script('train_full_8p.sh', f'--data_path={small_digits}', *FULL_8P_ARGS, out_root=out, env=FULL_8P_ENV)
    return p, out


# -------------------------------------------------------------------------------------------------- real runs

def test_performance_1p_on_digits_auto_device(digits, tmp_path):
    p = run_script('train_performance_1p.sh', f'--data_path={digits}', *FAST, out_root=tmp_path,
                   env={'DEVICE': ''})  # auto: no torch_npu and no CUDA here, so the CPU
    r = check_success(p, tmp_path, 'train_performance_1p', 'perf', ranks=1)
    assert r['fields']['Device'] == 'cpu' and r['results']['device'] == 'cpu'
    assert r['results']['final_top1'] is None  # performance runs do not evaluate


def test_performance_8p_two_processes(digits, tmp_path):
    p = run_script('train_performance_8p.sh', f'--data_path={digits}', *FAST, out_root=tmp_path, env={'NPROC': '2'})
    r = check_success(p, tmp_path, 'train_performance_8p', 'perf', ranks=2)
    assert r['results']['world_size'] == 2
    assert '--nproc_per_node=2' in open(os.path.join(tmp_path, '0', 'train_0.log')).read()


def test_full_1p(small_digits, tmp_path):
    p = run_script('train_full_1p.sh', f'--data_path={small_digits}', '--batch_size=16', *FAST, out_root=tmp_path)
    r = check_success(p, tmp_path, 'train_full_1p', 'full', ranks=1)
    assert r['results']['epochs'] == 1 and r['results']['best_epoch'] == 0


def test_full_8p_two_processes(full_8p):
    p, out = full_8p
    check_success(p, out, 'train_full_8p', 'full', ranks=2)
    log = open(os.path.join(out, '0', 'train_0.log')).read()
    assert '--max-restarts=0' in log and '--resume auto' in log


def test_eval_8p_reproduces_full_run(full_8p, small_digits, tmp_path):
    p_full, out_full = full_8p
    assert p_full.returncode == 0, show(p_full)
    with open(os.path.join(out_full, '0', 'train_full_8p', 'results.json')) as f:
        best = json.load(f)['best_top1']
    # Positional DATA_PATH CKPT_PATH as in the port's README. 4 per device: 50 images per rank give 12 batches,
    # of which those after the first 5 are timed.
    # No MODEL and no IMG_SIZE: the checkpoint's van_b0 at the 32 px it was trained at.
    ckpt = os.path.join(out_full, '0', 'train_full_8p', 'model_best.pth.tar')
    p = run_script('train_eval_8p.sh', small_digits, ckpt, out_root=tmp_path,
                   env={'NPROC': '2', 'BATCH_SIZE': '4', 'MODEL': '', 'IMG_SIZE': ''})
    r = check_success(p, tmp_path, 'train_eval_8p', 'eval', ranks=2, batch=4)
    assert r['acc'] == pytest.approx(best, abs=0.2)
    assert r['results']['num_images'] == 100
    (launch,) = [ln for ln in p.stdout.splitlines() if ln.startswith('+ ')]
    assert '--model' not in launch and '--img-size' not in launch and r['fields']['Model'] == 'van_b0'


def test_finetune_1p_from_other_number_of_classes(full_8p, five_digits, tmp_path):
    p_full, out_full = full_8p
    assert p_full.returncode == 0, show(p_full)
    src = os.path.join(out_full, '0', 'train_full_8p', 'model_best.pth.tar')
    # `-- --max-steps 3`, fewer steps than the 5 that throughput skips: train.py then times all 3 and the script
    # reports that (it used to stop with exit status 2, after training).
    p = run_script('train_finetune_1p.sh', f'--data_path={five_digits}', f'--pth_path={src}', *FAST,
                   '--max-steps', '3', out_root=tmp_path, env={'MODEL': ''})  # the checkpoint's model
    r = check_success(p, tmp_path, 'train_finetune_1p', 'finetune', ranks=1)
    assert r['results']['num_classes'] == 5 and r['fields']['Model'] == 'van_b0'

    import torch
    before = torch.load(src, map_location='cpu', weights_only=True)['state_dict']
    after = torch.load(os.path.join(tmp_path, '0', 'train_finetune_1p', 'last.pth.tar'), map_location='cpu',
                       weights_only=True)['state_dict']
    assert before['head.weight'].shape[0] == 10 and after['head.weight'].shape[0] == 5
    # The backbone started from the checkpoint: 3 AdamW steps at the recipe's lr 5e-5 (each moves a weight by about
    # the lr) barely move it, whereas a fresh initialization would be far away.
    key = 'patch_embed1.proj.weight'
    assert torch.allclose(before[key], after[key], atol=1e-3)


CRASH_HOOK = '''\
"""Test hook (sitecustomize): in the first attempt of a torchrun worker group, local rank 0 dies with exit status 17
as soon as the run's first end-of-epoch checkpoint exists."""
import os
import threading
import time

if os.environ.get('TORCHELASTIC_RESTART_COUNT') == '0' and os.environ.get('LOCAL_RANK') == '0':
    def _crash(path=os.environ['CRASH_AFTER']):
        while not os.path.exists(path):
            time.sleep(0.1)
        os._exit(17)
    threading.Thread(target=_crash, daemon=True).start()
'''


def test_full_8p_restart_continues_where_it_stopped(small_digits, tmp_path):
    """A worker dies after epoch 0: torchrun --max-restarts restarts the group and train.py --resume auto goes on
    with epoch 1 instead of starting over."""
    hook = tmp_path / 'hook'
    hook.mkdir()
    (hook / 'sitecustomize.py').write_text(CRASH_HOOK)
    out = tmp_path / 'out'
    run = out / '0' / 'train_full_8p'
    p = run_script('train_full_8p.sh', f'--data_path={small_digits}', *FAST, out_root=out,
                   env={'NPROC': '2', 'EPOCHS': '2', 'MAX_RESTARTS': '1', 'PYTHONPATH': str(hook),
                        'CRASH_AFTER': str(run / 'checkpoint-0.pth.tar')})
    r = check_success(p, out, 'train_full_8p', 'full', ranks=2)
    assert r['results']['epochs'] == 2
    assert 'exitcode' in p.stdout and ': 17' in p.stdout  # torchrun reported the crash and restarted
    train_log = (run / 'train.log').read_text()
    assert 'Resumed from' in train_log and 'epoch 1, step 0' in train_log
    assert train_log.count('Train: 0 [') == 1 and train_log.count('Train: 1 [') == 1  # epoch 0 not trained again
    rows = (run / 'summary.csv').read_text().splitlines()
    assert [row.split(',')[0] for row in rows[1:]] == ['0', '1']


def _weights(path):
    import torch
    return torch.load(path, map_location='cpu', weights_only=True)['state_dict']


@pytest.mark.parametrize('target,sig', [('pid', signal.SIGTERM), ('group', signal.SIGUSR1)])
def test_full_8p_stop_signal_then_rerun_resumes_bitwise(full_8p, small_digits, tmp_path, target, sig):
    """SIGTERM to the script's PID (what a container runtime sends to PID 1), SIGUSR1 to its process group (what
    SLURM's --signal and Ctrl-C do): the script passes the signal to torchrun once, every worker stops at the same
    step and rank 0 writes recovery.pth.tar; the script prints the preempted line (in its log too: tee outlived the
    signal) and exits 128 + the signal. Run again, it resumes and ends bitwise equal to the uninterrupted run."""
    p_ref, out_ref = full_8p
    assert p_ref.returncode == 0, show(p_ref)
    out = tmp_path / 'out'
    args = [f'--data_path={small_digits}', *FULL_8P_ARGS]
    proc = StartedScript('train_full_8p.sh', *args, out_root=out, env=FULL_8P_ENV)
    proc.wait_for('Train: 0 [   2/6]')
    (os.kill if target == 'pid' else os.killpg)(proc.p.pid, sig)
    assert proc.wait() == 128 + sig, show(proc)

    name = signal.Signals(sig).name
    run = out / '0' / 'train_full_8p'
    import torch
    step = torch.load(run / 'recovery.pth.tar', map_location='cpu', weights_only=True)['step_in_epoch']
    assert 2 <= step < 6
    for rank in (0, 1):
        assert f'[rank {rank}] received {name}: stopping' in proc.stdout, show(proc)
    assert 'forcefully' not in proc.stdout + proc.stderr  # torchrun killed no worker
    preempted = 'error: train_full_8p: preempted, recovery checkpoint written: run this script again to resume'
    assert proc.err[-1].startswith(preempted) and not re.search(r'^Final ', proc.stdout, re.M), show(proc)
    log = (out / '0' / 'train_0.log').read_text()
    assert f'train_full_8p: received {name}: passed it to train.py, waiting for it to exit after its recovery' in log
    assert f'Preempted by {name} at epoch 0, step {step}/6' in log
    assert log.rstrip().splitlines()[-1].startswith(preempted)  # the last line reached the log

    p = run_script('train_full_8p.sh', *args, out_root=out, env=FULL_8P_ENV)
    check_success(p, out, 'train_full_8p', 'full', ranks=2)
    assert 'resuming the unfinished run' in p.stdout and f'epoch 0, step {step}' in p.stdout
    train_log = (run / 'train.log').read_text()
    assert train_log.count('Train: 0 [   1/6]') == 1  # the steps before the signal were not trained again
    ref, got = _weights(out_ref / '0' / 'train_full_8p' / 'last.pth.tar'), _weights(run / 'last.pth.tar')
    assert ref.keys() == got.keys() and [k for k in ref if not torch.equal(ref[k], got[k])] == []


def test_readme_cpu_example_uses_the_repository_venv(digits, tmp_path):
    """The README's `bash test/train_performance_1p.sh --data_path=data/digits` right after `make demo`, scaled
    down: PYTHON unset and the only python3 on PATH without torch. The script runs with the repository's
    .venv/bin/python and says so; with no .venv it names the missing torch and `make setup`."""
    root = tmp_path / 'repo'  # the repository, with a .venv of its own whose python is this interpreter
    root.mkdir()
    for name in os.listdir(ROOT):
        if name not in ('.venv', '.git'):
            os.symlink(os.path.join(ROOT, name), root / name)
    venv_python = root / '.venv' / 'bin' / 'python'
    venv_python.parent.mkdir(parents=True)
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for path, flags in ((venv_python, ''), (bin_dir / 'python3', ' -S')):  # -S: no site-packages, so no torch
        path.write_text(f'#!/bin/sh\nexec {sys.executable}{flags} "$@"\n')
        path.chmod(0o755)
    path = f'{bin_dir}:/usr/bin:/bin'
    assert subprocess.run(['python3', '-c', 'import torch'], env={'PATH': path}, capture_output=True).returncode != 0
    env = script_env(tmp_path / 'out', {'PATH': path, 'DEVICE': ''})  # auto, as in the README
    del env['PYTHON']
    bash = shutil.which('bash')
    p = subprocess.run([bash, 'test/train_performance_1p.sh', '--data_path=data/digits', *FAST], env=env, cwd=root,
                       capture_output=True, text=True, timeout=900)
    check_success(p, tmp_path / 'out', 'train_performance_1p', 'perf', ranks=1)
    used = f"train_performance_1p: python {venv_python} (the repository's .venv: no python3 on PATH has torch)"
    assert used in p.stdout and used in (tmp_path / 'out' / '0' / 'train_0.log').read_text()

    venv_python.unlink()
    p = subprocess.run([bash, 'test/train_performance_1p.sh', '--data_path=data/digits'], env=env, cwd=root,
                       capture_output=True, text=True, timeout=900)
    check_failure(p, "No module named 'torch'", 'python3 on PATH has no torch', 'make setup')


def test_failing_training_exits_without_final_lines(digits, tmp_path):
    p = run_script('train_performance_1p.sh', f'--data_path={digits}', out_root=tmp_path, env={'MODEL': 'van_nope'})
    check_failure(p, 'train.py failed', "--model 'van_nope' is not a VAN model", 'train_0.log')


# ---------------------------------------------------------------------------------------------- input errors

@pytest.mark.parametrize('script', ['train_performance_1p.sh', 'train_full_8p.sh', 'train_eval_8p.sh',
                                    'train_finetune_1p.sh'])
def test_missing_data_path(script, tmp_path):
    p = run_script(script, out_root=tmp_path)
    check_failure(p, 'data_path', 'required')


def test_bad_data_paths(tmp_path):
    p = run_script('train_full_1p.sh', f'--data_path={tmp_path / "nowhere"}', out_root=tmp_path)
    check_failure(p, 'no such directory')
    (tmp_path / 'flat' / 'val').mkdir(parents=True)
    p = run_script('train_full_8p.sh', f'--data_path={tmp_path / "flat"}', out_root=tmp_path)
    check_failure(p, 'no train/ folder')
    (tmp_path / 'noval' / 'train').mkdir(parents=True)
    p = run_script('train_performance_8p.sh', f'--data_path={tmp_path / "noval"}', out_root=tmp_path)
    check_failure(p, 'no val/')
    p = run_script('train_eval_8p.sh', str(tmp_path / 'flat'), str(tmp_path / 'none.pth.tar'), out_root=tmp_path)
    check_failure(p, 'CKPT_PATH', 'no such file')
    p = run_script('train_full_1p.sh', f'--data_path={tmp_path / "flat"}', 'extra', out_root=tmp_path)
    check_failure(p, 'unexpected argument')
    p = run_script('train_full_1p.sh', f'--data_path={DIGITS}', '--batch_size=0', out_root=tmp_path)
    check_failure(p, 'batch_size')


# ------------------------------------------------------------------------------------------------ stub runs

STUB = '''\
#!{python}
"""Stand-in for the interpreter: records train.py/validate.py launches, writes STUB_RESULTS instead of running."""
import json, os, sys
argv = sys.argv[1:]
entry = next((a for a in argv if a.endswith(('/train.py', '/validate.py'))), None)
if entry is None or argv[0] == '-c':  # the scripts' own questions, and the wrapper that starts the program
    os.execv({python!r}, [{python!r}] + argv)
env = {{k: os.environ.get(k) for k in ('ASCEND_RT_VISIBLE_DEVICES', 'CUDA_VISIBLE_DEVICES', 'TASK_QUEUE_ENABLE',
                                      'HCCL_WHITELIST_DISABLE', 'PYTHONUNBUFFERED')}}
with open(os.environ['STUB_LOG'], 'a') as f:
    f.write(json.dumps({{'argv': argv, 'env': env, 'cwd': os.getcwd()}}) + '\\n')
args = argv[argv.index(entry) + 1:]
def opt(name):
    return args[args.index(name) + 1]
if entry.endswith('train.py'):
    results = {{'train_img_per_sec': 100.0, 'best_top1': 50.0, 'train_loss': 1.5, 'world_size': 1}}
    path = os.path.join(opt('--output'), opt('--experiment'), 'results.json')
else:
    results = {{'img_per_sec': 200.0, 'top1': 40.0, 'loss': 2.0}}
    path = opt('--results-file')
results.update(json.loads(os.environ.get('STUB_RESULTS') or '{{}}'))
print('stub: training')
if os.environ.get('STUB_NO_RESULTS') != '1':
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(results, f)
if os.environ.get('STUB_ERROR'):
    print('error: ' + os.environ['STUB_ERROR'], file=sys.stderr)
sys.exit(int(os.environ.get('STUB_RC', '0')))
'''


@pytest.fixture
def stub(tmp_path):
    path = tmp_path / 'stub_python'
    path.write_text(STUB.format(python=sys.executable))
    path.chmod(0o755)
    log = tmp_path / 'stub_log.jsonl'

    def run(script, *args, env=None, small=False):
        e = {'PYTHON': str(path), 'STUB_LOG': str(log), 'DEVICE': 'cpu'}
        e.update(env or {})
        if log.exists():
            log.unlink()
        p = run_script(script, *args, out_root=tmp_path / 'out', env=e, small=small, timeout=120)
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return p, calls
    (tmp_path / 'out').mkdir()
    run.out = str(tmp_path / 'out')
    return run


def tiny_checkpoint(path, arch='van_b0'):
    """A checkpoint that names its model and holds no weights: enough for the scripts, which only read the name."""
    import torch
    torch.save({'arch': arch, 'state_dict': {}}, path)
    return str(path)


def _opts(argv, entry='train.py'):
    i = next(i for i, a in enumerate(argv) if a.endswith('/' + entry))
    return argv[:i], argv[i + 1:]


def _value(args, name):
    return args[args.index(name) + 1]


def test_defaults_performance_1p(stub, digits):
    p, calls = stub('train_performance_1p.sh', f'--data_path={digits}')
    assert p.returncode == 0, show(p)
    (call,) = calls
    launcher, args = _opts(call['argv'])
    assert launcher == []  # one process: no torchrun
    assert args[0] == digits
    assert _value(args, '--model') == 'van_base' and _value(args, '-b') == '128'
    assert _value(args, '--lr') == '1e-3' and _value(args, '--drop-path') == '0.1' and '--amp' in args
    assert _value(args, '--epochs') == '1' and _value(args, '--max-steps') == '500' and '--no-eval' in args
    assert '--img-size' not in args and '--resume' not in args
    assert call['env']['PYTHONUNBUFFERED'] == '1'
    assert 'Final Performance images/sec : 100.00' in p.stdout
    assert p.stdout.rstrip().splitlines()[-1].startswith('E2E Training Duration sec : ')
    fields = read_case_log(os.path.join(stub.out, '0', 'VAN_for_PyTorch_bs128_1p_perf.log'))
    assert fields['TrainingTime'] == '1.2800' and fields['ActualLoss'] == '1.5000' and 'TrainAccuracy' not in fields


def test_defaults_full_8p(stub, digits):
    p, calls = stub('train_full_8p.sh', f'--data_path={digits}')
    assert p.returncode == 0, show(p)
    (call,) = calls
    launcher, args = _opts(call['argv'])
    assert launcher[:2] == ['-m', 'torch.distributed.run']  # torchrun, with the same interpreter
    assert '--nproc_per_node=8' in launcher and '--max-restarts=3' in launcher and '--standalone' in launcher
    assert _value(args, '--model') == 'van_base' and _value(args, '-b') == '128' and '--amp' in args
    assert _value(args, '--epochs') == '300'  # + 10 cooldown epochs in train.py: 310
    assert _value(args, '--resume') == 'auto' and '--max-steps' not in args and '--no-eval' not in args
    assert 'Final Train Accuracy : 50.000' in p.stdout
    fields = read_case_log(os.path.join(stub.out, '0', 'VAN_for_PyTorch_bs128_8p_acc.log'))
    assert fields['RankSize'] == '8' and fields['TrainingTime'] == '10.2400' and fields['TrainAccuracy'] == '50.000'


def test_arguments_and_overrides(stub, digits):
    p, calls = stub('train_full_1p.sh', f'--data_path={digits}', '--device_id=3', '--batch_size=64', '--epochs=7',
                    '--', '--aa', 'none',
                    env={'MODEL': 'van_b0', 'IMG_SIZE': '32', 'AMP': '0', 'WORKERS': '1', 'MAX_STEPS': '9',
                         'LR': '5e-4', 'RESUME': '0'})
    assert p.returncode == 0, show(p)
    _, args = _opts(calls[0]['argv'])
    assert _value(args, '-b') == '64' and _value(args, '--epochs') == '7' and _value(args, '--model') == 'van_b0'
    assert _value(args, '--img-size') == '32' and '--amp' not in args and _value(args, '--workers') == '1'
    assert _value(args, '--max-steps') == '9' and _value(args, '--lr') == '5e-4' and '--resume' not in args
    assert args[-2:] == ['--aa', 'none']
    out = os.path.join(stub.out, '3')  # --device_id picks the output folder
    assert _value(args, '--output') == out and _value(args, '--experiment') == 'train_full_1p'
    assert os.path.isfile(os.path.join(out, 'VAN_for_PyTorch_bs64_1p_acc.log'))
    assert calls[0]['env']['CUDA_VISIBLE_DEVICES'] is None  # only set for a CUDA run

    p, calls = stub('train_eval_8p.sh', f'--data_path={digits}', f'--pth_path={out}/train_full_1p',
                    env={'NPROC': '2'})
    assert p.returncode != 0 and 'model_best.pth.tar' in p.stderr  # a folder without checkpoints
    ckpt = tiny_checkpoint(os.path.join(stub.out, 'w.pth.tar'), arch='van_b1')
    p, calls = stub('train_eval_8p.sh', f'--data_path={digits}', f'--pth_path={ckpt}', env={'NPROC': '2'})
    assert p.returncode == 0, show(p)
    launcher, args = _opts(calls[0]['argv'], 'validate.py')
    assert '--nproc_per_node=2' in launcher and '--max-restarts=3' not in ' '.join(launcher)
    assert _value(args, '--checkpoint') == ckpt and '--amp' in args
    # No MODEL, no IMG_SIZE: validate.py takes the model and the image size the checkpoint was trained with.
    assert '--model' not in args and '--img-size' not in args and 'model from the checkpoint' in p.stdout
    assert 'Final Train Accuracy : 40.000' in p.stdout and 'Final Performance images/sec : 200.00' in p.stdout
    p, calls = stub('train_eval_8p.sh', digits, ckpt, env={'MODEL': 'van_b2', 'IMG_SIZE': '64'})
    assert p.returncode == 0, show(p)
    _, args = _opts(calls[0]['argv'], 'validate.py')
    assert _value(args, '--model') == 'van_b2' and _value(args, '--img-size') == '64'

    # Fine-tuning: the checkpoint's model unless MODEL is set.
    p, calls = stub('train_finetune_1p.sh', f'--data_path={digits}', f'--pth_path={ckpt}')
    assert p.returncode == 0, show(p)
    _, args = _opts(calls[0]['argv'])
    assert _value(args, '--initial-checkpoint') == ckpt and _value(args, '--epochs') == '30'
    assert _value(args, '--model') == 'van_b1' and _value(args, '--img-size') == '384'
    p, calls = stub('train_finetune_1p.sh', f'--data_path={digits}', f'--pth_path={ckpt}', env={'MODEL': 'van_b3'})
    assert p.returncode == 0 and _value(_opts(calls[0]['argv'])[1], '--model') == 'van_b3', show(p)
    unnamed = os.path.join(stub.out, 'unnamed.pth.tar')
    open(unnamed, 'w').close()
    p, calls = stub('train_finetune_1p.sh', f'--data_path={digits}', f'--pth_path={unnamed}')
    check_failure(p, 'cannot read the model of', unnamed)
    assert not calls


def test_finetune_capped_below_the_warm_up_reports_its_throughput(stub, digits):
    """`-- --max-steps 3`: train.py times all 3 steps (fewer than the 5 warm-up steps) and the script reports it."""
    ckpt = tiny_checkpoint(os.path.join(stub.out, 'w.pth.tar'))
    p, calls = stub('train_finetune_1p.sh', f'--data_path={digits}', f'--pth_path={ckpt}', '--', '--max-steps', '3',
                    env={'STUB_RESULTS': json.dumps({'train_img_per_sec': 12.5, 'model': 'van_b0'})})
    assert p.returncode == 0, show(p)
    assert _opts(calls[0]['argv'])[1][-2:] == ['--max-steps', '3']
    assert 'Final Performance images/sec : 12.50' in p.stdout
    fields = read_case_log(os.path.join(stub.out, '0', 'VAN_for_PyTorch_bs16_1p_acc.log'))
    assert fields['Model'] == 'van_b0' and fields['TrainingTime'] == '1.2800'


FAKE_TORCH_NPU = '''\
"""Stand-in for torch_npu: registers torch.npu, which sees NPUs when FAKE_NPUS=1."""
import os
import types
import torch
torch.npu = types.SimpleNamespace(is_available=lambda: os.environ.get('FAKE_NPUS') == '1')
'''


def test_npu_when_torch_npu_imports(stub, digits, tmp_path):
    """DEVICE=auto asks vancls.device (CUDA, then an NPU, then the CPU) after sourcing env_npu.sh."""
    fake = tmp_path / 'fake_npu'
    fake.mkdir()
    (fake / 'torch_npu.py').write_text(FAKE_TORCH_NPU)
    p, calls = stub('train_performance_1p.sh', f'--data_path={digits}', '--device_id=5',
                    env={'DEVICE': '', 'PYTHONPATH': str(fake), 'FAKE_NPUS': '1'})
    assert p.returncode == 0, show(p)
    _, args = _opts(calls[0]['argv'])
    assert _value(args, '--device') == 'npu'
    env = calls[0]['env']
    assert env['ASCEND_RT_VISIBLE_DEVICES'] == '5' and env['TASK_QUEUE_ENABLE'] == '1'  # env_npu.sh was sourced
    assert read_case_log(os.path.join(stub.out, '5', 'VAN_for_PyTorch_bs128_1p_perf.log'))['Device'] == 'npu'

    # torch_npu without a visible NPU: auto is the CPU, as for train.py; DEVICE=npu stops with the reason.
    p, calls = stub('train_performance_1p.sh', f'--data_path={digits}', env={'DEVICE': '', 'PYTHONPATH': str(fake)})
    assert p.returncode == 0 and _value(_opts(calls[0]['argv'])[1], '--device') == 'cpu', show(p)
    assert calls[0]['env']['TASK_QUEUE_ENABLE'] is None  # env_npu.sh only for NPU runs
    p, calls = stub('train_performance_1p.sh', f'--data_path={digits}', env={'DEVICE': 'npu', 'PYTHONPATH': str(fake)})
    check_failure(p, 'DEVICE=npu: --device npu: torch_npu imported but sees no NPU')
    assert not calls


@pytest.mark.parametrize('script,results,needle', [
    ('train_performance_1p.sh', {'train_img_per_sec': 0.0}, 'no training step was timed'),
    ('train_finetune_1p.sh', {'train_img_per_sec': None}, 'train_img_per_sec'),
    ('train_full_1p.sh', {'best_top1': None}, 'best_top1'),
    ('train_full_8p.sh', {'train_loss': float('nan')}, 'train_loss'),
    ('train_eval_8p.sh', {'img_per_sec': 0}, 'BATCH_SIZE'),
    ('train_eval_8p.sh', {'top1': 140.0}, 'outside'),
])
def test_invalid_results_exit_without_final_lines(stub, digits, script, results, needle):
    ckpt = tiny_checkpoint(os.path.join(stub.out, 'w.pth.tar'))
    args = {'train_eval_8p.sh': [digits, ckpt], 'train_finetune_1p.sh': [f'--data_path={digits}', f'--pth_path={ckpt}']
            }.get(script, [f'--data_path={digits}'])
    p, calls = stub(script, *args, env={'STUB_RESULTS': json.dumps(results)})
    assert calls
    check_failure(p, needle, 'results.json')


def test_failing_or_silent_training(stub, digits):
    p, _ = stub('train_full_8p.sh', f'--data_path={digits}', env={'STUB_RC': '3', 'STUB_ERROR': 'out of memory'})
    check_failure(p, 'train.py failed with exit status 3', 'out of memory')
    assert p.returncode == 3
    p, _ = stub('train_performance_8p.sh', f'--data_path={digits}', env={'STUB_NO_RESULTS': '1'})
    check_failure(p, 'wrote no')


def test_full_run_folder_resumed_or_moved_aside(stub, digits):
    run = os.path.join(stub.out, '0', 'train_full_8p')
    os.makedirs(run)
    open(os.path.join(run, 'last.pth.tar'), 'w').close()  # an unfinished run: no results.json
    p, _ = stub('train_full_8p.sh', f'--data_path={digits}')
    assert p.returncode == 0 and 'resuming the unfinished run' in p.stdout, show(p)
    assert os.path.isfile(os.path.join(run, 'last.pth.tar'))
    p, _ = stub('train_full_8p.sh', f'--data_path={digits}')  # now finished: a rerun starts afresh
    assert p.returncode == 0 and 'previous run moved to' in p.stdout, show(p)
    assert not os.path.exists(os.path.join(run, 'last.pth.tar'))
    assert any(n.startswith('train_full_8p.old-') for n in os.listdir(os.path.dirname(run)))


def test_finetune_from_its_own_previous_run(stub, digits):
    run = os.path.join(stub.out, '0', 'train_finetune_1p')
    os.makedirs(run)
    tiny_checkpoint(os.path.join(run, 'model_best.pth.tar'))
    p, calls = stub('train_finetune_1p.sh', f'--data_path={digits}', f'--pth_path={run}')
    assert p.returncode == 0, show(p)
    _, args = _opts(calls[0]['argv'])
    ckpt = _value(args, '--initial-checkpoint')  # the previous run was moved aside: its checkpoint went with it
    assert '/train_finetune_1p.old-' in ckpt and ckpt.endswith('/model_best.pth.tar') and os.path.isfile(ckpt)


def test_env_npu_is_harmless_without_cann_and_sources_cann(tmp_path):
    script = os.path.join(SCRIPTS, 'env_npu.sh')
    e = {k: v for k, v in os.environ.items() if k not in OVERRIDES}
    e['ASCEND_HOME'] = str(tmp_path / 'no_ascend')
    p = subprocess.run(['bash', '-c', f'set -eu; source {script}; echo "ok $TASK_QUEUE_ENABLE ${{VAN_CANN_SOURCED:-none}}"'],
                       env=e, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == 'ok 1 none', show(p)
    set_env = tmp_path / 'set_env.sh'
    set_env.write_text(textwrap.dedent('''\
        export FAKE_CANN=yes${UNSET_IN_CANN_SCRIPTS}
        false
    '''))
    e['CANN_SET_ENV'] = str(set_env)
    e['TASK_QUEUE_ENABLE'] = '2'
    p = subprocess.run(['bash', '-c', f'set -eu; source {script}; echo "$FAKE_CANN $TASK_QUEUE_ENABLE"; [[ $- == *u* ]]'],
                       env=e, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == 'yes 2', show(p)
