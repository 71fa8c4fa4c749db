"""`torch.load(path, map_location='cpu', weights_only=True)` with extra allowed globals, for torch < 2.4.

torch 2.4 added a user allowlist to its weights-only unpickler (`torch.serialization.safe_globals`); before, a file
holding an `argparse.Namespace` (the reference's checkpoints: timm's saver stores the training arguments so) loads
only with full unpickling, which can run code. This module is the stand-in for those torch releases (torch 2.1 is
what Ascend's torch_npu images run). Only the standard library and torch are imported here: the model package
reads weight files without the application package.

A restricted interpreter of the pickle opcodes (the standard library's pure-Python unpickler, with its dispatch
table cut down to data opcodes and checked versions of the risky ones) refuses what torch's own weights-only
unpickler refuses, with nothing executed or changed before the refusal:

- GLOBAL resolves only torch's allowed globals and `extra_globals` (nothing is imported); STACK_GLOBAL, INST, OBJ,
  NEWOBJ_EX, EXT1/2/4 and PERSID (text) are refused outright;
- REDUCE calls, and NEWOBJ instantiates, only allowed callables / classes;
- BUILD only fills tensors, Parameters, OrderedDicts and instances of allowed classes, never a class, function or
  other shared object: setting attributes there would change them for the whole process. Its state must be a dict
  of plain attribute names (no slot state, no dunder names such as `__setstate__` or `__class__`), and a
  `__setstate__` is looked up on the class, never on the instance (which a crafted state could have set);
- APPEND(S) only target lists, SETITEM(S) only dicts, ADDITEMS only sets;
- a persistent id (BINPERSID) must be a storage reference of torch's own shape before torch's loader sees it.

Refusals raise pickle.UnpicklingError starting with 'Weights only load failed', as torch's do.
"""
import _compat_pickle
import pickle
import re
from collections import Counter, OrderedDict
from typing import Any, Dict, Iterable

import torch

_REFUSED = 'Weights only load failed'
_STORAGE_KEY = re.compile(r'^[A-Za-z0-9_.]+$')  # torch names storage records by number; never a path


def _refuse(what: str):
    raise pickle.UnpicklingError(f'{_REFUSED}: {what}')


def _allowed_globals(extra_globals: Iterable[Any]) -> Dict[str, Any]:
    """'module.qualname' -> object: torch's weights-only allowlist of this torch, plus `extra_globals`."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
    except ImportError:  # pragma: no cover - every torch since 1.13 has it
        raise ImportError(f'torch {torch.__version__} has no torch._weights_only_unpickler._get_allowed_globals: '
                          'update models/_safe_unpickle.py for it') from None
    allowed = dict(_get_allowed_globals())
    allowed.update({f'{g.__module__}.{g.__qualname__}': g for g in extra_globals})
    return allowed


def _is_storage_type(obj: Any) -> bool:
    """A storage class, or torch's StorageType stand-in for a legacy one (what a storage reference names)."""
    if isinstance(obj, torch.serialization.StorageType):
        return True
    return isinstance(obj, type) and obj in tuple(torch._storage_classes)


class _Dispatch(dict):
    """The opcode table: a missing opcode is refused (the standard unpickler would raise KeyError)."""

    def __missing__(self, opcode):
        _refuse(f'pickle opcode {bytes([opcode])!r} is not allowed')


# Opcodes that only build plain data (numbers, strings, bytes, tuples, lists, dicts, sets) or move values between
# the stack and the memo: taken from the standard unpickler as they are.
_DATA_OPCODES = (
    'PROTO', 'FRAME', 'STOP', 'NONE', 'NEWTRUE', 'NEWFALSE', 'INT', 'BININT', 'BININT1', 'BININT2', 'LONG', 'LONG1',
    'LONG4', 'FLOAT', 'BINFLOAT', 'STRING', 'BINSTRING', 'SHORT_BINSTRING', 'BINBYTES', 'SHORT_BINBYTES',
    'BINBYTES8', 'BYTEARRAY8', 'UNICODE', 'BINUNICODE', 'SHORT_BINUNICODE', 'BINUNICODE8', 'TUPLE', 'EMPTY_TUPLE',
    'TUPLE1', 'TUPLE2', 'TUPLE3', 'EMPTY_LIST', 'LIST', 'EMPTY_DICT', 'DICT', 'EMPTY_SET', 'FROZENSET', 'MARK',
    'POP', 'POP_MARK', 'DUP', 'GET', 'BINGET', 'LONG_BINGET', 'PUT', 'BINPUT', 'LONG_BINPUT', 'MEMOIZE',
)


class AllowlistUnpickler(pickle._Unpickler):
    """The restricted unpickler (see the module docstring). `allowed` ('module.qualname' -> object) is set on a
    subclass per load (torch.load instantiates `pickle_module.Unpickler` itself)."""

    allowed: Dict[str, Any] = {}
    dispatch: Dict[int, Any] = {}  # filled below the class

    def _is_allowed(self, obj: Any) -> bool:
        return any(obj is v for v in self.allowed.values())

    def find_class(self, module, name):
        if self.proto < 3 and self.fix_imports:  # Python 2 names in protocol 2 pickles (__builtin__.set)
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = f'{module}.{name}'
        if key not in self.allowed:
            _refuse(f'GLOBAL {key} was not an allowed global')
        return self.allowed[key]

    def load_reduce(self):
        args, func = self.stack[-1], self.stack[-2]
        if not self._is_allowed(func):
            _refuse(f'REDUCE of {func!r}, which is not an allowed callable')
        if type(args) is not tuple:
            _refuse(f'REDUCE arguments must be a tuple, got {type(args).__name__}')
        self.stack[-2:] = [func(*args)]

    def load_newobj(self):
        args, cls = self.stack[-1], self.stack[-2]
        if not (isinstance(cls, type) and self._is_allowed(cls)) or type(args) is not tuple:
            _refuse(f'NEWOBJ of {cls!r}, which is not an allowed class')
        self.stack[-2:] = [torch.nn.Parameter(*args) if cls is torch.nn.Parameter else cls.__new__(cls, *args)]

    def load_build(self):
        state, inst = self.stack[-1], self.stack[-2]
        kind = type(inst)
        if kind is torch.Tensor:  # torch's legacy tensor format: BUILD (storage, offset, size, stride)
            if type(state) is not tuple or not state or not isinstance(state[0], (torch.storage.TypedStorage,
                                                                                   torch.UntypedStorage)):
                _refuse(f'BUILD of a tensor takes (storage, offset, size, stride), got {state!r:.100}')
            inst.set_(*state)
        elif kind is torch.nn.Parameter:
            inst.__setstate__(state)
        elif kind is OrderedDict or self._is_allowed(kind):  # an instance: classes and functions are not
            self._build_instance(inst, state)
        else:
            _refuse(f'BUILD of {kind.__name__} {inst!r}: only tensors, Parameters, OrderedDicts and instances of '
                    f'allowed classes are filled (never a class or function)')
        self.stack.pop()

    @staticmethod
    def _build_instance(inst: Any, state: Any):
        """Instance attributes from a dict of plain names (the pickle of an object without __slots__)."""
        setstate = getattr(type(inst), '__setstate__', None)
        if setstate is not None and setstate is not getattr(object, '__setstate__', None):
            setstate(inst, state)  # the allowed class's own method
            return
        if type(state) is not dict or not all(type(k) is str and k.isidentifier() and not k.startswith('__')
                                              for k in state):
            _refuse(f'BUILD of {type(inst).__name__} with state {type(state).__name__} '
                    f'{list(state)[:5] if isinstance(state, (dict, tuple)) else ""}: only a dict of plain '
                    f'attribute names is accepted (no slot state, no dunder names)')
        inst.__dict__.update(state)

    def load_append(self):
        self._check_target(self.stack[-2], list, 'APPEND')
        super().load_append()

    def load_appends(self):
        self._check_target(self.metastack[-1][-1], list, 'APPENDS')
        super().load_appends()

    def load_setitem(self):
        self._check_target(self.stack[-3], (dict, OrderedDict, Counter), 'SETITEM')
        super().load_setitem()

    def load_setitems(self):
        self._check_target(self.metastack[-1][-1], (dict, OrderedDict, Counter), 'SETITEMS')
        super().load_setitems()

    def load_additems(self):
        self._check_target(self.metastack[-1][-1], set, 'ADDITEMS')
        super().load_additems()

    @staticmethod
    def _check_target(obj: Any, kinds, opcode: str):
        if type(obj) not in (kinds if isinstance(kinds, tuple) else (kinds,)):
            _refuse(f'{opcode} into {type(obj).__name__}')

    def load_binpersid(self):
        self._check_storage_reference(self.stack[-1])
        super().load_binpersid()

    @staticmethod
    def _check_storage_reference(pid: Any):
        """torch's storage references: ('storage', storage type, key, location, numel[, view metadata])."""
        if type(pid) is not tuple or len(pid) not in (5, 6):
            _refuse(f'persistent id {type(pid).__name__} of length {len(pid) if type(pid) is tuple else "-"}: '
                    f'only storage references are allowed')
        typename = pid[0].decode('ascii', 'replace') if isinstance(pid[0], bytes) else pid[0]
        key, location, numel = (v.decode('ascii', 'replace') if isinstance(v, bytes) else v for v in pid[2:5])
        if typename != 'storage' or not _is_storage_type(pid[1]):
            _refuse(f'persistent id {typename!r} naming {pid[1]!r}: only storage references are allowed')
        if not (type(key) is str and _STORAGE_KEY.match(key) and type(location) is str
                and type(numel) is int and numel >= 0):
            _refuse(f'storage reference with key {key!r}, location {location!r}, size {numel!r}')
        if len(pid) == 6 and pid[5] is not None and not (
                type(pid[5]) is tuple and all(type(v) in (int, str, bytes) for v in pid[5])):
            _refuse(f'storage reference with view {pid[5]!r}')


def _opcode(name: str) -> int:
    return getattr(pickle, name)[0]


# Data opcodes as the standard unpickler does them; GLOBAL as well (it resolves through find_class); the other
# risky ones checked; every other opcode refused (_Dispatch).
AllowlistUnpickler.dispatch = _Dispatch(
    {_opcode(name): pickle._Unpickler.dispatch[_opcode(name)] for name in (*_DATA_OPCODES, 'GLOBAL')})
AllowlistUnpickler.dispatch.update({
    _opcode(name.upper()): getattr(AllowlistUnpickler, f'load_{name}')
    for name in ('reduce', 'newobj', 'build', 'append', 'appends', 'setitem', 'setitems', 'additems', 'binpersid')})


def torch_load_allowlisted(path: str, extra_globals: Iterable[Any] = ()) -> Any:
    """torch.load(path, map_location='cpu', weights_only=True), allowing `extra_globals` (classes or functions)
    besides torch's own allowlist; what it refuses raises pickle.UnpicklingError('Weights only load failed: ...')."""
    unpickler = type('AllowlistUnpickler', (AllowlistUnpickler,), {'allowed': _allowed_globals(extra_globals)})

    class _PickleModule:  # stands in for the `pickle` module in torch.load(pickle_module=...)
        __name__ = 'pickle'
        Unpickler = unpickler
        UnpicklingError = pickle.UnpicklingError

        @staticmethod
        def load(file, **kwargs):  # torch's legacy (pre-1.6, non-zip) format reads its header with it
            return unpickler(file, **kwargs).load()

    return torch.load(path, map_location='cpu', weights_only=False, pickle_module=_PickleModule)
