"""Training input pipeline, img/s per core: vancls's ImageFolderDataset against timm's ImageDataset.

Both read the same JPEG tree through a DataLoader with num_workers=0 and one intra-op thread (so img/s is per
core) and apply the same transform object: the reference recipe's training transform from timm's
create_transform (RandomResizedCropAndInterpolation with random interpolation, horizontal flip, RandAugment
rand-m9-mstd0.5-inc1, ToTensor + Normalize, RandomErasing 0.25 'pixel' on the CPU, since without the prefetcher
the erasing runs in the dataset). The only difference is the dataset: ours decodes with open_rgb and reseeds the
augmentation per sample (deterministic resume), timm's does neither. The two run in one process, interleaved batch
by batch (A B A B ...), so that the machine's load drifts over both alike; img/s is counted per CPU-second of the
process (the per-core cost, least disturbed by other jobs) and per wall-clock second. The ratio is ours / timm,
one per round, reported as median and range.

Run from the repository root:  .venv/bin/python -m benchmarks.data_pipeline [--rounds 7] [--images 256] [--passes 3]
"""
import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.utils.data as tud
from PIL import Image, ImageFilter

# ImageNet's typical decoded size is about 500x375 (landscape) or 375x500 (portrait).
SIZES = ((500, 375), (375, 500), (500, 333), (500, 400))


def write_jpegs(root: str, count: int, classes: int = 4, seed: int = 0) -> str:
    """`count` natural-looking JPEGs (smooth colour fields, edges and grain, quality 90) in `classes` folders.

    Random pixels would compress badly and decode slower than photos; smooth fields with some texture give
    ImageNet-like file sizes (tens of KB at 500x375). Written once: an existing complete tree is reused."""
    marker = os.path.join(root, f'.complete-{count}-{classes}-{seed}')
    if os.path.exists(marker):
        return root
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = SIZES[i % len(SIZES)]
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # a few large colour regions
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        edges = Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h),
                                                                                                 Image.NEAREST)
        img = Image.blend(img, edges.filter(ImageFilter.GaussianBlur(2)), 0.25)
        grain = rng.normal(0, 8, (h, w, 3))
        arr = np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        folder = os.path.join(root, f'class_{i % classes}')
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(arr).save(os.path.join(folder, f'img_{i:05d}.jpg'), quality=90)
    open(marker, 'w').close()
    return root


def recipe_transform(img_size: int):
    """The reference recipe's training transform (timm's create_transform, float tensors out)."""
    from timm.data import create_transform
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return create_transform(
        img_size, is_training=True, use_prefetcher=False, scale=(0.08, 1.0), ratio=(3. / 4., 4. / 3.), hflip=0.5,
        vflip=0., color_jitter=0.4, auto_augment='rand-m9-mstd0.5-inc1', interpolation='random',
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, re_prob=0.25, re_mode='pixel', re_count=1)


def interleaved_round(datasets: dict, batch_size: int, passes: int, first_epoch: int) -> dict:
    """One round: `passes` epochs of every data set, alternating batch by batch, so that a change in the machine's
    load (other jobs on the same cores) hits all of them alike. Returns {name: (images, cpu_s, wall_s)}.

    CPU time of this process (one thread) is the per-core cost; wall time is also kept. Ours gets a new epoch per
    pass, so its augmentation draws (hence the cost of the crops and RandAugment ops) vary as timm's do."""
    totals = {name: [0, 0., 0.] for name in datasets}
    for epoch in range(first_epoch, first_epoch + passes):
        loaders = {}
        for name, ds in datasets.items():
            if hasattr(ds, 'set_epoch'):
                ds.set_epoch(epoch)
            loaders[name] = tud.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
        time_interleaved(loaders, totals)
    return {name: tuple(t) for name, t in totals.items()}


def time_interleaved(loaders: dict, totals: dict, alternate: bool = False):
    """One epoch of every loader, batch by batch in turn, adding (images, cpu_s, wall_s) to totals[name].
    alternate: reverse the order every other turn (who handles the same images second must not always be the same)."""
    iters = {name: iter(loader) for name, loader in loaders.items()}
    turn = 0
    while iters:
        turn += 1
        for name in list(iters)[::-1 if alternate and turn % 2 == 0 else 1]:
            c0, w0 = time.process_time(), time.perf_counter()
            batch = next(iters[name], None)
            c1, w1 = time.process_time(), time.perf_counter()
            if batch is None:
                del iters[name]
                continue
            t = totals[name]
            t[0] += batch[0].shape[0]
            t[1] += c1 - c0
            t[2] += w1 - w0


def report_rounds(run_round, rounds: int, new: str, old: str):
    """Run `run_round(r)` -> {name: (images, cpu seconds, wall seconds)} for r in range(rounds), printing each
    round's img/s per CPU-second and wall-clock of `new` and `old` and their ratio, then the summaries."""
    cpu_rates = {new: [], old: []}
    cpu_ratios, wall_ratios = [], []
    for r in range(rounds):
        res = run_round(r)
        for name, (n, cpu, _) in res.items():
            cpu_rates[name].append(n / cpu)
        wall = {name: n / w for name, (n, _, w) in res.items()}
        cpu_ratios.append(cpu_rates[new][-1] / cpu_rates[old][-1])
        wall_ratios.append(wall[new] / wall[old])
        print(f'round {r + 1}: per CPU-second: {new} {cpu_rates[new][-1]:6.1f} img/s, {old} '
              f'{cpu_rates[old][-1]:6.1f} img/s, {new}/{old} {cpu_ratios[-1]:.3f} | wall: {new} {wall[new]:6.1f}, '
              f'{old} {wall[old]:6.1f} img/s, {new}/{old} {wall_ratios[-1]:.3f}')
    for name, v in cpu_rates.items():
        print(_summary(f'{name} img/s per CPU-second', v, '.1f'))
    print(_summary(f'{new}/{old} per CPU-second over {rounds} rounds', cpu_ratios))
    print(_summary(f'{new}/{old} wall-clock over {rounds} rounds', wall_ratios))


def _summary(label: str, values, fmt: str = '.3f') -> str:
    return f'{label}: median {statistics.median(values):{fmt}} (range {min(values):{fmt}}-{max(values):{fmt}})'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--root', default='/tmp/vancls_data_bench', help='JPEG tree (written once if missing)')
    p.add_argument('--images', type=int, default=256, help='number of JPEGs to generate')
    p.add_argument('--rounds', type=int, default=7, help='rounds (each interleaves ours and timm)')
    p.add_argument('--passes', type=int, default=3, help='passes over the images per round')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('-b', '--batch-size', type=int, default=32)
    args = p.parse_args(argv)
    for flag in ('images', 'rounds', 'passes', 'img_size', 'batch_size'):
        if getattr(args, flag) < 1:
            p.error(f'--{flag.replace("_", "-")} {getattr(args, flag)}: expected a positive integer')

    torch.set_num_threads(1)
    from timm.data import ImageDataset

    from vancls.data import ImageFolderDataset
    root = write_jpegs(args.root, args.images)
    tf = recipe_transform(args.img_size)
    datasets = {'ours': ImageFolderDataset(root, tf, seed=0), 'timm': ImageDataset(root, transform=tf)}
    interleaved_round(datasets, args.batch_size, 1, 0)  # warm the page cache and the lazy imports

    print(f'{len(datasets["ours"])} JPEGs under {root}, {args.img_size} px, batch {args.batch_size}, '
          f'{args.passes} pass(es) per round, interleaved batch by batch, num_workers=0, 1 thread')
    def run_round(r):
        order = list(datasets) if r % 2 == 0 else list(reversed(datasets))  # who goes first alternates
        return interleaved_round({k: datasets[k] for k in order}, args.batch_size, args.passes, 1 + r * args.passes)
    report_rounds(run_round, args.rounds, 'ours', 'timm')

if __name__ == '__main__':
    main()
