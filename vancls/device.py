"""Devices, distributed setup and mixed precision: the one place that knows about CUDA, Ascend NPUs and the CPU.

A run is started either as a single process or by torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment).
`--device auto` picks CUDA if available, else an Ascend NPU if torch_npu imports and sees a device, else the CPU.
Each device type has one process-group backend: cuda -> nccl, npu -> hccl, cpu -> gloo.
Intra-op threads (on the CPU) and the default loader workers follow each process's share of the CPUs.
"""
import contextlib
import datetime
import importlib
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .errors import DeviceError  # one module for the error classes

DEVICE_CHOICES = ('auto', 'cuda', 'npu', 'cpu')
BACKENDS = {'cuda': 'nccl', 'npu': 'hccl', 'cpu': 'gloo'}
AMP_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16}


def import_torch_npu():
    """Import torch_npu (which registers the `npu` device with torch) or return None when it is not installed."""
    try:
        return importlib.import_module('torch_npu')
    except ImportError:
        return None


def _npu_available() -> bool:
    return import_torch_npu() is not None and hasattr(torch, 'npu') and torch.npu.is_available()


def resolve_device_type(requested: str) -> str:
    """'auto' | 'cuda' | 'npu' | 'cpu' -> the device type to use, with a clear error when it is not usable."""
    if requested not in DEVICE_CHOICES:
        raise DeviceError(f'--device {requested!r} is not one of: {", ".join(DEVICE_CHOICES)}')
    if requested == 'auto':
        if torch.cuda.is_available():
            return 'cuda'
        return 'npu' if _npu_available() else 'cpu'
    if requested == 'cuda' and not torch.cuda.is_available():
        raise DeviceError('--device cuda: no CUDA device is visible to PyTorch (torch.cuda.is_available() is False; '
                          f'torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get("CUDA_VISIBLE_DEVICES")!r}). '
                          'Use --device cpu or auto.')
    if requested == 'npu':
        if import_torch_npu() is None:
            raise DeviceError('--device npu: torch_npu is not installed (it comes with Ascend CANN and the Ascend '
                              'PyTorch adapter; source test/env_npu.sh first). Use --device cpu or auto.')
        if not torch.npu.is_available():
            raise DeviceError('--device npu: torch_npu imported but sees no NPU (check ASCEND_RT_VISIBLE_DEVICES '
                              'and that CANN set_env.sh was sourced).')
    return requested


def print_device_type(requested: str = 'auto') -> int:
    """For the launch scripts (test/common.sh): print the device type resolve_device_type picks, so that the scripts
    and the CLIs resolve 'auto' in one order; an unusable device prints one `error: ...` line on stderr.
    Returns the exit status: 0, or 2 with the error."""
    import sys
    try:
        print(resolve_device_type(requested))
    except DeviceError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


@dataclass
class DistEnv:
    """Where this process runs: its device, its rank among world_size processes, and the backend used."""
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: Optional[str] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def plan_device(requested: str, local_rank: int = 0) -> tuple:
    """Pure decision, no side effects: (torch.device, backend) for this process."""
    device_type = resolve_device_type(requested)
    if device_type == 'cpu':
        return torch.device('cpu'), BACKENDS['cpu']
    return torch.device(device_type, local_rank), BACKENDS[device_type]


def setup_distributed(requested: str = 'auto', timeout_min: int = 30) -> DistEnv:
    """Select the device for this process and, under torchrun, join the process group (env:// rendezvous)."""
    rank = int(os.environ.get('RANK', 0))
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device, backend = plan_device(requested, local_rank)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    elif device.type == 'npu':
        torch.npu.set_device(device)
    else:
        try:
            tune_cpu_allocator()  # before the model and data allocate; see the section on the CPU allocator
        except ValueError as e:
            raise DeviceError(str(e)) from None
        set_cpu_threads()
    hang = restart_hang_warning()
    if hang and rank == 0:  # one line per job, before a rendezvous that may hang
        logging.getLogger('vancls').warning(f'warning: {hang}')
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method='env://', rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_min))
    return DistEnv(device=device, rank=rank, local_rank=local_rank, world_size=world_size,
                   backend=backend if world_size > 1 else None)


def restart_hang_warning() -> Optional[str]:
    """The warning for a worker of `torchrun --max-restarts N` (N > 0) that shares the agent's rendezvous store, else
    None. torchrun puts its settings in each worker's environment (TORCHELASTIC_MAX_RESTARTS,
    TORCHELASTIC_USE_AGENT_STORE). Sharing is the default since torch 2.4: a restarted worker group can then read
    the store keys of the group that died and wait on its dead addresses, silently (pytorch/pytorch#135712)."""
    restarts = os.environ.get('TORCHELASTIC_MAX_RESTARTS', '')
    if not restarts.isdigit() or int(restarts) == 0:
        return None
    if tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]) < (2, 4):
        return None  # before 2.4 only the static rendezvous shares its store, keyed by attempt
    if (os.environ.get('TORCHELASTIC_USE_AGENT_STORE') != 'True'
            or os.environ.get('TORCH_DISABLE_SHARE_RDZV_TCP_STORE') == '1'):
        return None
    return (f'torchrun --max-restarts {restarts} with the rendezvous store shared between torchrun and the workers '
            '(the default since torch 2.4): a restarted worker group can hang, with nothing printed '
            '(pytorch/pytorch#135712); export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun so that each '
            'attempt gets its own store (the launch scripts test/*.sh do)')


def leave_together(env: 'DistEnv'):
    """A barrier at the end of a successful distributed run: no rank tears its process group down while another
    (rank 0, writing the last files) still holds connections to it; gloo then aborted the early rank (SIGABRT,
    'terminate called without an active exception'). Only on success: after an error on one rank, the others may be
    inside another collective."""
    if env.distributed and dist.is_initialized():
        dist.barrier()


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_module(device: torch.device):
    """torch.cuda / torch.npu for accelerators, None for the CPU."""
    return getattr(torch, device.type, None) if device.type in ('cuda', 'npu') else None


def synchronize(device: torch.device):
    mod = device_module(device)
    if mod is not None:
        mod.synchronize()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: max allocated on an accelerator, max resident set size on the CPU."""
    mod = device_module(device)
    if mod is not None:
        return mod.max_memory_allocated(device) / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ------------------------------------------------------------------------------------------ CPU share per process
# The CPUs of a node are shared by the processes torchrun starts on it (LOCAL_WORLD_SIZE). PyTorch's defaults do
# not know about the others: each process takes one intra-op thread per core, and a fixed worker count (the
# reference's 8) starts 8 loader processes per rank even on a 2-core machine, so the processes time-slice the same
# cores and every step waits for the slowest thread.
MAX_DEFAULT_WORKERS = 8  # the reference's default; more rarely helps one device and costs memory per worker


def cpus_available() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cpusets, Slurm), else all CPUs of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def processes_per_node() -> int:
    """LOCAL_WORLD_SIZE as torchrun sets it for each of its processes; 1 for a single process."""
    value = os.environ.get('LOCAL_WORLD_SIZE', '')
    if not value:
        return 1
    if not value.isdigit() or int(value) < 1:
        raise DeviceError(f'LOCAL_WORLD_SIZE={value!r}: expected a positive integer (torchrun sets it to the '
                          'number of processes on this node)')
    return int(value)


def cpus_per_process() -> int:
    """This process's share of the node's CPUs (0 when there are more processes than CPUs)."""
    return cpus_available() // processes_per_node()


def default_workers() -> int:
    """Default data loader workers for this process: its CPU share, at most MAX_DEFAULT_WORKERS.

    0 (load in the training process) when the processes outnumber the CPUs: a worker without a CPU of its own
    cannot overlap with the step, it only adds a process and a copy of every batch through shared memory.
    An explicit -j / WORKERS= bypasses this.
    """
    return min(MAX_DEFAULT_WORKERS, cpus_per_process())


def cpu_threads() -> int:
    """Intra-op threads for a process computing on the CPU: its CPU share, at least 1."""
    return max(1, cpus_per_process())


def set_cpu_threads() -> Optional[int]:
    """torch.set_num_threads(cpu_threads()) unless OMP_NUM_THREADS is set; returns the count set, or None.

    torchrun sets OMP_NUM_THREADS=1 in each process when it starts more than one and the variable is unset; the
    launch scripts (test/common.sh) set it to cpu_threads() for their torchrun runs instead. A set value is
    respected, with a warning when it oversubscribes the CPUs (oversubscription_warning).
    """
    if os.environ.get('OMP_NUM_THREADS'):
        warning = oversubscription_warning()
        if warning and int(os.environ.get('LOCAL_RANK', 0)) == 0:  # one line per node, not one per process
            logging.getLogger('vancls').warning(f'warning: {warning}')
        return None
    n = cpu_threads()
    torch.set_num_threads(n)
    return n


def oversubscription_warning() -> Optional[str]:
    """The warning when OMP_NUM_THREADS x processes on this node exceeds the CPUs of the affinity mask, else None.

    Each process then runs more threads than it has CPUs: the threads time-slice the same cores and every step
    waits for the slowest of them, which makes a step many times slower.
    """
    value = os.environ.get('OMP_NUM_THREADS', '')
    if not value.isdigit() or int(value) < 1:
        return None  # unset (we pick the share), or a value the OpenMP runtime itself rejects
    threads, procs, cpus = int(value), processes_per_node(), cpus_available()
    if threads * procs <= cpus:
        return None
    share = cpus // procs
    fix = (f'unset OMP_NUM_THREADS (each process then takes its share, {share} thread(s)) or set it to {share}'
           if share >= 1 else f'start at most {cpus} processes on this node')
    return (f'OMP_NUM_THREADS={threads} x {procs} process(es) on this node = {threads * procs} threads for '
            f'{cpus} CPUs: they time-slice the same cores and every step waits for the slowest; {fix}')


# --------------------------------------------------------------------------------------------- CPU allocator
# PyTorch's CPU tensors come from plain malloc. glibc serves blocks above its mmap threshold (dynamic, at most
# 32 MiB on 64-bit) with a fresh mmap and unmaps them on free, so each such tensor pays page faults and the
# kernel's zeroing of every page, in every step. Most of VAN's activations at 224 px are above that threshold, so
# this slowed training steps at 224 px markedly, for the reference and the fast paths alike (sizes and times:
# docs/PERFORMANCE.md, "Allocator policy"). 'retain' serves every block from the heap and keeps what is freed (what
# jemalloc/tcmalloc do, without a preload): RSS stays near the peak of a step, which a training or evaluation
# process reaches on every step anyway.
CPU_MALLOC_ENV = 'VANCLS_CPU_MALLOC'
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4  # glibc's mallopt() options
_INT_MAX = 2 ** 31 - 1
_GLIBC_DEFAULT_MMAP_MAX, _128K = 65536, 128 * 1024
CPU_MALLOC_POLICIES = {
    # no mmap for large blocks; give the heap's top back only beyond 2 GiB free (mallopt takes an int), then
    # keep 2 GiB of it
    'retain': ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX), (_M_TOP_PAD, _INT_MAX)),
    'default': (),  # glibc as it is
    # every block above 128 KiB mmapped and unmapped on free: RSS follows live tensors (lowest memory, slowest
    # steps; benchmark.py uses it to measure activation memory)
    'release': ((_M_MMAP_MAX, _GLIBC_DEFAULT_MMAP_MAX), (_M_TRIM_THRESHOLD, _128K), (_M_TOP_PAD, _128K),
                (_M_MMAP_THRESHOLD, _128K)),
}
CPU_MALLOC_CHOICES = tuple(CPU_MALLOC_POLICIES)


def tune_cpu_allocator(policy: Optional[str] = None) -> bool:
    """Apply a CPU allocator policy (argument, else $VANCLS_CPU_MALLOC, else 'retain'); True if glibc took it.

    'default' leaves malloc alone. Only glibc is tuned (musl, macOS and others: returns False). Process-wide:
    call it before the model allocates; forked DataLoader workers inherit it.
    """
    policy = policy or os.environ.get(CPU_MALLOC_ENV, '') or 'retain'
    if policy not in CPU_MALLOC_POLICIES:
        raise ValueError(f'{CPU_MALLOC_ENV}={policy!r}: accepted values are {", ".join(CPU_MALLOC_CHOICES)}')
    settings = CPU_MALLOC_POLICIES[policy]
    c = libc()
    if not settings or not c or not hasattr(c, 'mallopt'):
        return False
    return all(c.mallopt(opt, val) == 1 for opt, val in settings)  # mallopt returns 1 on success


_LIBC = None


def libc():
    """glibc through ctypes (cached), or None where there is none (musl, macOS, Windows)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL('libc.so.6')
        except OSError:
            _LIBC = False
    return _LIBC or None


def all_reduce_sum(values: list, env: DistEnv) -> list:
    """Sum a list of numbers over all ranks (returns the input on one process)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device if env.backend != 'gloo' else 'cpu')
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


# CPU features that give native bfloat16 arithmetic, as torch reports them (oneDNN uses them for convolutions and
# matrix products): (name, torch.cpu function). torch 2.1 has neither (native bfloat16 is then unknown: --amp alone
# stays float32 on the CPU, --amp-dtype bfloat16 forces it); tests/test_device.py fails when a newer torch lacks them.
_CPU_BF16_FEATURES = (('AMX', '_is_amx_tile_supported'), ('AVX512-BF16', '_is_avx512_bf16_supported'))


def cpu_native_bf16() -> Optional[str]:
    """The CPU feature giving native bfloat16 arithmetic ('AMX' | 'AVX512-BF16'), or None: none, or unknown to torch."""
    for name, check in _CPU_BF16_FEATURES:
        fn = getattr(torch.cpu, check, None)
        try:
            if fn is not None and fn():
                return name
        except RuntimeError:  # a build without the CPU feature query
            continue
    return None


class Amp:
    """The one AMP code path: an autocast context plus loss scaling that is a no-op when disabled.

    native: torch.autocast on the device with `dtype` and, for float16, a GradScaler (the role apex O1 played).
    apex:   NVIDIA/Ascend apex.amp O1 (patched functions + dynamic loss scale); only where apex is installed.
    `--amp` without a dtype on a CPU without native bfloat16 runs float32: there oneDNN emulates bfloat16
    convolutions and matrix products (converting around float32 arithmetic), which makes the step slower, not faster.
    On a CPU with native bfloat16, the measured tables decide per job (`use_float32`, called by
    builders.set_fast_path where bfloat16 is predicted slower). `precision` is what the run computes in:
    'float32' | 'bfloat16' | 'float16'; `dtype_given`: whether --amp-dtype chose it.
    """

    def __init__(self, device: torch.device, enabled: bool = False, dtype: Optional[str] = None, impl: str = 'native'):
        if impl not in ('native', 'apex'):
            raise ValueError(f"--amp-impl {impl!r} is not one of: native, apex")
        if dtype is not None and dtype not in AMP_DTYPES:
            raise ValueError(f'--amp-dtype {dtype!r} is not one of: {", ".join(AMP_DTYPES)}')
        if enabled and device.type == 'cpu' and dtype is None and cpu_native_bf16() is None:
            logging.getLogger('vancls').info(
                f'--amp: float32 on this CPU: torch {torch.__version__} reports no native bfloat16 (AMX or '
                'AVX512-BF16), and emulated bfloat16 is slower than float32 (--amp-dtype bfloat16 forces it)')
            enabled = False
        if enabled and device.type == 'cpu' and dtype is not None and not cpu_autocast_supports(AMP_DTYPES[dtype]):
            raise DeviceError(f'--amp-dtype {dtype}: CPU autocast of torch {torch.__version__} does not support it '
                              '(use --amp-dtype bfloat16)')
        self.device = device
        self.enabled = enabled
        self.dtype_given = dtype is not None
        self.impl = impl if enabled else 'native'
        # float16 on accelerators (loss scaling needed), bfloat16 on the CPU (float16 CPU kernels are slow/partial).
        self.dtype_name = dtype or ('bfloat16' if device.type == 'cpu' else 'float16')
        self.dtype = AMP_DTYPES[self.dtype_name]
        self.precision = self.dtype_name if enabled else 'float32'
        self._apex_amp = None
        use_scaler = enabled and self.impl == 'native' and self.dtype == torch.float16
        self.scaler = make_grad_scaler(device, use_scaler)
        self.skipped_steps = 0  # optimizer steps skipped by the scaler after an fp16 overflow

    def use_float32(self, reason: str):
        """Run float32 after all (before the first step): `--amp` without a dtype where bfloat16 is slower."""
        logging.getLogger('vancls').info(f'--amp: float32: {reason} (--amp-dtype bfloat16 forces bfloat16)')
        self.enabled, self.impl, self.precision = False, 'native', 'float32'
        self.scaler = make_grad_scaler(self.device, False)

    def attach_apex(self, model, optimizer):
        """apex.amp.initialize(O1); call once after the optimizer exists. Returns (model, optimizer)."""
        if self.impl != 'apex':
            return model, optimizer
        try:
            from apex import amp as apex_amp
        except ImportError:
            raise DeviceError('--amp-impl apex: apex is not installed (build NVIDIA apex or Ascend apex from source; '
                              'the PyPI package named apex is unrelated). Use --amp-impl native.') from None
        self._apex_amp = apex_amp
        return apex_amp.initialize(model, optimizer, opt_level='O1', loss_scale='dynamic', verbosity=0)

    def autocast(self):
        if not self.enabled or self.impl == 'apex':
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, optimizer):
        if self._apex_amp is not None:
            with self._apex_amp.scale_loss(loss, optimizer) as scaled:
                scaled.backward()
        else:
            self.scaler.scale(loss).backward()

    def step(self, optimizer, parameters, clip_grad: Optional[float] = None, clip_mode: str = 'norm'):
        """Unscale, clip, step and update the scale; counts the steps the scaler skipped."""
        if self._apex_amp is not None:
            params = list(self._apex_amp.master_params(optimizer))
            _clip(params, clip_grad, clip_mode)
            optimizer.step()
            return
        if clip_grad is not None:
            self.scaler.unscale_(optimizer)
            _clip(parameters, clip_grad, clip_mode)
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(optimizer)
        self.scaler.update()
        if scale_before is not None and self.scaler.get_scale() < scale_before:
            self.skipped_steps += 1

    def state_dict(self) -> dict:
        if self._apex_amp is not None:
            return {'apex': self._apex_amp.state_dict()}
        return self.scaler.state_dict() if self.scaler.is_enabled() else {}

    def load_state_dict(self, state: dict):
        if not state:
            return
        if self._apex_amp is not None and 'apex' in state:
            self._apex_amp.load_state_dict(state['apex'])
        elif self.scaler.is_enabled():
            self.scaler.load_state_dict(state)


def make_grad_scaler(device: torch.device, enabled: bool):
    """torch.amp.GradScaler(device) where it exists (torch >= 2.3); else the device module's own (torch_npu,
    older torch), and for the CPU on older torch a disabled CUDA scaler (a no-op that needs no GPU)."""
    if hasattr(torch.amp, 'GradScaler'):
        try:
            return torch.amp.GradScaler(device.type, enabled=enabled)
        except (RuntimeError, TypeError):
            pass  # a device type this torch's GradScaler does not know: the device module's below
    mod = device_module(device)
    if mod is not None:
        return mod.amp.GradScaler(enabled=enabled)
    if enabled:
        raise DeviceError(f'--amp-dtype float16 on the CPU needs loss scaling, which torch {torch.__version__} '
                          'has only for GPUs: use --amp-dtype bfloat16')
    return torch.cuda.amp.GradScaler(enabled=False)


def cpu_autocast_supports(dtype: torch.dtype) -> bool:
    """Whether CPU autocast computes in `dtype` (torch < 2.3 takes bfloat16 only: it raises or disables itself)."""
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            with torch.autocast('cpu', dtype=dtype):
                y = torch.mm(torch.ones(1, 1), torch.ones(1, 1))
    except RuntimeError:
        return False
    return y.dtype == dtype


def _clip(parameters, value: Optional[float], mode: str):
    if value is None:
        return
    from timm.utils import dispatch_clip_grad
    dispatch_clip_grad(parameters, value=value, mode=mode)
