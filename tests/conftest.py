"""Shared fixtures: a session-wide digits ImageFolder tree and a CLI runner (pytest.ini puts the repo root on
sys.path)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory):
    """scikit-learn digits written as PNGs (train/ and val/, 10 classes, 32x32), once per test session."""
    from vancls.digits import write_digits
    return write_digits(str(tmp_path_factory.mktemp('digits')))


@pytest.fixture(scope='module')
def module_tmp(tmp_path_factory, request):
    """mktemp for module-scoped fixtures. Their folders (training runs' checkpoints) go when the module ends with no
    test failed, as pytest.ini's tmp_path_retention_policy does for tmp_path, so that the suite's disk use stays at
    what the running tests hold instead of everything a whole run writes (docs/PERFORMANCE.md, "Disk")."""
    made = []
    failed_before = request.session.testsfailed

    def mktemp(name):
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    if request.session.testsfailed == failed_before:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


def cli_env(**extra):
    env = dict(os.environ)
    env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
    env.setdefault('OMP_NUM_THREADS', '1')  # the suite runs 2 test workers on 2 cores (make test: -n 2)
    env.pop('VANCLS_FAULT', None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(script, *args, env=None, timeout=600, cwd=ROOT):
    """Run one of the repo's scripts (train.py, validate.py, ...) in a subprocess; returns CompletedProcess."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env or cli_env(), capture_output=True, text=True, timeout=timeout)


# Quick CPU training settings for tests: tiny images, no heavy augmentation.
FAST_TRAIN_ARGS = ['--model', 'van_b0', '--img-size', '32', '--aa', 'none', '--reprob', '0', '--mixup', '0',
                   '--cutmix', '0', '--smoothing', '0', '--hflip', '0', '--scale', '0.6', '1', '--drop-path', '0',
                   '--warmup-epochs', '0', '--device', 'cpu', '--log-interval', '5']


def _cpu_fp16_autocast() -> bool:
    from vancls.device import cpu_autocast_supports
    return cpu_autocast_supports(torch.float16)


# CPU autocast in float16 exists from torch 2.3 on; before, --amp-dtype float16 on the CPU is a one-line error.
requires_cpu_fp16 = pytest.mark.skipif(not _cpu_fp16_autocast(),
                                       reason=f'CPU float16 autocast needs torch >= 2.3 (this is {torch.__version__})')


def skip_or_fail(reason: str):
    """An environment problem (a mount, a fetch or a package missing): skip and say why; under CI (CI=true) fail,
    since there a skip would let the failure the test exists to catch pass unseen (.ci/run also fails on any skip
    not in .ci/expected-skips.txt). Every test module imports it from here."""
    if os.environ.get('CI', '').lower() in ('true', '1'):
        pytest.fail(f'CI=true: {reason}', pytrace=False)
    pytest.skip(reason)
