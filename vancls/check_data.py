"""Decode every image of a data tree in parallel and list the files that cannot be read.

    python -m vancls.check_data DATA_DIR [-j 8]

Exit status 0 when every file decodes, 1 when any does not (each is printed with the reason), 2 on a bad tree.
"""
import argparse
import os
import sys
from multiprocessing import Pool

from .data import IMG_EXTENSIONS, open_rgb


def _check(path: str):
    try:
        open_rgb(path)
        return None
    except Exception as e:  # noqa: BLE001 - report whatever PIL raises, by file
        return path, f'{type(e).__name__}: {e}'


def list_images(root: str):
    files = []
    for dirpath, _, filenames in os.walk(root, followlinks=True):
        files.extend(os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMG_EXTENSIONS))
    return sorted(files)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description='Decode every image of a tree and list the unreadable ones.')
    parser.add_argument('data_dir')
    parser.add_argument('-j', '--workers', type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if not os.path.isdir(args.data_dir):
        print(f'error: data directory not found: {args.data_dir}', file=sys.stderr)
        return 2
    files = list_images(args.data_dir)
    if not files:
        print(f'error: {args.data_dir}: no image files ({", ".join(IMG_EXTENSIONS)})', file=sys.stderr)
        return 2
    bad = []
    tty = sys.stderr.isatty()
    with Pool(max(1, args.workers)) as pool:
        for i, result in enumerate(pool.imap_unordered(_check, files, chunksize=64), 1):
            if result is not None:
                bad.append(result)
            if tty and (i % 256 == 0 or i == len(files)):
                sys.stderr.write(f'\r{i}/{len(files)} images checked, {len(bad)} bad')
                sys.stderr.flush()
    if tty:
        sys.stderr.write('\n')
    for path, reason in sorted(bad):
        print(f'BAD {path}: {reason}')
    print(f'{len(files)} images checked, {len(bad)} unreadable')
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
