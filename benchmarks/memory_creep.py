#!/usr/bin/env python3
"""Memory and file-descriptor creep of a long tiny training run: prints the curve, asserts nothing.

    python benchmarks/memory_creep.py [--epochs 200] [--workers 2] [--out DIR]

van_b0 at 32 px on a small copy of the digits set, a few steps per epoch, evaluation and a checkpoint every
epoch (--checkpoint-hist 3). At each "Epoch N:" log line (after that epoch's save) the training process's
resident memory (VmRSS), its open file descriptors, its live child processes and the output folder's files are
read from /proc and os.listdir. A flat curve after the warm-up epochs means nothing accumulates per epoch.
tests/test_resilience.py runs a short version with a generous bound.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EPOCH = re.compile(r'^Epoch (\d+):')


def make_subset(digits_dir: str, dest: str, train_per_class: int = 10, val_per_class: int = 4) -> str:
    """A small ImageFolder copy of the digits tree (so that an epoch is a few steps and a short evaluation)."""
    for split, n in (('train', train_per_class), ('val', val_per_class)):
        for cls in sorted(os.listdir(os.path.join(digits_dir, split))):
            src = os.path.join(digits_dir, split, cls)
            os.makedirs(os.path.join(dest, split, cls), exist_ok=True)
            for name in sorted(os.listdir(src))[:n]:
                shutil.copy(os.path.join(src, name), os.path.join(dest, split, cls, name))
    return dest


def creep_args(data_dir: str, out: str, epochs: int, workers: int, hist: int = 3) -> list:
    return [data_dir, '--model', 'van_b0', '--img-size', '32', '--aa', 'none', '--reprob', '0', '--mixup', '0',
            '--cutmix', '0', '--smoothing', '0', '--hflip', '0', '--drop-path', '0', '--warmup-epochs', '0',
            '--cooldown-epochs', '0', '--device', 'cpu', '-b', '16', '--max-steps', '3', '--epochs', str(epochs),
            '--workers', str(workers), '--checkpoint-hist', str(hist), '--log-interval', '100', '--output', out,
            '--experiment', 'creep']


def _proc_sample(pid: int) -> dict:
    with open(f'/proc/{pid}/status') as f:
        rss_kb = int(next(line for line in f if line.startswith('VmRSS:')).split()[1])
    fds = len(os.listdir(f'/proc/{pid}/fd'))
    children = 0
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    if int(f.read().rsplit(')', 1)[1].split()[1]) == pid:
                        children += 1
            except (OSError, ValueError, IndexError):
                pass
    return {'rss_mb': rss_kb / 1024, 'fds': fds, 'children': children}


def sample_run(args: list, folder: str, env=None, timeout: float = 3600, on_sample=None) -> tuple:
    """Run train.py ARGS; returns (exit status, [sample per epoch], output). A sample: epoch, rss_mb, fds,
    children (processes of the trainer still alive), files (names in the run folder `folder`); `on_sample(sample)`
    is called as each one is taken."""
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED='1')
    env.setdefault('OMP_NUM_THREADS', '1')
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples, lines, end = [], [], time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        m = _EPOCH.match(line)
        if m:
            sample = _proc_sample(proc.pid)
            sample.update(epoch=int(m.group(1)), files=sorted(os.listdir(folder)))
            samples.append(sample)
            if on_sample is not None:
                on_sample(sample)
        if time.monotonic() > end:
            proc.kill()
            break
    return proc.wait(), samples, ''.join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--epochs', type=int, default=200)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--out', default='', help='work folder (default: a temporary one, removed at the end)')
    p.add_argument('--every', type=int, default=10, help='print every N-th epoch')
    a = p.parse_args()
    work = a.out or tempfile.mkdtemp(prefix='vancls-creep-')
    try:
        sys.path.insert(0, ROOT)
        from vancls.digits import write_digits
        data = make_subset(write_digits(os.path.join(work, 'digits')), os.path.join(work, 'subset'))
        out = os.path.join(work, 'out')
        t0 = time.monotonic()
        print(f'{a.epochs} epochs, {a.workers} loader workers')
        print('epoch  rss_mb  fds  children  files  checkpoints', flush=True)

        def show(s):  # as they come: a run cut short still shows its curve
            if s['epoch'] % a.every == 0 or s['epoch'] == a.epochs - 1:
                ckpts = [f for f in s['files'] if f.endswith('.pth.tar')]
                print(f'{s["epoch"]:5d}  {s["rss_mb"]:6.1f}  {s["fds"]:3d}  {s["children"]:8d}  {len(s["files"]):5d}  '
                      f'{" ".join(ckpts)}', flush=True)
        rc, samples, output = sample_run(creep_args(data, out, a.epochs, a.workers), os.path.join(out, 'creep'),
                                         on_sample=show)
        if rc != 0:
            sys.exit(f'train.py failed with exit status {rc}:\n{output[-3000:]}')
        print(f'{time.monotonic() - t0:.0f} s')
        warm = samples[min(5, len(samples) - 1)]
        last = samples[-1]
        rss = [s['rss_mb'] for s in samples[5:]] or [warm['rss_mb']]
        print(f'after warm-up (epoch {warm["epoch"]} -> {last["epoch"]}): RSS {warm["rss_mb"]:.1f} -> '
              f'{last["rss_mb"]:.1f} MiB (min {min(rss):.1f}, max {max(rss):.1f}), '
              f'fds {warm["fds"]} -> {last["fds"]}, children {warm["children"]} -> {last["children"]}')
    finally:
        if not a.out:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
