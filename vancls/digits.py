"""The built-in demo data set: scikit-learn's handwritten digits (1797 8x8 images, 10 classes, shipped inside
scikit-learn, no download) written out as a real ImageFolder tree of PNG files.

    python -m vancls.digits OUT_DIR [--val-fraction 0.2] [--seed 0] [--size 32]

OUT_DIR/train/<digit>/*.png and OUT_DIR/val/<digit>/*.png, split per class with a fixed seed (about 80/20).
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image

CLASS_NAMES = tuple(str(d) for d in range(10))


def write_digits(out_dir: str, val_fraction: float = 0.2, seed: int = 0, size: int = 32) -> str:
    """Write the tree once; returns out_dir. An existing complete tree (marker file present) is left as it is."""
    marker = os.path.join(out_dir, '.complete')
    if os.path.isfile(marker):
        return out_dir
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 8x8, values 0..16 -> 0..255
    targets = digits.target
    rng = np.random.RandomState(seed)
    for cls in range(10):
        idx = np.flatnonzero(targets == cls)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        for split, split_idx in (('val', idx[:n_val]), ('train', idx[n_val:])):
            folder = os.path.join(out_dir, split, CLASS_NAMES[cls])
            os.makedirs(folder, exist_ok=True)
            for i in split_idx:
                img = Image.fromarray(images[i], mode='L')
                if size != 8:
                    img = img.resize((size, size), Image.BICUBIC)
                img.save(os.path.join(folder, f'{i:04d}.png'))
    with open(marker, 'w') as f:
        f.write(f'val_fraction={val_fraction} seed={seed} size={size}\n')
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description='Write scikit-learn digits as an ImageFolder tree of PNGs.')
    parser.add_argument('out_dir')
    parser.add_argument('--val-fraction', type=float, default=0.2)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--size', type=int, default=32, help='side of the written PNGs in pixels (source is 8x8)')
    args = parser.parse_args(argv)
    write_digits(args.out_dir, args.val_fraction, args.seed, args.size)
    n = {s: sum(len(f) for _, _, f in os.walk(os.path.join(args.out_dir, s))) for s in ('train', 'val')}
    print(f'digits written to {args.out_dir}: {n["train"]} train, {n["val"]} val images, 10 classes')
    return 0


if __name__ == '__main__':
    sys.exit(main())
