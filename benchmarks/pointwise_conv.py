"""1x1 convolutions, forward + backward: the backend's channels_last convolution against a GEMM over the channels.

The measurement behind models/fast_ops.POINTWISE_GEMM_MAX_PIXELS (which of the two `conv_pointwise` runs). For each
stage's map size (224 px and 32 px inputs) and the 1x1 convolutions of that stage in van_b0 and van_b2 (C -> C,
C -> mlp_ratio x C, mlp_ratio x C -> C), one step is y = conv(x) then y.backward(g) with grads for x, the weight
and the bias, x and g in channels_last memory:
    conv   F.conv2d (oneDNN on the CPU)
    gemm   F.linear on the NHWC view of x (what `conv_pointwise` runs on small maps)
Each is timed as the median of --steps calls after 2 warm-up calls; the pair is measured --rounds times in
alternation and the medians of the rounds are printed with their ratio (conv / gemm < 1: the convolution is faster).
pixels = batch x height x width, the GEMM's row count. Prints numbers, asserts nothing.

Run from the repository root:  .venv/bin/python -m benchmarks.pointwise_conv [--batch 32] [--inputs 224,32]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from vancls.device import tune_cpu_allocator

WIDTHS = ((32, 64, 160, 256), (64, 128, 320, 512))  # van_b0, van_b2 embed dims per stage
MLP_RATIOS = ((8, 8, 4, 4), (8, 8, 4, 4))


def stage_convs(stage: int):
    """(in, out) channel pairs of the 1x1 convolutions of `stage` in van_b0 and van_b2."""
    pairs = []
    for dims, ratios in zip(WIDTHS, MLP_RATIOS):
        c, h = dims[stage], dims[stage] * ratios[stage]
        pairs += [(c, c), (c, h), (h, c)]
    return pairs


def median_ms(fn, steps: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--inputs', default='224,32', help='input sizes (px), comma-separated')
    p.add_argument('--steps', type=int, default=9)
    p.add_argument('--rounds', type=int, default=2)
    args = p.parse_args()
    tune_cpu_allocator('retain')  # train.py's policy
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, '
          f'CPU capability {torch.backends.cpu.get_cpu_capability()}, batch {args.batch}')
    print(f'{"size":>4} {"pixels":>7} {"in":>5} {"out":>5} {"conv ms":>8} {"gemm ms":>8} {"conv/gemm":>9}')
    maps = [(stage, max(px // 4 // 2 ** stage, 1)) for px in map(int, args.inputs.split(',')) for stage in range(4)]
    for stage, size in maps:
        for cin, cout in stage_convs(stage):
            x = torch.randn(args.batch, cin, size, size).contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            w = torch.randn(cout, cin, 1, 1, requires_grad=True)
            b = torch.randn(cout, requires_grad=True)
            g = torch.randn(args.batch, cout, size, size).contiguous(memory_format=torch.channels_last)

            def conv():
                F.conv2d(x, w, b).backward(g)

            def gemm():
                F.linear(x.permute(0, 2, 3, 1), w.view(cout, cin), b).permute(0, 3, 1, 2).backward(g)

            rounds = [(median_ms(conv, args.steps), median_ms(gemm, args.steps)) for _ in range(args.rounds)]
            c = statistics.median(r[0] for r in rounds)
            m = statistics.median(r[1] for r in rounds)
            print(f'{size:4d} {args.batch * size * size:7d} {cin:5d} {cout:5d} {c:8.2f} {m:8.2f} {c / m:9.2f}',
                  flush=True)


if __name__ == '__main__':
    main()
