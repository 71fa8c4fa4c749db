"""The shape of the code: the import graph of models/ + vancls/ (no cycle; the model package needs nothing from the
application package), and `import models` working without vancls at all."""
import ast
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('models', 'vancls')


def _modules():
    """{dotted module name: file} for every .py file of the packages (a package is its __init__.py)."""
    found = {}
    for pkg in PACKAGES:
        for name in sorted(os.listdir(os.path.join(ROOT, pkg))):
            if name.endswith('.py'):
                mod = pkg if name == '__init__.py' else f'{pkg}.{name[:-3]}'
                found[mod] = os.path.join(ROOT, pkg, name)
    return found


def _imports(module: str, path: str, known) -> set:
    """The project modules `module` imports anywhere in its file (top level, in functions, lazily: each import is a
    dependency), each as the most specific known module ('from . import faults' -> vancls.faults)."""
    package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = package.split('.')
                parts = parts[:len(parts) - (node.level - 1)]
                base = '.'.join(parts + ([base] if base else []))
            targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a submodule import of a package we index: its package
                target = target.rpartition('.')[0]
            if target and target != module:
                out.add(target)
    return out


def import_graph():
    known = _modules()
    return {mod: _imports(mod, path, known) for mod, path in known.items()}


def find_cycles(graph) -> list:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_cycle_finder_finds_a_cycle():
    """The check itself: a graph with the cycle this project had (config -> data -> preempt -> config)."""
    graph = {'vancls.config': {'vancls.data'}, 'vancls.data': {'vancls.preempt'},
             'vancls.preempt': {'vancls.config', 'vancls.errors'}, 'vancls.errors': set()}
    assert find_cycles(graph) == [['vancls.config', 'vancls.data', 'vancls.preempt']]
    assert find_cycles({'a': {'b'}, 'b': set()}) == []


def test_import_graph_sees_relative_and_lazy_imports():
    graph = import_graph()
    assert 'vancls.errors' in graph['vancls.config']  # from .errors import ... (top level)
    assert 'vancls.faults' in graph['vancls.engine']  # from . import faults
    assert 'models.fast_ops' in graph['models.van']
    assert graph['vancls.errors'] == set()  # the error classes import nothing from the project


def test_no_import_cycle_in_models_and_vancls():
    cycles = find_cycles(import_graph())
    assert not cycles, 'import cycles (every import counts, lazy ones too): ' + '; '.join(
        ' <-> '.join(c) for c in cycles)


def test_models_imports_nothing_from_vancls():
    graph = import_graph()
    offenders = {mod: sorted(t for t in targets if t.split('.')[0] == 'vancls')
                 for mod, targets in graph.items() if mod.split('.')[0] == 'models'}
    offenders = {mod: targets for mod, targets in offenders.items() if targets}
    assert not offenders, (f'models/ must not import vancls/ (the model package is usable on its own; move what it '
                           f'needs into models/ or pass it in): {offenders}')


_WITHOUT_VANCLS = textwrap.dedent('''
    import importlib.abc, sys

    class NoVancls(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == 'vancls' or name.startswith('vancls.'):
                raise ImportError(f'{name} is blocked: models/ must work without vancls/')
            return None

    sys.meta_path.insert(0, NoVancls())
    import torch, timm
    import models
    from models.van import VAN_NAMES
    torch.manual_seed(0)
    for name in VAN_NAMES:
        model = timm.create_model(name, num_classes=3, fast_path='auto').eval()
        with torch.no_grad():
            out = model(torch.randn(1, 3, 32, 32))
        assert out.shape == (1, 3) and torch.isfinite(out).all(), name
    # an official-layout file ({'state_dict': ...}, as the published .pth.tar files) loads as pretrained weights
    path = sys.argv[1]
    reference = timm.create_model('van_b0')
    torch.save({'state_dict': reference.state_dict()}, path)
    loaded = timm.create_model('van_b0', pretrained=True, pretrained_cfg_overlay=dict(file=path))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in reference.state_dict().items())
    assert not [m for m in sys.modules if m == 'vancls' or m.startswith('vancls.')]
    print('built', len(VAN_NAMES))
''')


@pytest.mark.oldtorch
@pytest.mark.slow
def test_models_work_without_vancls(tmp_path):
    """`import models` with vancls unimportable: every VAN builds (fast_path='auto' too) and runs a tiny forward, and
    an official-layout weights file loads."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, '-c', _WITHOUT_VANCLS, str(tmp_path / 'van_b0.pth.tar')],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'built 11' in res.stdout


# ------------------------------------------------------------------------------------------ one table of defaults

def _parsers():
    import export
    import predict
    import train
    import validate
    from vancls import benchmark
    return {'train.py': train.get_args_parser(), 'validate.py': validate.get_args_parser(),
            'predict.py': predict.get_args_parser(), 'export.py': export.get_args_parser(),
            'benchmark.py': benchmark.build_parser()}


def test_every_parser_takes_its_defaults_from_the_table():
    """A shared option (a dest in vancls/config.py's DEFAULTS) has that default in every CLI's parser. benchmark.py,
    which has no checkpoint to ask, uses the fallbacks (DEFAULT_MODEL, DEFAULT_IMG_SIZE) and its OWN_DEFAULTS for
    the two options that mean something else there."""
    from vancls import benchmark
    from vancls.config import DEFAULT_IMG_SIZE, DEFAULT_MODEL, DEFAULTS
    checked = set()
    for cli, parser in _parsers().items():
        expected = dict(DEFAULTS)
        if cli == 'benchmark.py':
            expected.update(model=DEFAULT_MODEL, img_size=DEFAULT_IMG_SIZE, **benchmark.OWN_DEFAULTS)
        for action in parser._actions:
            if action.dest in expected:
                assert action.default == expected[action.dest], (cli, action.dest, action.default)
                checked.add(action.dest)
    assert {'batch_size', 'seed', 'device', 'model', 'fast_path', 'epochs', 'drop_path'} <= checked


def _script_defaults():
    """[(script mode or 'all', VAR, default)] for every default that test/common.sh gives a variable: where it sets
    it (`VAR=${VAR:-default}`, `VAR=${arg_x:-${VAR:-default}}`, `local x=${VAR:-default}`) or passes it to an
    option (`--opt "${VAR:-default}"`), not in messages or reports; the mode is the case branch (perf) / full) /
    finetune) / eval)) the line is in."""
    found, mode = [], 'all'
    with open(os.path.join(ROOT, 'test', 'common.sh')) as f:
        for line in f:
            label = re.match(r'\s*(perf|full|finetune|eval)\)', line)
            if label:
                mode = label.group(1)
            pattern = r'(?:(\blocal )?\b(\w+)=|--[\w-]+ ")\$\{(?:\w+:-\$\{)?(\w+):-([^${}]*)\}'
            for local, target, var, default in re.findall(pattern, line):
                if not target or local or target == var:
                    found.append((mode, var, default))
            if re.search(r'\besac\b', line):
                mode = 'all'
    return found


# The launch scripts' variables that set a CLI option (test/common.sh van_init / van_run_train), and how to read them.
_SCRIPT_OPTIONS = {'MODEL': ('model', str), 'BATCH_SIZE': ('batch_size', int), 'LR': ('lr', float),
                   'DROP_PATH': ('drop_path', float), 'AMP': ('amp', lambda v: v == '1'), 'DEVICE': ('device', str),
                   'EPOCHS': ('epochs', int), 'MAX_STEPS': ('max_steps', int),
                   'PREEMPT_SIGNALS': ('preempt_signals', str)}


def test_launch_scripts_defaults_agree_with_the_table():
    """Every default of the launch scripts is the CLIs' (DEFAULTS), or part of the port's recipe that the scripts
    train on purpose (SCRIPT_RECIPE: van_base with --amp; a fine-tuning run's and a performance run's length)."""
    from vancls.builders import RECIPE_LR
    from vancls.config import DEFAULTS, SCRIPT_RECIPE
    effective = dict(DEFAULTS, lr=RECIPE_LR)  # --lr unset: the recipe's lr (vancls/builders.resolve_lr)
    seen = set()
    for mode, var, text in _script_defaults():
        if var not in _SCRIPT_OPTIONS:
            continue
        dest, parse = _SCRIPT_OPTIONS[var]
        recipe = dict(SCRIPT_RECIPE['all'], **SCRIPT_RECIPE.get(mode, {}))
        expected = recipe[dest] if dest in recipe else effective[dest]
        assert parse(text) == expected, (f'test/common.sh ({mode}): {var} defaults to {text!r}, the CLIs to '
                                         f'{effective[dest]!r} (vancls/config.py DEFAULTS / SCRIPT_RECIPE)')
        seen.add((mode, dest))
    assert {('all', 'model'), ('all', 'batch_size'), ('all', 'amp'), ('all', 'device'), ('full', 'epochs'),
            ('finetune', 'epochs'), ('perf', 'max_steps')} <= seen
    for mode, recipe in SCRIPT_RECIPE.items():  # every recipe entry is in the scripts
        assert {(mode, dest) for dest in recipe} <= seen, mode


# ------------------------------------------------------------------------------------------ one module of errors

def test_error_classes_live_in_one_module():
    """Every user-error class of vancls is defined in vancls/errors.py (the modules that raise them re-export the
    names), and run_cli prints each as one line with its exit status."""
    import io
    from contextlib import redirect_stderr
    from vancls import checkpoint, config, data, device, engine, errors, preempt
    for module, name in ((config, 'UsageError'), (data, 'DataError'), (device, 'DeviceError'),
                         (checkpoint, 'CheckpointError'), (engine, 'NonFiniteLossError'), (preempt, 'UsageError')):
        assert getattr(module, name) is getattr(errors, name), (module.__name__, name)
    defined = {}
    for mod, path in _modules().items():
        with open(path) as f:
            for node in ast.walk(ast.parse(f.read())):
                if isinstance(node, ast.ClassDef) and node.name.endswith('Error'):
                    defined.setdefault(node.name, []).append(mod)
    outside = {n: mods for n, mods in defined.items() if mods != ['vancls.errors'] and n in vars(errors)}
    assert not outside, f'error classes defined again outside vancls/errors.py: {outside}'
    for error, status in ((errors.UsageError('bad --flag'), 2), (errors.DataError('no images'), 2),
                          (errors.CheckpointError('bad file'), 1), (errors.DeviceError('no npu'), 1)):
        def main(args, error=error):
            raise error
        stderr = io.StringIO()
        with redirect_stderr(stderr):
            assert config.run_cli(main, lambda: config.new_parser('t'), []) == status
        assert stderr.getvalue() == f'error: {error}\n'


def test_option_reads_the_table_where_a_parser_lacks_the_option():
    import argparse
    from vancls.config import DEFAULTS, option
    assert option(argparse.Namespace(), 'opt_impl') == DEFAULTS['opt_impl'] == 'auto'
    assert option(argparse.Namespace(seed=7), 'seed') == 7
    with pytest.raises(KeyError):
        option(argparse.Namespace(), 'no_such_option')  # only options of the table have a default here


def _fixtures_that_keep_folders(source: str) -> list:
    """Names of module- or class-scoped fixtures in `source` that make folders with tmp_path_factory.mktemp: those
    outlive their module (pytest's retention policy covers tmp_path only)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef):
            continue
        scopes = [kw.value.value for dec in node.decorator_list if isinstance(dec, ast.Call)
                  for kw in dec.keywords if kw.arg == 'scope' and isinstance(kw.value, ast.Constant)]
        makes = any(isinstance(n, ast.Attribute) and n.attr == 'mktemp' and isinstance(n.value, ast.Name)
                    and n.value.id == 'tmp_path_factory' for n in ast.walk(node))
        if makes and scopes and scopes[0] in ('module', 'class', 'package'):
            found.append(node.name)
    return found


def test_module_fixtures_use_module_tmp():
    """A whole `make test` writes GBs of checkpoints; a module-scoped fixture must take its folders from conftest's
    module_tmp (removed when the module passes), or the disk CI runs on fills up again (docs/PERFORMANCE.md, Disk)."""
    bad = textwrap.dedent('''
        @pytest.fixture(scope='module')
        def run(tmp_path_factory):
            return tmp_path_factory.mktemp('run')
    ''')
    assert _fixtures_that_keep_folders(bad) == ['run']  # the check sees the pattern it forbids
    tests_dir = os.path.join(ROOT, 'tests')
    offenders = {name: found for name in sorted(os.listdir(tests_dir)) if name.endswith('.py')
                 for found in [_fixtures_that_keep_folders(open(os.path.join(tests_dir, name)).read())] if found}
    assert offenders.pop('conftest.py', None) == ['module_tmp']  # the one fixture that makes and removes them
    assert offenders == {}, f'use the module_tmp fixture (tests/conftest.py) in {offenders}'
