"""One sample, for every data set: which files are images, decoding any of them to 8-bit RGB, scanning an
ImageFolder tree, class maps, and the per-sample seeds that make augmentation independent of loader workers and
resume points. Shared by vancls/data.py and vancls/shards.py (and predict.py); imports neither, so that neither
imports the other."""
import contextlib
import os
import random
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .errors import DataError

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


def find_split(root: str, split: str, fallbacks: Sequence[str] = ()) -> Optional[str]:
    for name in (split, *fallbacks):
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    return None


def scan_image_folder(root: str, class_names: Optional[List[str]] = None):
    """List (path, class index) of an ImageFolder tree and its class names, with an error per kind of problem."""
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
    if not found:
        raise DataError(f'{root}: no class folders (expected {root}/<class>/<image files>)')
    if class_names is not None:
        missing = sorted(set(class_names) - set(found))
        extra = sorted(set(found) - set(class_names))
        if missing or extra:
            raise DataError(f'{root}: classes differ from the training classes'
                            + (f'; missing: {", ".join(missing[:20])}' if missing else '')
                            + (f'; not in train: {", ".join(extra[:20])}' if extra else ''))
    else:
        class_names = found
    samples = []
    for idx, name in enumerate(class_names):
        folder = os.path.join(root, name)
        files = []
        for dirpath, _, filenames in os.walk(folder, followlinks=True):
            files.extend(os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMG_EXTENSIONS))
        if not files:
            raise DataError(f'{folder}: class folder has no image files ({", ".join(IMG_EXTENSIONS)})')
        samples.extend((p, idx) for p in sorted(files))
    return samples, list(class_names)


def load_class_map(path: str) -> List[str]:
    """--class-map: a text file with one class folder name per line, in index order."""
    if not os.path.isfile(path):
        raise DataError(f'--class-map {path}: file not found')
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    if not names or len(set(names)) != len(names):
        raise DataError(f'--class-map {path}: expected unique class names, one per line')
    return names


def open_rgb(path: str) -> Image.Image:
    """Decode an image file to 8-bit RGB (see decode_rgb)."""
    with open(path, 'rb') as f:
        return decode_rgb(f)


def decode_rgb(fileobj) -> Image.Image:
    """Decode any image to 8-bit RGB: CMYK and palette images convert, alpha is dropped, 16-bit is scaled."""
    img = Image.open(fileobj)
    img.load()  # decode fully now, so truncated files fail here and not inside a transform
    if img.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
        arr = np.asarray(img, dtype=np.int64)
        maxval = 65535 if img.mode.startswith('I;16') or arr.max() > 255 else 255
        img = Image.fromarray((arr * 255 // maxval).clip(0, 255).astype(np.uint8), mode='L')
    elif img.mode == 'F':
        img = Image.fromarray(np.asarray(img).clip(0, 255).astype(np.uint8), mode='L')
    elif img.mode == 'P':
        img = img.convert('RGBA')
    return img if img.mode == 'RGB' else img.convert('RGB')  # convert() to the same mode would copy


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Augmentation seed of one sample in one epoch: independent of workers, batch order and resume point."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % (2 ** 31 - 1)


def reseed_global_streams(seed: int):
    """Seed the three streams that the training transforms draw from, CPU only.

    The reference recipe draws from all three: RandomResizedCropAndInterpolation, RandAugment's ops and
    RandomErasing from python's `random`; RandAugment's op choice from numpy's global RandomState; the
    horizontal flip (torchvision), RandomErasing's 'pixel' noise and ColorJitter (without RandAugment) from
    torch's default CPU generator. Not `torch.manual_seed`: it also seeds every accelerator's generators (while
    CUDA is not initialized it queues the call with a formatted stack trace, a large share of a sample's time),
    and in the training process it would reset an initialized GPU's generator. The transforms run on the CPU,
    and seeding the default CPU generator alone gives them the same numbers.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)


@contextlib.contextmanager
def preserved_global_streams():
    """Restore python's, numpy's and torch's CPU RNG states on exit (the streams reseed_global_streams uses)."""
    states = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.default_generator.set_state(states[2])
