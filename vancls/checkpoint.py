"""Checkpoints: atomic writes, history, `--resume auto`, and loading that never runs code from a file.

Layout of a checkpoint (timm-compatible dict, loadable with torch.load(weights_only=True)):
    epoch, arch, state_dict, optimizer, scaler, scheduler, state_dict_ema, args (plain types), metric,
    class_names, version, and for recovery checkpoints also step_in_epoch, num_updates, rng, meters.
`epoch` is the epoch the checkpoint *finished* (step_in_epoch == 0) or is inside of (step_in_epoch > 0).
"""
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
from models.van import clean_state_dict, load_checkpoint_file, load_state_dict_checked  # noqa: F401 (re-export)

_logger = logging.getLogger('vancls')

CHECKPOINT_VERSION = 1
LAST, BEST, RECOVERY = 'last.pth.tar', 'model_best.pth.tar', 'recovery.pth.tar'
_EPOCH_RE = re.compile(r'checkpoint-(\d+)\.pth\.tar$')


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or does not fit; the message names the file."""


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
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise CheckpointError(f'could not write checkpoint {path}: {e.strerror or e}; '
                                  f'the previous file (if any) is intact') from e
        raise
    _fsync_dir(folder)


def atomic_save(obj: Any, path: str):
    """torch.save `obj` to `path` atomically (temporary file, flush + fsync, rename)."""
    def write(tmp):
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        faults.during_save()  # fault injection: between the complete temporary file and the rename
    _atomic_replace(path, write)


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


def rng_state(device: Optional[torch.device] = None) -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]),
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
    np.random.set_state((n[0], n[1].numpy(), n[2], n[3], n[4]))
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

    def save_recovery(self, state: Dict[str, Any]):
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


def find_auto_resume(folder: str, trust: bool = False) -> Optional[str]:
    """The checkpoint of `folder` that is furthest into training and loads; unreadable ones are skipped."""
    candidates = [os.path.join(folder, n) for n in (RECOVERY, LAST)]
    candidates += glob.glob(os.path.join(folder, 'checkpoint-*.pth.tar'))
    best, best_key = None, None
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            ckpt = load_checkpoint_file(path, trust=trust)
            if not isinstance(ckpt, dict) or 'state_dict' not in ckpt or 'epoch' not in ckpt:
                raise ValueError('not a training checkpoint of this project (no state_dict/epoch)')
        except (ValueError, FileNotFoundError) as e:
            _logger.warning(f'--resume auto: skipping unreadable checkpoint {path}: {e}')
            continue
        key = _progress_key(ckpt)
        if best_key is None or key > best_key:
            best, best_key = path, key
    return best


def resume_position(ckpt: Dict[str, Any]) -> tuple:
    """(epoch to run next, optimizer steps already done in that epoch)."""
    step = int(ckpt.get('step_in_epoch', 0) or 0)
    epoch = int(ckpt['epoch'])
    return (epoch, step) if step > 0 else (epoch + 1, 0)


def read_checkpoint(path: str, trust: bool = False) -> Any:
    """load_checkpoint_file with this package's error type (the message names the file and the problem)."""
    try:
        return load_checkpoint_file(path, trust=trust)
    except (ValueError, FileNotFoundError) as e:
        raise CheckpointError(str(e)) from None


def load_model_weights(model: torch.nn.Module, path: str, trust: bool = False, use_ema: bool = False,
                       drop_head: Any = False, checkpoint: Any = None) -> Dict[str, Any]:
    """Load weights from one of our checkpoints or an official .pth.tar into `model` (strict, checked).
    drop_head='auto' leaves the classifier as initialized when the file's has another number of classes
    (fine-tuning); everything else must match. Returns the checkpoint dict (or {} for a bare state dict)."""
    ckpt = read_checkpoint(path, trust) if checkpoint is None else checkpoint
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path}: not a checkpoint (a {type(ckpt).__name__}, expected a dict)')
    source = ckpt
    if use_ema:
        if not isinstance(ckpt.get('state_dict_ema'), dict):
            raise CheckpointError(f'{path}: --use-ema given but the checkpoint has no EMA weights (state_dict_ema)')
        source = ckpt['state_dict_ema']
    if drop_head == 'auto':
        file_head = clean_state_dict(source).get('head.weight')
        own_head = model.state_dict().get('head.weight')
        drop_head = file_head is not None and own_head is not None and file_head.shape != own_head.shape
    try:
        load_state_dict_checked(model, source, source=path, drop_head=bool(drop_head))
    except ValueError as e:
        raise CheckpointError(f'{path}: {e}') from None
    except RuntimeError as e:
        raise CheckpointError(str(e)) from None
    return ckpt if ('state_dict' in ckpt or 'model' in ckpt) else {}
