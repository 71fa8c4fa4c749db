"""Data beyond one folder: the ImageFolder tree as one .tar, WebDataset shards (the converter, the tar reader against
tarfile, timm reading them, exactly once over ranks x workers, resume without decoding, a truncated shard),
check_data on a tar and on shards, and the CLIs on them: train and validate on a tar, kill + --resume auto on shards
bitwise equal, training and evaluation streamed over HTTP."""
import contextlib
import functools
import http.server
import io
import json
import os
import shutil
import tarfile
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.utils.data as tud

from conftest import FAST_TRAIN_ARGS, cli_env, run_cli
from vancls import data as vdata
from vancls.data import DataError, ImageFolderDataset, TarImageFolderDataset, build_datasets, dataset_kind
from vancls.shards import ShardDataset, ShardSampler, convert, iter_tar_samples


def _small_tree(src, dst, per_class):
    for split in ('train', 'val'):
        for cls in sorted(os.listdir(os.path.join(src, split))):
            os.makedirs(os.path.join(dst, split, cls))
            for f in sorted(os.listdir(os.path.join(src, split, cls)))[:per_class]:
                shutil.copy(os.path.join(src, split, cls, f), os.path.join(dst, split, cls, f))
    return str(dst)


@pytest.fixture(scope='module')
def shards(digits_dir, module_tmp):
    """The digits as shards of ~100 KB: 53 train and 14 val shards of 27-28 samples (the last ones shorter)."""
    out = str(module_tmp('shards') / 'digits')
    convert(digits_dir, out, '100KB', name='digits')
    return out


@pytest.fixture(scope='module')
def digits_tar(digits_dir, module_tmp):
    path = str(module_tmp('tar') / 'digits.tar')
    with tarfile.open(path, 'w') as tar:
        tar.add(digits_dir, arcname='digits')  # under one leading folder, as `tar cf digits.tar digits` makes
    return path


def _files(folder):
    return {f: open(os.path.join(folder, f), 'rb').read() for f in sorted(os.listdir(folder))}


def test_converter_is_deterministic_checked_and_skips_unreadable(digits_dir, tmp_path):
    src = _small_tree(digits_dir, tmp_path / 'src', 4)
    with open(os.path.join(src, 'train', '3', 'broken.png'), 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n not an image')
    a, b = convert(src, str(tmp_path / 'a'), '8KB'), convert(src, str(tmp_path / 'b'), '8KB')
    assert a == b and _files(tmp_path / 'a') == _files(tmp_path / 'b')  # byte-identical shards and _info.json
    train = a['splits']['train']
    assert train['skipped'] == [os.path.join(src, 'train', '3', 'broken.png')]
    assert train['num_samples'] == 40 and train['class_counts'] == [4] * 10 and len(train['filenames']) > 1
    assert sum(train['shard_lengths']) == 40 and a['classes'] == [str(i) for i in range(10)]


def _expected_samples(path):
    """(key, {ext: bytes}) per sample of a tar, by tarfile and webdataset's own key rule: what the reader must give."""
    from webdataset.tariterators import base_plus_ext
    out = []
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = base_plus_ext(m.name) if m.isfile() else (None, None)
            if key is None:
                continue
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][ext] = tar.extractfile(m).read()
    return out


@pytest.mark.parametrize('fmt', [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile_and_webdataset_keys(tmp_path, fmt):
    names = ['a/s1.jpg', 'a/s1.cls', 'b.dir/s2.tar.gz', 'b.dir/s2.json', 'noext', 'x/.hidden', 'd' * 120 + '/s3.png',
             'd' * 120 + '/s3.cls', 'e' * 150 + '.jpg', 's4.seg.png', 's4.seg.json']
    if fmt == tarfile.USTAR_FORMAT:  # ustar: a name of up to 255 characters split at a slash (prefix field)
        names = [n.replace('e' * 150, 'e' * 90) for n in names]
    path = str(tmp_path / 'x.tar')
    with tarfile.open(path, 'w', format=fmt) as tar:
        d = tarfile.TarInfo('a')
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for i, n in enumerate(names):
            data = bytes([i]) * (i * 300 + 1)
            ti = tarfile.TarInfo(n)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    want = _expected_samples(path)
    assert [k for k, _ in want] == ['a/s1', 'b.dir/s2', 'x/', 'd' * 120 + '/s3',
                                    ('e' * 150 if fmt != tarfile.USTAR_FORMAT else 'e' * 90), 's4']
    for streaming in (False, True):
        with open(path, 'rb') as f:
            got = [(k, p) for _, k, p in iter_tar_samples(f, streaming=streaming)]
        assert got == want
        with open(path, 'rb') as f:  # samples not wanted: their members are passed over, unread
            got = list(iter_tar_samples(f, want=lambda i: i % 2 == 1, streaming=streaming))
        assert [(i, k) for i, k, _ in got] == [(i, k) for i, (k, _) in enumerate(want)]
        assert [p for i, _, p in got if i % 2] == [p for i, (_, p) in enumerate(want) if i % 2]
        assert all(v is None for i, _, p in got if i % 2 == 0 for v in p.values())
    raw = bytearray(open(path, 'rb').read())
    raw[512 + 1] ^= 1  # one bit of the second header's name (a/s1.jpg): the checksum no longer matches
    with pytest.raises(tarfile.ReadError, match='bad header checksum'):
        list(iter_tar_samples(io.BytesIO(bytes(raw)), streaming=False))


def test_timm_wds_reader_reads_the_shards_with_the_right_labels(shards, digits_dir):
    from timm.data import create_dataset
    ds = create_dataset('wds/digits', shards, split='val', is_training=False)
    labels = sorted(int(t) for _, t in ds)
    folder = ImageFolderDataset(os.path.join(digits_dir, 'val'))
    assert labels == sorted(folder.targets)
    # Each sample's label is its source folder's class (the filename is in the JSON sidecar).
    with open(os.path.join(shards, 'digits-val-000000.tar'), 'rb') as f:
        for _, _, parts in iter_tar_samples(f, streaming=False):
            assert json.loads(parts['json'])['filename'].split('/')[1] == parts['cls'].decode()


class _KeyShards(ShardDataset):
    """Yields each sample's tar key instead of its image: what the exactly-once test logs."""

    def decode(self, raw, uid):
        return raw['__key__'], self.target(raw)


def _epoch_keys(shards, split, world_size, workers, batch_size, train, epoch=0):
    """Keys per rank seen by real DataLoaders (workers processes each) over one epoch."""
    per_rank = []
    for rank in range(world_size):
        ds = _KeyShards(shards, split)
        sampler = ShardSampler(ds.data.lengths, batch_size, shuffle=train, seed=3, rank=rank,
                               world_size=world_size, workers=workers, pad=train)
        sampler.set_epoch(epoch)
        loader = tud.DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                collate_fn=list, drop_last=train)
        per_rank.append([[k for k, _ in batch] for batch in loader])
    return per_rank, ds.data.num_samples


@pytest.mark.parametrize('world_size,workers', [(2, 2), (3, 1)])
def test_every_sample_exactly_once_over_ranks_and_workers(shards, world_size, workers):
    # Evaluation: each key exactly once, no padding.
    per_rank, n = _epoch_keys(shards, 'val', world_size, workers, 8, train=False)
    keys = [k for batches in per_rank for b in batches for k in b]
    assert len(keys) == n == len(set(keys)) == 359
    # Training (batch 1: nothing dropped): equal steps on every rank; every key once, plus only the padding.
    per_rank, n = _epoch_keys(shards, 'train', world_size, workers, 1, train=True, epoch=1)
    assert len({len(b) for b in per_rank}) == 1
    keys = [k for batches in per_rank for b in batches for k in b]
    all_keys = {k for b in _epoch_keys(shards, 'train', 1, 0, 64, train=False)[0][0] for k in b}
    assert set(keys) == all_keys and len(all_keys) == n == 1438
    assert len(keys) - len(set(keys)) == -n % world_size


def test_order_is_a_function_of_seed_epoch_rank_and_resumes_anywhere(shards):
    ds = ShardDataset(shards, 'train')
    make = functools.partial(ShardSampler, ds.data.lengths, 16, True, 3, 1, 2, 2)
    a, b = make(), make()
    a.set_epoch(4)
    b.set_epoch(4, start=48)
    assert list(a)[48:] == list(b) and len(b) == len(a) - 48
    a.set_epoch(5)
    assert list(a) != list(b)
    # The same order with 0, 1, 2, 4 or 8 loader workers: a run resumed with another -j continues it.
    orders = {str(list(ShardSampler(ds.data.lengths, 16, True, 3, 1, 2, w))) for w in (0, 1, 2, 4, 8)}
    assert len(orders) == 1
    # Each worker block reads one shard stretch forward: within a batch, one or two shards.
    assert max(len({it[0] for it in list(a)[i:i + 16]}) for i in range(0, len(a), 16)) <= 2


def test_resume_position_is_reached_without_decoding_skipped_images(shards, monkeypatch):
    decoded = []
    import vancls.shards as vshards
    real = vshards.decode_rgb
    monkeypatch.setattr(vshards, 'decode_rgb', lambda f: decoded.append(1) or real(f))
    sampler = ShardSampler(ShardDataset(shards, 'train').data.lengths, 16, True, 3, 0, 1, 1)
    sampler.set_epoch(2, start=16 * 40)
    items = list(sampler)[:16]
    out = ShardDataset(shards, 'train').__getitems__(items)
    assert len(out) == 16 and len(decoded) == 16


def test_truncated_shard_is_skipped_named_and_counted(shards, tmp_path, caplog):
    broken = str(tmp_path / 'broken')
    shutil.copytree(shards, broken)
    victim = os.path.join(broken, 'digits-val-000003.tar')
    with open(victim, 'r+b') as f:
        f.truncate(os.path.getsize(victim) // 2)
    os.remove(os.path.join(broken, 'digits-val-000007.tar'))
    ds = ShardDataset(broken, 'val')
    sampler = ShardSampler(ds.data.lengths, 8, False, workers=1, pad=False)
    got = [t for batch in tud.DataLoader(ds, batch_size=8, sampler=sampler, collate_fn=list) for t in batch]
    assert len(got) == 359  # the run goes on with full batches
    assert 'digits-val-000003.tar' in caplog.text and 'digits-val-000007.tar' in caplog.text
    lost = ds.bad_files
    assert 27 < len(lost) < 27 + 28 and all('000003' in f or '000007' in f for f in lost)


def test_class_order_from_a_class_map_remaps_the_stored_labels(shards):
    items = list(ShardSampler(ShardDataset(shards, 'val').data.lengths, 16, False, pad=False))[:16]
    plain = [t for _, t in _KeyShards(shards, 'val').__getitems__(items)]
    names = [str(i) for i in range(9, -1, -1)]
    assert [t for _, t in _KeyShards(shards, 'val', class_names=names).__getitems__(items)] == [9 - t for t in plain]
    with pytest.raises(DataError, match='differ from the expected ones'):
        ShardDataset(shards, 'val', class_names=['a', 'b'])


def test_tar_of_the_tree_reads_like_the_folder(digits_tar, digits_dir):
    tar_ds = TarImageFolderDataset(digits_tar, ['val', 'validation'])
    folder = ImageFolderDataset(os.path.join(digits_dir, 'val'))
    assert tar_ds.classes == folder.classes and len(tar_ds) == len(folder)
    assert [os.path.basename(p) for p, _ in tar_ds.samples] == [os.path.basename(p) for p, _ in folder.samples]
    assert tar_ds.targets == folder.targets
    assert np.array_equal(np.asarray(tar_ds[5][0]), np.asarray(folder[5][0]))


def _args(**kw):
    base = dict(dataset='folder', data_dir='', class_map='', train_split='train', val_split='val', seed=0,
                batch_size=8, num_classes=None, validation_batch_size=None, no_aug=True, dataset_download=False,
                scale=(0.08, 1.), ratio=(0.75, 4 / 3), hflip=0.5, vflip=0., color_jitter=0.4, aa=None,
                train_interpolation='random', reprob=0., remode='pixel', recount=1)
    base.update(kw)
    return SimpleNamespace(**base)


def test_dataset_names_and_one_line_errors(digits_tar, shards, tmp_path, monkeypatch):
    assert dataset_kind(_args(data_dir=digits_tar)) == 'tar'
    assert dataset_kind(_args(dataset='', data_dir=shards)) == 'wds'  # a shard folder as DATA_DIR
    assert dataset_kind(_args(data_dir=shards + '/digits-train-{000000..000052}.tar')) == 'wds'
    assert dataset_kind(_args(dataset='wds/digits', data_dir='http://h/x')) == 'wds'
    with pytest.raises(DataError, match=r"'imagenet' is not one of: folder .*synthetic, wds/NAME, hfds/NAME"):
        dataset_kind(_args(dataset='imagenet'))
    monkeypatch.setitem(vdata._PACKAGES, 'tfds', ('no_such_module_xyz', 'tensorflow-datasets tensorflow'))
    with pytest.raises(DataError, match=r'^--dataset tfds/\.\.\.: the no_such_module_xyz package is missing: '
                                        r'pip install tensorflow-datasets tensorflow$'):
        build_datasets(_args(dataset='tfds/mnist', data_dir=str(tmp_path)), {}, False)


def _write_mnist(root, n_train=40, n_test=12):
    """A tiny MNIST in torchvision's raw layout (idx files), so that torch/mnist needs no download."""
    import struct
    raw = os.path.join(root, 'MNIST', 'raw')
    os.makedirs(raw)
    rng = np.random.default_rng(0)
    for prefix, n in (('train', n_train), ('t10k', n_test)):
        with open(os.path.join(raw, f'{prefix}-images-idx3-ubyte'), 'wb') as f:
            f.write(struct.pack('>IIII', 2051, n, 28, 28) + rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes())
        with open(os.path.join(raw, f'{prefix}-labels-idx1-ubyte'), 'wb') as f:
            f.write(struct.pack('>II', 2049, n) + (np.arange(n) % 10).astype(np.uint8).tobytes())


def test_torchvision_dataset_through_timm_is_resumable_like_a_folder(tmp_path):
    _write_mnist(str(tmp_path))
    cfg = {'input_size': (3, 32, 32), 'interpolation': 'bilinear', 'mean': (0.5,) * 3, 'std': (0.5,) * 3,
           'crop_pct': 1.0}
    args = _args(dataset='torch/mnist', data_dir=str(tmp_path), no_aug=False)
    train, val, classes = build_datasets(args, cfg, False)
    assert (len(train), len(val), len(classes)) == (40, 12, 10) and classes[3].startswith('3')
    assert isinstance(train, vdata.TimmDataset)
    train.set_epoch(2)
    a, b = train[7], train[7]  # augmentation seeded per (seed, epoch, index), as the folder's
    assert torch.equal(a[0], b[0]) and a[1] == 7 and a[0].shape == (3, 32, 32)


def test_no_eval_needs_no_validation_split_and_names_it_once(digits_dir, tmp_path):
    train_only = tmp_path / 'only'
    shutil.copytree(os.path.join(digits_dir, 'train'), train_only / 'train')
    cfg = {'input_size': (3, 32, 32), 'interpolation': 'bilinear', 'mean': (0.5,) * 3, 'std': (0.5,) * 3,
           'crop_pct': 1.0}
    train, val, classes = build_datasets(_args(data_dir=str(train_only)), cfg, False, need_eval=False)  # --no-eval
    assert len(train) == 1438 and len(val) == 0 and classes == [str(i) for i in range(10)]
    with pytest.raises(DataError) as e:
        build_datasets(_args(data_dir=str(train_only)), cfg, False)
    assert str(e.value).count('val/') == 1 and 'validation/' in str(e.value)


# ------------------------------------------------------------------------------------------------ the CLIs

TAR_ARGS = [*FAST_TRAIN_ARGS, '-b', '32', '--epochs', '1', '--max-steps', '3', '--workers', '1', '--seed', '1']


def _check_data(capsys, *argv):
    """(exit status, sorted places of the BAD lines, summary line) of python -m vancls.check_data, in process."""
    from vancls.check_data import main
    rc = main([*map(str, argv), '-j', '2'])
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    return rc, sorted(line[4:].split(': ', 1)[0] for line in lines if line.startswith('BAD ')), \
        (lines or cap.err.splitlines())[-1]


def test_check_data_lists_bad_members_of_a_tar_of_the_tree(digits_dir, tmp_path, capsys):
    src = _small_tree(digits_dir, tmp_path / 'digits', 2)
    (tmp_path / 'digits' / 'train' / '2' / 'truncated.png').write_bytes(
        (tmp_path / 'digits' / 'train' / '2' / sorted(os.listdir(os.path.join(src, 'train', '2')))[0])
        .read_bytes()[:60])
    (tmp_path / 'digits' / 'val' / '4' / 'text.jpg').write_bytes(b'not an image')
    path = str(tmp_path / 'digits.tar')
    with tarfile.open(path, 'w') as tar:
        tar.add(src, arcname='digits')
    rc, bad, summary = _check_data(capsys, path)
    assert rc == 1 and bad == [f'{path}:digits/train/2/truncated.png', f'{path}:digits/val/4/text.jpg']
    assert summary == '42 images checked, 2 unreadable'
    missing = tmp_path / 'missing.tar'
    assert _check_data(capsys, missing) == (2, [], f'error: data archive not found: {missing}')


def _replace_member(shard, ext, data):
    """Rewrite a shard with the first member ending in .EXT holding `data`; returns that member's name."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    victim = next(m.name for m, _ in members if m.name.endswith('.' + ext))
    with tarfile.open(shard, 'w', format=tarfile.USTAR_FORMAT) as tar:
        for m, d in members:
            d = data if m.name == victim else d
            m.size = len(d)
            tar.addfile(m, io.BytesIO(d))
    return victim


def test_check_data_lists_bad_samples_and_shards_of_a_shard_set(digits_dir, tmp_path, capsys):
    out = str(tmp_path / 'wds')
    info = convert(_small_tree(digits_dir, tmp_path / 'src', 3), out, '16KB', name='d')
    train, val = info['splits']['train']['filenames'], info['splits']['val']['filenames']
    assert len(train) > 1 and len(val) > 1
    assert _check_data(capsys, out) == (0, [], '60 images checked, 0 unreadable')
    bad_member = _replace_member(os.path.join(out, train[1]), 'png', b'\x89PNG\r\n\x1a\n broken')
    with open(os.path.join(out, val[0]), 'r+b') as f:
        f.truncate(os.path.getsize(os.path.join(out, val[0])) // 2)
    rc, bad, _ = _check_data(capsys, out)
    assert rc == 1 and bad == sorted([os.path.join(out, train[1]) + ':' + bad_member, os.path.join(out, val[0])])
    # A brace pattern: only its shards.
    rc, bad, _ = _check_data(capsys, os.path.join(out, 'd-train-{000001..000001}.tar'))
    assert rc == 1 and bad == [os.path.join(out, train[1]) + ':' + bad_member]
    assert _check_data(capsys, os.path.join(out, 'd-train-{000000..000000}.tar'))[0] == 0


@pytest.mark.slow
def test_train_and_validate_on_a_tar_of_the_tree(digits_tar, tmp_path):
    r = run_cli('train.py', digits_tar, '--dataset', '', *TAR_ARGS, '--output', tmp_path, '--experiment', 't')
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(tmp_path / 't' / 'results.json'))
    assert res['num_classes'] == 10 and res['final_top1'] is not None
    r = run_cli('validate.py', digits_tar, '--checkpoint', tmp_path / 't' / 'last.pth.tar', '--img-size', '32',
                '--device', 'cpu', '--workers', '1', '--results-file', tmp_path / 'v.json')
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(tmp_path / 'v.json'))['num_images'] == 359


# 2 epochs x 6 steps of batch 16 with the full recipe's augmentation, recovery every 2 steps, 2 loader workers.
RESUME_ARGS = [*FAST_TRAIN_ARGS, '--dataset', 'wds/digits', '-b', '16', '--epochs', '2', '--max-steps', '6',
               '--workers', '2', '--recovery-interval', '2', '--seed', '7', '--drop-path', '0.1', '--hflip', '0.5',
               '--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25', '--mixup', '0.8', '--cutmix', '1.0',
               '--smoothing', '0.1', '--experiment', 'run', '--no-eval']


@pytest.mark.slow
def test_sigkill_and_resume_auto_on_shards_is_bitwise_exact(shards, tmp_path):
    r = run_cli('train.py', shards, *RESUME_ARGS, '--output', tmp_path / 'ref')
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / 'out'
    # Killed at update 9 (epoch 1, step 3): resumes from the recovery checkpoint at epoch 1, step 2, mid-shard.
    r = run_cli('train.py', shards, *RESUME_ARGS, '--output', out, '--resume', 'auto',
                env=cli_env(VANCLS_FAULT='kill:update=9'))
    assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
    # Resumed with 1 loader worker instead of 2 (a machine with fewer CPUs): the same order, the same weights.
    r = run_cli('train.py', shards, *RESUME_ARGS, '--output', out, '--resume', 'auto', '--workers', '1')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'Resumed from' in r.stdout
    ref = torch.load(tmp_path / 'ref' / 'run' / 'last.pth.tar', map_location='cpu', weights_only=True)['state_dict']
    got = torch.load(out / 'run' / 'last.pth.tar', map_location='cpu', weights_only=True)['state_dict']
    assert [k for k in ref if not torch.equal(ref[k], got[k])] == []


@contextlib.contextmanager
def _http_server(folder):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=folder)
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f'http://127.0.0.1:{server.server_address[1]}'
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.slow
def test_train_and_evaluate_streaming_over_http_with_a_truncated_shard(shards, tmp_path):
    served = tmp_path / 'served'
    shutil.copytree(shards, served)
    victim = served / 'digits-val-000002.tar'
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 3])
    with _http_server(str(served)) as url:
        r = run_cli('train.py', url, '--dataset', 'wds/digits', *TAR_ARGS, '--output', tmp_path, '--experiment', 'h')
        assert r.returncode == 0, r.stderr[-3000:]
        assert 'digits-val-000002.tar' in r.stdout + r.stderr
        res = json.load(open(tmp_path / 'h' / 'results.json'))
        assert 0 < res['bad_images'] <= 28 and res['final_top1'] is not None
        r = run_cli('validate.py', url + '/digits-val-{000000..000001}.tar', '--dataset', 'wds/digits',
                    '--checkpoint', tmp_path / 'h' / 'last.pth.tar', '--img-size', '32', '--device', 'cpu',
                    '--workers', '2', '--results-file', tmp_path / 'v.json')
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.load(open(tmp_path / 'v.json'))['num_images'] == 27 + 28


@pytest.mark.slow
def test_launch_script_full_8p_on_shards(shards, tmp_path):
    """test/train_full_8p.sh with a shard folder as --data_path: 2 ranks, the same Final lines as on folders."""
    import subprocess
    import sys
    from conftest import ROOT
    env = {k: v for k, v in cli_env().items() if k not in ('MODEL', 'NPROC', 'EPOCHS', 'MAX_STEPS')}
    env.update(PYTHON=sys.executable, OUTPUT_ROOT=str(tmp_path), NPROC='2', MODEL='van_b0', BATCH_SIZE='16',
               IMG_SIZE='32', MAX_STEPS='2', EPOCHS='1', AMP='0', WORKERS='1', DEVICE='cpu', MAX_RESTARTS='0')
    p = subprocess.run(['bash', os.path.join(ROOT, 'test', 'train_full_8p.sh'), f'--data_path={shards}', '--',
                        '--aa', 'none'], env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert 'Final Train Accuracy : ' in p.stdout and 'Final Performance images/sec : ' in p.stdout
