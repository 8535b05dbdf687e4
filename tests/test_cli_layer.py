"""The scripts' shared CLI layer (cli/common.py) over a library that raises plain exceptions: no script imports
another script, the library never raises click's errors, one JSON sanitiser, and export.py as a top-level script."""

from __future__ import annotations

import ast
import json
import math
import pickle

import click
import numpy as np
import pytest

import dnnlib
from tests.conftest import REPO_ROOT, run_python
from cli import common as cli
from evaluation import features

SCRIPTS = ('dataset_tool', 'export', 'fid', 'generate', 'reconstruct_phema', 'train')
LIBRARY_PACKAGES = ('dnnlib', 'torch_utils', 'training', 'sampling', 'evaluation', 'formats', 'cli', 'integrations')


def _imported_modules(path) -> set[str]:
    """Top-level names of every module an import statement in ``path`` names (nested imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split('.')[0])
    return names


def test_no_script_is_imported_by_the_library_the_demos_or_another_script():
    sources = [REPO_ROOT / f'{name}.py' for name in SCRIPTS]
    for folder in (*LIBRARY_PACKAGES, 'demo'):
        sources += sorted((REPO_ROOT / folder).rglob('*.py'))
    offenders = {str(path.relative_to(REPO_ROOT)): sorted(_imported_modules(path) & set(SCRIPTS) - {path.stem})
                 for path in sources}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_only_the_cli_layer_of_the_library_raises_click_errors():
    for folder in LIBRARY_PACKAGES:
        if folder == 'cli':  # the command-line layer
            continue
        for path in sorted((REPO_ROOT / folder).rglob('*.py')):
            assert 'click' not in _imported_modules(path), path
            assert 'ClickException' not in path.read_text(), path


def test_feature_library_raises_plain_errors_and_fid_turns_them_into_one_line(tmp_path):
    from click.testing import CliRunner
    import fid
    images = tmp_path / 'images'
    images.mkdir()
    for i in range(2):
        (images / f'{i:06d}.png').write_bytes(_png_bytes(i))
    missing = str(tmp_path / 'missing.pkl')
    with pytest.raises(features.FeatureError, match='no such file') as plain:
        features.load_detector(missing)
    assert isinstance(plain.value, ValueError) and not isinstance(plain.value, click.ClickException)
    result = CliRunner().invoke(fid.main, ['calc', f'--images={images}', '--num-images=2', '--save-stats=x.npz',
                                           f'--detector={missing}', '--workers=0', '--device=cpu'])
    assert result.exit_code == 1 and result.stderr.splitlines() == [f'Error: {plain.value}']
    assert str(plain.value) == f'--detector {missing}: no such file'

    text = tmp_path / 'ref.npz'
    text.write_text('hello')
    with pytest.raises(features.FeatureError, match=r'holds text, not an \.npz archive') as plain:
        features.load_reference(str(text))
    result = CliRunner().invoke(fid.main, ['calc', f'--images={images}', '--num-images=2', f'--ref={text}',
                                           '--device=cpu'])
    assert result.exit_code == 1 and result.stderr.splitlines() == [f'Error: {plain.value}']


def _png_bytes(value: int) -> bytes:
    import io
    import PIL.Image
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.full((8, 8, 3), value * 50, np.uint8), 'RGB').save(buffer, format='PNG')
    return buffer.getvalue()


def test_on_main_rank_hands_on_library_errors_as_one_line():
    def fails() -> None:
        raise features.FeatureError('--ref x.npz: holds no mu')
    with pytest.raises(click.ClickException) as info:
        cli.on_main_rank(fails)
    assert info.value.format_message() == '--ref x.npz: holds no mu'
    assert cli.on_main_rank(lambda: 42) == 42
    with pytest.raises(KeyError):  # not a one-line error: a bug keeps its traceback
        cli.on_main_rank(lambda: {}['missing'])


def test_rank0_first_returns_the_result_and_passes_errors_on():
    from torch_utils import distributed as dist
    assert dist.rank0_first(lambda: 'loaded') == 'loaded'
    with pytest.raises(features.FeatureError):
        dist.rank0_first(lambda: features.load_detector('/nonexistent/detector.pkl'))


def test_json_safe_writes_strict_json():
    value = dict(a=(1, 2.5, math.inf), b={3: -math.inf, 'n': math.nan}, c=None, d=True, e='x',
                 f=np.float32(0.5), g=[{'h': (None,)}])
    safe = dnnlib.util.json_safe(value)
    assert safe == dict(a=[1, 2.5, 'inf'], b={'3': '-inf', 'n': 'nan'}, c=None, d=True, e='x', f='0.5',
                        g=[{'h': [None]}])
    assert json.loads(json.dumps(safe, allow_nan=False)) == safe
    assert list(dnnlib.util.json_safe({'b': 1, 'a': 2}, sort_keys=True)) == ['a', 'b']
    assert dnnlib.util.json_safe([object], leaf=lambda v: 'leaf') == ['leaf']
    assert dnnlib.util.json_safe(np.float64(0.25)) == 0.25  # a float subclass stays a number


def test_every_json_writer_uses_the_one_sanitiser():
    import inspect
    from training import training_loop
    from formats import manifest
    assert 'dnnlib.util.json_safe(' in inspect.getsource(training_loop)  # the training options
    assert 'def _json_safe' not in inspect.getsource(training_loop)
    assert manifest.fingerprint({'z': math.inf, 'a': (1,)}) == {'a': [1], 'z': 'inf'}
    assert list(manifest.fingerprint({'z': 1, 'a': 2})) == ['a', 'z']


def test_seed_list_and_flag_checks():
    assert cli.SeedList().convert('3,0-2,3', None, None) == [3, 0, 1, 2]
    with pytest.raises(click.BadParameter, match='out of range'):
        cli.SeedList().convert(f'{cli.SEED_LIMIT}', None, None)
    assert cli.FloatList().convert('0.5,0,0.5', None, None) == [0.5, 0.0]
    assert cli.compact_seeds([0, 1, 2, 5, 7, 8]) == '0-2,5,7-8'
    with pytest.raises(click.BadParameter, match='--sigma_min=2 must be below --sigma_max=1'):
        cli.check_noise_range(dict(sigma_min=2, sigma_max=1))
    with pytest.raises(click.UsageError, match='dpmpp3m needs at least 4 steps'):
        cli.check_solver_flags(dict(solver='dpmpp3m'), [2])
    assert cli.sampler_error(ValueError('num_steps must be >= 1; restart_steps=0')) == \
        '--steps must be >= 1; --restart-steps=0'
    assert cli.DEFAULT_STEPS == 18 and cli.network_evaluations(18, {}) == 35


def test_export_script_prints_one_line_and_the_library_loads_no_script(tmp_path):
    empty = tmp_path / 'empty.pkl'
    empty.write_bytes(b'')
    for entry in (['export.py'],):
        proc = run_python([*entry, f'--input={empty}'], check=False)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
            f'Error: --input {empty}: file is empty (0 bytes); expected {_expected_formats()}']
    # Importing the library loads no script.
    probe = run_python(['-c', 'import sys, formats.export, formats.network_io; from cli import common; '
                              'from evaluation import features, metrics, runs; '
                              'print(sorted(set(sys.modules) & {"export", "fid", "generate", "train"}))'])
    assert probe.stdout.strip() == '[]'


def _expected_formats() -> str:
    from formats import network_io
    return network_io.EXPECTED_FORMATS


def test_weights_errors_are_network_load_errors():
    from formats import export
    from formats import network_io
    assert network_io.NetworkLoadError is export.NetworkLoadError
    assert issubclass(export.WeightsFormatError, network_io.NetworkLoadError)
    with pytest.raises(network_io.NetworkLoadError, match='0 bytes'):
        export.load_weights_bytes(b'', 'x.weights.pt')
    assert pickle.loads(pickle.dumps(export.WeightsFormatError('m'))).args == ('m',)
