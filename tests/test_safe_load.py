"""The safe loader for torch < 2.4 (models/_safe_unpickle.py) refuses what torch's own weights-only unpickler
refuses, with nothing run or changed: crafted checkpoint files (torch.save archives whose data.pkl is hand-written
pickle opcodes) are each refused by torch (weights_only=True, with SAFE_GLOBALS allowlisted where torch can) and by
ours, and afterwards no marker file exists and no class or function has changed. Real checkpoints load the same
through both. Runs on every torch (also the torch-2.1 CI pass: .ci/torch21.sh)."""
import argparse
import collections
import pickle
import struct
import zipfile

import pytest
import torch

from models._helpers import SAFE_GLOBALS, WeightsFileError, read_weights_file
from models._safe_unpickle import torch_load_allowlisted

P = pickle  # opcode constants: P.GLOBAL, P.REDUCE, ...


def _global(module, name):
    return P.GLOBAL + f'{module}\n{name}\n'.encode()


def _str(text):
    data = text.encode()
    return P.BINUNICODE + struct.pack('<I', len(data)) + data


def _dict(**items):
    body = b''.join(_str(k) + v for k, v in items.items())
    return P.EMPTY_DICT + (P.MARK + body + P.SETITEMS if items else b'')


def _tuple(*items):
    return P.MARK + b''.join(items) + P.TUPLE


PROTO2 = P.PROTO + b'\x02'
INT4 = P.BININT1 + b'\x04'
TOUCH = 'touch {marker}'  # what a hostile file runs if anything of it runs
NAMESPACE, TENSOR = _global('argparse', 'Namespace'), _global('torch', 'Tensor')
REBUILD = _global('torch._utils', '_rebuild_tensor_v2')


def _crafted(marker):
    """name -> pickle program. Each one, if it ran, would leave a marker file or change a class or function."""
    touch = _str(TOUCH.format(marker=marker))
    pwn = _tuple(P.NONE, _dict(pwned=P.NEWTRUE))  # BUILD state: (no dict state, slot state {'pwned': True})
    return {
        # a global that is not allowed, reached every way pickle has
        'GLOBAL os.system + REDUCE': _global('os', 'system') + _tuple(touch) + P.REDUCE,
        'GLOBAL builtins.exec': _global('builtins', 'exec') + _tuple(_str(f'open({str(marker)!r}, "w")')) + P.REDUCE,
        'GLOBAL builtins.setattr on an allowed class': _global('builtins', 'setattr')
        + _tuple(NAMESPACE, _str('pwned'), P.NEWTRUE) + P.REDUCE,
        'GLOBAL to a method of an allowed class': _global('argparse', 'Namespace.__setattr__')
        + _tuple(NAMESPACE, _str('pwned'), P.NEWTRUE) + P.REDUCE,
        'INST os.system': P.MARK + touch + P.INST + b'os\nsystem\n',
        'STACK_GLOBAL os.system (protocol 4)': _str('os') + _str('system') + P.STACK_GLOBAL + _tuple(touch) + P.REDUCE,
        # BUILD on a class or a function changes it for the whole process
        'BUILD slot state on an allowed class (Namespace)': NAMESPACE + pwn + P.BUILD,
        'BUILD slot state on an allowed class (torch.Tensor)': TENSOR + pwn + P.BUILD,
        'BUILD dict state on an allowed class': NAMESPACE + _dict(pwned=P.NEWTRUE) + P.BUILD,
        'BUILD on an allowed function (__defaults__)': REBUILD
        + _tuple(P.NONE, _dict(__defaults__=_tuple(P.NEWTRUE))) + P.BUILD,
        # __setstate__ installed where the next BUILD would call it
        '__setstate__ set on an allowed class, then BUILD': NAMESPACE
        + _tuple(P.NONE, _dict(__setstate__=_global('collections', 'OrderedDict'))) + P.BUILD + P.POP
        + NAMESPACE + P.EMPTY_TUPLE + P.NEWOBJ + _dict(a=P.NEWTRUE) + P.BUILD,
        # BUILD with slot state on allowed types that take none
        'BUILD slot state on an OrderedDict': _global('collections', 'OrderedDict') + P.EMPTY_TUPLE + P.REDUCE
        + pwn + P.BUILD,
        'BUILD slot state on a tensor': TENSOR + P.EMPTY_TUPLE + P.REDUCE + pwn + P.BUILD,
        # containers filled through another type's methods
        'APPEND into an OrderedDict': _global('collections', 'OrderedDict') + P.EMPTY_TUPLE + P.REDUCE + P.NONE
        + P.APPEND,
        # persistent ids that are not torch's storage references
        "persistent id 'module' (legacy source code)": _tuple(_str('module'), _str('x'), _str(''), _str(''))
        + P.BINPERSID,
        'persistent id naming a non-storage class': _tuple(_str('storage'), NAMESPACE, _str('0'), _str('cpu'), INT4)
        + P.BINPERSID,
        'persistent id with a path as key': _tuple(_str('storage'), _global('torch', 'FloatStorage'),
                                                   _str('../../../etc/passwd'), _str('cpu'), INT4) + P.BINPERSID,
        'persistent id not a tuple': INT4 + P.BINPERSID,
    }


def _side_effects(marker):
    """Everything a crafted file could have changed, as found now."""
    return {'marker file': marker.exists(),
            'class attributes': [c.__name__ for c in (argparse.Namespace, torch.Tensor, collections.OrderedDict)
                                 if 'pwned' in vars(c)] + ['Namespace.__setstate__'] * hasattr(argparse.Namespace,
                                                                                               '__setstate__'),
            '_rebuild_tensor_v2 defaults': torch._utils._rebuild_tensor_v2.__defaults__}


def _archive(path, program, protocol=2):
    """A torch.save archive whose data.pkl is `program` (plus PROTO and STOP)."""
    torch.save({'w': torch.ones(4)}, path)  # the other records (version, storages) of a real file
    with zipfile.ZipFile(path) as z:
        records = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as z:
        for name, data in records.items():
            z.writestr(name, P.PROTO + bytes([protocol]) + program + P.STOP if name.endswith('/data.pkl') else data)
    return path


def _torch_own(path):
    """torch's weights-only loading: with SAFE_GLOBALS allowlisted where torch has a user allowlist (>= 2.4)."""
    if hasattr(torch.serialization, 'safe_globals'):
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location='cpu', weights_only=True)
    return torch.load(path, map_location='cpu', weights_only=True)


CASES = sorted(_crafted('M'))


@pytest.mark.parametrize('case', CASES)
def test_crafted_file_is_refused_by_torch_and_by_ours_with_no_side_effect(tmp_path, case):
    marker = tmp_path / 'marker'
    program = _crafted(marker)[case]
    path = _archive(tmp_path / 'crafted.pth', program, protocol=4 if 'protocol 4' in case else 2)
    before = _side_effects(marker)
    assert before['marker file'] is False and before['class attributes'] == []
    with pytest.raises(Exception):  # noqa: B017 - torch's refusal is UnpicklingError or RuntimeError by version
        _torch_own(path)
    assert _side_effects(marker) == before, f'torch ran part of {case}'
    with pytest.raises(pickle.UnpicklingError, match='^Weights only load failed: '):
        torch_load_allowlisted(str(path), SAFE_GLOBALS)
    assert _side_effects(marker) == before, f'ours ran part of {case}'
    # and through the reader every entry point uses: the CLIs' one-line refusal
    with pytest.raises(WeightsFileError, match='refused to load|not a readable checkpoint'):
        read_weights_file(str(path))
    assert _side_effects(marker) == before


def test_the_crafted_programs_do_what_they_claim(tmp_path):
    """Without the allowlist (plain pickle, in a child process) the programs that run code leave their marker: the
    refusals above are of working attacks, not of malformed files."""
    import subprocess
    import sys
    marker = tmp_path / 'marker'
    for case in ('GLOBAL os.system + REDUCE', 'INST os.system', 'STACK_GLOBAL os.system (protocol 4)'):
        data = P.PROTO + (b'\x04' if 'protocol 4' in case else b'\x02') + _crafted(marker)[case] + P.STOP
        subprocess.run([sys.executable, '-c', 'import pickle, sys; pickle.loads(sys.stdin.buffer.read())'],
                       input=data, check=True, timeout=60)
        assert marker.exists(), case
        marker.unlink()


def test_ours_refuses_dunder_state_that_torch_accepts(tmp_path):
    """Stricter than torch: an instance state naming __setstate__ (which the next BUILD of that instance would
    call), __class__ or __dict__ is refused; torch >= 2.4 sets it on the instance."""
    for name in ('__setstate__', '__class__', '__dict__'):
        program = NAMESPACE + P.EMPTY_TUPLE + P.NEWOBJ + _dict(**{name: _global('collections', 'OrderedDict')}) \
            + P.BUILD
        path = _archive(tmp_path / 'dunder.pth', program)
        with pytest.raises(pickle.UnpicklingError, match='no dunder names'):
            torch_load_allowlisted(str(path), SAFE_GLOBALS)


def test_real_checkpoints_load_the_same(tmp_path):
    """What this project and the reference save (tensors, views, a Parameter, OrderedDicts, the Namespace of
    args, RNG states, dtypes, sizes) loads through ours exactly as full unpickling gives it."""
    ckpt = {'state_dict': collections.OrderedDict(w=torch.randn(3, 2), b=torch.zeros(2, dtype=torch.bfloat16)),
            'args': argparse.Namespace(model='van_b0', lr=1e-3, input_size=[3, 224, 224], amp=True),
            'epoch': 3, 'param': torch.nn.Parameter(torch.ones(2)), 'size': torch.Size([2, 3]),
            'dtype': torch.float16, 'view': torch.arange(10)[2:5], 'shared': [torch.ones(1)] * 2,
            'rng': {'python': (3, tuple(range(5)), None), 'torch': torch.get_rng_state()},
            'optimizer': {'state': {0: {'step': torch.tensor(3.), 'exp_avg': torch.randn(3, 2)}},
                          'param_groups': [{'lr': 1e-3, 'betas': (0.9, 0.999), 'params': [0]}]}}
    torch.save(ckpt, tmp_path / 'real.pth.tar')
    want = torch.load(tmp_path / 'real.pth.tar', map_location='cpu', weights_only=False)
    got = torch_load_allowlisted(str(tmp_path / 'real.pth.tar'), SAFE_GLOBALS)
    _assert_same(got, want)
    assert got['shared'][0] is got['shared'][1]  # the memo: one object stays one object
    assert got['view']._base is None or got['view'].storage_offset() == 2
    with pytest.raises(pickle.UnpicklingError, match='GLOBAL argparse.Namespace was not an allowed global'):
        torch_load_allowlisted(str(tmp_path / 'real.pth.tar'))  # allowed only when asked for


def _assert_same(got, want, where='ckpt'):
    assert type(got) is type(want), where
    if isinstance(want, torch.Tensor):
        assert torch.equal(got, want) and got.dtype == want.dtype and got.stride() == want.stride(), where
        assert got.storage_offset() == want.storage_offset() and got.requires_grad == want.requires_grad, where
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for k in want:
            _assert_same(got[k], want[k], f'{where}[{k!r}]')
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f'{where}[{i}]')
    elif isinstance(want, argparse.Namespace):
        assert vars(got) == vars(want), where
    else:
        assert got == want, where
