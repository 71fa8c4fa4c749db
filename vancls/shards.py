"""WebDataset shards: the converter (`python -m vancls.shards SRC_TREE OUT_DIR`), and exactly-once, exactly
resumable reading for `--dataset wds/NAME`.

Layout (what timm's `wds/` reader reads unchanged): OUT_DIR/NAME-SPLIT-000000.tar ... holding per sample
`KEY.jpg` (or .png, ...: the source file's bytes), `KEY.cls` (the class index as ASCII) and `KEY.json`
({"filename": the source path relative to SRC_TREE}); OUT_DIR/_info.json holds, per split, `num_samples`,
`filenames` and `shard_lengths`, plus `classes` (class folder names in index order) and the per-class counts.

Why our own reading order and not timm's ReaderWds: timm shuffles shards per worker and cuts every worker's stream
at a fixed sample count (`with_epoch`), so samples repeat or go missing across ranks, and an epoch cannot be
resumed in the middle. Here the order is a pure function of (seed, epoch, rank, worker) computed from
`shard_lengths` (ShardSampler); each loader worker reads its own contiguous stretch of the stream sequentially
(ShardDataset), so samples skipped on resume are passed over without being decoded.
"""
import argparse
import contextlib
import io
import json
import logging
import math
import multiprocessing as mp
import os
import random
import re
import struct
import sys
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch.utils.data as tud

from .errors import DataError
from .samples import (decode_rgb, preserved_global_streams, reseed_global_streams, sample_seed,
                      scan_image_folder)

_logger = logging.getLogger('vancls')

INFO_NAME = '_info.json'
# A sample's image member, by extension, in the order looked for (webdataset's names; the converter writes jpg for
# .jpeg files).
IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp', 'ppm', 'bmp', 'pgm', 'tif', 'tiff')
# Samples shuffled together inside one shard (a window of the stream that a worker reads and keeps as raw bytes).
SHUFFLE_WINDOW = 256
# Contiguous stretches each rank's epoch is cut into (at least; more when there are more loader workers). Fixed, so
# that the order does not depend on the loader's worker count up to this many: a run resumed with another -j (the
# default follows the CPUs of the machine it lands on) continues the same order. With 1, 2, 4 or 8 workers each
# worker reads whole stretches forward; with another count they are shared and read with skips.
BLOCKS_PER_RANK = 8
_SIZE_UNITS = {'': 1, 'b': 1, 'kb': 10 ** 3, 'mb': 10 ** 6, 'gb': 10 ** 9, 'tb': 10 ** 12,
               'kib': 2 ** 10, 'mib': 2 ** 20, 'gib': 2 ** 30, 'tib': 2 ** 40}


def _data_error(msg):
    return DataError(msg)


def _require_webdataset():
    try:
        import webdataset  # noqa: F401
    except ImportError:
        raise _data_error('--dataset wds/...: the webdataset package is missing: pip install webdataset') from None
    return webdataset


def parse_size(text: str) -> int:
    """'1GB', '500MB', '64MiB', '1000000' -> bytes."""
    m = re.fullmatch(r'\s*([0-9.]+)\s*([a-zA-Z]*)\s*', str(text))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise _data_error(f'--shard-size {text!r}: expected a size such as 1GB, 500MB, 64MiB or a number of bytes')
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


# ---------------------------------------------------------------------------------------------- reading shards

def is_url(path: str) -> bool:
    return '://' in path or path.startswith('pipe:')


def is_shard_pattern(path: str) -> bool:
    """A brace pattern or a single shard name: `.../train-{000000..000127}.tar`."""
    return ('{' in path and '..' in path) or path.endswith('.tar')


def _join(root: str, name: str) -> str:
    return root.rstrip('/') + '/' + name if is_url(root) else os.path.join(root, name)


def _dirname(path: str) -> str:
    return path.rsplit('/', 1)[0] if is_url(path) else os.path.dirname(path)


def open_stream(url: str):
    """A binary file object: local paths are opened seekable; URLs (http, https, pipe:, ...) through webdataset's
    gopen, which streams them (curl for http)."""
    if not is_url(url):
        return open(url, 'rb')
    return _require_webdataset().gopen(url, 'rb')


def load_info(root: str) -> dict:
    url = _join(root, INFO_NAME)
    try:
        with open_stream(url) as f:
            return json.loads(f.read().decode('utf-8'))
    except (OSError, ValueError) as e:
        raise _data_error(f'{url}: cannot read the shard index ({type(e).__name__}: {e}); write shards with '
                          f'python -m vancls.shards SRC_TREE OUT_DIR') from None


class ShardSplit:
    """One split of a shard set: shard URLs, their sample counts and the class names (from `_info.json`).

    `location` is a folder or URL base holding `_info.json` (the split is then `split`, a name in it, or a
    brace pattern of file names as timm's `--train-split 'name-train-{0000..0127}.tar'`), or a brace pattern /
    single shard path whose folder holds `_info.json`."""

    def __init__(self, location: str, split: str):
        _require_webdataset()
        from webdataset.shardlists import expand_urls
        if is_shard_pattern(location):
            root, split = _dirname(location), os.path.basename(location)
        else:
            root = location
        info = load_info(root)
        splits = info.get('splits') or {}
        if is_shard_pattern(split):
            lengths = {f: n for s in splits.values() for f, n in zip(s['filenames'], s['shard_lengths'])}
            names = expand_urls(split)
            unknown = [n for n in names if n not in lengths]
            if unknown:
                raise _data_error(f'{_join(root, INFO_NAME)} has no sample count for {", ".join(unknown[:5])} '
                                  f'(the shards of the pattern {split} must be listed there)')
            self.filenames, self.lengths = list(names), [lengths[n] for n in names]
        else:
            if split not in splits:
                raise _data_error(f'{_join(root, INFO_NAME)}: no split {split!r} (it has: {", ".join(splits)})')
            self.filenames, self.lengths = list(splits[split]['filenames']), list(splits[split]['shard_lengths'])
        self.root, self.split = root, split
        self.urls = [_join(root, f) for f in self.filenames]
        self.classes = list(info.get('classes') or [])
        self.num_samples = int(sum(self.lengths))
        # First canonical sample index of each shard: a sample's identity (uid) for augmentation seeds and logs.
        self.first_uid = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        if self.num_samples == 0:
            raise _data_error(f'{_join(root, INFO_NAME)}: split {split!r} has no samples')


def _tar_error(msg):
    return tarfile.ReadError(msg)


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise _tar_error(f'unexpected end of data ({len(data)} of {n} bytes)')
    return data


def _skip(f, n: int, streaming: bool):
    if not streaming:
        f.seek(n, os.SEEK_CUR)
        return
    while n > 0:  # a stream cannot seek: read and drop, in bounded pieces
        n -= len(_read_exact(f, min(n, 1 << 20)))


# The header fields read: name, size, checksum, type, magic, prefix (at offsets 0, 124, 148, 156, 257, 345). Only
# POSIX ustar/pax headers (magic 'ustar\0') have a name prefix there; GNU ones ('ustar ') keep other fields in it.
_TAR_HEADER = struct.Struct('100s24x12s12x8s1s100x6s82x155s12x')


def _tar_header(hdr: bytes) -> Tuple[bytes, int, bytes]:
    """(name, size, type) of one 512-byte tar header, checksum checked. Python's tarfile parses every header field
    in Python (several times the cost of this per member); here only name, size, type and checksum are read.
    The checksum (the header's byte sum, its own 8 bytes counted as spaces) is compared modulo 65521, because
    zlib's adler32 gives the byte sum modulo 65521 in C, where sum() over 512 bytes costs more than the rest of the
    parsing: a corrupt header passes only if its stored sum is off by exactly a multiple of 65521."""
    name, size_field, checksum, kind, magic, prefix = _TAR_HEADER.unpack(hdr)
    stored = int(checksum.strip(b' \0') or b'0', 8)
    if (stored - 255 + sum(checksum) - (zlib.adler32(hdr) & 0xffff)) % 65521:
        raise _tar_error('bad header checksum')
    size = (int.from_bytes(size_field[1:], 'big') if size_field[0] & 0x80
            else int(size_field.strip(b' \0') or b'0', 8))
    name = name.split(b'\0', 1)[0]
    if magic == b'ustar\0' and prefix[0]:
        name = prefix.split(b'\0', 1)[0] + b'/' + name
    return name, size, kind


def _long_name(kind: bytes, data: bytes, previous: Optional[bytes]) -> Optional[bytes]:
    """The next member's name from a GNU long-name (L) or pax (x) record's data."""
    if kind == b'L':
        return data.split(b'\0', 1)[0]
    return next((r.split(b'=', 1)[1] for r in (line.split(b' ', 1)[-1] for line in data.split(b'\n'))
                 if r.startswith(b'path=')), previous)


def _split_key(name: str) -> Tuple[Optional[str], Optional[str]]:
    """(KEY, EXT) of a member name KEY.EXT (the extension starts at the first dot of the file name), as webdataset's
    base_plus_ext splits it; its regular expression is only run for the odd names (no dot, a leading dot)."""
    slash = name.rfind('/')
    dot = name.find('.', slash + 1)
    if dot > slash + 1:
        return name[:dot], name[dot + 1:]
    from webdataset.tariterators import base_plus_ext
    return base_plus_ext(name)


def iter_tar_samples(fileobj, want=lambda index: True, streaming: bool = True):
    """(index in shard, key, {extension: bytes or None}) for each sample of one tar, in order: consecutive regular
    members with the same key (webdataset's naming, KEY.EXT) are one sample. `want(index)` False: the sample's
    members are passed over unread (seeked past on a local file, read and dropped on a stream), never decoded.
    GNU long names and pax `path` records are honoured; other special members are passed over. One loop reads the
    headers and the data (no per-member generator or call layers: this runs for every member, also skipped ones)."""
    read = fileobj.read
    if streaming:
        def skip(n):
            _skip(fileobj, n, True)
    else:
        def skip(n):
            fileobj.seek(n, os.SEEK_CUR)
    index, key, parts, take, long_name = -1, None, {}, False, None
    while True:
        hdr = read(512)
        if len(hdr) != 512:
            if not hdr:
                break  # end of archive (a missing end marker is caught by the sample counts)
            raise _tar_error(f'truncated header ({len(hdr)} bytes)')
        if hdr == b'\0' * 512:
            break
        name, size, kind = _tar_header(hdr)
        padded = size + (-size % 512)
        if kind in (b'L', b'x'):
            long_name = _long_name(kind, _read_exact(fileobj, size), long_name)
            skip(padded - size)
            continue
        if long_name is not None:
            name, long_name = long_name, None
        k, ext = _split_key(name.decode('utf-8', 'surrogateescape')) if kind in (b'0', b'\0', b'7') else (None, None)
        if k is None:
            skip(padded)
            continue
        if k != key:
            if key is not None:
                yield index, key, parts
            index, key, parts = index + 1, k, {}
            take = want(index)
        if take:
            data = read(size)
            if len(data) != size:
                raise _tar_error(f'unexpected end of data ({len(data)} of {size} bytes)')
            parts[ext] = data
            if padded != size:
                skip(padded - size)
        else:
            parts[ext] = None
            skip(padded)
    if key is not None:
        yield index, key, parts


def sample_image(parts: dict) -> Tuple[Optional[str], Optional[bytes]]:
    """(extension, bytes) of a sample's image member (the first of IMAGE_EXTS present), or (None, None)."""
    return next(((e, parts[e]) for e in IMAGE_EXTS if parts.get(e) is not None), (None, None))


class _ShardCursor:
    """One open shard, read forward: the next sample index and the open iterator."""

    def __init__(self, shard: int, url: str, want):
        self.shard, self.url, self.next_index = shard, url, 0
        self.fileobj = open_stream(url)
        self.samples = iter_tar_samples(self.fileobj, want, streaming=is_url(url))

    def close(self):
        try:  # a stream dropped early (curl: broken pipe) or a failed one may report an error on close: not ours
            self.samples.close()
            self.fileobj.close()
        except Exception:  # noqa: BLE001
            pass


class _Block:
    """A worker's reading state for one block of the stream: its open shard and its current window's read-ahead."""

    def __init__(self):
        self.cursor: Optional[_ShardCursor] = None
        self.window: Optional[Tuple[int, int]] = None  # (shard, first offset of the window)
        self.cache: Dict[int, dict] = {}  # offset -> raw parts, read ahead inside the window

    def want(self, index: int) -> bool:
        # Samples before the current window were consumed before a resume (or are other blocks'): never read.
        return index >= self.window[1]

    def close(self):
        if self.cursor is not None:
            self.cursor.close()
        self.cursor = None


class ShardDataset(tud.Dataset):
    """Samples of a shard split, fetched by the items of a ShardSampler: (shard, offset, uid, window start, block).

    Each loader worker reads the stretches (blocks) of the stream it is given forward, with one open shard per
    block; the samples of a block's current shuffle window are kept as raw bytes until asked for. A sample that
    cannot be decoded, or a shard that cannot be opened or ends early (missing, truncated), is logged by name,
    flagged in a shared byte array (exact counts over workers) and replaced by a readable sample of the same batch,
    so the run goes on; a shard skipped in one epoch is tried again in the next.
    """

    def __init__(self, location: str, split: str, transform=None, seed: int = 0, class_names=None):
        self.data = ShardSplit(location, split)
        self.classes = list(class_names or self.data.classes)
        # --class-map or a checkpoint's class order: the stored .cls indices (in _info.json's order) are remapped.
        self._remap = None
        if self.data.classes and self.classes != self.data.classes:
            if set(self.classes) != set(self.data.classes):
                raise _data_error(f'{self.data.root}: the shards\' classes ({", ".join(self.data.classes[:10])} ...) '
                                  f'differ from the expected ones ({", ".join(self.classes[:10])} ...)')
            self._remap = [self.classes.index(c) for c in self.data.classes]
        self.transform, self.seed, self.epoch = transform, seed, 0
        self.root = location
        self._bad = mp.Array('b', self.data.num_samples, lock=False)
        self._blocks: Dict[int, _Block] = {}
        self._dead: Dict[int, int] = {}  # shard -> first offset that could not be read (this process)
        self._last_good = None

    def __len__(self) -> int:
        return self.data.num_samples

    def set_epoch(self, epoch: int):
        self.epoch = epoch
        for block in self._blocks.values():  # loading in this process (no workers): start the epoch afresh
            block.close()
        self._blocks, self._dead = {}, {}

    @property
    def bad_files(self) -> List[str]:
        flags = np.flatnonzero(np.frombuffer(self._bad, dtype=np.int8))
        shards = np.searchsorted(self.data.first_uid, flags, side='right') - 1
        return [f'{self.data.urls[s]}#{u - self.data.first_uid[s]}' for s, u in zip(shards, flags)]

    def __getstate__(self):  # loader workers start with no open shard
        state = dict(self.__dict__)
        state.update(_blocks={}, _dead={}, _last_good=None)
        return state

    def _raw(self, shard: int, offset: int, window: int, block: int) -> Optional[dict]:
        """The raw parts of one sample, or None when its shard is unreadable there (logged and flagged once)."""
        b = self._blocks.setdefault(block, _Block())
        if (shard, window) != b.window:
            b.cache.clear()
            b.window = (shard, window)
        if offset in b.cache:
            return b.cache.pop(offset)
        if offset >= self._dead.get(shard, 1 << 62):
            return None
        next_index = 0
        try:
            c = b.cursor
            if c is None or c.shard != shard or c.next_index > offset:
                b.close()
                b.cursor = c = _ShardCursor(shard, self.data.urls[shard], b.want)
            while True:
                next_index = c.next_index
                index, key, parts = next(c.samples)
                c.next_index = next_index = index + 1
                parts['__key__'] = key  # parts is this sample's own dict: no copy
                if index == offset:
                    return parts
                if b.want(index):
                    b.cache[index] = parts
        except StopIteration:
            err = f'ends after {next_index} of {self.data.lengths[shard]} samples'
        except Exception as e:  # noqa: BLE001 - a read error, a bad header, curl's exit status: all 'unreadable'
            err = f'{type(e).__name__}: {e}'
        b.close()
        self._dead[shard] = min(offset, next_index)
        first, n = self.data.first_uid[shard], self.data.lengths[shard]
        lost = range(first + self._dead[shard], first + n)
        for u in lost:
            self._bad[u] = 1
        _logger.warning(f'shard skipped from sample {self._dead[shard]}: {self.data.urls[shard]} ({err}); '
                        f'{len(lost)} samples lost')
        return None

    def target(self, raw: dict) -> int:
        target = int(raw['cls'])
        return self._remap[target] if self._remap is not None else target

    def decode(self, raw: dict, uid: int):
        """(image, target) of one sample; augmentation seeded by (seed, epoch, uid) as the folder's."""
        data = sample_image(raw)[1]
        if data is None:
            raise _data_error(f'sample {raw.get("__key__")}: no image member (.jpg, .png, ...)')
        img, target = decode_rgb(io.BytesIO(data)), self.target(raw)
        if self.transform is not None:
            reseed_global_streams(sample_seed(self.seed, self.epoch, uid))
            img = self.transform(img)
        return img, target

    def _load(self, item) -> Optional[tuple]:
        shard, offset, uid, window, block = item
        raw = self._raw(shard, offset, window, block)
        if raw is None:
            return None
        try:
            return self.decode(raw, uid)
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError
            if not self._bad[uid]:
                self._bad[uid] = 1
                _logger.warning(f'bad image skipped: {self.data.urls[shard]}#{raw.get("__key__")} '
                                f'({type(e).__name__}: {e})')
            return None

    def __getitems__(self, items: Sequence) -> list:
        in_main = self.transform is not None and tud.get_worker_info() is None  # see ImageFolderDataset.__getitems__
        with preserved_global_streams() if in_main else contextlib.nullcontext():
            out = [self._load(tuple(it)) for it in items]
        good = [o for o in out if o is not None]
        if good:
            self._last_good = good[-1]
        elif self._last_good is None:
            raise _data_error(f'{self.data.root}: no readable sample in a whole batch (split {self.data.split})')
        # Unreadable samples are replaced by readable ones of the batch: the batch keeps its size.
        return [o if o is not None else (good[i % len(good)] if good else self._last_good)
                for i, o in enumerate(out)]

    def __getitem__(self, item):
        return self.__getitems__([item])[0]


class ShardSampler(tud.Sampler):
    """The order of one rank's samples in one epoch, as items (shard, offset, uid, window start, block), a pure
    function of (seed, epoch, rank, world size) and the shard lengths (and of the worker count past
    BLOCKS_PER_RANK).

    - The epoch's stream is the shards concatenated (training: in a seeded order per epoch; evaluation: as listed).
    - Training pads the stream to a multiple of world_size by wrapping around (as DistributedSampler), so every
      rank gets the same number of samples and steps; evaluation splits it with no sample repeated (exact counts).
    - Each rank's contiguous range is cut into batches, and the batches into max(BLOCKS_PER_RANK, workers)
      contiguous blocks. Batches are yielded round-robin over the blocks; the DataLoader hands batch i to worker
      i % workers, so with a worker count that divides the block count each worker always gets the same blocks
      and reads each forward (also after a resume, which only shifts which worker gets which blocks).
    - Training shuffles within windows of SHUFFLE_WINDOW samples of one shard (the converter already shuffled
      the samples across shards).

    `set_epoch(epoch, start)`: start at sample `start` of this rank's order (a multiple of the batch size).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, workers: int = 0, pad: bool = True, window: int = SHUFFLE_WINDOW):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.first_uid = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.batch_size, self.shuffle, self.seed, self.rank, self.world_size = \
            batch_size, shuffle, seed, rank, world_size
        self.workers, self.pad, self.window = max(1, workers), pad, window
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0):
        self.epoch, self.start = epoch, start

    def _rank_range(self, total: int) -> Tuple[int, int]:
        if self.pad:
            per = math.ceil(total / self.world_size)
            return self.rank * per, (self.rank + 1) * per
        per, extra = divmod(total, self.world_size)
        lo = self.rank * per + min(self.rank, extra)
        return lo, lo + per + (self.rank < extra)

    def _segments(self, order: np.ndarray, lo: int, hi: int) -> List[Tuple[int, int, int]]:
        """(shard, first offset, end offset) covering stream positions [lo, hi); positions past the end wrap."""
        ends = np.cumsum(self.lengths[order])
        total, segs, pos = int(ends[-1]), [], lo
        while pos < hi:
            p = pos % total
            k = int(np.searchsorted(ends, p, side='right'))
            shard_start = int(ends[k] - self.lengths[order[k]])
            take = min(int(ends[k]) - p, hi - pos)
            segs.append((int(order[k]), p - shard_start, p - shard_start + take))
            pos += take
        return segs

    def _block_items(self, segs, block: int) -> np.ndarray:
        """Items of one worker block: (shard, offset, uid, window start) rows, windows shuffled in training."""
        rows = []
        for i, (shard, a, b) in enumerate(segs):
            for w0 in range(a, b, self.window):
                offs = np.arange(w0, min(w0 + self.window, b), dtype=np.int64)
                if self.shuffle:
                    g = np.random.default_rng([self.seed, self.epoch, self.rank, block, i, w0])
                    offs = g.permutation(offs)
                rows.append(np.stack([np.full_like(offs, shard), offs, self.first_uid[shard] + offs,
                                      np.full_like(offs, w0), np.full_like(offs, block)], 1))
        return np.concatenate(rows) if rows else np.zeros((0, 5), dtype=np.int64)

    def _items(self) -> np.ndarray:
        n_shards = len(self.lengths)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n_shards)
        else:
            order = np.arange(n_shards)
        lo, hi = self._rank_range(int(self.lengths.sum()))
        n = hi - lo
        n_batches = n // self.batch_size if self.pad else math.ceil(n / self.batch_size)
        k = max(BLOCKS_PER_RANK, self.workers)
        counts = [n_batches // k + (w < n_batches % k) for w in range(k)]
        blocks, first = [], 0
        for w, c in enumerate(counts):
            a, b = lo + first * self.batch_size, min(lo + (first + c) * self.batch_size, hi)
            items = self._block_items(self._segments(order, a, b), w) if c else np.zeros((0, 5), np.int64)
            blocks.append([items[j * self.batch_size:(j + 1) * self.batch_size] for j in range(c)])
            first += c
        batches = [blocks[w][r] for r in range(max(counts, default=0)) for w in range(k) if r < counts[w]]
        return np.concatenate(batches) if batches else np.zeros((0, 5), np.int64)

    def __iter__(self):
        return iter(self._items()[self.start:].tolist())

    def __len__(self) -> int:
        lo, hi = self._rank_range(int(self.lengths.sum()))
        n = hi - lo
        return (n // self.batch_size * self.batch_size if self.pad else n) - self.start


# ---------------------------------------------------------------------------------------------- the converter

def _read_checked(path: str) -> Tuple[str, Optional[bytes], str]:
    """(path, bytes or None, error): the file's bytes if it decodes as an image."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
        decode_rgb(io.BytesIO(data))
        return path, data, ''
    except Exception as e:  # noqa: BLE001 - any failure to read or decode means 'skip this file'
        return path, None, f'{type(e).__name__}: {e}'


def _tar_member(name: str, data: bytes) -> Tuple[tarfile.TarInfo, io.BytesIO]:
    """A member with fixed metadata (mtime 0, root, 0644): the same bytes in give the same tar out."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o644, 0, 0, '', ''
    return ti, io.BytesIO(data)


class _ShardWriter:
    """Tar shards NAME-SPLIT-000000.tar, ... of at most `max_bytes` each (a sample never spans two)."""

    def __init__(self, out_dir: str, prefix: str, max_bytes: int):
        self.out_dir, self.prefix, self.max_bytes = out_dir, prefix, max_bytes
        self.filenames, self.lengths, self.tar, self.size = [], [], None, 0

    def _next(self):
        self.close()
        name = f'{self.prefix}-{len(self.filenames):06d}.tar'
        self.path = os.path.join(self.out_dir, name)
        self.tar = tarfile.open(self.path + '.tmp', 'w', format=tarfile.USTAR_FORMAT)
        self.filenames.append(name)
        self.lengths.append(0)
        self.size = 0

    def write(self, key: str, parts: Dict[str, bytes]):
        size = sum(512 + math.ceil(len(v) / 512) * 512 for v in parts.values())
        if self.tar is None or (self.lengths[-1] and self.size + size > self.max_bytes):
            self._next()
        for ext, data in parts.items():
            self.tar.addfile(*_tar_member(f'{key}.{ext}', data))
        self.size += size
        self.lengths[-1] += 1

    def close(self):
        if self.tar is not None:
            self.tar.close()
            os.replace(self.path + '.tmp', self.path)
            self.tar = None


def _split_folders(src: str) -> List[str]:
    names = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith('.'))
    splits = [n for n in ('train', 'val', 'validation', 'test') if n in names]
    if not splits:
        raise _data_error(f'{src}: no split folders (expected {src}/train/<class>/<images> and val/ or validation/)')
    return splits


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit='img', file=sys.stderr, disable=None)
    except ImportError:
        return None


def convert_split(src_split: str, rel_root: str, out_dir: str, prefix: str, class_names: Optional[List[str]],
                  max_bytes: int, seed: int, threads: int = 4) -> dict:
    """Write one split's shards; returns its _info.json entry (plus `class_counts` and `skipped`)."""
    samples, classes = scan_image_folder(src_split, class_names)
    order = random.Random(seed).sample(range(len(samples)), len(samples))  # shards mix classes (fixed seed)
    writer, skipped = _ShardWriter(out_dir, prefix, max_bytes), []
    counts = [0] * len(classes)
    bar = _progress(len(samples), os.path.basename(src_split))
    with ThreadPoolExecutor(threads) as pool:  # decoding checks in threads; written in order (deterministic)
        for i, (path, data, err) in zip(order, pool.map(_read_checked, [samples[i][0] for i in order])):
            if bar is not None:
                bar.update(1)
            if data is None:
                skipped.append(path)
                _logger.warning(f'unreadable image skipped: {path} ({err})')
                continue
            target = samples[i][1]
            ext = os.path.splitext(path)[1].lower().lstrip('.').replace('jpeg', 'jpg')
            key = f'{prefix}-{sum(writer.lengths):08d}'
            meta = json.dumps({'filename': os.path.relpath(path, rel_root)}, sort_keys=True).encode()
            writer.write(key, {ext: data, 'cls': str(target).encode(), 'json': meta})
            counts[target] += 1
    writer.close()
    if bar is not None:
        bar.close()
    return {'name': os.path.basename(src_split), 'num_samples': sum(writer.lengths), 'filenames': writer.filenames,
            'shard_lengths': writer.lengths, 'class_counts': counts, 'skipped': skipped, 'classes': classes}


def verify_split(out_dir: str, entry: dict, num_classes: int):
    """Read the written shards back (labels only) and compare the per-shard and per-class counts."""
    counts = [0] * num_classes
    for name, expected in zip(entry['filenames'], entry['shard_lengths']):
        n = 0
        with open(os.path.join(out_dir, name), 'rb') as f:
            for _, _, parts in iter_tar_samples(f, streaming=False):
                counts[int(parts['cls'])] += 1
                n += 1
        if n != expected:
            raise _data_error(f'{os.path.join(out_dir, name)}: {n} samples written, {expected} expected')
    if counts != entry['class_counts']:
        raise _data_error(f'{out_dir}: per-class counts of split {entry["name"]} differ from the source: '
                          f'{counts} != {entry["class_counts"]}')


def convert(src: str, out_dir: str, shard_size: str = '1GB', name: Optional[str] = None, seed: int = 0) -> dict:
    """Every split folder of the ImageFolder tree `src` as shards under `out_dir`; returns the _info.json dict."""
    _require_webdataset()
    if not os.path.isdir(src):
        raise _data_error(f'{src}: no such folder (expected an ImageFolder tree with train/ and val/)')
    max_bytes = parse_size(shard_size)
    name = name or os.path.basename(os.path.normpath(src))
    os.makedirs(out_dir, exist_ok=True)
    info = {'name': name, 'splits': {}, 'classes': None}
    for split in _split_folders(src):
        entry = convert_split(os.path.join(src, split), src, out_dir, f'{name}-{split}', info['classes'], max_bytes,
                              seed)
        info['classes'] = info['classes'] or entry.pop('classes')
        entry.pop('classes', None)
        verify_split(out_dir, entry, len(info['classes']))
        info['splits'][split] = entry
        _logger.info(f'{split}: {entry["num_samples"]} samples in {len(entry["filenames"])} shards, '
                     f'{len(entry["skipped"])} unreadable images skipped')
    tmp = os.path.join(out_dir, INFO_NAME + '.tmp')
    with open(tmp, 'w') as f:
        json.dump(info, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(out_dir, INFO_NAME))
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog='python -m vancls.shards',
                                description='Convert an ImageFolder tree (train/, val/ ...) to WebDataset shards that '
                                            'timm\'s wds/ reader and train.py --dataset wds/NAME read.')
    p.add_argument('src', metavar='SRC_TREE', help='ImageFolder root holding train/ and val/ (or validation/)')
    p.add_argument('out', metavar='OUT_DIR', help='folder for the shards and _info.json')
    p.add_argument('--shard-size', default='1GB', help='largest shard (bytes; units B, KB, MB, GB, KiB, MiB, GiB)')
    p.add_argument('--name', default=None, help='data set name in the shard names (default: SRC_TREE\'s name)')
    p.add_argument('--seed', type=int, default=0, help='seed of the sample order written (same seed: same bytes)')
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        info = convert(args.src, args.out, args.shard_size, args.name, args.seed)
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'wrote {args.out}: ' + ', '.join(f'{k} {v["num_samples"]} samples / {len(v["filenames"])} shards'
                                            for k, v in info['splits'].items())
          + f'; train with: python train.py {args.out} --dataset wds/{info["name"]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
