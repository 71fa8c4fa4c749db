""" Fast execution paths for VAN: the same modules and parameters, run another way.

A fast path is a runtime execution mode of an unchanged `VAN` (same parameters, same state_dict keys, the
official layout), selected with `VAN.set_fast_path(mode)` or `timm.create_model(name, fast_path=mode)`:

  'none'           the reference's execution: NCHW tensors, every convolution through F.conv2d.
  'nhwc'           activations kept as (B, H, W, C) contiguous tensors through the whole network:
                   1x1 convolutions run as matrix multiplications (F.linear on a (B*H*W, C) view of the weight),
                   depth-wise and strided convolutions run on channels_last views (oneDNN / cuDNN NHWC kernels,
                   much faster than their NCHW ones on CPU, above all in backward), BatchNorm on channels_last
                   views, LayerNorm on the contiguous last dimension (no copies), layer scales broadcast on
                   the last dimension. Eager, no compilation.
  'nhwc_lka'       'nhwc' with LKA's large depth-wise convolutions (7x7 dilated 3; 5x5's weight gradient) as
                   shifted multiply-adds compiled by Inductor (static shapes, one small kernel per stage shape,
                   see `dw_plan` for the measured choice): 3-7x faster than oneDNN's kernels for these. Costs a
                   cold compile of ~12-16 small kernels the first time a model/input size is seen (1-3 minutes
                   on a busy 2-core CPU), then Inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR) serves them in
                   seconds. A new batch size compiles again (static shapes are 3-6x faster than dynamic here).
  'nhwc_compiled'  'nhwc_lka' with each Block (and each stage's patch embedding) compiled by torch.compile
                   (regional compilation: blocks of a stage share one compiled graph), which fuses BatchNorm,
                   gating, layer scale and residual adds. On the 2-core CPU it measured on par with eager
                   'nhwc' (batch 8, before the LKA kernels existed) at a much longer cold compile: not
                   recommended there; kept for devices where fusion pays (untested on GPUs).
  'auto'           per device type, see `AUTO_MODES`: 'nhwc' on cpu and cuda (no compilation: robust for short
                   runs and tests); choose 'nhwc_lka' explicitly for long CPU runs (docs/PERFORMANCE.md).

All modes compute the reference's function: fp32 logits and gradients agree within float32 rounding
(tests/test_fast_paths.py checks 1e-4 relative). Stochastic parts (DropPath, Dropout) draw the same number of
random values but may map them to other elements, so with drop rates > 0 runs are not bit-reproducible
across modes.

`fuse_van(model)` (used by `VAN.fuse()`) builds an inference-only `FusedVAN`: BatchNorm folded into the
convolutions that follow (norm1 -> proj_1, norm2 -> fc1) or precede (patch_embed.norm -> proj), layer scales
folded into proj_2 / fc2, and Attention's shortcut (taken after norm1) becoming a per-channel affine of the
block input. It is built from plain tensor ops (no data-dependent Python control flow), so it traces for ONNX.

`compile_inference(model)` compiles a model whose weights will not change any more (validate.py, predict.py,
benchmark.py's 'freeze'): on CPU with Inductor's freezing, which turns the weights into constants, pre-packs
them for oneDNN and fuses the element-wise ops between the GEMMs; van_b2 @224 inference (fused, nhwc_lka) then
ran ~2x the reference's eager path where the uncompiled fused model ran ~1.6-1.9x (docs/PERFORMANCE.md).
"""
import copy
import types
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'FAST_PATH_MODES', 'AUTO_MODES', 'fast_path_modes', 'check_fast_path', 'resolve_fast_path',
    'forward_features_nhwc', 'fuse_van', 'FusedVAN', 'compile_inference',
]

FAST_PATH_MODES: Tuple[str, ...] = ('none', 'nhwc', 'nhwc_lka', 'nhwc_compiled', 'auto')

# What 'auto' runs on each device type. cpu: measured (docs/PERFORMANCE.md). cuda: NHWC (channels_last cuDNN
# kernels, GEMMs for 1x1) is the standard fast layout there; benchmarks/gpu.sh measures it (not yet run).
# Other devices (npu, mps, ...): the reference ops until measured.
AUTO_MODES: Dict[str, str] = {'cpu': 'nhwc', 'cuda': 'nhwc'}


def fast_path_modes() -> Tuple[str, ...]:
    """The accepted values of `VAN.set_fast_path` / the `fast_path=` model kwarg."""
    return FAST_PATH_MODES


def check_fast_path(mode: str) -> str:
    if mode not in FAST_PATH_MODES:
        raise ValueError(f'unknown fast path {mode!r}: accepted values are {", ".join(FAST_PATH_MODES)}')
    return mode


def resolve_fast_path(mode: str, device_type: str) -> str:
    """The concrete mode ('none', 'nhwc', 'nhwc_lka' or 'nhwc_compiled') that `mode` means on `device_type`."""
    if mode == 'auto':
        return AUTO_MODES.get(device_type, 'none')
    return mode


# ----------------------------------------------------------------------------------------------------------------
# NHWC building blocks. `x` is always a contiguous (B, H, W, C) tensor; the modules are the model's own.

def _nchw_view(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)  # a channels_last-strided NCHW view, no copy


def _nhwc_view(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def conv1x1(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution as a matrix multiplication over the channel (last) dimension."""
    return F.linear(x, conv.weight.view(conv.out_channels, conv.in_channels), conv.bias)


# A convolution on NHWC-contiguous tensors as one opaque operator (forward and backward), so that neither
# autograd nor torch.compile can hand the backend an NCHW-contiguous tensor: oneDNN's depth-wise kernels are
# several times slower on NCHW than on channels_last, above all in backward (Inductor otherwise picks its own
# strides for the conv's inputs and grads, which made the compiled path slower than eager).

def _like_param(grad: torch.Tensor) -> torch.Tensor:
    """A weight gradient in canonical contiguous strides, as the fake kernels and the parameters have them.

    oneDNN returns weight grads channels_last, and depth-wise ones with an odd stride on their size-1 dim, which
    DDP's gradient buckets warn about (and compiled graphs assert on)."""
    return grad.contiguous().view(-1).view(grad.shape)


def _conv_out_size(n: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (n + 2 * padding - dilation * (k - 1) - 1) // stride + 1


@torch.library.custom_op('van_fast::conv2d_nhwc', mutates_args=())
def conv2d_nhwc(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                stride: int, padding: int, dilation: int, groups: int) -> torch.Tensor:
    """F.conv2d for x: (B, H, W, Cin) contiguous -> (B, Ho, Wo, Cout) contiguous (channels_last kernels)."""
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, stride, padding, dilation, groups)
    return y.permute(0, 2, 3, 1).contiguous()  # no copy: the backends return channels_last here


@conv2d_nhwc.register_fake
def _conv2d_nhwc_fake(x, weight, bias, stride, padding, dilation, groups):
    b, h, w, _ = x.shape
    kh, kw = weight.shape[-2:]
    return x.new_empty(b, _conv_out_size(h, kh, stride, padding, dilation),
                       _conv_out_size(w, kw, stride, padding, dilation), weight.shape[0])


@torch.library.custom_op('van_fast::conv2d_nhwc_backward', mutates_args=())
def conv2d_nhwc_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                         stride: int, padding: int, dilation: int, groups: int,
                         need_input: bool, need_weight: bool) -> List[torch.Tensor]:
    """(grad_x NHWC, grad_weight, grad_bias); entries not needed are empty tensors."""
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), weight, [weight.shape[0]] if has_bias else None,
        [stride, stride], [padding, padding], [dilation, dilation], False, [0, 0], groups,
        [need_input, need_weight, has_bias])
    empty = grad.new_empty(0)
    gx = gx.permute(0, 2, 3, 1).contiguous() if gx is not None else empty
    return [gx, _like_param(gw) if gw is not None else empty, gb if gb is not None else empty]


@conv2d_nhwc_backward.register_fake
def _conv2d_nhwc_backward_fake(grad, x, weight, has_bias, stride, padding, dilation, groups, need_input,
                               need_weight):
    empty = grad.new_empty(0)
    return [x.new_empty(x.shape) if need_input else empty,
            weight.new_empty(weight.shape) if need_weight else empty,
            grad.new_empty(weight.shape[0]) if has_bias else empty]


def _conv2d_nhwc_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.conf = (bias is not None, stride, padding, dilation, groups)


def _conv2d_nhwc_bwd(ctx, grad):
    x, weight = ctx.saved_tensors
    has_bias, stride, padding, dilation, groups = ctx.conf
    gx, gw, gb = conv2d_nhwc_backward(grad.contiguous(), x, weight, has_bias, stride, padding, dilation, groups,
                                      ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    return (gx if ctx.needs_input_grad[0] else None, gw if ctx.needs_input_grad[1] else None,
            gb if has_bias and ctx.needs_input_grad[2] else None, None, None, None, None)


conv2d_nhwc.register_autograd(_conv2d_nhwc_bwd, setup_context=_conv2d_nhwc_setup)


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


def conv_cl(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Any square convolution (depth-wise, dilated, strided) of the module on NHWC tensors."""
    x, w, b = _conv_args(conv, x)
    return conv2d_nhwc(x, w, b, conv.stride[0], conv.padding[0], conv.dilation[0], conv.groups)


def conv_cl_plain(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The same with plain ops only (inference, tracing, ONNX): the module on a channels_last view."""
    return _nhwc_view(conv(_nchw_view(x))).contiguous()


# Depth-wise 'same' convolutions as sums of k*k shifted multiply-adds on NHWC tensors, compiled by Inductor into
# one vectorized loop nest each (C++ on CPU). Three kernels: the forward (which is also the input gradient: the
# same correlation with the kernel flipped) and the weight + bias gradients as one fused reduction.
# Measured per kernel on this project's CPU (1 thread, van_b0 stage shapes, batch 8; ms):
#                          forward        input grad     weight grad
#   7x7 dil 3, 56x56x32    oneDNN 18.5    oneDNN 14.9    oneDNN 21.9
#                          shift   2.5    shift   2.5    shift   3.5
#   5x5, 56x56x32          oneDNN  0.4    oneDNN  0.6    oneDNN  8.9
#                          shift   1.1    shift   1.1    shift   1.6
#   3x3, 56x56x256 (MLP)   oneDNN 10.8    oneDNN 10.0    oneDNN 14.1
#                          shift   9.9    shift   9.9    shift  24.7
# oneDNN's channels_last kernels are fast for undilated forward passes, slow for dilation and for weight
# gradients. Hence `dw_plan`: dilated -> shift everywhere; undilated k >= 5 -> oneDNN forward/input grad, shift
# weight grad; 3x3 -> oneDNN everywhere (plain conv2d_nhwc).

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
    """(k*k + 1, C): the weight gradient per tap, then the bias gradient."""
    h, wd = x.shape[1], x.shape[2]
    p = d * (k // 2)
    xp = F.pad(x, (0, 0, p, p, p, p))
    rows = []
    for t in range(k * k):
        i, j = divmod(t, k)
        rows.append((xp[:, i * d:i * d + h, j * d:j * d + wd, :] * g).sum(dim=(0, 1, 2)))
    rows.append(g.sum(dim=(0, 1, 2)))
    return torch.stack(rows)


_kernels: Dict[tuple, Callable] = {}


def _kernel(fn: Callable, key: tuple) -> Callable:
    """`fn` compiled for static shapes, one wrapper per (kernel size, dilation, shape) key.

    Static shapes: with dynamic ones Inductor's loops were 3-6x slower here. Each key gets its own copy of the
    code object, so that dynamo's per-function recompile limit (8) is not shared by all the shapes of a network
    (van_b0 training alone has 8 forward shapes); Inductor's on-disk cache still serves every copy.
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
        _kernels[key] = run
    return _kernels[key]


def _shift_conv(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor, k: int, d: int) -> torch.Tensor:
    return _kernel(_dw_shift_fwd, ('fwd', k, d, tuple(x.shape), x.dtype))(x, taps, bias, k, d)


def _taps(weight: torch.Tensor, flip: bool = False) -> torch.Tensor:
    c, k = weight.shape[0], weight.shape[-1]
    taps = weight.reshape(c, k * k).t()
    return (taps.flip(0) if flip else taps).contiguous()


@torch.library.custom_op('van_fast::dwconv_nhwc', mutates_args=())
def dwconv_nhwc(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int,
                shift_fwd: bool, shift_wgrad: bool) -> torch.Tensor:
    """Depth-wise conv (weight (C, 1, k, k), padding dilation*(k//2), stride 1) of an NHWC-contiguous x.

    shift_fwd: forward and input gradient as compiled shifted multiply-adds (else oneDNN/cuDNN);
    shift_wgrad: weight and bias gradients as one compiled reduction (else the backend's).
    """
    c, k = weight.shape[0], weight.shape[-1]
    if shift_fwd:
        return _shift_conv(x, _taps(weight), bias if bias is not None else x.new_zeros(c), k, dilation)
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, 1, dilation * (k // 2), dilation, c)
    return y.permute(0, 2, 3, 1).contiguous()


@dwconv_nhwc.register_fake
def _dwconv_nhwc_fake(x, weight, bias, dilation, shift_fwd, shift_wgrad):
    return x.new_empty(x.shape)


@torch.library.custom_op('van_fast::dwconv_nhwc_backward', mutates_args=())
def dwconv_nhwc_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dilation: int,
                         shift_fwd: bool, shift_wgrad: bool, need_input: bool, need_weight: bool
                         ) -> List[torch.Tensor]:
    """(grad_x, grad_weight, grad_bias); entries not needed are empty tensors."""
    c, k = weight.shape[0], weight.shape[-1]
    p = dilation * (k // 2)
    empty = grad.new_empty(0)
    gx = gw = gb = empty
    backend_mask = [need_input and not shift_fwd, need_weight and not shift_wgrad, need_weight and not shift_wgrad]
    if any(backend_mask):
        bgx, bgw, bgb = torch.ops.aten.convolution_backward(
            grad.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), weight, [c], [1, 1], [p, p], [dilation, dilation],
            False, [0, 0], c, backend_mask)
        if backend_mask[0]:
            gx = bgx.permute(0, 2, 3, 1).contiguous()
        if backend_mask[1]:
            gw, gb = _like_param(bgw), bgb
    if need_input and shift_fwd:
        gx = _shift_conv(grad, _taps(weight, flip=True), grad.new_zeros(c), k, dilation)
    if need_weight and shift_wgrad:
        wb = _kernel(_dw_shift_wgrad, ('wgrad', k, dilation, tuple(x.shape), x.dtype))(x, grad, k, dilation)
        gw = wb[:k * k].t().reshape(weight.shape).contiguous()
        gb = wb[k * k].contiguous()
    return [gx, gw, gb]


@dwconv_nhwc_backward.register_fake
def _dwconv_nhwc_backward_fake(grad, x, weight, dilation, shift_fwd, shift_wgrad, need_input, need_weight):
    empty = grad.new_empty(0)
    return [x.new_empty(x.shape) if need_input else empty,
            weight.new_empty(weight.shape) if need_weight else empty,
            grad.new_empty(weight.shape[0]) if need_weight else empty]


def _dwconv_nhwc_setup(ctx, inputs, output):
    x, weight, bias, dilation, shift_fwd, shift_wgrad = inputs
    ctx.save_for_backward(x, weight)
    ctx.conf = (dilation, shift_fwd, shift_wgrad)
    ctx.has_bias = bias is not None


def _dwconv_nhwc_bwd(ctx, grad):
    x, weight = ctx.saved_tensors
    need_w = ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2])
    gx, gw, gb = dwconv_nhwc_backward(grad.contiguous(), x, weight, *ctx.conf, ctx.needs_input_grad[0], need_w)
    return (gx if ctx.needs_input_grad[0] else None, gw if ctx.needs_input_grad[1] else None,
            gb if ctx.has_bias and ctx.needs_input_grad[2] else None, None, None, None)


dwconv_nhwc.register_autograd(_dwconv_nhwc_bwd, setup_context=_dwconv_nhwc_setup)


def dw_plan(conv: nn.Conv2d) -> Optional[Tuple[bool, bool]]:
    """(shift_fwd, shift_wgrad) for a depth-wise, stride-1, 'same' conv with k >= 5; None: use the backend."""
    k = conv.kernel_size[0]
    if not (conv.groups == conv.in_channels == conv.out_channels and conv.kernel_size == (k, k) and k >= 5
            and k % 2 == 1 and conv.stride == (1, 1) and conv.dilation[0] == conv.dilation[1]
            and conv.padding == (conv.dilation[0] * (k // 2),) * 2 and conv.padding_mode == 'zeros'):
        return None
    return (conv.dilation[0] > 1, True)


def conv_dw(conv: nn.Conv2d, x: torch.Tensor, shift: bool) -> torch.Tensor:
    """LKA's depth-wise convs: per `dw_plan` when `shift` (nhwc_lka, nhwc_compiled), else the backend's."""
    plan = dw_plan(conv) if shift else None
    if plan is None:
        return conv_cl(conv, x)
    x, w, b = _conv_args(conv, x)
    return dwconv_nhwc(x, w, b, conv.dilation[0], plan[0], plan[1])


def batch_norm(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's own BatchNorm (running stats, momentum, SyncBatchNorm) on a channels_last view."""
    return _nhwc_view(bn(_nchw_view(x))).contiguous()


def attention_nhwc(attn: nn.Module, x: torch.Tensor, shift: bool = False) -> torch.Tensor:
    lka = attn.spatial_gating_unit
    u = attn.activation(conv1x1(attn.proj_1, x))
    a = conv1x1(lka.conv1, conv_dw(lka.conv_spatial, conv_dw(lka.conv0, u, shift), shift))
    return conv1x1(attn.proj_2, u * a) + x


def mlp_nhwc(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = conv1x1(mlp.fc1, x)
    h = mlp.drop(mlp.act(conv_cl(mlp.dwconv.dwconv, h)))
    return mlp.drop(conv1x1(mlp.fc2, h))


def block_nhwc(blk: nn.Module, x: torch.Tensor, shift: bool = False) -> torch.Tensor:
    x = x + blk.drop_path(blk.layer_scale_1 * attention_nhwc(blk.attn, batch_norm(blk.norm1, x), shift))
    x = x + blk.drop_path(blk.layer_scale_2 * mlp_nhwc(blk.mlp, batch_norm(blk.norm2, x)))
    return x


def patch_embed_nhwc(pe: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return batch_norm(pe.norm, conv_cl(pe.proj, x))


def layer_norm_nhwc(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


_compiled: Dict[str, Callable] = {}


def _compiled_fn(name: str, fn: Callable) -> Callable:
    """One torch.compile wrapper per function, shared by all blocks (graphs are reused across same-shaped blocks)."""
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=False)
    return _compiled[name]


def forward_features_nhwc(
        model: nn.Module,
        x: torch.Tensor,
        mode: str = 'nhwc',
        checkpoint_fn: Optional[Callable] = None,
) -> torch.Tensor:
    """VAN.forward_features in NHWC: B, in_chans, H, W (any layout) -> B, C, H/32, W/32 (a channels_last view).

    `mode` is a concrete fast path ('nhwc', 'nhwc_lka', 'nhwc_compiled').
    `checkpoint_fn(module, *args, fn=f)` (van.checkpoint_module) checkpoints each block when given.
    """
    shift = mode in ('nhwc_lka', 'nhwc_compiled')
    block_fn, embed_fn = block_nhwc, patch_embed_nhwc
    if mode == 'nhwc_compiled' and not torch.compiler.is_compiling():
        block_fn = _compiled_fn('block', block_nhwc)
        embed_fn = _compiled_fn('patch_embed', patch_embed_nhwc)
    x = x.permute(0, 2, 3, 1).contiguous()  # B, H, W, in_chans (a cheap copy: 3 channels)
    for i in range(1, model.num_stages + 1):
        x = embed_fn(getattr(model, f'patch_embed{i}'), x)
        for blk in getattr(model, f'block{i}'):
            if checkpoint_fn is not None:
                x = checkpoint_fn(blk, blk, x, shift, fn=block_fn)
            else:
                x = block_fn(blk, x, shift)
        x = layer_norm_nhwc(getattr(model, f'norm{i}'), x)
    return _nchw_view(x)


# ----------------------------------------------------------------------------------------------------------------
# Inference folding.

def _bn_affine(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = scale * x + shift (per channel), in float64 for exact folding."""
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError('fuse() needs BatchNorm running statistics (track_running_stats=True)')
    var = bn.running_var.double()
    mean = bn.running_mean.double()
    weight = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    bias = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = weight / torch.sqrt(var + bn.eps)
    return scale, bias - mean * scale


def _conv_wb(conv: nn.Conv2d) -> Tuple[torch.Tensor, torch.Tensor]:
    w = conv.weight.double()
    b = conv.bias.double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64,
                                                                      device=w.device)
    return w, b


def _conv_from(conv: nn.Conv2d, w: torch.Tensor, b: torch.Tensor) -> nn.Conv2d:
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=True, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(w.to(conv.weight.dtype))
        out.bias.copy_(b.to(conv.weight.dtype))
    return out


def _fold_bn_before(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> nn.Conv2d:
    """conv(scale * x + shift) for a 1x1 (groups=1) conv: scale the input columns, shift into the bias."""
    w, b = _conv_wb(conv)
    w2 = w[:, :, 0, 0]
    return _conv_from(conv, (w2 * scale[None, :])[:, :, None, None], b + w2 @ shift)


def _fold_bn_after(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> nn.Conv2d:
    """scale * conv(x) + shift."""
    w, b = _conv_wb(conv)
    return _conv_from(conv, w * scale[:, None, None, None], b * scale + shift)


class FusedBlock(nn.Module):
    """A Block with norm1/norm2 and the layer scales folded away (inference only).

    x' = alpha * x + proj_2'(LKA(GELU(proj_1'(x))))            alpha = 1 + ls1 * s1 (the shortcut after norm1)
    x'' = x' + fc2'(GELU(dwconv(fc1'(x'))))
    """

    def __init__(self, blk: nn.Module):
        super().__init__()
        attn, lka, mlp = blk.attn, blk.attn.spatial_gating_unit, blk.mlp
        s1, t1 = _bn_affine(blk.norm1)
        s2, t2 = _bn_affine(blk.norm2)
        ls1, ls2 = blk.layer_scale_1.double(), blk.layer_scale_2.double()
        self.proj_1 = _fold_bn_before(attn.proj_1, s1, t1)
        self.act1 = copy.deepcopy(attn.activation)
        self.conv0 = copy.deepcopy(lka.conv0)
        self.conv_spatial = copy.deepcopy(lka.conv_spatial)
        self.conv1 = copy.deepcopy(lka.conv1)
        w, b = _conv_wb(attn.proj_2)
        # ls1 * (proj_2(z) + s1 * x + t1)  ->  proj_2'(z) + (ls1 * s1) * x, with ls1 * t1 in proj_2's bias
        self.proj_2 = _conv_from(attn.proj_2, w * ls1[:, None, None, None], ls1 * (b + t1))
        self.alpha = nn.Parameter((1.0 + ls1 * s1).to(blk.layer_scale_1.dtype), requires_grad=False)
        self.fc1 = _fold_bn_before(mlp.fc1, s2, t2)
        self.dwconv = copy.deepcopy(mlp.dwconv.dwconv)
        self.act2 = copy.deepcopy(mlp.act)
        w, b = _conv_wb(mlp.fc2)
        self.fc2 = _conv_from(mlp.fc2, w * ls2[:, None, None, None], ls2 * b)

    def forward_nchw(self, x: torch.Tensor) -> torch.Tensor:
        u = self.act1(self.proj_1(x))
        a = self.conv1(self.conv_spatial(self.conv0(u)))
        x = self.alpha[:, None, None] * x + self.proj_2(u * a)
        return x + self.fc2(self.act2(self.dwconv(self.fc1(x))))

    def forward_nhwc(self, x: torch.Tensor, shift: bool = False) -> torch.Tensor:
        u = self.act1(conv1x1(self.proj_1, x))
        if shift:
            a = conv1x1(self.conv1, conv_dw(self.conv_spatial, conv_dw(self.conv0, u, True), True))
        else:
            a = conv1x1(self.conv1, conv_cl_plain(self.conv_spatial, conv_cl_plain(self.conv0, u)))
        x = self.alpha * x + conv1x1(self.proj_2, u * a)
        return x + conv1x1(self.fc2, self.act2(conv_cl_plain(self.dwconv, conv1x1(self.fc1, x))))


class FusedVAN(nn.Module):
    """Inference-only VAN with BatchNorm and layer scales folded (see `fuse_van`); eval mode, no gradients.

    `nhwc=True` runs the NHWC fast path (the default where it is faster: see fast_ops.AUTO_MODES);
    `nhwc=False` runs plain NCHW convolutions (the most portable graph, e.g. for ONNX runtimes).
    `shift=True` (with nhwc) runs LKA's dilated 7x7 through the compiled shift kernel (van_fast::dwconv_nhwc, a
    custom op: fast, but not for ONNX); otherwise the fused model is plain torch ops only.
    """

    def __init__(self, model: nn.Module, nhwc: bool = True, shift: bool = False):
        super().__init__()
        self.nhwc = nhwc
        self.shift = bool(shift and nhwc)
        self.num_stages = model.num_stages
        self.num_classes = model.num_classes
        self.num_features = model.num_features
        self.global_pool = model.global_pool
        self.pretrained_cfg = getattr(model, 'pretrained_cfg', {})
        self.stems = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i in range(1, model.num_stages + 1):
            pe = getattr(model, f'patch_embed{i}')
            self.stems.append(_fold_bn_after(pe.proj, *_bn_affine(pe.norm)))
            self.stages.append(nn.Sequential(*[FusedBlock(b) for b in getattr(model, f'block{i}')]))
            self.norms.append(copy.deepcopy(getattr(model, f'norm{i}')))
        self.head = copy.deepcopy(model.head)
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError('FusedVAN is inference-only (BatchNorm and layer scales are folded): '
                               'train the unfused VAN')
        return super().train(False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.nhwc:
            x = x.permute(0, 2, 3, 1).contiguous()
            for stem, stage, norm in zip(self.stems, self.stages, self.norms):
                x = conv_cl_plain(stem, x)
                for blk in stage:
                    x = blk.forward_nhwc(x, self.shift)
                x = layer_norm_nhwc(norm, x)
            return _nchw_view(x)
        for stem, stage, norm in zip(self.stems, self.stages, self.norms):
            x = stem(x)
            for blk in stage:
                x = blk.forward_nchw(x)
            x = norm(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def fuse_van(model: nn.Module, nhwc: Optional[bool] = None) -> FusedVAN:
    """An inference-only copy of `model` with BN and layer scales folded; `model` itself is not modified.

    nhwc=None follows the model's fast path on its parameters' device ('none' -> NCHW, otherwise NHWC); the
    compiled LKA kernels are used when the model's mode uses them ('nhwc_lka', 'nhwc_compiled') and NHWC is on.
    """
    mode = resolve_fast_path(getattr(model, 'fast_path', 'none'), next(model.parameters()).device.type)
    if nhwc is None:
        nhwc = mode != 'none'
    with torch.no_grad():
        return FusedVAN(model, nhwc=nhwc, shift=nhwc and mode in ('nhwc_lka', 'nhwc_compiled'))


def compile_inference(model: nn.Module, device_type: str) -> nn.Module:
    """torch.compile for inference with frozen weights: Inductor's freezing on CPU, plain compile elsewhere.

    Freezing bakes the current parameter values into the compiled graph (constant folding, oneDNN weight
    pre-packing): only for models whose weights no longer change, called under torch.no_grad() /
    inference_mode() (with grad enabled Inductor compiles a training graph, without freezing). Not for the
    per-epoch evaluation during training, where the (EMA) weights change between calls. On CUDA freezing is
    not measured here, so it is left off there.
    """
    return torch.compile(model, options={'freezing': True} if device_type == 'cpu' else None)
