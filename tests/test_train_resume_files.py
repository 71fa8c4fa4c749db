"""Files of other savers on train.py --resume, and the evaluation-model builder's decisions: the loss scale of a
native-AMP reference checkpoint (timm's CheckpointSaver + NativeScaler, the installed timm's: 1.0 in the main pass,
0.4.12 in the legacy-timm pass), the model a checkpoint names, and --trust-checkpoint in the inference CLIs."""
import argparse
import os

import pytest
import torch

from conftest import ROOT, run_cli


def _reference_native_amp_file(folder) -> str:
    """What the reference's train.py writes with --amp when it picks native AMP: timm's CheckpointSaver with a
    NativeScaler (its state under `amp_scaler`), args as an argparse.Namespace."""
    import timm
    from timm.utils import CheckpointSaver, NativeScaler
    import models  # noqa: F401
    model = timm.create_model('van_b0', num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = NativeScaler()
    # NativeScaler makes a CUDA GradScaler (disabled without a GPU): give it a live one with a scale of its own,
    # as after some float16 steps on a GPU.
    scaler._scaler = torch.amp.GradScaler('cpu', init_scale=2. ** 11)
    saver = CheckpointSaver(model, optimizer, args=argparse.Namespace(model='van_b0', amp=True), amp_scaler=scaler,
                            checkpoint_dir=str(folder), recovery_dir=str(folder))
    saver.save_checkpoint(0, metric=50.)
    return os.path.join(str(folder), 'last.pth.tar')


def test_native_amp_loss_scale_restored_or_named(tmp_path):
    from train import restore_loss_scale
    from vancls.checkpoint import read_checkpoint
    from vancls.device import Amp, cpu_autocast_supports
    ckpt = read_checkpoint(_reference_native_amp_file(tmp_path))
    assert ckpt['amp_scaler']['scale'] == 2. ** 11  # the file holds timm's NativeScaler state
    off = Amp(torch.device('cpu'), enabled=False)
    restored, missing = [], []
    restore_loss_scale(off, ckpt, restored, missing)
    assert not restored and len(missing) == 1 and 'amp_scaler' in missing[0] and 'no loss scaling' in missing[0]
    if not cpu_autocast_supports(torch.float16):
        return  # torch < 2.3: no CPU float16 run to restore into (the not-restored case above still ran)
    fp16 = Amp(torch.device('cpu'), enabled=True, dtype='float16')
    restored, missing = [], []
    restore_loss_scale(fp16, ckpt, restored, missing)
    assert not missing and restored == [f'loss scale ({2. ** 11}, from amp_scaler)']
    assert fp16.scaler.get_scale() == 2. ** 11


def _digits_checkpoint(tmp_path, digits_dir, *extra) -> str:
    r = run_cli('train.py', digits_dir, '-c', os.path.join(ROOT, 'configs', 'demo.yaml'), '--epochs', '1',
                '--max-steps', '2', '--workers', '0', '--no-eval', '--output', tmp_path, '--experiment', 'e', *extra)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return str(tmp_path / 'e' / 'last.pth.tar')


@pytest.mark.slow
def test_checkpoint_names_its_model_and_trust_is_honoured(tmp_path, digits_dir):
    """predict.py / export.py take the model from the file; a contradicting --model is one line naming both; a
    file that needs full unpickling loads with --trust-checkpoint (the flag reaches the reader) and not without."""
    path = _digits_checkpoint(tmp_path, digits_dir)
    r = run_cli('export.py', '--checkpoint', path, '--model', 'van_b2', '--format', 'safetensors', '--output',
                tmp_path / 'x.safetensors')
    assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
    assert 'van_b2' in r.stderr and 'holds van_b0' in r.stderr
    # A file that holds a type outside the allowlist (a Fraction): refused without the flag, loaded with it.
    from fractions import Fraction
    ckpt = torch.load(path, weights_only=True)
    ckpt['extra'] = Fraction(1, 3)
    odd = str(tmp_path / 'odd.pth.tar')
    torch.save(ckpt, odd)
    image = os.path.join(digits_dir, 'val', '3', sorted(os.listdir(os.path.join(digits_dir, 'val', '3')))[0])
    for cli in ('predict.py', 'export.py'):
        extra = [image] if cli == 'predict.py' else ['--format', 'safetensors', '--output',
                                                     tmp_path / f'{cli}.safetensors']
        r = run_cli(cli, *extra, '--checkpoint', odd)
        assert r.returncode != 0 and 'refused to load' in r.stderr and '--trust-checkpoint' in r.stderr, r.stderr
        r = run_cli(cli, *extra, '--checkpoint', odd, '--trust-checkpoint')
        assert r.returncode == 0, r.stderr[-2000:]


def test_official_files_are_recognised_by_their_shapes():
    import timm
    import models  # noqa: F401
    from vancls.checkpoint import checkpoint_meta
    for name in ('van_b0', 'van_b1', 'van_b3'):
        sd = timm.create_model(name, num_classes=7).state_dict()
        meta = checkpoint_meta({'state_dict': {f'module.{k}': v for k, v in sd.items()}})
        assert meta['arch'] == name and meta['num_classes'] == 7
    assert checkpoint_meta({'state_dict': {'w': torch.zeros(1)}})['arch'] is None
    # timm's saver without args writes the class name as arch: the weights' shapes decide then
    sd = timm.create_model('van_b1').state_dict()
    assert checkpoint_meta({'state_dict': sd, 'arch': 'van'})['arch'] == 'van_b1'
    assert checkpoint_meta({'state_dict': sd, 'arch': 'van', 'args': {'model': 'van_small'}})['arch'] == 'van_small'
