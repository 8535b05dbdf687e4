"""torch_utils.persistence: original pickles load, ours use the same layout, hooks and errors work."""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import sys
import textwrap

import pytest
import torch

import dnnlib
from tests.conftest import REPO_ROOT, run_python
from torch_utils import persistence

NETWORK_TOLERANCE = 2e-5  # MANIFEST recommended_tolerances.networks


def _run_worker(kind: str, path, expected, tmp_path) -> dict:
    out = tmp_path / 'result.json'
    # Run from an empty directory so nothing but PYTHONPATH=REPO_ROOT can satisfy imports.
    run_python([str(REPO_ROOT / 'tests' / '_load_snapshot_worker.py'), kind, str(path), str(expected), str(out)],
               cwd=tmp_path)
    return json.loads(out.read_text())


def test_golden_network_snapshot_loads_in_fresh_process(golden_dir, tmp_path):
    snap = golden_dir / 'snapshots'
    expected = torch.load(snap / 'network-snapshot-000000.expected.pt', weights_only=True)
    result = _run_worker('pkl', snap / 'network-snapshot-000000.pkl', snap / 'network-snapshot-000000.expected.pt', tmp_path)
    assert result['keys'] == sorted(expected['pickle_keys'])
    assert result['ema_class'] == expected['ema_class']
    assert result['ema_init_kwargs'] == expected['ema_init_kwargs']
    assert result['loss_fn_class'] == expected['loss_fn_class']
    assert result['loss_fn_attrs'] == expected['loss_fn_attrs']
    assert result['dataset_kwargs'] == expected['dataset_kwargs']
    assert result['err_output'] <= NETWORK_TOLERANCE
    assert result['err_output_aug'] <= NETWORK_TOLERANCE
    # The classes came from the embedded source, not from any module on disk.
    assert not any(m.startswith('training') for m in result['modules'])


def test_golden_pfgmpp_training_state_loads_in_fresh_process(golden_dir, tmp_path):
    snap = golden_dir / 'snapshots'
    expected = torch.load(snap / 'training-state-000000.expected.pt', weights_only=True)
    result = _run_worker('pt', snap / 'training-state-000000.pt', snap / 'training-state-000000.expected.pt', tmp_path)
    assert result['keys'] == sorted(expected['top_level_keys'])
    assert result['step'] == expected['step']
    assert (result['D'], result['N'], result['pfgmpp']) == (expected['ema_D'], expected['ema_N'], expected['ema_pfgmpp'])
    assert result['exact_ema'] and result['exact_net'] and result['same_ema_keys']
    assert result['err_ema'] <= NETWORK_TOLERANCE
    assert result['err_net'] <= NETWORK_TOLERANCE
    assert result['optimizer_steps'] == [2]


# ----------------------------------------------------------------------------
# Objects defined here are pickled through persistence; the module source travels with them.

_SAMPLE_SOURCE = textwrap.dedent('''
    import torch
    from torch_utils import persistence

    @persistence.persistent_class
    class Scaler(torch.nn.Module):
        def __init__(self, width, factor=2.0, tags=()):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.full([width], factor))
            self.tags = list(tags)

        def forward(self, x):
            return x * self.weight
''')


def _make_module(source: str):
    return persistence._src_to_module(source)


def _reduce_calls(data: bytes) -> list[str]:
    """Global names that the pickle references (what the unpickler will import)."""
    names, last_strings = [], []
    for op, arg, _pos in pickletools.genops(data):
        if op.name in ('SHORT_BINUNICODE', 'BINUNICODE', 'UNICODE'):
            last_strings = (last_strings + [arg])[-2:]
        elif op.name == 'STACK_GLOBAL':
            names.append('.'.join(last_strings))
        elif op.name == 'GLOBAL':
            names.append(arg.replace(' ', '.'))
    return names


def test_written_pickle_matches_original_layout_and_round_trips():
    module = _make_module(_SAMPLE_SOURCE)
    obj = module.Scaler(3, factor=1.5, tags=['a'])
    assert obj.init_args == (3,)
    assert obj.init_kwargs == {'factor': 1.5, 'tags': ['a']} and isinstance(obj.init_kwargs, dnnlib.EasyDict)
    assert persistence.is_persistent(obj) and persistence.is_persistent(type(obj))

    data = pickle.dumps(obj)
    assert 'torch_utils.persistence._reconstruct_persistent_obj' in _reduce_calls(data)

    captured = {}
    original = persistence._reconstruct_persistent_obj

    class Spy(pickle.Unpickler):
        def find_class(self, module_name, name):
            if (module_name, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
                def record(meta):
                    captured.update(meta)
                    return original(meta)
                return record
            return super().find_class(module_name, name)

    clone = Spy(io.BytesIO(data)).load()
    assert set(captured) == {'type', 'version', 'module_src', 'class_name', 'state'}
    assert captured['type'] == 'class' and captured['version'] == 6
    assert captured['class_name'] == 'Scaler' and captured['module_src'] == _SAMPLE_SOURCE
    assert isinstance(captured['state'], dict) and '_init_kwargs' in captured['state']
    assert torch.equal(clone(torch.ones(3)), torch.full([3], 1.5))
    assert clone.init_kwargs == obj.init_kwargs
    assert clone.tags == ['a']


def test_pickle_survives_source_change(tmp_path):
    """A pickle keeps using the source it was written with, even after the class was edited."""
    module = _make_module(_SAMPLE_SOURCE)
    data = pickle.dumps(module.Scaler(2))
    edited = _SAMPLE_SOURCE.replace('return x * self.weight', 'return x + self.weight')
    _make_module(edited)
    clone = pickle.loads(data)
    assert torch.equal(clone(torch.ones(2)), torch.full([2], 2.0))


def test_golden_meta_layout_matches_ours(golden_dir):
    captured = []

    class Spy(pickle.Unpickler):
        def find_class(self, module_name, name):
            if name == '_reconstruct_persistent_obj':
                return lambda meta: captured.append(meta) or None
            return super().find_class(module_name, name)

    with open(golden_dir / 'snapshots' / 'network-snapshot-000000.pkl', 'rb') as f:
        Spy(f).load()
    assert captured
    for meta in captured:
        assert set(meta) == {'type', 'version', 'module_src', 'class_name', 'state'}
        assert meta['version'] == persistence._version and meta['type'] == 'class'


def test_import_hook_can_patch_embedded_source():
    module = _make_module(_SAMPLE_SOURCE.replace('tags=()', 'tags=(), hooked=False'))
    data = pickle.dumps(module.Scaler(2))

    def patch(meta):
        if meta.class_name == 'Scaler':
            meta.module_src = meta.module_src.replace('return x * self.weight', 'return x - self.weight')
        return meta

    persistence.import_hook(patch)
    try:
        clone = pickle.loads(data)
    finally:
        persistence._import_hooks.remove(patch)
    assert torch.equal(clone(torch.ones(2)), torch.full([2], -1.0))


class _BrokenRecord:
    """Pickles as a persistent object whose embedded source cannot be imported."""

    def __reduce__(self):
        meta = dict(type='class', version=6, class_name='Scaler', state={},
                    module_src=_SAMPLE_SOURCE + '\nimport module_that_does_not_exist_anywhere\n')
        return persistence._reconstruct_persistent_obj, (meta,)


def test_embedded_source_that_fails_to_import_is_reported():
    data = pickle.dumps(_BrokenRecord())
    with pytest.raises(pickle.UnpicklingError, match='module_that_does_not_exist_anywhere'):
        pickle.loads(data)


def test_unpickleable_constructor_arguments_fail_early():
    module = _make_module(_SAMPLE_SOURCE.replace('factor=2.0', 'factor=4.0'))
    with pytest.raises(TypeError, match='pickleable'):
        module.Scaler(1, tags=[lambda: None])
