#!/usr/bin/env python3
"""Export a trained VAN: ONNX or TorchScript of the fused model, or its weights as safetensors with metadata.
Every export is checked against the PyTorch model before it is put in place; a failed check exits non-zero
and leaves no output file.

    python export.py --checkpoint output/EXP/model_best.pth.tar --format onnx --output van.onnx [--opset 17]
    python export.py --checkpoint ... --format torchscript --output van.pt
    python export.py --checkpoint ... --format safetensors --output van.safetensors
    python export.py --checkpoint ... --format timm --output van_digits/ [--push-to-hub USER/REPO]

onnx:         BatchNorm and layer scales folded into the convolutions (VAN.fuse()), a dynamic batch axis
              (input `input` N x 3 x H x W, output `logits` N x classes), class names in the model's metadata;
              checked in onnxruntime at batch 1 and 5: max |logit diff| vs the unfused PyTorch model in fp32
              must be <= --tolerance (1e-4).
torchscript:  torch.jit.trace of the fused model, checked the same way after loading it back.
safetensors:  the (unfused) weights under the official key names, plus metadata: model name, num_classes,
              class names, training data options. It loads back with
              timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=PATH, num_classes=N))
              (after `import models`), which the export checks (identical logits).
timm:         a folder as timm shares models (timm.models.save_for_hf): config.json (architecture, num_classes,
              label_names = the class names, and the input size, interpolation, mean/std and crop_pct used) and
              model.safetensors. After `import models`, timm.create_model('local-dir:DIR', pretrained=True) rebuilds
              the model with its class names (model.pretrained_cfg['label_names']), which the export checks
              (identical logits, names and input config); predict.py --model local-dir:DIR classifies with it.
              --push-to-hub USER/REPO then uploads the folder with huggingface_hub (needs the network and a token,
              checked before any work: offline, it stops with one line). Shared, it loads with
              timm.create_model('hf-hub:USER/REPO', pretrained=True).
"""
import json
import os
import re
import shutil
import socket
import sys
import warnings
from urllib.parse import urlparse

import torch

from vancls.builders import load_trained_model
from vancls.config import UsageError, add_options, new_parser, run_cli
from vancls.errors import ExportCheckError, HubError

FORMATS = ('onnx', 'safetensors', 'timm', 'torchscript')


def get_args_parser():
    p = new_parser('VAN export')
    add_options(p, 'model', 'checkpoint', 'input')
    p.add_argument('--format', required=True, choices=FORMATS)
    p.add_argument('--output', required=True, metavar='FILE_OR_DIR', help='a file; a folder for --format timm')
    p.add_argument('--push-to-hub', default='', metavar='REPO',
                   help='--format timm: upload the folder to this Hugging Face Hub repo (USER/NAME)')
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
                               pretrained_cfg_overlay=dict(file=path, num_classes=meta['num_classes'])).eval()
    with torch.no_grad():
        diff = _max_diff(loaded(x), expected)
    print(f'safetensors check (timm.create_model(pretrained=True) from the file): max |logit diff| = {diff:.2e}')
    if diff != 0:
        raise ExportCheckError(f'safetensors check: the weights loaded back differ (max |logit diff| {diff:.2e}); '
                               f'nothing was written')


def timm_data_config(data_config: dict) -> dict:
    """The preprocessing keys timm's config.json records (pretrained_cfg), from our resolved data config."""
    keys = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in data_config.items() if k in keys}


def export_timm(model, folder: str, meta: dict, data_config: dict):
    """timm's own writer: config.json (label_names and the preprocessing) and model.safetensors."""
    import timm
    try:
        from timm.models import parse_model_name, save_for_hf
        parse_model_name('local-dir:x')  # timm versions without local-dir: raise here
    except (ImportError, ValueError):
        raise UsageError(f'--format timm needs a timm that loads folders (local-dir:, timm >= 1.0); this is timm '
                         f'{timm.__version__}') from None
    save_for_hf(model, folder, model_config={'label_names': list(meta['class_names'])}, safe_serialization=True,
                data_config=timm_data_config(data_config))


def check_timm(folder: str, meta: dict, data_config: dict, x: torch.Tensor, expected: torch.Tensor):
    """Load the folder back as a timm user does; logits, class names and preprocessing must be the model's."""
    import timm
    import models  # noqa: F401 - registers VAN with timm
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    with torch.no_grad():
        diff = _max_diff(loaded(x), expected)
    cfg = loaded.pretrained_cfg
    print(f"timm folder check (timm.create_model('local-dir:...', pretrained=True)): max |logit diff| = {diff:.2e}")
    if diff != 0:
        raise ExportCheckError(f'timm folder check: the weights loaded back differ (max |logit diff| {diff:.2e}); '
                               f'nothing was written')
    wanted = timm_data_config(data_config)
    got = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in cfg.items() if k in wanted}
    if list(cfg.get('label_names') or []) != list(meta['class_names']) or got != wanted:
        raise ExportCheckError(f'timm folder check: config.json does not give back the class names and input config '
                               f'(got {cfg.get("label_names")}, {got}); nothing was written')


def check_hub_access(repo: str, timeout: float = 5.):
    """Before any work: --push-to-hub needs huggingface_hub, the network and a token. Raises HubError (one line)."""
    if not re.fullmatch(r'[\w.-]+(/[\w.-]+)?', repo):
        raise UsageError(f'--push-to-hub {repo!r}: expected a Hub repo id, USER/NAME')
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise HubError('--push-to-hub needs huggingface_hub: pip install huggingface_hub') from None
    if constants.HF_HUB_OFFLINE:
        raise HubError('--push-to-hub: HF_HUB_OFFLINE is set, the Hub cannot be reached (export without '
                       '--push-to-hub, then upload the folder where the network allows)')
    host = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((host.hostname, host.port or (443 if host.scheme == 'https' else 80)),
                                 timeout=timeout).close()
    except OSError as e:
        raise HubError(f'--push-to-hub: cannot reach {constants.ENDPOINT} ({type(e).__name__}: {e}); export without '
                       f'--push-to-hub, then upload the folder where the network allows') from None
    if not huggingface_hub.get_token():
        raise HubError('--push-to-hub: no Hugging Face token (run `hf auth login` or set HF_TOKEN)')


def push_to_hub(folder: str, repo: str) -> str:
    """Upload the checked folder (config.json, model.safetensors) to `repo`; returns the commit's address."""
    from huggingface_hub import HfApi
    api = HfApi(library_name='timm')
    try:
        repo_id = api.create_repo(repo, exist_ok=True).repo_id
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message='Add model (VAN, export.py)')
    except Exception as e:  # noqa: BLE001 - HTTP, auth and network errors of huggingface_hub
        raise HubError(f'--push-to-hub {repo}: upload failed ({type(e).__name__}: {str(e).splitlines()[0][:300]}); '
                       f'the folder {folder} is complete, upload it again later') from None
    return getattr(info, 'commit_url', repo_id)


def _umask_modes(path: str):
    """Give `path` (a file, or a folder and its files) the modes a plain open() would: safetensors' writer
    creates its files 0600 (a private temporary file renamed), unlike every other output of this project."""
    umask = os.umask(0)
    os.umask(umask)
    paths = [path] + ([os.path.join(path, f) for f in os.listdir(path)] if os.path.isdir(path) else [])
    for p in paths:
        os.chmod(p, (0o777 if os.path.isdir(p) else 0o666) & ~umask)


def _put_folder_in_place(tmp: str, dest: str):
    """Replace `dest` (absent, empty, or a previous timm export) by the checked folder `tmp`."""
    old = None
    if os.path.exists(dest):
        old = f'{tmp}.old'
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def main(args):
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise UsageError(f'--output {args.output}: folder {out_dir} does not exist')
    if args.format == 'safetensors' and not args.output.endswith('.safetensors'):
        raise UsageError('--output of --format safetensors must end in .safetensors (loaders go by the suffix)')
    if args.format == 'timm' and os.path.exists(args.output) and not (
            os.path.isdir(args.output) and (not os.listdir(args.output)
                                            or os.path.isfile(os.path.join(args.output, 'config.json')))):
        raise UsageError(f'--output {args.output}: exists and is not an empty folder or a previous --format timm '
                         f'export (config.json); choose a new folder')
    if args.push_to_hub:
        if args.format != 'timm':
            raise UsageError('--push-to-hub uploads a --format timm folder: add --format timm')
        try:
            check_hub_access(args.push_to_hub)
        except HubError as e:
            print(f'error: {e}', file=sys.stderr)
            return 1
    model, meta, data_config = load_trained_model(args)
    for note in meta['notes']:
        print(note, file=sys.stderr)
    model.set_fast_path('none')  # the reference's ops: the check's ground truth
    meta.update(input=list(data_config['input_size']), mean=data_config['mean'], std=data_config['std'])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, *data_config['input_size'], generator=g)
    with torch.no_grad():
        expected = model(x)

    base, ext = os.path.splitext(os.path.basename(os.path.abspath(args.output)))
    tmp = os.path.join(out_dir, f'.{base}.tmp{os.getpid()}{ext}')  # same suffix: loaders go by it
    try:
        if args.format == 'timm':
            export_timm(model, tmp, meta, data_config)
            check_timm(tmp, meta, data_config, x, expected)
            _umask_modes(tmp)
            _put_folder_in_place(tmp, args.output)
        elif args.format == 'safetensors':
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
        if args.format != 'timm':
            _umask_modes(tmp)
            os.replace(tmp, args.output)
    except ExportCheckError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
    h, w = data_config['input_size'][1:]
    size = (sum(os.path.getsize(os.path.join(args.output, f)) for f in os.listdir(args.output))
            if os.path.isdir(args.output) else os.path.getsize(args.output))
    print(f'wrote {args.output} ({args.format}, {meta["model"]}, {meta["num_classes"]} classes, '
          f'input N x {data_config["input_size"][0]} x {h} x {w}, {size / 2 ** 20:.1f} MiB)')
    if args.push_to_hub:
        try:
            print(f'pushed to the Hub: {push_to_hub(args.output, args.push_to_hub)}')
        except HubError as e:
            print(f'error: {e}', file=sys.stderr)
            return 1
    return 0


if __name__ == '__main__':
    sys.exit(run_cli(main, get_args_parser))
