"""Users of the reference (VAN-Classification, timm 0.4.12's scripts) and of the Ascend port: their options, their
checkpoints and their command lines on this port (issue 12).

- Every option of the reference's train.py and validate.py (their tables in tests/reference_options.md, a copy
  of the project's reference facts) parses, with its reference default and with another plausible value,
  and is then either applied or refused with a one-line UsageError; argparse never exits.
- A checkpoint in the exact layout of timm 0.4's CheckpointSaver (DDP `module.` keys, a real AdamW state, apex's
  loss-scaler state under `amp`, `args` as an argparse.Namespace, version 2, metric, EMA weights) evaluates through
  validate.py and test/train_eval_8p.sh, resumes through train.py and loads as pretrained weights, all without
  --trust-checkpoint; a checkpoint whose unpickling would run code is refused everywhere and nothing runs.
- The reference's command lines, word for word but smaller: distributed_train.sh's torch.distributed.launch with
  2 processes, the port's train flags, and eval.sh's validate.py line.
"""
import argparse
import ast
import importlib.machinery
import importlib.util
import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch

import validate
import train
from conftest import FAST_TRAIN_ARGS, ROOT, cli_env, run_cli
from vancls import builders, reference_compat, reports
from vancls.config import UsageError, parse_with_config
from vancls.device import cpu_autocast_supports

# The reference's option tables (names, defaults, kinds of its train.py and validate.py), kept beside this test.
REFERENCE_OPTIONS_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'reference_options.md')
PARSERS = {'train': train.get_args_parser, 'validate': validate.get_args_parser}


# ------------------------------------------------------------------------------------------ the reference's tables

def reference_rows():
    """(script, flags, default text, kind text) for every option row of reference-options.md."""
    text = open(REFERENCE_OPTIONS_MD).read()
    rows = []
    for section in text.split('\n## ')[1:]:
        script = 'train' if 'train.py' in section.splitlines()[0] else 'validate'
        for flags, default, kind in re.findall(r'^\| `([^`]+)` \| `([^`]*)` \| ([^|]*)\|', section, re.M):
            if flags.split()[0].startswith('-'):
                rows.append((script, tuple(flags.split()), default, kind.strip()))
    return rows


# Values the reference's default cannot give (None, or a default with no effect): one plausible value per option.
PLAUSIBLE = {
    '--num-classes': ['10'], '--gp': ['avg'], '--img-size': ['32'], '--input-size': ['3', '32', '32'],
    '--crop-pct': ['0.9'], '--mean': ['0.5', '0.5', '0.5'], '--std': ['0.25', '0.25', '0.25'],
    '-vb': ['16'], '--opt-eps': ['1e-8'], '--opt-betas': ['0.9', '0.999'], '--clip-grad': ['1.0'],
    '--lr-noise': ['0.4', '0.8'], '--start-epoch': ['1'], '--cutmix-minmax': ['0.2', '0.8'],
    '--drop-connect': ['0.2'], '--drop-path': ['0.2'], '--drop-block': ['0.1'], '--bn-momentum': ['0.05'],
    '--bn-eps': ['1e-4'], '--bce-target-thresh': ['0.2'], '--tta': ['2'], '--aug-repeats': ['3'],
    '--aug-splits': ['2'], '--epoch-repeats': ['2'], '--lr-cycle-limit': ['2'], '--num-gpu': ['2'],
    '--worker-seeding': ['part'], '--local_rank': ['0'], '--output': [''], '--log-freq': ['5'],
}


def _default_tokens(flag, default, kind):
    """The reference's default as command-line tokens, or None when it cannot be written (None)."""
    if 'store_true' in kind or default in ('None', ''):  # a flag's default is its absence
        return None
    if default.startswith('['):
        return [repr(float(eval(x))) for x in default.strip('[]').split(',')]  # e.g. '[3.0 / 4.0, 4.0 / 3.0]'
    return [ast.literal_eval(default) if default.startswith("'") else default]


def _parse_and_apply(script, tokens, monkeypatch):
    """Parse like run_cli does, then apply: returns args, or the UsageError (argparse must never exit)."""
    monkeypatch.setenv('LOCAL_RANK', '0')
    _stub_legacy_jit(monkeypatch)
    argv = ['DATA', *tokens]
    try:
        args = parse_with_config(PARSERS[script](), argv)
    except SystemExit as e:  # pragma: no cover - the failure this test exists to catch
        pytest.fail(f'{script}.py {" ".join(tokens)}: argparse exited ({e.code})')
    try:
        return reference_compat.apply_reference_options(args, script)
    except UsageError as e:
        return e


LEGACY_JIT_SWITCHES = ('_jit_set_profiling_executor', '_jit_set_profiling_mode', '_jit_override_can_fuse_on_gpu')


def _stub_legacy_jit(monkeypatch) -> list:
    """--legacy-jit switches process-wide TorchScript settings: record the calls instead (other tests script)."""
    calls = []
    for name in LEGACY_JIT_SWITCHES:
        if hasattr(torch._C, name):
            monkeypatch.setattr(torch._C, name, lambda *a, _name=name: calls.append((_name, a)))
    return calls


def _check_outcome(outcome, flag):
    if isinstance(outcome, UsageError):
        text = str(outcome)
        assert '\n' not in text and flag.lstrip('-').replace('_', '-') in text.replace('_', '-'), text
        assert ';' in text or ' use ' in text or 'drop' in text, f'no alternative named: {text}'


def _variants(flags, default, kind):
    """(flag, command-line tokens, whether they are the reference's default) for each spelling of an option: with
    the reference's default (when it can be written) and with another plausible value (PLAUSIBLE; a flag: given)."""
    for flag in flags:
        tokens = _default_tokens(flag, default, kind)
        if tokens is not None:
            yield flag, [flag, *tokens] if tokens != [''] else [f'{flag}='], True
        other = PLAUSIBLE.get(flag)
        if other is None and 'store_true' in kind:
            other = []
        if other is not None:
            yield flag, [flag, *other] if other != [''] else [f'{flag}='], False


ROW_IDS = dict(ids=lambda v: v if isinstance(v, str) and v in ('train', 'validate') else None)


@pytest.mark.parametrize('script,flags,default,kind', reference_rows(), **ROW_IDS)
def test_reference_option_parses_and_applies(script, flags, default, kind, monkeypatch):
    """Each spelling with the reference's default works unchanged; with another value it is applied or refused in
    one line that names the option and an alternative."""
    for flag, argv, is_default in _variants(flags, default, kind):
        outcome = _parse_and_apply(script, argv, monkeypatch)
        if is_default:
            assert not isinstance(outcome, UsageError), f'{" ".join(argv)} (the reference default) refused: {outcome}'
        else:
            _check_outcome(outcome, flag)


@pytest.fixture(scope='module')
def setup_walk(digits_dir, module_tmp):
    """script -> the command line an accepted option is added to for the setup walk: the digits at 32 px on the
    CPU, no loader workers (the option comes last and wins). validate.py gets a checkpoint of van_b0 for the digits,
    and --pretrained a local official-layout file (--pretrained-path: no download)."""
    import timm
    import models  # noqa: F401 - registers VAN
    folder = module_tmp('setup-walk')
    model = timm.create_model('van_b0', num_classes=10)
    torch.save({'state_dict': model.state_dict(), 'arch': 'van_b0', 'class_names': [str(i) for i in range(10)]},
               folder / 'digits.pth.tar')
    torch.save({'state_dict': timm.create_model('van_b0').state_dict()}, folder / 'official.pth.tar')
    common = [str(digits_dir), '--model', 'van_b0', '--img-size', '32', '--workers', '0', '--device', 'cpu',
              '--pretrained-path', str(folder / 'official.pth.tar')]
    return {'train': [*common, '--output', str(folder / 'out'), '--experiment', 'walk'],
            'validate': [*common, '--checkpoint', str(folder / 'digits.pth.tar')]}


def _set_up(script, argv, monkeypatch):
    """What train.py / validate.py do with `argv` before their first step: apply the reference options, check,
    and build the run (data, model, optimizer, schedule, EMA, loaders; validate.py up to its evaluation loop,
    which is stubbed). Returns the error a real run would print, or None."""
    from vancls.device import DistEnv
    from vancls.errors import USER_ERRORS
    monkeypatch.setenv('LOCAL_RANK', '0')
    _stub_legacy_jit(monkeypatch)
    monkeypatch.setattr(validate, 'evaluate', lambda *a, **k: dict.fromkeys(
        ('top1', 'top5', 'loss', 'img_per_sec', 'num_images'), 0))
    env = DistEnv(device=torch.device('cpu'))
    try:
        args = reference_compat.apply_reference_options(parse_with_config(PARSERS[script](), argv), script)
        if script == 'train':
            train.check_args(args)
            train.setup(args, env)
        else:
            validate._validate(args, env)
    except USER_ERRORS as e:
        return e
    return None


# Accepted values that a real run still stops on, at its checks or setup, with the one-line error the CLI prints:
# (script, tokens) -> what the error says. Every other accepted value must set up a run.
SETUP_REFUSALS = {
    ('train', '--model resnet50'): 'is not a VAN model; choose one of: van_b0',  # the reference's parser default
    ('validate', '--model dpn92'): 'is not a VAN model; choose one of: van_b0',  # ditto
    ('validate', '-m dpn92'): 'is not a VAN model; choose one of: van_b0',
    ('validate', '--checkpoint='): 'give --checkpoint PATH',
    ('validate', '--use-ema'): 'has no EMA weights',  # the walk's checkpoint has none
    ('train', '--apex-amp'): 'apex is not installed',  # where apex is not installed
}
if not cpu_autocast_supports(torch.float16):  # torch < 2.3: bfloat16 only
    SETUP_REFUSALS.update(dict.fromkeys([('train', '--native-amp'), ('validate', '--native-amp'),
                                         ('validate', '--apex-amp')], 'use --amp-dtype bfloat16'))


@pytest.mark.parametrize('script,flags,default,kind', reference_rows(), **ROW_IDS)
def test_accepted_reference_option_sets_up_a_run(script, flags, default, kind, setup_walk, monkeypatch):
    """Every value the walk above accepts also passes the checks and the setup of a real run (in process, up to the
    loaders), or stops there with the one-line error SETUP_REFUSALS names, never with another error."""
    for flag, tokens, _ in _variants(flags, default, kind):
        if isinstance(_parse_and_apply(script, tokens, monkeypatch), UsageError):
            continue  # refused already (the test above checks how)
        error = _set_up(script, [*setup_walk[script], *tokens], monkeypatch)
        expected = SETUP_REFUSALS.get((script, ' '.join(tokens)))
        if error is not None:
            assert expected and expected in str(error) and '\n' not in str(error), \
                f'{script}.py {" ".join(tokens)}: {type(error).__name__}: {error}'
        else:
            assert expected is None or 'apex' in expected, f'{script}.py {" ".join(tokens)} set up: {expected}?'


def test_table_is_complete():
    """Both tables were found and every reference-only option of the issue is among them."""
    rows = reference_rows()
    flags = {f for _, fl, _, _ in rows for f in fl}
    assert len([r for r in rows if r[0] == 'train']) > 100 and len([r for r in rows if r[0] == 'validate']) > 30
    for flag in ('--native-amp', '--apex-amp', '--no-prefetcher', '--log-wandb', '--torchscript', '--tta',
                 '--real-labels', '--aug-repeats', '--jsd-loss', '--lr-noise', '--lr-cycle-limit', '--bn-momentum',
                 '--split-bn', '--drop-block', '--use-multi-epochs-loader', '--num-gpu', '--log-freq', '--local_rank'):
        assert flag in flags


# ------------------------------------------------------------------------------------------- what each one does

def _args(script, *tokens, env_local_rank='0', monkeypatch=None):
    if monkeypatch is not None:
        if env_local_rank is None:
            monkeypatch.delenv('LOCAL_RANK', raising=False)
        else:
            monkeypatch.setenv('LOCAL_RANK', env_local_rank)
    return reference_compat.apply_reference_options(parse_with_config(PARSERS[script](), ['DATA', *tokens]), script)


def test_amp_flags(monkeypatch):
    for script in ('train', 'validate'):
        a = _args(script, '--native-amp', monkeypatch=monkeypatch)
        assert a.amp and a.amp_dtype == 'float16'
    a = _args('train', '--apex-amp', monkeypatch=monkeypatch)
    assert a.amp and a.amp_impl == 'apex'
    a = _args('validate', '--apex-amp', monkeypatch=monkeypatch)  # O1 at inference: float16 autocast
    assert a.amp and a.amp_dtype == 'float16'
    with pytest.raises(UsageError, match='--amp-dtype bfloat16'):
        _args('train', '--native-amp', '--amp-dtype', 'bfloat16', monkeypatch=monkeypatch)


@pytest.mark.parametrize('spelling', ['--local-rank=1', '--local_rank=1'])
def test_local_rank_checked_against_env(spelling, monkeypatch):
    assert _args('train', spelling, env_local_rank='1', monkeypatch=monkeypatch).local_rank == 1
    with pytest.raises(UsageError, match='LOCAL_RANK=0'):
        _args('train', spelling, env_local_rank='0', monkeypatch=monkeypatch)
    _args('validate', spelling, env_local_rank=None, monkeypatch=monkeypatch)  # old launcher: no env, the flag
    assert os.environ['LOCAL_RANK'] == '1'


def test_train_mappings(monkeypatch):
    a = _args('train', '--drop-connect', '0.3', '--output=', monkeypatch=monkeypatch)
    assert a.drop_path == 0.3 and a.output == os.path.join('.', 'output', 'train')
    with pytest.raises(UsageError, match='--bce-loss'):
        _args('train', '--bce-target-thresh', '0.2', monkeypatch=monkeypatch)
    a = _args('train', '--bce-loss', '--bce-target-thresh', '0.2', '--mixup', '0', '--cutmix', '0',
              monkeypatch=monkeypatch)
    assert builders.create_train_loss(a, mixup_active=False).target_threshold == 0.2
    with pytest.raises(UsageError, match='--compile'):
        _args('train', '--torchscript', monkeypatch=monkeypatch)
    calls = _stub_legacy_jit(monkeypatch)
    _args('validate', '--legacy-jit', '--torchscript', monkeypatch=monkeypatch)
    assert calls == [('_jit_set_profiling_executor', (False,)), ('_jit_set_profiling_mode', (False,)),
                     ('_jit_override_can_fuse_on_gpu', (True,))]
    with pytest.raises(UsageError, match='choose one'):
        _args('validate', '--torchscript', '--compile', monkeypatch=monkeypatch)
    with pytest.raises(UsageError, match='torchrun --nproc_per_node=N validate.py'):
        _args('validate', '--num-gpu', '2', monkeypatch=monkeypatch)
    assert builders._scheduler_options(_args('train', monkeypatch=monkeypatch)) == {}


def test_schedule_options_reach_timm_scheduler(monkeypatch):
    a = _args('train', '--epochs', '10', '--lr', '1e-3', '--lr-noise', '0.4', '0.8', '--lr-noise-pct', '0.5',
              '--lr-noise-std', '0.7', '--lr-k-decay', '2.0', monkeypatch=monkeypatch)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = builders.create_scheduler(a, optimizer)
    assert sched.noise_range_t == [4.0, 8.0] and sched.noise_pct == 0.5 and sched.noise_std == 0.7
    assert sched.noise_seed == a.seed and sched.k_decay == 2.0
    a = _args('train', '--sched', 'plateau', '--patience-epochs', '3', monkeypatch=monkeypatch)
    assert builders.create_scheduler(a, optimizer).lr_scheduler.patience == 3


def test_batchnorm_options_reach_every_batchnorm(monkeypatch):
    import timm
    import models  # noqa: F401 - registers VAN
    model = timm.create_model('van_b0', num_classes=10)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert builders.configure_batchnorm(model, _args('train', monkeypatch=monkeypatch)) == 0
    a = _args('train', '--bn-tf', '--bn-eps', '1e-4', monkeypatch=monkeypatch)
    assert builders.configure_batchnorm(model, a) == len(norms) > 10
    assert all(m.momentum == reference_compat.BN_TF_MOMENTUM and m.eps == 1e-4 for m in norms)


def test_log_wandb(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: None if name == 'wandb' else real_find_spec(name, *a))
    with pytest.raises(UsageError, match='pip install wandb'):
        _args('train', '--log-wandb', monkeypatch=monkeypatch)
    monkeypatch.setattr(importlib.util, 'find_spec', real_find_spec)
    logged, finished, inits = [], [], []

    class FakeRun:
        def log(self, row, step=None):
            logged.append((step, row))

        def finish(self):
            finished.append(True)

    fake = types.ModuleType('wandb')
    fake.__spec__ = importlib.machinery.ModuleSpec('wandb', None)
    fake.init = lambda **kw: inits.append(kw) or FakeRun()
    monkeypatch.setitem(sys.modules, 'wandb', fake)
    a = _args('train', '--log-wandb', monkeypatch=monkeypatch)
    from vancls.reports import RunReport
    out = tmp_path / 'runs' / 'exp1'
    out.mkdir(parents=True)
    report = reports.with_wandb(RunReport(str(out)), a, str(out))
    report.add_epoch({'epoch': 0, 'lr': 1e-3, 'train_loss': 2.0, 'eval_loss': None, 'eval_top1': 50.0,
                      'eval_top5': 90.0, 'train_img_per_sec': 10.0, 'bad_images': 0})
    report.close()
    assert inits[0]['project'] == 'runs' and inits[0]['name'] == 'exp1' and inits[0]['config']['log_wandb'] is True
    assert logged == [(0, {'epoch': 0, 'lr': 1e-3, 'train_loss': 2.0, 'eval_top1': 50.0, 'eval_top5': 90.0,
                           'train_img_per_sec': 10.0, 'bad_images': 0})]
    assert finished == [True] and (out / 'summary.csv').is_file()


# --------------------------------------------------------------------------------- reference-made checkpoints

def reference_namespace(**overrides):
    """The reference's train.py args as its saver pickled them: an argparse.Namespace of the defaults."""
    values = {}
    for script, flags, default, kind in reference_rows():
        if script != 'train':
            continue
        dest = max(flags, key=len).lstrip('-').replace('-', '_')
        if 'store_true' in kind:
            values[dest] = False
        elif default in ('None', ''):
            values[dest] = None if default == 'None' else ''
        else:
            values[dest] = eval(default)  # the table's Python literals, e.g. [3.0 / 4.0, 4.0 / 3.0]
    values.update(overrides)
    return argparse.Namespace(**values)


def make_reference_checkpoint(path, weights, ema_weights, epoch=0, arch='van_b0'):
    """The layout timm 0.4's CheckpointSaver wrote from a DDP run: `module.` keys, a real AdamW state of timm's
    create_optimizer_v2 on the same model, apex's loss-scaler state, args as a Namespace, version 2."""
    import timm
    from timm.optim import create_optimizer_v2
    import models  # noqa: F401
    model = timm.create_model(arch, num_classes=weights['head.weight'].shape[0])
    model.load_state_dict(weights)
    optimizer = create_optimizer_v2(model, opt='adamw', lr=1e-3, weight_decay=0.05)
    for _ in range(2):  # a real state: step counts, exp_avg, exp_avg_sq for every parameter
        model(torch.randn(2, 3, 32, 32)).logsumexp(1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    ckpt = {
        'epoch': epoch, 'arch': arch,
        'state_dict': {f'module.{k}': v.clone() for k, v in weights.items()},
        'optimizer': optimizer.state_dict(),
        'amp': {'loss_scaler0': {'loss_scale': 65536.0, 'unskipped': 0}},
        'args': reference_namespace(model=arch, img_size=32, drop_path=0.1, apex_amp=True, output=''),
        'version': 2, 'metric': 42.5,
        'state_dict_ema': {k: v.clone() for k, v in ema_weights.items()},
    }
    torch.save(ckpt, path)
    return ckpt


class _RunsCode:
    """Unpickling this calls os.system (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


@pytest.fixture(scope='module')
def trained(digits_dir, module_tmp):
    """A van_b0 trained briefly on digits at 32 px by train.py (good enough that predictions differ per image)."""
    out = module_tmp('trained')
    r = run_cli('train.py', digits_dir, *FAST_TRAIN_ARGS, '-b', '32', '--lr', '2e-3', '--epochs', '2',
                '--workers', '0', '--output', out, '--experiment', 'x', timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return out / 'x' / 'last.pth.tar'


@pytest.fixture(scope='module')
def ref_ckpt(trained, module_tmp):
    """(reference-layout file, the same weights as a plain state dict file, the EMA weights as one)."""
    folder = module_tmp('ref')
    ours = torch.load(trained, map_location='cpu', weights_only=True)
    weights = ours['state_dict']
    ema = {k: v * 0.5 if v.is_floating_point() and k.endswith('weight') else v.clone() for k, v in weights.items()}
    path = folder / 'van_b0_reference.pth.tar'
    make_reference_checkpoint(path, weights, ema)
    torch.save(weights, folder / 'plain.pth')
    torch.save(ema, folder / 'plain_ema.pth')
    return path, folder / 'plain.pth', folder / 'plain_ema.pth'


VAL = ['--img-size', '32', '--device', 'cpu', '-j', '0']


def _validate(digits_dir, ckpt, tmp_path, *extra, name='v.json'):
    r = run_cli('validate.py', digits_dir, '--checkpoint', ckpt, *VAL, *extra, '--results-file', tmp_path / name)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.load(open(tmp_path / name))


@pytest.mark.oldtorch
@pytest.mark.slow
def test_reference_checkpoint_evaluates(ref_ckpt, digits_dir, tmp_path):
    """validate.py reads the reference layout without --trust-checkpoint: the same numbers as the bare weights,
    its EMA weights with --use-ema; the model name comes from the file's arch when --model is not given."""
    ref, plain, plain_ema = ref_ckpt
    v_ref = _validate(digits_dir, ref, tmp_path, name='ref.json')
    v_plain = _validate(digits_dir, plain, tmp_path, '--model', 'van_b0', name='plain.json')
    assert v_ref['model'] == 'van_b0' and v_ref['num_images'] == 359
    assert v_ref['top1'] == v_plain['top1'] and v_ref['loss'] == pytest.approx(v_plain['loss'], abs=1e-6)
    assert v_ref['top1'] > 30  # a trained model: the checks below compare per-image results
    v_ema = _validate(digits_dir, ref, tmp_path, '--use-ema', name='ema.json')
    v_plain_ema = _validate(digits_dir, plain_ema, tmp_path, '--model', 'van_b0', name='plain_ema.json')
    assert v_ema['top1'] == v_plain_ema['top1'] and v_ema['loss'] != v_ref['loss']


@pytest.mark.slow
def test_reference_checkpoint_through_train_eval_8p(ref_ckpt, digits_dir, tmp_path):
    from test_scripts import check_success, run_script
    p = run_script('train_eval_8p.sh', digits_dir, ref_ckpt[0], out_root=tmp_path, env={'NPROC': '1'})
    r = check_success(p, tmp_path, 'train_eval_8p', 'eval', ranks=1)
    assert r['results']['num_images'] == 359 and 'trust' not in p.stderr


@pytest.mark.oldtorch
@pytest.mark.slow
def test_reference_checkpoint_resumes(ref_ckpt, digits_dir, tmp_path):
    """train.py --resume continues after the file's epoch with its AdamW state (step counts go on from 2) and says
    what the file could not give."""
    ref = ref_ckpt[0]
    r = run_cli('train.py', digits_dir, *FAST_TRAIN_ARGS, '-b', '16', '--epochs', '2', '--max-steps', '3',
                '--workers', '0', '--no-eval', '--resume', ref, '--output', tmp_path, '--experiment', 'resumed')
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in (r.stdout + r.stderr).splitlines() if 'Resumed from' in ln)
    assert f'Resumed from {ref}: epoch 1, step 0; restored: weights, optimizer, epoch' in line
    for missing in ('apex loss scale', 'scheduler state', 'RNG states', 'position inside an epoch'):
        assert missing in line, line
    last = torch.load(tmp_path / 'resumed' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert last['epoch'] == 1
    steps = {float(s['step']) for s in last['optimizer']['state'].values()}
    assert steps == {2.0 + 3.0}, steps  # 2 steps in the reference's state + 3 here


@pytest.mark.slow
def test_reference_checkpoint_as_pretrained(ref_ckpt, digits_dir, tmp_path):
    """timm.create_model(pretrained_cfg_overlay=dict(file=...)) and train.py --pretrained-path read the file
    without --trust-checkpoint. timm takes a file's EMA weights when it has them."""
    import timm
    import models  # noqa: F401
    ref, _, plain_ema = ref_ckpt
    model = timm.create_model('van_b0', pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(ref)))
    expected = torch.load(plain_ema, map_location='cpu', weights_only=True)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items() if not k.startswith('head.'))  # 10 != 1000
    r = run_cli('train.py', digits_dir, *FAST_TRAIN_ARGS, '-b', '16', '--epochs', '1', '--max-steps', '1',
                '--workers', '0', '--no-eval', '--pretrained', '--pretrained-path', ref, '--output', tmp_path,
                '--experiment', 'pre')
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.oldtorch
@pytest.mark.slow
def test_code_running_checkpoint_refused_everywhere(digits_dir, tmp_path):
    import timm
    import models  # noqa: F401
    from vancls.checkpoint import CheckpointError, read_checkpoint
    marker = tmp_path / 'MARKER'
    evil = tmp_path / 'evil.pth.tar'
    weights = timm.create_model('van_b0', num_classes=10).state_dict()
    torch.save({'epoch': 0, 'arch': 'van_b0', 'state_dict': weights, 'args': _RunsCode(marker), 'version': 2}, evil)
    with pytest.raises(CheckpointError, match=r'system'):
        read_checkpoint(str(evil))
    with pytest.raises(Exception, match='system'):
        timm.create_model('van_b0', pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(evil)))
    for script, args in (('validate.py', ['--checkpoint', evil, *VAL]),
                         ('train.py', [*FAST_TRAIN_ARGS, '--resume', evil, '--epochs', '1', '--max-steps', '1',
                                       '--output', tmp_path, '--workers', '0']),
                         ('train.py', [*FAST_TRAIN_ARGS, '--initial-checkpoint', evil, '--epochs', '1',
                                       '--max-steps', '1', '--output', tmp_path, '--workers', '0'])):
        r = run_cli(script, digits_dir, *args)
        assert r.returncode != 0
        error = r.stderr.strip().splitlines()[-1]
        assert error.startswith('error:') and 'system' in error and '--trust-checkpoint' in error, r.stderr[-2000:]
        assert 'Traceback' not in r.stderr
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------- ReaL labels

def _imagenet_named_val(digits_dir, root):
    """The digits val/ tree with the files renamed as ImageNet's validation images (numbered in a shuffled order,
    so that the file order inside a class is not the numbering order)."""
    import random
    src = os.path.join(digits_dir, 'val')
    files = [(c, f) for c in sorted(os.listdir(src)) for f in sorted(os.listdir(os.path.join(src, c)))]
    numbers = list(range(1, len(files) + 1))
    random.Random(0).shuffle(numbers)
    labels = [None] * len(files)
    for (cls, name), n in zip(files, numbers):
        os.makedirs(os.path.join(root, 'val', cls), exist_ok=True)
        os.symlink(os.path.join(src, cls, name), os.path.join(root, 'val', cls, f'ILSVRC2012_val_{n:08d}.JPEG'))
        labels[n - 1] = int(cls)
    return labels


@pytest.mark.slow
def test_real_labels(ref_ckpt, digits_dir, tmp_path):
    """--real-labels: with the true label as the only real label, the ReaL top-1 is the usual top-1 (every image
    matched to its own entry); with every class as real, 100; images without real labels are left out."""
    data = tmp_path / 'imagenet_like'
    labels = _imagenet_named_val(digits_dir, str(data))
    ref = ref_ckpt[0]
    cases = {'same': [[y] for y in labels], 'all': [list(range(10)) for _ in labels],
             'wrong': [[(y + 1) % 10] if i % 2 else [] for i, y in enumerate(labels)]}
    results = {}
    for name, entries in cases.items():
        real = tmp_path / f'real_{name}.json'
        real.write_text(json.dumps(entries))
        results[name] = _validate(str(data), ref, tmp_path, '--real-labels', real, name=f'{name}.json')
    same = results['same']
    assert same['top1'] == pytest.approx(same['original_top1']) and same['top5'] == pytest.approx(same['original_top5'])
    assert results['all']['top1'] == 100.0
    assert results['wrong']['top1'] < same['original_top1'] / 2
    bad = tmp_path / 'short.json'
    bad.write_text(json.dumps(cases['same'][:10]))
    r = run_cli('validate.py', str(data), '--checkpoint', ref, *VAL, '--real-labels', bad)
    assert r.returncode == 2 and 'error: --real-labels' in r.stderr and '10 entries for 359' in r.stderr


@pytest.mark.slow
def test_valid_labels_and_torchscript(ref_ckpt, digits_dir, tmp_path):
    """--valid-labels scores only the listed logits (all ten in order: the usual numbers); --torchscript gives the
    same numbers as eager, or one clear error."""
    ref = ref_ckpt[0]
    base = _validate(digits_dir, ref, tmp_path, name='base.json')
    listed = tmp_path / 'valid.txt'
    listed.write_text('\n'.join(str(i) for i in range(10)) + '\n')
    assert _validate(digits_dir, ref, tmp_path, '--valid-labels', listed, name='vl.json')['top1'] == base['top1']
    r = run_cli('validate.py', digits_dir, '--checkpoint', ref, *VAL, '--torchscript', '--results-file',
                tmp_path / 'ts.json')
    if r.returncode == 0:
        assert json.load(open(tmp_path / 'ts.json'))['top1'] == pytest.approx(base['top1'])
    else:
        assert r.stderr.strip().splitlines()[-1].startswith('error: --torchscript:') and 'Traceback' not in r.stderr


# ------------------------------------------------------------------------------ the reference's command lines

def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


SHORT = ['--img-size', '32', '--epochs', '1', '--max-steps', '2', '--device', 'cpu', '--workers', '0', '--aa', 'none']


@pytest.mark.slow
def test_distributed_train_sh_launch(digits_dir, tmp_path):
    """distributed_train.sh: python -m torch.distributed.launch --nproc_per_node=N train.py DATA --model van_b0
    -b 128 --lr 1e-3 --drop-path 0.1 (the launcher passes --local-rank=N); 2 processes, smaller sizes."""
    cmd = [sys.executable, '-m', 'torch.distributed.launch', '--nproc_per_node=2', f'--master_port={_free_port()}',
           os.path.join(ROOT, 'train.py'), digits_dir, '--model', 'van_b0', '-b', '16', '--lr', '1e-3',
           '--drop-path', '0.1', *SHORT, '--output', str(tmp_path), '--experiment', 'launch']
    r = subprocess.run(cmd, cwd=ROOT, env=cli_env(OMP_NUM_THREADS=1), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(tmp_path / 'launch' / 'results.json'))
    assert res['world_size'] == 2 and res['ranks_in_sync'] is True and res['global_batch'] == 32


@pytest.mark.slow
def test_port_train_sh_flags_and_eval_sh(digits_dir, tmp_path):
    """The port's train script flags (van_base, -b 128, lr 1e-3, drop path 0.1, --amp, adamw/momentum/wd as its
    README lists) and eval.sh's `validate.py DATA --model van_tiny --checkpoint CKPT -b 128`."""
    r = run_cli('train.py', digits_dir, '--model', 'van_base', '-b', '16', '--lr', '1e-3', '--drop-path', '0.1',
                '--amp', '--opt', 'adamw', '--momentum', '0.9', '--weight-decay', '0.05', *SHORT, '--no-eval',
                '--output', tmp_path, '--experiment', 'port')
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(tmp_path / 'port' / 'results.json'))['model'] == 'van_base'
    tiny = tmp_path / 'tiny.pth.tar'
    import timm
    import models  # noqa: F401
    make_reference_checkpoint(tiny, timm.create_model('van_tiny', num_classes=10).state_dict(),
                              timm.create_model('van_tiny', num_classes=10).state_dict(), arch='van_tiny')
    v = run_cli('validate.py', digits_dir, '--model', 'van_tiny', '--checkpoint', tiny, '-b', '128', *VAL,
                '--results-file', tmp_path / 'eval.json')
    assert v.returncode == 0, v.stderr[-3000:]
    assert json.load(open(tmp_path / 'eval.json'))['num_images'] == 359


def test_reference_args_yaml_as_config(tmp_path, monkeypatch):
    """The args.yaml of a reference run (every option of its train.py, with its defaults) is a valid -c file."""
    import yaml
    cfg = tmp_path / 'args.yaml'
    cfg.write_text(yaml.safe_dump(vars(reference_namespace(model='van_b2', data_dir='/data/imagenet'))))
    monkeypatch.setenv('LOCAL_RANK', '0')
    args = reference_compat.apply_reference_options(parse_with_config(train.get_args_parser(), ['-c', str(cfg)]),
                                                     'train')
    assert args.model == 'van_b2' and args.data_dir == '/data/imagenet' and args.model_ema_decay == 0.9998
    assert args.output == os.path.join('.', 'output', 'train') and args.val_split == 'validation'
