"""predict.py, export.py (ONNX, TorchScript, safetensors) and the fused model, on a VAN-B0 trained on digits.

One tiny training run (train.py, 3 epochs of van_b0 at 32 px on the built-in digits) is shared by the module.
"""
import json
import os
import shutil

import pytest
import torch

import timm
import models  # noqa: F401  (registers VAN with timm)
import export
import predict
import train
import validate
from vancls.checkpoint import load_model_weights, read_checkpoint
from vancls.config import parse_with_config, run_cli
from vancls.digits import CLASS_NAMES

pytestmark = pytest.mark.slow  # every test here runs training or a subprocess

torch.set_num_threads(min(2, torch.get_num_threads()))


def _cli(module, argv):
    """Run a CLI as its __main__ does (parse, main, one-line errors): returns the exit status."""
    return run_cli(module.main, module.get_args_parser, argv)


@pytest.fixture(scope='module')
def trained(module_tmp, digits_dir):
    data = digits_dir  # tests/conftest.py: the digits ImageFolder tree, written once per session
    out = str(module_tmp('train'))
    # 2 epochs of 24 steps of 32 images (a third of the digits, twice): about 74% top-1 (train.py's eval)
    argv = [data, '--model', 'van_b0', '--img-size', '32', '--epochs', '2', '--max-steps', '24', '-b', '32',
            '--lr', '2e-3', '--warmup-epochs', '0', '--smoothing', '0', '--drop-path', '0', '--aa', 'none',
            '--mixup', '0', '--cutmix', '0', '--reprob', '0', '--workers', '0', '--fast-path', 'nhwc',
            '--device', 'cpu', '--output', out, '--experiment', 'digits', '--log-interval', '1000',
            '--checkpoint-hist', '0']
    results = train.main(parse_with_config(train.get_args_parser(), argv))
    return {'data': data, 'last': os.path.join(out, 'digits', 'last.pth.tar'), 'results': results, 'out': out}


def _predict_json(capsys, argv):
    rc = _cli(predict, argv + ['--json'])
    captured = capsys.readouterr()
    return rc, json.loads(captured.out), captured.err


def _unfused(path, name='van_b0', num_classes=10):
    model = timm.create_model(name, num_classes=num_classes)
    load_model_weights(model, path)
    return model.eval()


# --------------------------------------------------------------------------------------------- predict.py

def test_checkpoint_carries_class_names(trained):
    ckpt = read_checkpoint(trained['last'])
    assert ckpt['class_names'] == list(CLASS_NAMES) and ckpt['num_classes'] == 10 and ckpt['arch'] == 'van_b0'


def test_predict_names_the_right_class_for_confident_examples(trained, capsys):
    val = os.path.join(trained['data'], 'val')
    rc, doc, err = _predict_json(capsys, [val, '--checkpoint', trained['last'], '--topk', '3', '-b', '64'])
    assert rc == 0 and doc['errors'] == [] and doc['fused'] is True
    assert doc['model'] == 'van_b0' and doc['input_size'] == [3, 32, 32]  # the training size, from the checkpoint
    preds = doc['predictions']
    assert len(preds) == 359
    truth = [os.path.basename(os.path.dirname(p['path'])) for p in preds]
    for p in preds:
        assert len(p['topk']) == 3 and p['topk'][0]['class'] == CLASS_NAMES[p['topk'][0]['index']]
        probs = [t['prob'] for t in p['topk']]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    correct = [p['topk'][0]['class'] == t for p, t in zip(preds, truth)]
    # predict.py's preprocessing and (fused) model reproduce train.py's own evaluation of this checkpoint
    assert 100 * sum(correct) / len(correct) == pytest.approx(trained['results']['final_top1'], abs=0.6)
    # confident examples (top-1 probability above all the others together) are named right
    confident = [c for p, c in zip(preds, correct) if p['topk'][0]['prob'] > 0.5]
    assert len(confident) >= 30 and sum(confident) / len(confident) >= 0.9, (len(confident), sum(confident))

    # text output: the file, then ranked "percent  class name" lines
    picks = sorted((p for p, c in zip(preds, correct) if c), key=lambda p: -p['topk'][0]['prob'])[:4]
    rc = _cli(predict, [p['path'] for p in picks] + ['--checkpoint', trained['last'], '--topk', '2'])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and len(lines) == 3 * len(picks)
    for i, p in enumerate(picks):
        assert lines[3 * i] == p['path']
        rank, percent, name = lines[3 * i + 1].split()
        assert rank == '1.' and name == os.path.basename(os.path.dirname(p['path']))
        assert float(percent[:-1]) == pytest.approx(100 * p['topk'][0]['prob'], abs=0.006)


def test_predict_reports_unreadable_files_and_skips_them(trained, tmp_path, capsys):
    good = os.path.join(trained['data'], 'val', '7', sorted(os.listdir(os.path.join(trained['data'], 'val', '7')))[0])
    folder = tmp_path / 'mixed'
    folder.mkdir()
    shutil.copy(good, folder / 'a_good.png')
    (folder / 'b_broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'not really a png' * 4)
    (folder / 'notes.txt').write_text('not an image: ignored when walking a folder')
    missing = str(tmp_path / 'nowhere.jpg')
    rc, doc, err = _predict_json(capsys, [str(folder), missing, '--checkpoint', trained['last']])
    assert rc == 0
    assert [p['path'] for p in doc['predictions']] == [str(folder / 'a_good.png')]
    assert len(doc['predictions'][0]['topk']) == 5
    assert {e['path'] for e in doc['errors']} == {str(folder / 'b_broken.png'), missing}
    assert str(folder / 'b_broken.png') in err and missing in err and 'notes.txt' not in err

    # nothing readable: the file is named and the exit status is 1
    rc = _cli(predict, [str(folder / 'b_broken.png'), '--checkpoint', trained['last']])
    err = capsys.readouterr().err
    assert rc == 1 and str(folder / 'b_broken.png') in err and 'error: none of the 1 input' in err


def test_predict_usage_errors(trained, capsys):
    assert _cli(predict, ['x.png', '--model', 'van_b0']) == 2  # neither --checkpoint nor --pretrained
    assert 'error: give --checkpoint' in capsys.readouterr().err
    assert _cli(predict, ['x.png', '--checkpoint', trained['last'], '--model', 'resnet50']) == 2
    assert 'not a VAN model' in capsys.readouterr().err


def test_validate_fuses_by_default_with_the_same_accuracy(trained, caplog):
    """validate.py fuses by default (the issue's bar: the same top-1 to 0.01 %, here the same count of 359); --no-fuse
    with --fast-path none is the reference's execution."""
    common = [trained['data'], '--checkpoint', trained['last'], '--img-size', '32', '--workers', '0',
              '--device', 'cpu', '-b', '128']
    plain = validate.main(parse_with_config(validate.get_args_parser(), common + ['--no-fuse', '--fast-path', 'none']))
    args = parse_with_config(validate.get_args_parser(), common)
    assert args.fuse is True
    for extra in ([], ['--fast-path', 'nhwc'], ['--fast-path', 'none']):  # fused: auto's, NHWC and NCHW kernels
        fused = validate.main(parse_with_config(validate.get_args_parser(), common + extra))
        assert fused['num_images'] == plain['num_images'] == 359
        assert fused['top1'] == plain['top1'] and fused['top5'] == plain['top5']
        assert fused['loss'] == pytest.approx(plain['loss'], abs=1e-4)


def test_validate_freezes_where_auto_plans_it(trained, monkeypatch, capfd):
    """Where auto predicts that compiling with frozen weights pays for itself (here: tables where it is free and
    twice as fast), validate.py compiles the fused model for --batch-size (the last, smaller batch runs eagerly) and
    says so; the accuracy is the same. --no-compile keeps it eager whatever the plan."""
    from models import fast_ops
    monkeypatch.setattr(fast_ops, '_cpu_isa', lambda: 'AVX512')
    monkeypatch.setattr(fast_ops, 'STEP_COST', {('cpu', 'AVX512', 'infer', 'float32'):
                                                {32: {'none': 0.02, 'none+freeze': 0.01}}})
    monkeypatch.setattr(fast_ops, 'FREEZE_COMPILE_COST', {('cpu', 'AVX512'): (0.0, 0.0)})
    compiled = []
    real = fast_ops.compile_inference
    monkeypatch.setattr(fast_ops, 'compile_inference', lambda *a, **kw: compiled.append(kw) or real(*a, **kw))
    common = [trained['data'], '--checkpoint', trained['last'], '--img-size', '32', '--workers', '0',
              '--device', 'cpu', '-b', '128']
    eager = validate.main(parse_with_config(validate.get_args_parser(), common + ['--no-compile']))
    assert compiled == []
    capfd.readouterr()
    frozen = validate.main(parse_with_config(validate.get_args_parser(), common))
    assert [kw['batch_size'] for kw in compiled] == [128] and compiled[0]['cache_key'][-1] == 'none'
    log = ''.join(capfd.readouterr())
    assert 'fast path auto: none' in log and 'weights frozen into one compiled graph' in log, log[-2000:]
    assert frozen['num_images'] == eager['num_images'] == 359  # 2 compiled batches of 128, the last 103 eager
    assert frozen['top1'] == eager['top1'] and frozen['loss'] == pytest.approx(eager['loss'], abs=1e-4)


# ------------------------------------------------------------------------------------------- fused model

def _randomized(name, num_classes=10, seed=0):
    """A model whose BatchNorm statistics, affine parameters and layer scales are far from their init values,
    so that folding them is really exercised."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.7, 1.3)
                m.bias.normal_(0, 0.1)
        for n, p in model.named_parameters():
            if 'layer_scale' in n:
                p.uniform_(0.05, 0.3)
    return model.eval()


@pytest.mark.parametrize('nhwc', [False, True])
def test_fused_equals_unfused(trained, nhwc):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for model in (_unfused(trained['last']), _randomized('van_b0')):
        fused = model.fuse(nhwc=nhwc)
        with torch.no_grad():
            ref, out = model(x), fused(x)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        assert ref.abs().max() > 0.1  # not a trivially small output
    with pytest.raises(RuntimeError):
        fused.train()


# --------------------------------------------------------------------------------------------- export.py

def _ort_logits(path, x):
    import onnxruntime as ort
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def _assert_onnx_matches(path, model, size, classes):
    import onnx
    proto = onnx.load(path)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == 'batch' and [d.dim_value for d in dims[1:]] == [3, size, size]
    assert not any(n.op_type == 'BatchNormalization' for n in proto.graph.node)  # folded into the convolutions
    meta = {p.key: p.value for p in proto.metadata_props}
    g = torch.Generator().manual_seed(2)
    for n in (1, 5):
        x = torch.randn(n, 3, size, size, generator=g)
        with torch.no_grad():
            ref = model(x)
        out = _ort_logits(path, x)
        assert out.shape == (n, classes)
        assert (out - ref).abs().max().item() <= 1e-4
    return meta


def test_export_onnx_van_b0(trained, tmp_path, capsys):
    out = str(tmp_path / 'van_b0.onnx')
    assert _cli(export, ['--checkpoint', trained['last'], '--format', 'onnx', '--output', out]) == 0
    printed = capsys.readouterr().out
    assert 'max |logit diff| vs PyTorch fp32' in printed and '(batch 1)' in printed and '(batch 5)' in printed
    meta = _assert_onnx_matches(out, _unfused(trained['last']), 32, 10)
    assert meta['model'] == 'van_b0' and json.loads(meta['class_names']) == list(CLASS_NAMES)
    assert [f for f in os.listdir(tmp_path) if f.startswith('.')] == []  # no temporary file left


def test_export_onnx_van_b2_small(tmp_path, capsys):
    model = _randomized('van_b2', num_classes=5, seed=3)
    ckpt = str(tmp_path / 'b2.pth.tar')
    torch.save({'state_dict': model.state_dict(), 'arch': 'van_b2', 'num_classes': 5,
                'class_names': ['a', 'b', 'c', 'd', 'e']}, ckpt)
    out = str(tmp_path / 'van_b2.onnx')
    assert _cli(export, ['--checkpoint', ckpt, '--format', 'onnx', '--output', out, '--img-size', '64']) == 0
    assert 'max |logit diff|' in capsys.readouterr().out
    meta = _assert_onnx_matches(out, model, 64, 5)
    assert json.loads(meta['class_names']) == ['a', 'b', 'c', 'd', 'e'] and meta['model'] == 'van_b2'


def test_export_fails_loudly_and_writes_nothing(trained, tmp_path, capsys):
    out = str(tmp_path / 'strict.onnx')
    rc = _cli(export, ['--checkpoint', trained['last'], '--format', 'onnx', '--output', out, '--tolerance', '0'])
    err = capsys.readouterr().err
    assert rc == 1 and 'differs from PyTorch' in err and 'nothing was written' in err
    assert os.listdir(tmp_path) == []


def test_export_torchscript(trained, tmp_path, capsys):
    out = str(tmp_path / 'van_b0.pt')
    assert _cli(export, ['--checkpoint', trained['last'], '--format', 'torchscript', '--output', out]) == 0
    assert 'TorchScript check' in capsys.readouterr().out
    loaded = torch.jit.load(out).eval()
    model = _unfused(trained['last'])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max().item() <= 1e-4


def test_export_safetensors_round_trip(trained, tmp_path, capsys):
    from safetensors import safe_open
    out = str(tmp_path / 'van_b0.safetensors')
    assert _cli(export, ['--checkpoint', trained['last'], '--format', 'safetensors', '--output', out]) == 0
    assert 'safetensors check' in capsys.readouterr().out
    with safe_open(out, framework='pt') as f:
        meta = f.metadata()
    assert meta['model'] == 'van_b0' and meta['num_classes'] == '10'
    assert json.loads(meta['class_names']) == list(CLASS_NAMES)

    # loads back through timm's pretrained path, bit-identical to the checkpoint
    # (timm keeps a file's head only when the overlay says the file has the model's number of classes)
    loaded = timm.create_model('van_b0', pretrained=True, num_classes=10,
                               pretrained_cfg_overlay=dict(file=out, num_classes=10))
    ref = read_checkpoint(trained['last'])['state_dict']
    own = loaded.state_dict()
    assert set(own) == set(ref) and all(torch.equal(own[k], ref[k]) for k in ref)
    # ...also when the number of classes comes with the overlay instead
    loaded2 = timm.create_model('van_b0', pretrained=True, pretrained_cfg_overlay=dict(file=out, num_classes=10))
    assert torch.equal(loaded2.head.weight, ref['head.weight'])

    # and predict.py reads model name, class names and input size from the file's metadata
    img = os.path.join(trained['data'], 'val', '3', sorted(os.listdir(os.path.join(trained['data'], 'val', '3')))[0])
    rc_pth, doc_pth, _ = _predict_json(capsys, [img, '--checkpoint', trained['last']])
    rc_st, doc_st, _ = _predict_json(capsys, [img, '--checkpoint', out])
    assert rc_pth == rc_st == 0 and doc_st['model'] == 'van_b0' and doc_st['input_size'] == [3, 32, 32]
    assert doc_st['predictions'] == doc_pth['predictions']


def test_export_safetensors_needs_the_suffix(trained, tmp_path, capsys):
    rc = _cli(export, ['--checkpoint', trained['last'], '--format', 'safetensors', '--output',
                       str(tmp_path / 'w.bin')])
    assert rc == 2 and '.safetensors' in capsys.readouterr().err
