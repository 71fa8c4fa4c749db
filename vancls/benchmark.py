""" Throughput, step time, peak memory and MFU of VAN's execution paths, on synthetic input.

    python benchmark.py --model van_b0 --img-size 224 -b 32 --device cpu --mode train
    python benchmark.py --model van_b0 -b 32 --compare none,nhwc,nhwc_lka --mode both --json-out out.json
    python -m vancls.benchmark ...

A configuration ("spec") is a fast-path mode (models/fast_ops.py: none, nhwc, nhwc_lka, auto) followed by
options joined with '+':
    compile     torch.compile(model) on top (whole model; the cold compile time is reported)
    fuse        inference only: VAN.fuse() (BatchNorm and layer scales folded); ignored for training
    freeze      inference only: compile with frozen weights (models/fast_ops.compile_inference: Inductor
                freezing on CPU, what validate.py --compile does); ignored for training
    ckpt        training with set_grad_checkpointing()
    cl          channels_last model and input (the plain eager recipe on GPUs)
    amp         autocast in --amp-dtype (bf16 by default)
    fusedadam   torch.optim.AdamW(fused=True) for the optimizer step (foreach=True: 'foreachadam')
    noopt       no optimizer step (forward + backward only)
e.g. 'none', 'nhwc+compile', 'nhwc+fuse', 'nhwc_lka+fuse+freeze', 'none+cl+amp'. 'auto' is resolved as the CLIs
resolve it, for the device, --img-size and the run's length (--run-steps; by default the run of train.py's or
validate.py's default flags on ImageNet-1k), and reported with what it ran, e.g. 'auto (nhwc_lka)'. `--compare`
runs several specs interleaved in one process (step i of every spec before step i+1 of any), so that the load of
a shared machine hits all alike, and prints each median against the baseline (--baseline, default 'none': the
reference's eager fp32 NCHW execution).

A train step is forward + cross-entropy + backward + optimizer step (AdamW unless 'noopt'); an inference step
is a forward in inference mode. After --warmup steps, --steps timed steps; reported: median step time,
images/s (batch / median), first-step time (with compiled configs: minus the median = cold compile time),
MFU = model FLOPs per second / measured matmul peak, against both peaks: the fp32 one and the --amp-dtype one
(each measured here: a square matmul in that dtype; model FLOPs counted by torch.utils.flop_counter, x3 for
training; a bf16 run is judged against the fp32 peak too, since that is what it replaces), and memory: peak
during one step and activation memory (peak minus the memory before the step). On CPU, memory is the process RSS (VmHWM after
resetting it through /proc/self/clear_refs, after all timed steps, with glibc's mmap threshold then pinned so
that freed tensors leave RSS; `--malloc release` does that from the start for exact activation memory, at the
cost of slower steps); on CUDA, torch.cuda.max_memory_allocated. Times are taken with glibc's allocator as it is
(`--malloc default`, the reference's situation) or with train.py's CPU policy (`--malloc retain`): pinning it
for the timed steps slowed the NCHW baseline most and inflated every ratio (docs/PERFORMANCE.md, "A correction").
"""
import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DEFAULT_IMG_SIZE, DEFAULT_MODEL, DEFAULTS, HelpFormatter
from .device import (CPU_MALLOC_CHOICES, DEVICE_CHOICES, libc as _libc, make_grad_scaler, resolve_device_type,
                     tune_cpu_allocator)

_OPTIONS = ('compile', 'freeze', 'fuse', 'ckpt', 'cl', 'amp', 'fusedadam', 'foreachadam', 'noopt')
# Options that mean something else here than in the CLIs, with benchmark.py's own defaults: the synthetic head's
# classes (the CLIs: from the data), one fixed autocast dtype (the CLIs: by device, vancls.device.Amp), and --opt,
# which here names the AdamW kernel (train.py: the optimizer, its kernel is --opt-impl). Every other shared option
# takes vancls/config.py's DEFAULTS (tests/test_structure.py checks it).
OWN_DEFAULTS = {'num_classes': 1000, 'amp_dtype': 'bfloat16', 'opt': 'auto',
                'compile': False}  # whole-model compile on top of every spec ('freeze' and 'auto' decide per spec)


class _HelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The CLIs' option help (one default per line), with this module's docstring kept as written."""


def _import_models():
    """Register VAN with timm (the repo's `models` package) and return timm."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    import models  # noqa: F401  (registers van_b0..b6)
    import timm
    return timm


# ----------------------------------------------------------------------------------------------------------------
# Specs

def parse_spec(spec: str) -> Dict[str, Any]:
    from models.fast_ops import check_fast_path
    parts = [p for p in spec.strip().split('+') if p]
    if not parts:
        raise ValueError('empty configuration')
    mode, options = parts[0], parts[1:]
    check_fast_path(mode)
    for o in options:
        if o not in _OPTIONS:
            raise ValueError(f'unknown option {o!r} in {spec!r}: accepted options are {", ".join(_OPTIONS)}')
    return dict(name=spec, fast_path=mode, options=set(options))


# ----------------------------------------------------------------------------------------------------------------
# Memory


def _proc_status(field: str) -> Optional[int]:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


class MemoryMeter:
    """Peak and baseline memory of one step: CUDA allocator stats, or process RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = 'cuda_max_allocated' if device.type == 'cuda' else 'rss'
        self.before = self.peak = None

    def __enter__(self):
        gc.collect()
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            libc = _libc()
            if libc:
                libc.malloc_trim(0)
            if not _reset_peak_rss():
                self.kind = 'rss_maxrss_unresettable'
            self.before = _proc_status('VmRSS')
        return self

    def __exit__(self, *exc):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = _proc_status('VmHWM')
        return False

    def result(self) -> Dict[str, Any]:
        if self.before is None or self.peak is None:
            return dict(memory_kind=self.kind, peak_mem_mb=None, activation_mem_mb=None)
        return dict(memory_kind=self.kind, peak_mem_mb=round(self.peak / 2 ** 20, 1),
                    activation_mem_mb=round(max(self.peak - self.before, 0) / 2 ** 20, 1))


# ----------------------------------------------------------------------------------------------------------------
# Device helpers

def _sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'npu' and hasattr(torch, 'npu'):
        torch.npu.synchronize()


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Achieved FLOP/s of a large square matmul (the 'peak' MFU is measured against)."""
    n = 2048 if device.type == 'cpu' else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    times = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times)  # best of: the peak this machine reaches now


def count_flops(model: nn.Module, img_size: int, in_chans: int = 3) -> Optional[float]:
    """Forward FLOPs per image (multiply-add = 2 FLOPs), counted on a copy of the plain model at batch 1."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
        m = copy.deepcopy(model).cpu().float().eval()
        if hasattr(m, 'set_fast_path'):
            m.set_fast_path('none')
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            m(torch.randn(1, in_chans, img_size, img_size))
        return float(fc.get_total_flops())
    except Exception:  # noqa: BLE001 - FLOPs are informative only
        return None


# ----------------------------------------------------------------------------------------------------------------
# Runners

# The runs that 'auto' is resolved for unless --run-steps says otherwise: train.py's and validate.py's default flags
# on ImageNet-1k (train: --epochs + --cooldown-epochs over its 1281167 training images; validate: 50000 images).
_IMAGENET_TRAIN_IMAGES, _IMAGENET_VAL_IMAGES = 1281167, 50000
_DEFAULT_TRAIN_EPOCHS = DEFAULTS['epochs'] + DEFAULTS['cooldown_epochs']


def run_steps(args, train: bool) -> int:
    """Forward passes of the run 'auto' is resolved for: --run-steps, else the default ImageNet run's."""
    if args.run_steps is not None:
        return args.run_steps
    if train:
        return _DEFAULT_TRAIN_EPOCHS * (_IMAGENET_TRAIN_IMAGES // args.batch_size)
    return -(-_IMAGENET_VAL_IMAGES // args.batch_size)


def fast_path_job(args, device: torch.device, train: bool, amp: bool):
    """The job 'auto' is decided for: this device, --img-size, the run of `run_steps`, the autocast dtype or fp32."""
    from models.fast_ops import FastPathJob
    return FastPathJob(device.type, 'train' if train else 'infer', run_steps(args, train), args.img_size,
                       args.amp_dtype if amp else 'float32', args.batch_size, can_freeze=not train)


class Runner:
    """One configuration: its own copy of the model (same initial weights), optimizer and step function."""

    def __init__(self, spec: Dict[str, Any], base_model: nn.Module, args, device: torch.device, train: bool):
        self.spec, self.name, self.train = spec, spec['name'], train
        opts = spec['options']
        self.device = device
        self.amp = 'amp' in opts or args.amp
        model = copy.deepcopy(base_model).to(device)
        if hasattr(model, 'set_fast_path'):  # 'auto' decided as the CLIs decide it (models/fast_ops.plan_auto)
            job = fast_path_job(args, device, train, self.amp)
            self.kernels = model.set_fast_path(spec['fast_path'], job).fast_path
            plan = model.auto_plan()
            if plan is not None and plan.freeze:  # inference: auto also decides the frozen compile, as the CLIs
                opts = opts | {'freeze'}
                self.kernels += '+freeze'
        elif spec['fast_path'] != 'none':
            raise ValueError(f'{args.model} has no fast paths (set_fast_path)')
        else:
            self.kernels = 'none'
        self.memory_format = torch.channels_last if 'cl' in opts else torch.contiguous_format
        if 'cl' in opts:
            model = model.to(memory_format=torch.channels_last)
        if train:
            model.train()
            if 'ckpt' in opts:
                model.set_grad_checkpointing(True)
        else:
            model.eval()
            if 'fuse' in opts:
                model = model.fuse()
        self.model = model
        self.amp_dtype = {'bfloat16': torch.bfloat16, 'float16': torch.float16}[args.amp_dtype]
        self.optimizer = None
        self.scaler = None
        if train and 'noopt' not in opts and args.opt != 'none':
            kw = dict(lr=1e-3, weight_decay=0.05)
            fused_default = args.opt == 'auto' and 'foreachadam' not in opts and _fused_adamw_works(device)
            if 'fusedadam' in opts or args.opt == 'adamw_fused' or fused_default:
                kw['fused'] = True
            elif 'foreachadam' in opts or args.opt in ('adamw_foreach', 'auto'):
                kw['foreach'] = True
            self.optimizer = torch.optim.AdamW(model.parameters(), **kw)
            if self.amp and self.amp_dtype == torch.float16 and device.type == 'cuda':
                self.scaler = make_grad_scaler(device, True)
        self.fn = model
        self.freeze = 'freeze' in opts and not train
        self.compile_requested = 'compile' in opts or args.compile or self.freeze
        # modes that compile kernels on first use (see models/fast_ops.py)
        self.compiles = self.compile_requested or self.kernels.startswith('nhwc_lka')
        if self.freeze:
            from models.fast_ops import compile_inference
            self.fn = compile_inference(model, device.type, batch_size=args.batch_size)
        elif self.compile_requested:
            self.fn = torch.compile(model)
        self.times: List[float] = []
        self.cpu_times: List[float] = []
        self.first_step_s: Optional[float] = None
        self.memory: Dict[str, Any] = {}

    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def step(self, x: torch.Tensor, y: torch.Tensor):
        x = x.contiguous(memory_format=self.memory_format)
        if self.train:
            with self._autocast():
                loss = F.cross_entropy(self.fn(x), y)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                if self.optimizer is not None:
                    self.optimizer.step()
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            else:
                self.model.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), self._autocast():
                self.fn(x)

    def timed_step(self, x, y) -> float:
        """Wall seconds of one step; the process CPU seconds of it are appended to self.cpu_times."""
        _sync(self.device)
        c = time.process_time()
        t = time.perf_counter()
        self.step(x, y)
        _sync(self.device)
        wall = time.perf_counter() - t
        self.cpu_times.append(time.process_time() - c)
        return wall


def run_benchmark(args) -> Dict[str, Any]:
    timm = _import_models()
    device = torch.device(resolve_device_type(args.device) if args.device in DEVICE_CHOICES else args.device)
    if device.type == 'cpu' and args.malloc != 'default':
        tune_cpu_allocator(args.malloc)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    specs = [parse_spec(s) for s in args.compare.split(',')] if args.compare else [parse_spec(args.spec)]
    baseline = parse_spec(args.baseline)
    if args.compare and baseline['name'] not in [s['name'] for s in specs]:
        specs.insert(0, baseline)
    modes = ['train', 'infer'] if args.mode == 'both' else [args.mode]

    base_model = timm.create_model(args.model, num_classes=args.num_classes)
    flops_fwd = count_flops(base_model, args.img_size)
    peak = measure_matmul_peak(device, torch.float32)
    peak_amp = measure_matmul_peak(device, {'bfloat16': torch.bfloat16, 'float16': torch.float16}[args.amp_dtype])

    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)

    # Timing of every mode first, with the allocator as users run it; then memory, for which glibc must hand
    # freed blocks back (pin_malloc_threshold), which slows every later step by page faults (the NCHW baseline
    # more than the NHWC paths).
    phases = []
    for mode in modes:
        train = mode == 'train'
        runners = [Runner(s, base_model, args, device, train) for s in specs]
        phases.append((mode, runners))
        # Warm-up (cold compiles happen here), interleaved: the first step of each runner is timed on its own.
        for r in runners:
            r.first_step_s = r.timed_step(x, y)
        for _ in range(max(args.warmup - 1, 0)):
            for r in runners:
                r.timed_step(x, y)
        for r in runners:
            r.cpu_times.clear()
        for _ in range(args.steps):
            for r in runners:
                r.times.append(r.timed_step(x, y))
    if args.memory:
        if device.type == 'cpu':
            tune_cpu_allocator('release')
        for _, runners in phases:
            for r in runners:
                meter = MemoryMeter(device)
                with meter:
                    r.step(x, y)
                r.memory = meter.result()
    results = []
    for mode, runners in phases:
        train = mode == 'train'
        base = next((r for r in runners if r.name == baseline['name']), None)
        base_med = statistics.median(base.times) if base is not None else None
        base_cpu = statistics.median(base.cpu_times) if base is not None else None
        for r in runners:
            med = statistics.median(r.times)
            cpu_med = statistics.median(r.cpu_times)
            flops = None if flops_fwd is None else flops_fwd * args.batch_size * (3 if train else 1)
            res = dict(
                config=r.name if r.kernels == r.spec['fast_path'] else f'{r.name} ({r.kernels})', mode=mode,
                model=args.model, img_size=args.img_size, batch_size=args.batch_size,
                device=str(device), amp=r.amp, amp_dtype=args.amp_dtype if r.amp else None,
                compiled=r.compiles,
                step_s_median=med, step_s_min=min(r.times), step_s_all=r.times,
                img_per_s=args.batch_size / med,
                first_step_s=r.first_step_s,
                compile_s=max(r.first_step_s - med, 0.0) if r.compiles else None,
                mfu_fp32=(flops / med / peak) if flops else None,  # against the fp32 matmul peak
                mfu_amp=(flops / med / peak_amp) if flops else None,  # against the --amp-dtype matmul peak
                speedup=(base_med / med) if base_med else None,
                cpu_s_median=cpu_med, cpu_speedup=(base_cpu / cpu_med) if base_cpu else None,
                **r.memory,
            )
            results.append(res)
        del runners
        gc.collect()
    return dict(
        date=datetime.datetime.now().isoformat(timespec='seconds'),
        argv=sys.argv, args=vars(args),
        system=dict(
            python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
            cpu=_cpu_name(), cpu_threads=torch.get_num_threads(),
            device_name=torch.cuda.get_device_name(device) if device.type == 'cuda' else _cpu_name(),
        ),
        model_gflops_per_img=flops_fwd / 1e9 if flops_fwd else None,
        matmul_peak_gflops=peak / 1e9, matmul_peak_amp_gflops=peak_amp / 1e9,
        baseline=baseline['name'], results=results,
        load_average=_loadavg(),
    )


def _fused_adamw_works(device: torch.device) -> bool:
    from .builders import fused_adamw_works
    return fused_adamw_works(device)


def _loadavg() -> Optional[List[float]]:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def _pct(v: Optional[float]) -> Optional[float]:
    return None if v is None else 100 * v


def _short(report: Dict[str, Any]) -> str:
    return {'bfloat16': 'bf16', 'float16': 'fp16'}[report['args']['amp_dtype']]


def format_table(report: Dict[str, Any]) -> str:
    head = ('mode', 'config', 'img/s', 'step ms', 'x base', 'cpu x', 'MFU32 %', f"MFU{_short(report)} %", 'peak MB',
            'act MB', 'first s', 'compile s')
    rows = [head]

    def f(v, fmt):
        return '-' if v is None else format(v, fmt)

    for r in report['results']:
        rows.append((r['mode'], r['config'], f(r['img_per_s'], '.2f'), f(r['step_s_median'] * 1e3, '.1f'),
                     f(r['speedup'], '.2f'), f(r.get('cpu_speedup'), '.2f'),
                     f(_pct(r.get('mfu_fp32')), '.1f'), f(_pct(r.get('mfu_amp')), '.1f'),
                     f(r.get('peak_mem_mb'), '.0f'), f(r.get('activation_mem_mb'), '.0f'),
                     f(r['first_step_s'], '.1f'), f(r['compile_s'], '.1f')))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ['  '.join(str(c).rjust(w) if i > 1 else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, '  '.join('-' * w for w in widths))
    a = report['args']
    title = (f"{a['model']} @{a['img_size']} batch {a['batch_size']} on {a['device']} "
             f"({report['system']['device_name']}, {report['system']['cpu_threads']} threads, "
             f"torch {report['system']['torch']}); median of {a['steps']} steps after {a['warmup']} warm-up; "
             f"matmul peak {report['matmul_peak_gflops']:.0f} GFLOP/s fp32, "
             f"{report['matmul_peak_amp_gflops']:.0f} {a['amp_dtype']}; "
             f"{(report['model_gflops_per_img'] or 0):.2f} GFLOPs/img fwd; x base = vs '{report['baseline']}' "
             f"(wall), cpu x = the same in process CPU time; load average at the end "
             f"{'/'.join(f'{v:.1f}' for v in (report.get('load_average') or []))}")
    return title + '\n' + '\n'.join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip(), formatter_class=_HelpFormatter,
                                epilog=__doc__)
    p.add_argument('--model', default=DEFAULT_MODEL, help='a VAN name (van_b0..van_b6, van_tiny/small/base/large)')
    p.add_argument('--img-size', type=int, default=DEFAULT_IMG_SIZE, help='input height and width, px')
    p.add_argument('-b', '--batch-size', type=int, default=DEFAULTS['batch_size'], help='images per step')
    p.add_argument('--num-classes', type=int, default=OWN_DEFAULTS['num_classes'],
                   help='classes of the head and the synthetic labels')
    p.add_argument('--device', default=DEFAULTS['device'],
                   help='auto, cpu, cuda, cuda:N or npu (auto: as train.py resolves it, vancls/device.py)')
    p.add_argument('--mode', choices=('train', 'infer', 'both'), default='train', help='train step, inference, or both')
    p.add_argument('--spec', '--config', dest='spec', default='none', metavar='SPEC',
                   help="one configuration: a fast-path mode and '+' options (the grammar is below the options); "
                        "--config is a deprecated alias")
    p.add_argument('--compare', default='', help='comma-separated specs run interleaved, e.g. none,nhwc,nhwc+fuse')
    p.add_argument('--baseline', default='none', help='spec the ratios are taken against')
    p.add_argument('--fast-path', dest='fast_path_alias', default=None,
                   help='shorthand for --spec MODE (a fast-path mode without options)')
    p.add_argument('--run-steps', type=int, default=None, metavar='N',
                   help="the length of the run, in forward passes, that 'auto' is resolved for as the CLIs resolve "
                        f"it (default: train.py's default flags on ImageNet-1k for --mode train, "
                        f"{_DEFAULT_TRAIN_EPOCHS} epochs; validate.py's on its {_IMAGENET_VAL_IMAGES} images for "
                        f"--mode infer; 1: a short run)")
    p.add_argument('--amp', action='store_true', help='autocast every configuration (see also the amp option)')
    p.add_argument('--amp-dtype', choices=('bfloat16', 'float16'), default=OWN_DEFAULTS['amp_dtype'],
                   help='autocast dtype of --amp and the amp option')
    p.add_argument('--compile', action='store_true', default=OWN_DEFAULTS['compile'],
                   help='torch.compile every configuration')
    p.add_argument('--opt', choices=('auto', 'adamw', 'adamw_fused', 'adamw_foreach', 'none'),
                   default=OWN_DEFAULTS['opt'],
                   help="optimizer step in the train step. auto: train.py's default (--opt-impl auto: fused AdamW "
                        "where this torch has it for the device, else foreach); adamw: torch.optim.AdamW's own "
                        "default (on the CPU a per-parameter loop, which slows to seconds per step once the "
                        "second moments underflow to denormal floats)")
    p.add_argument('--warmup', type=int, default=3, help='untimed steps first (the first one is reported)')
    p.add_argument('--steps', type=int, default=10, help='timed steps')
    p.add_argument('--malloc', default='default', choices=CPU_MALLOC_CHOICES,
                   help="CPU allocator policy for the whole run (vancls.device.tune_cpu_allocator). default: glibc's, "
                        "as the reference runs (timing first, then memory with 'release' switched on: approximate, "
                        "the heap is fragmented by then); retain: what train.py/validate.py use on CPU; release: "
                        "blocks > 128 KiB returned on free from the start: exact activation memory, slower steps "
                        "(page faults), do not compare its times")
    p.add_argument('--no-memory', dest='memory', action='store_false', help='skip the memory measurement step')
    p.add_argument('--threads', type=int, default=0, help='torch.set_num_threads (0: leave as is)')
    p.add_argument('--seed', type=int, default=DEFAULTS['seed'], help='seed of the weights and the synthetic batch')
    p.add_argument('--json-out', default='', help='write the full report (every step time) to this JSON file')
    p.add_argument('--summarize', nargs='+', metavar='JSON', default=None,
                   help='print one table of earlier --json-out reports (missing files are listed) and exit')
    return p


def summarize(paths: List[str]) -> str:
    """One table over several reports (e.g. benchmarks/gpu.sh's runs), each row with its model, size and batch."""
    head = ('model', 'px', 'batch', 'mode', 'config', 'img/s', 'step ms', 'x base', 'MFU32 %', 'MFU16 %', 'act MB',
            'compile s')
    rows, notes, system = [head], [], None

    def f(v, fmt):
        return '-' if v is None else format(v, fmt)

    for path in paths:
        try:
            with open(path) as fh:
                rep = json.load(fh)
        except (OSError, ValueError) as e:
            notes.append(f'missing: {path} ({type(e).__name__})')
            continue
        system = system or rep.get('system')
        for r in rep['results']:
            rows.append((r['model'], str(r['img_size']), str(r['batch_size']), r['mode'], r['config'],
                         f(r['img_per_s'], '.1f'), f(r['step_s_median'] * 1e3, '.1f'),
                         f(r['speedup'], '.2f') + ('' if rep['baseline'] == 'none' else f" (vs {rep['baseline']})"),
                         f(_pct(r.get('mfu_fp32', r.get('mfu'))), '.1f'), f(_pct(r.get('mfu_amp')), '.1f'),
                         f(r.get('activation_mem_mb'), '.0f'), f(r['compile_s'], '.1f')))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ['  '.join(str(c).ljust(w) if i in (0, 3, 4) else str(c).rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, '  '.join('-' * w for w in widths))
    title = ''
    if system:
        title = (f"{system.get('device_name')}, torch {system.get('torch')}; x base = vs 'none' (eager fp32 NCHW) "
                 f"of the same run\n")
    return title + '\n'.join(lines + notes)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return {}
    if args.fast_path_alias:
        args.spec = args.fast_path_alias
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit('--warmup and --steps must be >= 1')
    try:
        report = run_benchmark(args)
    except ValueError as e:
        raise SystemExit(f'benchmark: {e}') from None
    print(format_table(report), flush=True)
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, 'w') as f:
            json.dump(report, f, indent=1)
        print(f'wrote {args.json_out}')
    return report


if __name__ == '__main__':
    main()
