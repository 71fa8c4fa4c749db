"""Training that survives: exact resume after SIGKILL, atomic checkpoints, bad images, untrusted and bad
checkpoints, non-finite loss, unwritable output; on real file systems (tmpfs mounts, root): a full disk, an output
folder that becomes read-only or is deleted mid-run; an image that becomes unreadable mid-run; no creep."""
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import skip_or_fail, FAST_TRAIN_ARGS, ROOT, cli_env, run_cli

# 2 epochs x 6 steps of batch 16, recovery checkpoint every 2 optimizer steps, 2 loader workers.
RESUME_ARGS = [*FAST_TRAIN_ARGS, '-b', '16', '--epochs', '2', '--max-steps', '6', '--workers', '2',
               '--recovery-interval', '2', '--seed', '7', '--drop-path', '0.1', '--hflip', '0.5',
               '--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25', '--mixup', '0.8', '--cutmix', '1.0',
               '--smoothing', '0.1', '--experiment', 'run']


def _state(path):
    return torch.load(path, map_location='cpu', weights_only=True)['state_dict']


def _folder_snapshot(folder):
    snap = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, 'rb') as fh:
                snap[os.path.relpath(p, folder)] = fh.read()
    return snap


@pytest.fixture(scope='module')
def reference_run(digits_dir, module_tmp):
    out = module_tmp('ref')
    r = run_cli('train.py', digits_dir, *RESUME_ARGS, '--output', out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out / 'run'


def test_sigkill_and_resume_auto_is_bitwise_exact(digits_dir, tmp_path, reference_run):
    out = tmp_path / 'out'
    # Three kills: mid-epoch 0 (after update 3: the recovery at 2 is the newest), inside a save (the 4th write:
    # recovery@2, recovery@4, last.pth.tar of epoch 0 -> killed after its temp file is written), mid-epoch 1.
    faults = ['kill:update=3', 'kill:save=2', 'kill:update=11']
    for fault in faults:
        r = run_cli('train.py', digits_dir, *RESUME_ARGS, '--output', out, '--resume', 'auto',
                    env=cli_env(VANCLS_FAULT=fault))
        assert r.returncode == -9, (fault, r.returncode, r.stderr[-2000:])
    r = run_cli('train.py', digits_dir, *RESUME_ARGS, '--output', out, '--resume', 'auto')
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('Resumed from') == 1
    ref, got = _state(reference_run / 'last.pth.tar'), _state(out / 'run' / 'last.pth.tar')
    assert ref.keys() == got.keys()
    different = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not different, different[:10]
    assert not [f for f in os.listdir(out / 'run') if '.tmp' in f]  # the killed save's temp file is cleaned up


def test_kill_during_save_keeps_previous_checkpoint(digits_dir, tmp_path):
    out = tmp_path / 'out'
    args = [*FAST_TRAIN_ARGS, '-b', '16', '--epochs', '2', '--max-steps', '3', '--workers', '0', '--output', out,
            '--experiment', 'e']
    # Writes: last@0 (1); killed in the 2nd write (last@1, between temp file and rename).
    r = run_cli('train.py', digits_dir, *args, env=cli_env(VANCLS_FAULT='kill:save=2'))
    assert r.returncode == -9
    ckpt = torch.load(out / 'e' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['epoch'] == 0  # the previous complete file, not a truncated new one


def test_torchrun_restart_after_worker_killed(digits_dir, tmp_path):
    marker = tmp_path / 'fired'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--max-restarts=1',
           '--standalone', os.path.join(ROOT, 'train.py'), digits_dir,
           *FAST_TRAIN_ARGS, '-b', '16', '--epochs', '2', '--max-steps', '4', '--workers', '0',
           '--recovery-interval', '2', '--resume', 'auto', '--output', str(tmp_path), '--experiment', 'tr']
    # torch >= 2.4 shares the agent's store with the workers; a restarted group can then read the dead group's
    # addresses (pytorch/pytorch#135712): give each attempt its own store, as test/common.sh does.
    env = cli_env(VANCLS_FAULT='kill:update=3:rank=1', VANCLS_FAULT_ONCE=marker, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
                  OMP_NUM_THREADS=1)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert marker.exists()  # the fault did fire
    assert 'Resumed from' in r.stdout
    with open(tmp_path / 'tr' / 'results.json') as f:
        res = json.load(f)
    assert res['world_size'] == 2 and res['ranks_in_sync'] is True
    assert torch.load(tmp_path / 'tr' / 'last.pth.tar', weights_only=True)['epoch'] == 1


@pytest.fixture(scope='module')
def odd_tree(digits_dir, module_tmp):
    """Digits with 3 unreadable files and 4 unusual but valid ones."""
    root = module_tmp('odd')
    for split in ('train', 'val'):
        for cls in range(10):
            src = os.path.join(digits_dir, split, str(cls))
            dst = root / split / str(cls)
            dst.mkdir(parents=True)
            for f in sorted(os.listdir(src))[:12 if split == 'train' else 4]:
                shutil.copy(os.path.join(src, f), dst / f)
    t = root / 'train'
    img = Image.open(next((t / '1').iterdir())).convert('RGB')
    img.save(t / '1' / 'good.jpg', quality=90)
    data = (t / '1' / 'good.jpg').read_bytes()
    (t / '2' / 'truncated.jpg').write_bytes(data[:len(data) // 2])
    (t / '3' / 'empty.jpg').write_bytes(b'')
    (t / '4' / 'text.jpg').write_text('this is not an image\n')
    img.convert('CMYK').save(t / '5' / 'cmyk.jpg')
    img.convert('RGBA').save(t / '6' / 'rgba.png')
    img.convert('L').save(t / '7' / 'gray.png')
    arr16 = (np.asarray(img.convert('L'), dtype=np.uint16) * 257)
    Image.fromarray(arr16).save(t / '8' / 'sixteen.png')
    return root


def test_open_rgb_handles_modes(odd_tree):
    from vancls.data import open_rgb
    t = odd_tree / 'train'
    ref = np.asarray(open_rgb(t / '7' / 'gray.png'))
    for path in (t / '5' / 'cmyk.jpg', t / '6' / 'rgba.png', t / '7' / 'gray.png', t / '8' / 'sixteen.png'):
        img = open_rgb(path)
        assert img.mode == 'RGB' and img.size == (32, 32)
    sixteen = np.asarray(open_rgb(t / '8' / 'sixteen.png'))
    assert np.abs(sixteen.astype(int) - ref.astype(int)).max() <= 1  # scaled down, not clipped to white
    for bad in ('2/truncated.jpg', '3/empty.jpg', '4/text.jpg'):
        with pytest.raises(Exception):
            open_rgb(t / bad)


def test_bad_images_are_skipped_named_and_counted(odd_tree, tmp_path):
    r = run_cli('train.py', odd_tree, *FAST_TRAIN_ARGS, '-b', '16', '--epochs', '2', '--workers', '2',
                '--output', tmp_path, '--experiment', 'odd')
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / 'odd' / 'results.json') as f:
        assert json.load(f)['bad_images'] == 3
    log = (tmp_path / 'odd' / 'train.log').read_text()
    for name in ('truncated.jpg', 'empty.jpg', 'text.jpg'):
        assert name in log
    assert 'bad images 3' in log
    # --max-bad-images 2: a clear error instead of training on.
    r = run_cli('train.py', odd_tree, *FAST_TRAIN_ARGS, '-b', '16', '--epochs', '1', '--workers', '0',
                '--max-bad-images', '2', '--output', tmp_path, '--experiment', 'odd2')
    assert r.returncode != 0 and 'more than --max-bad-images 2' in r.stderr


def test_check_data_lists_exactly_the_bad_files(odd_tree):
    r = subprocess.run([sys.executable, '-m', 'vancls.check_data', str(odd_tree), '-j', '2'], cwd=ROOT,
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    bad = sorted(line.split(':')[0][4:] for line in r.stdout.splitlines() if line.startswith('BAD '))
    assert bad == sorted(str(odd_tree / 'train' / p) for p in ('2/truncated.jpg', '3/empty.jpg', '4/text.jpg'))


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_malicious_pickle_is_refused(digits_dir, tmp_path):
    victim = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pth.tar'
    torch.save({'state_dict': {}, 'payload': _Evil(str(victim))}, evil)
    assert not victim.exists()
    for script, args in (('validate.py', [digits_dir, '--model', 'van_b0', '--checkpoint', evil]),
                         ('train.py', [digits_dir, *FAST_TRAIN_ARGS, '--resume', evil, '--output', tmp_path / 'o'])):
        r = run_cli(script, *args, '--device', 'cpu', timeout=300)
        assert r.returncode != 0 and '--trust-checkpoint' in r.stderr, r.stderr[-2000:]
        assert not victim.exists()


@pytest.fixture(scope='module')
def trained_ckpt(digits_dir, module_tmp):
    out = module_tmp('ck')
    r = run_cli('train.py', digits_dir, *FAST_TRAIN_ARGS, '-b', '16', '--epochs', '1', '--max-steps', '2',
                '--workers', '0', '--no-eval', '--output', out, '--experiment', 'e')
    assert r.returncode == 0, r.stderr[-2000:]
    return out / 'e'


def _bad_checkpoint(kind, tmp_path, good):
    import timm
    import models  # noqa: F401
    path = tmp_path / f'{kind}.pth.tar'
    if kind == 'truncated':
        data = (good / 'last.pth.tar').read_bytes()
        path.write_bytes(data[:len(data) // 3])
    elif kind == 'not_a_checkpoint':
        path.write_text('hello, I am a text file\n')
    elif kind == 'other_variant':
        torch.save({'state_dict': timm.create_model('van_b1', num_classes=10).state_dict()}, path)
    elif kind == 'other_classes':
        torch.save({'state_dict': timm.create_model('van_b0', num_classes=7).state_dict()}, path)
    return path


@pytest.mark.parametrize('kind,expect', [
    ('truncated', 'not a readable checkpoint'),
    ('not_a_checkpoint', 'not a readable checkpoint'),
    ('other_variant', 'holds van_b1'),  # one line naming both models (the file's shapes say which it is)
    ('other_classes', 'head.weight'),
])
def test_bad_checkpoints_clear_error_and_output_unchanged(digits_dir, tmp_path, trained_ckpt, kind, expect):
    bad = _bad_checkpoint(kind, tmp_path, trained_ckpt)
    before = _folder_snapshot(trained_ckpt)
    r = run_cli('train.py', digits_dir, *FAST_TRAIN_ARGS, '--resume', bad, '--output', trained_ckpt.parent,
                '--experiment', 'e', '--workers', '0', timeout=300)
    assert r.returncode != 0 and str(bad) in r.stderr and expect in r.stderr, r.stderr[-2000:]
    assert _folder_snapshot(trained_ckpt) == before
    r = run_cli('validate.py', digits_dir, '--model', 'van_b0', '--img-size', '32', '--checkpoint', bad,
                '--num-classes', '10', '--device', 'cpu', timeout=300)
    assert r.returncode != 0 and str(bad) in r.stderr and expect in r.stderr, r.stderr[-2000:]
    assert kind != 'other_variant' or r.stderr.count('\n') == 1  # another model: one line naming both


def test_non_finite_loss_stops_with_epoch_and_step(digits_dir, tmp_path):
    # 3 steps per epoch: update 5 is epoch 1, step 2.
    r = run_cli('train.py', digits_dir, *FAST_TRAIN_ARGS, '-b', '16', '--epochs', '3', '--max-steps', '3',
                '--workers', '0', '--no-eval', '--output', tmp_path, '--experiment', 'nan',
                env=cli_env(VANCLS_FAULT='nan:update=5'))
    assert r.returncode != 0
    assert 'non-finite loss at epoch 1, step 2/3' in r.stderr, r.stderr[-2000:]
    ckpt = torch.load(tmp_path / 'nan' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['epoch'] == 0 and all(torch.isfinite(v).all() for v in ckpt['state_dict'].values()
                                      if v.is_floating_point())


def test_unwritable_output_fails_before_training(digits_dir, tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    r = run_cli('train.py', digits_dir, *FAST_TRAIN_ARGS, '--output', blocker / 'sub', '--workers', '0', timeout=300)
    assert r.returncode != 0 and 'not writable' in r.stderr and 'Train:' not in r.stdout


def test_history_pruned_to_last_n(tmp_path):
    from vancls.checkpoint import CheckpointManager, find_auto_resume
    mgr = CheckpointManager(str(tmp_path), max_history=2)
    for epoch, metric in enumerate([10., 30., 20., 25.]):
        mgr.save_epoch({'epoch': epoch, 'state_dict': {'w': torch.full((1,), float(epoch))}}, epoch, metric)
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-2.pth.tar', 'checkpoint-3.pth.tar', 'last.pth.tar',
                                            'model_best.pth.tar']
    assert torch.load(tmp_path / 'model_best.pth.tar', weights_only=True)['epoch'] == 1
    # --resume auto: newest loadable; a corrupt newer file is skipped with a warning.
    mgr.save_recovery({'epoch': 4, 'step_in_epoch': 3, 'state_dict': {}})
    assert find_auto_resume(str(tmp_path))[0].endswith('recovery.pth.tar')
    (tmp_path / 'recovery.pth.tar').write_bytes(b'garbage')
    assert find_auto_resume(str(tmp_path))[0].endswith('last.pth.tar')


# ---------------------------------------------------------------------------------------------------------------
# Real file systems: a small tmpfs that fills up, a read-only remount, a deleted folder. Mounting needs root
# (CAP_SYS_ADMIN), which the development machines and CI have; elsewhere these tests skip and say why (under CI
# they fail).

@contextlib.contextmanager
def _tmpfs(path, size_bytes):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size_bytes}', 'tmpfs', str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        skip_or_fail(f'cannot mount a tmpfs at {path} (needs root/CAP_SYS_ADMIN): {r.stderr.strip()}')
    try:
        yield path
    finally:
        subprocess.run(['umount', '-l', str(path)], capture_output=True)


def test_mount_failure_skips_here_and_fails_under_ci(tmp_path, monkeypatch):
    """A machine that cannot mount (no CAP_SYS_ADMIN) skips the file-system tests, saying why; CI fails them."""
    refused = subprocess.CompletedProcess(['mount'], 32, '', 'mount: permission denied')
    monkeypatch.setattr(subprocess, 'run', lambda *a, **k: refused)
    monkeypatch.delenv('CI', raising=False)
    with pytest.raises(pytest.skip.Exception, match='cannot mount a tmpfs .*permission denied'):
        with _tmpfs(tmp_path / 'fs', 2 ** 20):
            pass
    monkeypatch.setenv('CI', 'true')
    with pytest.raises(pytest.fail.Exception, match='CI=true: cannot mount a tmpfs .*permission denied'):
        with _tmpfs(tmp_path / 'fs', 2 ** 20):
            pass


def _remount(path, options):
    for _ in range(200):  # busy while a file on it is open for writing (a save in progress): retry
        r = subprocess.run(['mount', '-o', f'remount,{options}', str(path)], capture_output=True, text=True)
        if r.returncode == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f'mount -o remount,{options} {path}: {r.stderr.strip()}')


def _checkpoint_bytes(num_classes=10):
    """Weights + AdamW's two moments of van_b0, float32: about the size of one training checkpoint."""
    import timm
    import models  # noqa: F401 (registers van_*)
    return 3 * 4 * sum(p.numel() for p in timm.create_model('van_b0', num_classes=num_classes).parameters())


def _assert_intact(folder):
    names = os.listdir(folder)
    assert not [n for n in names if '.tmp' in n], names
    return {n: torch.load(os.path.join(folder, n), map_location='cpu', weights_only=True)['epoch']
            for n in names if n.endswith('.pth.tar')}


def _start(args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *map(str, args)], cwd=ROOT,
                            env=cli_env(PYTHONUNBUFFERED=1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_line(proc, text):
    """Read the process's stdout up to a line containing `text`; returns the lines read."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f'exited before {text!r}: {proc.wait()}\n{"".join(lines)[-2000:]}{proc.stderr.read()[-2000:]}')


QUICK = [*FAST_TRAIN_ARGS, '-b', '16', '--max-steps', '2', '--workers', '0', '--no-eval', '--checkpoint-hist', '1',
         '--cooldown-epochs', '0',
         '--experiment', 'e']


@pytest.mark.slow
def test_full_disk_stops_with_path_and_space_then_resumes(digits_dir, tmp_path):
    size = _checkpoint_bytes()
    mnt = tmp_path / 'disk'
    with _tmpfs(mnt, int(size * 1.5)):  # one checkpoint fits, a second one (its temporary file) does not
        args = [digits_dir, *QUICK, '--epochs', '3', '--output', mnt]
        r = run_cli('train.py', *args)
        folder = mnt / 'e'
        assert r.returncode == 1, r.stderr[-2000:]
        msg = r.stderr.strip().splitlines()[-1]
        assert (f'could not write checkpoint {folder / "last.pth.tar"}: No space left on device' in msg
                and f'free in {folder}' in msg and 'MiB are free' in msg and 'needs about' in msg), msg
        assert _assert_intact(folder) == {'last.pth.tar': 0, 'checkpoint-0.pth.tar': 0}
        assert 'Epoch 0:' in (folder / 'train.log').read_text()
        _remount(mnt, f'size={size * 4}')  # the disk is freed
        r = run_cli('train.py', *args, '--resume', 'auto')
        assert r.returncode == 0, r.stderr[-2000:]
        assert f'Resumed from {folder / "last.pth.tar"}: epoch 1, step 0' in r.stdout
        assert _assert_intact(folder) == {'last.pth.tar': 2, 'checkpoint-2.pth.tar': 2}


@pytest.mark.slow
def test_output_becomes_read_only_keeps_last_good_state(digits_dir, tmp_path):
    mnt = tmp_path / 'disk'
    with _tmpfs(mnt, 400 * 2 ** 20):
        folder = mnt / 'e'
        folder.mkdir()
        # train.log lives elsewhere (a symlink): a file open for writing would keep the remount busy.
        (folder / 'train.log').symlink_to(tmp_path / 'train.log')
        args = [digits_dir, *QUICK, '--epochs', '6', '--output', mnt]
        proc = _start(args)
        _wait_line(proc, 'Epoch 0:')
        _remount(mnt, 'ro')
        rc = proc.wait(600)
        err = proc.stderr.read()
        assert rc == 1, err[-2000:]
        assert 'could not write checkpoint' in err and 'Read-only file system' in err and str(folder) in err, err
        saved = _assert_intact(folder)
        last_epoch = saved['last.pth.tar']
        assert last_epoch < 5 and f'Epoch {last_epoch}:' in (tmp_path / 'train.log').read_text()
        _remount(mnt, 'rw')
        r = run_cli('train.py', *args, '--resume', 'auto')
        assert r.returncode == 0, r.stderr[-2000:]
        assert f'epoch {last_epoch + 1}, step 0' in r.stdout and _assert_intact(folder)['last.pth.tar'] == 5


@pytest.mark.slow
def test_output_deleted_mid_run_is_recreated_with_the_current_state(digits_dir, tmp_path):
    args = [digits_dir, *QUICK, '--epochs', '4', '--output', tmp_path]
    proc = _start(args)
    _wait_line(proc, 'Epoch 0:')
    shutil.rmtree(tmp_path / 'e')
    out = proc.stdout.read()
    rc = proc.wait(600)
    assert rc == 0, proc.stderr.read()[-2000:]
    assert f'output folder {tmp_path / "e"} was deleted during the run: recreating it' in out
    assert _assert_intact(tmp_path / 'e') == {'last.pth.tar': 3, 'checkpoint-3.pth.tar': 3}
    with open(tmp_path / 'e' / 'results.json') as f:
        assert json.load(f)['epochs'] == 4


@pytest.mark.slow
def test_image_unreadable_mid_training_is_skipped_and_counted(odd_tree, tmp_path):
    tree = tmp_path / 'tree'
    shutil.copytree(odd_tree, tree)
    for bad in ('2/truncated.jpg', '3/empty.jpg', '4/text.jpg'):
        os.remove(tree / 'train' / bad)  # start clean: every image readable
    victim = sorted((tree / 'train' / '6').glob('*.png'))[0]
    proc = _start([tree, *FAST_TRAIN_ARGS, '-b', '16', '--epochs', '4', '--workers', '2', '--no-eval',
                   '--output', tmp_path, '--experiment', 'img'])
    _wait_line(proc, 'Epoch 0:')
    data = victim.read_bytes()
    victim.write_bytes(data[:len(data) // 2])  # truncated between epochs (or early in epoch 1)
    rc = proc.wait(600)
    assert rc == 0, proc.stderr.read()[-2000:]
    with open(tmp_path / 'img' / 'results.json') as f:
        assert json.load(f)['bad_images'] == 1
    log = (tmp_path / 'img' / 'train.log').read_text()
    assert f'bad image skipped: {victim}' in log and 'Epoch 0: ' in log and 'bad images 1' in log


@pytest.mark.slow
@pytest.mark.soak
def test_no_memory_or_descriptor_creep(digits_dir, tmp_path):
    """30 tiny epochs, each evaluated and checkpointed, loader workers started every epoch: after 5 warm-up
    epochs the process's RSS and open files stay put, no child process is left, and the folder holds only the
    configured history. benchmarks/memory_creep.py prints the long (200-epoch) curve."""
    from benchmarks.memory_creep import creep_args, make_subset, sample_run
    data = make_subset(digits_dir, str(tmp_path / 'subset'))
    folder = tmp_path / 'out' / 'creep'
    rc, samples, output = sample_run(creep_args(data, tmp_path / 'out', epochs=30, workers=1, hist=3), folder,
                                     env=cli_env(), timeout=900)
    assert rc == 0, output[-3000:]
    assert [s['epoch'] for s in samples] == list(range(30))
    warm, last = samples[5], samples[-1]
    assert last['rss_mb'] - warm['rss_mb'] < max(100., 0.2 * warm['rss_mb']), [s['rss_mb'] for s in samples]
    # A sample can catch the pipes of loader workers that are still shutting down: compare the lowest counts.
    fds = [s['fds'] for s in samples]
    assert min(fds[-5:]) <= min(fds[5:10]) + 2 and max(fds[5:]) <= min(fds[5:10]) + 16, fds
    assert last['children'] == 0, [s['children'] for s in samples]
    ckpts = sorted(f for f in last['files'] if f.endswith('.pth.tar'))
    assert ckpts == ['checkpoint-27.pth.tar', 'checkpoint-28.pth.tar', 'checkpoint-29.pth.tar', 'last.pth.tar',
                     'model_best.pth.tar'], last['files']
    assert not [f for f in last['files'] if '.tmp' in f]
