""" Visual Attention Network (VAN)

Paper: "Visual Attention Network", Guo et al., https://arxiv.org/abs/2202.09741
Reference: VAN-Classification (Apache-2.0), as ported to Ascend NPUs by the Ascend ModelZoo.

Module names are those of the official checkpoints (`patch_embed1.proj`, `block1.0.attn.spatial_gating_unit.conv0`,
`norm1`, `head`, ...), so the official `.pth.tar` files load with strict key matching, and the network computes
what the reference computes. The network is written once, here. How its convolutions are computed is a choice
of kernels (`set_fast_path`, models/fast_ops.py); `fuse()` folds BatchNorm and layer scales into the same modules.
Differences from the reference that do not change the numbers:
  * no `x.clone()` in forward: the residual inputs are never modified in place, so a plain reference suffices;
  * the per-stage LayerNorm normalizes an NCHW map over its channels through a permuted view
    (`LayerNormChannels`) instead of flatten -> transpose -> LayerNorm -> reshape -> permute -> contiguous: no
    copy on channels_last input, one on NCHW input (the reference makes three);
  * the blocks of a stage live in an `nn.Sequential` (keys identical to the reference's ModuleList), the stages'
    modules are named in `VAN.stage_modules` (forward runs exactly those), and the model's children are registered
    in forward order (stage by stage, then the head), which timm's `features_only` relies on;
  * `reset_classifier` works (the reference's reads an attribute that does not exist).
"""
import contextlib
import copy
import dataclasses
import math
import urllib.error
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from . import fast_ops
from ._helpers import state_dict_of
from .fast_ops import (MODEL_DEFAULT_FAST_PATH, FastPathJob, fast_path_modes,  # noqa: F401 (fast_path_modes: API)
                       resolve_fast_path)
from .timm_compat import DropPath, build_model, feature_take_indices, register_model, trunc_normal_

__all__ = ['VAN', 'checkpoint_filter_fn', 'VAN_NAMES', 'fast_path_modes']


# ------------------------------------------------------------------------------------------------ building blocks

class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, keys, defaults) computed by a selectable kernel.

    `kernel` is 'torch' (F.conv2d, the reference) or a kernel name of models/fast_ops.py: what the model's one
    concrete mode (`VAN.fast_path`) means for this convolution, set by `VAN.set_fast_path` only. TorchScript
    always compiles the F.conv2d path.
    """
    kernel: str = 'torch'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self.kernel != 'torch':
                return fast_ops.run_conv(self.kernel, self, x)
        return self._conv_forward(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ('' if self.kernel == 'torch' else f', kernel={self.kernel}')


def layer_norm_channels(x: torch.Tensor, normalized_shape: List[int], weight: torch.Tensor, bias: torch.Tensor,
                        eps: float) -> torch.Tensor:
    """LayerNorm over dim 1 of a (B, C, H, W) map (normalized_shape: [C], the module's: a constant for tracers and
    ONNX export), returned in the input's memory format.

    Normalizes an NHWC view: no copy on channels_last input; NCHW input is made NCHW again, so that the next
    stage's convolutions (and DDP's gradient buckets) stay in one layout. A leaf for torch.fx (below): the layout
    test is a Python branch on the tensor, which symbolic tracing cannot follow.
    """
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    y = F.layer_norm(x.permute(0, 2, 3, 1), normalized_shape, weight, bias, eps).permute(0, 3, 1, 2)
    return y if channels_last else y.contiguous()


torch.fx.wrap('layer_norm_channels')


def _scaled(scale: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Layer scale: x * scale per channel; None once fuse() has folded it into the preceding convolution."""
    return x if scale is None else scale.view(-1, 1, 1) * x


class ChannelScale(nn.Module):
    """x * scale per channel: Attention's shortcut after fuse() folded norm1 and layer_scale_1 away."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer('scale', scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _scaled(self.scale, x)


class DWConv(nn.Module):
    """Depth-wise 3x3 convolution of the MLP (kept as its own module for the `mlp.dwconv.dwconv` key)."""

    def __init__(self, dim: int = 768, device=None, dtype=None):
        super().__init__()
        self.dwconv = Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dwconv(x)


class Mlp(nn.Module):
    """1x1 conv -> depth-wise 3x3 conv -> GELU -> dropout -> 1x1 conv -> dropout."""

    def __init__(
            self,
            in_features: int,
            hidden_features: Optional[int] = None,
            out_features: Optional[int] = None,
            act_layer: type = nn.GELU,
            drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = Conv2d(in_features, hidden_features, 1, **dd)
        self.dwconv = DWConv(hidden_features, **dd)
        self.act = act_layer()
        self.fc2 = Conv2d(hidden_features, out_features, 1, **dd)
        self.drop = nn.Dropout(drop) if drop > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)  # B, hidden, H, W
        x = self.act(self.dwconv(x))
        x = self.drop(x)
        x = self.fc2(x)  # B, C, H, W
        return self.drop(x)


class LKA(nn.Module):
    """Large kernel attention: 5x5 depth-wise, 7x7 depth-wise dilated 3 (21x21 receptive field), 1x1, then gating."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv0 = Conv2d(dim, dim, 5, padding=2, groups=dim, **dd)
        self.conv_spatial = Conv2d(dim, dim, 7, stride=1, padding=9, groups=dim, dilation=3, **dd)
        self.conv1 = Conv2d(dim, dim, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.conv1(self.conv_spatial(self.conv0(x)))  # B, C, H, W attention map
        return x * attn


class Attention(nn.Module):
    """1x1 conv -> GELU -> LKA -> 1x1 conv, with its own residual connection (as in the reference).

    `shortcut` is the identity; fuse() makes it the per-channel scale that folding norm1 and the layer scale
    leaves on it."""

    def __init__(self, d_model: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.proj_1 = Conv2d(d_model, d_model, 1, **dd)
        self.activation = nn.GELU()
        self.spatial_gating_unit = LKA(d_model, **dd)
        self.proj_2 = Conv2d(d_model, d_model, 1, **dd)
        self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x))))
        return y + self.shortcut(x)


class Block(nn.Module):
    """BN -> Attention and BN -> Mlp, each scaled per channel (layer scale) and added with stochastic depth."""

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 4.,
            drop: float = 0.,
            drop_path: float = 0.,
            act_layer: type = nn.GELU,
            layer_scale_init_value: float = 1e-2,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = nn.BatchNorm2d(dim, **dd)
        self.attn = Attention(dim, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim, **dd)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop, **dd)
        self.layer_scale_1 = nn.Parameter(layer_scale_init_value * torch.ones(dim, **dd))
        self.layer_scale_2 = nn.Parameter(layer_scale_init_value * torch.ones(dim, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: B, C, H, W; layer scales broadcast over H, W
        x = x + self.drop_path(_scaled(self.layer_scale_1, self.attn(self.norm1(x))))
        x = x + self.drop_path(_scaled(self.layer_scale_2, self.mlp(self.norm2(x))))
        return x

    @torch.no_grad()
    def fuse_(self):
        """Fold norm1/norm2 (eval statistics) and the layer scales into the 1x1 convolutions, in place.

        x + ls1 * (proj_2(z) + s1 * x + t1), with z computed from proj_1(s1 * x + t1), becomes
        x + proj_2'(z) + (ls1 * s1) * x with proj_1' = proj_1(s1 * . + t1) and proj_2' = ls1 * (proj_2 + t1);
        x + ls2 * fc2(...fc1(s2 * x + t2)) becomes x + fc2'(...fc1'(x)).
        """
        s1, t1 = fast_ops.bn_affine(self.norm1)
        s2, t2 = fast_ops.bn_affine(self.norm2)
        ls1, ls2 = self.layer_scale_1.double(), self.layer_scale_2.double()
        fast_ops.fold_affine_into_input(self.attn.proj_1, s1, t1)
        fast_ops.scale_output(self.attn.proj_2, ls1, ls1 * t1)
        self.attn.shortcut = ChannelScale((ls1 * s1).to(self.layer_scale_1))
        fast_ops.fold_affine_into_input(self.mlp.fc1, s2, t2)
        fast_ops.scale_output(self.mlp.fc2, ls2)
        self.norm1, self.norm2 = nn.Identity(), nn.Identity()
        self.layer_scale_1 = self.layer_scale_2 = None


class OverlapPatchEmbed(nn.Module):
    """Strided conv (7x7/4 for the stem, 3x3/2 between stages) followed by BatchNorm."""

    def __init__(self, patch_size: int = 7, stride: int = 4, in_chans: int = 3, embed_dim: int = 768,
                 device=None, dtype=None):
        super().__init__()
        self.proj = Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2,
                           device=device, dtype=dtype)
        self.norm = nn.BatchNorm2d(embed_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))  # B, embed_dim, H / stride, W / stride

    @torch.no_grad()
    def fuse_(self):
        """Fold the BatchNorm (eval statistics) into the convolution before it, in place."""
        fast_ops.scale_output(self.proj, *fast_ops.bn_affine(self.norm))
        self.norm = nn.Identity()


class LayerNormChannels(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map; same parameters (and keys) as the reference's nn.LayerNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_channels(x, list(self.normalized_shape), self.weight, self.bias, self.eps)


# ---------------------------------------------------------------------------------------------------------- model

class VAN(nn.Module):
    """VAN: four stages of (overlapping patch embedding, LKA blocks, LayerNorm), mean pooling, linear head."""
    stage_modules: List[str]  # class-level annotations: TorchScript's types for the lists set in __init__
    stage_ends: List[str]

    def __init__(
            self,
            img_size: int = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dims: Tuple[int, ...] = (64, 128, 256, 512),
            mlp_ratios: Tuple[float, ...] = (4, 4, 4, 4),
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Any = partial(LayerNormChannels, eps=1e-6),
            depths: Tuple[int, ...] = (3, 4, 6, 3),
            num_stages: int = 4,
            global_pool: str = 'avg',
            fast_path: str = MODEL_DEFAULT_FAST_PATH,
            head_init_scale: float = 1.,
            device=None,
            dtype=None,
            **kwargs,
    ):
        """`img_size` is accepted for the reference's signature; VAN works at any input size.
        `drop_rate` is the MLP dropout, as in the reference (VAN has no dropout before the head).
        `fast_path` selects the kernels (see `set_fast_path`; 'auto' decides for a run of unknown length and size
        on the device the parameters are on); 'none', the default, runs the reference's ops.
        `head_init_scale` multiplies the freshly initialized head weight and bias (as timm's ConvNeXt)."""
        super().__init__()
        if kwargs:
            raise TypeError(f'VAN got unexpected keyword arguments: {sorted(kwargs)}')
        _check_global_pool(global_pool)
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size  # the input size 'auto' assumes when the job does not give one
        self.depths = tuple(depths)
        self.num_stages = num_stages
        self.embed_dims = tuple(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[num_stages - 1]
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.fused = False  # set on the inference-only copies that fuse() returns

        # stochastic depth decay rule (on cpu, so that building on the meta device works)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        cur = 0
        self.feature_info = []
        # What forward runs, in order: patch_embed1, block1, norm1, patch_embed2, ... (the official key names). Any
        # other child (the head, a module someone adds) is not part of the stages. Registration order is this order.
        self.stage_modules = []
        self.stage_ends = []  # the module of each stage whose output is the stage's output
        for i in range(num_stages):
            setattr(self, f'patch_embed{i + 1}', OverlapPatchEmbed(
                patch_size=7 if i == 0 else 3,
                stride=4 if i == 0 else 2,
                in_chans=in_chans if i == 0 else embed_dims[i - 1],
                embed_dim=embed_dims[i],
                **dd,
            ))
            setattr(self, f'block{i + 1}', nn.Sequential(*[
                Block(dim=embed_dims[i], mlp_ratio=mlp_ratios[i], drop=drop_rate, drop_path=dpr[cur + j], **dd)
                for j in range(depths[i])
            ]))
            setattr(self, f'norm{i + 1}', norm_layer(embed_dims[i], **dd))
            self.stage_modules += [f'patch_embed{i + 1}', f'block{i + 1}', f'norm{i + 1}']
            self.stage_ends.append(f'norm{i + 1}')
            cur += depths[i]
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f'norm{i + 1}'))

        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)
        self.fast_path = 'none'  # the one concrete mode the convolutions run ('auto' is resolved in set_fast_path)
        self._auto_job = None  # Optional[FastPathJob]: the job 'auto' was decided for; None: an explicit mode
        self.set_fast_path(fast_path)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # Layer scales are 1-D and thus already excluded by timm's weight-decay filter (as in the reference);
        # naming them here keeps them excluded for optimizers built without that filter.
        return {n for n, _ in self.named_parameters() if 'layer_scale' in n}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        # Groups for layer-wise lr decay (`--layer-decay`): stem, then one group per block (or stage).
        return dict(
            stem=r'^patch_embed1',
            blocks=[
                (r'^block(\d+)' if coarse else r'^block(\d+)\.(\d+)', None),
                (r'^patch_embed(\d+)', (0,)),
                (r'^norm(\d+)', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    # -------------------------------------------------------------------------------------- execution modes

    @torch.jit.ignore
    def set_fast_path(self, mode: str, job: Optional[FastPathJob] = None) -> 'VAN':
        """Select the kernels the modules run: one of `fast_path_modes()` (models/fast_ops.py documents them).

        'auto' is decided here, once, by `fast_ops.plan_auto` for `job` (None: a run of unknown length and
        input size, training or inference as the model is now, fp32, on the device of the parameters); the model
        keeps the concrete mode in `fast_path`. Moving the model to another device type (`.to()`, `.cuda()`)
        decides 'auto' again for that device; forward never changes the kernels. Parameters, buffers and
        state_dict keys are unchanged, so it may be called at any time (after `.to(device)`, before DDP or
        torch.compile wrap the model) and checkpoints stay official. Returns the model.
        """
        if job is None:
            job = FastPathJob(self._device_type(), kind='train' if self.training else 'infer')
        if mode == 'auto':
            job = self.complete_job(job)
        concrete = resolve_fast_path(mode, job)
        for m in self.modules():
            if isinstance(m, Conv2d):
                m.kernel = fast_ops.conv_kernel(m, concrete)
        self.fast_path = concrete
        self._auto_job = job if mode == 'auto' else None
        return self

    def _apply(self, fn, *args, **kwargs):
        # nn.Module.to / cuda / cpu / to_empty end here: a model that asked for 'auto' gets the decision for the
        # device type it is on now.
        module = super()._apply(fn, *args, **kwargs)
        job = getattr(self, '_auto_job', None)
        if job is not None and job.device_type != self._device_type():
            self.set_fast_path('auto', dataclasses.replace(job, device_type=self._device_type()))
        return module

    @torch.jit.ignore
    def complete_job(self, job: FastPathJob) -> FastPathJob:
        """`job` with what only the model knows: its GFLOPs per image and nhwc_lka's kernels for the job (their
        number, and whether Inductor's cache has them)."""
        sizes = self.conv_output_sizes(job.img_size or self.img_size)
        dtype = self._compute_dtype(job.precision)
        keys = fast_ops.lka_kernel_keys(sizes, job.batch_size or 32, dtype, job.kind == 'train')
        frozen = job.frozen_cached
        if job.can_freeze and frozen is None:
            frozen = tuple(m for m in fast_ops.FAST_PATH_MODES if m != 'auto' and fast_ops.kernels_cached(
                [fast_ops.frozen_graph_key(sizes, self.num_classes, job.batch_size or 32, dtype, m)]))
        return dataclasses.replace(
            job, gflops_per_image=job.gflops_per_image or fast_ops.forward_gflops(sizes), num_kernels=len(keys),
            kernels_cached=fast_ops.kernels_cached(keys) if job.kernels_cached is None else job.kernels_cached,
            num_convs=len(sizes), frozen_cached=frozen)

    @torch.jit.ignore
    def frozen_graph_key(self, img_size: int, batch_size: int, precision: str = 'float32') -> tuple:
        """The cache key of this model's frozen whole-model graph (`fast_ops.compile_inference`) in its current
        mode, for batches of `batch_size` images of `img_size` px in `precision`."""
        return fast_ops.frozen_graph_key(self.conv_output_sizes(img_size), self.num_classes, batch_size,
                                         self._compute_dtype(precision), self.fast_path)

    @torch.jit.ignore
    def _compute_dtype(self, precision: str) -> torch.dtype:
        """The dtype the convolutions compute in: the autocast precision, else the parameters' dtype."""
        return getattr(torch, precision) if precision != 'float32' else next(self.parameters()).dtype

    @torch.jit.ignore
    def auto_plan(self) -> Optional[fast_ops.AutoPlan]:
        """What 'auto' predicted for the job it was decided for (None: the mode was given explicitly)."""
        return fast_ops.plan_auto(self._auto_job) if self._auto_job is not None else None

    @torch.jit.ignore
    def conv_output_sizes(self, img_size: int) -> List[Tuple[Conv2d, int]]:
        """Every convolution with the side (px) of its output map for square img_size inputs: the patch
        embeddings downsample, everything inside a stage keeps the size."""
        sizes, side = [], img_size
        for i in range(self.num_stages):
            proj = getattr(self, f'patch_embed{i + 1}').proj
            side = (side + 2 * proj.padding[0] - proj.kernel_size[0]) // proj.stride[0] + 1
            sizes += [(m, side) for m in getattr(self, f'patch_embed{i + 1}').modules() if isinstance(m, Conv2d)]
            sizes += [(m, side) for m in getattr(self, f'block{i + 1}').modules() if isinstance(m, Conv2d)]
        return sizes

    @torch.jit.ignore
    def _device_type(self) -> str:
        return next(self.parameters()).device.type

    def fuse(self, nhwc: Optional[bool] = None) -> 'VAN':
        """An inference-only copy (eval, no grad; train() raises) with BatchNorm and layer scales folded into the
        convolutions of the same modules. Outputs equal this model's in eval mode (1e-5).

        nhwc=False: the reference's kernels (plain torch ops: traces for torch.jit.trace / ONNX);
        nhwc=True: this model's fast path ('nhwc' if it has none); None: this model's fast path as it is.
        This model is left unchanged.
        """
        mode = self.fast_path
        if nhwc is None:
            nhwc = mode != 'none'
        fused = copy.deepcopy(self)
        for m in fused.modules():
            if isinstance(m, (Block, OverlapPatchEmbed)):
                m.fuse_()
        fused.fused = True
        fused.requires_grad_(False)
        fused.eval()
        return fused.set_fast_path((mode if mode != 'none' else 'nhwc') if nhwc else 'none')

    def train(self, mode: bool = True) -> 'VAN':
        if mode and self.fused:
            raise RuntimeError('this VAN is inference-only (fuse() folded BatchNorm and layer scales): '
                               'train the unfused model')
        return super().train(mode)

    # ------------------------------------------------------------------------------------------- classifier

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """A new (freshly initialized) head on the model's device and dtype; `global_pool` None keeps the pooling."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _check_global_pool(global_pool)
        ref = next(self.parameters())
        if num_classes > 0:
            self.head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            _init_weights(self.head)
            self.head.train(self.training)
        else:
            self.head = nn.Identity()

    # ---------------------------------------------------------------------------------------------- forward

    def _forward_stages(self, x: torch.Tensor, take: List[int], last: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Run the stages (up to stage `last`, all if < 0): (features, the outputs of the stages in `take`).

        Runs the children named in `stage_modules` and no other, in registration order (which __init__ makes that
        list's order); iterating the children lets TorchScript unroll the loop.
        """
        intermediates: List[torch.Tensor] = []
        stage = 0
        for name, module in self.named_children():
            if name in self.stage_modules and (last < 0 or stage <= last):
                if torch.jit.is_scripting():
                    x = module(x)
                elif self.grad_checkpointing and torch.is_grad_enabled() and isinstance(module, nn.Sequential):
                    for blk in module:  # a stage's blocks, checkpointed one by one: recomputed in backward
                        x = checkpoint_module(blk, x)
                else:
                    x = module(x)
                if name in self.stage_ends:
                    if stage in take:
                        intermediates.append(x)
                    stage += 1
        return x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # x: B, in_chans, H, W -> B, embed_dims[-1], H / 32, W / 32
        return self._forward_stages(x, [], -1)[0]

    @torch.jit.ignore
    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's dense-task API: the stage outputs (each after its stage's LayerNorm, so `norm` changes nothing).

        indices: the last n stages if an int, all if None, else the stage indices; stop_early: stop after the
        last stage asked for; intermediates_only: return only the list. Output format NCHW only.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt {output_fmt!r}: VAN's intermediates are NCHW only")
        take_indices, max_index = _take_indices(self.num_stages, indices)
        x, intermediates = self._forward_stages(x, take_indices, max_index if stop_early else -1)
        return intermediates if intermediates_only else (x, intermediates)

    @torch.jit.ignore
    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Remove the stages after the last one `indices` asks for (and the head); returns the kept indices.

        `prune_norm` changes nothing: every stage's LayerNorm is part of the stage's output."""
        take_indices, max_index = _take_indices(self.num_stages, indices)
        prune_end = max_index < self.num_stages - 1
        for i in range(max_index + 2, self.num_stages + 1):
            for part in ('patch_embed', 'block', 'norm'):
                delattr(self, f'{part}{i}')
        self.num_stages = max_index + 1
        self.stage_modules = self.stage_modules[:3 * self.num_stages]
        self.stage_ends = self.stage_ends[:self.num_stages]
        if prune_end:  # the features now end at the last kept stage; the head was sized for the last one
            self.num_features = self.head_hidden_size = self.embed_dims[max_index]
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(2, 3))  # B, C
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_global_pool(global_pool: str) -> str:
    if global_pool not in ('avg', ''):
        raise ValueError(f"global_pool must be 'avg' or '' (none), got {global_pool!r}")
    return global_pool


def _take_indices(num_stages: int, indices: Optional[Union[int, List[int]]]) -> Tuple[List[int], int]:
    if feature_take_indices is None:
        raise RuntimeError('forward_intermediates / prune_intermediate_layers need timm >= 1.0')
    return feature_take_indices(num_stages, indices)


def _init_weights(m: nn.Module):
    """The reference's initialization: trunc-normal Linear, unit LayerNorm, He-normal (fan-out) Conv2d."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            m.bias.data.zero_()


@contextlib.contextmanager
def _bn_stats_frozen(module: nn.Module):
    """Training-mode BatchNorms in `module` still normalize with batch statistics (and save the same tensors for
    backward), but leave their running statistics and num_batches_tracked as they were: momentum 0 makes the
    running-stat update an exact no-op (r * 1 + 0 * batch), and num_batches_tracked is put back on exit.
    Used for the recomputation of a checkpointed block in backward."""
    saved = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    for m, _, _ in saved:
        m.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for m, momentum, n in saved:
                m.momentum = momentum
                if n is not None:
                    m.num_batches_tracked.copy_(n)


def checkpoint_module(module: nn.Module, *args):
    """Non-reentrant activation checkpointing of `module(*args)`.

    The recomputation in backward does not update `module`'s BatchNorm running statistics a second time, so a
    training step gives the same gradients and the same BN buffers as without checkpointing.
    """
    return checkpoint(module, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _bn_stats_frozen(module)))


# ----------------------------------------------------------------------------------------------------- checkpoints

def checkpoint_filter_fn(state_dict: Any, model: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """The official files (and those of the reference's / this project's train.py) as VAN's state dict.

    Accepts a bare state dict or a dict holding one under `state_dict`, `model` or `state_dict_ema` (tried in
    that order: models/_helpers.state_dict_of), and removes any leading `module.` / `_orig_mod.` (DDP,
    torch.compile) from the keys; the key layout is otherwise the official one. Pure: reads no file. timm's pretrained loading calls it.
    """
    return state_dict_of(state_dict, ema='never')  # the one rule for which weights a file holds


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.9, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed1.proj', 'classifier': 'head',
        'license': 'apache-2.0',
        **kwargs,
    }


_HF = 'https://huggingface.co/Visual-Attention-Network/{}/resolve/main/{}'
default_cfgs = {
    'van_b0': _cfg(url=_HF.format('VAN-Tiny-original', 'van_tiny_754.pth.tar')),
    'van_b1': _cfg(url=_HF.format('VAN-Small-original', 'van_small_811.pth.tar')),
    'van_b2': _cfg(url=_HF.format('VAN-Base-original', 'van_base_828.pth.tar')),
    'van_b3': _cfg(url=_HF.format('VAN-Large-original', 'van_large_839.pth.tar')),
    'van_b4': _cfg(),
    'van_b5': _cfg(),
    'van_b6': _cfg(),
}
# The port's names for b0..b3 share the official weights.
_ALIASES = {'van_tiny': 'van_b0', 'van_small': 'van_b1', 'van_base': 'van_b2', 'van_large': 'van_b3'}
default_cfgs.update({alias: default_cfgs[target] for alias, target in _ALIASES.items()})

# Architecture of each variant: embed_dims, mlp_ratios, depths.
_ARCHS = {
    'van_b0': dict(embed_dims=(32, 64, 160, 256), mlp_ratios=(8, 8, 4, 4), depths=(3, 3, 5, 2)),
    'van_b1': dict(embed_dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4), depths=(2, 2, 4, 2)),
    'van_b2': dict(embed_dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4), depths=(3, 3, 12, 3)),
    'van_b3': dict(embed_dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4), depths=(3, 5, 27, 3)),
    'van_b4': dict(embed_dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4), depths=(3, 6, 40, 3)),
    'van_b5': dict(embed_dims=(96, 192, 480, 768), mlp_ratios=(8, 8, 4, 4), depths=(3, 3, 24, 3)),
    'van_b6': dict(embed_dims=(96, 192, 384, 768), mlp_ratios=(8, 8, 4, 4), depths=(6, 6, 90, 6)),
}
VAN_NAMES = tuple(_ARCHS) + tuple(_ALIASES)


def _block_counts(state_dict: Dict[str, Any]) -> tuple:
    """Blocks per stage: the number of distinct `blockN.<i>.` indices for N = 1..4."""
    counts = []
    for stage in range(1, 5):
        prefix = f'block{stage}.'
        counts.append(len({k[len(prefix):].split('.', 1)[0] for k in state_dict if k.startswith(prefix)}))
    return tuple(counts)


def infer_variant(state_dict: Dict[str, Any]) -> Optional[str]:
    """The VAN variant (van_b0..van_b6) whose embedding widths and depths this state dict has, or None."""
    widths = []
    for stage in range(1, 5):
        w = state_dict.get(f'patch_embed{stage}.proj.weight')
        if not isinstance(w, torch.Tensor) or w.dim() != 4:
            return None
        widths.append(int(w.shape[0]))
    depths = _block_counts(state_dict)
    for name, arch in _ARCHS.items():
        if tuple(arch['embed_dims']) == tuple(widths) and tuple(arch['depths']) == depths:
            return name
    return None


def canonical_variant(name: str) -> str:
    """van_b0..van_b6 for a VAN name or one of the port's aliases (van_tiny/small/base/large); others unchanged."""
    return _ALIASES.get(name, name)


def _create_van(variant: str, pretrained: bool = False, **kwargs) -> VAN:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    arch = dict(_ARCHS[_ALIASES.get(variant, variant)], **kwargs)
    try:
        return build_model(
            VAN, variant, default_cfgs[variant], pretrained=pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=out_indices),
            **arch,
        )
    except urllib.error.URLError as e:  # the official weights could not be downloaded: say what to do instead
        url = default_cfgs[variant]['url']
        raise RuntimeError(
            f'could not download the pretrained weights of {variant} ({e}). Download {url} yourself and pass '
            f'pretrained_cfg_overlay=dict(file=PATH) (train.py: --pretrained-path PATH)') from e


@register_model
def van_b0(pretrained: bool = False, **kwargs) -> VAN:
    return _create_van('van_b0', pretrained=pretrained, **kwargs)


@register_model
def van_b1(pretrained: bool = False, **kwargs) -> VAN:
    return _create_van('van_b1', pretrained=pretrained, **kwargs)


@register_model
def van_b2(pretrained: bool = False, **kwargs) -> VAN:
    return _create_van('van_b2', pretrained=pretrained, **kwargs)


@register_model
def van_b3(pretrained: bool = False, **kwargs) -> VAN:
    return _create_van('van_b3', pretrained=pretrained, **kwargs)


@register_model
def van_b4(pretrained: bool = False, **kwargs) -> VAN:
    return _create_van('van_b4', pretrained=pretrained, **kwargs)


@register_model
def van_b5(pretrained: bool = False, **kwargs) -> VAN:
    return _create_van('van_b5', pretrained=pretrained, **kwargs)


@register_model
def van_b6(pretrained: bool = False, **kwargs) -> VAN:
    return _create_van('van_b6', pretrained=pretrained, **kwargs)


@register_model
def van_tiny(pretrained: bool = False, **kwargs) -> VAN:
    return _create_van('van_tiny', pretrained=pretrained, **kwargs)


@register_model
def van_small(pretrained: bool = False, **kwargs) -> VAN:
    return _create_van('van_small', pretrained=pretrained, **kwargs)


@register_model
def van_base(pretrained: bool = False, **kwargs) -> VAN:
    return _create_van('van_base', pretrained=pretrained, **kwargs)


@register_model
def van_large(pretrained: bool = False, **kwargs) -> VAN:
    return _create_van('van_large', pretrained=pretrained, **kwargs)
