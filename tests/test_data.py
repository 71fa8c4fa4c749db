"""The data layer: digits tree, resumable sharded sampler, deterministic per-sample augmentation, synthetic data."""
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.utils.data as tud

from vancls.data import (DataError, ImageFolderDataset, ResumableSampler, SyntheticDataset, build_transform,
                         load_class_map, sample_seed, scan_image_folder)


def test_digits_tree(digits_dir):
    train, classes = scan_image_folder(os.path.join(digits_dir, 'train'))
    val, _ = scan_image_folder(os.path.join(digits_dir, 'val'), classes)
    assert classes == [str(i) for i in range(10)]
    assert len(train) + len(val) == 1797 and len(val) == 359
    assert not {p for p, _ in train} & {p for p, _ in val}


@pytest.mark.parametrize('world_size', [1, 2, 3])
def test_eval_shards_cover_each_sample_once(world_size):
    shards = [list(ResumableSampler(359, shuffle=False, rank=r, world_size=world_size, pad=False))
              for r in range(world_size)]
    assert sorted(i for s in shards for i in s) == list(range(359))


def test_train_shards_padded_equal_and_restartable():
    samplers = [ResumableSampler(359, shuffle=True, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in samplers:
        s.set_epoch(4)
    a, b = (list(s) for s in samplers)
    assert len(a) == len(b) == 180 and set(a) | set(b) == set(range(359))
    samplers[0].set_epoch(4, start=50)
    assert list(samplers[0]) == a[50:] and len(samplers[0]) == 130
    samplers[0].set_epoch(5)
    assert list(samplers[0]) != a  # a new permutation each epoch


def _train_args(**kw):
    base = dict(no_aug=False, scale=(0.6, 1.0), ratio=(0.75, 1.33), hflip=0.5, vflip=0., color_jitter=0.4,
                aa='rand-m9-mstd0.5-inc1', train_interpolation='random', reprob=0.25, remode='pixel', recount=1)
    base.update(kw)
    return SimpleNamespace(**base)


def test_augmentation_depends_only_on_seed_epoch_index(digits_dir):
    cfg = dict(input_size=(3, 32, 32), interpolation='bicubic', mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.9)
    tf = build_transform(_train_args(), cfg, is_training=True, use_prefetcher=False)
    ds = ImageFolderDataset(os.path.join(digits_dir, 'train'), tf, seed=1)
    first = ds[17][0]
    torch.rand(100)  # unrelated use of the global RNG must not matter
    assert torch.equal(ds[17][0], first)
    state = torch.get_rng_state()
    ds[3]
    assert torch.equal(torch.get_rng_state(), state)  # the training process's RNG is left as it was
    ds.set_epoch(1)
    assert not torch.equal(ds[17][0], first)
    assert sample_seed(1, 0, 17) != sample_seed(1, 1, 17) != sample_seed(2, 0, 17)


def _recipe_dataset(digits_dir, seed=1):
    """The reference recipe's training transform (RandAugment, random interpolation, flip, pixel erasing)."""
    cfg = dict(input_size=(3, 32, 32), interpolation='bicubic', mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.9)
    tf = build_transform(_train_args(), cfg, is_training=True, use_prefetcher=False)
    return ImageFolderDataset(os.path.join(digits_dir, 'train'), tf, seed=seed)


def _global_states():
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()


def _assert_same_states(a, b):
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and torch.equal(a[2], b[2])


@pytest.mark.parametrize('stream', ['python', 'numpy', 'torch'])
def test_augmentation_ignores_each_global_stream(digits_dir, stream):
    """The recipe draws from python's random, numpy's and torch's CPU generator: each one is reseeded."""
    ds = _recipe_dataset(digits_dir)
    seed_fn = {'python': random.seed, 'numpy': np.random.seed, 'torch': torch.manual_seed}[stream]
    indices = range(10)
    seed_fn(123)
    first = [ds[i][0] for i in indices]
    seed_fn(456)
    assert all(torch.equal(ds[i][0], x) for i, x in zip(indices, first))


def test_main_process_loading_leaves_rng_and_accelerator_seeding_alone(digits_dir, monkeypatch):
    """workers=0: the training process's streams (mixup, drop path) are as before a batch and as before a single
    __getitem__, and no per-sample torch.manual_seed (it would seed, or queue seeding of, CUDA/XPU/MTIA)."""
    def no_seed(*args, **kwargs):
        raise AssertionError('the dataset must seed the CPU generator only')
    for mod, name in [(torch, 'manual_seed'), (torch.random, 'manual_seed'), (torch.cuda, 'manual_seed_all'),
                      (torch.cuda, 'manual_seed')]:
        monkeypatch.setattr(mod, name, no_seed)
    ds = _recipe_dataset(digits_dir)
    random.seed(5)
    np.random.seed(5)
    torch.default_generator.manual_seed(5)
    before = _global_states()
    ds[3]
    _assert_same_states(_global_states(), before)
    loader = tud.DataLoader(ds, batch_size=4, sampler=[9, 2, 7, 4, 0, 3], num_workers=0,
                            generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    _assert_same_states(_global_states(), before)
    # The per-batch path gives the same samples as one-by-one access: augmentation does not depend on batching.
    assert torch.equal(batches[0][0], torch.stack([ds[i][0] for i in (9, 2, 7, 4)]))
    assert torch.equal(batches[1][0], torch.stack([ds[i][0] for i in (0, 3)]))


def test_worker_and_main_process_augment_alike(digits_dir):
    ds = _recipe_dataset(digits_dir)
    got = [torch.cat([x for x, _ in tud.DataLoader(ds, batch_size=3, sampler=[5, 1, 8, 6, 2], num_workers=w)])
           for w in (0, 1)]
    assert torch.equal(got[0], got[1])


def test_synthetic_is_deterministic():
    ds = SyntheticDataset(8, 5, (3, 16, 16), seed=0)
    x, y = ds[3]
    assert x.shape == (3, 16, 16) and 0 <= y < 5
    assert torch.equal(ds[3][0], x)
    assert SyntheticDataset(8, 5, (3, 16, 16), uint8=True)[0][0].dtype == torch.uint8


def test_class_map(tmp_path, digits_dir):
    m = tmp_path / 'map.txt'
    m.write_text('\n'.join(str(i) for i in reversed(range(10))) + '\n')
    names = load_class_map(str(m))
    samples, classes = scan_image_folder(os.path.join(digits_dir, 'val'), names)
    assert classes[0] == '9' and samples[0][1] == 0 and os.path.basename(os.path.dirname(samples[0][0])) == '9'
    m.write_text('a\na\n')
    with pytest.raises(DataError, match='unique'):
        load_class_map(str(m))


def test_randaugment_posterize_to_zero_bits_does_not_crash():
    """timm asks for 0 bits at the top magnitude; Pillow >= 12 rejects it. We return the old black image."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp
    img = Image.new('RGB', (8, 8), (200, 100, 50))
    op = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10, hparams={'magnitude_std': 0})
    assert op(img).getpixel((0, 0)) == (0, 0, 0)
    assert AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=0)(img).getpixel((0, 0)) == (192, 96, 48)  # 4 bits
