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
    # an explicit --lr wins over --lr-base, and the warning says to drop it
    lr, _, warning = builders.resolve_lr(_lr_args(128, lr=5e-4, lr_base=1e-3), world_size=2)
    assert lr == 5e-4 and '--lr-base 0.0005 (without --lr' in warning and '--grad-accum-steps 4' in warning
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
