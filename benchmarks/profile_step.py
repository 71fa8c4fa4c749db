"""Where a training step's time goes: torch.profiler over a few steps of one execution mode, bucketed.

    .venv/bin/python -m benchmarks.profile_step [--mode nhwc_lka] [--model van_b0] [--img-size 224] [-b 32]

After --warmup steps (nhwc_lka's kernels compile there), --steps steps run under torch.profiler (CPU activities);
each op's self CPU time is put in one bucket by its name (BUCKETS, first match wins), summed over the steps and
reported per step with its share of the profiled total. The step is benchmark.py's (forward, cross-entropy,
backward, train.py's AdamW kernel), with the allocator as train.py sets it (--malloc retain). The profiler's own
overhead inflates small ops; read the shares, not the absolute times (benchmark.py measures those).
"""
import argparse
import collections
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (bucket, substrings of the op name): the first bucket with a matching substring takes the op's self time.
BUCKETS = [
    ('depth-wise, compiled (LKA 7x7 dilated fwd/dgrad, weight grads)', ('van_fast', 'CompiledFxGraph', 'Torch-Compiled', 'CompiledFunction',
                                                                        'cpp_fused', 'kernel_cpp', 'inductor')),
    ('optimizer (fused AdamW)', ('adamw', 'AdamW', 'Optimizer.step', 'foreach')),
    ('convolutions in oneDNN (1x1 over 512+ px, 3x3 MLP depth-wise, 5x5 fwd, strided embeds)',
     ('convolution', 'mkldnn', 'conv2d', 'conv_depthwise', 'onednn')),
    ('GEMM (1x1 on small maps, head)', ('addmm', 'aten::mm', 'aten::bmm', 'linear', 'matmul')),
    ('normalization (BatchNorm, LayerNorm)', ('batch_norm', 'layer_norm', 'native_batch_norm', 'native_layer_norm')),
    ('element-wise (GELU, gate multiply, layer scale, residual adds, DropPath)', ('gelu', 'mul', 'add', 'sub', 'div',
                                                                                  'sigmoid', 'where', 'threshold')),
    ('copies and layout (contiguous, permute copies, fill, zero_)', ('copy_', 'clone', 'contiguous', 'fill_', 'zero_',
                                                                    'empty', 'resize', 'as_strided')),
    ('loss and reductions', ('cross_entropy', 'log_softmax', 'nll_loss', 'sum', 'mean')),
]


def bucket_of(name: str) -> str:
    lowered = name.lower()
    for bucket, keys in BUCKETS:
        if any(k.lower() in lowered for k in keys):
            return bucket
    return 'other'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--mode', default='nhwc_lka', help='fast-path mode (none, nhwc, nhwc_lka)')
    p.add_argument('--model', default='van_b0')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--amp', action='store_true', help='bf16 autocast')
    p.add_argument('--top', type=int, default=12, help='also list the most expensive ops')
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vancls import benchmark
    from vancls.device import tune_cpu_allocator
    tune_cpu_allocator('retain')
    timm = benchmark._import_models()
    bargs = benchmark.build_parser().parse_args(
        ['--model', args.model, '--img-size', str(args.img_size), '-b', str(args.batch_size)]
        + (['--amp'] if args.amp else []))
    model = timm.create_model(args.model, num_classes=bargs.num_classes)
    runner = benchmark.Runner(benchmark.parse_spec(args.mode), model, bargs, torch.device('cpu'), train=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g)
    y = torch.randint(0, bargs.num_classes, (args.batch_size,), generator=g)
    for _ in range(args.warmup):
        runner.step(x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            runner.step(x, y)
    totals = collections.Counter()
    per_op = collections.Counter()
    for evt in prof.key_averages():
        self_us = evt.self_cpu_time_total
        totals[bucket_of(evt.key)] += self_us
        per_op[evt.key] += self_us
    whole = sum(totals.values())
    print(f'{args.model} @{args.img_size} batch {args.batch_size}, {args.mode}{" + bf16" if args.amp else ""}, '
          f'{args.steps} profiled steps; self CPU time per step (ms) and share')
    print('| where | ms per step | share |')
    print('|---|---|---|')
    for bucket, us in totals.most_common():
        print(f'| {bucket} | {us / 1e3 / args.steps:.0f} | {100 * us / whole:.1f} % |')
    print(f'| total | {whole / 1e3 / args.steps:.0f} | 100 % |')
    print('\nmost expensive ops (self CPU ms per step):')
    for key, us in per_op.most_common(args.top):
        print(f'  {us / 1e3 / args.steps:8.1f}  {key}  [{bucket_of(key)}]')


if __name__ == '__main__':
    main()
