"""hfds/NAME on a data set saved locally with Hugging Face `datasets` (no network): built from an ImageFolder tree
with load_dataset('imagefolder') + save_to_disk, the tree then deleted (the saved set holds the image bytes), read
through timm's hfds reader (load_dataset(NAME, cache_dir=DATA_DIR)), in process and by train.py."""
import os
import shutil

import pytest
import torch

from conftest import FAST_TRAIN_ARGS, cli_env, run_cli, skip_or_fail
from test_shards import _args, _small_tree
from vancls import data as vdata
from vancls.data import DataError, build_datasets

CFG = {'input_size': (3, 32, 32), 'interpolation': 'bilinear', 'mean': (0.5,) * 3, 'std': (0.5,) * 3,
       'crop_pct': 1.0}


@pytest.fixture(scope='module')
def hf_saved(digits_dir, module_tmp):
    """A DatasetDict (train: 2 digits per class, validation: 1 per class) saved with save_to_disk; its source tree
    and build cache are deleted, so only the saved set remains. `datasets` is kept offline meanwhile."""
    try:
        import datasets
    except ImportError:
        skip_or_fail('hfds/: the datasets package is missing (pip install datasets; requirements.txt has it)')
    root = module_tmp('hfds')
    tree = _small_tree(digits_dir, root / 'tree', per_class=2)
    for cls in os.listdir(os.path.join(tree, 'val')):  # 1 validation image per class
        for f in sorted(os.listdir(os.path.join(tree, 'val', cls)))[1:]:
            os.remove(os.path.join(tree, 'val', cls, f))
    saved = str(root / 'digits-hf')
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, 'HF_HUB_OFFLINE', True)
        mp.setattr(datasets.config, 'HF_DATASETS_OFFLINE', True)
        datasets.load_dataset('imagefolder', data_dir=tree, cache_dir=str(root / 'build-cache')).save_to_disk(saved)
        shutil.rmtree(tree)
        shutil.rmtree(root / 'build-cache')
        yield saved


def test_saved_set_reads_as_timm_dataset_with_val_fallback(hf_saved, tmp_path):
    args = _args(dataset='hfds/' + hf_saved, data_dir=str(tmp_path / 'cache'), no_aug=False)
    train, val, classes = build_datasets(args, CFG, False)  # --val-split val finds the 'validation' split
    assert (len(train), len(val)) == (20, 10) and classes == [str(i) for i in range(10)]
    assert isinstance(train, vdata.TimmDataset) and isinstance(val, vdata.TimmDataset)
    assert sorted(int(val[i][1]) for i in range(10)) == list(range(10))
    train.set_epoch(3)
    a, b = train[5], train[5]  # augmentation seeded per (seed, epoch, index): resumable like a folder
    assert torch.equal(a[0], b[0]) and a[0].shape == (3, 32, 32)
    with pytest.raises(DataError, match=r"split nope\): ValueError: Unknown split \"nope\".*'train', 'validation'"):
        build_datasets(_args(dataset='hfds/' + hf_saved, data_dir=str(tmp_path / 'cache'), val_split='nope'),
                       CFG, False)


@pytest.mark.slow
def test_train_on_saved_set_offline(hf_saved, tmp_path):
    env = cli_env(HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1, HF_HOME=tmp_path / 'hf-home')
    res = run_cli('train.py', tmp_path / 'cache', '--dataset', 'hfds/' + hf_saved, *FAST_TRAIN_ARGS, '-b', '4',
                  '--epochs', '1', '--max-steps', '2', '--workers', '1', '--output', tmp_path / 'out',
                  '--experiment', 'hf', env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert '20 train / 10 val images' in log, log[-3000:]
    assert 'Test: ' in log and '(10 images)' in log and '*** Best metric' in log, log[-3000:]
    assert os.path.isfile(tmp_path / 'out' / 'hf' / 'model_best.pth.tar')
