"""Recipes for the hardware users have (issue 13): the lr scaled by the global batch, the reference schedule against
timm's, the fine-tuning and 22K configs, training and evaluating at another resolution, and sharing a model as timm
does (export.py --format timm -> timm.create_model('local-dir:DIR'), predict.py --model local-dir:DIR)."""
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import train
from tests.conftest import FAST_TRAIN_ARGS, ROOT, cli_env, run_cli
from vancls import builders
from vancls.config import UsageError, parse_with_config

CONFIGS = os.path.join(ROOT, 'configs')


def _lr_args(batch_size=128, grad_accum_steps=1, lr=None, lr_base=None, lr_base_size=1024, lr_base_scale='linear'):
    return SimpleNamespace(batch_size=batch_size, grad_accum_steps=grad_accum_steps, lr=lr, lr_base=lr_base,
                           lr_base_size=lr_base_size, lr_base_scale=lr_base_scale)


def _train_args(*argv):
    return parse_with_config(train.get_args_parser(), list(argv))


# ------------------------------------------------------------------------------------------- lr by global batch

def test_reference_recipe_needs_no_scaling():
    assert builders.resolve_lr(_lr_args(), world_size=8) == (1e-3, 1024, None)
    # 1 device, 8 accumulation steps: the same global batch, the same lr, no warning
    assert builders.resolve_lr(_lr_args(grad_accum_steps=8), world_size=1) == (1e-3, 1024, None)


@pytest.mark.parametrize('devices,batch,accum', [(1, 128, 1), (2, 64, 1), (4, 128, 1), (2, 16, 3)])
def test_lr_base_scales_like_timm(devices, batch, accum):
    """timm's train.py: lr = lr_base * global_batch / lr_base_size (linear) or its square root (sqrt)."""
    global_batch = batch * devices * accum
    for scale, factor in (('linear', global_batch / 1024), ('sqrt', math.sqrt(global_batch / 1024))):
        lr, gb, warning = builders.resolve_lr(_lr_args(batch, accum, lr_base=1e-3, lr_base_scale=scale), devices)
        assert gb == global_batch and lr == pytest.approx(1e-3 * factor, rel=1e-12) and warning is None
    lr, _, _ = builders.resolve_lr(_lr_args(batch, accum, lr_base=4e-3, lr_base_size=8192), devices)
    assert lr == pytest.approx(4e-3 * global_batch / 8192)


def test_equal_global_batch_gives_equal_lr():
    one = builders.resolve_lr(_lr_args(64, 4, lr_base=1e-3), world_size=1)
    two = builders.resolve_lr(_lr_args(64, 2, lr_base=1e-3), world_size=2)
    four = builders.resolve_lr(_lr_args(32, 2, lr_base=1e-3), world_size=4)
    assert one == two == four and one[1] == 256


def test_unscaled_global_batch_warns_with_both_fixes():
    lr, gb, warning = builders.resolve_lr(_lr_args(128), world_size=1)
    assert (lr, gb) == (1e-3, 128)
    assert '128' in warning and '1024' in warning and '--lr-base 0.001' in warning
    assert '--grad-accum-steps 8' in warning
    # an lr the user chose (--lr, which wins over --lr-base; or --lr-base) gets no warning (make demo: -b 32 --lr)
    assert builders.resolve_lr(_lr_args(128, lr=5e-4, lr_base=1e-3), world_size=2) == (5e-4, 256, None)
    assert builders.resolve_lr(_lr_args(32, lr=2e-3), world_size=1) == (2e-3, 32, None)
    assert builders.resolve_lr(_lr_args(128, lr_base=1e-3), world_size=1)[2] is None
    # no whole number of accumulation steps reaches 1024: the warning names the product to reach instead
    _, _, warning = builders.resolve_lr(_lr_args(48), world_size=3)
    assert '--grad-accum-steps' in warning and '= 1024' in warning


@pytest.mark.parametrize('kwargs,flag', [(dict(lr=0.), '--lr'), (dict(lr_base=-1e-3), '--lr-base'),
                                         (dict(lr_base=1e-3, lr_base_size=0), '--lr-base-size'),
                                         (dict(lr_base=1e-3, lr_base_scale='log'), '--lr-base-scale')])
def test_bad_lr_options_are_one_line_errors(kwargs, flag):
    with pytest.raises(UsageError, match=re.escape(flag)):
        builders.resolve_lr(_lr_args(**kwargs), world_size=1)


def test_train_options_default_to_the_reference_lr():
    args = _train_args('DATA')
    assert args.lr is None and args.lr_base is None and args.lr_base_size == 1024 and args.lr_base_scale == 'linear'
    assert builders.resolve_lr(args, world_size=8)[0] == 1e-3
    args = _train_args('DATA', '--lr', '2e-3', '--lr-base', '1e-3')
    assert builders.resolve_lr(args, world_size=1)[0] == 2e-3  # explicit --lr wins


# ------------------------------------------------------------------------------------------- the lr schedule

def _lrs(scheduler, optimizer, epochs):
    out = []
    for epoch in range(epochs):
        scheduler.step(epoch)
        out.append(optimizer.param_groups[0]['lr'])
    return out


def test_reference_schedule_matches_timm_epoch_by_epoch():
    """300 epochs + 10 cooldown, 5 warm-up epochs from 1e-6, cosine to 1e-6: our scheduler (built as train.py builds
    it, stepped over the epochs train.py runs) against timm's create_scheduler_v2 and CosineLRScheduler."""
    from timm.scheduler import CosineLRScheduler, create_scheduler_v2
    args = _train_args('-c', os.path.join(CONFIGS, 'van_b2.yaml'), 'DATA')
    args.lr = builders.resolve_lr(args, world_size=8)[0]
    assert (args.epochs, args.cooldown_epochs, args.warmup_epochs, args.lr) == (300, 10, 5, 1e-3)
    total = train.num_total_epochs(args)
    assert total == 310

    def optimizer():
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)

    opt = optimizer()
    ours = _lrs(builders.create_scheduler(args, opt), opt, total)
    opt = optimizer()
    timm_sched, timm_epochs = create_scheduler_v2(opt, sched='cosine', num_epochs=300, cooldown_epochs=10,
                                                  warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-6)
    assert timm_epochs == total
    theirs = _lrs(timm_sched, opt, total)
    opt = optimizer()
    direct = _lrs(CosineLRScheduler(opt, t_initial=300, lr_min=1e-6, warmup_t=5, warmup_lr_init=1e-6), opt, total)
    assert ours == theirs == direct
    assert ours[0] == pytest.approx(1e-6) and max(ours) == pytest.approx(1e-3, rel=1e-3)
    assert ours[4] < ours[5] and all(a >= b for a, b in zip(ours[5:], ours[6:]))  # warm-up, then cosine decay
    assert ours[300:] == [pytest.approx(1e-6)] * 10  # the cooldown epochs run at min lr


# ------------------------------------------------------------------------------------------------ configs

def test_finetune_and_22k_configs():
    ft = _train_args('-c', os.path.join(CONFIGS, 'van_b2_ft384.yaml'), 'DATA')
    assert (ft.img_size, ft.epochs, ft.warmup_epochs, ft.cooldown_epochs) == (384, 30, 0, 0)
    assert (ft.weight_decay, ft.mixup, ft.cutmix, ft.head_init_scale) == (1e-8, 0., 0., 1e-3)
    assert ft.lr is None and train.num_total_epochs(ft) == 30
    assert builders.resolve_lr(ft, world_size=32) == (pytest.approx(5e-5), 512, None)  # 4 x 8 GPUs x 16
    train.check_args(ft)

    pt = _train_args('-c', os.path.join(CONFIGS, 'van_b2_in22k_pretrain.yaml'), 'DATA')
    assert (pt.epochs, pt.warmup_epochs, pt.num_classes, pt.batch_size, pt.grad_accum_steps) == (90, 5, 21841, 64, 2)
    assert builders.resolve_lr(pt, world_size=64) == (pytest.approx(4e-3), 8192, None)  # 8 nodes x 8 GPUs
    assert builders.resolve_lr(pt, world_size=8)[0] == pytest.approx(4e-3 / 8)
    train.check_args(pt)


def test_head_init_scale_reaches_the_model():
    torch.manual_seed(0)
    plain = builders.create_model(SimpleNamespace(model='van_b0'), 7)
    torch.manual_seed(0)
    scaled = builders.create_model(SimpleNamespace(model='van_b0', head_init_scale=1e-3), 7)
    assert torch.allclose(scaled.head.weight, plain.head.weight * 1e-3)
    assert torch.equal(scaled.patch_embed1.proj.weight, plain.patch_embed1.proj.weight)


def test_weights_do_not_depend_on_the_input_size():
    """VAN has no position embeddings: the same tensors serve every resolution, nothing to interpolate."""
    import timm
    shapes = [{k: v.shape for k, v in timm.create_model('van_b0', img_size=s).state_dict().items()}
              for s in (224, 384)]
    assert shapes[0] == shapes[1]
    model = timm.create_model('van_b0', num_classes=3).eval()
    with torch.no_grad():
        for size in (32, 48, 224, 384):
            assert model(torch.randn(1, 3, size, size)).shape == (1, 3)


# ----------------------------------------------------------------------------------- runs on the digits set

def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _train_cmd(digits_dir, out, name, *extra):
    return [os.path.join(ROOT, 'train.py'), digits_dir, *FAST_TRAIN_ARGS, '--epochs', '1', '--max-steps', '2',
            '--workers', '0', '--no-eval', '--output', str(out), '--experiment', name, *extra]


def _logged_lr(stdout):
    m = re.search(r'^Global batch (\d+) .*, lr (\S+)$', stdout, re.M)
    assert m, stdout[-3000:]
    return int(m.group(1)), float(m.group(2))


@pytest.mark.slow
def test_one_and_two_processes_with_equal_global_batch(digits_dir, tmp_path):
    """1 process x 16 x 2 accumulation steps and 2 processes (gloo) x 16: global batch 32 in both. With --lr-base the
    logged lr is the same (1e-3 x 32 / 1024); without it the warning names both fixes."""
    env = cli_env(OMP_NUM_THREADS=1)
    runs = {}
    for scaled in (True, False):
        lr_args = ['--lr-base', '1e-3'] if scaled else []
        one = subprocess.run([sys.executable, *_train_cmd(digits_dir, tmp_path, f'one{scaled}', '-b', '16',
                                                          '--grad-accum-steps', '2', *lr_args)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port',
                              str(_free_port()), *_train_cmd(digits_dir, tmp_path, f'two{scaled}', '-b', '16',
                                                             *lr_args)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
        runs[scaled] = one.stdout, two.stdout
        for name, world in ((f'one{scaled}', 1), (f'two{scaled}', 2)):
            with open(tmp_path / name / 'results.json') as f:
                res = json.load(f)
            assert (res['global_batch'], res['world_size']) == (32, world)
    for stdout in runs[True]:
        assert _logged_lr(stdout) == (32, pytest.approx(1e-3 * 32 / 1024))
        assert 'warning: global batch' not in stdout
    for stdout in runs[False]:
        assert _logged_lr(stdout) == (32, 1e-3)
        warning = re.search(r'^warning: global batch 32 .*$', stdout, re.M)
        assert warning and '--lr-base 0.001' in warning.group(0) and '--grad-accum-steps' in warning.group(0)
        assert stdout.count('warning: global batch') == 1  # rank 0 only


@pytest.fixture(scope='module')
def digits_ckpt(module_tmp, digits_dir):
    """A 10-class van_b0 trained briefly on the digits at 32 px (checkpoint with class names)."""
    out = module_tmp('recipes')
    r = run_cli('train.py', digits_dir, *FAST_TRAIN_ARGS, '--epochs', '1', '--max-steps', '8', '-b', '32',
                '--lr', '2e-3', '--workers', '0', '--output', out, '--experiment', 'digits', env=cli_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return os.path.join(out, 'digits', 'last.pth.tar')


@pytest.mark.slow
def test_finetune_config_end_to_end_at_another_resolution(digits_ckpt, digits_dir, tmp_path):
    """The 384 px fine-tuning config, scaled down: 10-class 32 px weights -> a 5-class model at 48 px, the new head
    initialized at 0.001 x, the backbone from the checkpoint."""
    five = tmp_path / 'five'
    for split in ('train', 'val'):
        for cls in sorted(os.listdir(os.path.join(digits_dir, split)))[:5]:
            shutil.copytree(os.path.join(digits_dir, split, cls), five / split / cls)
    r = run_cli('train.py', five, '-c', os.path.join(CONFIGS, 'van_b2_ft384.yaml'), '--model', 'van_b0',
                '--img-size', '48', '--initial-checkpoint', digits_ckpt, '-b', '16', '--epochs', '1', '--max-steps',
                '3', '--aa', 'none', '--reprob', '0', '--device', 'cpu', '--workers', '0',
                '--output', tmp_path, '--experiment', 'ft', env=cli_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert _logged_lr(r.stdout) == (16, pytest.approx(5e-5 * 16 / 512))  # lr_base of the config, scaled
    with open(tmp_path / 'ft' / 'results.json') as f:
        res = json.load(f)
    assert res['num_classes'] == 5 and res['final_top1'] is not None
    with open(tmp_path / 'ft' / 'args.yaml') as f:
        saved = f.read()
    assert 'img_size: 48' in saved and 'head_init_scale: 0.001' in saved and 'mixup: 0.0' in saved
    before = torch.load(digits_ckpt, map_location='cpu', weights_only=True)['state_dict']
    after = torch.load(tmp_path / 'ft' / 'last.pth.tar', map_location='cpu', weights_only=True)['state_dict']
    assert after['head.weight'].shape == (5, 256) and before['head.weight'].shape == (10, 256)
    # 3 AdamW steps at lr ~1.6e-6 move a weight by < 1e-5: the backbone is the checkpoint's, and the head is at
    # the 0.001 x scale (a head at the usual scale has |w| up to ~0.04, trunc_normal std .02)
    assert torch.allclose(before['patch_embed1.proj.weight'], after['patch_embed1.proj.weight'], atol=1e-4)
    assert after['head.weight'].abs().max() < 1e-4 and after['head.bias'].abs().max() < 1e-4


@pytest.mark.slow
def test_trained_at_32_evaluates_at_48(digits_ckpt, digits_dir):
    """Evaluating at another resolution needs no conversion: validate.py at 48 px on 32 px weights."""
    import validate
    common = [digits_dir, '--checkpoint', digits_ckpt, '--workers', '0', '--device', 'cpu']
    at = {size: validate.main(parse_with_config(validate.get_args_parser(), common + ['--img-size', str(size)]))
          for size in (32, 48)}
    assert at[32]['num_images'] == at[48]['num_images'] == 359
    assert math.isfinite(at[48]['loss']) and at[48]['loss'] != at[32]['loss']  # other inputs, same weights
    _, _, data_config = builders.load_trained_model(parse_with_config(validate.get_args_parser(),
                                                                      common + ['--img-size', '48']))
    assert data_config['input_size'] == (3, 48, 48)


# ------------------------------------------------------------------------------------- sharing as timm does

@pytest.mark.slow
def test_timm_folder_round_trip(digits_ckpt, digits_dir, tmp_path):
    import timm
    import models  # noqa: F401 - registers VAN with timm
    folder = tmp_path / 'van_digits'
    r = run_cli('export.py', '--checkpoint', digits_ckpt, '--format', 'timm', '--output', folder, env=cli_env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert sorted(os.listdir(folder)) == ['config.json', 'model.safetensors']
    assert not [f for f in os.listdir(tmp_path) if f.startswith('.')]  # no temporaries left
    with open(folder / 'config.json') as f:
        cfg = json.load(f)
    names = [str(d) for d in range(10)]
    assert cfg['architecture'] == 'van_b0' and cfg['num_classes'] == 10 and cfg['label_names'] == names
    pcfg = cfg['pretrained_cfg']
    assert pcfg['input_size'] == [3, 32, 32] and pcfg['crop_pct'] == 0.9 and len(pcfg['mean']) == 3

    ckpt = torch.load(digits_ckpt, map_location='cpu', weights_only=True)
    ours = timm.create_model('van_b0', num_classes=10)
    ours.load_state_dict(ckpt['state_dict'])
    shared = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert list(shared.pretrained_cfg['label_names']) == list(ckpt['class_names']) == names
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), shared.eval()(x))

    # predict.py classifies with the folder: its class names and its input size
    image = next(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(digits_dir, 'val', '7')) for f in fs)
    r = run_cli('predict.py', image, '--model', f'local-dir:{folder}', '--json', '--device', 'cpu', env=cli_env())
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out['model'] == 'van_b0' and out['input_size'] == [3, 32, 32]
    assert out['checkpoint'] == f'local-dir:{folder}'
    assert {t['class'] for t in out['predictions'][0]['topk']} <= set(names)

    # a second export replaces the folder; a folder that is not an export is refused
    r = run_cli('export.py', '--checkpoint', digits_ckpt, '--format', 'timm', '--output', folder, env=cli_env())
    assert r.returncode == 0, r.stderr[-2000:]
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'notes.txt').write_text('mine')
    r = run_cli('export.py', '--checkpoint', digits_ckpt, '--format', 'timm', '--output', tmp_path / 'other',
                env=cli_env())
    assert r.returncode == 2 and 'not an empty folder' in r.stderr and (tmp_path / 'other' / 'notes.txt').exists()


@pytest.mark.slow
def test_push_to_hub_offline_fails_first_with_one_line(digits_ckpt, tmp_path):
    folder = tmp_path / 'hub'
    r = run_cli('export.py', '--checkpoint', digits_ckpt, '--format', 'timm', '--output', folder, '--push-to-hub',
                'someone/van-digits', env=cli_env(HF_HUB_OFFLINE=1))
    assert r.returncode == 1 and not folder.exists() and 'timm folder check' not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: --push-to-hub') and 'HF_HUB_OFFLINE' in lines[0]
    r = run_cli('export.py', '--checkpoint', digits_ckpt, '--format', 'onnx', '--output', tmp_path / 'm.onnx',
                '--push-to-hub', 'someone/van-digits', env=cli_env())
    assert r.returncode == 2 and '--format timm' in r.stderr


def test_unreachable_hub_is_one_line_before_any_work(monkeypatch):
    import export
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    local = 'http:' + '//127.0.0.1:1'  # split: no address in this file (tests/test_configs_urls.py); port 1: closed
    monkeypatch.setattr(constants, 'ENDPOINT', local)
    with pytest.raises(export.HubError, match='cannot reach ' + re.escape(local)) as e:
        export.check_hub_access('someone/van-digits', timeout=2)
    assert '\n' not in str(e.value)
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(export.HubError, match='HF_HUB_OFFLINE'):
        export.check_hub_access('someone/van-digits')
    with pytest.raises(UsageError, match='USER/NAME'):
        export.check_hub_access('not a repo id')
