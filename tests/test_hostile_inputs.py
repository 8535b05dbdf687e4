"""Hostile and broken input for every command line: dataset_tool, train, generate, fid and formats.export.

Every case checks three things: the command fails (click handled it, so no traceback), it prints exactly one
``Error:`` line naming the offending file or flag, and it leaves no partial output (the destination is absent
or unchanged, and no temporary files remain beside it). Path-traversal cases additionally check that nothing
was written outside the destination.

Full disks are simulated by a writer that fails with ENOSPC (``dnnlib.util.atomic_write`` for the CLIs that
write through it, the destination writer for dataset_tool) and, where this process may mount (root on Linux),
by a real 64 KiB tmpfs that is filled first.

Cases per command (one per test id): dataset_tool 19, train 13, generate 21, fid 20, export 8 -- 81 in all
(``test_case_counts`` keeps this line honest), plus three runs in real processes that check the same promise
outside CliRunner.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
from tests._sampler_nets import make_tiny_net, save_snapshot
from tests._train_data import make_dataset_zip, tiny_train_args
from tests.conftest import run_python

# ----------------------------------------------------------------------------
# Shared checks.


def invoke(cli: Any, args: list[Any]) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def assert_one_error(result: Any, *fragments: str) -> str:
    """Failed through click (no traceback), with exactly one 'Error:' line holding every fragment."""
    assert result.exit_code not in (0, None), result.output
    assert isinstance(result.exception, SystemExit), f'unhandled {type(result.exception).__name__}: ' \
                                                     f'{result.exception}\n{result.output}'
    assert 'Traceback' not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) with its content; {} when absent."""
    if path.is_file():
        return {'.': path.read_bytes()}
    if not path.is_dir():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob('*')) if p.is_file()}


@contextlib.contextmanager
def unchanged(*paths: Path) -> Iterator[None]:
    """Each path (a destination, or the folder around one) holds the same files afterwards.

    A destination that did not exist may at most appear as an empty folder (the CLIs create output folders
    while checking that they are writable).
    """
    before = {p: tree(p) for p in paths}
    yield
    for p in paths:
        assert tree(p) == before[p], f'{p} changed: {sorted(set(tree(p)) ^ set(before[p]))}'


def png_bytes(size: int = 8, seed: int = 0, channels: int = 3) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, [size, size, channels], dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format='png')
    return buffer.getvalue()


def truncated(data: bytes) -> bytes:
    return data[:len(data) // 2]


class _FullDiskFile:
    """A file object whose writes fail as they would on a full disk."""

    def __init__(self, inner: Any, path: str):
        self._inner, self._path = inner, path

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)

    def __getattr__(self, attribute: str) -> Any:  # flush, fileno, seek, ... go to the real file
        return getattr(self._inner, attribute)


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``dnnlib.util.atomic_write`` fails with ENOSPC on the first write (temporary file and all)."""
    real = dnnlib.util.atomic_write

    @contextlib.contextmanager
    def failing(path: Any, mode: str = 'wb') -> Iterator[Any]:
        with real(path, mode) as f:
            yield _FullDiskFile(f, os.fspath(path))
    monkeypatch.setattr(dnnlib.util, 'atomic_write', failing)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs that is already full (needs root and mount; skipped elsewhere)."""
    mount_point = tmp_path / 'tmpfs'
    mount_point.mkdir()
    if not sys.platform.startswith('linux') or os.geteuid() != 0:
        pytest.skip('mounting a tmpfs needs root on Linux')
    proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here: {proc.stderr.strip()}')
    try:
        fd = os.open(mount_point / 'filler', os.O_WRONLY | os.O_CREAT)
        try:
            with contextlib.suppress(OSError):
                while os.write(fd, b'\0' * 512):  # unbuffered, so the last partial block is used up too
                    pass
        finally:
            os.close(fd)
        yield mount_point
    finally:
        # A lazy unmount as the fallback: a file a failed command left open must not keep the mount alive.
        if subprocess.run(['umount', str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(['umount', '-l', str(mount_point)], capture_output=True)


def under_a_file(tmp_path: Path, *parts: str) -> Path:
    """A path whose parent is a regular file: no process can create it, root included."""
    blocker = tmp_path / 'blocker.txt'
    blocker.write_text('a file, not a folder\n')
    return blocker.joinpath(*parts)


# ----------------------------------------------------------------------------
# Inputs shared by several commands.


@pytest.fixture(scope='module')
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good and broken files, made once for the module (tests never modify them)."""
    root = tmp_path_factory.mktemp('hostile-inputs')
    files: dict[str, Path] = {}
    files['dataset'] = make_dataset_zip(root / 'dataset.zip', count=8)
    files['labelled'] = make_dataset_zip(root / 'labelled.zip', count=8, num_classes=3)
    data = files['dataset'].read_bytes()
    files['truncated_zip'] = root / 'truncated.zip'
    files['truncated_zip'].write_bytes(truncated(data))
    files['empty'] = root / 'empty.pkl'
    files['empty'].write_bytes(b'')

    # A dataset ZIP whose first image is cut short (the archive itself is intact).
    files['truncated_png_zip'] = root / 'truncated-png.zip'
    with zipfile.ZipFile(files['dataset']) as good, zipfile.ZipFile(files['truncated_png_zip'], 'w') as bad:
        for name in good.namelist():
            content = good.read(name)
            bad.writestr(name, truncated(content) if name.endswith('img00000000.png') else content)

    net = make_tiny_net(seed=3)
    files['uncond'] = save_snapshot(net, root / 'network-snapshot-000000.pkl')
    files['cond'] = save_snapshot(make_tiny_net(label_dim=3, seed=4), root / 'cond.pkl')
    files['truncated_pkl'] = root / 'truncated.pkl'
    files['truncated_pkl'].write_bytes(truncated(files['uncond'].read_bytes()))
    files['no_ema_pkl'] = root / 'no-ema.pkl'
    files['no_ema_pkl'].write_bytes(pickle.dumps(dict(G_ema=None, loss_fn=None)))
    files['optimizer_pt'] = root / 'optimizer.pt'
    torch.save(dict(optimizer_state={}, step=0), files['optimizer_pt'])

    from formats import export
    record = export.network_record(net)
    files['weights'] = root / 'good.weights.pt'
    torch.save(record, files['weights'])
    files['weights_foreign_class'] = root / 'foreign.weights.pt'
    torch.save(dict(record, class_name='builtins.eval'), files['weights_foreign_class'])
    files['weights_bad_shape'] = root / 'shape.weights.pt'
    state = dict(record['state_dict'])
    state['model.map_layer0.weight'] = torch.zeros(2, 2)
    torch.save(dict(record, state_dict=state), files['weights_bad_shape'])

    # Reference statistics: a valid small one and broken ones (load_ref_stats checks them before any image).
    def npz(name: str, **arrays: Any) -> Path:
        np.savez(root / name, **arrays)
        return root / name
    files['ref_nan'] = npz('ref-nan.npz', mu=np.array([0.0, np.nan, 1.0]), sigma=np.eye(3))
    files['ref_shape'] = npz('ref-shape.npz', mu=np.zeros(4), sigma=np.eye(5))
    files['ref_keys'] = npz('ref-keys.npz', mean=np.zeros(3), cov=np.eye(3))
    files['ref_truncated'] = root / 'ref-truncated.npz'
    files['ref_truncated'].write_bytes(truncated(npz('ref-ok.npz', mu=np.zeros(64), sigma=np.eye(64)).read_bytes()))
    return files


@pytest.fixture(scope='module')
def detector(golden_dir: Path) -> Path:
    return golden_dir / 'fid' / 'detector-standin.pkl'


# ----------------------------------------------------------------------------
# dataset_tool.py


def run_dataset_tool(*args: Any) -> Any:
    import dataset_tool
    return invoke(dataset_tool.main, list(args))


def zip_with(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, 'w') as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


BAD_LABEL_FILES = {
    'labels-not-a-list': b'{"labels": 5}',
    'entry-not-a-pair': b'{"labels": [["img0.png", 1, 2]]}',
    'top-level-list': b'[["img0.png", 1]]',
    'not-json': b'{"labels": [["img0.png", 1]',
    'missing-labels-key': b'{"classes": []}',
}


@pytest.mark.parametrize('case', list(BAD_LABEL_FILES))
def test_dataset_tool_dataset_json_with_wrong_types(case, tmp_path):
    source = zip_with(tmp_path / 'source.zip', {'img0.png': png_bytes(), 'img1.png': png_bytes(seed=1),
                                                'dataset.json': BAD_LABEL_FILES[case]})
    dest = tmp_path / 'out.zip'
    with unchanged(tmp_path / 'out.zip'):
        assert_one_error(run_dataset_tool('--source', source, '--dest', dest), 'dataset.json', 'expected')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['source.zip']


def test_dataset_tool_dataset_json_in_a_folder(tmp_path):
    source = tmp_path / 'images'
    source.mkdir()
    (source / 'a.png').write_bytes(png_bytes())
    (source / 'dataset.json').write_bytes(b'{"labels": {"a.png": 1}}')
    dest = tmp_path / 'out'
    assert_one_error(run_dataset_tool('--source', source, '--dest', dest), 'dataset.json')
    assert not dest.exists()


@pytest.mark.parametrize('dest_name', ['out.zip', 'out'])
def test_dataset_tool_truncated_png(dest_name, tmp_path):
    source = tmp_path / 'images'
    source.mkdir()
    (source / 'a.png').write_bytes(png_bytes())
    (source / 'b.png').write_bytes(truncated(png_bytes(seed=1)))
    assert_one_error(run_dataset_tool('--source', source, '--dest', tmp_path / dest_name), 'b.png',
                     'cannot read image')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['images']


def test_dataset_tool_truncated_png_inside_a_zip(inputs, tmp_path):
    assert_one_error(run_dataset_tool('--source', inputs['truncated_png_zip'], '--dest', tmp_path / 'o.zip'),
                     'img00000000.png')
    assert list(tmp_path.iterdir()) == []


def test_dataset_tool_truncated_zip(inputs, tmp_path):
    assert_one_error(run_dataset_tool('--source', inputs['truncated_zip'], '--dest', tmp_path / 'o.zip'),
                     '--source', 'not a readable ZIP')
    assert list(tmp_path.iterdir()) == []


def test_dataset_tool_empty_source_file(tmp_path):
    source = tmp_path / 'empty.zip'
    source.write_bytes(b'')
    assert_one_error(run_dataset_tool('--source', source, '--dest', tmp_path / 'o.zip'), '--source')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['empty.zip']


@pytest.mark.parametrize('dest_name', ['out.zip', 'out'])
def test_dataset_tool_zip_path_traversal_stays_inside(dest_name, tmp_path):
    """Members named ../x.png or /tmp/x.png are read as images but never become output paths."""
    work = tmp_path / 'work'
    work.mkdir()
    outside_abs = Path('/tmp') / f'pfgmpp-hostile-{uuid.uuid4().hex}.png'
    members = {'../evil.png': png_bytes(seed=1), '../../evil2.png': png_bytes(seed=2),
               'sub/../../evil3.png': png_bytes(seed=3), str(outside_abs): png_bytes(seed=4),
               'ok.png': png_bytes(seed=5)}
    source = zip_with(work / 'source.zip', members)
    dest = work / dest_name
    result = run_dataset_tool('--source', source, '--dest', dest)
    assert result.exit_code == 0, result.output
    # Nothing beside or above the destination, nothing at the absolute name.
    assert sorted(p.name for p in work.iterdir()) == sorted(['source.zip', dest_name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['work']
    assert not outside_abs.exists() and not Path('/tmp/evil.png').exists()
    names = sorted(tree(dest)) if dest.is_dir() else sorted(zipfile.ZipFile(dest).namelist())
    assert names == ['00000/img00000000.png', '00000/img00000001.png', '00000/img00000002.png',
                     '00000/img00000003.png', '00000/img00000004.png', 'dataset.json']
    assert all('..' not in name and not name.startswith('/') for name in names)


@pytest.mark.parametrize('dest_name', ['out.zip', 'out'])
def test_dataset_tool_unwritable_destination(dest_name, tmp_path):
    source = zip_with(tmp_path / 'source.zip', {'a.png': png_bytes()})
    dest = under_a_file(tmp_path, 'sub', dest_name)
    assert_one_error(run_dataset_tool('--source', source, '--dest', dest), '--dest', str(dest))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['blocker.txt', 'source.zip']


@pytest.mark.parametrize('dest_name', ['out.zip', 'out'])
def test_dataset_tool_full_disk(dest_name, tmp_path, monkeypatch):
    from formats import dataset_writer
    source = zip_with(tmp_path / 'source.zip', {f'{i}.png': png_bytes(seed=i) for i in range(3)})
    calls = []

    def write(self: Any, name: str, data: Any) -> None:
        calls.append(name)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
        real(self, name, data)
    writer = dataset_writer.ZipDestination if dest_name.endswith('.zip') else dataset_writer.FolderDestination
    real = writer.write
    monkeypatch.setattr(writer, 'write', write)
    assert_one_error(run_dataset_tool('--source', source, '--dest', tmp_path / dest_name), '--dest',
                     'No space left on device')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['source.zip']


def test_dataset_tool_full_tmpfs(tiny_tmpfs, tmp_path):
    source = zip_with(tmp_path / 'source.zip', {f'{i}.png': png_bytes(size=32, seed=i) for i in range(4)})
    with unchanged(tiny_tmpfs):
        assert_one_error(run_dataset_tool('--source', source, '--dest', tiny_tmpfs / 'out.zip'), '--dest',
                         'No space left on device')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['source.zip', 'tmpfs']


def test_dataset_tool_bad_resolution_flag(tmp_path):
    source = zip_with(tmp_path / 'source.zip', {'a.png': png_bytes()})
    assert_one_error(run_dataset_tool('--source', source, '--dest', tmp_path / 'o.zip', '--resolution', '8xq'),
                     '--resolution')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['source.zip']


# ----------------------------------------------------------------------------
# train.py


def run_train(data: Path, outdir: Path, **overrides: Any) -> Any:
    import train
    return invoke(train.main, tiny_train_args(data, outdir, **overrides))


def assert_no_training_output(outdir: Path) -> None:
    """No snapshot, training state or temporary file (a run folder with its log may remain)."""
    leftovers = [p.name for p in outdir.rglob('*') if p.is_file() and (p.suffix in ('.pkl', '.pt', '.tmp')
                                                                          or p.name.startswith('.'))]
    assert leftovers == [], leftovers


def labelled_zip(path: Path, labels_json: bytes) -> Path:
    return zip_with(path, {'00000/img00000000.png': png_bytes(), '00000/img00000001.png': png_bytes(seed=1),
                           'dataset.json': labels_json})


TRAIN_CASES: dict[str, tuple[Callable[[dict, Path], dict], tuple[str, ...]]] = {
    'truncated-zip': (lambda f, t: dict(data=f['truncated_zip']), ('--data',)),
    'truncated-png': (lambda f, t: dict(data=f['truncated_png_zip']), ('--data', 'img00000000.png')),
    'labels-wrong-types': (lambda f, t: dict(data=labelled_zip(t / 'l.zip', b'{"labels": [["x", 1, 2]]}'), cond=1),
                           ('l.zip/dataset.json', 'expected {"labels"')),
    'labels-out-of-range': (lambda f, t: dict(data=labelled_zip(
        t / 'l.zip', b'{"labels": [["00000/img00000000.png", -1], ["00000/img00000001.png", 2]]}'), cond=1),
        ('l.zip/dataset.json', 'non-negative integers')),
    'resume-empty': (lambda f, t: dict(resume=_copy(f['empty'], t / 'training-state-000000.pt')),
                     ('--resume', 'training-state-000000.pt')),
    'resume-wrong-kind': (lambda f, t: dict(resume=_copy(f['uncond'], t / 'training-state-000000.pt')),
                          ('--resume', 'training state')),
    'transfer-empty': (lambda f, t: dict(transfer=f['empty']), ('--transfer', 'empty')),
    'transfer-wrong-kind': (lambda f, t: dict(transfer=f['optimizer_pt']), ('--transfer', '"ema"')),
    'transfer-bad-weights': (lambda f, t: dict(transfer=f['weights_bad_shape']), ('--transfer', 'do not match')),
    'cres-not-integers': (lambda f, t: dict(cres='a,b'), ('--cres',)),
    'unwritable-outdir': (lambda f, t: dict(outdir=under_a_file(t, 'runs')), ('--outdir', 'not writable')),
}


def _copy(source: Path, target: Path) -> Path:
    shutil.copy(source, target)
    return target


@pytest.mark.parametrize('case', list(TRAIN_CASES))
def test_train_hostile_input(case, inputs, tmp_path):
    make_overrides, fragments = TRAIN_CASES[case]
    given = tmp_path / 'given'
    given.mkdir()
    overrides = make_overrides(inputs, given)
    data = overrides.pop('data', inputs['dataset'])
    outdir = overrides.pop('outdir', tmp_path / 'runs')
    assert_one_error(run_train(data, outdir, **overrides), *fragments)
    assert_no_training_output(outdir)


def test_train_full_disk(inputs, tmp_path, full_disk):
    assert_one_error(run_train(inputs['dataset'], tmp_path / 'runs'), '--outdir', 'training_options.json',
                     'No space left on device')
    assert_no_training_output(tmp_path)


def test_train_full_disk_at_the_first_snapshot(inputs, tmp_path, monkeypatch):
    real = dnnlib.util.atomic_write

    @contextlib.contextmanager
    def fail_for_snapshots(path: Any, mode: str = 'wb') -> Iterator[Any]:
        with real(path, mode) as f:
            yield _FullDiskFile(f, os.fspath(path)) if 'network-snapshot' in os.fspath(path) else f
    monkeypatch.setattr(dnnlib.util, 'atomic_write', fail_for_snapshots)
    assert_one_error(run_train(inputs['dataset'], tmp_path / 'runs', snap=1, dump=1), 'network-snapshot-000000.pkl',
                     'No space left on device')
    assert_no_training_output(tmp_path)


# ----------------------------------------------------------------------------
# generate.py


def run_generate(network: Path, outdir: Path, *extra: Any) -> Any:
    import generate
    return invoke(generate.main, ['--network', network, '--outdir', outdir, '--seeds=0-1', '--steps=2',
                                  '--device=cpu', *extra])


GENERATE_NETWORKS = {
    'empty': ('empty', ('--network', 'empty.pkl', '0 bytes')),
    'truncated-pickle': ('truncated_pkl', ('--network', 'truncated.pkl')),
    'dataset-zip': ('dataset', ('--network', 'dataset.zip')),
    'dict-without-ema': ('no_ema_pkl', ('--network', '"ema"')),
    'optimizer-state': ('optimizer_pt', ('--network', '"ema"')),
    'weights-foreign-class': ('weights_foreign_class', ('--network', "'builtins.eval' is not allowed")),
    'weights-bad-shape': ('weights_bad_shape', ('--network', 'model.map_layer0.weight is [2, 2]')),
    'ref-npz-as-network': ('ref_nan', ('--network', 'ref-nan.npz')),
}


@pytest.mark.parametrize('case', list(GENERATE_NETWORKS))
def test_generate_bad_network(case, inputs, tmp_path):
    key, fragments = GENERATE_NETWORKS[case]
    outdir = tmp_path / 'out'
    assert_one_error(run_generate(inputs[key], outdir), *fragments)
    assert tree(outdir) == {}


def test_generate_broken_weights_sibling_is_named(inputs, tmp_path):
    snapshot = _copy(inputs['uncond'], tmp_path / 'net.pkl')
    (tmp_path / 'net.weights.pt').write_bytes(truncated(inputs['weights'].read_bytes()))
    assert_one_error(run_generate(snapshot, tmp_path / 'out'), '--network', 'net.weights.pt')
    assert tree(tmp_path / 'out') == {}


SEED_CASES = {'5-2': 'empty', 'a-b': "'a-b'", '1,,x': "'x'", '-3': 'seed -3 is out of range', '4294967296': 'out of range',
              ',': 'no integers'}


@pytest.mark.parametrize('seeds', list(SEED_CASES))
def test_generate_bad_seeds(seeds, inputs, tmp_path):
    import generate
    result = invoke(generate.main, ['--network', inputs['uncond'], '--outdir', tmp_path / 'out', f'--seeds={seeds}'])
    assert_one_error(result, '--seeds', SEED_CASES[seeds])
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('network, class_idx, fragment', [('cond', 3, 'out of range; expected 0..2'),
                                                          ('uncond', 0, 'unconditional')])
def test_generate_class_label_out_of_range(network, class_idx, fragment, inputs, tmp_path):
    assert_one_error(run_generate(inputs[network], tmp_path / 'out', f'--class={class_idx}'), '--class', fragment)
    assert tree(tmp_path / 'out') == {}


def test_generate_unwritable_outdir(inputs, tmp_path):
    outdir = under_a_file(tmp_path, 'images')
    assert_one_error(run_generate(inputs['uncond'], outdir), '--outdir', 'not writable')


def test_generate_unwritable_grid(inputs, tmp_path):
    grid = under_a_file(tmp_path, 'grid.png')
    assert_one_error(run_generate(inputs['uncond'], tmp_path / 'out', '--grid', grid), '--grid')
    assert tree(tmp_path / 'out') == {}


def test_generate_full_disk(inputs, tmp_path, full_disk):
    outdir = tmp_path / 'out'
    # The manifest is the first file written (before any image, so that an interrupted run is described).
    assert_one_error(run_generate(inputs['uncond'], outdir), f'--outdir {outdir}', 'manifest.json',
                     'No space left on device')
    assert tree(outdir) == {}


def test_generate_full_tmpfs(inputs, tiny_tmpfs):
    with unchanged(tiny_tmpfs):
        assert_one_error(run_generate(inputs['uncond'], tiny_tmpfs / 'out'), f'--outdir {tiny_tmpfs / "out"}',
                         'No space left on device')


# ----------------------------------------------------------------------------
# fid.py


def run_fid(*args: Any) -> Any:
    import fid
    return invoke(fid.main, list(args))


FID_REFS = {
    'nan': ('ref_nan', 'NaN'),
    'wrong-shape': ('ref_shape', 'shape'),
    'missing-keys': ('ref_keys', 'missing'),
    'truncated': ('ref_truncated', 'ref-truncated.npz'),
    'empty': ('empty', 'empty.pkl'),
    'missing-file': (None, 'missing.npz'),
}


@pytest.mark.parametrize('case', list(FID_REFS))
def test_fid_calc_bad_ref(case, inputs, detector, tmp_path):
    key, fragment = FID_REFS[case]
    ref = inputs[key] if key else tmp_path / 'missing.npz'
    stats = tmp_path / 'stats.npz'
    assert_one_error(run_fid('calc', '--images', inputs['dataset'], '--ref', ref, '--num=8', '--detector', detector,
                             '--device=cpu', '--workers=0', '--save-stats', stats), fragment)
    assert not stats.exists()


@pytest.mark.parametrize('key, fragments', [('truncated_zip', ('--images', 'truncated.zip')),
                                            ('truncated_png_zip', ('--images', 'img00000000.png')),
                                            ('empty', ('--images', 'empty.pkl'))])
def test_fid_calc_broken_images(key, fragments, inputs, detector, tmp_path):
    stats = tmp_path / 'stats.npz'
    assert_one_error(run_fid('calc', '--images', inputs[key], '--num=8', '--detector', detector, '--device=cpu',
                             '--workers=0', '--save-stats', stats), *fragments)
    assert list(tmp_path.iterdir()) == []


def test_fid_ref_broken_dataset(inputs, detector, tmp_path):
    dest = tmp_path / 'ref.npz'
    assert_one_error(run_fid('ref', '--data', inputs['truncated_zip'], '--dest', dest, '--detector', detector,
                             '--device=cpu', '--workers=0'), '--data')
    assert list(tmp_path.iterdir()) == []


def test_fid_ref_unwritable_dest(inputs, detector, tmp_path):
    dest = under_a_file(tmp_path, 'ref.npz')
    assert_one_error(run_fid('ref', '--data', inputs['dataset'], '--dest', dest, '--detector', detector,
                             '--device=cpu', '--workers=0'), '--dest')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['blocker.txt']


def test_fid_ref_full_disk(inputs, detector, tmp_path, full_disk):
    dest = tmp_path / 'ref.npz'
    assert_one_error(run_fid('ref', '--data', inputs['dataset'], '--dest', dest, '--detector', detector,
                             '--device=cpu', '--workers=0'), '--dest', 'No space left on device')
    assert list(tmp_path.iterdir()) == []


def test_fid_calc_full_tmpfs(inputs, detector, tiny_tmpfs):
    with unchanged(tiny_tmpfs):
        assert_one_error(run_fid('calc', '--images', inputs['dataset'], '--num=8', '--detector', detector,
                                 '--device=cpu', '--workers=0', '--save-stats', tiny_tmpfs / 'stats.npz'),
                         '--save-stats', 'No space left on device')


def fid_gen(network: Path, tmp_path: Path, detector: Path, *extra: Any) -> Any:
    return run_fid('gen', '--network', network, '--seeds=0-1', '--steps=2', '--detector', detector, '--device=cpu',
                   '--save-stats', tmp_path / 'stats.npz', *extra)


@pytest.mark.parametrize('key, fragment', [('empty', '0 bytes'), ('dataset', 'dataset.zip'),
                                           ('weights_foreign_class', 'is not allowed')])
def test_fid_gen_bad_network(key, fragment, inputs, detector, tmp_path):
    assert_one_error(fid_gen(inputs[key], tmp_path, detector), '--network', fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('seeds', ['5-2', 'a-b'])
def test_fid_gen_bad_seeds(seeds, inputs, detector, tmp_path):
    assert_one_error(run_fid('gen', '--network', inputs['uncond'], f'--seeds={seeds}', '--detector', detector,
                             '--save-stats', tmp_path / 's.npz'), '--seeds')
    assert list(tmp_path.iterdir()) == []


def test_fid_gen_class_out_of_range(inputs, detector, tmp_path):
    assert_one_error(fid_gen(inputs['cond'], tmp_path, detector, '--class=7'), '--class')
    assert list(tmp_path.iterdir()) == []


def test_fid_gen_unwritable_save_stats(inputs, detector, tmp_path):
    stats = under_a_file(tmp_path, 'stats.npz')
    assert_one_error(run_fid('gen', '--network', inputs['uncond'], '--seeds=0-1', '--steps=2', '--detector', detector,
                             '--device=cpu', '--save-stats', stats), '--save-stats')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['blocker.txt']


# ----------------------------------------------------------------------------
# export.py


def run_export(*args: Any) -> Any:
    import export as export_script
    return invoke(export_script.main, list(args))


@pytest.mark.parametrize('key, fragment', [('empty', '0 bytes'), ('truncated_pkl', 'truncated.pkl'),
                                           ('dataset', 'dataset.zip'),
                                           ('weights_foreign_class', 'is not allowed')])
def test_export_bad_input(key, fragment, inputs, tmp_path):
    output = tmp_path / 'out.weights.pt'
    assert_one_error(run_export('--input', inputs[key], '--output', output), '--input', fragment)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_network_outside_the_allow_list(tmp_path):
    from training.networks import SongUNet
    source = tmp_path / 'unet.pkl'
    with open(source, 'wb') as f:
        pickle.dump(dict(ema=SongUNet(img_resolution=8, in_channels=3, out_channels=3, model_channels=8,
                                      channel_mult=[1], attn_resolutions=[])), f)
    assert_one_error(run_export('--input', source), '--input', 'cannot export a SongUNet')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['unet.pkl']


def test_export_existing_output_is_kept(inputs, tmp_path):
    output = tmp_path / 'keep.weights.pt'
    output.write_bytes(b'precious')
    assert_one_error(run_export('--input', inputs['uncond'], '--output', output), '--output', '--force')
    assert output.read_bytes() == b'precious'


def test_export_unwritable_output(inputs, tmp_path):
    assert_one_error(run_export('--input', inputs['uncond'], '--output', under_a_file(tmp_path, 'o.weights.pt')),
                     '--output', 'not writable')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['blocker.txt']


def test_export_full_disk(inputs, tmp_path, full_disk):
    output = tmp_path / 'o.weights.pt'
    assert_one_error(run_export('--input', inputs['uncond'], '--output', output), '--output',
                     'No space left on device')
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------
# The whole suite, and the same promise outside CliRunner.


def test_case_counts(request):
    """The module docstring states how many cases each command gets; keep it in step with the tests."""
    session = request.session
    ids = [item.nodeid.split('::', 1)[1] for item in session.items if item.fspath == request.node.fspath]
    if len(ids) < 70:
        pytest.skip('run the whole module to check the case counts')
    counts = {}
    for prefix in ('dataset_tool', 'train', 'generate', 'fid', 'export'):
        counts[prefix] = sum(1 for i in ids if i.startswith(f'test_{prefix}_'))
    stated = ', '.join(f'{k} {v}' for k, v in counts.items())
    assert stated in __doc__.replace('\n', ' '), f'docstring should say: {stated} -- {sum(counts.values())} in all'
    assert f'{sum(counts.values())} in all' in __doc__.replace('\n', ' ')


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
