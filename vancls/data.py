"""Data: ImageFolder trees checked up front, robust image decoding, deterministic per-sample augmentation,
a resumable distributed sampler, and loaders built from timm's transforms.

Why not timm's create_loader: exact mid-epoch resume needs a sampler that can start at a given position and
augmentation randomness that depends only on (seed, epoch, sample index), not on which worker ran which batch;
timm's loader builds its own sampler and seeds workers per epoch. The transforms, collate, device-side
normalization (PrefetchLoader) and mixup are timm's.
"""
import logging
import math
import multiprocessing as mp
import os
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.utils.data as tud
from PIL import Image, ImageFile

from .errors import DataError  # one module for the error classes
from .preempt import loader_worker_init
from .samples import (IMG_EXTENSIONS, decode_rgb, find_split, load_class_map, open_rgb,  # noqa: F401 (API)
                      preserved_global_streams, reseed_global_streams, sample_seed, scan_image_folder)

_logger = logging.getLogger('vancls')


class SeededDataset(tud.Dataset):
    """A map-style data set whose augmentation is a function of (seed, epoch, index) only: subclasses give
    `_load(index)`, which reseeds the global RNG streams per sample (reseed_global_streams) before transforming."""
    seed, epoch, transform = 0, 0, None  # set by the subclass's __init__ and by set_epoch

    def set_epoch(self, epoch: int):
        self.epoch = epoch

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


class ImageFolderDataset(SeededDataset):
    """An ImageFolder that survives bad files and augments deterministically.

    A file that cannot be decoded is reported once by name (logged as a warning), flagged in a shared byte array
    (so the count is exact across loader workers and epochs), and replaced by the next readable sample.
    """

    def __init__(self, root: str, transform=None, class_names: Optional[List[str]] = None, seed: int = 0):
        self.root = root
        self.samples, self.classes = self._scan(root, class_names)
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        # One byte per sample in shared memory: loader workers (fork or spawn) inherit it with the dataset.
        self._bad = mp.Array('b', len(self.samples), lock=False)

    def __len__(self) -> int:
        return len(self.samples)

    @staticmethod
    def _scan(root: str, class_names: Optional[List[str]]):
        return scan_image_folder(root, class_names)

    def _open_image(self, path: str) -> Image.Image:
        return open_rgb(path)

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
                img = self._open_image(path)
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


def _tar_split_members(tar_path: str, split_names: Sequence[str]):
    """(split name, {class name: [(member name, data offset, size)]}) of the first split folder found inside an
    ImageFolder tree packed as one .tar (at its top or under one leading folder), or None."""
    import tarfile
    members = {}
    with tarfile.open(tar_path, 'r:') as tar:  # headers only: a local tar is seeked through, never read whole
        for m in tar:
            if m.isfile() and m.name.lower().endswith(IMG_EXTENSIONS):
                members[m.name.lstrip('./')] = (m.offset_data, m.size)
    for split in split_names:
        found = {}
        for name, (offset, size) in members.items():
            parts = name.split('/')
            for depth in (0, 1):  # SPLIT/CLASS/.../FILE or TOP/SPLIT/CLASS/.../FILE
                if len(parts) >= depth + 3 and parts[depth] == split:
                    found.setdefault(parts[depth + 1], []).append((name, offset, size))
                    break
        if found:
            return split, found
    return None


class TarImageFolderDataset(ImageFolderDataset):
    """An ImageFolder tree packed as one .tar (the reference's timm 0.4.12 read DATA_DIR.tar): the same checks,
    bad-image handling and deterministic augmentation as the folder, reading each image at its offset in the tar."""

    def __init__(self, tar_path: str, split_names: Sequence[str], transform=None,
                 class_names: Optional[List[str]] = None, seed: int = 0):
        found = _tar_split_members(tar_path, split_names)
        if found is None:
            raise DataError(f'{tar_path}: no {" or ".join(dict.fromkeys(split_names))} folder of class folders in '
                            f'the archive (expected {split_names[0]}/<class>/<images> inside)')
        self._split, self._members, self._file = found[0], found[1], None
        super().__init__(tar_path, transform, class_names, seed)

    def _scan(self, root: str, class_names: Optional[List[str]]):
        where = f'{root}:{self._split}'
        found = sorted(self._members)
        if class_names is not None and set(class_names) != set(found):
            missing, extra = sorted(set(class_names) - set(found)), sorted(set(found) - set(class_names))
            raise DataError(f'{where}: classes differ from the training classes'
                            + (f'; missing: {", ".join(missing[:20])}' if missing else '')
                            + (f'; not in train: {", ".join(extra[:20])}' if extra else ''))
        names = list(class_names) if class_names is not None else found
        self._where = {n: (o, s) for members in self._members.values() for n, o, s in members}
        samples = [(n, idx) for idx, c in enumerate(names) for n, _, _ in sorted(self._members[c])]
        return samples, names

    def __getstate__(self):  # each loader worker opens the archive itself
        return dict(self.__dict__, _file=None)

    def _open_image(self, name: str) -> Image.Image:
        import io
        if self._file is None or self._file[0] != os.getpid():
            self._file = (os.getpid(), open(self.root, 'rb'))
        offset, size = self._where[name]
        f = self._file[1]
        f.seek(offset)
        return decode_rgb(io.BytesIO(f.read(size)))


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


class TimmDataset(SeededDataset):
    """A map-style data set from timm's create_dataset (hfds/, torch/) with this project's guarantees: the
    transform runs here, reseeded per (seed, epoch, index) as the folder's, so a ResumableSampler resumes it exactly.
    timm's transform is left unset: the wrapped set yields (PIL image, target)."""

    def __init__(self, ds, transform, seed: int, classes: List[str]):
        self.ds, self.transform, self.seed, self.epoch, self.classes = ds, transform, seed, 0, classes
        self.bad_files: List[str] = []

    def __len__(self) -> int:
        return len(self.ds)

    def _load(self, index: int):
        img, target = self.ds[index]
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img))
        img = img if img.mode == 'RGB' else img.convert('RGB')
        if self.transform is not None:
            reseed_global_streams(sample_seed(self.seed, self.epoch, index))
            img = self.transform(img)
        return img, int(target)


class StreamedDataset(tud.IterableDataset):
    """hfids/ and tfds/: timm's iterable readers, which split the stream over ranks and workers themselves and
    shuffle with their own seeds; an epoch stopped in the middle restarts (no exact resume: use wds/ shards)."""

    def __init__(self, ds, classes: List[str]):
        self.ds, self.classes, self.bad_files = ds, classes, []

    def __iter__(self):
        return iter(self.ds)

    def __len__(self) -> int:
        return len(self.ds)

    def set_epoch(self, epoch: int):
        self.ds.set_epoch(epoch)


class EpochOnlySampler:
    """The sampler interface train.py drives (set_epoch(epoch, start), len in samples) for a streamed data set."""

    def __init__(self, dataset, batch_size: int, drop_last: bool):
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last

    def set_epoch(self, epoch: int, start: int = 0):
        if start:
            _logger.warning(f'{type(self.dataset.ds).__name__}: a streamed data set cannot resume inside an epoch; '
                            f'epoch {epoch} restarts from its first batch')
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size * self.batch_size if self.drop_last else n


def build_loader(dataset, batch_size: int, env, *, is_training: bool, workers: int, seed: int,
                 use_prefetcher: bool, data_config: dict, pin_memory: bool = False, re_args=None):
    """DataLoader over a ResumableSampler (folders, tars, hfds/, torch/), a ShardSampler (wds/ shards) or the
    streamed set's own order (hfids/, tfds/); on accelerators, timm's PrefetchLoader normalizes on the device."""
    from timm.data.loader import fast_collate
    from models.timm_compat import prefetch_loader as PrefetchLoader  # timm 0.4.12's is CUDA-only
    from .shards import ShardDataset, ShardSampler
    kwargs = {}
    if isinstance(dataset, ShardDataset):
        sampler = ShardSampler(dataset.data.lengths, batch_size, shuffle=is_training, seed=seed, rank=env.rank,
                               world_size=env.world_size, workers=workers, pad=is_training)
    elif isinstance(dataset, StreamedDataset):
        sampler = EpochOnlySampler(dataset, batch_size, drop_last=is_training)
        if hasattr(dataset.ds, 'set_loader_cfg'):  # timm's readers split the stream by the loader's workers
            dataset.ds.set_loader_cfg(num_workers=workers)
    else:
        sampler = ResumableSampler(len(dataset), shuffle=is_training, seed=seed, rank=env.rank,
                                   world_size=env.world_size, pad=is_training)
    if not isinstance(dataset, StreamedDataset):
        kwargs['sampler'] = sampler
    loader = tud.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers,
        collate_fn=fast_collate if use_prefetcher else None, pin_memory=pin_memory,
        drop_last=is_training, persistent_workers=False,
        # A private generator: creating an iterator must not consume the global torch RNG (exact resume).
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=loader_worker_init,  # workers outlive a preemption signal until the main process has saved
        **kwargs)
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


FOLDER_NAMES = ('', 'folder', 'imagefolder')
TIMM_PREFIXES = ('wds', 'hfds', 'hfids', 'torch', 'tfds')
# What a timm data set name needs installed: (module, pip package).
_PACKAGES = {'wds': ('webdataset', 'webdataset'), 'hfds': ('datasets', 'datasets'), 'hfids': ('datasets', 'datasets'),
             'torch': ('torchvision', 'torchvision'), 'tfds': ('tensorflow_datasets', 'tensorflow-datasets tensorflow')}
DATASET_CHOICES = ('folder (ImageFolder tree, or a .tar of it, or a WebDataset shard folder/pattern)', 'synthetic',
                   *(f'{p}/NAME' for p in TIMM_PREFIXES))


def dataset_kind(args) -> str:
    """'synthetic', 'folder', 'tar', or a timm prefix (wds, hfds, ...); a shard folder or pattern given as
    DATA_DIR with --dataset folder (the launch scripts' --data_path) reads as wds."""
    name = args.dataset or ''
    if name == 'synthetic':
        return 'synthetic'
    prefix, sep, rest = name.partition('/')
    if sep and prefix.lower() in TIMM_PREFIXES and rest:
        kind = prefix.lower()
    elif name.lower() in FOLDER_NAMES:
        kind = 'folder'
    else:
        raise DataError(f'--dataset {name!r} is not one of: {", ".join(DATASET_CHOICES)}')
    if kind != 'folder':
        return kind
    from .shards import INFO_NAME, is_shard_pattern, is_url
    root = args.data_dir or ''
    info_beside = os.path.isfile(os.path.join(os.path.dirname(root) or '.', INFO_NAME))  # a shard of a shard folder
    if is_url(root) or os.path.isfile(os.path.join(root, INFO_NAME)) or (
            is_shard_pattern(root) and ('{' in root or info_beside)):
        return 'wds'
    return 'tar' if root.endswith('.tar') else 'folder'


def check_package(kind: str):
    import importlib.util
    module, package = _PACKAGES[kind]
    if importlib.util.find_spec(module) is None:
        raise DataError(f'--dataset {kind}/...: the {module} package is missing: pip install {package}')


def _folder_or_tar(args, kind: str, transform, split: str, fallbacks: Sequence[str], class_names, what: str):
    root = args.data_dir
    names = list(dict.fromkeys((split, *fallbacks)))  # --val-split val: 'val/ or validation/', not val/ twice
    if kind == 'tar':
        if not os.path.isfile(root):
            raise DataError(f'data archive not found: {root}')
        return TarImageFolderDataset(root, names, transform, class_names, seed=args.seed)
    if not os.path.isdir(root):
        raise DataError(f'data directory not found: {root}')
    found = find_split(root, split, fallbacks)
    if found is None:
        raise DataError(f'{root}: no {what} split (expected {" or ".join(n + "/" for n in names)} in {root})')
    return ImageFolderDataset(found, transform, class_names, seed=args.seed)


def _timm_dataset(args, kind: str, transform, split: str, is_training: bool, class_names):
    """hfds/, hfids/, torch/, tfds/ through timm's create_dataset, with timm's train.py meanings of the flags."""
    from timm.data import create_dataset
    from .reference_compat import reference_option
    try:
        ds = create_dataset(args.dataset, root=args.data_dir, split=split, is_training=is_training,
                            class_map=args.class_map or None, download=reference_option(args, 'dataset_download'),
                            batch_size=args.batch_size, seed=args.seed, input_img_mode='RGB')
    except ImportError as e:
        raise DataError(f'--dataset {args.dataset}: {e}; pip install {_PACKAGES[kind][1]}') from None
    except (OSError, RuntimeError, ValueError, AssertionError, KeyError) as e:
        raise DataError(f'--dataset {args.dataset} (root {args.data_dir}, split {split}): {type(e).__name__}: {e}') \
            from None
    classes = list(class_names or getattr(ds, 'classes', None) or _timm_class_names(ds))
    if isinstance(ds, tud.IterableDataset):
        ds.transform = transform
        return StreamedDataset(ds, classes)
    if hasattr(ds, 'transform'):
        ds.transform = None
    return TimmDataset(ds, transform, args.seed, classes)


def _timm_class_names(ds) -> List[str]:
    reader = getattr(ds, 'reader', None)
    mapping = getattr(reader, 'class_to_idx', None) or {}
    if mapping:
        return [n for n, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
    n = getattr(ds, 'num_classes', None) or getattr(reader, 'num_classes', None)
    if not n:
        raise DataError(f'--dataset {type(ds).__name__}: the number of classes is unknown: give --num-classes and '
                        f'--class-map')
    return [str(i) for i in range(n)]


def _wds_dataset(args, transform, split: str, is_training: bool, pattern_is_split: bool, class_names):
    """wds/NAME: DATA_DIR is a shard folder or URL base with _info.json (splits by name), or a brace pattern /
    single shard: those shards are the training split (train.py) or the evaluated one (validate.py), and the
    other split is looked up by name in the _info.json beside them."""
    from .shards import ShardDataset, _dirname, is_shard_pattern
    location = args.data_dir
    if is_shard_pattern(location) and not pattern_is_split:
        location = _dirname(location)
    if not is_training and split == 'val' and not is_shard_pattern(location):
        split = _wds_val_split(location)
    return ShardDataset(location, split, transform, seed=args.seed, class_names=class_names)


def _build_one(args, kind, data_config, use_prefetcher, is_training, class_names, pattern_is_split=True):
    split = args.train_split if is_training else args.val_split
    transform = build_transform(args, data_config, is_training, use_prefetcher)
    if kind in ('folder', 'tar'):
        fallbacks = () if is_training else ('val', 'validation')
        return _folder_or_tar(args, kind, transform, split, fallbacks, class_names,
                              'training' if is_training else 'validation')
    if kind == 'wds':
        return _wds_dataset(args, transform, split, is_training, pattern_is_split, class_names)
    if kind == 'hfds' and not is_training and split == 'val':
        return _hfds_val_dataset(args, transform, class_names)
    return _timm_dataset(args, kind, transform, split, is_training, class_names)


def _hfds_val_dataset(args, transform, class_names):
    """--val-split val (the default) falls back to validation, as the folder's: `datasets` names the split of an
    imagefolder's val/ 'validation'. The error of the split asked for (it lists the set's splits) is the one shown."""
    try:
        return _timm_dataset(args, 'hfds', transform, 'val', False, class_names)
    except DataError as e:
        try:
            return _timm_dataset(args, 'hfds', transform, 'validation', False, class_names)
        except DataError:
            raise e from None


def _wds_val_split(location: str) -> str:
    """--val-split val (the default) falls back to validation, as the folder's."""
    from .shards import load_info
    splits = load_info(location).get('splits') or {}
    return next((s for s in ('val', 'validation') if s in splits), 'val')


class EmptyDataset(tud.Dataset):
    """The evaluation set of a --no-eval run: nothing is read."""

    def __init__(self, classes: List[str]):
        self.classes, self.bad_files = classes, []

    def __len__(self) -> int:
        return 0

    def __getitem__(self, index):
        raise IndexError(index)


def build_datasets(args, data_config: dict, use_prefetcher: bool, need_train: bool = True,
                   class_names: Optional[List[str]] = None, need_eval: bool = True):
    """(train_dataset or None, eval_dataset, class_names) for --dataset (see dataset_kind), with checks.
    `class_names` (e.g. from a checkpoint) fixes the class order; --class-map takes precedence (for timm's readers
    it is passed on, as timm's train.py does). need_eval False (--no-eval): no evaluation split is read."""
    if args.dataset == 'synthetic':
        n_cls = args.num_classes or 1000
        size = data_config['input_size']
        train = SyntheticDataset(max(args.batch_size * 64, 256), n_cls, size, args.seed, use_prefetcher)
        val = SyntheticDataset(max(args.validation_batch_size or args.batch_size, 64), n_cls, size, args.seed + 1,
                               use_prefetcher)
        return (train if need_train else None), val, train.classes
    kind = dataset_kind(args)
    if kind in _PACKAGES:
        check_package(kind)  # before any work: one line naming what to install
    if args.class_map and kind in ('folder', 'tar', 'wds'):
        class_names = load_class_map(args.class_map)
    train_ds = None
    if need_train:
        train_ds = _build_one(args, kind, data_config, use_prefetcher, True, class_names)
        class_names = train_ds.classes
    if not need_eval:
        return train_ds, EmptyDataset(list(class_names)), list(class_names)
    val_ds = _build_one(args, kind, data_config, use_prefetcher, False, class_names, pattern_is_split=not need_train)
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
