"""The scripts' shared CLI layer (cli/common.py) over a library that raises plain exceptions: no script imports
another script, the library never raises click's errors, one JSON sanitiser, and export.py as a top-level script."""

from __future__ import annotations

import ast
import json
import math
import pickle

import click
from click.testing import CliRunner
import numpy as np
import pytest

import dnnlib
from cli import common as cli
from evaluation import features

from tests.conftest import REPO_ROOT, run_python
from tests._train_data import make_dataset_zip, tiny_train_args
from tests._cli_inputs import assert_one_error, invoke, tree

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

# ----------------------------------------------------------------------------
# The whole suite, and the same promise outside CliRunner.




@pytest.mark.parametrize('script, args', [
    ('dataset_tool.py', ['--source={truncated_zip}', '--dest={tmp}/o.zip']),
    ('generate.py', ['--network={empty}', '--outdir={tmp}/out', '--seeds=0']),
    ('fid.py', ['calc', '--images={dataset}', '--ref={ref_nan}', '--num=8']),
])
def test_real_processes_print_one_line_and_no_traceback(script, args, inputs, tmp_path):
    formatted = [a.format(tmp=tmp_path, **inputs) for a in args]
    proc = run_python([script, *formatted], check=False, env=dict(OMP_NUM_THREADS='1'))
    assert proc.returncode != 0
    assert 'Traceback' not in proc.stderr + proc.stdout
    assert len([line for line in proc.stderr.splitlines() if line.startswith('Error:')]) == 1, proc.stderr
    assert tree(tmp_path / 'o.zip') == {} and tree(tmp_path / 'out') == {}


# ----------------------------------------------------------------------------
# The PFGM++ fork's command lines: accepted with the same meaning, or one line giving our equivalent command.

FORK_REFUSALS = [
    ('generate', ['--outdir={out}', '--seeds=0-3', '--pfgmpp=1', '--aug_dim=64'],
     ['--network is required', 'training-state-000100.pt', 'ckpt_000100', '--seeds=0-3']),
    ('generate', ['--network={net}', '--outdir={out}', '--ckpt', '80000'], ['--ckpt', 'once per checkpoint']),
    ('generate', ['--network={net}', '--outdir={out}', '--end_ckpt', '81000'], ['--end_ckpt', '--network=']),
    ('generate', ['--network={net}', '--outdir={out}', '--save_images'], ['--save_images', '--grid=']),
    ('generate', ['--network={net}', '--outdir={out}', '--edm=1'], ['--edm', 'drop it']),
    ('fid', ['calc', '--images={out}', '--ref=r.npz', '--num', '50000', '--ckpt', '80000', '--end_ckpt', '81000'],
     ['--ckpt/--end_ckpt', '--images=DIR/ckpt_NNNNNN']),
    ('fid', ['calc', '--images={out}', '--ref=r.npz', '--gen_seed', '2'], ['--gen_seed', 'ckpt_2_']),
    ('fid', ['calc', '--images={out}', '--ref=r.npz', '--quant=1'], ['--quant', 'sweep folder']),
    ('train', ['--outdir={out}', '--data=d.zip', '--pfgmpp=1', '--align=1'], ['--align', 'r = sigma*sqrt(D)']),
    ('train', ['--outdir={out}', '--data=d.zip', '--align_precond=1'], ['--align_precond', 'drop the flag']),
]


@pytest.mark.parametrize('script,args,fragments', FORK_REFUSALS,
                         ids=[f'{s}-{a[-1] if s != "generate" or i else "no-network"}'
                              for i, (s, a, _f) in enumerate(FORK_REFUSALS)])
def test_fork_flags_are_refused_with_the_equivalent_command(script, args, fragments, inputs, tmp_path):
    import fid
    import generate
    import train
    out = tmp_path / 'exp'
    out.mkdir()
    (out / 'training-state-000100.pt').write_bytes(b'')  # the fork's generate.py looked for these
    command = dict(generate=generate.main, fid=fid.main, train=train.main)[script]
    result = invoke(command, [a.format(out=out, net=inputs['uncond']) for a in args])
    assert_one_error(result, *fragments)
    assert sorted(p.name for p in out.iterdir()) == ['training-state-000100.pt']  # nothing written


def test_fork_flags_with_the_same_meaning_are_accepted(inputs, tmp_path):
    import generate
    import train
    ours = invoke(generate.main, ['--network', inputs['uncond'], '--outdir', tmp_path / 'a', '--seeds=0', '--steps=2',
                                  '--device=cpu'])
    fork = invoke(generate.main, ['--network', inputs['uncond'], '--outdir', tmp_path / 'b', '--seeds=0', '--steps=2',
                                  '--device=cpu', '--use_pickle=1'])
    assert ours.exit_code == fork.exit_code == 0, fork.output
    assert (tmp_path / 'a' / '000000.png').read_bytes() == (tmp_path / 'b' / '000000.png').read_bytes()
    # --pfgmv2 is the fork's early name of --pfgmpp; --align=0 and --align_precond=0 are the released behaviour.
    data = make_dataset_zip(tmp_path / 'd.zip', count=4)
    result = invoke(train.main, [*tiny_train_args(data, tmp_path / 'runs', pfgmpp=None), '--pfgmv2=1', '--align=0',
                                 '--align_precond=0', '--dry-run'])
    assert result.exit_code == 0, result.output
    assert '"D": 128' in result.output


def test_fork_defaults_that_differ_are_named_in_help():
    import generate
    import train
    generate_help = CliRunner().invoke(generate.main, ['--help']).output
    train_help = CliRunner().invoke(train.main, ['--help']).output
    for flag in ('--S_max', '--S_noise'):
        line = generate_help[generate_help.index(flag):].split('\n  --')[0]
        assert "EDM's default holds" in ' '.join(line.split()) and 'fork' in line
    line = train_help[train_help.index('--dump'):].split('\n  --')[0]
    assert "EDM's default holds" in ' '.join(line.split()) and '50' in line and '500' in line


def test_float_range_refuses_nan_and_infinity_and_keeps_click_bounds():
    import click
    from click.testing import CliRunner

    @click.command()
    @click.option('--x', type=cli.float_range(min=0))
    def show(x):
        click.echo(repr(x))
    run = lambda value: CliRunner().invoke(show, [f'--x={value}'])  # noqa: E731
    assert run('nan').exit_code == 2 and "'nan' is not a number" in run('nan').output
    assert run('-1').exit_code == 2 and '>=0' in run('-1').output.replace(' ', '')
    assert run('inf').exit_code == 2 and "'inf' is not a finite number" in run('inf').output
    assert run('0.5').output.strip() == '0.5'

    @click.command()
    @click.option('--s-max', type=cli.float_range(min=0, allow_inf=True))
    def show_inf(s_max):
        click.echo(repr(s_max))
    assert CliRunner().invoke(show_inf, ['--s-max=inf']).output.strip() == 'inf'  # EDM's S_max default
