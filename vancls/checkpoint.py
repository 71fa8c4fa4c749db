"""Checkpoints, the one module that reads and writes them: safe loading (never runs code from a file), unwrapping,
head dropping, metadata, atomic writes, history, `--resume auto`.

Layout of a checkpoint written by train.py (timm-compatible dict, loadable with torch.load(weights_only=True)):
    epoch, arch, state_dict, optimizer, scaler, scheduler, state_dict_ema, args (plain types), metric,
    class_names, num_classes, version, summary_row (end-of-epoch files: the epoch's summary.csv row), and for recovery
    checkpoints also step_in_epoch, num_updates, rng, meters.
`epoch` is the epoch the checkpoint *finished* (step_in_epoch == 0) or is inside of (step_in_epoch > 0).
Also read: the reference's/the port's checkpoints (timm 0.4's CheckpointSaver: `args` is an argparse.Namespace,
`amp` holds apex's loss-scaler state, `version` 2), the official weight files, and export.py's .safetensors.
"""
import argparse
import errno
import glob
import logging
import os
import random
import re
import shutil
from typing import Any, Dict, Optional

import numpy as np
import torch

from . import faults
from .errors import CheckpointError  # one module for the error classes
from models._helpers import SAFE_GLOBALS, WeightsFileError, read_weights_file, state_dict_of  # noqa: F401
from models.van import VAN_NAMES, canonical_variant, infer_variant

_logger = logging.getLogger('vancls')

CHECKPOINT_VERSION = 1
LAST, BEST, RECOVERY = 'last.pth.tar', 'model_best.pth.tar', 'recovery.pth.tar'
_EPOCH_RE = re.compile(r'checkpoint-(\d+)\.pth\.tar$')


def _fsync_dir(folder: str):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_replace(path: str, write):
    """Let `write(tmp)` produce a complete file next to `path`, then rename it over `path`: a kill or a full disk
    leaves `path` as the previous complete file, and the temporary file is removed on any error."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp{os.getpid()}')
    try:
        if os.path.exists(tmp):
            os.remove(tmp)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        written = _file_size(tmp)
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise CheckpointError(f'could not write checkpoint {path}: {e.strerror or e}'
                                  f'{_space_note(e, path, written)}; the previous file (if any) is intact') from e
        raise
    _fsync_dir(folder)


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _space_note(e: OSError, path: str, written: int) -> str:
    """For a full disk or quota: how much the file needs (the size of its previous version, else at least what was
    written before the error) and how much is free now, in MiB."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return ''
    folder = os.path.dirname(os.path.abspath(path))
    previous = _file_size(path)
    needed = f'about {previous / 2 ** 20:.1f} MiB' if previous else f'at least {written / 2 ** 20:.1f} MiB'
    try:
        free = f'{shutil.disk_usage(folder).free / 2 ** 20:.1f} MiB are free'
    except OSError:
        free = 'the free space is unknown'
    return f' (it needs {needed} free in {folder}; {free})'


def atomic_save(obj: Any, path: str):
    """torch.save `obj` to `path` atomically (temporary file, flush + fsync, rename)."""
    def write(tmp):
        with open(tmp, 'wb') as f:
            try:
                torch.save(obj, f)
            except RuntimeError as e:
                raise (_os_error_behind(f) or e) from e
            f.flush()
            os.fsync(f.fileno())
        faults.during_save()  # fault injection: between the complete temporary file and the rename
    _atomic_replace(path, write)


def _os_error_behind(f) -> Optional[OSError]:
    """torch's zip writer reports a failed write (full disk, quota, I/O error) as RuntimeError('... unexpected
    pos ...'), without the errno: write to the (doomed) temporary file again to get the OSError itself."""
    try:
        f.flush()
        os.write(f.fileno(), bytes(1 << 16))
        os.fsync(f.fileno())
    except OSError as e:
        return e
    return None


def atomic_link_or_copy(src: str, dst: str):
    """Make dst hold the same bytes as src, atomically (hard link when possible, else an fsynced copy)."""
    def write(tmp):
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, 'rb+') as f:
                os.fsync(f.fileno())
    _atomic_replace(dst, write)


def remove_stale_temporaries(folder: str):
    """Temporary files left by a process killed in the middle of a save (the real files are intact)."""
    for path in glob.glob(os.path.join(folder, '.*.pth.tar.tmp*')):
        try:
            os.remove(path)
        except OSError:
            pass


def check_writable(folder: str):
    """Fail before training starts when the output folder cannot be created or written."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f'.write_test{os.getpid()}')
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f'output folder {folder} is not writable: {e.strerror or e}') from None


def plain(obj: Any) -> Any:
    """Args and metadata as plain types, so that checkpoints load with torch.load(weights_only=True)."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return str(obj)


def training_checkpoint(*, position: Dict[str, int], model: torch.nn.Module, optimizer, scheduler, scaler: dict,
                        ema_model: Optional[torch.nn.Module], args, class_names: list, metric: Optional[float] = None,
                        meters: Optional[dict] = None, rng_ranks: Optional[list] = None,
                        device: Optional[torch.device] = None, summary_row: Optional[dict] = None) -> Dict[str, Any]:
    """The dict train.py saves: the layout in the module docstring, written here once (read back by
    read_checkpoint, checkpoint_meta, find_auto_resume and resume_position). position: epoch, step_in_epoch,
    num_updates. rng_ranks: every rank's RNG states in rank order (each rank resumes with its own). summary_row:
    the ended epoch's row of summary.csv (restored on resume if the stop came before the row was written)."""
    return {
        **position, 'arch': args.model, 'state_dict': model.state_dict(), 'optimizer': optimizer.state_dict(),
        'scaler': scaler, 'scheduler': scheduler.state_dict(),
        'state_dict_ema': ema_model.state_dict() if ema_model is not None else None,
        'metric': metric, 'args': plain(vars(args)), 'class_names': list(class_names),
        'num_classes': model.num_classes, 'rng': rng_ranks[0] if rng_ranks else rng_state(device),
        'rng_ranks': rng_ranks, 'version': CHECKPOINT_VERSION, 'meters': meters, 'summary_row': summary_row,
    }


def rng_state(device: Optional[torch.device] = None) -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        'python': random.getstate(),
        # the uint32 key as int64: torch < 2.3 has no uint32 tensors (from_numpy refuses them)
        'numpy': [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        'torch': torch.get_rng_state(),
    }
    if device is not None and device.type in ('cuda', 'npu'):
        state['device'] = getattr(torch, device.type).get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: Optional[torch.device] = None):
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state['numpy']
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state['torch'])
    if 'device' in state and device is not None and device.type in ('cuda', 'npu'):
        getattr(torch, device.type).set_rng_state(state['device'], device)


class CheckpointManager:
    """Rank 0's writer: last.pth.tar every epoch, model_best.pth.tar on a new best metric, the last
    `max_history` checkpoint-<epoch>.pth.tar files, and recovery.pth.tar every N optimizer steps."""

    def __init__(self, folder: str, max_history: int = 10, decreasing: bool = False):
        self.folder, self.max_history, self.decreasing = folder, max_history, decreasing
        self.best_metric: Optional[float] = None
        self.best_epoch: Optional[int] = None

    def is_better(self, metric: float) -> bool:
        if self.best_metric is None:
            return True
        return metric < self.best_metric if self.decreasing else metric > self.best_metric

    def save_epoch(self, state: Dict[str, Any], epoch: int, metric: Optional[float]) -> bool:
        """Save the end-of-epoch state; returns True when it is the new best."""
        self._check_folder()
        last = os.path.join(self.folder, LAST)
        is_best = metric is not None and self.is_better(metric)
        if is_best:
            self.best_metric, self.best_epoch = metric, epoch
        state = dict(state, best_metric=self.best_metric, best_epoch=self.best_epoch)
        atomic_save(state, last)
        if self.max_history > 0:
            atomic_link_or_copy(last, os.path.join(self.folder, f'checkpoint-{epoch}.pth.tar'))
        if is_best:
            atomic_link_or_copy(last, os.path.join(self.folder, BEST))
        self._prune()
        recovery = os.path.join(self.folder, RECOVERY)
        if os.path.exists(recovery):  # an end-of-epoch checkpoint supersedes the mid-epoch one
            os.remove(recovery)
        return is_best

    def _check_folder(self):
        """The output folder deleted during the run is recreated with a warning: the state in memory is the last
        good one, and saving it beats stopping (the files that were in the folder are gone either way)."""
        if os.path.isdir(self.folder):
            return
        _logger.warning(f'output folder {self.folder} was deleted during the run: recreating it to save the current '
                        f'state (the checkpoints and logs that were in it are gone)')
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f'output folder {self.folder} was deleted during the run and cannot be recreated: '
                                  f'{e.strerror or e}') from None

    def save_recovery(self, state: Dict[str, Any]):
        self._check_folder()
        atomic_save(dict(state, best_metric=self.best_metric, best_epoch=self.best_epoch),
                    os.path.join(self.folder, RECOVERY))

    def _prune(self):
        """Remove history beyond max_history, only after the new files are in place."""
        files = sorted(glob.glob(os.path.join(self.folder, 'checkpoint-*.pth.tar')),
                       key=lambda p: int(_EPOCH_RE.search(p).group(1)) if _EPOCH_RE.search(p) else -1)
        for path in files[:-self.max_history] if self.max_history > 0 else files:
            try:
                os.remove(path)
            except OSError as e:
                _logger.warning(f'could not remove old checkpoint {path}: {e}')


def _progress_key(ckpt: Dict[str, Any]) -> tuple:
    """Order checkpoints by training progress: (finished epochs, steps into the next epoch)."""
    step = int(ckpt.get('step_in_epoch', 0) or 0)
    epoch = int(ckpt.get('epoch', -1))
    return (epoch, step) if step > 0 else (epoch + 1, 0)


def find_auto_resume(folder: str, trust: bool = False) -> tuple:
    """(path, checkpoint dict) of the checkpoint of `folder` that is furthest into training and loads, or
    (None, None); unreadable ones are skipped with a warning. The chosen file is read once, here."""
    candidates = [os.path.join(folder, n) for n in (RECOVERY, LAST)]
    candidates += glob.glob(os.path.join(folder, 'checkpoint-*.pth.tar'))
    best, best_ckpt, best_key = None, None, None
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            ckpt = read_checkpoint(path, trust=trust)
            if not isinstance(ckpt, dict) or 'state_dict' not in ckpt or 'epoch' not in ckpt:
                raise CheckpointError('not a training checkpoint of this project (no state_dict/epoch)')
        except CheckpointError as e:
            _logger.warning(f'--resume auto: skipping unreadable checkpoint {path}: {e}')
            continue
        key = _progress_key(ckpt)
        if best_key is None or key > best_key:
            best, best_ckpt, best_key = path, ckpt, key
    return best, best_ckpt


def find_newest_checkpoint(folder: str) -> Optional[str]:
    """The newest checkpoint file of a run folder by modification time (for messages; resuming uses
    find_auto_resume, which reads them), or None."""
    files = [os.path.join(folder, n) for n in (RECOVERY, LAST)] + glob.glob(os.path.join(folder, 'checkpoint-*.pth.tar'))
    files = [f for f in files if os.path.isfile(f)]
    return max(files, key=os.path.getmtime) if files else None


# The optimizer options that choose a kernel, not the math: they come from this run (--opt-impl), not the file.
_KERNEL_KEYS = ('fused', 'foreach', 'capturable', 'differentiable')


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Dict[str, Any]):
    """optimizer.load_state_dict(state), keeping this run's kernel choice (fused/foreach): a file from another
    torch or another --opt-impl (the reference's, torch 1.x, has neither key) would otherwise replace it.
    Set before loading, so that torch converts the step counters for that kernel (device, dtype)."""
    groups = []
    for ours, saved in zip(optimizer.param_groups, state.get('param_groups', [])):
        saved = dict(saved)
        saved.update({k: ours[k] for k in _KERNEL_KEYS if k in ours})
        groups.append(saved)
    if len(groups) == len(state.get('param_groups', [])):
        state = dict(state, param_groups=groups)
    optimizer.load_state_dict(state)


def resume_position(ckpt: Dict[str, Any]) -> tuple:
    """(epoch to run next, optimizer steps already done in that epoch). Files of timm's CheckpointSaver (the
    reference's) have no step_in_epoch: from `version` 2 on they store the finished epoch, before it the next one
    (timm's own resume rule)."""
    epoch = int(ckpt['epoch'])
    if 'step_in_epoch' not in ckpt:
        return (epoch + 1 if int(ckpt.get('version') or 1) > 1 else epoch), 0
    step = int(ckpt.get('step_in_epoch', 0) or 0)
    return (epoch, step) if step > 0 else (epoch + 1, 0)


# ---------------------------------------------------------------------------------------------------- reading
# The pure reader is models/_helpers.py (the model package reads weight files without this package); here its
# errors become CheckpointError, which the CLIs print as one line.

def read_checkpoint(path: str, trust: bool = False) -> Any:
    """Load a checkpoint file on the CPU without running code from it (unless `trust`), for every entry point.

    Plain tensors and containers load, and so do the harmless types of SAFE_GLOBALS; anything else is refused
    with an error naming the type. Raises CheckpointError naming the file when it is missing or unreadable.
    """
    try:
        return read_weights_file(path, trust)
    except WeightsFileError as e:
        raise CheckpointError(str(e)) from None


def model_state_dict(ckpt: Any, source: str = 'checkpoint', use_ema: Any = False) -> Dict[str, torch.Tensor]:
    """The model's weights in a checkpoint without wrapper prefixes: `state_dict`; with use_ema=True its EMA
    weights (an error without them); with use_ema='prefer' the EMA weights when it has them (pretrained files,
    as timm reads them). The rule is models/_helpers.state_dict_of."""
    ema = use_ema if isinstance(use_ema, str) else ('require' if use_ema else 'never')
    try:
        return state_dict_of(ckpt, ema=ema, source=source)
    except WeightsFileError as e:
        raise CheckpointError(str(e)) from None


def checkpoint_meta(ckpt: Any) -> Dict[str, Any]:
    """What a checkpoint says about its model: arch, num_classes (from the head), class_names, training args.

    arch: the file's `arch` (ours, the reference's), else its training args' `model` (each only when it is a VAN
    name), else the variant its weights' shapes match (the official files name no model); None for a file that
    holds no VAN. Official files carry
    no class names or args: class_names is then None and args {}.
    """
    ckpt = ckpt if isinstance(ckpt, dict) else {}
    try:
        state_dict = state_dict_of(ckpt)
    except WeightsFileError:
        state_dict = {}
    head = state_dict.get('head.weight')
    args = ckpt.get('args') or {}
    if isinstance(args, argparse.Namespace):  # the reference's saver
        args = vars(args)
    # timm's saver writes the model's class name ('van') as arch when it has no args: take only VAN names.
    named = [n for n in (ckpt.get('arch'), args.get('model')) if isinstance(n, str) and n in VAN_NAMES]
    return {'arch': named[0] if named else infer_variant(state_dict),
            'num_classes': int(head.shape[0]) if head is not None else None,
            'class_names': ckpt.get('class_names'), 'args': args}


def load_state_dict_checked(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source: str = 'checkpoint',
                            drop_head: Any = False):
    """Load `state_dict` strictly; every missing, unexpected or mis-shaped key is named in the error.

    drop_head=True leaves the classifier as initialized (fine-tuning to other classes); 'auto' does so only when
    the file's classifier has another shape than the model's.
    """
    own = model.state_dict()
    if drop_head == 'auto':
        head = state_dict.get('head.weight')
        drop_head = head is not None and 'head.weight' in own and tuple(head.shape) != tuple(own['head.weight'].shape)
    if drop_head:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith('head.')}
    missing = [k for k in own if k not in state_dict and not (drop_head and k.startswith('head.'))]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f'{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}'
                  for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        arch = getattr(model, 'pretrained_cfg', {}).get('architecture', '?')
        lines = [f'{source} does not fit {type(model).__name__} ({arch}):']
        for title, keys in (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatch', mismatched)):
            if keys:
                shown = ', '.join(keys[:12]) + (f', ... ({len(keys) - 12} more)' if len(keys) > 12 else '')
                lines.append(f'  {title} ({len(keys)}): {shown}')
        raise CheckpointError('\n'.join(lines))
    model.load_state_dict(state_dict, strict=not drop_head)


def load_model_weights(model: torch.nn.Module, path: str, trust: bool = False, use_ema: bool = False,
                       drop_head: Any = False, checkpoint: Any = None) -> Dict[str, Any]:
    """Load weights from any checkpoint this module reads into `model` (strict, checked; see
    load_state_dict_checked for `drop_head`). Returns the checkpoint dict ({} for a bare state dict)."""
    ckpt = read_checkpoint(path, trust) if checkpoint is None else checkpoint
    held, ours = checkpoint_meta(ckpt)['arch'], getattr(model, 'pretrained_cfg', {}).get('architecture')
    if held and ours and canonical_variant(held) != canonical_variant(ours):
        raise CheckpointError(f'{path} holds {held}, not {ours}: pass --model {held} (or drop --model where the '
                              f'checkpoint names it)')
    load_state_dict_checked(model, model_state_dict(ckpt, path, use_ema), source=path, drop_head=drop_head)
    return ckpt if isinstance(ckpt, dict) and ('state_dict' in ckpt or 'model' in ckpt) else {}
