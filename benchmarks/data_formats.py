"""Training input pipeline, img/s per loader core: WebDataset shards (vancls.shards) against the same JPEGs as an
ImageFolder tree.

Both read the same images in the same order with the same augmentation draws, so that only the reading differs:
the shards through the loader train.py builds (ShardDataset + ShardSampler: the epoch's shuffled shard order and
shuffle windows), the folder through ImageFolderDataset with its samples renumbered as the shards' (sample i of
the folder is the shard set's sample i, found from the converter's JSON sidecar) and visited in the shard
sampler's order. The transform is the reference recipe's training transform
(benchmarks.data_pipeline.recipe_transform: RandomResizedCrop with random interpolation, flip, RandAugment
rand-m9-mstd0.5-inc1, normalize, RandomErasing 0.25), seeded per (seed, epoch, sample) in both. The loader runs
in this process (num_workers=0, one intra-op thread), so img/s per CPU-second of the process is the
cost per loader core; wall-clock img/s is printed too. The two alternate batch by batch within a round (taking
turns at going first) so that other jobs on the machine slow both alike; each round is one epoch of each.
Reported: median and range over the rounds of img/s and of the ratio shards / folder.

Run from the repository root:  .venv/bin/python -m benchmarks.data_formats [--rounds 3] [--images 512]
"""
import argparse
import json
import os

import torch
import torch.utils.data as tud

from benchmarks.data_pipeline import recipe_transform, report_rounds, time_interleaved, write_jpegs


def folder_in_shard_order(root: str, shards, transform):
    """The folder data set with sample i = the shard set's sample i (uid order), from the JSON sidecars."""
    from vancls.data import ImageFolderDataset
    from vancls.shards import iter_tar_samples
    folder = ImageFolderDataset(os.path.join(root, 'train'), transform, seed=0)
    by_path = {os.path.relpath(p, root): (p, t) for p, t in folder.samples}
    ordered = []
    for url in shards.data.urls:
        with open(url, 'rb') as f:
            ordered += [by_path[json.loads(parts['json'])['filename']]
                        for _, _, parts in iter_tar_samples(f, streaming=False)]
    folder.samples, folder.targets = ordered, [t for _, t in ordered]
    return folder


def make_loaders(root: str, shard_dir: str, img_size: int, batch_size: int, epoch: int) -> dict:
    from vancls.shards import ShardDataset, ShardSampler
    tf = recipe_transform(img_size)
    shards = ShardDataset(shard_dir, 'train', tf, seed=0)
    folder = folder_in_shard_order(root, shards, tf)
    sampler = ShardSampler(shards.data.lengths, batch_size, shuffle=True, seed=0)
    sampler.set_epoch(epoch)
    uids = [item[2] for item in sampler]  # the same samples in the same order for the folder
    loaders = {}
    for name, ds, order in (('folder', folder, uids), ('shards', shards, sampler)):
        ds.set_epoch(epoch)
        loaders[name] = tud.DataLoader(ds, batch_size=batch_size, sampler=order, num_workers=0, drop_last=True)
    return loaders


def interleaved_epoch(loaders: dict) -> dict:
    """{name: (images, cpu_s, wall_s)} over one epoch of each loader, alternating batch by batch. Which loader goes
    first alternates too: the second to handle the same images (same draws) must not always be the same one."""
    totals = {name: [0, 0., 0.] for name in loaders}
    time_interleaved(loaders, totals, alternate=True)
    return {name: tuple(t) for name, t in totals.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--root', default='/tmp/vancls_formats_bench', help='work folder (JPEG tree and shards, reused)')
    p.add_argument('--images', type=int, default=512, help='number of JPEGs to generate')
    p.add_argument('--rounds', type=int, default=3, help='rounds (one epoch of each format per round)')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('--shard-size', default='4MB', help='shard size for the converter (many shards per epoch)')
    args = p.parse_args(argv)
    for flag in ('images', 'rounds', 'img_size', 'batch_size'):
        if getattr(args, flag) < 1:
            p.error(f'--{flag.replace("_", "-")} {getattr(args, flag)}: expected a positive integer')
    torch.set_num_threads(1)
    from vancls.shards import convert
    write_jpegs(os.path.join(args.root, 'train'), args.images)
    shard_dir = os.path.join(args.root, f'shards-{args.images}-{args.shard_size}')
    if not os.path.isfile(os.path.join(shard_dir, '_info.json')):
        convert(args.root, shard_dir, args.shard_size, name='bench')
    interleaved_epoch(make_loaders(args.root, shard_dir, args.img_size, args.batch_size, 0))  # warm page cache
    print(f'{args.images} JPEGs, {args.img_size} px, batch {args.batch_size}, shards of <= {args.shard_size}; '
          f'one epoch of each per round, interleaved batch by batch, num_workers=0, 1 thread')
    report_rounds(lambda r: interleaved_epoch(make_loaders(args.root, shard_dir, args.img_size, args.batch_size,
                                                           1 + r)), args.rounds, 'shards', 'folder')


if __name__ == '__main__':
    main()
