"""The few timm APIs that moved between timm 0.4.12 (the reference's release, pinned in 1.5/1.8_requirements.txt)
and timm 1.x, behind one feature-checked interface. Nothing here is chosen by version number: each shim looks
for the API it needs (a module, a function, a parameter name) and falls back to the older form.
Tested with timm 0.4.12 (tests/test_model.py, tests/test_train*.py, tests/test_timm_compat.py under
.ci/legacy_timm.sh) and timm 1.0.x (the whole suite); releases in between are not tested.

What differs, and where it is used:
  * `timm.layers` (0.9+) vs `timm.models.layers`                          models/van.py
  * `build_model_with_cfg(..., pretrained_cfg via kwargs)` (0.6+) vs `(..., default_cfg)` in timm.models.helpers,
    `pretrained_cfg_overlay` (consumed by timm.create_model in 0.9+, passed to the model fn before), and
    pretrained weights from a `file` (0.9+; URL only before)                models/van.py
  * `feature_take_indices` (1.x; no forward_intermediates API before)    models/van.py
  * `resolve_data_config(args, pretrained_cfg=)` vs `(args, default_cfg=)`, `in_chans` vs `chans`
                                                                          vancls/builders.py
  * `create_scheduler_v2` (0.5.5+) vs `create_scheduler(args, optimizer)`   train.py
  * `create_optimizer_v2(model, opt=, lr=, layer_decay=)` vs `(model, optimizer_name=, learning_rate=)`,
    `list_optimizers` (1.0+)                                             vancls/builders.py
  * `Mixup.__call__` builds its targets on the input's device vs on 'cuda' (0.4.12)     vancls/builders.py
  * `BinaryCrossEntropy` (0.5+)                                           vancls/builders.py
  * `PrefetchLoader(..., channels=, device=)` vs a CUDA-only PrefetchLoader          vancls/data.py
"""
import argparse
import contextlib
import inspect
import warnings
from types import SimpleNamespace
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

with warnings.catch_warnings():
    # timm < 0.9 scripts a few activation functions with torch.jit.script when it is imported, which torch >= 2.9
    # deprecates with a FutureWarning on stderr: keep the CLIs' stderr to their own messages (imported first by
    # models/__init__.py, so this is where timm is imported).
    warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)
    try:  # timm >= 0.9
        from timm.layers import DropPath, trunc_normal_  # noqa: F401
    except ImportError:  # timm 0.4 - 0.8
        from timm.models.layers import DropPath, trunc_normal_  # noqa: F401

    from timm.models import register_model  # noqa: F401 (every release)

    try:  # timm >= 0.9 exports it at the package level
        from timm.models import build_model_with_cfg
    except ImportError:  # timm 0.4 - 0.8
        from timm.models.helpers import build_model_with_cfg

__all__ = ['DropPath', 'trunc_normal_', 'register_model', 'build_model', 'feature_take_indices',
           'reference_checkpoint_globals', 'resolve_data_config', 'create_scheduler', 'create_optimizer',
           'list_optimizers', 'create_mixup', 'binary_cross_entropy_cls', 'prefetch_loader', 'LEGACY_BUILD']


def _params(fn: Callable) -> set:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


# timm 0.4/0.5 take the model's config as the positional `default_cfg` and know nothing of pretrained_cfg.
LEGACY_BUILD = 'default_cfg' in _params(build_model_with_cfg)

try:  # timm 1.x: the index helper of forward_intermediates / prune_intermediate_layers
    from timm.models._features import feature_take_indices
except ImportError:  # older timm has no forward_intermediates API
    feature_take_indices = None


@contextlib.contextmanager
def reference_checkpoint_globals():
    """Let torch.load(weights_only=True) accept the one harmless non-tensor type of timm-saver checkpoints (the
    reference's and the official files): argparse.Namespace under `args`. timm 1.x allows it for local files
    itself, not for URLs. Torch without safe_globals (< 2.5) loads as it would without this."""
    safe_globals = getattr(torch.serialization, 'safe_globals', None)
    with (safe_globals([argparse.Namespace]) if safe_globals is not None else contextlib.nullcontext()):
        yield


def build_model(model_cls: type, variant: str, default_cfg: Dict[str, Any], pretrained: bool = False,
                feature_cfg: Optional[dict] = None, pretrained_filter_fn: Optional[Callable] = None,
                **kwargs) -> nn.Module:
    """timm's build_model_with_cfg on every timm; `model.pretrained_cfg` is a dict-like config on every timm.

    Pretrained weights are loaded by timm (the URL, `pretrained_cfg_overlay=dict(file=PATH)` or
    `dict(state_dict=...)`), which filters them with `pretrained_filter_fn`, adapts the input conv to `in_chans`
    and drops the classifier when `num_classes` differs from the config's. timm < 0.6 loads neither files nor
    state dicts: `_load_file_legacy` does the same steps there.
    """
    model = _build_model(model_cls, variant, default_cfg, pretrained, feature_cfg, pretrained_filter_fn, **kwargs)
    for attr in ('pretrained_cfg', 'default_cfg'):  # a state dict given in the overlay is loaded: do not keep it
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict):
            cfg.pop('state_dict', None)
    return model


def _build_model(model_cls, variant, default_cfg, pretrained, feature_cfg, pretrained_filter_fn, **kwargs):
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    if pretrained and overlay.get('state_dict') is None and (LEGACY_BUILD or
                                                              not hasattr(torch.serialization, 'safe_globals')):
        # timm < 0.6 reads no files, and torch < 2.5 cannot allow argparse.Namespace in weights_only loading (the
        # reference's and the official files hold one): the project's reader does, and timm gets a state dict.
        url = dict(default_cfg, **overlay).get('url')
        path = overlay.get('file') or (url and _download_cached(url))
        if path:
            kwargs['pretrained_cfg_overlay'] = dict(overlay, state_dict=_read_weights_file(path))
    if not LEGACY_BUILD:  # timm >= 0.9 applies pretrained_cfg_overlay itself
        with reference_checkpoint_globals():
            return build_model_with_cfg(model_cls, variant, pretrained=pretrained,
                                        pretrained_filter_fn=pretrained_filter_fn, feature_cfg=feature_cfg, **kwargs)
    overlay = kwargs.pop('pretrained_cfg_overlay', None)
    cfg = dict(default_cfg, **(overlay or {}))
    cfg.setdefault('architecture', variant)
    kwargs.pop('pretrained_cfg', None)
    from_file = pretrained and cfg.get('state_dict') is not None
    if from_file and kwargs.get('features_only'):
        raise ValueError('features_only=True with a pretrained file needs timm >= 0.9 (this is timm 0.4/0.5)')
    with reference_checkpoint_globals():
        model = build_model_with_cfg(model_cls, variant, pretrained and not from_file, default_cfg=cfg,
                                     feature_cfg=feature_cfg, pretrained_filter_fn=pretrained_filter_fn, **kwargs)
    model.pretrained_cfg = model.default_cfg
    if from_file:
        _load_file_legacy(model, cfg, pretrained_filter_fn, kwargs.get('num_classes', cfg.get('num_classes', 1000)),
                          kwargs.get('in_chans', 3))
    return model


def _download_cached(url: str) -> str:
    """timm's download into torch.hub's cache (the file is reused when it is there)."""
    try:  # timm >= 0.9
        from timm.models._hub import download_cached_file
    except ImportError:
        from timm.models.hub import download_cached_file
    return download_cached_file(url)


def _read_weights_file(path: str) -> Dict[str, Any]:
    """A pretrained file read by the package's one reader (models/_helpers.py: no code from the file runs,
    reference-made files load on every torch); its EMA weights when it has them, as timm's reader does."""
    from ._helpers import read_weights_file, state_dict_of
    return state_dict_of(read_weights_file(path), ema='prefer', source=path)


def _load_file_legacy(model: nn.Module, cfg: Dict[str, Any], filter_fn: Optional[Callable], num_classes: int,
                      in_chans: int):
    """timm 1.x's load_pretrained steps for cfg['state_dict'] on timm < 0.6 (which loads only from URLs)."""
    state_dict = cfg['state_dict']
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    strict = True
    first_conv = cfg.get('first_conv')
    if first_conv and in_chans != 3:
        from timm.models.helpers import adapt_input_conv
        state_dict[first_conv + '.weight'] = adapt_input_conv(in_chans, state_dict[first_conv + '.weight'])
    classifier = cfg.get('classifier')
    if classifier and num_classes != cfg.get('num_classes'):
        state_dict.pop(classifier + '.weight', None)
        state_dict.pop(classifier + '.bias', None)
        strict = False
    model.load_state_dict(state_dict, strict=strict)


def resolve_data_config(args: Dict[str, Any], pretrained_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """timm's resolve_data_config from a dict of command-line values and the model's config dict."""
    from timm.data import resolve_data_config as timm_resolve
    params = _params(timm_resolve)
    if 'pretrained_cfg' in params:
        return timm_resolve(args, pretrained_cfg=pretrained_cfg)
    args = dict(args)
    if args.get('in_chans') is not None:
        args['chans'] = args['in_chans']  # timm < 0.6 spells it `chans`
    return timm_resolve(args, default_cfg=pretrained_cfg)


def create_scheduler(optimizer, *, sched: str, num_epochs: int, decay_epochs: float, cooldown_epochs: int,
                     decay_rate: float, min_lr: float, warmup_lr: float, warmup_epochs: int,
                     step_on_epochs: bool = True, seed: int = 42, **extra):
    """(scheduler, num_epochs): create_scheduler_v2 where it exists, else create_scheduler on an args namespace
    (timm < 0.5.5, whose schedulers always step on epochs: `step_on_epochs` must be True there).
    `extra`: more create_scheduler_v2 options (noise, noise_pct, noise_std, noise_seed, k_decay, patience_epochs);
    the older factory takes all but k_decay (as its args namespace's lr_noise, lr_noise_pct, ...)."""
    import timm.scheduler as ts
    if hasattr(ts, 'create_scheduler_v2'):
        return ts.create_scheduler_v2(
            optimizer, sched=sched, num_epochs=num_epochs, decay_epochs=decay_epochs, cooldown_epochs=cooldown_epochs,
            decay_rate=decay_rate, min_lr=min_lr, warmup_lr=warmup_lr, warmup_epochs=warmup_epochs,
            step_on_epochs=step_on_epochs, **extra)
    if not step_on_epochs:
        raise ValueError('this timm release only has per-epoch schedules (step_on_epochs=True)')
    ns = SimpleNamespace(sched=sched, epochs=num_epochs, decay_epochs=decay_epochs, cooldown_epochs=cooldown_epochs,
                         decay_rate=decay_rate, min_lr=min_lr, warmup_lr=warmup_lr, warmup_epochs=warmup_epochs,
                         seed=seed, lr_noise=None, patience_epochs=10, eval_metric='top1')
    legacy_names = {'noise': 'lr_noise', 'noise_pct': 'lr_noise_pct', 'noise_std': 'lr_noise_std', 'noise_seed': 'seed',
                    'patience_epochs': 'patience_epochs'}
    unknown = sorted(set(extra) - set(legacy_names))
    if unknown:
        raise ValueError(f'this timm release has no scheduler option {", ".join(unknown)} (it needs timm >= 0.5.5)')
    for key, value in extra.items():
        setattr(ns, legacy_names[key], value)
    scheduler, epochs = ts.create_scheduler(ns, optimizer)
    if scheduler is None:
        raise ValueError(f'--sched {sched!r} is not a scheduler of this timm release (cosine, tanh, step, plateau)')
    return scheduler, epochs


# The names timm 0.4.12's create_optimizer_v2 accepts (timm 1.0 has list_optimizers()).
_LEGACY_OPTIMIZERS = ('sgd', 'nesterov', 'momentum', 'adam', 'adamw', 'adabelief', 'nadam', 'radam', 'adamp', 'sgdp',
                      'adadelta', 'adafactor', 'adahessian', 'rmsprop', 'rmsproptf', 'novograd', 'nvnovograd',
                      'fusedsgd', 'fusedmomentum', 'fusedadam', 'fusedadamw', 'fusedlamb', 'fusednovograd')


def list_optimizers() -> list:
    import timm.optim as to
    if hasattr(to, 'list_optimizers'):
        return list(to.list_optimizers())
    names = list(_LEGACY_OPTIMIZERS)
    names += ['lookahead_' + n for n in _LEGACY_OPTIMIZERS]
    return names


def create_optimizer(model: nn.Module, *, opt: str, lr: float, weight_decay: float, momentum: float,
                     layer_decay: Optional[float] = None, **kwargs):
    """create_optimizer_v2 on every timm: weight decay skips 1-D params and `model.no_weight_decay()` names."""
    from timm.optim import create_optimizer_v2
    params = _params(create_optimizer_v2)
    if 'opt' in params:
        return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                   layer_decay=layer_decay, **kwargs)
    if layer_decay is not None:
        raise ValueError('--layer-decay needs timm >= 0.6 (this timm has no layer-wise lr decay)')
    return create_optimizer_v2(model, optimizer_name=opt, learning_rate=lr, weight_decay=weight_decay,
                               momentum=momentum, **kwargs)


def _mixup_class():
    """timm's Mixup, or on releases whose Mixup builds its targets on 'cuda', a subclass that builds them on the
    targets' own device (so that CPU and NPU runs work); the mixing itself is timm's."""
    from timm.data import Mixup
    from timm.data import mixup as mixup_module
    device_param = inspect.signature(mixup_module.mixup_target).parameters.get('device')
    if device_param is None or device_param.default != 'cuda':
        return Mixup
    try:
        legacy = 'device=' not in inspect.getsource(Mixup.__call__)
    except (OSError, TypeError):
        legacy = True
    if not legacy:
        return Mixup

    class DeviceMixup(Mixup):
        def __call__(self, x, target):
            assert len(x) % 2 == 0, 'batch size should be even when using this'
            if self.mode == 'elem':
                lam = self._mix_elem(x)
            elif self.mode == 'pair':
                lam = self._mix_pair(x)
            else:
                lam = self._mix_batch(x)
            return x, mixup_module.mixup_target(target, self.num_classes, lam, self.label_smoothing,
                                                device=target.device)

    return DeviceMixup


def create_mixup(**kwargs):
    return _mixup_class()(**kwargs)


def binary_cross_entropy_cls():
    try:
        from timm.loss import BinaryCrossEntropy
    except ImportError:
        raise ValueError('--bce-loss needs timm >= 0.5 (BinaryCrossEntropy)') from None
    return BinaryCrossEntropy


class _DevicePrefetcher:
    """Device-side normalization (and random erasing) of uint8 batches for timm releases whose PrefetchLoader is
    CUDA-only: moves each batch to `device`, converts to float, normalizes; no side stream."""

    def __init__(self, loader, mean, std, channels: int, device: torch.device, re_prob=0., re_mode='const',
                 re_count=1):
        self.loader = loader
        self.device = device
        self.mean = torch.tensor([m * 255 for m in mean], device=device).view(1, channels, 1, 1)
        self.std = torch.tensor([s * 255 for s in std], device=device).view(1, channels, 1, 1)
        self.random_erasing = None
        if re_prob > 0.:
            from timm.data.random_erasing import RandomErasing
            self.random_erasing = RandomErasing(probability=re_prob, mode=re_mode, max_count=re_count,
                                                device=str(device))

    def __iter__(self):
        for inputs, targets in self.loader:
            inputs = inputs.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
            targets = targets.to(self.device, non_blocking=True)
            if self.random_erasing is not None:
                inputs = self.random_erasing(inputs)
            yield inputs, targets

    def __len__(self):
        return len(self.loader)

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def dataset(self):
        return self.loader.dataset


def prefetch_loader(loader, *, mean, std, channels: int, device: torch.device, re_prob=0., re_mode='const',
                    re_count=1):
    """timm's PrefetchLoader where it takes a device (timm >= 0.6), else the simple device-side normalizer above."""
    from timm.data.loader import PrefetchLoader
    if 'device' in _params(PrefetchLoader.__init__):
        return PrefetchLoader(loader, mean=mean, std=std, channels=channels, device=device, re_prob=re_prob,
                              re_mode=re_mode, re_count=re_count)
    return _DevicePrefetcher(loader, mean, std, channels, device, re_prob, re_mode, re_count)
