#!/usr/bin/env python3
"""Export a trained VAN: ONNX or TorchScript of the fused model, or its weights as safetensors with metadata.
Every export is checked against the PyTorch model before it is put in place; a failed check exits non-zero
and leaves no output file.

    python export.py --checkpoint output/EXP/model_best.pth.tar --format onnx --output van.onnx [--opset 17]
    python export.py --checkpoint ... --format torchscript --output van.pt
    python export.py --checkpoint ... --format safetensors --output van.safetensors

onnx:         BatchNorm and layer scales folded into the convolutions (VAN.fuse()), a dynamic batch axis
              (input `input` N x 3 x H x W, output `logits` N x classes), class names in the model's metadata;
              checked in onnxruntime at batch 1 and 5: max |logit diff| vs the unfused PyTorch model in fp32
              must be <= --tolerance (1e-4).
torchscript:  torch.jit.trace of the fused model, checked the same way after loading it back.
safetensors:  the (unfused) weights under the official key names, plus metadata: model name, num_classes,
              class names, training data options. It loads back with
              timm.create_model(NAME, pretrained=True, num_classes=N, pretrained_cfg_overlay=dict(file=PATH))
              (after `import models`), which the export checks (identical logits).
"""
import json
import os
import sys
import warnings

import torch

from vancls.builders import load_trained_model
from vancls.config import UsageError, add_options, new_parser, run_cli

FORMATS = ('onnx', 'safetensors', 'torchscript')


class ExportCheckError(RuntimeError):
    """The exported model does not compute what the PyTorch model computes."""


def get_args_parser():
    p = new_parser('VAN export')
    add_options(p, 'model', 'checkpoint', 'input')
    p.add_argument('--format', required=True, choices=FORMATS)
    p.add_argument('--output', required=True, metavar='FILE')
    p.add_argument('--opset', type=int, default=17, help='ONNX opset')
    p.add_argument('--tolerance', type=float, default=1e-4, help='max |logit diff| allowed by the check')
    return p


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _check(diffs: dict, tolerance: float, what: str):
    shown = ', '.join(f'{d:.2e} (batch {b})' for b, d in diffs.items())
    print(f'{what}: max |logit diff| vs PyTorch fp32 = {shown}; tolerance {tolerance:.0e}')
    if not all(d <= tolerance for d in diffs.values()):  # also fails on NaN
        raise ExportCheckError(f'{what}: the exported model differs from PyTorch by more than {tolerance:.0e} '
                               f'({shown}); nothing was written')


def export_onnx(fused, path: str, example: torch.Tensor, opset: int, meta: dict):
    import onnx
    kwargs = dict(input_names=['input'], output_names=['logits'], opset_version=opset, do_constant_folding=True,
                  dynamic_axes={'input': {0: 'batch'}, 'logits': {0: 'batch'}})
    try:
        import inspect
        if 'dynamo' in inspect.signature(torch.onnx.export).parameters:
            kwargs['dynamo'] = False  # the TorchScript-based exporter: no onnxscript needed, dynamic_axes honoured
    except (TypeError, ValueError):
        pass
    with warnings.catch_warnings():  # the TorchScript-based exporter is deprecated in torch >= 2.9: chosen on purpose
        warnings.simplefilter('ignore', DeprecationWarning)
        torch.onnx.export(fused, (example[:1],), path, **kwargs)
    proto = onnx.load(path)
    for key, value in (('model', meta['model']), ('num_classes', str(meta['num_classes'])),
                       ('class_names', json.dumps(meta['class_names'])), ('input_size', json.dumps(meta['input'])),
                       ('mean', json.dumps(list(meta['mean']))), ('std', json.dumps(list(meta['std'])))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def check_onnx(path: str, x: torch.Tensor, expected: torch.Tensor, tolerance: float):
    try:
        import onnxruntime as ort
    except ImportError:
        raise UsageError('the ONNX check needs onnxruntime: pip install onnxruntime') from None
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    diffs = {}
    for n in (1, x.shape[0]):
        out = sess.run(['logits'], {'input': x[:n].numpy()})[0]
        diffs[n] = _max_diff(torch.from_numpy(out), expected[:n])
    _check(diffs, tolerance, f'ONNX check (onnxruntime {ort.__version__}, opset in file)')


def export_torchscript(fused, path: str, example: torch.Tensor):
    with torch.no_grad(), warnings.catch_warnings():  # torch.jit is deprecated in torch >= 2.9, still supported
        warnings.simplefilter('ignore', FutureWarning)
        traced = torch.jit.trace(fused, example[:1], check_trace=False)
    traced.save(path)


def check_torchscript(path: str, x: torch.Tensor, expected: torch.Tensor, tolerance: float):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        loaded = torch.jit.load(path, map_location='cpu').eval()
    with torch.no_grad():
        diffs = {n: _max_diff(loaded(x[:n]), expected[:n]) for n in (1, x.shape[0])}
    _check(diffs, tolerance, 'TorchScript check (torch.jit.load)')


def export_safetensors(model, path: str, meta: dict):
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {'format': 'pt', 'model': meta['model'], 'num_classes': str(meta['num_classes']),
                'class_names': json.dumps(meta['class_names']),
                'data_args': json.dumps({k: v for k, v in meta['data_args'].items() if v is not None})}
    save_file(state, path, metadata=metadata)


def check_safetensors(path: str, meta: dict, x: torch.Tensor, expected: torch.Tensor):
    import timm
    import models  # noqa: F401 - registers VAN with timm
    loaded = timm.create_model(meta['model'], pretrained=True, num_classes=meta['num_classes'],
                               pretrained_cfg_overlay=dict(file=path)).eval()
    with torch.no_grad():
        diff = _max_diff(loaded(x), expected)
    print(f'safetensors check (timm.create_model(pretrained=True) from the file): max |logit diff| = {diff:.2e}')
    if diff != 0:
        raise ExportCheckError(f'safetensors check: the weights loaded back differ (max |logit diff| {diff:.2e}); '
                               f'nothing was written')


def main(args):
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise UsageError(f'--output {args.output}: folder {out_dir} does not exist')
    if args.format == 'safetensors' and not args.output.endswith('.safetensors'):
        raise UsageError('--output of --format safetensors must end in .safetensors (loaders go by the suffix)')
    model, meta, data_config = load_trained_model(args)
    model.set_fast_path('none')  # the reference's ops: the check's ground truth
    meta.update(input=list(data_config['input_size']), mean=data_config['mean'], std=data_config['std'])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, *data_config['input_size'], generator=g)
    with torch.no_grad():
        expected = model(x)

    base, ext = os.path.splitext(os.path.basename(args.output))
    tmp = os.path.join(out_dir, f'.{base}.tmp{os.getpid()}{ext}')  # same suffix: loaders go by it
    try:
        if args.format == 'safetensors':
            export_safetensors(model, tmp, meta)
            check_safetensors(tmp, meta, x, expected)
        else:
            fused = model.fuse(nhwc=False)  # plain NCHW convolutions: the most portable graph
            if args.format == 'onnx':
                export_onnx(fused, tmp, x, args.opset, meta)
                check_onnx(tmp, x, expected, args.tolerance)
            else:
                export_torchscript(fused, tmp, x)
                check_torchscript(tmp, x, expected, args.tolerance)
        os.replace(tmp, args.output)
    except ExportCheckError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    h, w = data_config['input_size'][1:]
    print(f'wrote {args.output} ({args.format}, {meta["model"]}, {meta["num_classes"]} classes, '
          f'input N x {data_config["input_size"][0]} x {h} x {w}, {os.path.getsize(args.output) / 2 ** 20:.1f} MiB)')
    return 0


if __name__ == '__main__':
    sys.exit(run_cli(main, get_args_parser))
