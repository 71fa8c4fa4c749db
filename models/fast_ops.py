""" Kernels for VAN's execution modes: the same modules, parameters and arithmetic, computed another way.

models/van.py writes the network once. Its convolutions are `van.Conv2d` modules (nn.Conv2d with the same
parameters and keys) whose `kernel` attribute names the function that computes them; `VAN.set_fast_path(mode)`
picks one per convolution with `conv_kernel(conv, mode)`. Everything else (BatchNorm, GELU, the gating, layer
scales, residual adds, LayerNorm) is the same torch code in every mode, on NCHW-shaped tensors whose memory
layout follows their input.

Modes (`fast_path=` model kwarg, `VAN.set_fast_path`, `--fast-path`):

  'none'      the reference's execution: every convolution through F.conv2d, memory layout as the input's.
  'nhwc'      activations in channels_last memory (NCHW shape, NHWC strides) through the whole network, every
              convolution through the backend's channels_last kernels (oneDNN on CPU; 'channels_last'), 1x1
              convolutions on small maps as GEMMs over the channel dimension ('pointwise'). BatchNorm, LayerNorm
              and the element-wise ops run on the same channels_last tensors without copies. Eager, no compilation.
  'nhwc_lka'  'nhwc' with LKA's large depth-wise convolutions ('dw_shift', van_fast::dwconv_nhwc): the 7x7
              dilated conv (forward and both gradients) and the 5x5's weight gradient as sums of shifted
              multiply-adds compiled by Inductor (static shapes; see `dw_plan`). A cold compile of a few small
              kernels per model/input/batch size, then Inductor's on-disk cache serves them.
  'auto'      what is expected to finish the job first: `plan_auto(job)` predicts, for each mode, the job's time
              = nhwc_lka's compile (cold, or from Inductor's disk cache when this job's kernels were compiled
              before: `kernels_cached`) + images x the model's GFLOPs x the measured seconds per image-GFLOP of
              the mode (`STEP_COST`, keyed by device type, CPU ISA, train or infer, precision and input size), and
              picks the shortest; for inference whose weights stay fixed (validate.py, predict.py) it also weighs
              each mode with its weights frozen into one compiled graph (`compile_inference`, priced by
              `FREEZE_COMPILE_COST`) and says so in `AutoPlan.freeze`. `FastPathJob` says what the job is (device
              type, train or infer, planned forward passes, batch, image size, precision); the model fills in its
              GFLOPs and kernel keys. A run of
              unknown length never compiles. Anything not measured (other devices, ISAs, precisions) runs 'none'.
              A model built with fast_path='auto' (timm.create_model, VAN(...)) knows neither its run length nor
              its input size: it gets the decision for a run of unknown length at its default size, for the
              device its parameters are on; moving it to another device type decides again for that device.

All modes compute the reference's function: fp32 logits and gradients agree within float32 rounding
(tests/test_fast_paths.py). Stochastic parts (DropPath, Dropout) draw the same random values in every mode.
docs/PERFORMANCE.md has the measurements that justify each mode and the tables `STEP_COST` and `COMPILE_COST`.

The kernels need `torch.library.custom_op` and `torch.get_autocast_dtype` (torch >= 2.4). On older torch
`import models` works, 'auto' means 'none', and asking for another mode raises an error naming the version.

Also here: the BatchNorm / layer-scale folding arithmetic that `VAN.fuse()` applies to the model's own modules,
and `compile_inference` (validate.py, predict.py).
"""
import dataclasses
import getpass
import hashlib
import logging
import math
import os
import re
import tempfile
import types
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'FAST_PATH_MODES', 'MODEL_DEFAULT_FAST_PATH', 'STEP_COST', 'COMPILE_COST', 'FAST_PATHS_AVAILABLE',
    'POINTWISE_GEMM_MAX_PIXELS', 'JOB_KINDS', 'PRECISIONS', 'FastPathJob',
    'AutoPlan', 'fast_path_modes', 'check_fast_path', 'plan_auto', 'resolve_fast_path', 'faster_precision',
    'forward_gflops', 'lka_kernel_keys', 'kernels_cached', 'conv_kernel', 'run_conv', 'dw_plan',
    'bn_affine', 'fold_affine_into_input', 'scale_output', 'compile_inference', 'frozen_graph_key',
    'FREEZE', 'FREEZE_COMPILE_COST',
]

FAST_PATH_MODES: Tuple[str, ...] = ('none', 'nhwc', 'nhwc_lka', 'auto')
# The mode of a model built without `fast_path=` (VAN, timm.create_model): the reference's execution, as a timm user
# expects of a model. The CLIs' default ('auto') is theirs, in vancls/config.py's DEFAULTS.
MODEL_DEFAULT_FAST_PATH = 'none'

# What 'auto' predicts with (docs/PERFORMANCE.md, "Fastest by default", has the measurements and how they were made).
# STEP_COST: seconds per image per forward GFLOP of the model (`forward_gflops`): the median step of van_b0 at batch
# 32 (16 at 384 px) with the allocator as train.py sets it, median of 3 processes (`python -m benchmarks.defaults`,
# which prints these rows), keyed by (device type, CPU ISA as torch.backends.cpu.get_cpu_capability() names it ('' off
# the CPU), 'train' | 'infer', precision), then input size in px (the nearest measured size is used), then mode.
# Inference is measured fused (VAN.fuse(): what the inference CLIs run by default). A key that is absent has not
# been measured: 'auto' runs 'none' there (cuda and npu: benchmarks/gpu.sh has not run yet).
# The AVX2 rows were not re-measured: they are the ratios to 'none' of the earlier emulated-AVX2 measurement
# (docs/PERFORMANCE.md, 2026-11-29) applied to the AVX-512 'none' row, scaled by that measurement's AVX2/AVX-512
# 'none' step ratio (1.17).
STEP_COST: Dict[Tuple[str, str, str, str], Dict[int, Dict[str, float]]] = {
    ('cpu', 'AVX512', 'train', 'float32'): {
        32: {'none': 0.17490, 'nhwc': 0.19245, 'nhwc_lka': 0.10656},
        224: {'none': 0.08122, 'nhwc': 0.04499, 'nhwc_lka': 0.03263},
        384: {'none': 0.07291, 'nhwc': 0.04181, 'nhwc_lka': 0.03309},
    },
    ('cpu', 'AVX512', 'train', 'bfloat16'): {
        32: {'none': 0.19968, 'nhwc': 0.19653, 'nhwc_lka': 0.10925},
        224: {'none': 0.05258, 'nhwc': 0.03953, 'nhwc_lka': 0.02566},
        384: {'none': 0.05537, 'nhwc': 0.03630, 'nhwc_lka': 0.02588},
    },
    # infer rows: measured 2026-12-04 (this session's CPU, faster than the training rows' day), freeze included
    ('cpu', 'AVX512', 'infer', 'float32'): {
        32: {'none': 0.02756, 'nhwc': 0.03466, 'nhwc_lka': 0.01416,
             'none+freeze': 0.03465, 'nhwc+freeze': 0.03351, 'nhwc_lka+freeze': 0.01143},
        224: {'none': 0.01003, 'nhwc': 0.00613, 'nhwc_lka': 0.00477,
              'none+freeze': 0.00587, 'nhwc+freeze': 0.00572, 'nhwc_lka+freeze': 0.00455},
        384: {'none': 0.00993, 'nhwc': 0.00547, 'nhwc_lka': 0.00461,
              'none+freeze': 0.00516, 'nhwc+freeze': 0.00506, 'nhwc_lka+freeze': 0.00439},
    },
    ('cpu', 'AVX512', 'infer', 'bfloat16'): {
        32: {'none': 0.02768, 'nhwc': 0.03358, 'nhwc_lka': 0.01271,
             'none+freeze': 0.03367, 'nhwc+freeze': 0.03246, 'nhwc_lka+freeze': 0.01027},
        224: {'none': 0.00909, 'nhwc': 0.00518, 'nhwc_lka': 0.00371,
              'none+freeze': 0.00490, 'nhwc+freeze': 0.00491, 'nhwc_lka+freeze': 0.00352},
        384: {'none': 0.00927, 'nhwc': 0.00482, 'nhwc_lka': 0.00368,
              'none+freeze': 0.00432, 'nhwc+freeze': 0.00433, 'nhwc_lka+freeze': 0.00324},
    },
    ('cpu', 'AVX2', 'train', 'float32'): {
        32: {'none': 0.2046, 'nhwc': 0.2352, 'nhwc_lka': 0.1539},
        224: {'none': 0.0950, 'nhwc': 0.1044, 'nhwc_lka': 0.0514},
    },
    ('cpu', 'AVX2', 'infer', 'float32'): {
        224: {'none': 0.02163, 'nhwc': 0.0223, 'nhwc_lka': 0.01265},
    },
}
# nhwc_lka's compile, seconds per compiled kernel (`lka_kernel_keys`): (cold, from Inductor's disk cache); van_b0 at
# 32-384 px, median of the first process (cold) and of the two later ones (cached). AVX2: assumed the same.
COMPILE_COST: Dict[Tuple[str, str], Tuple[float, float]] = {
    ('cpu', 'AVX512'): (3.27, 0.55), ('cpu', 'AVX2'): (3.27, 0.55),
}
# Inference with frozen weights: `compile_inference` (one whole-model torch.compile with Inductor's freezing) on
# top of a mode. STEP_COST's 'infer' rows list it as '<mode>+freeze'; its compile costs FREEZE_COMPILE_COST seconds
# per convolution of the model (the graph grows with the layers, not with the FLOPs): (cold, cached). Only for jobs
# whose weights stay fixed while they run (FastPathJob.can_freeze: validate.py, predict.py), of known length.
FREEZE = '+freeze'
FREEZE_COMPILE_COST: Dict[Tuple[str, str], Tuple[float, float]] = {
    ('cpu', 'AVX512'): (0.140, 0.028),  # van_b0 (108 convolutions): 15 s cold, 3 s cached
}
# Modes that compile kernels on first use; a run of unknown length never picks them.
_COMPILING_MODES = ('nhwc_lka',)
_DEFAULT_BATCH = 32  # images per forward pass when the job does not say (the benchmarks' batch)

# Feature check (no version parsing): the kernels are custom ops with autocast-aware argument casts.
FAST_PATHS_AVAILABLE: bool = hasattr(torch, 'library') and hasattr(torch.library, 'custom_op') \
    and hasattr(torch, 'get_autocast_dtype') and hasattr(torch, 'compile')

JOB_KINDS: Tuple[str, ...] = ('train', 'infer')
PRECISIONS: Tuple[str, ...] = ('float32', 'bfloat16', 'float16')


@dataclasses.dataclass(frozen=True)
class FastPathJob:
    """What a model is about to run: all that 'auto' decides by (`plan_auto`).

    device_type: 'cpu', 'cuda', 'npu', 'meta', ... (torch.device.type); kind: 'train' or 'infer';
    forward_passes: the planned forward passes of the whole run (None: unknown); img_size: input height = width in
    px (None: the model's default); precision: the autocast dtype's name, or 'float32'; batch_size: images per
    forward pass (None: 32); can_freeze: whether the caller can run the model compiled with frozen weights
    (inference whose weights stay fixed: validate.py, predict.py). Filled in by the model (VAN.complete_job):
    gflops_per_image, its forward GFLOPs at img_size (`forward_gflops`); kernels_cached, whether nhwc_lka's kernels
    for this job are in Inductor's disk cache (`kernels_cached`; None: taken as cold); num_kernels, num_convs and
    frozen_cached, the modes whose frozen graph for this job was compiled before (`frozen_graph_key`).
    """
    device_type: str
    kind: str = 'train'
    forward_passes: Optional[int] = None
    img_size: Optional[int] = None
    precision: str = 'float32'
    batch_size: Optional[int] = None
    gflops_per_image: Optional[float] = None
    kernels_cached: Optional[bool] = None
    num_kernels: Optional[int] = None  # nhwc_lka's compiled kernels for this job (the model counts them)
    can_freeze: bool = False  # the caller compiles with frozen weights if the plan says so (compile_inference)
    num_convs: Optional[int] = None  # the model's convolutions (what a frozen compile's cost scales with)
    frozen_cached: Optional[Tuple[str, ...]] = None  # modes whose frozen graph for this job is in Inductor's cache

    def __post_init__(self):
        if self.kind not in JOB_KINDS:
            raise ValueError(f'job kind {self.kind!r}: accepted values are {", ".join(JOB_KINDS)}')
        if self.precision not in PRECISIONS:
            raise ValueError(f'job precision {self.precision!r}: accepted values are {", ".join(PRECISIONS)}')


def fast_path_modes() -> Tuple[str, ...]:
    """The accepted values of `VAN.set_fast_path` / the `fast_path=` model kwarg."""
    return FAST_PATH_MODES


def check_fast_path(mode: str) -> str:
    """`mode` if it is a known mode this torch can run; else ValueError naming the accepted values / the version."""
    if mode not in FAST_PATH_MODES:
        raise ValueError(f'unknown fast path {mode!r}: accepted values are {", ".join(FAST_PATH_MODES)}')
    if mode not in ('none', 'auto') and not FAST_PATHS_AVAILABLE:
        raise ValueError(f'fast path {mode!r} needs torch >= 2.4 (torch.library.custom_op, '
                         f'torch.get_autocast_dtype); this is torch {torch.__version__}: use none or auto')
    return mode


def _cpu_isa() -> str:
    get = getattr(getattr(torch.backends, 'cpu', None), 'get_cpu_capability', None)
    return get() if get is not None else 'DEFAULT'


def _isa(job: FastPathJob) -> str:
    return _cpu_isa() if job.device_type == 'cpu' else ''


def _step_costs(job: FastPathJob) -> Optional[Dict[str, float]]:
    """Seconds per image-GFLOP of each measured mode for this job (the nearest measured size), or None."""
    by_size = STEP_COST.get((job.device_type, _isa(job), job.kind, job.precision))
    if not by_size:
        return None
    size = job.img_size or 224
    nearest = min(by_size, key=lambda s: abs(math.log(s / size)))
    return by_size[nearest]


@dataclasses.dataclass(frozen=True)
class AutoPlan:
    """What 'auto' chose for a job and why: `seconds` is each candidate configuration's predicted time for the whole
    job (per forward pass when its length is unknown), compiles included, keyed by mode or '<mode>+freeze'; `freeze`:
    run the model compiled with frozen weights (`compile_inference`); `cached` whether nhwc_lka's kernels were found
    in Inductor's cache."""
    mode: str
    seconds: Dict[str, float]
    cached: bool
    per_pass: bool
    freeze: bool = False

    @property
    def config(self) -> str:
        return self.mode + (FREEZE if self.freeze else '')

    def describe(self) -> str:
        if not self.seconds:
            return 'not measured for this device/precision: the reference execution'
        unit = 'per forward pass' if self.per_pass else 'predicted'
        chosen = self.seconds[self.config]
        others = ', '.join(f'{c} {_duration(t)}' for c, t in sorted(self.seconds.items(), key=lambda kv: kv[1])
                           if c != self.config)
        line = f'{unit} {_duration(chosen)}' + (f' (vs {others})' if others else '')
        if 'none' in self.seconds and self.config != 'none':
            line += f', saves {_duration(self.seconds["none"] - chosen)} on none'
        if self.mode in _COMPILING_MODES:
            line += ', kernels ' + ('from the compile cache' if self.cached else 'compiled cold, then cached')
        if self.freeze:
            line += '; weights frozen into one compiled graph (--no-compile: eager)'
        return line


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f'{seconds * 1e3:.0f} ms'
    if seconds < 120:
        return f'{seconds:.0f} s'
    if seconds < 7200:
        return f'{seconds / 60:.0f} min'
    if seconds < 2 * 86400:
        return f'{seconds / 3600:.1f} h'
    return f'{seconds / 86400:.1f} days'


def plan_auto(job: FastPathJob) -> AutoPlan:
    """The configuration 'auto' runs for `job`: the shortest predicted time, compiles included; ties go to the
    simpler mode, then to no freezing. The one place where 'auto' is decided (the model, every CLI and benchmark.py
    come here)."""
    costs = _step_costs(job) if FAST_PATHS_AVAILABLE else None
    cached = bool(job.kernels_cached)
    if not costs:
        return AutoPlan('none', {}, cached, job.forward_passes is None)
    images_per_pass = job.batch_size or _DEFAULT_BATCH
    gflops = job.gflops_per_image or 1.0
    seconds = {}
    for config, cost in costs.items():
        mode, freeze = config.replace(FREEZE, ''), config.endswith(FREEZE)
        if freeze and not (job.can_freeze and job.forward_passes is not None):
            continue
        if job.forward_passes is None:
            if mode not in _COMPILING_MODES:
                seconds[config] = images_per_pass * gflops * cost
            continue
        seconds[config] = job.forward_passes * images_per_pass * gflops * cost
        if mode in _COMPILING_MODES:
            cold, warm = COMPILE_COST.get((job.device_type, _isa(job)), (math.inf, math.inf))
            seconds[config] += (job.num_kernels or 0) * (warm if cached else cold)
        if freeze:
            cold, warm = FREEZE_COMPILE_COST.get((job.device_type, _isa(job)), (math.inf, math.inf))
            seconds[config] += (job.num_convs or 0) * (warm if mode in (job.frozen_cached or ()) else cold)
    best = min(seconds, key=lambda c: (seconds[c], FAST_PATH_MODES.index(c.replace(FREEZE, '')), c.endswith(FREEZE)))
    return AutoPlan(best.replace(FREEZE, ''), seconds, cached, job.forward_passes is None, best.endswith(FREEZE))


def resolve_fast_path(mode: str, job: FastPathJob) -> str:
    """The concrete mode ('none', 'nhwc' or 'nhwc_lka') that `mode` means for `job` (`plan_auto` for 'auto').
    Explicit modes are checked and returned as they are."""
    check_fast_path(mode)
    return plan_auto(job).mode if mode == 'auto' else mode


def faster_precision(job: FastPathJob, mode: str = 'auto') -> Optional[str]:
    """For a job asking for bfloat16 without insisting (`--amp` with no `--amp-dtype`): 'bfloat16' or 'float32',
    whichever is predicted faster with `mode` (each precision with its own best mode for 'auto'); None where
    either precision has not been measured for this device (then the caller keeps its own rule)."""
    fp32 = dataclasses.replace(job, precision='float32')
    if _step_costs(job) is None or _step_costs(fp32) is None:
        return None

    def best(j):
        plan = plan_auto(j)
        return plan.seconds[plan.config] if mode == 'auto' else plan.seconds.get(mode, math.inf)
    return 'bfloat16' if best(job) < best(fp32) else 'float32'


# ----------------------------------------------------------------------------------------------------------------
# The job's size, from the model's convolutions: `conv_sizes` is [(conv, side of its output map in px)] for
# square inputs (VAN.conv_output_sizes).

def forward_gflops(conv_sizes) -> float:
    """Forward GFLOPs per image of the convolutions (2 x multiply-adds; the rest of the network is a few %)."""
    flops = 0
    for conv, side in conv_sizes:
        k = conv.kernel_size[0] * conv.kernel_size[1]
        flops += 2 * side * side * conv.out_channels * (conv.in_channels // conv.groups) * k
    return flops / 1e9


def lka_kernel_keys(conv_sizes, batch_size: int, dtype: torch.dtype, train: bool) -> set:
    """The compiled kernels (keys of `_kernel`) that nhwc_lka runs for this job: what `dwconv_nhwc` and its
    backward ask for. (The last batch of an epoch, if smaller, adds its own; not counted.)"""
    keys = set()
    for conv, side in conv_sizes:
        shift_fwd = dw_plan(conv)
        if shift_fwd is None:
            continue
        k, d = conv.kernel_size[0], conv.dilation[0]
        shape = (batch_size, side, side, conv.in_channels)
        if shift_fwd:  # the forward, and in training the input gradient (the same kernel and shape)
            keys.add(('fwd', k, d, shape, dtype))
        if train:
            keys.add(('wgrad', k, d, shape, dtype))
    return keys


def _inductor_cache_dir() -> str:
    """Inductor's on-disk cache folder, as Inductor itself resolves it (TORCHINDUCTOR_CACHE_DIR, else
    <tmp>/torchinductor_<user>), without creating it."""
    path = os.environ.get('TORCHINDUCTOR_CACHE_DIR')
    if path:
        return os.path.abspath(path)
    try:
        user = getpass.getuser()
    except (KeyError, OSError, ImportError):
        user = f'uid_{os.getuid()}' if hasattr(os, 'getuid') else 'unknown_user'
    return os.path.join(tempfile.gettempdir(), 'torchinductor_' + re.sub(r'[\\/:*?"<>|]', '_', user))


def _compiled_marker(key: tuple) -> str:
    """A file next to Inductor's cache saying that `key` was compiled there (by this torch, for this ISA): Inductor
    keys its own entries by the traced graph, which is not known before compiling."""
    tag = hashlib.sha1(repr((torch.__version__, _cpu_isa(), key)).encode()).hexdigest()
    return os.path.join(_inductor_cache_dir(), 'van_fast_ops', tag)


def kernels_cached(keys) -> bool:
    """Whether every kernel in `keys` was compiled before into the current Inductor cache."""
    return all(os.path.exists(_compiled_marker(k)) for k in keys)


def _mark_compiled(key: tuple):
    path = _compiled_marker(key)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, 'a').close()
    except OSError:  # a read-only cache: the next run predicts a cold compile, nothing else changes
        pass


class _NoCudaRuntimeFilter(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." warning, and only it.

    Inductor imports torch.utils.cpp_extension when it first compiles, which logs that line on every machine with a
    CUDA toolkit directory but no GPU: on every CPU run that compiles (nhwc_lka's kernels, --compile), about a
    toolkit the CPU kernels never use."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith('No CUDA runtime is found')


# Installed on import, before anything here or in the CLIs compiles (the line is logged when the module loads).
logging.getLogger('torch.utils.cpp_extension').addFilter(_NoCudaRuntimeFilter())


def _custom_op(name: str) -> Callable:
    """torch.library.custom_op(name), or where this torch lacks it a stand-in whose registrations do nothing
    (the modes that would call the op are refused by `check_fast_path`)."""
    if FAST_PATHS_AVAILABLE:
        return torch.library.custom_op(name, mutates_args=())

    class _Unavailable:
        def __init__(self, fn):
            self.fn = fn

        def register_fake(self, fn):
            return fn

        def register_autograd(self, *args, **kwargs):
            pass

        def __call__(self, *args, **kwargs):
            raise RuntimeError(f'{name} needs torch >= 2.4; this is torch {torch.__version__}')

    return _Unavailable


# ----------------------------------------------------------------------------------------------------------------
# Depth-wise convolutions of NHWC-contiguous tensors as compiled shifted multiply-adds (the custom ops).

def _conv_args(conv: nn.Conv2d, x: torch.Tensor):
    """(x, weight, bias) in one dtype: autocast's (as F.conv2d would run) or else x's.

    The custom ops have no autocast rule of their own, and their backward needs x, weight and grad alike, so the
    casts are done here, outside the ops, where autograd records them (fp32 master weights get fp32 grads).
    """
    w, b = conv.weight, conv.bias
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    if x.dtype != dtype:
        x = x.to(dtype)
    if w.dtype != dtype:
        w = w.to(dtype)
    if b is not None and b.dtype != dtype:
        b = b.to(dtype)
    return x, w, b


# Depth-wise 'same' convolutions as sums of k*k shifted multiply-adds on NHWC tensors, compiled by Inductor into
# one vectorized loop nest each (C++ on CPU). Two kernels: the forward (which is also the input gradient: the same
# correlation with the kernel flipped) and the weight + bias gradients as one fused reduction. oneDNN's
# channels_last kernels are fast for undilated forward passes and slow for dilation and for large weight gradients
# (docs/PERFORMANCE.md), hence `dw_plan`: LKA's dilated 7x7 runs shifted sums for everything, its 5x5 for the
# weight gradient only. The MLP's 3x3 (4-8x wider tensors) is faster in oneDNN throughout and keeps it.

def _dw_shift_fwd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, k: int, d: int) -> torch.Tensor:
    """x: (B, H, W, C); w: (k*k, C) taps in row-major order; b: (C,); padding d*(k//2), stride 1."""
    h, wd = x.shape[1], x.shape[2]
    p = d * (k // 2)
    xp = F.pad(x, (0, 0, p, p, p, p))
    out = xp[:, 0:h, 0:wd, :] * w[0] + b
    for t in range(1, k * k):
        i, j = divmod(t, k)
        out = out + xp[:, i * d:i * d + h, j * d:j * d + wd, :] * w[t]
    return out


def _dw_shift_wgrad(x: torch.Tensor, g: torch.Tensor, k: int, d: int) -> torch.Tensor:
    """(k*k + 1, C): the weight gradient per tap, then the bias gradient.

    Reduced in two stages, over each image's pixels first ((k*k + 1, B, C) partial sums), then over the batch:
    reducing (B, H, W) in one go leaves Inductor only (k*k + 1) * C outputs to spread over the cores and to hold
    in registers, which ran several times slower (docs/PERFORMANCE.md, benchmarks/dw_kernels.py)."""
    h, wd = x.shape[1], x.shape[2]
    p = d * (k // 2)
    xp = F.pad(x, (0, 0, p, p, p, p))
    rows = []
    for t in range(k * k):
        i, j = divmod(t, k)
        rows.append((xp[:, i * d:i * d + h, j * d:j * d + wd, :] * g).sum(dim=(1, 2)))
    rows.append(g.sum(dim=(1, 2)))
    return torch.stack(rows).sum(dim=1)


_kernels: Dict[tuple, Callable] = {}


def _kernel(fn: Callable, key: tuple) -> Callable:
    """`fn` compiled for static shapes, one wrapper per (kernel size, dilation, shape) key.

    Static shapes: Inductor's loops for dynamic ones were several times slower. Each key gets its own copy of
    the code object, so that dynamo's per-function recompile limit (8) is not shared by all the shapes of a
    network (van_b0 training alone has 8 forward shapes); Inductor's on-disk cache still serves every copy.
    """
    if key not in _kernels:
        tag = '_'.join(str(v) for v in key).replace(' ', '').replace(',', 'x').replace('(', '').replace(')', '')
        tag = ''.join(ch if ch.isalnum() or ch == '_' else '_' for ch in tag)
        code = fn.__code__.replace(co_name=f'{fn.__name__}_{tag}')
        compiled = torch.compile(types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__,
                                                    fn.__closure__), dynamic=False)

        def run(*args, _compiled=compiled):
            # The ops' own autograd formulas are the backward: compile inference graphs only (no saved tensors,
            # one graph whether called in training or under no_grad). Parameters go in as plain tensors: with
            # Inductor's freezing on (compiled inference elsewhere in the process) dynamo guards on a
            # Parameter's identity, and every block's bias would recompile the kernel until the limit.
            with torch.no_grad():
                return _compiled(*(a.detach() if isinstance(a, nn.Parameter) else a for a in args))

        def first_run(*args):
            out = run(*args)  # compiled (or loaded from the cache) by now
            _mark_compiled(key)
            _kernels[key] = run
            return out
        _kernels[key] = first_run
    return _kernels[key]


def _shift_conv(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor, k: int, d: int) -> torch.Tensor:
    return _kernel(_dw_shift_fwd, ('fwd', k, d, tuple(x.shape), x.dtype))(x, taps, bias, k, d)


def _taps(weight: torch.Tensor, flip: bool = False) -> torch.Tensor:
    c, k = weight.shape[0], weight.shape[-1]
    taps = weight.reshape(c, k * k).t()
    return (taps.flip(0) if flip else taps).contiguous()


@_custom_op('van_fast::dwconv_nhwc')
def dwconv_nhwc(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int,
                shift_fwd: bool) -> torch.Tensor:
    """Depth-wise conv (weight (C, 1, k, k), padding dilation*(k//2), stride 1) of an NHWC-contiguous x.

    shift_fwd: forward and input gradient as compiled shifted multiply-adds (else the backend's); the weight and
    bias gradients are always one compiled reduction.
    """
    c, k = weight.shape[0], weight.shape[-1]
    if shift_fwd:
        return _shift_conv(x, _taps(weight), bias if bias is not None else x.new_zeros(c), k, dilation)
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, 1, dilation * (k // 2), dilation, c)
    return y.permute(0, 2, 3, 1).contiguous()  # no copy: the backends return channels_last here


@dwconv_nhwc.register_fake
def _dwconv_nhwc_fake(x, weight, bias, dilation, shift_fwd):
    return x.new_empty(x.shape)


@_custom_op('van_fast::dwconv_nhwc_backward')
def dwconv_nhwc_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dilation: int,
                         shift_fwd: bool, need_input: bool, need_weight: bool) -> List[torch.Tensor]:
    """(grad_x, grad_weight, grad_bias); entries not needed are empty tensors."""
    c, k = weight.shape[0], weight.shape[-1]
    p = dilation * (k // 2)
    empty = grad.new_empty(0)
    gx = gw = gb = empty
    if need_input and shift_fwd:
        gx = _shift_conv(grad, _taps(weight, flip=True), grad.new_zeros(c), k, dilation)
    elif need_input:
        gx = torch.ops.aten.convolution_backward(
            grad.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), weight, [c], [1, 1], [p, p], [dilation, dilation],
            False, [0, 0], c, [True, False, False])[0].permute(0, 2, 3, 1).contiguous()
    if need_weight:
        wb = _kernel(_dw_shift_wgrad, ('wgrad', k, dilation, tuple(x.shape), x.dtype))(x, grad, k, dilation)
        gw = wb[:k * k].t().reshape(weight.shape).contiguous()
        gb = wb[k * k].contiguous()
    return [gx, gw, gb]


@dwconv_nhwc_backward.register_fake
def _dwconv_nhwc_backward_fake(grad, x, weight, dilation, shift_fwd, need_input, need_weight):
    empty = grad.new_empty(0)
    return [x.new_empty(x.shape) if need_input else empty,
            weight.new_empty(weight.shape) if need_weight else empty,
            grad.new_empty(weight.shape[0]) if need_weight else empty]


def _dwconv_nhwc_setup(ctx, inputs, output):
    x, weight, bias, dilation, shift_fwd = inputs
    ctx.save_for_backward(x, weight)
    ctx.conf = (dilation, shift_fwd)
    ctx.has_bias = bias is not None


def _dwconv_nhwc_bwd(ctx, grad):
    x, weight = ctx.saved_tensors
    need_w = ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2])
    gx, gw, gb = dwconv_nhwc_backward(grad.contiguous(), x, weight, *ctx.conf, ctx.needs_input_grad[0], need_w)
    return (gx if ctx.needs_input_grad[0] else None, gw if ctx.needs_input_grad[1] else None,
            gb if ctx.has_bias and ctx.needs_input_grad[2] else None, None, None)


dwconv_nhwc.register_autograd(_dwconv_nhwc_bwd, setup_context=_dwconv_nhwc_setup)


def dw_plan(conv: nn.Conv2d) -> Optional[bool]:
    """For a depth-wise, stride-1, 'same' conv with odd k >= 5: whether its forward and input gradient run as
    shifted sums too (dilated) or through the backend (undilated); None: not such a conv, use the backend."""
    k = conv.kernel_size[0]
    if not (conv.groups == conv.in_channels == conv.out_channels and conv.kernel_size == (k, k) and k >= 5
            and k % 2 == 1 and conv.stride == (1, 1) and conv.dilation[0] == conv.dilation[1]
            and conv.padding == (conv.dilation[0] * (k // 2),) * 2 and conv.padding_mode == 'zeros'):
        return None
    return conv.dilation[0] > 1


# ----------------------------------------------------------------------------------------------------------------
# The kernels a `van.Conv2d` can run: f(conv, x) with x of shape (B, C, H, W) in any memory layout, returning
# (B, C_out, H_out, W_out) in channels_last memory (a permuted view of a contiguous NHWC tensor).

# A 1x1 convolution over fewer pixels (batch x height x width) than this runs as a GEMM: there the backend's
# convolution costs more per call than it computes (stages 3-4 at 32 px); above it oneDNN's channels_last 1x1
# convolution was faster than the GEMM, forward + backward (docs/PERFORMANCE.md, benchmarks/pointwise_conv.py).
POINTWISE_GEMM_MAX_PIXELS = 512


class _ParamStridesGrad(torch.autograd.Function):
    """Identity whose backward hands the gradient on in canonical contiguous strides.

    oneDNN's channels_last kernels return weight gradients whose size-1 dimensions (1x1 kernels, depth-wise
    (C, 1, k, k)) have other strides than the parameter's. Autograd keeps them (they are contiguous), but DDP
    compares strides exactly and warns ('Grad strides do not match bucket view strides'). For those the fix is a
    view, not a copy."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous().view(-1).view(grad.shape)


def conv_channels_last(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Any convolution through the backend's (oneDNN's, cuDNN's) channels_last kernels."""
    weight = conv.weight
    if weight.requires_grad and torch.is_grad_enabled():
        weight = _ParamStridesGrad.apply(weight)
    return conv._conv_forward(x.contiguous(memory_format=torch.channels_last), weight, conv.bias)


def conv_pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1, stride-1, ungrouped convolution: a GEMM over the channel dimension (F.linear on an NHWC view) for
    small maps, else `conv_channels_last` (also when traced: one plain op, whatever the traced size)."""
    if torch.jit.is_tracing() or x.shape[0] * x.shape[2] * x.shape[3] >= POINTWISE_GEMM_MAX_PIXELS:
        return conv_channels_last(conv, x)
    y = F.linear(x.permute(0, 2, 3, 1), conv.weight.view(conv.out_channels, conv.in_channels), conv.bias)
    return y.permute(0, 3, 1, 2)


def conv_dw_shift(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A large depth-wise 'same' convolution per `dw_plan` (compiled shifted sums where they are faster)."""
    x, w, b = _conv_args(conv, x.permute(0, 2, 3, 1).contiguous())  # free when x is channels_last already
    return dwconv_nhwc(x, w, b, conv.dilation[0], dw_plan(conv)).permute(0, 3, 1, 2)


_CONV_KERNELS: Dict[str, Callable[[nn.Conv2d, torch.Tensor], torch.Tensor]] = {
    'pointwise': conv_pointwise, 'channels_last': conv_channels_last, 'dw_shift': conv_dw_shift,
}


def conv_kernel(conv: nn.Conv2d, mode: str) -> str:
    """The kernel `conv` runs in the concrete `mode`: 'torch' (F.conv2d) or a key of the kernel table."""
    if mode == 'none':
        return 'torch'
    if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1:
        return 'pointwise'
    if mode == 'nhwc_lka' and dw_plan(conv) is not None:
        return 'dw_shift'
    return 'channels_last'


def run_conv(kernel: str, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return _CONV_KERNELS[kernel](conv, x)


# ----------------------------------------------------------------------------------------------------------------
# Folding for VAN.fuse(): per-channel affines (eval-mode BatchNorm, layer scales) merged into the neighbouring
# convolution's weight and bias, in place, computed in float64.

def bn_affine(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = scale * x + shift (per channel), in float64."""
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError('fuse() needs BatchNorm running statistics (track_running_stats=True)')
    var = bn.running_var.double()
    weight = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    bias = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = weight / torch.sqrt(var + bn.eps)
    return scale, bias - bn.running_mean.double() * scale


def _set_conv(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor):
    if conv.bias is None:
        raise ValueError('fuse() folds into convolutions with a bias; this one has none')
    with torch.no_grad():
        conv.weight.copy_(weight.to(conv.weight.dtype))
        conv.bias.copy_(bias.to(conv.bias.dtype))


def fold_affine_into_input(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor):
    """conv(scale * x + shift) for a 1x1 ungrouped conv: scale its input columns, shift into its bias."""
    w = conv.weight.double()[:, :, 0, 0]  # out, in
    _set_conv(conv, (w * scale[None, :])[:, :, None, None], conv.bias.double() + w @ shift)


def scale_output(conv: nn.Conv2d, scale: torch.Tensor, shift: Optional[torch.Tensor] = None):
    """scale * conv(x) + shift (per output channel)."""
    bias = conv.bias.double() * scale
    _set_conv(conv, conv.weight.double() * scale[:, None, None, None], bias if shift is None else bias + shift)


# ----------------------------------------------------------------------------------------------------------------

def frozen_graph_key(conv_sizes, num_classes: int, batch_size: int, dtype: torch.dtype, mode: str) -> tuple:
    """What identifies the graph `compile_inference` freezes, as far as Inductor's generated code goes (the weights'
    values aside): every convolution's shape and output side (`conv_sizes`: [(conv, side in px)]), the classes,
    the batch, the dtype and the mode. `kernels_cached([key])` says whether it was compiled before."""
    convs = tuple((c.in_channels, c.out_channels, c.kernel_size, c.stride, c.dilation, c.groups, side)
                  for c, side in conv_sizes)
    return ('frozen', convs, num_classes, batch_size, str(dtype), mode)


def compile_inference(model: nn.Module, device_type: str, batch_size: Optional[int] = None,
                      cache_key: Optional[tuple] = None) -> nn.Module:
    """torch.compile for inference with frozen weights: Inductor's freezing on CPU, plain compile elsewhere.

    Freezing bakes the current parameter values into the compiled graph (constant folding, oneDNN weight
    pre-packing): only for models whose weights no longer change, called under torch.no_grad() /
    inference_mode() (with grad enabled Inductor compiles a training graph, without freezing). Not for the
    per-epoch evaluation during training, where the (EMA) weights change between calls. On CUDA freezing is
    not measured here, so it is left off there.

    batch_size: the graph is compiled for that batch only (static shapes); other batches (a data set's last,
    smaller one) run `model` eagerly instead of compiling a second graph for a handful of images. cache_key
    (`frozen_graph_key`): marked as compiled in Inductor's cache after the first compiled call, for `plan_auto`.
    """
    compiled = torch.compile(model, options={'freezing': True} if device_type == 'cpu' else None,
                             dynamic=False if batch_size else None)
    if not batch_size:
        return compiled
    return _CompiledForBatch(model, compiled, batch_size, cache_key)


class _CompiledForBatch(nn.Module):
    """`model` with batches of `batch_size` images going through `compiled` (compile_inference)."""

    def __init__(self, model: nn.Module, compiled: Callable, batch_size: int, cache_key: Optional[tuple]):
        super().__init__()
        self.model = model
        object.__setattr__(self, 'compiled', compiled)  # not a submodule: its parameters are model's
        self.batch_size, self.cache_key = batch_size, cache_key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.batch_size:
            return self.model(x)
        out = self.compiled(x)
        if self.cache_key is not None:
            _mark_compiled(self.cache_key)
            self.cache_key = None
        return out
