"""benchmark.py / vancls.benchmark: a 2-step smoke run writes its JSON and table (no timing assertions)."""
import json
import os
import subprocess
import sys

import pytest


from conftest import ROOT
from vancls import benchmark


@pytest.mark.slow
def test_smoke_compare_writes_json(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    report = benchmark.main([
        '--model', 'van_b0', '--img-size', '32', '-b', '2', '--num-classes', '10', '--warmup', '1', '--steps', '2',
        '--mode', 'both', '--compare', 'nhwc,nhwc+fuse,nhwc+ckpt,none+noopt', '--threads', '1',
        '--json-out', str(out)])
    printed = capsys.readouterr().out
    assert 'x base' in printed and 'nhwc+fuse' in printed
    data = json.loads(out.read_text())
    assert data['baseline'] == 'none'
    configs = [(r['mode'], r['config']) for r in data['results']]
    # the baseline is added first when --compare omits it; every config runs in both modes
    assert configs[0] == ('train', 'none') and ('infer', 'nhwc+fuse') in configs and len(configs) == 10
    for r in data['results']:
        assert len(r['step_s_all']) == 2 and r['step_s_median'] > 0 and r['img_per_s'] > 0
        assert r['speedup'] is not None and r['cpu_s_median'] >= 0
        assert r['peak_mem_mb'] is None or r['peak_mem_mb'] > 0
        assert 0 < r['mfu_fp32'] < 10 and 0 < r['mfu_amp'] < 10  # against both measured peaks
    assert data['matmul_peak_gflops'] > 0 and data['matmul_peak_amp_gflops'] > 0 and data['model_gflops_per_img'] > 0
    base = next(r for r in data['results'] if r['config'] == 'none' and r['mode'] == 'train')
    assert base['speedup'] == pytest.approx(1.0)
    assert report['results'] == data['results']
    # --summarize reads it back into one table
    benchmark.main(['--summarize', str(out), str(tmp_path / 'missing.json')])
    table = capsys.readouterr().out
    assert 'van_b0' in table and 'missing:' in table


@pytest.mark.slow
def test_freeze_config_and_allocator_policy(tmp_path):
    """'+freeze' (validate.py --compile's frozen-weight compile) is a compiled inference config with its cold
    compile reported; --malloc retain times it, then memory is measured with blocks returned on free."""
    out = tmp_path / 'freeze.json'
    benchmark.main(['--model', 'van_b0', '--img-size', '32', '-b', '2', '--num-classes', '10', '--warmup', '1',
                    '--steps', '1', '--mode', 'infer', '--compare', 'none+fuse+freeze', '--threads', '1',
                    '--malloc', 'retain', '--json-out', str(out)])
    data = json.loads(out.read_text())
    frozen = next(r for r in data['results'] if r['config'] == 'none+fuse+freeze')
    assert frozen['compiled'] and frozen['compile_s'] is not None and frozen['img_per_s'] > 0
    assert data['args']['malloc'] == 'retain'
    assert frozen['activation_mem_mb'] is None or frozen['activation_mem_mb'] >= 0


def test_bad_spec_is_a_clear_error():
    with pytest.raises(SystemExit, match='accepted values are'):
        benchmark.main(['--spec', 'warp', '--steps', '1'])
    with pytest.raises(SystemExit, match='unknown option'):
        benchmark.main(['--config', 'nhwc+turbo', '--steps', '1'])


@pytest.mark.slow
def test_cli_wrapper_help():
    res = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmark.py'), '--help'], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0 and '--compare' in res.stdout and 'fusedadam' in res.stdout


def test_auto_is_resolved_for_the_run_it_models(monkeypatch):
    """'auto' in a spec runs what the CLIs would run: by default for train.py's default ImageNet run (long), for
    validate.py's 50000 images in inference, or for --run-steps; with the batch and precision of the benchmark."""
    import timm
    from models import fast_ops
    monkeypatch.setattr(fast_ops, '_cpu_isa', lambda: 'AVX512')
    args = benchmark.build_parser().parse_args(['--img-size', '224', '-b', '32'])
    assert benchmark.run_steps(args, train=True) == 310 * (1281167 // 32)
    assert benchmark.run_steps(args, train=False) == 1563
    cpu = __import__('torch').device('cpu')
    job = benchmark.fast_path_job(args, cpu, train=True, amp=False)
    assert (job.forward_passes, job.img_size, job.kind, job.batch_size) == (310 * (1281167 // 32), 224, 'train', 32)
    model = timm.create_model('van_b0')
    expected_long = 'nhwc_lka' if fast_ops.FAST_PATHS_AVAILABLE else 'none'
    assert model.set_fast_path('auto', job).fast_path == expected_long  # a long run pays for any compile
    short = benchmark.build_parser().parse_args(['--img-size', '224', '--run-steps', '1', '--amp'])
    job = benchmark.fast_path_job(short, cpu, train=False, amp=True)
    assert (job.forward_passes, job.kind, job.precision) == (1, 'infer', 'bfloat16')
    runner = benchmark.Runner(benchmark.parse_spec('auto'), model, short, cpu, train=False)
    assert runner.kernels == model.set_fast_path('auto', job).fast_path != 'nhwc_lka'  # one pass: no compile
