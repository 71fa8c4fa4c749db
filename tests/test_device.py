"""vancls.device's choices that depend on the machine: AMP precision on the CPU, loader workers, CPU threads.

The CPU feature check and the CPU count are stubbed, so these run the same on any machine.
"""
import logging

import pytest
import torch

from conftest import requires_cpu_fp16
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


def test_cpu_native_bf16_reads_torch_checks(monkeypatch):
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: True, raising=False)
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
