"""Data: ImageFolder trees checked up front, robust image decoding, deterministic per-sample augmentation,
a resumable distributed sampler, and loaders built from timm's transforms.

Why not timm's create_loader: exact mid-epoch resume needs a sampler that can start at a given position and
augmentation randomness that depends only on (seed, epoch, sample index), not on which worker ran which batch;
timm's loader builds its own sampler and seeds workers per epoch. The transforms, collate, device-side
normalization (PrefetchLoader) and mixup are timm's.
"""
import contextlib
import logging
import math
import multiprocessing as mp
import os
import random
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.utils.data as tud
from PIL import Image, ImageFile

from .preempt import loader_worker_init

_logger = logging.getLogger('vancls')

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


class DataError(ValueError):
    """The data set tree or an option about it is wrong; the message names the path or flag."""


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
    """Decode any image to 8-bit RGB: CMYK and palette images convert, alpha is dropped, 16-bit is scaled."""
    with open(path, 'rb') as f:
        img = Image.open(f)
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


class ImageFolderDataset(tud.Dataset):
    """An ImageFolder that survives bad files and augments deterministically.

    A file that cannot be decoded is reported once by name (logged as a warning), flagged in a shared byte array
    (so the count is exact across loader workers and epochs), and replaced by the next readable sample.
    """

    def __init__(self, root: str, transform=None, class_names: Optional[List[str]] = None, seed: int = 0):
        self.root = root
        self.samples, self.classes = scan_image_folder(root, class_names)
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        # One byte per sample in shared memory: loader workers (fork or spawn) inherit it with the dataset.
        self._bad = mp.Array('b', len(self.samples), lock=False)

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    @property
    def bad_files(self) -> List[str]:
        flags = np.frombuffer(self._bad, dtype=np.int8)
        return [self.samples[i][0] for i in np.flatnonzero(flags)]

    def _load(self, index: int):
        """(image, target) of sample `index`; the global RNG streams are reseeded for it (see __getitems__)."""
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            path, target = self.samples[i]
            try:
                img = open_rgb(path)
            except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError
                if not self._bad[i]:
                    self._bad[i] = 1
                    _logger.warning(f'bad image skipped: {path} ({type(e).__name__}: {e})')
                continue
            if self.transform is not None:
                reseed_global_streams(sample_seed(self.seed, self.epoch, index))
                img = self.transform(img)
            return img, target
        raise DataError(f'{self.root}: no readable image in the whole data set')

    def __getitems__(self, indices: Sequence[int]) -> list:
        """A batch of samples: the DataLoader calls this once per batch (torch's map-style fetcher).

        In a loader worker the process's RNG streams belong to the dataset, so they are just reseeded per sample.
        In the training process (workers=0) they also drive mixup (numpy), drop path (torch) and the loader's own
        draws, which must not depend on the augmentation: their states are saved once per batch and restored
        after it, so the per-sample cost is only the reseeding. (Swapping the streams for private generators is
        not possible: timm's and torchvision's transforms call the module-level `random.*`, `np.random.*` and
        `torch.rand*` functions, which are bound to the global objects.)
        """
        if self.transform is None or tud.get_worker_info() is not None:
            return [self._load(i) for i in indices]
        with preserved_global_streams():
            return [self._load(i) for i in indices]

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]


class SyntheticDataset(tud.Dataset):
    """`--dataset synthetic`: random normalized images and labels, made on the fly with no decoding."""

    def __init__(self, num_samples: int, num_classes: int, input_size=(3, 224, 224), seed: int = 0,
                 uint8: bool = False):
        self.num_samples, self.num_classes, self.input_size, self.seed, self.uint8 = \
            num_samples, num_classes, tuple(input_size), seed, uint8
        self.classes = [f'class_{i}' for i in range(num_classes)]
        self.epoch = 0
        self.bad_files = []

    def __len__(self):
        return self.num_samples

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
        if self.uint8:  # for the device-side normalizing prefetcher
            img = torch.randint(0, 256, self.input_size, dtype=torch.uint8, generator=g)
        else:
            img = torch.randn(self.input_size, generator=g)
        return img, int(torch.randint(self.num_classes, (1,), generator=g))


class ResumableSampler(tud.Sampler):
    """Shuffled (or ordered) shard of the data set for one rank, restartable at any position in an epoch.

    Training (`pad=True`): as DistributedSampler, the index list is padded to a multiple of world_size so that
    every rank runs the same number of steps. Evaluation (`pad=False`): no sample is duplicated, so the
    counts summed over ranks are exact.
    """

    def __init__(self, length: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 pad: bool = True):
        self.length, self.shuffle, self.seed, self.rank, self.world_size, self.pad = \
            length, shuffle, seed, rank, world_size, pad
        self.epoch = 0
        self.start = 0  # position (in this rank's shard) to start from, for mid-epoch resume

    def set_epoch(self, epoch: int, start: int = 0):
        self.epoch, self.start = epoch, start

    def _indices(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.length, generator=g).tolist()
        else:
            indices = list(range(self.length))
        if self.pad and self.world_size > 1:
            total = math.ceil(self.length / self.world_size) * self.world_size
            indices += indices[:total - len(indices)]
        return indices[self.rank::self.world_size]

    def __iter__(self):
        return iter(self._indices()[self.start:])

    def __len__(self):
        return len(self._indices()) - self.start


def build_transform(args, data_config: dict, is_training: bool, use_prefetcher: bool):
    from timm.data import create_transform
    if is_training:
        return create_transform(
            data_config['input_size'], is_training=True, use_prefetcher=use_prefetcher, no_aug=args.no_aug,
            scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
            auto_augment=None if args.aa in (None, 'none', '') else args.aa,
            interpolation=args.train_interpolation, mean=data_config['mean'], std=data_config['std'],
            re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
    return create_transform(
        data_config['input_size'], is_training=False, use_prefetcher=use_prefetcher,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        crop_pct=data_config['crop_pct'])


def build_loader(dataset, batch_size: int, env, *, is_training: bool, workers: int, seed: int,
                 use_prefetcher: bool, data_config: dict, pin_memory: bool = False, re_args=None):
    """DataLoader over a ResumableSampler; on accelerators, timm's PrefetchLoader normalizes on the device."""
    from timm.data.loader import fast_collate
    from models.timm_compat import prefetch_loader as PrefetchLoader  # timm 0.4.12's is CUDA-only
    sampler = ResumableSampler(len(dataset), shuffle=is_training, seed=seed, rank=env.rank,
                               world_size=env.world_size, pad=is_training)
    loader = tud.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        collate_fn=fast_collate if use_prefetcher else None, pin_memory=pin_memory,
        drop_last=is_training, persistent_workers=False,
        # A private generator: creating an iterator must not consume the global torch RNG (exact resume).
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=loader_worker_init,  # workers outlive a preemption signal until the main process has saved
    )
    if use_prefetcher:
        re_prob, re_mode, re_count = re_args if (is_training and re_args) else (0., 'const', 1)
        loader = PrefetchLoader(loader, mean=data_config['mean'], std=data_config['std'],
                                channels=data_config['input_size'][0], device=env.device,
                                re_prob=re_prob, re_mode=re_mode, re_count=re_count)
    return loader, sampler


def resolve_data_dir(data_dir: Optional[str], default_root: str = 'data/digits') -> str:
    """No DATA_DIR: the built-in digits set, written once under data/digits."""
    if data_dir:
        return data_dir
    from .digits import write_digits
    return write_digits(default_root)


def build_datasets(args, data_config: dict, use_prefetcher: bool, need_train: bool = True,
                   class_names: Optional[List[str]] = None):
    """(train_dataset or None, eval_dataset, class_names) for --dataset folder|synthetic, with checks.
    `class_names` (e.g. from a checkpoint) fixes the class order; --class-map takes precedence."""
    if args.dataset == 'synthetic':
        n_cls = args.num_classes or 1000
        size = data_config['input_size']
        train = SyntheticDataset(max(args.batch_size * 64, 256), n_cls, size, args.seed, use_prefetcher)
        val = SyntheticDataset(max(args.validation_batch_size or args.batch_size, 64), n_cls, size, args.seed + 1,
                               use_prefetcher)
        return (train if need_train else None), val, train.classes
    if args.dataset not in ('', 'folder', 'imagefolder'):
        raise DataError(f'--dataset {args.dataset!r} is not one of: folder (ImageFolder tree), synthetic')
    root = args.data_dir
    if not os.path.isdir(root):
        raise DataError(f'data directory not found: {root}')
    if args.class_map:
        class_names = load_class_map(args.class_map)
    train_ds = None
    if need_train:
        train_dir = find_split(root, args.train_split)
        if train_dir is None:
            raise DataError(f'{root}: no training split (expected folder {os.path.join(root, args.train_split)}/)')
        train_ds = ImageFolderDataset(train_dir, build_transform(args, data_config, True, use_prefetcher),
                                      class_names, seed=args.seed)
        class_names = train_ds.classes
    val_dir = find_split(root, args.val_split, ('val', 'validation'))
    if val_dir is None:
        raise DataError(f'{root}: no validation split (expected {args.val_split}/, val/ or validation/)')
    val_ds = ImageFolderDataset(val_dir, build_transform(args, data_config, False, use_prefetcher), class_names,
                                seed=args.seed)
    return train_ds, val_ds, val_ds.classes


def _posterize_any_bits(img, bits_to_keep, **kwargs):
    """timm's RandAugment asks Pillow to posterize to 0 bits at the top magnitude of `PosterizeIncreasing`;
    Pillow >= 12 rejects 0 ("bits must be between 1 and 8") and the default recipe would crash at random.
    Older Pillow returned an all-black image for 0 bits (mask 0): do exactly that, else defer to timm."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return _timm_posterize(img, bits_to_keep, **kwargs)


def _patch_timm_posterize():
    from timm.data import auto_augment
    global _timm_posterize
    _timm_posterize = auto_augment.posterize
    for name, fn in list(auto_augment.NAME_TO_OP.items()):
        if fn is _timm_posterize:
            auto_augment.NAME_TO_OP[name] = _posterize_any_bits


_timm_posterize = None
_patch_timm_posterize()

# Truncated JPEGs must raise, not decode silently to a grey bottom (PIL's default is to raise; keep it so).
ImageFile.LOAD_TRUNCATED_IMAGES = False
