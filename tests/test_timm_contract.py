"""timm's own model test-suite (tests/test_models.py of the installed timm's source package) on the VAN names.

This is what a timm user relies on: create_model(device=, dtype=), in_chans, reset_classifier, torch.jit.script,
FX feature extraction, pretrained loading with in_chans != 3 and features_only, forward_intermediates /
prune_intermediate_layers. VAN is added to the suite's forward_intermediates list, as timm does for its own
models. The suite's pretrained tests download weights: they run offline here, with official-layout files put
in torch.hub's cache by the conftest written below.

timm's test file (Apache-2.0, ~125 KB) is not vendored: it is fetched once with `pip download` of the timm sdist
into a cache folder ($VANCLS_TIMM_TESTS_CACHE, default ~/.cache/vancls/timm-tests). Without network and cache
the test is skipped, saying so; under CI (CI=true) it fails instead.
"""
import os
import re
import subprocess
import sys
import tarfile
import tempfile

import pytest
import timm

from conftest import cli_env
from conftest import skip_or_fail

pytestmark = pytest.mark.slow

_VERSION = timm.__version__
_CACHE = os.environ.get('VANCLS_TIMM_TESTS_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'vancls',
                                                                    'timm-tests'))
_FETCH_TIMEOUT_S = 300
_RUN_TIMEOUT_S = 3600

# Written next to the fetched suite: registers VAN with timm and points torch.hub's cache (where timm looks
# for downloaded weights) at a folder that already holds every official file name, in the official layout
# (reference train.py checkpoints, random values: the official files cannot be downloaded here). The suite's
# pretrained tests (in_chans=1, num_classes=5/0, features_only) then load them offline through the URL path.
_CONFTEST = '''
import argparse
import os
import torch
import timm
import models  # noqa: F401  (registers VAN with timm)
from models.van import VAN_NAMES, default_cfgs

_HUB = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'hub')
torch.hub.set_dir(_HUB)
for _name in VAN_NAMES:
    _url = default_cfgs[_name]['url']
    _file = os.path.join(_HUB, 'checkpoints', os.path.basename(_url))
    if _url and not os.path.isfile(_file):
        os.makedirs(os.path.dirname(_file), exist_ok=True)
        with torch.device('meta'):
            _shapes = {k: v.shape for k, v in timm.create_model(_name).state_dict().items()}
        _sd = {k: torch.zeros(s, dtype=torch.long) if k.endswith('num_batches_tracked') else
               torch.ones(s) if k.endswith('running_var') else torch.randn(s) * 0.02 for k, s in _shapes.items()}
        _ckpt = {'state_dict': {'module.' + k: v for k, v in _sd.items()}, 'epoch': 299,
                 'args': argparse.Namespace(model=_name)}
        torch.save(_ckpt, _file)
'''


def _fetch_suite() -> str:
    """Path of the cached tests/test_models.py of this timm version; fetched from PyPI's sdist if missing."""
    dest = os.path.join(_CACHE, _VERSION, 'test_models.py')
    if os.path.isfile(dest):
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run([sys.executable, '-m', 'pip', 'download', f'timm=={_VERSION}', '--no-deps',
                            '--no-binary', ':all:', '--disable-pip-version-check', '-q', '-d', tmp],
                           check=True, capture_output=True, timeout=_FETCH_TIMEOUT_S)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            detail = getattr(e, 'stderr', b'') or b''
            skip_or_fail(f"timm {_VERSION}'s source package could not be fetched (offline?): {type(e).__name__} "
                        f"{detail.decode(errors='replace').strip()[-200:]}")
        sdists = [f for f in os.listdir(tmp) if f.endswith('.tar.gz')]
        if not sdists:
            skip_or_fail(f'pip download of timm {_VERSION} gave no sdist: {os.listdir(tmp)}')
        with tarfile.open(os.path.join(tmp, sdists[0])) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith('/tests/test_models.py')), None)
            if member is None:
                skip_or_fail(f"timm {_VERSION}'s sdist has no tests/test_models.py")
            data = tar.extractfile(member).read()
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest + '.tmp', 'wb') as f:
        f.write(data)
    os.replace(dest + '.tmp', dest)
    return dest


def test_timm_model_suite_passes_for_every_van_name(tmp_path):
    source = open(_fetch_suite(), encoding='utf-8').read()
    # VAN joins the models whose forward_intermediates / prune_intermediate_layers the suite checks
    suite, n = re.subn(r'^FEAT_INTER_FILTERS = \[', "FEAT_INTER_FILTERS = ['van', ", source, count=1, flags=re.M)
    assert n == 1, "timm's test_models.py has no FEAT_INTER_FILTERS list: update this test for this timm"
    (tmp_path / 'test_models.py').write_text(suite, encoding='utf-8')
    (tmp_path / 'conftest.py').write_text(_CONFTEST, encoding='utf-8')
    proc = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-W', 'ignore', '-rfE',
         '-k', 'van_', 'test_models.py'],
        cwd=str(tmp_path), env=cli_env(), capture_output=True, text=True, timeout=_RUN_TIMEOUT_S)
    out = proc.stdout + proc.stderr
    summary = out.strip().splitlines()[-1] if out.strip() else ''
    assert proc.returncode == 0, f'timm suite failed for VAN:\n{out[-6000:]}'
    passed = int(re.search(r'(\d+) passed', summary).group(1)) if 'passed' in summary else 0
    assert 'skipped' not in summary, summary  # every check runs, the pretrained ones included
    assert passed >= 137, summary  # 11 names x 11 tests + 8 names with weights x 2 pretrained tests
