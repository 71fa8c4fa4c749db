"""Per-variant recipe configs (configs/van_b*.yaml), the public address statement, and the legacy requirement files."""
import os
import re
import subprocess

import pytest

import train
from conftest import ROOT
from vancls import builders
from vancls.config import UsageError, parse_with_config

# The reference ImageNet-1K recipe (VAN.md), as train.py option values.
RECIPE = dict(
    batch_size=128, opt='adamw', lr_base=1e-3, lr_base_size=1024, lr_base_scale='linear',
    weight_decay=0.05, sched='cosine', epochs=300, cooldown_epochs=10, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-6,
    aa='rand-m9-mstd0.5-inc1', color_jitter=0.4, reprob=0.25, remode='pixel', mixup=0.8, cutmix=1.0,
    mixup_switch_prob=0.5, smoothing=0.1, train_interpolation='random', hflip=0.5, scale=[0.08, 1.0], seed=42,
    dist_bn='reduce', eval_metric='top1', checkpoint_hist=10, amp=True,
)
DROP_PATH = {'van_b0': 0.1, 'van_b1': 0.1, 'van_b2': 0.1, 'van_b3': 0.2}


def _parse(argv):
    return parse_with_config(train.get_args_parser(), argv)


@pytest.mark.parametrize('name', sorted(DROP_PATH))
def test_config_parses_into_train_args(name):
    path = os.path.join(ROOT, 'configs', f'{name}.yaml')
    args = _parse(['-c', path, 'DATA'])  # unknown keys would raise UsageError here
    assert args.data_dir == 'DATA' and args.model == name and args.config == path
    for key, value in dict(RECIPE, drop_path=DROP_PATH[name]).items():
        got = getattr(args, key)
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, (key, got, value)
        assert type(got) is type(value) or (isinstance(value, list) and list(got) == value), (key, type(got))
    assert train.num_total_epochs(args) == 310  # 300 + 10 cooldown, the port's table
    # lr 1e-3 at the reference's 128 x 8 devices; other global batches get it scaled (tests/test_recipes.py)
    assert args.lr is None and builders.resolve_lr(args, world_size=8) == (1e-3, 1024, None)
    train.check_args(args)  # model, optimizer and batch checks pass
    assert builders.resolve_data_config(args)['input_size'] == (3, 224, 224)  # the model's size
    # the command line still wins over the file
    assert _parse(['-c', path, 'DATA', '--lr', '5e-4', '--epochs', '2']).lr == 5e-4


def _yaml_files():
    folder = os.path.join(ROOT, 'configs')
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith('.yaml'))


@pytest.mark.parametrize('path', _yaml_files(), ids=os.path.basename)
def test_config_holds_only_what_differs_from_the_defaults(path):
    """A recipe file restates no default of train.py (one place per default) and sets no loader worker count (the
    CPUs a machine has decide it: a fixed 8 makes torch warn on small machines)."""
    import yaml
    with open(path) as f:
        cfg = yaml.safe_load(f)
    defaults = {a.dest: a.default for a in train.get_args_parser()._actions}
    same = sorted(k for k, v in cfg.items() if defaults[k] == v or (isinstance(v, list) and defaults[k] is not None
                                                                      and list(defaults[k]) == v))
    assert not same, f'{path}: these keys only restate train.py\'s defaults: {same}'
    assert 'workers' not in cfg


def test_config_unknown_key_is_rejected(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('model: van_b0\nlearning_rate: 0.1\n')
    with pytest.raises(UsageError, match='learning_rate'):
        _parse(['-c', str(bad), 'DATA'])


# ------------------------------------------------------------------------------------- public addresses

_URL_RE = re.compile(r'https?://[^\s\'"<>()`\\|,;]+')


def _urls(text):
    return {u.rstrip('.:]') for u in _URL_RE.findall(text)}


def _repo_files():
    try:
        out = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard', '-z'], cwd=ROOT, check=True,
                             capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip('not a git work tree: the file list comes from git ls-files')
    return [f for f in out.decode().split('\0') if f and os.path.isfile(os.path.join(ROOT, f))]


def _statement_urls():
    with open(os.path.join(ROOT, 'public_address_statement.md'), encoding='utf-8') as f:
        return _urls(f.read())


def _listed(url, listed):
    """A plain address must be listed as it is; a template (`{...}` placeholders) must expand to a listed one."""
    if url in listed:
        return True
    if '{' not in url:
        return False
    pattern = ''.join('[^/\\s]+' if part.startswith('{') else re.escape(part)
                      for part in re.split(r'(\{[^}]*\})', url))
    return any(re.match(pattern, u) for u in listed if '{' not in u)


def test_every_public_address_is_in_the_statement():
    listed = _statement_urls()
    missing = {}
    for rel in _repo_files():
        with open(os.path.join(ROOT, rel), 'rb') as f:
            text = f.read(2_000_000).decode('utf-8', errors='ignore')
        for url in _urls(text):
            if not _listed(url, listed):
                missing.setdefault(url, []).append(rel)
    assert not missing, ('public addresses not listed in public_address_statement.md: '
                         + '; '.join(f'{u} (in {", ".join(sorted(fs))})' for u, fs in sorted(missing.items())))


def test_statement_lists_the_weight_urls_the_code_builds():
    import models.van as van
    listed = _statement_urls()
    urls = {cfg['url'] for cfg in van.default_cfgs.values() if cfg.get('url')}
    assert len(urls) == 4 and urls <= listed, sorted(urls - listed)


def test_address_check_catches_an_unlisted_address():
    listed = _statement_urls()
    https = 'https:' + '//'  # split, so that this file itself holds no address
    assert _urls(f'see {https}example.invalid/weights.pth.') == {https + 'example.invalid/weights.pth'}
    assert not _listed(https + 'example.invalid/weights.pth', listed)
    assert not _listed(https + 'huggingface.co/{}/x.bin', listed)
    assert _listed(https + 'huggingface.co/Visual-Attention-Network/{}/resolve/main/{}', listed)
    assert _listed(https + 'arxiv.org/abs/2202.09741', listed)


# ----------------------------------------------------------------------------------- requirement files

def _requirements(name):
    with open(os.path.join(ROOT, name)) as f:
        lines = [line.split('#')[0].strip() for line in f]
    return dict(line.split('==') for line in lines if line)


@pytest.mark.parametrize('name,torchvision', [('1.5_requirements.txt', '0.2.2.post3'),
                                              ('1.8_requirements.txt', '0.9.1')])
def test_requirement_files_pin_the_ported_stack(name, torchvision):
    pins = _requirements(name)
    assert pins['torchvision'] == torchvision
    assert {'timm', 'numpy', 'pyyaml'} <= set(k.lower() for k in pins)
    assert 'apex' not in {k.lower() for k in pins}  # the PyPI package named apex is unrelated to NVIDIA/Ascend apex
    assert 'torch' not in {k.lower() for k in pins}  # torch (and torch_npu) come with the Ascend image


def test_legacy_ci_installs_the_oldest_pinned_timm():
    with open(os.path.join(ROOT, '.ci', 'legacy_timm.sh')) as f:
        script = f.read()
    oldest = min((_requirements(n)['timm'] for n in ('1.5_requirements.txt', '1.8_requirements.txt')),
                 key=lambda v: tuple(int(p) for p in v.split('.')))
    assert re.search(r'TIMM_VERSION:-' + re.escape(oldest) + r'\b', script), oldest
