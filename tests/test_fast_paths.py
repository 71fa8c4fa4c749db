"""The kernels of every execution mode (models/fast_ops.py) compute what the plain execution computes (CPU,
small inputs).

fp32 on VAN-B0: logits, every parameter gradient and the BatchNorm running statistics of a train step agree
within 1e-4 relative (to each tensor's scale); eval logits too; VAN.fuse() within 1e-5. The state_dict is
unchanged by every mode. The compiled kernels run on tiny inputs (cold compiles are slow on small CPUs).
"""
import copy
import dataclasses
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
import models  # noqa: F401  (registers the VAN variants with timm)
from models import fast_ops
from models.fast_ops import FastPathJob, conv_kernel, resolve_fast_path
from models.van import VAN, Conv2d, fast_path_modes

torch.set_num_threads(min(2, torch.get_num_threads()))

REL = 1e-4
EAGER_MODES = ['nhwc', 'auto']  # no compilation; 'nhwc_lka' is tested on a tiny VAN below
needs_kernels = pytest.mark.skipif(not fast_ops.FAST_PATHS_AVAILABLE,
                                   reason=f'fast-path kernels need torch >= 2.4 (torch {torch.__version__})')
pytestmark = needs_kernels


def _close(actual, expected, rel, what, scale=None):
    scale = expected.detach().abs().max().item() if scale is None else scale
    torch.testing.assert_close(actual.detach().float(), expected.detach().float(), rtol=0,
                               atol=rel * max(scale, 1e-12), msg=lambda m: f'{what}: {m}')


def _randomize_norms(model):
    """Non-trivial BatchNorm statistics/affines and layer scales, so that folding is really exercised."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g) * 0.5 + 1)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.5)
        for n, p in model.named_parameters():
            if 'layer_scale' in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _train_step(model, x, y):
    model.zero_grad(set_to_none=True)
    out = model(x)
    F.cross_entropy(out, y).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    bufs = {n: b.detach().clone() for n, b in model.named_buffers()}
    return out.detach(), grads, bufs


def _assert_step_equal(got, ref, rel=REL):
    out, grads, bufs = got
    out_r, grads_r, bufs_r = ref
    _close(out, out_r, rel, 'logits')
    assert set(grads) == set(grads_r)
    for n, g in grads.items():
        scale = grads_r[n].abs().max().item()
        if n.endswith('proj.bias') and n.startswith('patch_embed'):
            # A conv bias before train-mode BatchNorm has an exactly-zero gradient; only round-off remains.
            scale = grads_r[n[:-len('bias')] + 'weight'].abs().max().item()
        _close(g, grads_r[n], rel, f'grad {n}', scale)
    for n, b in bufs.items():
        if n.endswith('num_batches_tracked'):
            assert torch.equal(b, bufs_r[n]), n
        elif n.endswith('running_mean'):
            # norm1 of a stage's first block sees the patch embedding's BN output, whose batch mean is ~0.
            var_scale = bufs_r[n[:-len('mean')] + 'var'].abs().max().item()
            _close(b, bufs_r[n], rel, f'buffer {n}', max(bufs_r[n].abs().max().item(), var_scale))
        else:
            _close(b, bufs_r[n], rel, f'buffer {n}')


@pytest.fixture(scope='module')
def b0():
    torch.manual_seed(0)
    return timm.create_model('van_b0', num_classes=10)


@pytest.fixture(scope='module')
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 64, 64, generator=g), torch.randint(0, 10, (2,), generator=g)


# --------------------------------------------------------------------------------------------------- API

def test_modes_and_validation(b0):
    modes = fast_path_modes()
    assert set(modes) == {'none', 'nhwc', 'nhwc_lka', 'auto'}
    m = copy.deepcopy(b0)
    assert m.fast_path == 'none'  # the default keeps the reference ops
    with pytest.raises(ValueError, match='accepted values are none, nhwc'):
        m.set_fast_path('fastest')
    with pytest.raises(ValueError):
        timm.create_model('van_b0', fast_path='bogus', num_classes=10)
    assert m.set_fast_path('nhwc') is m and m.fast_path == 'nhwc'


@pytest.mark.parametrize('mode', fast_path_modes())
def test_state_dict_unchanged(b0, mode):
    ref_sd = b0.state_dict()
    m = timm.create_model('van_b0', num_classes=10, fast_path=mode)
    assert m.fast_path == (mode if mode != 'auto' else resolve_fast_path('auto', FastPathJob('cpu')))  # concrete
    sd = m.state_dict()
    assert list(sd) == list(ref_sd)
    assert all(sd[k].shape == ref_sd[k].shape for k in sd)
    m.load_state_dict(ref_sd, strict=True)  # official layout both ways


def test_kernels_per_mode():
    """What each mode runs: the same modules, with one kernel per convolution picked by its geometry."""
    m = _tiny_van()
    blk = m.block1[0]
    convs = {'stem': m.patch_embed1.proj, 'pointwise': blk.attn.proj_1, 'lka_5x5': blk.attn.spatial_gating_unit.conv0,
             'lka_7x7_d3': blk.attn.spatial_gating_unit.conv_spatial, 'mlp_3x3': blk.mlp.dwconv.dwconv}
    expected = {
        'none': dict(stem='torch', pointwise='torch', lka_5x5='torch', lka_7x7_d3='torch', mlp_3x3='torch'),
        'nhwc': dict(stem='channels_last', pointwise='pointwise', lka_5x5='channels_last',
                     lka_7x7_d3='channels_last', mlp_3x3='channels_last'),
        'nhwc_lka': dict(stem='channels_last', pointwise='pointwise', lka_5x5='dw_shift', lka_7x7_d3='dw_shift',
                         mlp_3x3='channels_last'),
    }
    for mode, kernels in expected.items():
        m.set_fast_path(mode)
        assert {k: c.kernel for k, c in convs.items()} == kernels, mode
        assert all(isinstance(c, Conv2d) for c in convs.values())
    for device in ('cuda', 'npu'):
        assert resolve_fast_path('auto', FastPathJob(device)) == 'none'
    m.set_fast_path('auto')
    this_cpu = resolve_fast_path('auto', FastPathJob('cpu'))
    assert m.fast_path == this_cpu and convs['pointwise'].kernel == ('torch' if this_cpu == 'none' else 'pointwise')
    with torch.device('meta'):
        meta = _tiny_van(fast_path='auto')
    assert meta.fast_path == 'none' and meta.block1[0].attn.proj_1.kernel == 'torch'  # no kernels for meta


# Synthetic tables for the planner's logic (the measured ones are checked against the jobs they were measured for
# in test_auto_on_the_measured_tables): nhwc 1.5x and nhwc_lka 2x 'none' per image, 10 s per kernel cold, 1 s cached.
_TABLE = {('cpu', 'TEST', 'train', 'float32'): {224: {'none': 0.04, 'nhwc': 0.04 / 1.5, 'nhwc_lka': 0.02}},
          ('cpu', 'TEST', 'train', 'bfloat16'): {224: {'none': 0.05, 'nhwc': 0.04, 'nhwc_lka': 0.01}},
          ('cpu', 'TEST', 'infer', 'float32'): {32: {'none': 0.04, 'nhwc': 0.05, 'nhwc_lka': 0.05},
                                                224: {'none': 0.02, 'nhwc': 0.01, 'nhwc_lka': 0.005,
                                                      'nhwc_lka+freeze': 0.004}}}


@pytest.fixture
def test_tables(monkeypatch):
    monkeypatch.setattr(fast_ops, '_cpu_isa', lambda: 'TEST')
    monkeypatch.setattr(fast_ops, 'STEP_COST', _TABLE)
    monkeypatch.setattr(fast_ops, 'COMPILE_COST', {('cpu', 'TEST'): (10.0, 1.0)})
    monkeypatch.setattr(fast_ops, 'FREEZE_COMPILE_COST', {('cpu', 'TEST'): (1.0, 0.1)})


def _job(passes, cached=False, kind='train', img_size=224, precision='float32'):
    # 32 images of 1 GFLOP per pass, 12 kernels: per pass none 1.28 s, nhwc 0.853 s, nhwc_lka 0.64 s + 120 s cold
    return FastPathJob('cpu', kind, passes, img_size, precision, batch_size=32, gflops_per_image=1.0,
                       kernels_cached=cached, num_kernels=12)


def test_auto_minimizes_the_predicted_time(test_tables):
    """Compile cost + passes x step cost, cold or cached; a run of unknown length never compiles."""
    # nhwc_lka pays its cold 120 s back after 120 / (0.853 - 0.64) = 563 passes; its cached 12 s after 56
    assert fast_ops.plan_auto(_job(500)).mode == 'nhwc'
    assert fast_ops.plan_auto(_job(600)).mode == 'nhwc_lka'
    assert fast_ops.plan_auto(_job(50, cached=True)).mode == 'nhwc'
    assert fast_ops.plan_auto(_job(60, cached=True)).mode == 'nhwc_lka'
    plan = fast_ops.plan_auto(_job(10 ** 4))
    assert plan.seconds['nhwc_lka'] == pytest.approx(10 ** 4 * 0.64 + 120) and plan.seconds['none'] == 12800
    assert 'saves' in plan.describe() and 'compiled cold' in plan.describe()
    assert fast_ops.plan_auto(_job(None)).mode == 'nhwc' and 'nhwc_lka' not in fast_ops.plan_auto(_job(None)).seconds
    # the nearest measured size: inference at 40 px uses the 32 px row, where 'none' is fastest
    assert fast_ops.plan_auto(_job(10 ** 6, kind='infer', img_size=40)).mode == 'none'
    assert fast_ops.plan_auto(_job(10 ** 6, kind='infer', img_size=300)).mode == 'nhwc_lka'
    # not measured: the reference execution
    for job in (_job(10 ** 6, precision='float16'), dataclasses.replace(_job(10 ** 6), device_type='cuda'),
                FastPathJob('npu', forward_passes=10 ** 6)):
        assert fast_ops.plan_auto(job).mode == 'none' and resolve_fast_path('auto', job) == 'none'
    assert resolve_fast_path('nhwc', FastPathJob('npu')) == 'nhwc'  # explicit modes are what they say
    with pytest.raises(ValueError, match='job kind .eval.: accepted values are train, infer'):
        FastPathJob('cpu', 'eval')


def test_auto_freezes_long_inference_only(test_tables):
    """The frozen whole-model compile is a candidate only for inference jobs whose caller can freeze (validate.py,
    predict.py) and of known length; it wins when its compile (per convolution, cold or cached) is paid back."""
    def infer(passes, can_freeze=True, frozen_cached=None):
        return dataclasses.replace(_job(passes, cached=True, kind='infer'), can_freeze=can_freeze, num_convs=100,
                                   frozen_cached=frozen_cached)
    # per pass: nhwc_lka 0.16 s, nhwc_lka+freeze 0.128 s; kernels cached 12 s; frozen graph 100 s cold, 10 s cached
    plan = fast_ops.plan_auto(infer(10 ** 4))
    assert (plan.mode, plan.freeze, plan.config) == ('nhwc_lka', True, 'nhwc_lka+freeze')
    assert plan.seconds['nhwc_lka+freeze'] == pytest.approx(10 ** 4 * 0.128 + 12 + 100)
    assert 'frozen' in plan.describe() and '--no-compile' in plan.describe()
    assert not fast_ops.plan_auto(infer(3000)).freeze  # 100 s cold pays back after 3125 passes
    assert fast_ops.plan_auto(infer(3000, frozen_cached=('nhwc_lka',))).freeze  # 10 s cached: after 313
    assert not fast_ops.plan_auto(infer(3000, frozen_cached=('none',))).freeze  # another mode's graph
    assert not fast_ops.plan_auto(infer(10 ** 4, can_freeze=False)).freeze  # train.py's evaluation, --no-compile
    assert not fast_ops.plan_auto(infer(None)).freeze  # unknown length: never compiles
    assert fast_ops.resolve_fast_path('auto', infer(10 ** 4)) == 'nhwc_lka'


def test_faster_precision_from_the_tables(test_tables):
    """--amp without a dtype: bfloat16 where its best mode beats float32's, else float32; None where unmeasured."""
    assert fast_ops.faster_precision(_job(10 ** 4, precision='bfloat16')) == 'bfloat16'  # 0.32 s vs 0.64 s / pass
    assert fast_ops.faster_precision(_job(10 ** 4, precision='bfloat16'), 'none') == 'float32'  # 1.6 s vs 1.28 s
    assert fast_ops.faster_precision(_job(10, kind='infer', precision='bfloat16')) is None


@pytest.mark.parametrize('kind,images,img_size,expected', [
    ('train', 310 * 1281167, 224, 'nhwc_lka'),  # train.py on ImageNet: any compile pays back
    ('infer', 50000, 224, 'nhwc_lka'),  # validate.py on ImageNet's 50000 images: its compile is paid back
    ('infer', 100, 224, 'nhwc'),  # predict.py on 100 images: no time to compile, channels-last eager wins
    ('train', None, 224, 'nhwc'),  # unknown length: never compiles
    ('train', 440 * 32, 32, 'none'),  # make demo's 440 steps at 32 px: nhwc is slower there, the compile not paid
])
def test_auto_on_the_measured_tables(monkeypatch, tmp_path, kind, images, img_size, expected):
    """The committed AVX-512 tables give the jobs of docs/PERFORMANCE.md ("Fastest by default") the modes it says,
    with kernels not yet in the cache (a first run)."""
    monkeypatch.setattr(fast_ops, '_cpu_isa', lambda: 'AVX512')
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path))  # empty: cold
    job = FastPathJob('cpu', kind, None if images is None else -(-images // 32), img_size, batch_size=32)
    assert timm.create_model('van_b0').set_fast_path('auto', job).fast_path == expected


def test_amp_precision_on_the_measured_tables(monkeypatch, tmp_path):
    """--amp without a dtype on this AVX-512 + AVX512-BF16 CPU: bfloat16 for 224 px training (faster there), float32
    at 32 px (bfloat16 measured slower)."""
    monkeypatch.setattr(fast_ops, '_cpu_isa', lambda: 'AVX512')
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path))
    model = timm.create_model('van_b0')
    for img_size, expected in ((224, 'bfloat16'), (32, 'float32')):
        job = model.complete_job(FastPathJob('cpu', 'train', 10 ** 5, img_size, 'bfloat16', 32))
        assert fast_ops.faster_precision(job) == expected, img_size


def test_amp_runs_float32_where_the_tables_say_so(test_tables, caplog):
    from vancls.builders import set_fast_path
    from vancls.device import Amp
    import logging
    monkey_amp = Amp(torch.device('cpu'), enabled=True, dtype='bfloat16')
    monkey_amp.dtype_given = False  # as --amp alone on a CPU with native bfloat16
    with caplog.at_level(logging.INFO, logger='vancls'):
        note = set_fast_path(_tiny_van(), 'none', 10 ** 4, 224, amp=monkey_amp, batch_size=32)
    assert note == 'fast path none' and monkey_amp.precision == 'float32' and not monkey_amp.enabled
    assert '--amp: float32: predicted faster than bfloat16' in caplog.text
    forced = Amp(torch.device('cpu'), enabled=True, dtype='bfloat16')  # --amp-dtype bfloat16: kept
    set_fast_path(_tiny_van(), 'none', 10 ** 4, 224, amp=forced, batch_size=32)
    assert forced.enabled and forced.precision == 'bfloat16'


def test_kernel_keys_are_the_kernels_nhwc_lka_runs(monkeypatch, tiny_batch):
    """lka_kernel_keys (what 'auto' counts and looks up in the cache) = the kernels a train / eval step asks for."""
    used = set()
    real = fast_ops._kernel

    def recording(fn, key):
        used.add(key)
        return real(fn, key)
    monkeypatch.setattr(fast_ops, '_kernel', recording)
    x, y = tiny_batch
    m = _tiny_van().train().set_fast_path('nhwc_lka')
    F.cross_entropy(m(x), y).backward()
    sizes = m.conv_output_sizes(x.shape[-1])
    assert used == fast_ops.lka_kernel_keys(sizes, x.shape[0], torch.float32, train=True)
    used.clear()
    with torch.no_grad():
        m.eval()(x)
    assert used == fast_ops.lka_kernel_keys(sizes, x.shape[0], torch.float32, train=False) and len(used) == 1
    assert fast_ops.forward_gflops(timm.create_model('van_b0').conv_output_sizes(224)) == pytest.approx(1.73, 0.01)


def test_compiled_kernels_are_found_in_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path / 'cache'))
    keys = fast_ops.lka_kernel_keys(_tiny_van().conv_output_sizes(32), 2, torch.float32, train=True)
    assert len(keys) == 3 and not fast_ops.kernels_cached(keys)
    for key in list(keys)[:2]:
        fast_ops._mark_compiled(key)
    assert not fast_ops.kernels_cached(keys)
    fast_ops._mark_compiled(list(keys)[2])
    assert fast_ops.kernels_cached(keys)
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path / 'other'))  # a wiped or other cache: cold again
    assert not fast_ops.kernels_cached(keys)


@pytest.mark.parametrize('isa', ['AVX512', 'AVX2', 'DEFAULT'])
@pytest.mark.parametrize('steps,img_size', [(None, None), (1, 224), (100, 32), (2000, 224), (10 ** 6, 32)])
def test_every_caller_of_auto_picks_the_same_mode(monkeypatch, isa, steps, img_size):
    """One resolver: the model (VAN(fast_path='auto'), set_fast_path with a job), the CLIs (builders.set_fast_path)
    and benchmark.py pick the same mode for the same job (device, kind, run length, batch, size)."""
    from vancls import benchmark
    from vancls.builders import set_fast_path
    monkeypatch.setattr(fast_ops, '_cpu_isa', lambda: isa)
    for kind in fast_ops.JOB_KINDS:
        # inference as validate.py / predict.py run it: free to freeze the weights into a compiled graph
        job = FastPathJob('cpu', kind, steps, img_size, batch_size=32, can_freeze=kind == 'infer')
        plan = fast_ops.plan_auto(_tiny_van().complete_job(job))
        expected = plan.mode
        cli = _tiny_van()
        set_fast_path(cli, 'auto', steps, img_size, kind=kind, batch_size=32, can_freeze=kind == 'infer')
        assert cli.fast_path == expected and cli.auto_plan().config == plan.config
        assert _tiny_van().set_fast_path('auto', job).fast_path == expected
        if steps is None:  # a model alone knows no run length and no size
            if kind == 'train':
                assert _tiny_van(fast_path='auto').fast_path == expected
            continue
        argv = ['--model', 'van_b0', '--img-size', str(img_size), '--run-steps', str(steps), '--num-classes', '10',
                '-b', '32']
        args = benchmark.build_parser().parse_args(argv)
        runner = benchmark.Runner(benchmark.parse_spec('auto'), cli, args, torch.device('cpu'), kind == 'train')
        assert runner.kernels == plan.config and runner.freeze == plan.freeze


def test_auto_model_decides_again_on_another_device(monkeypatch):
    """'auto' follows the device type the parameters are moved to (.to / to_empty), never inside forward."""
    monkeypatch.setattr(fast_ops, '_cpu_isa', lambda: 'AVX512')
    with torch.device('meta'):
        m = _tiny_van(fast_path='auto')
    assert m.fast_path == 'none'
    m.to_empty(device='cpu')
    expected = resolve_fast_path('auto', FastPathJob('cpu'))
    assert m.fast_path == expected and m.patch_embed1.proj.kernel == conv_kernel(m.patch_embed1.proj, expected)
    explicit = _tiny_van(fast_path='none')
    explicit.to('meta')
    assert explicit.fast_path == 'none'
    kernels = [c.kernel for c in m.modules() if isinstance(c, Conv2d)]
    m.float().eval()(torch.randn(1, 3, 32, 32))  # forward changes no kernel
    assert [c.kernel for c in m.modules() if isinstance(c, Conv2d)] == kernels


def test_cli_auto_resolves_with_the_run_length(test_tables):
    from vancls.builders import set_fast_path
    for steps, cached, expected in ((10, False, 'nhwc'), (10 ** 5, False, 'nhwc_lka')):
        model = _tiny_van()
        note = set_fast_path(model, 'auto', steps, 224, batch_size=32)
        assert model.fast_path == expected and note.startswith(f'fast path auto: {expected} (cpu, train, 224 px')
        assert 'predicted' in note
    model = _tiny_van()
    assert set_fast_path(model, 'none', 10 ** 5) == 'fast path none' and model.fast_path == 'none'


# ---------------------------------------------------------------------------------------- equality (eager)

@pytest.mark.parametrize('pixels', [fast_ops.POINTWISE_GEMM_MAX_PIXELS - 1, fast_ops.POINTWISE_GEMM_MAX_PIXELS])
def test_pointwise_kernel_equals_conv(pixels):
    """Both sides of the GEMM / backend switch of 1x1 convolutions: same values and gradients as F.conv2d, output
    in channels_last memory."""
    g = torch.Generator().manual_seed(3)
    conv = Conv2d(6, 10, 1)
    x = torch.randn(pixels, 6, 1, 1, generator=g).requires_grad_()  # batch x 1 x 1 pixels
    gy = torch.randn(pixels, 10, 1, 1, generator=g)
    y = fast_ops.conv_pointwise(conv, x)
    y.backward(gy)
    got = (y.detach(), x.grad, conv.weight.grad, conv.bias.grad)
    x2 = x.detach().clone().requires_grad_()
    conv.zero_grad()
    y2 = F.conv2d(x2, conv.weight, conv.bias)
    y2.backward(gy)
    for a, b, what in zip(got, (y2.detach(), x2.grad, conv.weight.grad, conv.bias.grad), 'y dx dw db'.split()):
        _close(a, b, REL, f'{pixels} pixels {what}')
    x3 = torch.randn(2, 6, 16, pixels // 32 + 1, generator=g)  # a real map: NHWC strides out
    assert fast_ops.conv_pointwise(conv, x3).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize('mode', EAGER_MODES)
def test_train_step_equal(b0, batch, mode):
    x, y = batch
    ref = _train_step(copy.deepcopy(b0).train(), x, y)
    fast = copy.deepcopy(b0).train().set_fast_path(mode)
    _assert_step_equal(_train_step(fast, x, y), ref)
    # The features keep the NCHW shape (a channels_last view) and values.
    with torch.no_grad():
        feats = fast.eval().forward_features(x)
        feats_ref = copy.deepcopy(fast).set_fast_path('none').forward_features(x)
    assert feats.shape == feats_ref.shape
    _close(feats, feats_ref, REL, 'features')


def test_train_step_equal_channels_last_input_and_checkpointing(b0, batch):
    x, y = batch
    # Checkpointing recomputes each block in backward, BatchNorm statistics included (in both paths alike).
    ref_model = copy.deepcopy(b0).train()
    ref_model.set_grad_checkpointing(True)
    ref = _train_step(ref_model, x, y)
    fast = copy.deepcopy(b0).train().set_fast_path('nhwc')
    fast.set_grad_checkpointing(True)
    _assert_step_equal(_train_step(fast, x.contiguous(memory_format=torch.channels_last), y), ref)


def test_eval_equal_with_trained_norms(b0, batch):
    x, _ = batch
    ref_model = copy.deepcopy(b0).eval()
    _randomize_norms(ref_model)
    fast = copy.deepcopy(ref_model).set_fast_path('nhwc')
    with torch.no_grad():
        _close(fast(x), ref_model(x), REL, 'eval logits')


def test_ddp_wraps_fast_path(b0, batch, tmp_path):
    """DDP (gloo, world size 1) over a model switched to the fast path: same gradients, official keys."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    x, y = batch
    ref = _train_step(copy.deepcopy(b0).train(), x, y)
    store = dist.FileStore(str(tmp_path / 'store'), 1)
    dist.init_process_group('gloo', store=store, rank=0, world_size=1)
    try:
        model = copy.deepcopy(b0).train().set_fast_path('nhwc')
        ddp = DDP(model)
        ddp.zero_grad(set_to_none=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            F.cross_entropy(ddp(x), y).backward()
        # every gradient in the parameter's strides (depth-wise ones included): DDP's buckets take them as they are
        assert not [w for w in caught if 'Grad strides do not match' in str(w.message)]
        assert all(p.grad.stride() == p.stride() for p in model.parameters())
        grads = {n: p.grad for n, p in model.named_parameters()}
        for n in ('patch_embed1.proj.weight', 'block1.0.attn.spatial_gating_unit.conv_spatial.weight',
                  'block4.1.mlp.fc2.weight', 'head.weight'):
            _close(grads[n], ref[1][n], REL, n)
        assert all(k.startswith('module.') for k in ddp.state_dict())
    finally:
        dist.destroy_process_group()


def test_autocast_bf16(b0, batch):
    """Under bf16 autocast the NHWC path runs its convs in bf16 (as F.conv2d would), keeps fp32 master grads,
    and stays within bf16 round-off of the fp32 result (the plain path's own bf16 error is of the same order)."""
    x, y = batch
    ref = copy.deepcopy(b0).train()
    out_ref = ref(x).detach()
    m = copy.deepcopy(b0).train().set_fast_path('nhwc')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = m(x)
        loss = F.cross_entropy(out, y)
    loss.backward()
    assert out.dtype == torch.bfloat16
    _close(out.float(), out_ref, 5e-2, 'bf16 logits vs fp32')
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n


# ------------------------------------------------------------------------------------------------- fuse()

@pytest.mark.parametrize('nhwc', [False, True])
def test_fuse_equal(b0, batch, nhwc):
    x, _ = batch
    model = copy.deepcopy(b0).eval()
    _randomize_norms(model)
    with torch.no_grad():
        ref = model(x)
        fused = model.fuse(nhwc=nhwc)
        out = fused(x)
    _close(out, ref, 1e-5, f'fused (nhwc={nhwc}) logits')
    assert not fused.training
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert all(not p.requires_grad for p in fused.parameters())
    with pytest.raises(RuntimeError, match='inference-only'):
        fused.train()
    # the source model is unchanged
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) and model.fast_path == 'none'


def test_fused_model_traces_and_exports(b0):
    """The fused model is plain ops: torch.jit.trace reproduces it (NCHW and NHWC), ONNX runs it (if installed)."""
    x = torch.randn(1, 3, 32, 32)
    model = copy.deepcopy(b0).eval()
    _randomize_norms(model)
    for nhwc in (False, True):
        fused = model.fuse(nhwc=nhwc)
        with torch.no_grad():
            ref = fused(x)
            traced = torch.jit.trace(fused, x)
            _close(traced(x), ref, 1e-6, f'traced (nhwc={nhwc})')
    from conftest import skip_or_fail  # requirements.txt has both: a skip under CI=true is a failure
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
    except ImportError as e:
        skip_or_fail(f'ONNX is not installed ({e}): pip install onnx onnxruntime')
    buf = io.BytesIO()
    try:
        torch.onnx.export(model.fuse(nhwc=False), (x,), buf, input_names=["input"],
                          output_names=['logits'], dynamo=False)
    except Exception as e:  # noqa: BLE001 - exporter availability varies across torch builds
        skip_or_fail(f'torch.onnx.export unavailable here: {type(e).__name__}: {e}')
    sess = ort.InferenceSession(buf.getvalue(), providers=['CPUExecutionProvider'])
    out = torch.from_numpy(sess.run(None, {'input': x.numpy()})[0])
    with torch.no_grad():
        _close(out, model(x), 1e-5, 'onnx vs unfused')


# --------------------------------------------------------------------------------------------- compiled
# Compiled kernels are specialized to shapes, and cold compiles are slow on small CPUs: these tests use a one-stage
# VAN (the per-stage code is the same as in b0) and direct op checks at that stage's shape, so that the few
# kernels compiled are shared between them.

def _tiny_van(**kw):
    torch.manual_seed(0)
    return VAN(num_classes=5, embed_dims=(8,), mlp_ratios=(2,), depths=(1,), num_stages=1, **kw)


@pytest.fixture(scope='module')
def tiny_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 5, (2,), generator=g)  # stage 1: 8x8x8


def test_lka_kernels_equal(tiny_batch):
    """nhwc_lka: the compiled shifted multiply-add kernels equal F.conv2d (values and all gradients), and the
    model's train step, eval logits and fused model equal the plain path."""
    from models.fast_ops import dw_plan, dwconv_nhwc
    g = torch.Generator().manual_seed(2)
    for k, d in ((7, 3), (5, 1)):
        conv = nn.Conv2d(8, 8, k, padding=d * (k // 2), dilation=d, groups=8)
        plan = dw_plan(conv)
        assert plan == (d > 1)
        x = torch.randn(2, 8, 8, 8, generator=g, requires_grad=True)  # B, H, W, C
        gy = torch.randn(2, 8, 8, 8, generator=g)
        y = dwconv_nhwc(x, conv.weight, conv.bias, d, plan)
        y.backward(gy)
        got = (y.detach(), x.grad, conv.weight.grad, conv.bias.grad)
        x2 = x.detach().clone().requires_grad_()
        conv.zero_grad()
        y2 = conv(x2.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y2.backward(gy)
        for a, b, what in zip(got, (y2.detach(), x2.grad, conv.weight.grad, conv.bias.grad), 'y dx dw db'.split()):
            _close(a, b, REL, f'{k}x{k} d{d} {what}')
    x, y = tiny_batch
    base = _tiny_van()
    ref = _train_step(copy.deepcopy(base).train(), x, y)
    m = copy.deepcopy(base).train().set_fast_path('nhwc_lka')
    _assert_step_equal(_train_step(m, x, y), ref)
    m.eval()
    _randomize_norms(m)
    with torch.no_grad():
        plain = copy.deepcopy(m).set_fast_path('none')(x)
        _close(m(x), plain, REL, 'eval logits')
        fused = m.fuse()
        assert fused.fast_path == 'nhwc_lka'
        assert fused.block1[0].attn.spatial_gating_unit.conv_spatial.kernel == 'dw_shift'
        _close(fused(x), plain, 1e-5, 'fused logits (shift kernels)')


REL_BF16 = 3e-2  # bfloat16 keeps 8 bits of mantissa: both executions round differently at every op


@pytest.mark.parametrize('mode', ['nhwc', 'nhwc_lka'])
def test_bf16_autocast_step_and_fused_eval_agree_with_none(tiny_batch, mode):
    """What `auto` now picks under --amp (bf16 autocast with nhwc or nhwc_lka): the train step's logits, gradients
    and BatchNorm statistics, and the fused model's eval logits, agree with 'none' under the same autocast within
    bfloat16 rounding."""
    x, y = tiny_batch
    base = _tiny_van()
    _randomize_norms(base)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ref = _train_step(copy.deepcopy(base).train(), x, y)
        fast = copy.deepcopy(base).train().set_fast_path(mode)
        _assert_step_equal(_train_step(fast, x, y), ref, rel=REL_BF16)
        with torch.no_grad():
            plain = copy.deepcopy(fast).eval().set_fast_path('none')(x)
            fused = fast.eval().fuse()
            assert fused.fast_path == mode
            _close(fused(x), plain, REL_BF16, f'fused {mode} logits under bf16 autocast')


def test_torch_compile_over_fast_path(tiny_batch):
    """What train.py does: set_fast_path after .to(device), then torch.compile(model): same numbers, keys with
    `_orig_mod.` (stripped by checkpoint_filter_fn)."""
    x, y = tiny_batch
    base = _tiny_van()
    ref = _train_step(copy.deepcopy(base).train(), x, y)
    m = copy.deepcopy(base).train().set_fast_path('nhwc')
    compiled = torch.compile(m)
    got = _train_step(compiled, x, y)
    _close(got[0], ref[0], REL, 'compiled logits')
    stem_w_scale = ref[1]['patch_embed1.proj.weight'].abs().max().item()  # for the zero-gradient stem bias
    for n, grad in got[1].items():
        name = n.replace('_orig_mod.', '')
        _close(grad, ref[1][name], REL, f'compiled grad {n}',
               stem_w_scale if name == 'patch_embed1.proj.bias' else None)
    assert all(k.startswith('_orig_mod.') for k in compiled.state_dict())


def test_compile_inference_frozen(tiny_batch, monkeypatch):
    """validate.py / predict.py --compile: the fused nhwc_lka model compiled with frozen weights (Inductor
    freezing on CPU) gives the plain model's logits; and with freezing switched on for the whole process
    (TORCHINDUCTOR_FREEZING=1) the LKA kernels are not recompiled for every block (dynamo guards on the identity
    of Parameters under freezing, so they must reach the kernels as plain tensors)."""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from models import fast_ops
    x, _ = tiny_batch
    torch.manual_seed(0)
    m = VAN(num_classes=5, embed_dims=(8,), mlp_ratios=(2,), depths=(2,), num_stages=1).eval()
    _randomize_norms(m)
    with torch.no_grad():
        plain = m(x)
        fused = m.set_fast_path('nhwc_lka').fuse()
        monkeypatch.setattr(fast_ops, '_kernels', {})  # fresh kernel wrappers: no guards cached by other tests
        with inductor_config.patch(freezing=True), torch._dynamo.config.patch(error_on_recompile=True):
            _close(fused(x), plain, 1e-5, 'fused, shift kernels, freezing on')  # two blocks, one kernel shape
        compiled = fast_ops.compile_inference(fused, 'cpu')
        _close(compiled(x), plain, 1e-5, 'compile_inference(fused) logits')
        _close(compiled(x + 1), m.set_fast_path('none')(x + 1), 1e-5, 'second call, new values')


def test_compile_inference_for_one_batch_size(tiny_batch, tmp_path, monkeypatch):
    """What validate.py / predict.py run when auto freezes: the graph is compiled for --batch-size only (a smaller
    last batch runs the model eagerly, with no second compile), and the job's graph is marked as compiled in
    Inductor's cache, so that the next run's plan counts it cached."""
    import torch._dynamo
    from models import fast_ops
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path / 'inductor'))
    x, _ = tiny_batch
    torch.manual_seed(0)
    m = VAN(num_classes=5, embed_dims=(8,), mlp_ratios=(2,), depths=(2,), num_stages=1, img_size=32).eval()
    _randomize_norms(m)
    job = FastPathJob('cpu', 'infer', 10, 32, 'float32', 2, can_freeze=True)
    assert m.complete_job(job).frozen_cached == ()
    with torch.no_grad():
        plain = m(x)
        fused = m.set_fast_path('nhwc').fuse()
        key = fused.frozen_graph_key(32, 2)
        assert key == m.frozen_graph_key(32, 2) and key != m.set_fast_path('none').frozen_graph_key(32, 2)
        wrapped = fast_ops.compile_inference(fused, 'cpu', batch_size=2, cache_key=key)
        _close(wrapped(x), plain, 1e-5, 'frozen graph, batch 2')
        with torch._dynamo.config.patch(error_on_recompile=True):
            _close(wrapped(x[:1]), plain[:1], 1e-5, 'last batch of 1, eager')
            _close(wrapped(x * 2), m(x * 2), 1e-5, 'batch 2 again, new values')
    assert m.complete_job(job).frozen_cached == ('nhwc',)
    assert len(wrapped.state_dict()) == len(fused.state_dict())  # the compiled module is not a second copy


@pytest.mark.parametrize('mode', ['none', 'nhwc_lka'])
def test_frozen_graph_under_bf16_autocast_agrees_with_none(tiny_batch, mode):
    """--amp inference where auto freezes (nhwc_lka+freeze is the measured best in bf16 too; none+freeze the
    plain one): the frozen graph's logits under bf16 autocast agree with 'none' under the same autocast within
    bfloat16 rounding."""
    x, _ = tiny_batch
    base = _tiny_van()
    _randomize_norms(base)
    base.eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        plain = copy.deepcopy(base).set_fast_path('none')(x)
        frozen = fast_ops.compile_inference(base.set_fast_path(mode).fuse(), 'cpu', batch_size=x.shape[0])
        _close(frozen(x), plain, REL_BF16, f'{mode}+freeze logits under bf16 autocast')
