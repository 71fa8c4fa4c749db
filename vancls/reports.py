"""Logging and run reports: train.log, args.yaml, summary.csv, curves.png, results.json, TensorBoard scalars.
Only rank 0 writes; other ranks log warnings and errors to the console."""
import csv
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional

import yaml

_logger = logging.getLogger('vancls')

SUMMARY_COLUMNS = ('epoch', 'lr', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'train_img_per_sec',
                   'bad_images')


def setup_logging(log_file: Optional[str] = None, is_main: bool = True):
    """Console (stdout) for rank 0, warnings only elsewhere; plus log_file (appended) when given."""
    logger = logging.getLogger('vancls')
    logger.handlers.clear()
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter('%(message)s'))
    logger.addHandler(console)
    if log_file and is_main:
        handler = logging.FileHandler(log_file, delay=True)  # no file until something is logged
        handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
        logger.addHandler(handler)
    return logger


def save_args(args, path: str):
    with open(path, 'w') as f:
        yaml.safe_dump({k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(args).items())}, f,
                       default_flow_style=False)


def write_json(obj: Dict[str, Any], path: str):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2)
        f.write('\n')
    os.replace(tmp, path)


class RunReport:
    """Per-epoch rows (summary.csv and curves.png) and optional TensorBoard scalars."""

    def __init__(self, folder: str, tensorboard: bool = False):
        self.folder = folder
        self.csv_path = os.path.join(folder, 'summary.csv')
        self.rows: List[Dict[str, Any]] = []
        if os.path.isfile(self.csv_path):  # a resumed run continues its table
            with open(self.csv_path) as f:
                self.rows = [dict(r) for r in csv.DictReader(f)]
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError('--log-tensorboard needs the tensorboard package: pip install tensorboard') from None
            self.tb = SummaryWriter(log_dir=os.path.join(folder, 'tensorboard'))

    def add_epoch(self, row: Dict[str, Any]):
        epoch = int(row['epoch'])
        self.rows = [r for r in self.rows if int(r['epoch']) < epoch] + [row]  # a resumed epoch replaces its row
        tmp = self.csv_path + '.tmp'
        with open(tmp, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS, extrasaction='ignore')
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.csv_path)
        if self.tb is not None:
            for key in ('lr', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'train_img_per_sec'):
                if row.get(key) not in (None, ''):
                    self.tb.add_scalar(key.replace('_', '/', 1), float(row[key]), epoch)
            self.tb.flush()
        self.plot()

    def restore_row(self, row: Dict[str, Any]):
        """Add the row of a checkpoint's epoch if the table lacks it (written after the checkpoint: a stop between
        the two left it out)."""
        if all(int(r['epoch']) != int(row['epoch']) for r in self.rows):
            self.add_epoch(row)

    def plot(self):
        """curves.png: train/eval loss, eval top-1 and learning rate per epoch."""
        try:
            import matplotlib
            matplotlib.use('Agg')
            import matplotlib.pyplot as plt
        except ImportError:
            return
        epochs = [int(r['epoch']) for r in self.rows]

        def col(name):
            return [float(r[name]) if r.get(name) not in (None, '') else float('nan') for r in self.rows]

        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        axes[0].plot(epochs, col('train_loss'), label='train')
        axes[0].plot(epochs, col('eval_loss'), label='eval')
        axes[0].set_title('loss')
        axes[0].legend()
        axes[1].plot(epochs, col('eval_top1'))
        axes[1].set_title('eval top-1 (%)')
        axes[2].plot(epochs, col('lr'))
        axes[2].set_title('learning rate')
        for ax in axes:
            ax.set_xlabel('epoch')
        fig.tight_layout()
        fig.savefig(os.path.join(self.folder, 'curves.png'), dpi=80)
        plt.close(fig)

    def close(self):
        if self.tb is not None:
            self.tb.close()


class _WandbReport:
    """A RunReport that also sends each epoch's row to a W&B run (--log-wandb); everything else is the report's."""

    def __init__(self, report, wandb_run):
        self._report, self._run = report, wandb_run

    def add_epoch(self, row: Dict[str, Any]):
        self._report.add_epoch(row)
        self._run.log({k: v for k, v in row.items() if v is not None}, step=row.get('epoch'))

    def close(self):
        self._report.close()
        self._run.finish()

    def __getattr__(self, name):
        return getattr(self._report, name)


def with_wandb(report, args, out_dir: str):
    """`report` itself, or with --log-wandb a wrapper logging every epoch to W&B (project: the experiment folder's
    parent name, run name: the experiment; config: the arguments)."""
    from .reference_compat import reference_option
    if not reference_option(args, 'log_wandb'):
        return report
    import wandb
    run = wandb.init(project=os.path.basename(os.path.dirname(os.path.abspath(out_dir))) or 'van',
                     name=os.path.basename(out_dir), config=vars(args), dir=out_dir)
    return _WandbReport(report, run)
