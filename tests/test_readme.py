"""The README as a test: every code block the README marks with `<!-- readme-test: NAME -->` runs here, word for
word, in a copy of the layout the README assumes (the repository root with the scripts, `data/digits`, `output/`,
and `python` on PATH being this interpreter), and the test checks what the README says the commands give.

Scaled down as the README says ("Tested commands", at its top): every `python train.py` line gets TRAIN_SCALE appended (2
epochs of at most 8 steps instead of the demo's 10 epochs); nothing else is added or changed.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, cli_env

pytestmark = pytest.mark.slow

README = os.path.join(ROOT, 'README.md')
TRAIN_SCALE = ['--epochs', '2', '--max-steps', '8']
_MARK = re.compile(r'<!-- readme-test: ([\w-]+) -->\s*```bash\n(.*?)```', re.S)


def readme_blocks() -> dict:
    """{name: [command lines]} of the README's tested blocks."""
    with open(README) as f:
        text = f.read()
    blocks = {name: [ln for ln in body.splitlines() if ln.strip()] for name, body in _MARK.findall(text)}
    assert blocks, f'{README} marks no block with <!-- readme-test: NAME -->'
    return blocks


def scaled(line: str) -> str:
    """The README line as the test runs it: train.py commands get TRAIN_SCALE appended."""
    assert '#' not in line, f'a tested README line carries no comment (it is run word for word): {line}'
    return line + ' ' + ' '.join(TRAIN_SCALE) if line.startswith('python train.py') else line


@pytest.fixture(scope='module')
def workspace(module_tmp, digits_dir):
    """The repository root as the README's commands see it, with its own data/digits and output/."""
    ws = module_tmp('readme')
    for name in ('train.py', 'validate.py', 'predict.py', 'export.py', 'models', 'vancls', 'configs'):
        os.symlink(os.path.join(ROOT, name), ws / name)
    shutil.copytree(os.path.join(ROOT, 'test'), ws / 'test', ignore=shutil.ignore_patterns('output'))  # own test/output
    (ws / 'data').mkdir()
    os.symlink(digits_dir, ws / 'data' / 'digits')
    return ws


def _env(ws, **extra):
    env = cli_env(**extra)
    # What `source .venv/bin/activate` does: this environment's bin folder (with its `python`) first on PATH.
    env['PATH'] = f'{os.path.dirname(sys.executable)}{os.pathsep}{env["PATH"]}'
    env.pop('PYTHONPATH', None)  # the README's commands run from the repository root without it
    return env


def run_line(ws, line: str, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    r = subprocess.run(['bash', '-c', scaled(line)], cwd=ws, env=_env(ws, **env), capture_output=True, text=True,
                       timeout=timeout)
    return r


def start_line(ws, line: str, **env) -> subprocess.Popen:
    return subprocess.Popen(['bash', '-c', 'exec ' + scaled(line)], cwd=ws, env=_env(ws, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _ok(r):
    assert r.returncode == 0, f'{r.args}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
    return r


def _weights(path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)['state_dict']


def _assert_bitwise_equal(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f'{a} and {b} differ in {different[:5]}'


@pytest.fixture(scope='module')
def demo_run(workspace):
    """The first line of the `evaluate` block: the demo run, named digits-demo."""
    line = readme_blocks()['evaluate'][0]
    assert line == 'python train.py --experiment digits-demo'
    r = _ok(run_line(workspace, line))
    with open(workspace / 'output' / 'digits-demo' / 'results.json') as f:
        return r, json.load(f)


def test_validate_without_flags_gives_the_demos_top1(workspace, demo_run):
    """validate.py on the demo checkpoint, with no --model / --img-size: the checkpoint's model and 32 px."""
    _, results = demo_run
    r = _ok(run_line(workspace, readme_blocks()['evaluate'][1]))
    metrics = json.loads(r.stdout[r.stdout.index('{'):])
    assert metrics['model'] == 'van_b0' and metrics['num_images'] == 359
    assert abs(metrics['top1'] - results['best_top1']) < 0.01, (metrics['top1'], results['best_top1'])
    assert results['best_top1'] > 50, results  # a trained model, not the 10 % of a wrong input size
    assert '32 px' in r.stdout, r.stdout[-1000:]


def test_export_and_load_back(workspace, demo_run):
    export, predict = readme_blocks()['export']
    r = _ok(run_line(workspace, export))
    out = workspace / 'output' / 'digits.safetensors'
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask  # like every other output, not safetensors' 0600
    assert 'max |logit diff| = 0.00e+00' in r.stdout
    r = _ok(run_line(workspace, predict))
    doc = json.loads(r.stdout)
    images = os.listdir(workspace / 'data' / 'digits' / 'val' / '3')
    assert doc['model'] == 'van_b0' and doc['input_size'] == [3, 32, 32] and len(doc['predictions']) == len(images)
    hits = sum(p['topk'][0]['class'] == '3' for p in doc['predictions'])
    assert hits > len(images) / 2, f'{hits}/{len(images)} predicted as 3'


def _wait_for(proc, pattern: str, timeout: float = 300) -> list:
    """Read proc's output until a line contains `pattern`; returns the lines read."""
    lines, end = [], time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if pattern in line or time.monotonic() > end:
            break
    assert any(pattern in ln for ln in lines), ''.join(lines[-30:])
    return lines


def _run_folder(ws) -> str:
    folders = [f for f in os.listdir(ws / 'output') if f.startswith('van_b0-digits-')]
    assert len(folders) == 1, folders
    return str(ws / 'output' / folders[0])


def test_resume_after_sigterm_with_the_printed_command(workspace, demo_run):
    """SIGTERM in epoch 1: exit 143 and a Preempted line ending in the command that continues; that command,
    run word for word, ends bitwise equal to the uninterrupted demo run (same options, other folder name)."""
    line, = readme_blocks()['resume']
    proc = start_line(workspace, line)
    _wait_for(proc, 'Epoch 0:')
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, rest[-3000:]
    preempted = [ln for ln in rest.splitlines() if 'Preempted by SIGTERM' in ln]
    assert preempted, rest[-3000:]
    command = preempted[0].split('continue with: ', 1)[1]
    assert command.startswith('python ') and '--resume auto' in command, command
    r = _ok(subprocess.run(['bash', '-c', command], cwd=workspace, env=_env(workspace), capture_output=True,
                           text=True, timeout=600))
    assert 'Resumed from' in r.stdout, r.stdout[-2000:]
    folder = _run_folder(workspace)
    _assert_bitwise_equal(os.path.join(folder, 'last.pth.tar'), workspace / 'output' / 'digits-demo' / 'last.pth.tar')


def test_resume_after_kill_9_with_the_same_command(workspace, demo_run):
    """kill -9 after epoch 0's checkpoint, then the same command line (no --experiment): it finds its run."""
    line, = readme_blocks()['resume']
    for f in os.listdir(workspace / 'output'):
        if f.startswith('van_b0-digits-'):
            shutil.rmtree(workspace / 'output' / f)
    proc = start_line(workspace, line)
    _wait_for(proc, 'Epoch 0:')
    proc.kill()
    proc.communicate(timeout=60)
    folder = _run_folder(workspace)
    assert not os.path.exists(os.path.join(folder, 'results.json'))
    r = _ok(run_line(workspace, line))
    assert f'Resumed from ./output/{os.path.basename(folder)}/' in r.stdout, r.stdout[-2000:]
    _assert_bitwise_equal(os.path.join(folder, 'last.pth.tar'), workspace / 'output' / 'digits-demo' / 'last.pth.tar')
    r = _ok(run_line(workspace, line))  # once more: the run is finished, nothing is trained or overwritten
    assert 'Nothing to train' in r.stdout, r.stdout[-2000:]


def run_block(ws, name: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """A whole README block in one shell (its `export` line holds for the lines after it), unchanged."""
    return subprocess.run(['bash', '-c', '\n'.join(readme_blocks()[name])], cwd=ws, env=_env(ws),
                          capture_output=True, text=True, timeout=timeout)


def _final(stdout: str, key: str) -> list:
    return [float(ln.rsplit(':', 1)[1]) for ln in stdout.splitlines() if ln.startswith(key)]


def test_launch_scripts_cpu_example(workspace):
    r = _ok(run_block(workspace, 'scripts'))
    assert len(_final(r.stdout, 'Final Performance images/sec')) == 3, r.stdout[-3000:]
    assert len(_final(r.stdout, 'Final Train Accuracy')) == 2  # full and eval runs


def test_launch_script_evaluates_the_demo_checkpoint_as_trained(workspace, demo_run):
    _, results = demo_run
    r = _ok(run_block(workspace, 'scripts-eval'))
    acc, = _final(r.stdout, 'Final Train Accuracy')
    assert abs(acc - results['best_top1']) < 0.001, (acc, results['best_top1'])


def _script_pid(outer: int, script: str) -> int:
    """The bash process running `script`: the block's shell itself (when it execs its last command) or its child."""
    for _ in range(100):
        for pid in [outer] + [int(p) for p in subprocess.run(['pgrep', '-P', str(outer)], capture_output=True,
                                                             text=True).stdout.split()]:
            try:
                with open(f'/proc/{pid}/cmdline', 'rb') as f:
                    if script.encode() in f.read():
                        return pid
            except OSError:
                pass
        time.sleep(0.1)
    raise AssertionError(f'no process runs {script}')


def test_launch_script_sigterm_to_its_pid_then_rerun(workspace):
    """SIGTERM to the script's PID only (what a container runtime sends to PID 1): the workers checkpoint, the
    script prints the preempted line and exits 143; the same block again resumes the run and finishes."""
    text = '\n'.join(readme_blocks()['scripts-preempt'])
    proc = subprocess.Popen(['bash', '-c', text], cwd=workspace, env=_env(workspace), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for(proc, 'Epoch 0:')
    os.kill(_script_pid(proc.pid, 'test/train_full_8p.sh'), signal.SIGTERM)
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, rest[-3000:]
    assert 'preempted, recovery checkpoint written: run this script again to resume' in rest, rest[-3000:]
    r = _ok(run_block(workspace, 'scripts-preempt'))
    assert 'resuming the unfinished run' in r.stdout, r.stdout[-3000:]
    assert len(_final(r.stdout, 'Final Train Accuracy')) == 1
    log = open(workspace / 'test' / 'output' / '0' / 'train_full_8p' / 'train.log').read()
    assert 'Resumed from' in log, log[-2000:]
