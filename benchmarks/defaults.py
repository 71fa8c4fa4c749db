"""The CLIs' defaults against every other configuration, job by job, and the step-cost tables `auto` predicts with.

    .venv/bin/python -m benchmarks.defaults OUT [--rounds 3]      # measure (separate processes), then report
    .venv/bin/python -m benchmarks.defaults OUT --report           # report again from OUT's JSON files

Measuring: for each (model, image size, batch, train or infer) in MEASURED, one `benchmark.py --compare` process
per round runs every configuration interleaved (train: none, nhwc, nhwc_lka, each in fp32 and with bf16 autocast;
infer: the same fused, plus the unfused 'none', the reference's execution), with train.py's allocator policy
(--malloc retain). The first round compiles nhwc_lka's kernels cold (Inductor's cache in OUT/inductor starts
empty); later rounds find them in the cache. Nothing is asserted: this prints numbers.

Reporting:
1. Jobs (JOBS): each configuration's time for the whole job = its compile time measured in that round (the first
   step's excess over the median step) + the job's images / batch x its median step. The default is what the CLI
   runs for that job with default flags: `--fast-path auto` decided by models/fast_ops.plan_auto (cold kernels in
   round 1, cached after) and, for inference, `--fuse`; for jobs run with `--amp`, the precision that
   fast_ops.faster_precision picks. Compared against every configuration of the same numerics (fp32 jobs against
   fp32 configurations; `--amp` jobs against both precisions, which --amp lets the CLI choose). Printed: the
   default's ratio to the best configuration of that round, median and range over rounds.
2. STEP_COST rows for models/fast_ops.py (van_b0: seconds per image per forward GFLOP, median over rounds) and
   COMPILE_COST (seconds per compiled kernel, cold from round 1, cached from the others).
3. Every measured row with img/s, ratio to 'none', and MFU against the fp32 and the bf16 matmul peaks.
"""
import argparse
import dataclasses
import functools
import glob
import json
import os
import statistics
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ('none', 'nhwc', 'nhwc_lka')
CONFIGS = MODES + tuple(m + '+freeze' for m in MODES)  # the keys of STEP_COST's rows
# (model, image size, batch, kind): van_b0 at three sizes gives the tables; van_b2 and van_b3 at 224 px show
# whether costs per GFLOP carry over to larger models (smaller batches keep a round short on a 2-core machine).
MEASURED: List[Tuple[str, int, int, str]] = [
    ('van_b0', 224, 32, 'train'), ('van_b0', 224, 32, 'infer'),
    ('van_b0', 32, 32, 'train'), ('van_b0', 32, 32, 'infer'),
    ('van_b0', 384, 16, 'train'), ('van_b0', 384, 16, 'infer'),
    ('van_b2', 224, 8, 'train'), ('van_b2', 224, 8, 'infer'),
    ('van_b3', 224, 8, 'train'), ('van_b3', 224, 8, 'infer'),
]


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    model: str
    img_size: int
    kind: str
    images: int  # images through the model in the whole job (forward passes x the CLI's batch)
    amp: bool = False


# The jobs of the issue, with the CLIs' default batch (128) where the CLI sets it.
JOBS = [
    Job('train.py, long run (ImageNet-1k, 310 epochs)', 'van_b0', 224, 'train', 310 * 1281167),
    Job('train.py, short run (9 steps of 128)', 'van_b0', 224, 'train', 9 * 128),
    Job('validate.py, 50000 images', 'van_b0', 224, 'infer', 50000),
    Job('predict.py, 100 images', 'van_b0', 224, 'infer', 100),
    Job('train_performance_1p.sh at 224 px (van_base, AMP=1, 500 steps of 128)', 'van_b2', 224, 'train',
        500 * 128, amp=True),
]


def specs(kind: str) -> List[str]:
    if kind == 'train':
        return [m + amp for amp in ('', '+amp') for m in MODES]
    return ['none'] + [m + '+fuse' + freeze + amp for amp in ('', '+amp') for freeze in ('', '+freeze') for m in MODES]


def _path(out: str, rnd: int, model: str, size: int, kind: str) -> str:
    return os.path.join(out, f'round{rnd}', f'{model}_{size}_{kind}.json')


def measure(out: str, rounds: int, steps: int, only: Optional[List[str]] = None):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(out, 'inductor'))
    for rnd in range(1, rounds + 1):
        for model, size, batch, kind in MEASURED:
            path = _path(out, rnd, model, size, kind)
            if os.path.exists(path) or (only and f'{model}_{size}_{kind}' not in only):
                continue
            cmd = [sys.executable, '-m', 'vancls.benchmark', '--model', model, '--img-size', str(size), '-b',
                   str(batch), '--mode', kind, '--compare', ','.join(specs(kind)), '--warmup', '2', '--steps',
                   str(steps), '--malloc', 'retain', '--no-memory', '--json-out', path]
            print('+', ' '.join(cmd[1:]), flush=True)
            subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def _load(out: str) -> Dict[Tuple[int, str, int, str], dict]:
    reports = {}
    for path in glob.glob(os.path.join(out, 'round*', '*.json')):
        rnd = int(os.path.basename(os.path.dirname(path))[5:])
        with open(path) as f:
            rep = json.load(f)
        a = rep['args']
        reports[(rnd, a['model'], a['img_size'], a['mode'])] = rep
    return reports


def _rows(rep: dict) -> Dict[str, dict]:
    return {r['config'].split(' (')[0]: r for r in rep['results']}


def _default_spec(job: Job, cached: bool) -> str:
    """What the CLI runs for `job` with default flags (and --amp where the job has it)."""
    from models.fast_ops import faster_precision, plan_auto
    batch = next(b for m, s, b, k in MEASURED if (m, s, k) == (job.model, job.img_size, job.kind))
    passes = -(-job.images // batch)
    precision = 'bfloat16' if job.amp else 'float32'
    if job.amp and faster_precision(_complete(job.model, job.kind, job.img_size, precision, batch, passes,
                                              cached)) == 'float32':
        precision = 'float32'
    plan = plan_auto(_complete(job.model, job.kind, job.img_size, precision, batch, passes, cached))
    return (plan.mode + ('+fuse' if job.kind == 'infer' else '') + ('+freeze' if plan.freeze else '')
            + ('+amp' if precision == 'bfloat16' else ''))


def _job_seconds(row: dict, images: int) -> float:
    steps = images / row['batch_size']
    return (row['compile_s'] or 0.0) + steps * row['step_s_median']


def _span(values: List[float], fmt: str = '.2f') -> str:
    return f'{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})'


def report_jobs(reports) -> List[str]:
    lines = ['| job | default (CLI) | default / best, median (range) | best configuration (most rounds) |',
             '|---|---|---|---|']
    for job in JOBS:
        ratios, defaults, bests = [], [], []
        for (rnd, model, size, kind), rep in sorted(reports.items()):
            if (model, size, kind) != (job.model, job.img_size, job.kind):
                continue
            rows = _rows(rep)
            allowed = [s for s in rows if job.amp or '+amp' not in s]
            if job.kind == 'infer':
                allowed = [s for s in allowed if '+fuse' in s or s == 'none']
            times = {s: _job_seconds(rows[s], job.images) for s in allowed}
            default = _default_spec(job, cached=rnd > 1)
            best = min(times, key=times.get)
            ratios.append(times[best] / times[default])
            defaults.append(default)
            bests.append(best)
        if ratios:
            lines.append(f'| {job.name} | {"/".join(sorted(set(defaults)))} | {_span(ratios)} | '
                         f'{max(set(bests), key=bests.count)} |')
    return lines


def report_validation(reports) -> List[str]:
    """validate.py's default against --fast-path none (unfused: the reference's execution) on the 50000 images."""
    job = next(j for j in JOBS if j.kind == 'infer' and j.images == 50000)
    vs_none, vs_fused_none = [], []
    for (rnd, model, size, kind), rep in sorted(reports.items()):
        if (model, size, kind) != (job.model, job.img_size, job.kind):
            continue
        rows = _rows(rep)
        default = _job_seconds(rows[_default_spec(job, cached=rnd > 1)], job.images)
        vs_none.append(_job_seconds(rows['none'], job.images) / default)
        vs_fused_none.append(_job_seconds(rows['none+fuse'], job.images) / default)
    if not vs_none:
        return []
    return [f'validate.py defaults vs --fast-path none --no-fuse (the reference execution): {_span(vs_none)}x; '
            f'vs --fast-path none (fused): {_span(vs_fused_none)}x']


@functools.lru_cache(maxsize=None)
def _model(name: str):
    import timm
    import models  # noqa: F401 (registers VAN)
    return timm.create_model(name)


def _complete(model_name: str, kind: str, size: int, precision: str, batch: int, passes=None, cached=None):
    """The FastPathJob the CLIs would build, completed by the model (GFLOPs per image, kernels, cache state)."""
    from models.fast_ops import FastPathJob
    return _model(model_name).complete_job(FastPathJob(
        'cpu', kind, passes, size, precision, batch, kernels_cached=cached, can_freeze=kind == 'infer',
        frozen_cached=MODES if cached else ()))


def report_tables(reports) -> List[str]:
    """STEP_COST rows (van_b0) and COMPILE_COST, as models/fast_ops.py writes them."""
    costs: Dict[Tuple[str, str, int, str], List[float]] = {}
    cold, warm, frozen_cold, frozen_warm = [], [], [], []
    for (rnd, model, size, kind), rep in reports.items():
        if model != 'van_b0':
            continue
        for spec, row in _rows(rep).items():
            if kind == 'infer' and '+fuse' not in spec:
                continue
            mode = spec.split('+')[0]
            config = mode + ('+freeze' if '+freeze' in spec else '')
            precision = 'bfloat16' if '+amp' in spec else 'float32'
            job = _complete(model, kind, size, precision, row['batch_size'])
            costs.setdefault((kind, precision, size, config), []).append(
                row['step_s_median'] / row['batch_size'] / job.gflops_per_image)
            if config == 'nhwc_lka' and row['compile_s'] is not None:
                (cold if rnd == 1 else warm).append(row['compile_s'] / job.num_kernels)
            if config == 'none+freeze' and row['compile_s'] is not None:  # the frozen graph's compile alone
                (frozen_cold if rnd == 1 else frozen_warm).append(row['compile_s'] / job.num_convs)
    lines = ['STEP_COST (seconds per image-GFLOP, median over rounds):']
    for kind in ('train', 'infer'):
        for precision in ('float32', 'bfloat16'):
            lines.append(f"    ('cpu', ISA, '{kind}', '{precision}'): {{")
            for size in sorted({k[2] for k in costs}):
                cells = ', '.join(f"'{m}': {statistics.median(costs[(kind, precision, size, m)]):.5f}"
                                  for m in CONFIGS if (kind, precision, size, m) in costs)
                lines.append(f'        {size}: {{{cells}}},')
            lines.append('    },')
    if cold or warm:
        lines.append(f'COMPILE_COST (seconds per kernel): cold {_span(cold, ".2f") if cold else "-"}, '
                     f'cached {_span(warm, ".2f") if warm else "-"}')
    if frozen_cold or frozen_warm:
        lines.append(f'FREEZE_COMPILE_COST (seconds per convolution, none+freeze): cold '
                     f'{_span(frozen_cold, ".3f") if frozen_cold else "-"}, cached '
                     f'{_span(frozen_warm, ".3f") if frozen_warm else "-"}')
    return lines


def report_rows(reports) -> List[str]:
    """Every configuration: img/s, ratio to 'none' (per round), MFU against both peaks (median over rounds)."""
    by_key: Dict[Tuple[str, int, str, str], List[dict]] = {}
    peaks = []
    for (rnd, model, size, kind), rep in reports.items():
        peaks.append((rep['matmul_peak_gflops'], rep['matmul_peak_amp_gflops']))
        for spec, row in _rows(rep).items():
            by_key.setdefault((model, size, kind, spec), []).append(row)
    lines = ['| model | px | batch | job | configuration | img/s | x none | MFU vs fp32 peak | MFU vs bf16 peak |',
             '|---|---|---|---|---|---|---|---|---|']
    for (model, size, kind, spec), rows in sorted(by_key.items()):
        lines.append(
            f"| {model} | {size} | {rows[0]['batch_size']} | {kind} | {spec} | "
            f"{_span([r['img_per_s'] for r in rows], '.1f')} | {_span([r['speedup'] for r in rows])} | "
            f"{100 * statistics.median(r['mfu_fp32'] for r in rows):.1f} % | "
            f"{100 * statistics.median(r['mfu_amp'] for r in rows):.1f} % |")
    if peaks:
        lines.append(f'matmul peaks (median over processes): fp32 {statistics.median(p[0] for p in peaks):.0f} '
                     f'GFLOP/s, bf16 {statistics.median(p[1] for p in peaks):.0f} GFLOP/s')
    return lines


def main(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('out', help='folder for the JSON reports (and the Inductor cache of the runs)')
    p.add_argument('--rounds', type=int, default=3, help='separate processes per measured configuration set')
    p.add_argument('--steps', type=int, default=3, help='timed steps per configuration and process')
    p.add_argument('--report', action='store_true', help='only report from the JSON files already in OUT')
    p.add_argument('--only', nargs='+', metavar='MODEL_SIZE_KIND', default=None,
                   help='measure only these sets, e.g. van_b0_32_train (default: all of MEASURED)')
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        p.error('--rounds and --steps must be >= 1')
    sys.path.insert(0, ROOT)
    if not args.report:
        measure(args.out, args.rounds, args.steps, args.only)
    reports = _load(args.out)
    if not reports:
        raise SystemExit(f'{args.out}: no reports (round*/MODEL_SIZE_KIND.json); run without --report first')
    for block in (report_jobs(reports), report_validation(reports), report_tables(reports), report_rows(reports)):
        print('\n'.join(block) + '\n')


if __name__ == '__main__':
    main()
