"""models/timm_compat.py: the same behaviour on timm 1.x and on timm 0.4.12 (run by both the normal suite and the
legacy-timm pass, .ci/legacy_timm.sh)."""
import math
from types import SimpleNamespace

import pytest
import torch

import timm
import models  # noqa: F401
from models import timm_compat as tc
from vancls import builders
from vancls.data import build_transform
from PIL import Image

torch.set_num_threads(min(2, torch.get_num_threads()))


def test_build_path_follows_the_timm_api():
    # timm 0.4/0.5: build_model_with_cfg(model_cls, variant, pretrained, default_cfg, ...); later: pretrained_cfg
    assert tc.LEGACY_BUILD == timm.__version__.startswith(('0.4.', '0.5.'))


def test_model_cfg_and_overlay(tmp_path):
    model = timm.create_model('van_b0', num_classes=3)
    assert model.pretrained_cfg['url'].endswith('van_tiny_754.pth.tar') and model.num_classes == 3
    path = str(tmp_path / 'w.pth.tar')
    torch.save({'state_dict': model.state_dict()}, path)
    # the file's head is kept when the overlay gives the file's number of classes (else, as timm does, it is
    # dropped for any num_classes other than the config's 1000): the same on timm 0.4.12 and 1.x
    again = timm.create_model('van_b0', pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=dict(file=path, num_classes=3))
    assert again.pretrained_cfg['file'] == path
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    new_head = timm.create_model('van_b0', pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(file=path))
    assert not torch.equal(new_head.head.weight, model.head.weight)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in new_head.state_dict().items() if 'head' not in k)


def test_data_config_and_recipe_transforms():
    args = SimpleNamespace(model='van_b0', input_size=None, img_size=32, crop_pct=None, mean=None, std=None,
                           interpolation='', in_chans=None)
    cfg = builders.resolve_data_config(args)
    assert tuple(cfg['input_size']) == (3, 32, 32) and cfg['interpolation'] == 'bicubic' and cfg['crop_pct'] == 0.9
    recipe = SimpleNamespace(no_aug=False, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3], hflip=0.5, vflip=0.,
                             color_jitter=0.4, aa='rand-m9-mstd0.5-inc1', train_interpolation='random', reprob=0.25,
                             remode='pixel', recount=1)
    img = Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy())
    for training in (True, False):
        t = build_transform(recipe, cfg, training, use_prefetcher=False)
        for _ in range(20):
            x = t(img)
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_scheduler_cosine_with_warmup():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched, n = tc.create_scheduler(opt, sched='cosine', num_epochs=10, decay_epochs=100, cooldown_epochs=0,
                                   decay_rate=0.1, min_lr=1e-6, warmup_lr=1e-6, warmup_epochs=2)
    lrs = []
    for epoch in range(10):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]['lr'])
    assert lrs[0] == pytest.approx(1e-6) and lrs[1] == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    for t in range(2, 10):  # cosine over the whole run (warm-up not a prefix), as the reference's timm
        assert lrs[t] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * t / 10)))


def test_optimizer_weight_decay_groups_and_names():
    assert {'adamw', 'sgd', 'momentum', 'adam'} <= set(tc.list_optimizers())
    model = timm.create_model('van_b0', num_classes=4)
    opt = tc.create_optimizer(model, opt='adamw', lr=1e-3, weight_decay=0.05, momentum=0.9)
    assert isinstance(opt, torch.optim.AdamW)
    decay = {id(p) for g in opt.param_groups if g['weight_decay'] > 0 for p in g['params']}
    for n, p in model.named_parameters():
        assert (id(p) in decay) == (p.ndim > 1 and 'layer_scale' not in n), n
    assert all(g['lr'] == 1e-3 for g in opt.param_groups)


def test_mixup_targets_on_the_inputs_device():
    mix = tc.create_mixup(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5,
                          mode='batch', label_smoothing=0.1, num_classes=5)
    x, y = mix(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    assert y.device.type == 'cpu' and y.shape == (4, 5)
    torch.testing.assert_close(y.sum(1), torch.ones(4))


def test_device_prefetcher_normalizes_like_the_cpu_transform():
    batch = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    loader = [(batch, torch.tensor([1, 2]))]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pf = tc._DevicePrefetcher(loader, mean, std, 3, torch.device('cpu'))
    (x, y), = list(pf)
    expected = (batch.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)
    assert y.tolist() == [1, 2] and len(pf) == 1


def test_bce_loss_class_or_clear_error():
    try:
        cls = tc.binary_cross_entropy_cls()
    except ValueError as e:
        assert 'timm >= 0.5' in str(e)
    else:
        assert cls(smoothing=0.1)(torch.randn(2, 3), torch.tensor([0, 2])).ndim == 0
