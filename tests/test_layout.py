"""The layout as rules: packages named by concern, no import cycles, the PFGM++ kernel a leaf, thin scripts, modules
of readable size, tests that use the library rather than scripts' private names, and old module names that keep
loading (files users already have name them)."""

from __future__ import annotations

import ast
import importlib
import pickle
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, run_python

LIBRARY_PACKAGES = ('dnnlib', 'torch_utils', 'training', 'sampling', 'evaluation', 'formats', 'cli', 'integrations')
SCRIPTS = ('dataset_tool', 'export', 'fid', 'generate', 'reconstruct_phema', 'train')
MAX_SCRIPT_LINES = 250
MAX_MODULE_LINES = 700
PINNED_LARGE = {'training/networks.py'}  # the pickled model file keeps EDM's one-file layout


def _library_modules() -> dict[str, Path]:
    modules = {}
    for package in LIBRARY_PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob('*.py')):
            parts = path.relative_to(REPO_ROOT).with_suffix('').parts
            name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
            modules[name] = path
    return modules


def _module_level_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Library modules that ``path`` imports when it is imported (statements at module level, not inside functions,
    whose imports run only when called)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f'{node.module}.{alias.name}' for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = 'open'
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 'open':
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 'done'
    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_no_import_cycles_among_library_modules():
    modules = _library_modules()
    graph = {name: _module_level_imports(path, modules) - {name} for name, path in modules.items()}
    # A package imports nothing of its own modules here except by name; a module importing its package's __init__
    # is not a cycle of code, so edges into package __init__ files without code are dropped.
    empty_inits = {name for name, path in modules.items() if path.name == '__init__.py' and not any(
        isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.parse(path.read_text()).body)}
    graph = {name: {t for t in targets if t not in empty_inits} for name, targets in graph.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c', 'a']]
    assert _cycles({'a': {'b'}, 'b': set()}) == []


def test_the_pfgmpp_kernel_is_a_leaf_that_imports_only_torch():
    tree = ast.parse((REPO_ROOT / 'training' / 'pfgmpp.py').read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split('.')[0])
    assert imported - set(sys.stdlib_module_names) - {'__future__'} == {'torch'}


@pytest.mark.parametrize('script', SCRIPTS)
def test_scripts_are_thin(script):
    lines = (REPO_ROOT / f'{script}.py').read_text().count('\n')
    assert lines <= MAX_SCRIPT_LINES, f'{script}.py has {lines} lines; its logic belongs in the library'


def test_modules_stay_readable():
    sizes = {str(path.relative_to(REPO_ROOT)): path.read_text().count('\n') for path in _library_modules().values()}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES and name not in PINNED_LARGE} == {}


def test_tests_use_the_library_not_private_names_of_scripts():
    offenders = []
    for path in sorted((REPO_ROOT / 'tests').rglob('*.py')):
        tree = ast.parse(path.read_text())
        aliases = {alias.asname or alias.name: alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for alias in node.names if alias.name in SCRIPTS}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in SCRIPTS:
                offenders += [f'{path.name}: from {node.module} import {a.name}' for a in node.names
                              if a.name.startswith('_')]
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith('_'):
                offenders.append(f'{path.name}: {node.value.id}.{node.attr}')
    assert offenders == []


def test_packages_are_named_by_concern_and_training_holds_only_what_trains():
    for package in ('training', 'sampling', 'evaluation', 'formats', 'cli', 'integrations'):
        assert (REPO_ROOT / package / '__init__.py').is_file(), package
    training = {path.stem for path in (REPO_ROOT / 'training').glob('*.py')} - {'__init__'}
    moved_out = {name.split('.')[1] for name in importlib.import_module('training').MOVED}
    assert training & moved_out == set()


def test_every_old_module_name_loads_its_new_home():
    import training
    for old, homes in training.MOVED.items():
        module = importlib.import_module(old)
        for home in homes:
            new = importlib.import_module(home)
            public = [name for name in vars(new) if not name.startswith('_')
                      and getattr(vars(new)[name], '__module__', home) == home]
            for name in public:
                assert getattr(module, name) is getattr(new, name), f'{old}.{name}'
    sampler = importlib.import_module('training.sampler')
    from sampling import edm, pipeline
    assert sampler.edm_sampler is edm.edm_sampler and sampler.generate_images is pipeline.generate_images


def test_old_names_in_pickles_and_in_a_fresh_process():
    from evaluation.digits_classifier import DigitsClassifier
    # A plain pickle that names the class by its old module, as files written before the move do.
    data = pickle.dumps(DigitsClassifier, protocol=0).replace(  # protocol 0: names are not length-prefixed
        b'evaluation.digits_classifier', b'training.digits_classifier')
    assert b'training.digits_classifier' in data and pickle.loads(data) is DigitsClassifier
    probe = run_python(['-c', 'from training import sampler, exact_denoiser; import training.features as f; '
                              'print(sampler.__name__, exact_denoiser.__name__, f.__name__)'])
    assert probe.stdout.split() == ['training.sampler', 'sampling.exact_denoiser', 'evaluation.features']


def test_unknown_old_names_still_fail_as_usual():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module('training.not_a_module')
