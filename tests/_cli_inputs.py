"""Shared checks and inputs of the command-line contract tests: every script fails bad input with one
``Error:`` line naming the file or flag, no traceback, and no partial output (see each script's test file)."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib

from tests._sampler_nets import make_tiny_net, save_snapshot
from tests._train_data import make_dataset_zip

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


def zip_with(path: Path, members: dict[str, bytes]) -> Path:
    """A ZIP archive at ``path`` holding ``members`` (name -> bytes) as given, hostile names included."""
    with zipfile.ZipFile(path, 'w') as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def copy_file(source: Path, target: Path) -> Path:
    shutil.copy(source, target)
    return target
