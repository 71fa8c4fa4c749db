"""vancls.device's choices that depend on the machine: AMP precision on the CPU, loader workers, CPU threads.

The CPU feature check and the CPU count are stubbed, so these run the same on any machine.
"""
import logging
import os
import subprocess
import sys

import pytest
import torch

from conftest import FAST_TRAIN_ARGS, ROOT, cli_env, requires_cpu_fp16
from vancls import device
from vancls.device import Amp

CPU = torch.device('cpu')


def _matmul_dtype(amp):
    with amp.autocast():
        return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype


@pytest.fixture
def vancls_log(caplog):
    caplog.set_level(logging.INFO, logger='vancls')
    # setup_logging (in other tests of the session) turns propagation off; caplog listens on the root logger.
    logger = logging.getLogger('vancls')
    propagate = logger.propagate
    logger.propagate = True
    yield caplog
    logger.propagate = propagate


@pytest.mark.parametrize('feature', ['AMX', 'AVX512-BF16'])
def test_amp_cpu_native_bf16_uses_bfloat16(monkeypatch, vancls_log, feature):
    monkeypatch.setattr(device, 'cpu_native_bf16', lambda: feature)
    amp = Amp(CPU, enabled=True)
    assert amp.precision == 'bfloat16' and amp.enabled and _matmul_dtype(amp) == torch.bfloat16
    assert not amp.scaler.is_enabled() and not vancls_log.records


def test_amp_cpu_without_native_bf16_runs_float32_and_says_why(monkeypatch, vancls_log):
    monkeypatch.setattr(device, 'cpu_native_bf16', lambda: None)
    amp = Amp(CPU, enabled=True)
    assert amp.precision == 'float32' and not amp.enabled and _matmul_dtype(amp) == torch.float32
    assert not amp.scaler.is_enabled()
    (record,) = vancls_log.records  # one line
    assert '\n' not in record.getMessage() and 'float32' in record.getMessage()
    assert '--amp-dtype bfloat16' in record.getMessage()


@pytest.mark.parametrize('dtype', ['bfloat16', pytest.param('float16', marks=requires_cpu_fp16)])
def test_amp_cpu_explicit_dtype_is_forced(monkeypatch, vancls_log, dtype):
    monkeypatch.setattr(device, 'cpu_native_bf16', lambda: None)
    amp = Amp(CPU, enabled=True, dtype=dtype)
    assert amp.precision == dtype and _matmul_dtype(amp) == getattr(torch, dtype)
    assert not vancls_log.records


def test_amp_off_is_float32_without_a_message(monkeypatch, vancls_log):
    monkeypatch.setattr(device, 'cpu_native_bf16', lambda: None)
    assert Amp(CPU, enabled=False).precision == 'float32'
    assert Amp(CPU, enabled=False, dtype='bfloat16').precision == 'float32'
    assert not vancls_log.records


def test_amp_accelerator_keeps_float16(monkeypatch):
    """cuda (and npu, the same path): --amp stays float16 with loss scaling whatever the host CPU has. No CUDA is
    needed: the scaler is stubbed and no autocast is entered."""
    monkeypatch.setattr(device, 'cpu_native_bf16', lambda: None)
    monkeypatch.setattr(device, 'make_grad_scaler', lambda dev, enabled: enabled)
    amp = Amp(torch.device('cuda', 0), enabled=True)
    assert amp.precision == 'float16' and amp.enabled and amp.scaler is True


# torch releases whose torch.cpu answers the queries device._CPU_BF16_FEATURES names (2.1, the oldest we support,
# has neither; the torch of requirements.txt has both)
HAS_CPU_BF16_QUERIES = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]) >= (2, 4)


def test_installed_torch_has_the_cpu_bf16_queries():
    """The queries --amp relies on exist and answer: if torch renamed them, --amp on an AMX or AVX512-BF16 CPU would
    quietly run float32."""
    checks = [check for _, check in device._CPU_BF16_FEATURES]
    if not HAS_CPU_BF16_QUERIES:
        assert not any(hasattr(torch.cpu, c) for c in checks), f'torch {torch.__version__} has them: raise the bound'
        assert device.cpu_native_bf16() is None
        return
    missing = [c for c in checks if not callable(getattr(torch.cpu, c, None))]
    assert not missing, (f'torch {torch.__version__} has no torch.cpu.{", ".join(missing)}: find where it moved and '
                         f'update vancls.device._CPU_BF16_FEATURES')
    answers = {name: getattr(torch.cpu, check)() for name, check in device._CPU_BF16_FEATURES}
    assert all(isinstance(v, bool) for v in answers.values()), answers
    assert device.cpu_native_bf16() == next((name for name, yes in answers.items() if yes), None)
    try:  # the kernel's view of this CPU (Linux, x86): torch must see the same AVX512-BF16
        flags = next(ln for ln in open('/proc/cpuinfo') if ln.startswith('flags')).split()
    except (OSError, StopIteration):
        return
    assert answers['AVX512-BF16'] == ('avx512_bf16' in flags), (answers, 'avx512_bf16' in flags)


def test_cpu_native_bf16_reads_torch_checks(monkeypatch):
    # raising=True where torch has the queries: patching a name torch does not have would hide a rename
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: False, raising=HAS_CPU_BF16_QUERIES)
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: True, raising=HAS_CPU_BF16_QUERIES)
    assert device.cpu_native_bf16() == 'AVX512-BF16'
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: True)
    assert device.cpu_native_bf16() == 'AMX'
    # Older torch: no such checks -> not native (float32 unless forced).
    monkeypatch.delattr(torch.cpu, '_is_amx_tile_supported')
    monkeypatch.delattr(torch.cpu, '_is_avx512_bf16_supported')
    assert device.cpu_native_bf16() is None


def _machine(monkeypatch, cpus, local_world_size=None, omp=None):
    monkeypatch.setattr(device.os, 'sched_getaffinity', lambda pid: set(range(cpus)), raising=False)
    for name, value in (('LOCAL_WORLD_SIZE', local_world_size), ('OMP_NUM_THREADS', omp)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(value))


@pytest.mark.parametrize('procs,expected', [(None, 2), (1, 2), (2, 1)])
def test_workers_and_threads_on_2_cpus(monkeypatch, procs, expected):
    _machine(monkeypatch, 2, procs)
    assert device.default_workers() == expected
    assert device.cpu_threads() == expected
    calls = []
    monkeypatch.setattr(torch, 'set_num_threads', calls.append)
    assert device.set_cpu_threads() == expected and calls == [expected]


def test_workers_capped_and_zero_when_processes_outnumber_cpus(monkeypatch):
    _machine(monkeypatch, 64, 2)
    assert device.default_workers() == device.MAX_DEFAULT_WORKERS == 8 and device.cpu_threads() == 32
    _machine(monkeypatch, 2, 4)
    assert device.default_workers() == 0 and device.cpu_threads() == 1


def test_cpu_count_fallback_without_affinity(monkeypatch):
    monkeypatch.delattr(device.os, 'sched_getaffinity', raising=False)
    monkeypatch.setattr(device.os, 'cpu_count', lambda: 3)
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    assert device.cpus_available() == 3 and device.default_workers() == 3


def test_omp_num_threads_is_respected(monkeypatch):
    _machine(monkeypatch, 2, 1, omp=1)
    calls = []
    monkeypatch.setattr(torch, 'set_num_threads', calls.append)
    assert device.set_cpu_threads() is None and calls == []


def test_setup_distributed_sets_cpu_threads(monkeypatch):
    _machine(monkeypatch, 2, 2)
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('VANCLS_CPU_MALLOC', 'default')  # leave this process's allocator alone
    calls = []
    monkeypatch.setattr(torch, 'set_num_threads', calls.append)
    env = device.setup_distributed('cpu')
    assert env.device.type == 'cpu' and calls == [1]


def test_bad_local_world_size(monkeypatch):
    monkeypatch.setenv('LOCAL_WORLD_SIZE', 'two')
    with pytest.raises(device.DeviceError, match="LOCAL_WORLD_SIZE='two'.*positive integer"):
        device.default_workers()


@pytest.mark.parametrize('cpus,procs,omp,expect', [
    (2, 2, 2, 'OMP_NUM_THREADS=2 x 2 process(es) on this node = 4 threads for 2 CPUs'),
    (2, None, 4, 'or set it to 2'),
    (2, 4, 1, 'start at most 2 processes on this node'),
    (2, 2, 1, None), (2, None, 2, None), (2, 2, None, None), (8, 2, 4, None),
])
def test_oversubscription_warning(monkeypatch, vancls_log, cpus, procs, omp, expect):
    """OMP_NUM_THREADS x processes on the node > the CPUs of the affinity mask: one warning with the numbers and the
    fix, from setup_distributed's thread setup (train.py and validate.py), on the node's first process only."""
    _machine(monkeypatch, cpus, procs, omp)
    monkeypatch.setattr(torch, 'set_num_threads', lambda n: None)
    warning = device.oversubscription_warning()
    assert warning is None if expect is None else expect in warning and 'unset OMP_NUM_THREADS' in warning or \
        'start at most' in warning, warning
    for local_rank, warned in (('0', expect is not None), ('1', False)):
        vancls_log.clear()
        monkeypatch.setenv('LOCAL_RANK', local_rank)
        device.set_cpu_threads()
        assert [r.getMessage() for r in vancls_log.records] == ([f'warning: {warning}'] if warned else [])


def _first_cpus(n):
    cpus = sorted(os.sched_getaffinity(0))
    assert len(cpus) >= n, f'this test needs {n} CPUs, the affinity mask has {cpus}'
    return set(cpus[:n])


@pytest.mark.slow
def test_oversubscribed_two_rank_run_warns_once(digits_dir, tmp_path):
    """2 ranks on 2 CPUs with OMP_NUM_THREADS=2 exported: train.py says so once (stderr) with the fix; without the
    variable (torchrun then gives each rank 1 thread) it does not. validate.py warns likewise."""
    cpus = _first_cpus(2)
    train = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
             os.path.join(ROOT, 'train.py'), digits_dir, *FAST_TRAIN_ARGS, '-b', '8', '--epochs', '1',
             '--max-steps', '1', '--workers', '0', '--no-eval', '--output', tmp_path]
    outputs = {}
    for omp in ('2', None):
        env = cli_env()
        env.pop('OMP_NUM_THREADS')
        env.update({'OMP_NUM_THREADS': omp} if omp else {})
        r = subprocess.run([*map(str, train), '--experiment', f'omp{omp}'], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600, preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        assert r.returncode == 0, r.stderr[-3000:]
        outputs[omp] = r.stdout + r.stderr
    lines = [ln for ln in outputs['2'].splitlines() if 'threads for' in ln]
    assert lines == ['warning: OMP_NUM_THREADS=2 x 2 process(es) on this node = 4 threads for 2 CPUs: they '
                     'time-slice the same cores and every step waits for the slowest; unset OMP_NUM_THREADS (each '
                     'process then takes its share, 1 thread(s)) or set it to 1'], outputs['2'][-3000:]
    assert 'threads for' not in outputs[None]
    v = subprocess.run([sys.executable, os.path.join(ROOT, 'validate.py'), str(digits_dir), '--model', 'van_b0',
                        '--img-size', '32', '--device', 'cpu', '-j', '0', '-b', '128', '--checkpoint',
                        str(tmp_path / 'omp2' / 'last.pth.tar')], cwd=ROOT,
                       env=cli_env(OMP_NUM_THREADS=3), capture_output=True, text=True, timeout=600,
                       preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    assert v.returncode == 0, v.stderr[-3000:]
    assert 'warning: OMP_NUM_THREADS=3 x 1 process(es) on this node = 3 threads for 2 CPUs' in v.stderr, v.stderr


# ----------------------------------------------------------------------------- torchrun restarts, device for scripts

_ELASTIC_ENV = ('TORCHELASTIC_MAX_RESTARTS', 'TORCHELASTIC_USE_AGENT_STORE', 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE')


@pytest.mark.parametrize('env,warned', [
    ({'TORCHELASTIC_MAX_RESTARTS': '3', 'TORCHELASTIC_USE_AGENT_STORE': 'True'}, True),
    ({'TORCHELASTIC_MAX_RESTARTS': '3', 'TORCHELASTIC_USE_AGENT_STORE': 'True', 'torch': '2.3.1'}, False),
    ({'TORCHELASTIC_MAX_RESTARTS': '3', 'TORCHELASTIC_USE_AGENT_STORE': 'True', 'RANK': '1'}, False),  # rank 0 only
    ({'TORCHELASTIC_MAX_RESTARTS': '3', 'TORCHELASTIC_USE_AGENT_STORE': 'False'}, False),  # not shared (torch < 2.4)
    ({'TORCHELASTIC_MAX_RESTARTS': '3', 'TORCHELASTIC_USE_AGENT_STORE': 'True',
      'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1'}, False),
    ({'TORCHELASTIC_MAX_RESTARTS': '0', 'TORCHELASTIC_USE_AGENT_STORE': 'True'}, False),
    ({}, False),  # not under torchrun
])
def test_setup_distributed_warns_about_restarts_that_can_hang(monkeypatch, vancls_log, env, warned):
    for name in (*_ELASTIC_ENV, 'RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    env = dict(env)
    monkeypatch.setattr(torch, '__version__', env.pop('torch', '2.14.1+cpu'))  # the store is shared since 2.4
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(device, 'tune_cpu_allocator', lambda: False)  # process-wide settings: not in a unit test
    monkeypatch.setattr(device, 'set_cpu_threads', lambda: None)
    device.setup_distributed('cpu')  # WORLD_SIZE unset: no process group, the check runs all the same
    messages = [r.getMessage() for r in vancls_log.records]
    if warned:
        (line,) = messages
        assert '\n' not in line and 'torchrun --max-restarts 3' in line and 'can hang' in line
        assert 'export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1' in line
    else:
        assert not messages


def test_torchrun_gives_workers_the_variables_the_restart_check_reads():
    """The check reads what torchrun's agent puts in the workers' environment: fail loudly if torch renames it."""
    import inspect
    from torch.distributed.elastic.agent.server import local_elastic_agent
    source = inspect.getsource(local_elastic_agent)
    assert '"TORCHELASTIC_MAX_RESTARTS"' in source
    if tuple(int(x) for x in torch.__version__.split('.')[:2]) >= (2, 4):  # the shared store came with 2.4
        assert '"TORCHELASTIC_USE_AGENT_STORE"' in source
        from torch.distributed.elastic.rendezvous import dynamic_rendezvous
        assert 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE' in inspect.getsource(dynamic_rendezvous)


def test_print_device_type_for_the_scripts(monkeypatch, capsys):
    """test/common.sh asks print_device_type: the order of resolve_device_type (CUDA, then NPU, then CPU)."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(device, '_npu_available', lambda: False)
    assert device.print_device_type('auto') == 0 and capsys.readouterr().out == 'cpu\n'
    monkeypatch.setattr(device, '_npu_available', lambda: True)
    assert device.print_device_type('auto') == 0 and capsys.readouterr().out == 'npu\n'
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert device.print_device_type('auto') == 0 and capsys.readouterr().out == 'cuda\n'  # CUDA before an NPU
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert device.print_device_type('cuda') == 2
    out, err = capsys.readouterr()
    assert out == '' and err.startswith('error: --device cuda: no CUDA device') and err.count('\n') == 1
    assert device.print_device_type('tpu') == 2
    assert "'tpu' is not one of: auto, cuda, npu, cpu" in capsys.readouterr().err
