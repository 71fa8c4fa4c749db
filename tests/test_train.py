"""train.py / validate.py end to end on the CPU: accuracy on digits, DDP (one node and two), AMP, bad input."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from conftest import FAST_TRAIN_ARGS, ROOT, cli_env, requires_cpu_fp16, run_cli

# The demo recipe of the Makefile (make demo): >= 97% top-1 on digits in under 3 minutes on 2 cores.
DEMO_ARGS = ['--model', 'van_b0', '--img-size', '32', '-b', '32', '--lr', '2e-3', '--epochs', '10', '--cooldown-epochs', '0',
             '--warmup-epochs', '0', '--aa', 'none', '--reprob', '0', '--mixup', '0', '--cutmix', '0',
             '--smoothing', '0', '--hflip', '0', '--scale', '0.6', '1', '--drop-path', '0', '--workers', '2',
             '--device', 'cpu', '--log-interval', '20']


def _results(folder):
    with open(os.path.join(folder, 'results.json')) as f:
        return json.load(f)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.soak
def test_digits_reaches_97_and_validate_agrees(digits_dir, tmp_path):
    out = tmp_path / 'out'
    r = run_cli('train.py', digits_dir, *DEMO_ARGS, '--output', out, '--experiment', 'demo', timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    exp = out / 'demo'
    res = _results(exp)
    assert res['best_top1'] >= 97.0, res
    assert '*** Best metric:' in r.stdout and 'FPS:' in r.stdout
    for name in ('args.yaml', 'train.log', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar', 'curves.png'):
        assert (exp / name).is_file(), name
    assert res['world_size'] == 1 and res['global_batch'] == 32 and res['train_img_per_sec'] > 0
    assert res['peak_memory_mb'] < 4096
    with open(exp / 'summary.csv') as f:
        header = f.readline().strip().split(',')
    assert header[:7] == ['epoch', 'lr', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'train_img_per_sec']
    # The best checkpoint loads with weights_only=True and validate.py reproduces its top-1.
    ckpt = torch.load(exp / 'model_best.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['class_names'] == [str(i) for i in range(10)] and ckpt['epoch'] == res['best_epoch']
    v = run_cli('validate.py', digits_dir, '--model', 'van_b0', '--img-size', '32', '--device', 'cpu', '-j', '2',
                '--checkpoint', exp / 'model_best.pth.tar', '--results-file', tmp_path / 'v.json')
    assert v.returncode == 0, v.stderr[-2000:]
    with open(tmp_path / 'v.json') as f:
        val = json.load(f)
    assert abs(val['top1'] - res['best_top1']) <= 0.1
    assert val['num_images'] == 359 and set(val) >= {'top1', 'top5', 'loss', 'img_per_sec', 'num_images'}


@pytest.mark.oldtorch
@pytest.mark.slow
def test_ddp_two_processes_stay_in_sync(digits_dir, tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port', str(_free_port()),
           os.path.join(ROOT, 'train.py'), digits_dir, *FAST_TRAIN_ARGS, '-b', '16', '--epochs', '1',
           '--max-steps', '6', '--workers', '1', '--output', str(tmp_path), '--experiment', 'ddp']
    r = subprocess.run(cmd, cwd=ROOT, env=cli_env(OMP_NUM_THREADS=1), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = _results(tmp_path / 'ddp')
    assert res['world_size'] == 2 and res['global_batch'] == 32
    assert res['ranks_in_sync'] is True
    assert res['final_top1'] is not None and 0 <= res['final_top1'] <= 100
    # Sharded evaluation counts every one of the 359 images once: same numbers as one process.
    ckpt = tmp_path / 'ddp' / 'last.pth.tar'
    val_args = [os.path.join(ROOT, 'validate.py'), digits_dir, '--model', 'van_b0', '--img-size', '32', '-b', '50',
                '--device', 'cpu', '-j', '0', '--checkpoint', str(ckpt)]
    single = subprocess.run([sys.executable, *val_args, '--results-file', str(tmp_path / 'v1.json')], cwd=ROOT,
                            env=cli_env(), capture_output=True, text=True, timeout=600)
    sharded = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port',
                              str(_free_port()), *val_args, '--results-file', str(tmp_path / 'v2.json')], cwd=ROOT,
                             env=cli_env(OMP_NUM_THREADS=1), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0 and sharded.returncode == 0, (single.stderr[-2000:], sharded.stderr[-2000:])
    v1, v2 = (json.load(open(tmp_path / f)) for f in ('v1.json', 'v2.json'))
    assert v1['num_images'] == v2['num_images'] == 359 and v2['world_size'] == 2
    assert abs(v1['top1'] - v2['top1']) < 1e-9 and abs(v1['loss'] - v2['loss']) < 1e-5
    assert abs(v1['top1'] - res['final_top1']) < 1e-9


@pytest.mark.slow
def test_two_nodes_train_together(digits_dir, tmp_path):
    port = _free_port()
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', f'--node-rank={node_rank}',
               '--nproc_per_node=1', '--rdzv-backend=c10d', f'--rdzv-endpoint=127.0.0.1:{port}', '--rdzv-id=vantest',
               os.path.join(ROOT, 'train.py'), digits_dir, *FAST_TRAIN_ARGS, '-b', '16', '--epochs', '1',
               '--max-steps', '4', '--workers', '0', '--no-eval', '--output', str(tmp_path / f'node{node_rank}'),
               '--experiment', 'mn']
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=cli_env(OMP_NUM_THREADS=1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    res = _results(tmp_path / 'node0' / 'mn')  # global rank 0 lives on node 0 and writes
    assert res['world_size'] == 2 and res['ranks_in_sync'] is True
    assert not (tmp_path / 'node1' / 'mn' / 'results.json').exists()


@pytest.mark.oldtorch
@pytest.mark.slow
@pytest.mark.parametrize('dtype', ['bfloat16', pytest.param('float16', marks=requires_cpu_fp16)])
def test_amp_steps_on_cpu(digits_dir, tmp_path, dtype):
    r = run_cli('train.py', digits_dir, *FAST_TRAIN_ARGS, '-b', '16', '--epochs', '1', '--max-steps', '3',
                '--workers', '0', '--no-eval', '--amp', '--amp-dtype', dtype, '--output', tmp_path,
                '--experiment', 'amp')
    assert r.returncode == 0, r.stderr[-3000:]
    res = _results(tmp_path / 'amp')
    assert res['amp'] == dtype and res['train_loss'] == res['train_loss']  # not NaN


def test_amp_layer_autocast_and_scaler():
    from vancls.device import Amp
    cpu = torch.device('cpu')
    bf16 = Amp(cpu, enabled=True, dtype='bfloat16')  # forced: without a dtype it depends on the CPU
    assert bf16.dtype == torch.bfloat16 and not bf16.scaler.is_enabled()
    with bf16.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    off = Amp(cpu, enabled=False)
    with off.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(Exception, match='apex'):
        Amp(cpu, enabled=True, dtype='bfloat16', impl='apex').attach_apex(torch.nn.Linear(1, 1),
                                                                          torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1))


@requires_cpu_fp16
def test_amp_float16_scaler_skips_overflowing_steps():
    from vancls.device import Amp
    # float16 uses the GradScaler: an overflowing gradient skips the step and is counted.
    fp16 = Amp(torch.device('cpu'), enabled=True, dtype='float16')
    assert fp16.scaler.is_enabled()
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    fp16.backward((w * float('inf')).sum(), opt)
    fp16.step(opt, [w])
    assert torch.equal(w.detach(), torch.ones(3)) and fp16.skipped_steps == 1
    opt.zero_grad()
    fp16.backward((w * 2).sum(), opt)
    fp16.step(opt, [w])
    assert torch.allclose(w.detach(), torch.full((3,), 0.8)) and fp16.skipped_steps == 1
    assert 'scale' in fp16.state_dict()


@pytest.mark.skipif(not requires_cpu_fp16.args[0], reason='CPU float16 autocast exists on this torch')
def test_amp_float16_on_a_cpu_without_it_is_one_line():
    from vancls.device import Amp, DeviceError
    with pytest.raises(DeviceError, match='--amp-dtype bfloat16'):
        Amp(torch.device('cpu'), enabled=True, dtype='float16')


_FAKE_NPU = '''
import sys, types, torch
mod = types.ModuleType('torch_npu')
torch.utils.rename_privateuse1_backend('npu')
npu = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 8, set_device=lambda d: None)
torch.npu = npu
sys.modules['torch_npu'] = mod
from vancls.device import plan_device, resolve_device_type
dev, backend = plan_device('npu', local_rank=3)
print(dev, backend, resolve_device_type('auto'))
'''


@pytest.mark.slow
def test_device_layer_npu_with_stand_in_torch_npu():
    r = subprocess.run([sys.executable, '-c', _FAKE_NPU], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    expected_auto = 'cuda' if torch.cuda.is_available() else 'npu'
    assert r.stdout.split() == ['npu:3', 'hccl', expected_auto]


def test_device_layer_errors(monkeypatch):
    from vancls import device
    monkeypatch.setattr(device, 'import_torch_npu', lambda: None)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(device.DeviceError, match='torch_npu is not installed'):
        device.resolve_device_type('npu')
    with pytest.raises(device.DeviceError, match='no CUDA device'):
        device.resolve_device_type('cuda')
    with pytest.raises(device.DeviceError, match='auto, cuda, npu, cpu'):
        device.resolve_device_type('tpu')
    assert device.resolve_device_type('auto') == 'cpu'
    assert device.plan_device('cpu', 5) == (torch.device('cpu'), 'gloo')
    monkeypatch.setenv('VANCLS_CPU_MALLOC', 'jemalloc')
    with pytest.raises(device.DeviceError, match="VANCLS_CPU_MALLOC='jemalloc'.*retain, default"):
        device.setup_distributed('cpu')


_MALLOC_PROBE = '''
import sys, torch
from vancls.device import tune_cpu_allocator
def rss_mib():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) // 1024
applied = tune_cpu_allocator(sys.argv[1])
before = rss_mib()
t = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
del t
print(applied, rss_mib() - before)
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc allocator policy (Linux)')
@pytest.mark.slow
def test_cpu_allocator_retain_keeps_freed_blocks():
    """'retain' (what setup_distributed applies on CPU): a freed 64 MiB tensor stays in the process, so the next
    step does not fault its pages in again; 'default' leaves glibc unmapping it, 'release' (benchmark.py's memory
    measurement) too."""
    out = {}
    for policy in ('retain', 'default', 'release'):
        r = subprocess.run([sys.executable, '-c', _MALLOC_PROBE, policy], cwd=ROOT, env=cli_env(),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        applied, kept = r.stdout.split()
        out[policy] = (applied, int(kept))
    assert out['retain'][0] == 'True' and out['retain'][1] >= 60, out
    assert out['default'][0] == 'False' and out['default'][1] < 16, out
    assert out['release'][0] == 'True' and out['release'][1] < 16, out


def _bad_tree(tmp_path, digits_dir, kind):
    root = tmp_path / kind
    shutil.copytree(digits_dir, root)
    if kind == 'no_train':
        shutil.rmtree(root / 'train')
    elif kind == 'empty_class':
        for f in (root / 'train' / '3').iterdir():
            f.unlink()
    elif kind == 'val_classes':
        shutil.rmtree(root / 'val' / '7')
        (root / 'val' / 'x').mkdir()
        shutil.copy(next((root / 'val' / '1').iterdir()), root / 'val' / 'x' / 'a.png')
    return root


@pytest.mark.parametrize('case,expect', [
    ('missing_dir', 'data directory not found'),
    ('no_train', 'no training split'),
    ('empty_class', 'no image files'),
    ('val_classes', 'classes differ'),
    ('unknown_model', 'van_b0, van_b1'),
    ('unknown_opt', 'not a timm optimizer'),
    ('bad_config_key', 'unknown key(s) not_an_option'),
])
def test_bad_input_one_line_error(tmp_path, digits_dir, case, expect):
    import contextlib
    import io
    import train
    from vancls.config import run_cli as run_main
    args = [str(tmp_path / 'missing')] if case == 'missing_dir' else [str(digits_dir)]
    if case in ('no_train', 'empty_class', 'val_classes'):
        args = [str(_bad_tree(tmp_path, digits_dir, case))]
    if case == 'unknown_model':
        args += ['--model', 'resnet50']
    if case == 'unknown_opt':
        args += ['--opt', 'sgdx']
    if case == 'bad_config_key':
        cfg = tmp_path / 'c.yaml'
        cfg.write_text('lr: 0.1\nnot_an_option: 3\n')
        args += ['-c', str(cfg)]
    args += ['--device', 'cpu', '--output', str(tmp_path / 'out'), '--workers', '0']
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = run_main(train.main, train.get_args_parser, args)
    lines = err.getvalue().strip().splitlines()
    assert rc != 0 and len(lines) == 1 and lines[0].startswith('error: ') and expect in lines[0], lines


@pytest.mark.slow
def test_bad_config_key_cli_exit_code(tmp_path, digits_dir):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('not_an_option: 3\n')
    r = run_cli('train.py', digits_dir, '-c', cfg, '--device', 'cpu', timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f'error: --config {cfg}: unknown key(s) not_an_option (keys are option dest names, e.g. lr, weight_decay, '
        f'drop_path)']


@pytest.mark.oldtorch
@pytest.mark.slow
def test_no_data_dir_uses_digits(tmp_path):
    """`python train.py` with no DATA_DIR writes data/digits (here under a temporary cwd) and trains on it."""
    r = run_cli('train.py', *FAST_TRAIN_ARGS, '-b', '32', '--epochs', '1', '--max-steps', '2', '--workers', '0',
                '--no-eval', '--output', tmp_path / 'out', '--experiment', 'e', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / 'data' / 'digits' / 'train' / '9').is_dir()
    assert len(list((tmp_path / 'data' / 'digits' / 'val').rglob('*.png'))) == 359
