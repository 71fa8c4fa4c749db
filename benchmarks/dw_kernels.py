"""VAN's depth-wise convolutions, kernel by kernel: oneDNN's channels_last kernels against the compiled shifted sums.

The measurement behind models/fast_ops.dw_plan (which convolution runs which kernel in 'nhwc_lka') and behind the
two-stage reduction of the shifted weight gradient. For the LKA's 5x5 and dilated 7x7 and the MLP's 3x3 at van_b0's
stage shapes (224 px, --batch), on NHWC tensors:
    onednn fwd / dgrad / wgrad     F.conv2d on channels_last input; aten.convolution_backward for the input
                                   gradient alone and for the weight + bias gradients alone
    shift fwd                      models/fast_ops' compiled shifted multiply-adds (also what the input gradient
                                   runs, with the kernel flipped)
    shift wgrad                    fast_ops' weight + bias gradient: per-image partial sums, then over the batch
    shift wgrad one-stage          the same sums reduced over (batch, height, width) in one go (the earlier code)
Each number is the median of --steps calls after 2 warm-up calls (cold compiles happen in the warm-up). Prints
numbers, asserts nothing. AVX2-only CPUs can be emulated on an AVX-512 one with
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 (Inductor follows ATEN_CPU_CAPABILITY too).

Run from the repository root:  .venv/bin/python -m benchmarks.dw_kernels [--batch 32] [--steps 7]
"""
import argparse

import torch
import torch.nn.functional as F

from benchmarks.pointwise_conv import median_ms
from models import fast_ops
from vancls.device import tune_cpu_allocator

STAGES = ((32, 56), (64, 28), (160, 14), (256, 7))  # van_b0 @224: (channels, map size) per stage
HIDDEN = (8, 8, 4, 4)  # van_b0's MLP ratios: the 3x3 runs on channels x ratio
CONVS = ((5, 1, 'LKA 5x5'), (7, 3, 'LKA 7x7 dil 3'), (3, 1, 'MLP 3x3'))


def _wgrad_one_stage(x: torch.Tensor, g: torch.Tensor, k: int, d: int) -> torch.Tensor:
    h, wd = x.shape[1], x.shape[2]
    p = d * (k // 2)
    xp = F.pad(x, (0, 0, p, p, p, p))
    rows = [(xp[:, i * d:i * d + h, j * d:j * d + wd, :] * g).sum(dim=(0, 1, 2))
            for i, j in (divmod(t, k) for t in range(k * k))]
    return torch.stack(rows + [g.sum(dim=(0, 1, 2))])


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--steps', type=int, default=7)
    args = p.parse_args()
    tune_cpu_allocator('retain')  # train.py's policy
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, '
          f'CPU capability {torch.backends.cpu.get_cpu_capability()}, batch {args.batch}; ms per call')
    cols = ('onednn fwd', 'onednn dgrad', 'onednn wgrad', 'shift fwd', 'shift wgrad', 'wgrad 1-stage')
    print(f'{"conv":14s} {"C":>5} {"HxW":>5} ' + ' '.join(f'{c:>13}' for c in cols))
    for k, d, name in CONVS:
        for stage, (c, size) in enumerate(STAGES):
            c = c * HIDDEN[stage] if k == 3 else c
            x = torch.randn(args.batch, size, size, c)  # NHWC
            g = torch.randn(args.batch, size, size, c)
            w, b = torch.randn(c, 1, k, k), torch.randn(c)
            xc, gc, pad = x.permute(0, 3, 1, 2), g.permute(0, 3, 1, 2), d * (k // 2)

            def backward(mask):
                return torch.ops.aten.convolution_backward(gc, xc, w, [c], [1, 1], [pad, pad], [d, d], False,
                                                           [0, 0], c, mask)
            fwd = fast_ops._kernel(fast_ops._dw_shift_fwd, ('fwd', k, d, tuple(x.shape), x.dtype))
            wgrad = fast_ops._kernel(fast_ops._dw_shift_wgrad, ('wgrad', k, d, tuple(x.shape), x.dtype))
            one_stage = fast_ops._kernel(_wgrad_one_stage, ('wgrad1', k, d, tuple(x.shape), x.dtype))
            taps = fast_ops._taps(w)
            times = [
                median_ms(lambda: F.conv2d(xc, w, b, 1, pad, d, c), args.steps),
                median_ms(lambda: backward([True, False, False]), args.steps),
                median_ms(lambda: backward([False, True, True]), args.steps),
                median_ms(lambda: fwd(x, taps, b, k, d), args.steps),
                median_ms(lambda: wgrad(x, g, k, d), args.steps),
                median_ms(lambda: one_stage(x, g, k, d), args.steps),
            ]
            print(f'{name:14s} {c:5d} {size:5d} ' + ' '.join(f'{t:13.2f}' for t in times), flush=True)


if __name__ == '__main__':
    main()
