"""Reading VAN weight files, for the model package and for the CLIs (vancls.checkpoint builds on it).

The model package must be usable without the application package (`import models` alone builds every VAN and
loads an official file), so the pure reader lives here, as timm keeps `load_state_dict` in
`timm/models/_helpers.py`:

- `read_weights_file(path, trust)`: a `.pth`/`.pth.tar` file without running code from it (unless `trust`), or
  export.py's `.safetensors`, as a dict.
- `state_dict_of(ckpt, ema)`: the one rule for which weights of a checkpoint are meant. It follows timm:
  timm's pretrained loading (`load_state_dict(..., use_ema=True)`) takes `state_dict_ema` when the file has one
  (`ema='prefer'`); an explicit checkpoint (`validate.py --checkpoint`, `--initial-checkpoint`, `--resume`) is the
  trained model, `state_dict`, unless `--use-ema` asks for the EMA weights (`ema='never'` / `'require'`).
"""
import argparse
import json
import os
from typing import Any, Dict, Optional

import torch

# Harmless types that reference-made checkpoints hold besides tensors and plain containers: timm's saver stores
# the training arguments as an argparse.Namespace (attribute assignment only, no code runs).
SAFE_GLOBALS = (argparse.Namespace,)
# Wrapper prefixes in front of the official key names: DDP (`module.`) and torch.compile (`_orig_mod.`).
WRAPPER_PREFIXES = ('module.', '_orig_mod.')
EMA_CHOICES = ('never', 'prefer', 'require')


class WeightsFileError(ValueError):
    """A weights file is missing, unreadable, refused (it would run code) or holds no VAN weights."""


def _torch_load_safe(path: str) -> Any:
    if hasattr(torch.serialization, 'safe_globals'):  # torch >= 2.5: torch's own allowlist
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location='cpu', weights_only=True)
    from ._safe_unpickle import torch_load_allowlisted  # torch < 2.5 has no user allowlist context
    return torch_load_allowlisted(path, SAFE_GLOBALS)


def _read_safetensors(path: str) -> Dict[str, Any]:
    """export.py's format: a flat state dict (never unpickled) and string metadata, as a checkpoint dict."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise WeightsFileError(f'{path}: reading .safetensors files needs the safetensors package '
                               f'(pip install safetensors)') from None
    try:
        with safe_open(path, framework='pt', device='cpu') as f:
            meta = f.metadata() or {}
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
        return {'state_dict': state_dict, 'arch': meta.get('model'),
                'class_names': json.loads(meta['class_names']) if meta.get('class_names') else None,
                'args': json.loads(meta['data_args']) if meta.get('data_args') else {}}
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, JSONDecodeError
        raise WeightsFileError(f'{path}: not a readable safetensors file ({type(e).__name__}: {e})') from None


def read_weights_file(path: str, trust: bool = False) -> Any:
    """Load a checkpoint or weights file on the CPU without running code from it (unless `trust`).

    Tensors, plain containers and SAFE_GLOBALS load; anything else is refused with an error naming the type.
    Raises WeightsFileError naming the file when it is missing, unreadable or refused.
    """
    if not os.path.isfile(path):
        raise WeightsFileError(f'checkpoint not found: {path}')
    if path.endswith('.safetensors'):
        return _read_safetensors(path)
    try:
        if trust:
            return torch.load(path, map_location='cpu', weights_only=False)
        return _torch_load_safe(path)
    except Exception as e:  # noqa: BLE001 - torch raises many types (UnpicklingError, RuntimeError, EOFError)
        text = str(e)
        if not trust and 'Weights only load failed' in text:
            # Name the offending global (e.g. "GLOBAL io.open was not an allowed global") rather than torch's essay.
            culprit = next((line.strip() for line in text.splitlines() if 'GLOBAL' in line), 'unsupported content')
            raise WeightsFileError(
                f'{path}: refused to load: it needs full unpickling, which can run arbitrary code ({culprit[:200]}). '
                f'If you trust the file, pass --trust-checkpoint.') from None
        msg = text.splitlines()[0][:300] if text else type(e).__name__
        raise WeightsFileError(f'{path}: not a readable checkpoint ({type(e).__name__}: {msg})') from None


def strip_wrapper_prefixes(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, v in state_dict.items():
        while k.startswith(WRAPPER_PREFIXES):
            k = k.split('.', 1)[1]
        out[k] = v
    return out


def state_dict_of(ckpt: Any, ema: str = 'never', source: str = 'checkpoint') -> Dict[str, Any]:
    """The weights a checkpoint holds, by the rule in the module docstring, without wrapper prefixes.

    `ckpt` is a bare state dict or a dict holding one under `state_dict` / `model` (timm's and torchvision's
    savers), and optionally `state_dict_ema`. ema: 'never' (the trained model), 'prefer' (the EMA weights when the
    file has them: timm's pretrained rule) or 'require' (--use-ema: an error without them).
    """
    if ema not in EMA_CHOICES:
        raise ValueError(f'ema={ema!r}: choose one of {", ".join(EMA_CHOICES)}')
    has_ema = isinstance(ckpt, dict) and isinstance(ckpt.get('state_dict_ema'), dict)
    if ema == 'require' and not has_ema:
        raise WeightsFileError(f'{source}: --use-ema given but the checkpoint has no EMA weights (state_dict_ema)')
    if has_ema and ema != 'never':
        ckpt = ckpt['state_dict_ema']
    elif isinstance(ckpt, dict):
        for key in ('state_dict', 'model', 'state_dict_ema'):  # an EMA-only file still holds weights
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not ckpt or not all(isinstance(k, str) for k in ckpt):
        raise WeightsFileError(f'{source}: not a state dict: expected a dict of tensors, got {type(ckpt).__name__}')
    return strip_wrapper_prefixes(ckpt)
