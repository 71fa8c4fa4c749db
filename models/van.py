""" Visual Attention Network (VAN)

Paper: "Visual Attention Network", Guo et al., https://arxiv.org/abs/2202.09741
Reference: VAN-Classification (Apache-2.0), as ported to Ascend NPUs by the Ascend ModelZoo.

Module names are those of the official checkpoints (`patch_embed1.proj`, `block1.0.attn.spatial_gating_unit.conv0`,
`norm1`, `head`, ...), so the official `.pth.tar` files load with strict key matching, and the network computes
what the reference computes. Differences from the reference that do not change the numbers:
  * no `x.clone()` in forward: the residual inputs are never modified in place, so a plain reference suffices;
  * the per-stage LayerNorm normalizes an NCHW map over its channels through a permuted view
    (`LayerNormChannels`), instead of flatten -> transpose -> LayerNorm -> reshape -> permute -> contiguous.
    On a channels_last tensor that view is contiguous and no copy is made at all; on an NCHW tensor
    F.layer_norm makes the one copy it needs. The reference makes two extra full-tensor copies per stage;
  * the blocks of a stage live in an `nn.Sequential` (keys identical to the reference's ModuleList), which
    lets timm's `features_only` and `checkpoint_seq` walk them;
  * `reset_classifier` works (the reference's reads an attribute that does not exist).
"""
import contextlib
import math
import os
from functools import partial
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .timm_compat import DropPath, build_model, register_model, trunc_normal_  # timm 0.4.12 .. 1.x

from .fast_ops import check_fast_path, fast_path_modes, forward_features_nhwc, fuse_van, resolve_fast_path

__all__ = ['VAN', 'checkpoint_filter_fn', 'clean_state_dict', 'load_checkpoint_file', 'VAN_NAMES', 'fast_path_modes']

# Prefixes that wrappers add to every key: DDP (`module.`) and torch.compile (`_orig_mod.`).
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')


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


def checkpoint_module(module: nn.Module, *args, fn=None):
    """Non-reentrant activation checkpointing of `fn(*args)` (default `module(*args)`).

    The recomputation in backward does not update `module`'s BatchNorm running statistics a second time, so a
    training step gives the same gradients and the same BN buffers as without checkpointing.
    """
    return checkpoint(fn or module, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _bn_stats_frozen(module)))


class DWConv(nn.Module):
    """Depth-wise 3x3 convolution of the MLP (kept as its own module for the `mlp.dwconv.dwconv` key)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dwconv(x)


class Mlp(nn.Module):
    """1x1 conv -> depth-wise 3x3 conv -> GELU -> dropout -> 1x1 conv -> dropout (all on NCHW maps)."""

    def __init__(
            self,
            in_features: int,
            hidden_features: Optional[int] = None,
            out_features: Optional[int] = None,
            act_layer: type = nn.GELU,
            drop: float = 0.,
    ):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.dwconv = DWConv(hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden_features, out_features, 1)
        self.drop = nn.Dropout(drop) if drop > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)  # B, hidden, H, W
        x = self.act(self.dwconv(x))
        x = self.drop(x)
        x = self.fc2(x)  # B, C, H, W
        return self.drop(x)


class LKA(nn.Module):
    """Large kernel attention: 5x5 depth-wise, 7x7 depth-wise dilated 3 (21x21 receptive field), 1x1, then gating."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv_spatial = nn.Conv2d(dim, dim, 7, stride=1, padding=9, groups=dim, dilation=3)
        self.conv1 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.conv1(self.conv_spatial(self.conv0(x)))  # B, C, H, W attention map
        return x * attn


class Attention(nn.Module):
    """1x1 conv -> GELU -> LKA -> 1x1 conv, with its own residual connection (as in the reference)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.proj_1 = nn.Conv2d(d_model, d_model, 1)
        self.activation = nn.GELU()
        self.spatial_gating_unit = LKA(d_model)
        self.proj_2 = nn.Conv2d(d_model, d_model, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.activation(self.proj_1(x))
        x = self.proj_2(self.spatial_gating_unit(x))
        return x + shortcut


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
    ):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = Attention(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.layer_scale_1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: B, C, H, W; layer scales broadcast over H, W as (C, 1, 1)
        x = x + self.drop_path(self.layer_scale_1.unsqueeze(-1).unsqueeze(-1) * self.attn(self.norm1(x)))
        x = x + self.drop_path(self.layer_scale_2.unsqueeze(-1).unsqueeze(-1) * self.mlp(self.norm2(x)))
        return x


class OverlapPatchEmbed(nn.Module):
    """Strided conv (7x7/4 for the stem, 3x3/2 between stages) followed by BatchNorm."""

    def __init__(self, patch_size: int = 7, stride: int = 4, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.BatchNorm2d(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))  # B, embed_dim, H / stride, W / stride


class LayerNormChannels(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map; same parameters (and keys) as the reference's nn.LayerNorm.

    Normalizes through an NHWC view. On channels_last input that view is contiguous: no copy at all (the
    reference's flatten/transpose/LayerNorm/reshape/permute/contiguous makes three). On NCHW input the output is
    made NCHW-contiguous again, two copies as in the reference: keeping the input's memory format keeps the next
    stage's convolutions (and DDP's gradient buckets) in one layout instead of silently switching to channels_last.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)  # B,H,W,C
        x = x.permute(0, 3, 1, 2)  # B, C, H, W (channels_last strides)
        return x if channels_last else x.contiguous()


class VAN(nn.Module):
    """VAN: four stages of (overlapping patch embedding, LKA blocks, LayerNorm), mean pooling, linear head."""

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
            fast_path: str = 'none',
            **kwargs,
    ):
        """`img_size` is accepted for the reference's signature; VAN works at any input size.
        `drop_rate` is the MLP dropout, as in the reference (VAN has no dropout before the head).
        `fast_path` selects the execution mode (see `set_fast_path`); 'none' runs the reference's ops."""
        super().__init__()
        if kwargs:
            raise TypeError(f'VAN got unexpected keyword arguments: {sorted(kwargs)}')
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '' (none), got {global_pool!r}")
        self.num_classes = num_classes
        self.depths = tuple(depths)
        self.num_stages = num_stages
        self.embed_dims = tuple(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[num_stages - 1]
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.fast_path = check_fast_path(fast_path)

        # stochastic depth decay rule (on cpu, so that building on the meta device works)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        cur = 0
        self.feature_info = []
        for i in range(num_stages):
            patch_embed = OverlapPatchEmbed(
                patch_size=7 if i == 0 else 3,
                stride=4 if i == 0 else 2,
                in_chans=in_chans if i == 0 else embed_dims[i - 1],
                embed_dim=embed_dims[i],
            )
            block = nn.Sequential(*[
                Block(dim=embed_dims[i], mlp_ratio=mlp_ratios[i], drop=drop_rate, drop_path=dpr[cur + j])
                for j in range(depths[i])
            ])
            norm = norm_layer(embed_dims[i])
            cur += depths[i]
            setattr(self, f'patch_embed{i + 1}', patch_embed)
            setattr(self, f'block{i + 1}', block)
            setattr(self, f'norm{i + 1}', norm)
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f'norm{i + 1}'))

        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

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

    def set_fast_path(self, mode: str = 'auto') -> 'VAN':
        """Select how the same modules execute: one of `fast_path_modes()` (models/fast_ops.py documents them).

        A runtime mode only: parameters, buffers and state_dict keys are unchanged, so it may be called at any
        time (after `.to(device)`, before DDP or torch.compile wrap the model) and checkpoints stay official.
        'auto' is resolved per call from the input's device type. Returns the model.
        """
        self.fast_path = check_fast_path(mode)
        return self

    def fuse(self, nhwc: Optional[bool] = None) -> nn.Module:
        """An inference-only copy (eval, no grad) with BatchNorm and layer scales folded into the convolutions.

        Outputs equal this model's in eval mode (1e-5); the copy is built from plain ops and traces for ONNX.
        nhwc=None follows this model's fast path (NHWC unless 'none'); this model is left unchanged.
        """
        return fuse_van(self, nhwc=nhwc)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('avg', ''):
                raise ValueError(f"global_pool must be 'avg' or '' (none), got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            _init_weights(self.head)

    def _run_blocks(self, blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
            # Activation checkpointing per block: recompute each block in backward; same gradients.
            for blk in blocks:
                x = checkpoint_module(blk, x)
            return x
        return blocks(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # x: B, in_chans, H, W -> B, embed_dims[-1], H / 32, W / 32
        mode = resolve_fast_path(self.fast_path, x.device.type)
        if mode != 'none':
            # Same modules executed on NHWC tensors; returns a (channels_last) NCHW view with the same values.
            checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
            return forward_features_nhwc(self, x, mode, checkpoint_fn=checkpoint_module if checkpointing else None)
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f'patch_embed{i}')(x)  # B, C_i, H / (4 * 2**(i-1)), W / ...
            x = self._run_blocks(getattr(self, f'block{i}'), x)
            x = getattr(self, f'norm{i}')(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(2, 3))  # B, C
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


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


def clean_state_dict(checkpoint: Any) -> Dict[str, torch.Tensor]:
    """The one place that unwraps a checkpoint and strips wrapper prefixes for the whole project.

    Accepts a bare state dict or a dict holding one under `state_dict`, `model` or `state_dict_ema`
    (tried in that order), and removes any leading `module.` / `_orig_mod.` (DDP, torch.compile) from keys.
    """
    if isinstance(checkpoint, dict):
        for key in ('state_dict', 'model', 'state_dict_ema'):  # as documented above
            if key in checkpoint and isinstance(checkpoint[key], dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(k, str) for k in checkpoint):
        raise ValueError(f'not a state dict: expected a dict of tensors, got {type(checkpoint).__name__}')
    out = {}
    for k, v in checkpoint.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if k.startswith(prefix):
                    k = k[len(prefix):]
                    stripped = True
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: Any, model: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """timm's hook for pretrained weights: the official files need only unwrapping and prefix stripping."""
    return clean_state_dict(state_dict)


def load_state_dict_checked(
        model: nn.Module,
        state_dict: Dict[str, torch.Tensor],
        source: str = 'checkpoint',
        drop_head: bool = False,
):
    """Load `state_dict` strictly; with `drop_head`, the classifier is left as initialized and the rest strict.

    Errors name the source and list every missing, unexpected or mis-shaped key, so a file of another variant
    or another number of classes says exactly what does not fit.
    """
    state_dict = clean_state_dict(state_dict)
    if drop_head:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith('head.')}
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not (drop_head and k.startswith('head.'))]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f'{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}'
        for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f'{source} does not fit {type(model).__name__}'
                 f' ({getattr(model, "pretrained_cfg", {}).get("architecture", "?")}):']
        for title, keys in (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatch', mismatched)):
            if keys:
                shown = ', '.join(keys[:12]) + (f', ... ({len(keys) - 12} more)' if len(keys) > 12 else '')
                lines.append(f'  {title} ({len(keys)}): {shown}')
        raise RuntimeError('\n'.join(lines))
    model.load_state_dict(state_dict, strict=not drop_head)


def load_checkpoint_file(path: str, trust: bool = False) -> Any:
    """torch.load a checkpoint safely: weights_only unless the user explicitly trusts the file.

    Raises ValueError naming the file when it is unreadable or needs full unpickling.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if path.endswith('.safetensors'):  # export.py's format: a flat state dict, never unpickled
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f'{path}: loading .safetensors files needs the safetensors package') from None
        try:
            return load_file(path, device='cpu')
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
            raise ValueError(f'{path}: not a readable safetensors file ({type(e).__name__}: {e})') from None
    try:
        return torch.load(path, map_location='cpu', weights_only=not trust)
    except Exception as e:  # noqa: BLE001 - torch raises many types (UnpicklingError, RuntimeError, EOFError)
        text = str(e)
        if not trust and 'Weights only load failed' in text:
            # Name the offending global (e.g. "GLOBAL io.open was not an allowed global") rather than torch's essay.
            culprit = next((line.strip() for line in text.splitlines() if 'GLOBAL' in line), 'unsupported content')
            raise ValueError(
                f'{path}: refused to load: it needs full unpickling, which can run arbitrary code ({culprit[:200]}). '
                f'If you trust the file, pass --trust-checkpoint.') from None
        msg = text.splitlines()[0][:300] if text else type(e).__name__
        raise ValueError(f'{path}: not a readable checkpoint ({type(e).__name__}: {msg})') from None


def _load_pretrained(model: VAN, pretrained_cfg: Dict[str, Any], num_classes: int, trust: bool = False):
    """Load the official weights from `pretrained_cfg['file']` or the official URL through torch.hub's cache.

    With num_classes != the file's, the head is dropped (left freshly initialized) and the rest loads strictly.
    """
    file = pretrained_cfg.get('file')
    url = pretrained_cfg.get('url')
    if file:
        checkpoint = load_checkpoint_file(file, trust=trust)
        source = file
    elif url:
        filename = os.path.basename(url)
        cached = os.path.join(torch.hub.get_dir(), 'checkpoints', filename)
        if not os.path.isfile(cached):
            try:
                os.makedirs(os.path.dirname(cached), exist_ok=True)  # a fresh hub dir has no checkpoints/ yet
                torch.hub.download_url_to_file(url, cached, progress=False)
            except Exception as e:  # noqa: BLE001 - URLError, HTTPError, socket errors, ...
                raise RuntimeError(
                    f'could not download the pretrained weights for {pretrained_cfg.get("architecture")} '
                    f'({type(e).__name__}: {e}). Download {url} yourself and either put it at {cached} or pass '
                    f'--pretrained-path {filename} (pretrained_cfg_overlay=dict(file=PATH) in Python).') from None
        checkpoint = load_checkpoint_file(cached, trust=trust)
        source = cached
    else:
        raise RuntimeError(
            f'no pretrained weights are published for {pretrained_cfg.get("architecture")}: '
            f'pass a file with pretrained_cfg_overlay=dict(file=PATH) (train.py: --pretrained-path PATH)')
    state_dict = checkpoint_filter_fn(checkpoint, model)
    drop_head = num_classes != pretrained_cfg.get('num_classes', 1000)
    if drop_head:  # ...unless the file's head already fits (a fine-tuned model, e.g. export.py's .safetensors)
        head, own = state_dict.get('head.weight'), model.state_dict().get('head.weight')
        drop_head = head is None or own is None or tuple(head.shape) != tuple(own.shape)
    load_state_dict_checked(model, state_dict, source=source, drop_head=drop_head)


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
default_cfgs.update({alias: default_cfgs[target] for alias, target in (
    ('van_tiny', 'van_b0'), ('van_small', 'van_b1'), ('van_base', 'van_b2'), ('van_large', 'van_b3'))})

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
_ALIASES = {'van_tiny': 'van_b0', 'van_small': 'van_b1', 'van_base': 'van_b2', 'van_large': 'van_b3'}
VAN_NAMES = tuple(_ARCHS) + tuple(_ALIASES)


def _create_van(variant: str, pretrained: bool = False, **kwargs) -> VAN:
    trust = kwargs.pop('trust_checkpoint', False)
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    arch = dict(_ARCHS[_ALIASES.get(variant, variant)])
    arch.update(kwargs)
    model = build_model(
        VAN, variant, default_cfgs[variant],  # weights are loaded below, with errors that say what to do
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices),
        **arch,
    )
    if pretrained:
        if arch.get('features_only'):
            raise ValueError('pretrained=True with features_only=True: load the weights into the classifier '
                             'model first (timm.create_model(name, pretrained=True)), then extract features')
        _load_pretrained(model, model.pretrained_cfg, num_classes=model.num_classes, trust=trust)
    return model


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
