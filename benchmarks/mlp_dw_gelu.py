"""Issue 21, item 7: one fusion the training profile points at, tried at kernel level before touching the model.

The profile of the nhwc_lka training step (docs/PERFORMANCE.md, "Where a training step goes") puts GELU at about
two thirds of the element-wise time. GELU follows the MLP's depth-wise 3x3 conv, whose output (4x the block's
channels) is written by the conv, read and written by GELU, and kept for GELU's backward. The fusion tried here:

  current  what nhwc_lka runs: oneDNN's channels_last depth-wise conv (F.conv2d), then F.gelu; autograd saves the
           conv's input and GELU's input.
  fused    one Inductor kernel computes gelu(conv) as shifted multiply-adds (fast_ops._dw_shift_fwd) and saves only
           the conv's input; the backward recomputes the conv in one kernel fused with GELU's derivative, then
           hands that gradient to oneDNN's convolution_backward (input, weight and bias gradients).

Forward + backward of that pair for each stage of van_b0 at --img-size (batch --batch), interleaved, --steps timed
calls each after 2 warm-up calls (compiles included there), median ms per call, with train.py's CPU allocator
policy; both sides are checked equal first.
Prints numbers, asserts nothing about time. Run it 3 times (separate processes) for the 3-run rule:

    for i in 1 2 3; do .venv/bin/python -m benchmarks.mlp_dw_gelu; done
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.fast_ops import _dw_shift_fwd, _taps  # noqa: E402  (the shifted-sum conv the fast path compiles)
from vancls.device import tune_cpu_allocator  # noqa: E402

_INV_SQRT2 = 1 / math.sqrt(2)
_INV_SQRT2PI = 1 / math.sqrt(2 * math.pi)


def _gelu_conv(x, taps, bias):
    return F.gelu(_dw_shift_fwd(x, taps, bias, 3, 1))


def _gelu_conv_grad(x, taps, bias, grad):
    """grad * gelu'(conv(x)), the conv recomputed (exact GELU: Phi(z) + z phi(z))."""
    z = _dw_shift_fwd(x, taps, bias, 3, 1)
    return grad * (0.5 * (1 + torch.erf(z * _INV_SQRT2)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT2PI)


_fwd = torch.compile(_gelu_conv, dynamic=False)
_bwd = torch.compile(_gelu_conv_grad, dynamic=False)


class FusedDwGelu(torch.autograd.Function):
    """gelu(depth-wise 3x3 conv) of an NHWC-contiguous x: (B, H, W, C) -> (B, H, W, C)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        with torch.no_grad():
            return _fwd(x, _taps(weight), bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        with torch.no_grad():
            g = _bwd(x, _taps(weight), bias, grad.contiguous())
        c = weight.shape[0]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), weight, [c], [1, 1], [1, 1], [1, 1], False, [0, 0], c,
            [True, True, True])
        return gx.permute(0, 2, 3, 1), gw, gb


def current(x_nchw, weight, bias):
    return F.gelu(F.conv2d(x_nchw, weight, bias, 1, 1, 1, weight.shape[0]))


def fused(x_nchw, weight, bias):
    return FusedDwGelu.apply(x_nchw.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)


def step(fn, x, weight, bias, grad):
    for t in (x, weight, bias):
        t.grad = None
    fn(x, weight, bias).backward(grad)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--steps', type=int, default=7)
    args = p.parse_args(argv)
    tune_cpu_allocator()  # train.py's allocator policy ('retain'): glibc's default made the 14x14 conv bimodal
    dims, ratios, depths = (32, 64, 160, 256), (8, 8, 4, 4), (3, 3, 5, 2)  # van_b0
    side = args.img_size // 4
    total = {'current': 0.0, 'fused': 0.0}
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, van_b0 MLP dwconv3x3+GELU, '
          f'batch {args.batch}, {args.img_size} px: median ms per forward + backward')
    print('stage  C     HxW    current   fused   fused/current')
    for stage, (dim, ratio) in enumerate(zip(dims, ratios), 1):
        c = dim * ratio
        g = torch.Generator().manual_seed(stage)
        x = torch.randn(args.batch, c, side, side, generator=g).contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        weight = (torch.randn(c, 1, 3, 3, generator=g) * 0.3).requires_grad_(True)
        bias = (torch.randn(c, generator=g) * 0.1).requires_grad_(True)
        grad = torch.randn(x.shape, generator=g).contiguous(memory_format=torch.channels_last)
        results = {}
        for name, fn in (('current', current), ('fused', fused)):
            step(fn, x, weight, bias, grad)
            results[name] = [fn(x, weight, bias).detach()] + [t.grad.clone() for t in (x, weight, bias)]
        for a, b, what in zip(results['current'], results['fused'], ('out', 'grad x', 'grad w', 'grad b')):
            err = (a - b).abs().max().item() / max(a.abs().max().item(), 1e-12)
            assert err < 1e-4, f'stage {stage} {what}: relative error {err:.2e}'
        times = {'current': [], 'fused': []}
        for fn_name in ('current', 'fused'):  # warm-up (compiles)
            step(globals()[fn_name], x, weight, bias, grad)
        for _ in range(args.steps):
            for fn_name in ('current', 'fused'):
                t = time.perf_counter()
                step(globals()[fn_name], x, weight, bias, grad)
                times[fn_name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        for k in total:
            total[k] += med[k] * depths[stage - 1]
        print(f'{stage:>5}  {c:<5} {side:>3}x{side:<3} {med["current"]:8.1f} {med["fused"]:7.1f} '
              f'{med["fused"] / med["current"]:8.2f}')
        side //= 2
    print(f'all 13 MLPs of van_b0 (blocks x median): current {total["current"]:.0f} ms, fused {total["fused"]:.0f} ms,'
          f' fused/current {total["fused"] / total["current"]:.2f}')


if __name__ == '__main__':
    main()
