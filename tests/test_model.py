"""Tests of models/van.py (issue "VAN-B0..B6 in models/van.py"), CPU only, small inputs.

The oracle for numerical equality is tests/reference_van.py, an independent re-implementation of the
reference network from /work/shared/reference/VAN.md in the reference's own style.
"""
import argparse
import email.message
import io
import math
import re
import urllib.error
import urllib.request

import pytest
import torch
import torch.fx
import torch.nn as nn

import timm
import models  # noqa: F401  (registers the VAN variants with timm)
from models import VAN_NAMES
from models.timm_compat import LEGACY_BUILD, feature_take_indices
from models.van import checkpoint_filter_fn
from reference_van import REF_ARCHS, ref_van

# timm 0.4/0.5 (the legacy-timm pass): no forward_intermediates API, features_only cannot take a pretrained file
needs_timm_1 = pytest.mark.skipif(feature_take_indices is None, reason='needs timm >= 1.0 (forward_intermediates)')
needs_modern_build = pytest.mark.skipif(LEGACY_BUILD, reason='timm 0.4/0.5 build: no pretrained file with '
                                        'features_only, no error for variants without weights')


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, two OpenMP threads spin at every barrier and these tiny
    convolutions run 10-50x slower (measured); restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


ALIASES = {'van_tiny': 'van_b0', 'van_small': 'van_b1', 'van_base': 'van_b2', 'van_large': 'van_b3'}
EMBED_DIMS = {n: a['embed_dims'] for n, a in REF_ARCHS.items()}
IMG = 64


# ----------------------------------------------------------------------------------------------- helpers

def _meta(name, **kwargs):
    """Build a registered model on the meta device (no memory, no init cost)."""
    with torch.device('meta'):
        return timm.create_model(name, **kwargs)


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def _assert_close_rel(actual, expected, rel, what=''):
    """|actual - expected| <= rel * max|expected| elementwise (a relative tolerance on the tensor's scale)."""
    scale = expected.detach().abs().max().item()
    atol = rel * max(scale, 1e-12)
    torch.testing.assert_close(actual.detach(), expected.detach(), rtol=0, atol=atol, msg=lambda m: f'{what}: {m}')


def _assert_grads_close(params, ref_params, rel):
    """Every gradient within rel * its scale. A conv bias followed by train-mode BN (patch_embed*.proj.bias)
    has a zero gradient up to round-off, so a bias is judged on the scale of its layer's weight gradient."""
    assert set(params) == set(ref_params)
    for n, p in params.items():
        g_ref = ref_params[n].grad
        assert p.grad is not None and g_ref is not None, n
        scale = g_ref.abs().max().item()
        if n.endswith('.bias') and n[:-5] + '.weight' in ref_params:
            scale = max(scale, ref_params[n[:-5] + '.weight'].grad.abs().max().item())
        torch.testing.assert_close(p.grad, g_ref, rtol=0, atol=rel * max(scale, 1e-12),
                                   msg=lambda m: f'grad {n}: {m}')


def _assert_bn_buffers_close(sd, ref_sd, rel):
    """BN running statistics equal: a running mean on the scale of its feature's std (a mean that is 0 up to
    round-off, e.g. right after a train-mode BN, is not compared to itself), num_batches_tracked exactly."""
    n = 0
    for k, v in sd.items():
        if k.endswith('running_mean'):
            std = ref_sd[k[:-len('running_mean')] + 'running_var'].clamp_min(0).sqrt()
            scale = max(ref_sd[k].abs().max().item(), std.max().item())
            torch.testing.assert_close(v, ref_sd[k], rtol=0, atol=rel * scale, msg=lambda m: f'{k}: {m}')
        elif k.endswith('running_var'):
            _assert_close_rel(v, ref_sd[k], rel, k)
        elif k.endswith('num_batches_tracked'):
            assert v.item() == ref_sd[k].item(), k
        else:
            continue
        n += 1
    assert n > 0


def _randomize(model, seed=0):
    """Make BN running stats/affines, LayerNorm affines, layer scales and head bias non-trivial, in place."""
    g = torch.Generator().manual_seed(seed)

    def rn(t, scale):
        return torch.randn(t.shape, generator=g) * scale

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(rn(m.running_mean, 0.1))
                m.running_var.copy_(0.75 + 0.5 * torch.rand(m.running_var.shape, generator=g))
                m.weight.copy_(1 + rn(m.weight, 0.1))
                m.bias.copy_(rn(m.bias, 0.1))
                m.num_batches_tracked.fill_(7)
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + rn(m.weight, 0.1))
                m.bias.copy_(rn(m.bias, 0.1))
            elif isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.copy_(rn(m.bias, 0.01))
        for n, p in model.named_parameters():
            if 'layer_scale' in n:
                p.copy_(0.1 + 0.3 * torch.rand(p.shape, generator=g))
    return model


def _official_state_dict(variant='van_b0', seed=0, **kwargs):
    """A state dict in the official key layout, from the reference implementation, randomized."""
    torch.manual_seed(seed)
    ref = _randomize(ref_van(variant, **kwargs), seed)
    return {k: v.clone() for k, v in ref.state_dict().items()}


def _save(path, obj):
    torch.save(obj, path)
    return str(path)


def _assert_state_equal(model, sd, skip_prefix=None):
    own = model.state_dict()
    keys = [k for k in own if not (skip_prefix and k.startswith(skip_prefix))]
    assert set(keys) == {k for k in sd if not (skip_prefix and k.startswith(skip_prefix))}
    for k in keys:
        assert own[k].shape == sd[k].shape, k
        assert torch.equal(own[k], sd[k]), f'{k} differs from the file'


# ------------------------------------------------------------------------------------------ size / shapes

@pytest.mark.parametrize('name,expected_m', [('van_b0', 4.1), ('van_b1', 13.9), ('van_b2', 26.6), ('van_b3', 44.8)])
def test_param_count_1000_classes(name, expected_m):
    model = _meta(name)
    n = _n_params(model)
    assert abs(n / 1e6 - expected_m) <= 0.05, f'{name}: {n / 1e6:.3f}M params, paper says {expected_m}M'
    with torch.device('meta'):
        ref = ref_van(name)
    assert n == _n_params(ref)


@pytest.mark.parametrize('name', VAN_NAMES)
def test_state_dict_layout_matches_reference(name):
    """Same keys and shapes as the reference (i.e. the official checkpoints' layout) for every variant."""
    model = _meta(name)
    with torch.device('meta'):
        ref = ref_van(ALIASES.get(name, name))
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert set(own) == set(theirs), (sorted(set(own) - set(theirs))[:5], sorted(set(theirs) - set(own))[:5])
    assert own == theirs
    # the documented official key names
    for k in ('patch_embed1.proj.weight', 'patch_embed1.norm.running_mean', 'block1.0.norm1.weight',
              'block1.0.attn.proj_1.weight', 'block1.0.attn.spatial_gating_unit.conv0.weight',
              'block1.0.attn.spatial_gating_unit.conv_spatial.weight',
              'block1.0.attn.spatial_gating_unit.conv1.weight', 'block1.0.attn.proj_2.weight',
              'block1.0.mlp.fc1.weight', 'block1.0.mlp.dwconv.dwconv.weight', 'block1.0.mlp.fc2.weight',
              'block1.0.layer_scale_1', 'norm1.weight', 'norm4.bias', 'head.weight', 'head.bias'):
        assert k in own, k


def test_module_hyperparameters_match_reference():
    """Conv geometry, norm eps/momentum, GELU flavour: the things a shape check would not see."""
    model = timm.create_model('van_b0', drop_path_rate=0.1)
    ref = ref_van('van_b0', drop_path_rate=0.1)
    ours = dict(model.named_modules())
    n_checked = 0
    for name, r in ref.named_modules():
        if isinstance(r, (nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm, nn.Linear, nn.GELU)):
            m = ours[name]
            assert isinstance(m, type(r)), (name, type(m))
            if isinstance(r, nn.Conv2d):
                for attr in ('in_channels', 'out_channels', 'kernel_size', 'stride', 'padding', 'dilation',
                             'groups', 'padding_mode'):
                    assert getattr(m, attr) == getattr(r, attr), (name, attr)
                assert (m.bias is None) == (r.bias is None), name
            elif isinstance(r, nn.BatchNorm2d):
                assert (m.eps, m.momentum, m.affine, m.track_running_stats) == \
                       (r.eps, r.momentum, r.affine, r.track_running_stats), name
            elif isinstance(r, nn.LayerNorm):
                assert m.eps == r.eps == 1e-6, name
                assert m.normalized_shape == r.normalized_shape, name
            elif isinstance(r, nn.GELU):
                assert m.approximate == r.approximate == 'none', name
            n_checked += 1
    assert n_checked > 100
    # stochastic depth: linspace(0, rate, sum(depths)) over all blocks, in order
    ours_dp = [getattr(b.drop_path, 'drop_prob', 0.) for i in range(1, 5) for b in getattr(model, f'block{i}')]
    ref_dp = [getattr(b.drop_path, 'drop_prob', 0.) for i in range(1, 5) for b in getattr(ref, f'block{i}')]
    assert ours_dp == pytest.approx(ref_dp)
    assert ours_dp == pytest.approx(torch.linspace(0, 0.1, 13).tolist())


def test_init_matches_reference_recipe():
    torch.manual_seed(0)
    model = timm.create_model('van_b0')
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.bias is not None:
                assert torch.all(m.bias == 0), name
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            if m.weight.numel() >= 4096:
                std = m.weight.std().item()
                assert abs(std / math.sqrt(2.0 / fan_out) - 1) < 0.1, (name, std, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    for n, p in model.named_parameters():
        if 'layer_scale' in n:
            assert torch.all(p == 1e-2), n
    w = model.head.weight
    assert abs(w.std().item() - 0.02) < 0.002 and w.abs().max().item() <= 2.0 and torch.all(model.head.bias == 0)


@pytest.mark.parametrize('name', VAN_NAMES)
def test_forward_shape_every_name(name):
    x = torch.randn(2, 3, IMG, IMG)
    if name not in ('van_b0', 'van_b1', 'van_b2'):  # big (b3-b6: 45-200M params) or aliases: meta device
        model = _meta(name, num_classes=7).eval()
        with torch.device('meta'):
            out = model(x.to('meta'))
            feats = model.forward_features(x.to('meta'))
    else:
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=7).eval()
        with torch.no_grad():
            out = model(x)
            feats = model.forward_features(x)
        assert torch.isfinite(out).all()
    dims = EMBED_DIMS[ALIASES.get(name, name)]
    assert out.shape == (2, 7)
    assert feats.shape == (2, dims[3], IMG // 32, IMG // 32)
    assert model.num_classes == 7 and model.num_features == dims[3]
    assert model.pretrained_cfg['first_conv'] == 'patch_embed1.proj'
    assert model.pretrained_cfg['classifier'] == 'head'


def test_backward_every_parameter_gets_finite_gradient():
    torch.manual_seed(0)
    model = timm.create_model('van_b0', num_classes=7, drop_path_rate=0.1).train()
    x = torch.randn(2, 3, IMG, IMG)
    out = model(x)
    (out * torch.randn_like(out)).sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f'{n}: no gradient'
        assert torch.isfinite(p.grad).all(), f'{n}: non-finite gradient'
        assert p.grad.abs().sum() > 0, f'{n}: zero gradient'


# ------------------------------------------------------------------------------------ reference equality

def _pair(variant, seed=0, **kwargs):
    """(ours, reference) with the same (randomized) weights, loaded strictly."""
    torch.manual_seed(seed)
    ref = _randomize(ref_van(variant, **kwargs), seed)
    model = timm.create_model(variant, **kwargs)
    model.load_state_dict(ref.state_dict(), strict=True)
    assert set(model.state_dict()) == set(ref.state_dict())
    return model, ref


@pytest.mark.parametrize('variant,dtype,rel', [
    ('van_b0', torch.float64, 1e-10), ('van_b0', torch.float32, 1e-5), ('van_b2', torch.float32, 1e-5),
])
def test_equal_to_reference_eval(variant, dtype, rel):
    """Eval logits equal the reference's (1e-5 of their scale in float32). In float64 the two agree to ~1e-14,
    so 1e-10 is far above round-off (float64 depth-wise convs are very slow on CPU: b0, one small input)."""
    model, ref = _pair(variant)
    model.to(dtype).eval(), ref.to(dtype).eval()
    torch.manual_seed(1)
    sizes = [(2, IMG, IMG), (1, 45, 53)] if dtype == torch.float32 else [(1, 37, 41)]
    for b, h, w in sizes:  # the second is not a multiple of 32: odd feature-map sizes
        x = torch.randn(b, 3, h, w, dtype=dtype)
        with torch.no_grad():
            expected = ref(x)
            out = model(x)
        assert out.dtype == dtype
        assert expected.abs().max() > 1e-3
        _assert_close_rel(out, expected, rel, f'eval logits {h}x{w}')


@pytest.mark.parametrize('variant', ['van_b0', 'van_b2'])
def test_equal_to_reference_train(variant):
    """Train mode (BN batch statistics): logits, every parameter gradient, input gradient, BN running stats."""
    model, ref = _pair(variant)
    model.train(), ref.train()
    torch.manual_seed(1)
    x = torch.randn(2, 3, IMG, IMG)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = model(xa), ref(xb)
    _assert_close_rel(out, expected, 1e-5, 'train logits')
    w = torch.randn_like(expected)
    (out * w).sum().backward()
    (expected * w).sum().backward()
    ref_params = dict(ref.named_parameters())
    own_params = dict(model.named_parameters())
    assert set(own_params) == set(ref_params)
    _assert_grads_close(own_params, ref_params, 1e-4)
    _assert_close_rel(xa.grad, xb.grad, 1e-4, 'input grad')
    _assert_bn_buffers_close(model.state_dict(), ref.state_dict(), 1e-5)


def test_equal_to_reference_with_drop_path_same_rng():
    """Stochastic depth draws in the same order as the reference: same seed -> same training outputs."""
    model, ref = _pair('van_b0', drop_path_rate=0.3)
    model.train(), ref.train()
    x = torch.randn(2, 3, IMG, IMG)
    torch.manual_seed(123)
    out = model(x)
    torch.manual_seed(123)
    expected = ref(x)
    _assert_close_rel(out, expected, 1e-5, 'train logits with drop path')


# -------------------------------------------------------------------------------- pretrained file loading

@pytest.mark.parametrize('prefix,wrap', [
    ('module.', True), ('_orig_mod.', True), ('', True), ('', False), ('module._orig_mod.', True),
])
def test_official_file_round_trip(tmp_path, prefix, wrap):
    sd = _official_state_dict('van_b0')
    payload = {prefix + k: v for k, v in sd.items()}
    if wrap:
        payload = {'state_dict': payload, 'epoch': 299, 'arch': 'van_tiny'}
    path = _save(tmp_path / 'van_tiny_754.pth.tar', payload)
    model = timm.create_model('van_b0', pretrained=True, pretrained_cfg_overlay=dict(file=path))
    _assert_state_equal(model, sd)
    if prefix != 'module.':
        return
    # and the weights are used: same output as the reference holding them
    ref = ref_van('van_b0')
    ref.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        _assert_close_rel(model.eval()(x), ref.eval()(x), 1e-5, 'logits after loading')


def test_alias_loads_official_file(tmp_path):
    sd = _official_state_dict('van_b2')
    path = _save(tmp_path / 'van_base_828.pth.tar', {'state_dict': {'module.' + k: v for k, v in sd.items()}})
    model = timm.create_model('van_base', pretrained=True, pretrained_cfg_overlay=dict(file=path))
    _assert_state_equal(model, sd)


def test_file_of_other_variant_fails_naming_keys(tmp_path):
    sd = _official_state_dict('van_b1')
    path = _save(tmp_path / 'van_small_811.pth.tar', {'state_dict': sd})
    with pytest.raises(RuntimeError) as ei:
        timm.create_model('van_b0', pretrained=True, pretrained_cfg_overlay=dict(file=path))
    msg = str(ei.value)
    assert 'block1.2.norm1.weight' in msg  # b0 has 3 blocks in stage 1, b1 only 2: missing
    assert 'patch_embed1.proj.weight' in msg  # 64 vs 32 channels: shape mismatch
    assert '[64, 3, 7, 7]' in msg and '[32, 3, 7, 7]' in msg


def test_file_with_missing_and_unexpected_keys_fails_naming_them(tmp_path):
    sd = _official_state_dict('van_b0')
    del sd['block2.1.attn.spatial_gating_unit.conv_spatial.weight']
    del sd['norm4.bias']
    sd['block5.0.layer_scale_1'] = torch.zeros(3)
    path = _save(tmp_path / 'broken.pth.tar', {'state_dict': sd})
    with pytest.raises(RuntimeError) as ei:
        timm.create_model('van_b0', pretrained=True, pretrained_cfg_overlay=dict(file=path))
    msg = str(ei.value)
    assert 'block2.1.attn.spatial_gating_unit.conv_spatial.weight' in msg
    assert 'norm4.bias' in msg
    assert 'block5.0.layer_scale_1' in msg


def test_file_with_other_num_classes_fails_at_1000(tmp_path):
    sd = _official_state_dict('van_b0', num_classes=10)
    path = _save(tmp_path / 'ten.pth.tar', {'state_dict': sd})
    with pytest.raises(RuntimeError) as ei:
        timm.create_model('van_b0', pretrained=True, pretrained_cfg_overlay=dict(file=path))
    assert 'head.weight' in str(ei.value)
    # the file's own number of classes, given with the file, keeps its head
    model = timm.create_model('van_b0', pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=path, num_classes=10))
    _assert_state_equal(model, sd)


def test_new_num_classes_reinitializes_head_only(tmp_path):
    sd = _official_state_dict('van_b0')
    path = _save(tmp_path / 'van_tiny_754.pth.tar', {'state_dict': {'module.' + k: v for k, v in sd.items()}})
    model = timm.create_model('van_b0', pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=path))
    assert model.head.weight.shape == (10, 256) and model.head.bias.shape == (10,)
    assert model.num_classes == 10
    _assert_state_equal(model, sd, skip_prefix='head.')
    # the new head is freshly initialized: none of its rows is any row of the file's head
    dist = torch.cdist(model.head.weight.detach(), sd['head.weight'])
    assert dist.min() > 0
    assert torch.all(model.head.bias == 0)
    assert abs(model.head.weight.std().item() - 0.02) < 0.01
    out = model.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def _reference_layout_checkpoint(sd, ema_sd):
    """What the reference's (and the Ascend port's) train.py writes: timm 0.4's CheckpointSaver layout."""
    return {
        'epoch': 299, 'arch': 'van_tiny', 'version': 2, 'metric': 75.4,
        'state_dict': {'module.' + k: v for k, v in sd.items()},
        'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-3, 'params': [0, 1]}]},
        'amp': {'loss_scaler0': {'loss_scale': 65536.0, 'unskipped': 0}},
        'args': argparse.Namespace(model='van_tiny', lr=1e-3, drop_path=0.1),
        'state_dict_ema': {k: v for k, v in ema_sd.items()},
    }


def test_reference_layout_checkpoint_loads_as_pretrained(tmp_path):
    """A reference train.py checkpoint (argparse.Namespace under `args`, DDP keys, EMA weights) loads without full
    unpickling; like timm, the EMA weights are the ones taken when the file has them."""
    sd, ema = _official_state_dict('van_b0', seed=0), _official_state_dict('van_b0', seed=1)
    path = _save(tmp_path / 'checkpoint-299.pth.tar', _reference_layout_checkpoint(sd, ema))
    model = timm.create_model('van_b0', pretrained=True, pretrained_cfg_overlay=dict(file=path))
    _assert_state_equal(model, ema)


class _RunsCode:
    """Unpickling this calls os.system: torch.load(weights_only=True) must refuse it before anything runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f'touch {self.marker}',)


def test_pretrained_file_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / 'ran'
    path = _save(tmp_path / 'evil.pth', {'state_dict': _official_state_dict('van_b0'), 'x': _RunsCode(marker)})
    with pytest.raises(Exception, match='(?i)weights.only|unsupported global|not an allowed global'):
        timm.create_model('van_b0', pretrained=True, pretrained_cfg_overlay=dict(file=path))
    assert not marker.exists()


def test_pretrained_in_chans_1_adapts_the_input_conv(tmp_path):
    """timm's input-conv adaptation: a 1-channel model gets the sum of the file's RGB filters."""
    sd = _official_state_dict('van_b0')
    path = _save(tmp_path / 'van_tiny_754.pth.tar', {'state_dict': sd})
    model = timm.create_model('van_b0', pretrained=True, in_chans=1, num_classes=5,
                              pretrained_cfg_overlay=dict(file=path))
    assert model.in_chans == 1 and model.patch_embed1.proj.weight.shape == (32, 1, 7, 7)
    torch.testing.assert_close(model.patch_embed1.proj.weight, sd['patch_embed1.proj.weight'].sum(1, keepdim=True))
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items() if not k.startswith(('head.', 'patch_embed1.proj.w')))
    assert model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 5)


@needs_modern_build
def test_features_only_with_pretrained_file(tmp_path):
    sd = _official_state_dict('van_b0')
    path = _save(tmp_path / 'van_tiny_754.pth.tar', {'state_dict': sd})
    fm = timm.create_model('van_b0', pretrained=True, features_only=True, out_indices=(1, 3),
                           pretrained_cfg_overlay=dict(file=path)).eval()
    full = timm.create_model('van_b0', pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        f1, f3 = fm(x)
        torch.testing.assert_close(f3, full.forward_features(x))
    assert f1.shape == (1, 64, IMG // 8, IMG // 8) and f3.shape == (1, 256, IMG // 32, IMG // 32)


def _fake_response(data):
    class _Resp(io.BytesIO):
        def info(self):
            msg = email.message.Message()
            msg['Content-Length'] = str(len(data))
            return msg

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.close()
    return _Resp(data)


def _patch_network(monkeypatch, handler):
    """Route every urlopen that torch.hub (or urllib) would make through `handler`."""
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(urllib.request, 'urlopen', handler)
    if hasattr(torch.hub, 'urlopen'):
        monkeypatch.setattr(torch.hub, 'urlopen', handler)


@pytest.fixture
def empty_hub_dir(tmp_path, monkeypatch):
    hub = tmp_path / 'hub'
    monkeypatch.setattr(torch.hub, '_hub_dir', torch.hub._hub_dir)  # restored after the test
    torch.hub.set_dir(str(hub))
    yield hub
    assert torch.hub.get_dir() == str(hub)


def test_offline_without_file_says_what_to_download(empty_hub_dir, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError('network is unreachable (test)')

    _patch_network(monkeypatch, no_network)
    with pytest.raises(RuntimeError) as ei:
        timm.create_model('van_b0', pretrained=True)
    msg = str(ei.value)
    assert 'huggingface.co/Visual-Attention-Network/VAN-Tiny-original/resolve/main/van_tiny_754.pth.tar' in msg
    assert 'pretrained_cfg_overlay=dict(file=PATH)' in msg and '--pretrained-path' in msg
    assert 'unreachable' in msg  # failed on the network, not on something else
    ckpt_dir = empty_hub_dir / 'checkpoints'
    assert not ckpt_dir.exists() or not any(ckpt_dir.iterdir())  # no partial file left behind


def test_pretrained_downloads_into_fresh_hub_dir(empty_hub_dir, monkeypatch, tmp_path):
    """The official URL through timm and torch.hub's cache; the file is in the reference layout (with an
    argparse.Namespace), which loads without full unpickling."""
    sd = _official_state_dict('van_b0')
    buf = io.BytesIO()
    ckpt = {'state_dict': sd, 'epoch': 299, 'args': argparse.Namespace(model='van_tiny')}
    torch.save(ckpt, buf)
    data = buf.getvalue()
    requested = []

    def serve(req, *args, **kwargs):
        requested.append(getattr(req, 'full_url', req))
        return _fake_response(data)

    _patch_network(monkeypatch, serve)
    model = timm.create_model('van_b0', pretrained=True)
    assert requested == [model.pretrained_cfg['url']]
    assert requested[0].endswith('/VAN-Tiny-original/resolve/main/van_tiny_754.pth.tar')
    _assert_state_equal(model, sd)
    assert (empty_hub_dir / 'checkpoints' / 'van_tiny_754.pth.tar').is_file()

    # second time: from the cache, without the network
    def no_network(*args, **kwargs):
        raise urllib.error.URLError('network is unreachable (test)')

    _patch_network(monkeypatch, no_network)
    model = timm.create_model('van_tiny', pretrained=True)
    _assert_state_equal(model, sd)


@needs_modern_build
def test_pretrained_without_published_weights_says_so():
    with pytest.raises(RuntimeError, match='van_b4'):
        _meta('van_b4', pretrained=True)


def test_checkpoint_filter_fn_unwraps_and_strips():
    t = torch.zeros(1)
    u = torch.ones(1)
    assert checkpoint_filter_fn({'module.a.b': t}) == {'a.b': t}
    assert checkpoint_filter_fn({'model': {'_orig_mod.module.a': t}}) == {'a': t}
    assert checkpoint_filter_fn({'state_dict_ema': {'module.a': u}, 'epoch': 3}) == {'a': u}
    # `state_dict` wins over the EMA weights; a key that merely contains a prefix elsewhere is left alone
    assert checkpoint_filter_fn({'state_dict': {'a.module.b': t}, 'state_dict_ema': {'a': u}}) == {'a.module.b': t}
    with pytest.raises(ValueError):
        checkpoint_filter_fn([t])


# ------------------------------------------------------------------------------------- timm model API

def test_classifier_api():
    torch.manual_seed(0)
    model = timm.create_model('van_b0').eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        logits = model(x)
    assert pre.shape == (2, 256)
    torch.testing.assert_close(pre, feats.mean(dim=(2, 3)))
    torch.testing.assert_close(logits, model.head(pre))
    assert model.get_classifier() is model.head and isinstance(model.head, nn.Linear)

    model.reset_classifier(5)
    assert model.num_classes == 5
    assert isinstance(model.get_classifier(), nn.Linear) and model.get_classifier().out_features == 5
    with torch.no_grad():
        assert model(x).shape == (2, 5)

    model.reset_classifier(0)
    assert model.num_classes == 0 and isinstance(model.get_classifier(), nn.Identity)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 256)
    torch.testing.assert_close(out, pre)

    model = timm.create_model('van_b0', num_classes=0).eval()
    with torch.no_grad():
        assert model(x).shape == (2, 256)


def test_features_only():
    torch.manual_seed(0)
    full = _randomize(timm.create_model('van_b0')).eval()
    sd = {k: v for k, v in full.state_dict().items() if not k.startswith('head.')}
    fm = timm.create_model('van_b0', features_only=True, out_indices=(0, 1, 2, 3)).eval()
    fm.load_state_dict(sd, strict=True)
    assert fm.feature_info.reduction() == [4, 8, 16, 32]
    assert fm.feature_info.channels() == [32, 64, 160, 256]
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        feats = fm(x)
        # the stage outputs of the classifier model, computed by hand
        expected, y = [], x
        for i in range(1, 5):
            y = getattr(full, f'norm{i}')(getattr(full, f'block{i}')(getattr(full, f'patch_embed{i}')(y)))
            expected.append(y)
        last = full.forward_features(x)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 160, 4, 4), (2, 256, 2, 2)]
    for f, e in zip(feats, expected):
        torch.testing.assert_close(f, e)
    torch.testing.assert_close(feats[3], last)

    fm2 = timm.create_model('van_b0', features_only=True, out_indices=(1, 3)).eval()
    fm2.load_state_dict(sd, strict=True)
    assert fm2.feature_info.reduction() == [8, 32]
    assert fm2.feature_info.channels() == [64, 256]
    with torch.no_grad():
        feats2 = fm2(x)
    assert [tuple(f.shape) for f in feats2] == [(2, 64, 8, 8), (2, 256, 2, 2)]
    torch.testing.assert_close(feats2[0], expected[1])
    torch.testing.assert_close(feats2[1], expected[3])


class _MustNotRun(nn.Module):
    def forward(self, x):
        raise AssertionError('a module attribute that is not a stage ran in forward')


def test_forward_runs_only_the_named_stages():
    """VAN names its stages (`stage_modules`, the official key names): a module attribute added to the model never
    lands in the forward pass, and the state-dict keys stay the official ones."""
    torch.manual_seed(0)
    model = timm.create_model('van_b0', num_classes=3).eval()
    assert model.stage_modules == [f'{part}{i}' for i in range(1, 5) for part in ('patch_embed', 'block', 'norm')]
    assert model.stage_ends == ['norm1', 'norm2', 'norm3', 'norm4']
    keys = list(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model.probe = _MustNotRun()
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert list(model.state_dict()) == keys


@needs_timm_1
def test_intermediates_and_pruning_follow_the_named_stages():
    model = timm.create_model('van_b0', num_classes=3).eval()
    model.probe = _MustNotRun()
    with torch.no_grad():
        assert len(model.forward_intermediates(torch.randn(1, 3, 32, 32), intermediates_only=True)) == 4
    model.prune_intermediate_layers(indices=[1])  # keep stages 0 and 1
    assert model.stage_modules == ['patch_embed1', 'block1', 'norm1', 'patch_embed2', 'block2', 'norm2']


def test_grad_checkpointing_same_gradients_and_bn_stats():
    """Checkpointed training step == plain one: logits, every gradient, and the BN running statistics (the
    recomputation of a block in backward must not update them a second time)."""
    torch.manual_seed(0)
    a = _randomize(timm.create_model('van_b0')).train()
    b = timm.create_model('van_b0').train()
    b.load_state_dict(a.state_dict(), strict=True)
    b.set_grad_checkpointing(True)
    # count block forward calls: with checkpointing each block runs again during backward (a pre-hook: the
    # recomputation may stop early, once it has rebuilt the tensors backward needs)
    calls = {'n': 0}
    for blk in b.block2:
        blk.register_forward_pre_hook(lambda *args: calls.__setitem__('n', calls['n'] + 1))
    x = torch.randn(2, 3, IMG, IMG)
    out_a, out_b = a(x), b(x)
    _assert_close_rel(out_b, out_a, 1e-5, 'logits')
    w = torch.randn_like(out_a)
    (out_a * w).sum().backward()
    n_fwd = calls['n']
    (out_b * w).sum().backward()
    assert n_fwd == len(b.block2) and calls['n'] == 2 * len(b.block2), 'blocks were not recomputed'
    _assert_grads_close(dict(b.named_parameters()), dict(a.named_parameters()), 1e-5)
    _assert_bn_buffers_close(b.state_dict(), a.state_dict(), 1e-5)
    assert b.block2[0].norm1.num_batches_tracked.item() == 8  # 7 (randomized) + 1 step
    assert b.patch_embed1.norm.momentum == 0.1 and b.block2[0].norm1.momentum == 0.1


def test_channels_last_eval_equal():
    torch.manual_seed(0)
    model = _randomize(timm.create_model('van_b0')).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        expected = model(x)
        out_input_cl = model(x.contiguous(memory_format=torch.channels_last))
        # an NCHW model keeps the input's memory format through the stages (LayerNormChannels): no silent
        # switch to channels_last on NCHW input
        assert model.forward_features(x).is_contiguous()
        assert model.forward_features(x.contiguous(memory_format=torch.channels_last)).is_contiguous(
            memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
        out_model_cl = model(x.contiguous(memory_format=torch.channels_last))
        out_model_cl_nchw_in = model(x)
    for out, what in ((out_input_cl, 'channels_last input'), (out_model_cl, 'channels_last model'),
                      (out_model_cl_nchw_in, 'channels_last model, NCHW input')):
        _assert_close_rel(out, expected, 1e-5, what)


@pytest.mark.parametrize('alias,target', sorted(ALIASES.items()))
def test_aliases_build_same_network(alias, target):
    a, t = _meta(alias), _meta(target)
    assert {k: tuple(v.shape) for k, v in a.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in t.state_dict().items()}
    assert a.pretrained_cfg['url'] == t.pretrained_cfg['url'] != ''
    for key in ('input_size', 'crop_pct', 'interpolation', 'mean', 'std', 'num_classes'):
        assert a.pretrained_cfg[key] == t.pretrained_cfg[key], key
    assert a.depths == t.depths and a.embed_dims == t.embed_dims


def test_pretrained_cfg_matches_reference_data_config():
    official = {'van_b0': 'van_tiny_754.pth.tar', 'van_b1': 'van_small_811.pth.tar',
                'van_b2': 'van_base_828.pth.tar', 'van_b3': 'van_large_839.pth.tar'}
    hf = {'van_b0': 'Tiny', 'van_b1': 'Small', 'van_b2': 'Base', 'van_b3': 'Large'}
    for name, file in official.items():
        cfg = _meta(name).pretrained_cfg
        assert cfg['url'] == (f'https://huggingface.co/Visual-Attention-Network/VAN-{hf[name]}-original'
                              f'/resolve/main/{file}')
        assert tuple(cfg['input_size']) == (3, 224, 224) and cfg['crop_pct'] == 0.9
        assert cfg['interpolation'] == 'bicubic' and cfg['num_classes'] == 1000
        assert tuple(cfg['mean']) == pytest.approx((0.485, 0.456, 0.406))
        assert tuple(cfg['std']) == pytest.approx((0.229, 0.224, 0.225))


def test_no_weight_decay_names_layer_scales():
    model = _meta('van_b0')
    nwd = model.no_weight_decay()
    params = dict(model.named_parameters())
    expected = {n for n in params if n.endswith(('layer_scale_1', 'layer_scale_2'))}
    assert len(expected) == 2 * sum(model.depths) == 26
    assert set(nwd) == expected
    assert all(n in params for n in nwd)


def test_head_init_scale():
    """head_init_scale multiplies the freshly initialized head (weight; the bias is initialized to zero) and
    nothing else."""
    torch.manual_seed(0)
    base = timm.create_model('van_b0', num_classes=10)
    torch.manual_seed(0)
    scaled = timm.create_model('van_b0', num_classes=10, head_init_scale=0.25)
    torch.testing.assert_close(scaled.head.weight, base.head.weight * 0.25)
    assert torch.all(scaled.head.bias == 0)
    rest = {k: v for k, v in scaled.state_dict().items() if not k.startswith('head.')}
    assert rest and all(torch.equal(v, base.state_dict()[k]) for k, v in rest.items())


def test_device_dtype_in_chans_and_reset_classifier_follow_the_model():
    model = timm.create_model('van_b0', num_classes=4, in_chans=2, device='meta', dtype=torch.float64)
    assert model.in_chans == 2 and model.patch_embed1.proj.in_channels == 2
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.device.type == 'meta' for t in tensors)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    model.eval()
    model.reset_classifier(3)
    assert model.head.weight.device.type == 'meta' and model.head.weight.dtype == torch.float64
    assert not model.head.training


@needs_timm_1
def test_forward_intermediates_and_pruning():
    torch.manual_seed(0)
    model = _randomize(timm.create_model('van_b0')).eval()
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        final, taps = model.forward_intermediates(x)
        assert [t.shape[1] for t in taps] == [32, 64, 160, 256]
        torch.testing.assert_close(final, model.forward_features(x))
        torch.testing.assert_close(taps[3], final)
        two = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(two[0], taps[1])
        model.prune_intermediate_layers([1])
        assert model.num_stages == 2 and not hasattr(model, 'block3') and model.num_features == 64
        assert 'head.weight' not in model.state_dict()
        torch.testing.assert_close(model.forward_features(x), taps[1])
    with pytest.raises(ValueError, match='NCHW'):
        model.forward_intermediates(x, output_fmt='NHWC')


def test_torchscript_and_fx_trace_the_reference_execution():
    """torch.jit.script (timm's set_scriptable users) and torch.fx (timm / torchvision feature extractors) both
    work on the model and give its output, in every mode (scripted: the F.conv2d kernels)."""
    torch.manual_seed(0)
    model = _randomize(timm.create_model('van_b0', num_classes=5)).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        expected = model(x)
        _assert_close_rel(torch.jit.script(model)(x), expected, 1e-5, 'torch.jit.script')
        _assert_close_rel(torch.fx.symbolic_trace(model)(x), expected, 1e-5, 'torch.fx')
        if 'nhwc' in models.van.fast_path_modes() and models.fast_ops.FAST_PATHS_AVAILABLE:
            model.set_fast_path('nhwc')
            _assert_close_rel(torch.jit.script(model)(x), expected, 1e-5, 'torch.jit.script, nhwc model')


def test_fast_paths_degrade_clearly_without_the_kernels(monkeypatch):
    """On a torch without torch.library.custom_op (< 2.4, e.g. the 2.1 of Ascend images) the model imports and
    runs, 'auto' means the reference execution, and asking for a fast path says why it cannot run."""
    from models import fast_ops
    monkeypatch.setattr(fast_ops, 'FAST_PATHS_AVAILABLE', False)
    with pytest.raises(ValueError, match=f"fast path .nhwc. needs torch >= 2.4.*torch {re.escape(torch.__version__)}"):
        timm.create_model('van_b0', fast_path='nhwc')
    model = timm.create_model('van_b0', num_classes=3, fast_path='auto').eval()
    assert model.patch_embed1.proj.kernel == 'torch' and model.fast_path == 'none'
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_the_no_cuda_runtime_warning_is_silenced_and_only_it(caplog):
    """torch logs "No CUDA runtime is found, using CUDA_HOME=..." when a CPU-only run first compiles (Inductor imports
    torch.utils.cpp_extension); models/fast_ops.py drops that one line and nothing else from that logger."""
    import logging
    import models.fast_ops  # noqa: F401  (installs the filter)
    log = logging.getLogger('torch.utils.cpp_extension')
    with caplog.at_level(logging.WARNING):
        log.warning("No CUDA runtime is found, using CUDA_HOME='%s'", '/usr/local/cuda')
        log.warning('Error checking compiler version for %s', 'c++')
    assert [r.getMessage() for r in caplog.records] == ['Error checking compiler version for c++']


def test_every_convolution_is_a_van_conv():
    """The execution modes give each convolution its kernel through van.Conv2d: a plain nn.Conv2d in the network
    would silently keep the reference kernel in every mode."""
    import timm
    from models.van import Conv2d
    for name in ('van_b0', 'van_b2'):
        model = timm.create_model(name)
        plain = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and not isinstance(m, Conv2d)]
        assert not plain, f'{name}: plain nn.Conv2d at {plain[:5]}'
        assert sum(isinstance(m, Conv2d) for m in model.modules()) > 50
