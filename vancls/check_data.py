"""Decode every image of a data set in parallel and list the ones that cannot be read.

    python -m vancls.check_data DATA_DIR [-j 8]

DATA_DIR is what train.py reads: an ImageFolder tree, a `.tar` of one (every image member), or WebDataset shards
(a shard folder or URL with `_info.json`: every shard of every split; or a brace pattern / single shard beside
`_info.json`). A bad file is printed as `BAD PATH: reason`, a bad archive member as `BAD ARCHIVE:MEMBER: reason`
and a shard that cannot be opened or ends early as `BAD SHARD: reason`.
Exit status 0 when every image decodes, 1 when any does not, 2 on a bad DATA_DIR.
"""
import argparse
import os
import sys
from multiprocessing import Pool
from types import SimpleNamespace
from typing import List, Tuple

from .errors import DataError
from .samples import IMG_EXTENSIONS, decode_rgb, open_rgb

# Members of a .tar tree per task: the archive is indexed once, then read at these offsets by the pool.
MEMBERS_PER_TASK = 64
Bad = Tuple[str, str]  # (where, reason)


def _reason(e: Exception) -> str:
    return f'{type(e).__name__}: {e}'


def _check_files(paths: List[str]) -> Tuple[int, List[Bad]]:
    bad = []
    for path in paths:
        try:
            open_rgb(path)
        except Exception as e:  # noqa: BLE001 - report whatever PIL raises, by file
            bad.append((path, _reason(e)))
    return len(paths), bad


def _check_tar_members(task) -> Tuple[int, List[Bad]]:
    """Decode members of a tree .tar given as (name, data offset, size)."""
    import io
    tar_path, members = task
    bad = []
    with open(tar_path, 'rb') as f:
        for name, offset, size in members:
            try:
                f.seek(offset)
                decode_rgb(io.BytesIO(f.read(size)))
            except Exception as e:  # noqa: BLE001
                bad.append((f'{tar_path}:{name}', _reason(e)))
    return len(members), bad


def _check_shard(task) -> Tuple[int, List[Bad]]:
    """Decode the image of every sample of one shard; a shard that cannot be read to its listed length is bad."""
    import io
    from .shards import is_url, iter_tar_samples, open_stream, sample_image
    url, expected = task
    n, bad = 0, []
    try:
        with open_stream(url) as f:
            for _, key, parts in iter_tar_samples(f, streaming=is_url(url)):
                n += 1
                ext, data = sample_image(parts)
                try:
                    if data is None:
                        raise DataError('no image member (.jpg, .png, ...)')
                    decode_rgb(io.BytesIO(data))
                except Exception as e:  # noqa: BLE001
                    bad.append((f'{url}:{key}.{ext or "*"}', _reason(e)))
        if n != expected:
            bad.append((url, f'ends after {n} of {expected} samples listed in _info.json'))
    except Exception as e:  # noqa: BLE001 - missing, truncated, a bad header: the shard itself is unreadable
        bad.append((url, f'{_reason(e)} (after {n} of {expected} samples)'))
    return n, bad


def folder_tasks(root: str):
    files = []
    for dirpath, _, filenames in os.walk(root, followlinks=True):
        files.extend(os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMG_EXTENSIONS))
    files.sort()
    if not files:
        raise DataError(f'{root}: no image files ({", ".join(IMG_EXTENSIONS)})')
    return _check_files, [files[i:i + MEMBERS_PER_TASK] for i in range(0, len(files), MEMBERS_PER_TASK)]


def tar_tasks(tar_path: str):
    """Every image member of an ImageFolder tree packed as one .tar (headers read here, data by the pool)."""
    import tarfile
    try:
        with tarfile.open(tar_path, 'r:') as tar:
            members = sorted((m.name, m.offset_data, m.size) for m in tar
                             if m.isfile() and m.name.lower().endswith(IMG_EXTENSIONS))
    except (OSError, tarfile.TarError) as e:
        raise DataError(f'{tar_path}: not a readable tar archive ({_reason(e)})') from None
    if not members:
        raise DataError(f'{tar_path}: no image members ({", ".join(IMG_EXTENSIONS)})')
    return _check_tar_members, [(tar_path, members[i:i + MEMBERS_PER_TASK])
                                for i in range(0, len(members), MEMBERS_PER_TASK)]


def shard_tasks(location: str):
    """(url, listed sample count) of every shard: all splits of a shard folder / URL, or the shards of a pattern."""
    from .shards import ShardSplit, is_shard_pattern, load_info
    splits = [None] if is_shard_pattern(location) else list((load_info(location).get('splits') or {}))
    if not splits:
        raise DataError(f'{location}: _info.json lists no splits')
    tasks = {}
    for split in splits:
        data = ShardSplit(location, split or '')
        tasks.update(zip(data.urls, data.lengths))
    return _check_shard, sorted(tasks.items())


def tasks_for(data_dir: str):
    """(worker function, tasks) for DATA_DIR, recognised as train.py recognises it."""
    from .data import dataset_kind
    kind = dataset_kind(SimpleNamespace(dataset='folder', data_dir=data_dir))
    if kind == 'wds':
        return shard_tasks(data_dir)
    if kind == 'tar':
        if not os.path.isfile(data_dir):
            raise DataError(f'data archive not found: {data_dir}')
        return tar_tasks(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(f'data directory not found: {data_dir}')
    return folder_tasks(data_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description='Decode every image of a tree, a .tar of one or a shard set, '
                                                 'and list the unreadable ones.')
    parser.add_argument('data_dir', help='ImageFolder tree, .tar of one, shard folder / URL, or shard pattern')
    parser.add_argument('-j', '--workers', type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    try:
        fn, tasks = tasks_for(args.data_dir)
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    checked, bad = 0, []
    tty = sys.stderr.isatty()
    with Pool(max(1, args.workers)) as pool:
        for n, task_bad in pool.imap_unordered(fn, tasks):
            checked += n
            bad += task_bad
            if tty:
                sys.stderr.write(f'\r{checked} images checked, {len(bad)} bad')
                sys.stderr.flush()
    if tty:
        sys.stderr.write('\n')
    for where, reason in sorted(bad):
        print(f'BAD {where}: {reason}')
    print(f'{checked} images checked, {len(bad)} unreadable')
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
