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
  'nhwc_compiled'  'nhwc' with each Block (and each stage's patch embedding) compiled by torch.compile
                   (regional compilation: blocks of a stage share one compiled graph), which fuses BatchNorm,
                   GELU, gating, layer scale and residual adds into few memory passes. Cold compile costs
                   tens of seconds to minutes on a small CPU; the cache (TORCHINDUCTOR_CACHE_DIR) makes later
                   runs warm.
  'auto'           the measured best per device type: see `AUTO_MODES` (documented in docs/PERFORMANCE.md).

All modes compute the reference's function: fp32 logits and gradients agree within float32 rounding
(tests/test_fast_paths.py checks 1e-4 relative). Stochastic parts (DropPath, Dropout) draw the same number of
random values but may map them to other elements, so with drop rates > 0 runs are not bit-reproducible
across modes.

`fuse_van(model)` (used by `VAN.fuse()`) builds an inference-only `FusedVAN`: BatchNorm folded into the
convolutions that follow (norm1 -> proj_1, norm2 -> fc1) or precede (patch_embed.norm -> proj), layer scales
folded into proj_2 / fc2, and Attention's shortcut (taken after norm1) becoming a per-channel affine of the
block input. It is built from plain tensor ops (no data-dependent Python control flow), so it traces for ONNX.
"""
import copy
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    'FAST_PATH_MODES', 'AUTO_MODES', 'fast_path_modes', 'check_fast_path', 'resolve_fast_path',
    'forward_features_nhwc', 'fuse_van', 'FusedVAN',
]

FAST_PATH_MODES: Tuple[str, ...] = ('none', 'nhwc', 'nhwc_compiled', 'auto')

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
    """The concrete mode ('none', 'nhwc' or 'nhwc_compiled') that `mode` means on `device_type`."""
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


def conv_cl(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Any convolution (depth-wise, dilated, strided) through the backend's channels_last kernels."""
    y = conv(_nchw_view(x))
    y = _nhwc_view(y)
    # oneDNN/cuDNN keep channels_last, so this is a no-op; it guards the rare layouts (C == 1) they may not keep.
    return y.contiguous()


def batch_norm(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's own BatchNorm (running stats, momentum, SyncBatchNorm) on a channels_last view."""
    return _nhwc_view(bn(_nchw_view(x))).contiguous()


def attention_nhwc(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    lka = attn.spatial_gating_unit
    u = attn.activation(conv1x1(attn.proj_1, x))
    a = conv1x1(lka.conv1, conv_cl(lka.conv_spatial, conv_cl(lka.conv0, u)))
    return conv1x1(attn.proj_2, u * a) + x


def mlp_nhwc(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = conv1x1(mlp.fc1, x)
    h = mlp.drop(mlp.act(conv_cl(mlp.dwconv.dwconv, h)))
    return mlp.drop(conv1x1(mlp.fc2, h))


def block_nhwc(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x + blk.drop_path(blk.layer_scale_1 * attention_nhwc(blk.attn, batch_norm(blk.norm1, x)))
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
        compiled: bool = False,
        grad_checkpointing: bool = False,
) -> torch.Tensor:
    """VAN.forward_features in NHWC: B, in_chans, H, W (any layout) -> B, C, H/32, W/32 (a channels_last view)."""
    block_fn, embed_fn = block_nhwc, patch_embed_nhwc
    if compiled and not torch.compiler.is_compiling():
        block_fn = _compiled_fn('block', block_nhwc)
        embed_fn = _compiled_fn('patch_embed', patch_embed_nhwc)
    x = x.permute(0, 2, 3, 1).contiguous()  # B, H, W, in_chans (a cheap copy: 3 channels)
    for i in range(1, model.num_stages + 1):
        x = embed_fn(getattr(model, f'patch_embed{i}'), x)
        for blk in getattr(model, f'block{i}'):
            if grad_checkpointing:
                x = checkpoint(block_fn, blk, x, use_reentrant=False)
            else:
                x = block_fn(blk, x)
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

    def forward_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        u = self.act1(conv1x1(self.proj_1, x))
        a = conv1x1(self.conv1, conv_cl(self.conv_spatial, conv_cl(self.conv0, u)))
        x = self.alpha * x + conv1x1(self.proj_2, u * a)
        return x + conv1x1(self.fc2, self.act2(conv_cl(self.dwconv, conv1x1(self.fc1, x))))


class FusedVAN(nn.Module):
    """Inference-only VAN with BatchNorm and layer scales folded (see `fuse_van`); eval mode, no gradients.

    `nhwc=True` runs the NHWC fast path (the default where it is faster: see fast_ops.AUTO_MODES);
    `nhwc=False` runs plain NCHW convolutions (the most portable graph, e.g. for ONNX runtimes).
    """

    def __init__(self, model: nn.Module, nhwc: bool = True):
        super().__init__()
        self.nhwc = nhwc
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
                x = conv_cl(stem, x)
                for blk in stage:
                    x = blk.forward_nhwc(x)
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

    nhwc=None follows the model's fast path on its parameters' device ('none' -> NCHW, otherwise NHWC).
    """
    if nhwc is None:
        device_type = next(model.parameters()).device.type
        nhwc = resolve_fast_path(getattr(model, 'fast_path', 'none'), device_type) != 'none'
    with torch.no_grad():
        return FusedVAN(model, nhwc=nhwc)
