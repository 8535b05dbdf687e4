"""Every file the project writes gets the permissions a plain open() would give it, ``0o666 & ~umask``, and every
folder ``0o777 & ~umask``, although every write goes through a temporary file, which tempfile creates 0600.

The writers run in a subprocess (tests/_file_modes_worker.py) under umasks 0o022, 0o002 and 0o077 in turn, so the
test process's umask is never touched: train.py (network snapshots, training states, post-hoc EMA snapshots, the
options, log and stats files), export.py (weights files), generate.py (PNGs, manifest.json), fid.py (ref and
--save-stats .npz, --jsonl), reconstruct_phema.py (post-hoc EMA pickles), dataset_tool.py (ZIP, folder and a
replaced folder) and dnnlib.util.atomic_write itself.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests._train_data import make_dataset_zip
from tests.conftest import GOLDEN_DIR, REPO_ROOT, run_python

UMASKS = ('022', '002', '077')
# What each writer must have left (relative to its umask folder); every file and folder found is checked.
EXPECTED_FILES = {
    'atomic.bin', 'run/network-snapshot-000000.pkl', 'run/training-state-000000.pt',
    'run/network-snapshot-0000000-0.050.pkl', 'run/training_options.json', 'exported.weights.pt',
    'png/000000.png', 'png/manifest.json', 'fid-ref.npz', 'fid-gen.npz', 'fid.jsonl', 'phema/phema-0000000-0.070.pkl',
    'dataset.zip', 'dataset/dataset.json', 'dataset/00000/img00000000.png',
}
EXPECTED_FOLDERS = {'run', 'png', 'phema', 'dataset', 'dataset/00000'}


@pytest.fixture(scope='module')
def written(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('modes')
    data_zip = make_dataset_zip(root / 'data.zip', count=8)
    run_python([str(REPO_ROOT / 'tests' / '_file_modes_worker.py'), str(root / 'out'), str(data_zip),
                str(GOLDEN_DIR / 'fid' / 'detector-standin.pkl'), *UMASKS], env=dict(OMP_NUM_THREADS='1'), timeout=900)
    return root / 'out'


@pytest.mark.parametrize('umask', UMASKS)
def test_every_written_file_and_folder_follows_the_umask(written: Path, umask: str) -> None:
    mask = int(umask, 8)
    folder = written / f'umask-{umask}'
    files, folders = {}, {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in filenames:
            path = Path(dirpath, name)
            files[path.relative_to(folder).as_posix()] = stat.S_IMODE(path.stat().st_mode)
        for name in dirnames:
            path = Path(dirpath, name)
            folders[path.relative_to(folder).as_posix()] = stat.S_IMODE(path.stat().st_mode)
    assert EXPECTED_FILES <= set(files), sorted(EXPECTED_FILES - set(files))
    assert EXPECTED_FOLDERS <= set(folders), sorted(EXPECTED_FOLDERS - set(folders))
    assert not [name for name in files if name.rsplit('/', 1)[-1].startswith('.')]  # no temporary left behind
    wrong = {name: oct(mode) for name, mode in files.items() if mode != 0o666 & ~mask}
    assert wrong == {}, f'files not {oct(0o666 & ~mask)}'
    wrong = {name: oct(mode) for name, mode in folders.items() if mode != 0o777 & ~mask}
    assert wrong == {}, f'folders not {oct(0o777 & ~mask)}'


def _in_a_subprocess(code: str, umask: str) -> str:
    """stdout of ``python -c CODE`` run under ``umask`` (this process's umask stays as it is)."""
    wrapper = f'import os; os.umask(0o{umask})\n{code}'
    return run_python(['-c', wrapper], env=dict(OMP_NUM_THREADS='1')).stdout.strip()


@pytest.mark.parametrize('umask', UMASKS)
def test_process_umask_reads_the_mask_with_and_without_proc(umask: str) -> None:
    code = ('from dnnlib import util\n'
            'first = util.process_umask()\n'
            "util._PROC_STATUS = '/nonexistent/status'\n"
            'second = util.process_umask()\n'
            'third = util.process_umask()\n'  # the fallback put the mask back
            'print(oct(first), oct(second), oct(third), oct(os.umask(0)))\n')
    expected = oct(int(umask, 8))
    assert _in_a_subprocess(code, umask).split() == [expected] * 4


@pytest.mark.parametrize('umask', UMASKS)
def test_temporary_helpers_and_atomic_write_give_plain_create_modes(umask: str, tmp_path: Path) -> None:
    code = ('import stat, sys\n'
            'from dnnlib import util\n'
            f'folder = {str(tmp_path)!r}\n'
            "fd, path = util.temporary_file(folder, '.f.', '.tmp'); os.close(fd)\n"
            "made = util.temporary_folder(folder, '.d.', '.tmp')\n"
            "with util.atomic_write(os.path.join(folder, 'a.txt'), 'w') as f: f.write('text')\n"
            "open(os.path.join(folder, 'plain.txt'), 'w').close(); os.mkdir(os.path.join(folder, 'plain'))\n"
            "print(*(oct(stat.S_IMODE(os.stat(os.path.join(folder, p)).st_mode)) for p in "
            "(path, made, 'a.txt', 'plain.txt', 'plain')))\n")
    mask = int(umask, 8)
    file_mode, folder_mode = oct(0o666 & ~mask), oct(0o777 & ~mask)
    assert _in_a_subprocess(code, umask).split() == [file_mode, folder_mode, file_mode, file_mode, folder_mode]
    assert (tmp_path / 'a.txt').read_text() == 'text'
