"""train.py --log-tensorboard: the event file holds the per-epoch scalars, read back with TensorBoard's own reader."""
import csv
import os

import pytest
import torch


import train
from vancls.config import parse_with_config

pytestmark = pytest.mark.slow  # every test here runs training or a subprocess

torch.set_num_threads(min(2, torch.get_num_threads()))

# TensorBoard tag -> summary.csv column (vancls/reports.py RunReport.add_epoch)
TAGS = {'train/loss': 'train_loss', 'lr': 'lr', 'eval/top1': 'eval_top1', 'eval/top5': 'eval_top5',
        'eval/loss': 'eval_loss', 'train/img_per_sec': 'train_img_per_sec'}


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    argv = ['--dataset', 'synthetic', '--num-classes', '10', '--model', 'van_b0', '--img-size', '32', '-b', '8',
            '--epochs', '2', '--max-steps', '7', '--warmup-epochs', '1', '--aa', 'none', '--mixup', '0',
            '--cutmix', '0', '--reprob', '0', '--workers', '0', '--device', 'cpu', '--log-interval', '100',
            '--output', str(tmp_path), '--experiment', 'tb', '--log-tensorboard']
    results = train.main(parse_with_config(train.get_args_parser(), argv))
    out = os.path.join(str(tmp_path), 'tb')
    tb_dir = os.path.join(out, 'tensorboard')
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(tb_dir))

    acc = EventAccumulator(tb_dir)
    acc.Reload()
    assert set(TAGS) <= set(acc.Tags()['scalars']), acc.Tags()['scalars']
    with open(os.path.join(out, 'summary.csv')) as f:
        rows = list(csv.DictReader(f))
    assert [int(r['epoch']) for r in rows] == [0, 1]
    for tag, column in TAGS.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [0, 1], tag
        for e, row in zip(events, rows):
            assert e.value == pytest.approx(float(row[column]), rel=1e-6, abs=1e-7), tag  # stored as float32
    # the values are the run's: the warm-up lr, then the cosine half way (t=1 of 2); the last eval is the final one
    lrs = [e.value for e in acc.Scalars('lr')]
    assert lrs[0] == pytest.approx(1e-6, rel=1e-3)
    assert lrs[1] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6), rel=1e-3)
    assert acc.Scalars('eval/top1')[-1].value == pytest.approx(results['final_top1'], rel=1e-6)
    assert acc.Scalars('train/loss')[-1].value == pytest.approx(results['train_loss'], rel=1e-6)
    assert all(e.value > 0 for e in acc.Scalars('train/img_per_sec'))  # 7 steps: 2 timed after the 5 warm-up steps
