"""The execution long runs get by default (`--fast-path auto` resolves to nhwc_lka on AVX2/AVX512 CPUs for long
runs; nhwc is the eager channels-last variant) under the same guarantees the reference execution has: exact
resume after SIGTERM and after kill -9 (with EMA and gradient accumulation in the state), 2 ranks in sync, and a
checkpoint that moves between execution modes (another machine) resumes and trains on within tolerance.

The CLI tests elsewhere run at 32 px for fewer passes than `auto` needs to pick a fast path, so they exercise the
reference execution only: these force the mode. nhwc_lka compiles its kernels with Inductor; one Inductor cache
for the whole session keeps the compiles to the first run.

Also here, in process: the training loop's throughput report for runs shorter than its warm-up.
"""
import os
import subprocess

import pytest
import torch

from conftest import FAST_TRAIN_ARGS, ROOT, cli_env, run_cli
from test_fast_paths import needs_kernels
from test_preemption import TORCHRUN, _assert_bitwise_equal, _assert_intact, _preempt_line, _state
from test_train import _results


def in_each_mode(test):
    """A slow test run once per mode (it needs the fast-path kernels: torch >= 2.4)."""
    return pytest.mark.slow(needs_kernels(pytest.mark.parametrize('mode', MODES)(test)))


MODES = ['nhwc_lka', 'nhwc']  # before in_each_mode
# 2 epochs x 4 optimizer steps of 2 x 8 images (gradient accumulation), EMA, a recovery checkpoint every 2
# steps, the reference's random augmentations (their RNG states must resume too); no evaluation (the train step is
# what the modes change; evaluation would only add compiles for its batch shapes).
ARGS = [*FAST_TRAIN_ARGS, '-b', '8', '--grad-accum-steps', '2', '--epochs', '2', '--max-steps', '4',
        '--model-ema', '--recovery-interval', '2', '--seed', '7', '--drop-path', '0.1', '--aa',
        'rand-m9-mstd0.5-inc1', '--reprob', '0.25', '--mixup', '0.8', '--cutmix', '1.0', '--smoothing', '0.1',
        '--workers', '0', '--no-eval', '--log-interval', '1', '--experiment', 'run']


@pytest.fixture(scope='session')
def inductor_cache_dir(tmp_path_factory):
    """One Inductor cache for the session: only the first nhwc_lka run of the session compiles cold."""
    return tmp_path_factory.mktemp('inductor-cache')


@pytest.fixture(scope='module', autouse=True)
def _inductor_cache(inductor_cache_dir):
    before = os.environ.get('TORCHINDUCTOR_CACHE_DIR')
    os.environ['TORCHINDUCTOR_CACHE_DIR'] = str(inductor_cache_dir)  # cli_env passes it to every run
    yield
    if before is None:
        os.environ.pop('TORCHINDUCTOR_CACHE_DIR', None)
    else:
        os.environ['TORCHINDUCTOR_CACHE_DIR'] = before


def _train(digits_dir, out, mode, *extra, env=None):
    return run_cli('train.py', digits_dir, *ARGS, '--fast-path', mode, '--output', out, *extra, env=env, timeout=900)


@pytest.fixture(scope='module')
def reference(digits_dir, module_tmp):
    """mode -> the folder of an uninterrupted run in that mode (run on first use)."""
    runs = {}

    def get(mode):
        if mode not in runs:
            out = module_tmp(f'ref-{mode}')
            r = _train(digits_dir, out, mode)
            assert r.returncode == 0, r.stderr[-3000:]
            assert f'fast path {mode}\n' in r.stdout, r.stdout[-2000:]
            runs[mode] = out / 'run'
        return runs[mode]
    return get


def _assert_ema_equal(ref_file, got_file):
    ref, got = (torch.load(f, map_location='cpu', weights_only=True)['state_dict_ema'] for f in (ref_file, got_file))
    different = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert ref.keys() == got.keys() and not different, different[:10]


@in_each_mode
def test_sigterm_then_kill9_then_resume_is_bitwise_exact(digits_dir, tmp_path, reference, mode):
    """SIGTERM at update 3 (exit 143, recovery at epoch 0 step 3), resume; kill -9 at update 7 (epoch 1 step 3: the
    newest file is the recovery at step 2 written by the resumed process), resume: the weights and the EMA weights
    end bitwise equal to the uninterrupted run's, with the same number of optimizer steps."""
    ref = reference(mode)
    r = _train(digits_dir, tmp_path, mode, env=cli_env(VANCLS_FAULT='signal:update=3'))
    assert r.returncode == 143, r.stderr[-3000:]
    folder = tmp_path / 'run'
    assert 'Preempted by SIGTERM at epoch 0, step 3/4 (update 3)' in _preempt_line(folder)
    _assert_intact(folder)
    r = _train(digits_dir, tmp_path, mode, '--resume', 'auto', env=cli_env(VANCLS_FAULT='kill:update=7'))
    assert r.returncode == -9, r.stderr[-3000:]
    assert f'Resumed from {folder / "recovery.pth.tar"}: epoch 0, step 3' in r.stdout
    r = _train(digits_dir, tmp_path, mode, '--resume', 'auto')
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'Resumed from {folder / "recovery.pth.tar"}: epoch 1, step 2' in r.stdout
    _assert_bitwise_equal(ref / 'last.pth.tar', folder / 'last.pth.tar')
    _assert_ema_equal(ref / 'last.pth.tar', folder / 'last.pth.tar')
    done, want = (torch.load(f / 'last.pth.tar', map_location='cpu', weights_only=True) for f in (folder, ref))
    assert done['num_updates'] == want['num_updates'] == 8
    assert _results(folder)['global_batch'] == 16  # 8 per step x 2 accumulation steps
    # the EMA is a real average here, not a copy of the weights
    assert not all(torch.equal(done['state_dict'][k], done['state_dict_ema'][k]) for k in done['state_dict'])


@in_each_mode
def test_two_ranks_stay_in_sync(digits_dir, tmp_path, mode):
    """2 gloo ranks in the mode: bitwise the same weights at the end, and DDP's gradient buckets match the
    kernels' gradient strides (no 'Grad strides do not match' warning)."""
    cmd = [*TORCHRUN, os.path.join(ROOT, 'train.py'), digits_dir, *ARGS, '--fast-path', mode, '--output', tmp_path]
    r = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=cli_env(OMP_NUM_THREADS=1), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = _results(tmp_path / 'run')
    assert res['world_size'] == 2 and res['global_batch'] == 32 and res['ranks_in_sync'] is True
    assert 'Grad strides do not match' not in r.stderr


@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize('written,resumed', [('nhwc_lka', 'none'), ('nhwc', 'nhwc_lka')])
def test_checkpoint_resumes_under_another_mode(digits_dir, tmp_path, reference, written, resumed):
    """The end-of-epoch-0 checkpoint of a run in one mode, resumed in another (a user moving to a machine where
    auto picks differently): epoch 1 trains on from it, ending within float tolerance of the run that stayed in
    the first mode (same data, same RNG draws; only the kernels' rounding differs)."""
    ref = reference(written)
    folder = tmp_path / 'run'
    folder.mkdir()
    ckpt = torch.load(ref / 'checkpoint-0.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['epoch'] == 0
    (folder / 'last.pth.tar').write_bytes((ref / 'checkpoint-0.pth.tar').read_bytes())
    r = _train(digits_dir, tmp_path, resumed, '--resume', 'auto')
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'Resumed from {folder / "last.pth.tar"}: epoch 1, step 0' in r.stdout
    start, want, got = ckpt['state_dict'], _state(ref / 'last.pth.tar'), _state(folder / 'last.pth.tar')
    # The tolerance is on the whole of epoch 1's change, not per tensor: AdamW turns the rounding noise of gradients
    # that are about 0 (the conv biases in front of a BatchNorm) into lr-sized steps of either sign.
    keys = [k for k in want if want[k].is_floating_point()]
    diverged = _norm(got[k] - want[k] for k in keys) / _norm(want[k] - start[k] for k in keys)
    assert diverged < 0.01, f'epoch 1 in {resumed} differs from it in {written} by {diverged:.2%} of its change'
    assert f'fast path {resumed}\n' in r.stdout
    loss_got, loss_want = _results(folder)['train_loss'], _results(ref)['train_loss']
    assert abs(loss_got - loss_want) <= 1e-3 * abs(loss_want), (loss_got, loss_want)


def _norm(tensors) -> float:
    return float(sum(t.double().square().sum() for t in tensors).sqrt())


# ------------------------------------------------------------------------------------ throughput of short runs

@pytest.mark.parametrize('steps', [3, 8])
def test_throughput_of_an_epoch_shorter_than_the_warm_up(steps, caplog):
    """An epoch of no more optimizer steps than WARMUP_STEPS is timed whole and says so (train.py then reports a
    real FPS instead of 0.00); a longer one skips its warm-up steps, silently."""
    import logging
    from vancls.device import Amp, DistEnv
    from vancls.engine import WARMUP_STEPS, TrainLoop, train_one_epoch
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,))) for _ in range(steps)]
    loop = TrainLoop(model=model, loader=batches, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     loss_fn=torch.nn.CrossEntropyLoss(), amp=Amp(torch.device('cpu')),
                     env=DistEnv(device=torch.device('cpu')), steps_per_epoch=steps, log_interval=100)
    logger = logging.getLogger('vancls')
    propagate, logger.propagate = logger.propagate, True  # setup_logging (other tests) turns it off
    try:
        with caplog.at_level(logging.INFO, logger='vancls'):
            metrics, updates = train_one_epoch(loop, epoch=0)
    finally:
        logger.propagate = propagate
    timed = steps if steps <= WARMUP_STEPS else steps - WARMUP_STEPS
    assert updates == steps and metrics['timed_images'] == 4 * timed and metrics['img_per_sec'] > 0
    # one LogRecord may reach caplog through two handlers (the named logger's and the root's): count records once
    whole = list({id(r): r.getMessage() for r in caplog.records if 'warm-up included' in r.getMessage()}.values())
    assert whole == ([f'Train: epoch 0 ran {steps} steps, not more than the {WARMUP_STEPS} warm-up steps that '
                      f'throughput skips: its FPS is over all of them (warm-up included)'] if timed == steps else [])
