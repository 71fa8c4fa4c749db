"""An independent re-implementation of the reference VAN, written from /work/shared/reference/VAN.md.

This is the test oracle for models/van.py: it follows the reference's own structure (ModuleList blocks,
OverlapPatchEmbed returning (x, H, W), `x.clone()` shortcuts, the per-stage LayerNorm applied on a
flattened (B, H*W, C) sequence and reshaped back, the last stage's LayerNorm followed by a mean over
the sequence) and uses plain torch modules only (plus timm's DropPath). It has no timm registry entry,
no gradient checkpointing and no feature extraction: it only has to compute what the reference computes.
"""
import math

import torch
import torch.nn as nn
try:
    from timm.layers import DropPath
except ImportError:  # timm < 0.9 (the legacy-timm CI pass, .ci/legacy_timm.sh)
    from timm.models.layers import DropPath

# Architecture of each variant (VAN.md, "Variants"): embed_dims, mlp_ratios, depths.
REF_ARCHS = {
    'van_b0': dict(embed_dims=[32, 64, 160, 256], mlp_ratios=[8, 8, 4, 4], depths=[3, 3, 5, 2]),
    'van_b1': dict(embed_dims=[64, 128, 320, 512], mlp_ratios=[8, 8, 4, 4], depths=[2, 2, 4, 2]),
    'van_b2': dict(embed_dims=[64, 128, 320, 512], mlp_ratios=[8, 8, 4, 4], depths=[3, 3, 12, 3]),
    'van_b3': dict(embed_dims=[64, 128, 320, 512], mlp_ratios=[8, 8, 4, 4], depths=[3, 5, 27, 3]),
    'van_b4': dict(embed_dims=[64, 128, 320, 512], mlp_ratios=[8, 8, 4, 4], depths=[3, 6, 40, 3]),
    'van_b5': dict(embed_dims=[96, 192, 480, 768], mlp_ratios=[8, 8, 4, 4], depths=[3, 3, 24, 3]),
    'van_b6': dict(embed_dims=[96, 192, 384, 768], mlp_ratios=[8, 8, 4, 4], depths=[6, 6, 90, 6]),
}


class RefDWConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim, bias=True)

    def forward(self, x):
        return self.dwconv(x)


class RefMlp(nn.Module):
    def __init__(self, in_features, hidden_features, drop=0.):
        super().__init__()
        self.fc1 = nn.Conv2d(in_features, hidden_features, kernel_size=1)
        self.dwconv = RefDWConv(hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_features, in_features, kernel_size=1)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.dwconv(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x


class RefLKA(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, kernel_size=5, padding=2, groups=dim)
        self.conv_spatial = nn.Conv2d(dim, dim, kernel_size=7, stride=1, padding=9, dilation=3, groups=dim)
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=1)

    def forward(self, x):
        u = x.clone()
        attn = self.conv0(x)
        attn = self.conv_spatial(attn)
        attn = self.conv1(attn)
        return u * attn


class RefAttention(nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.proj_1 = nn.Conv2d(d_model, d_model, kernel_size=1)
        self.activation = nn.GELU()
        self.spatial_gating_unit = RefLKA(d_model)
        self.proj_2 = nn.Conv2d(d_model, d_model, kernel_size=1)

    def forward(self, x):
        shortcut = x.clone()
        x = self.proj_1(x)
        x = self.activation(x)
        x = self.spatial_gating_unit(x)
        x = self.proj_2(x)
        x = x + shortcut
        return x


class RefBlock(nn.Module):
    def __init__(self, dim, mlp_ratio=4., drop=0., drop_path=0.):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = RefAttention(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = RefMlp(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=drop)
        self.layer_scale_1 = nn.Parameter(1e-2 * torch.ones(dim), requires_grad=True)
        self.layer_scale_2 = nn.Parameter(1e-2 * torch.ones(dim), requires_grad=True)

    def forward(self, x):
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.attn(self.norm1(x)))
        x = x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x)))
        return x


class RefOverlapPatchEmbed(nn.Module):
    def __init__(self, patch_size=7, stride=4, in_chans=3, embed_dim=768):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride,
                              padding=patch_size // 2)
        self.norm = nn.BatchNorm2d(embed_dim)

    def forward(self, x):
        x = self.proj(x)
        _, _, H, W = x.shape
        x = self.norm(x)
        return x, H, W


class RefVAN(nn.Module):
    def __init__(self, img_size=224, in_chans=3, num_classes=1000, embed_dims=(64, 128, 256, 512),
                 mlp_ratios=(4, 4, 4, 4), drop_rate=0., drop_path_rate=0., depths=(3, 4, 6, 3), num_stages=4):
        super().__init__()
        self.num_classes = num_classes
        self.depths = depths
        self.num_stages = num_stages

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device='cpu')]
        cur = 0
        for i in range(num_stages):
            patch_embed = RefOverlapPatchEmbed(
                patch_size=7 if i == 0 else 3,
                stride=4 if i == 0 else 2,
                in_chans=in_chans if i == 0 else embed_dims[i - 1],
                embed_dim=embed_dims[i])
            block = nn.ModuleList([
                RefBlock(dim=embed_dims[i], mlp_ratio=mlp_ratios[i], drop=drop_rate, drop_path=dpr[cur + j])
                for j in range(depths[i])])
            norm = nn.LayerNorm(embed_dims[i], eps=1e-6)
            cur += depths[i]
            setattr(self, f'patch_embed{i + 1}', patch_embed)
            setattr(self, f'block{i + 1}', block)
            setattr(self, f'norm{i + 1}', norm)

        self.head = nn.Linear(embed_dims[3], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            fan_out //= m.groups
            m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                m.bias.data.zero_()

    def forward_features(self, x):
        B = x.shape[0]
        for i in range(self.num_stages):
            patch_embed = getattr(self, f'patch_embed{i + 1}')
            block = getattr(self, f'block{i + 1}')
            norm = getattr(self, f'norm{i + 1}')
            x, H, W = patch_embed(x)
            for blk in block:
                x = blk(x)
            x = x.flatten(2).transpose(1, 2)  # B, H*W, C
            x = norm(x)
            if i != self.num_stages - 1:
                x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
        return x.mean(dim=1)  # B, C

    def forward(self, x):
        x = self.forward_features(x)
        x = self.head(x)
        return x


def ref_van(variant, **kwargs):
    """Build the reference network of `variant` ('van_b0'..'van_b6')."""
    arch = dict(REF_ARCHS[variant])
    arch.update(kwargs)
    return RefVAN(**arch)
