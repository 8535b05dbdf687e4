"""dataset_tool.py: golden conversions made by the original tool, every source kind, and each error path."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import pickle
import re
import shlex
import shutil
import tarfile
import zipfile
from pathlib import Path
import errno
import uuid
from typing import Any

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool

from tests.conftest import GOLDEN_DIR, REPO_ROOT, run_python
from tests._cli_inputs import zip_with, assert_one_error, invoke, png_bytes, tree, truncated, unchanged, under_a_file

TOOL = str(REPO_ROOT / 'dataset_tool.py')
GOLDEN_CASES = sorted((GOLDEN_DIR / 'dataset_tool').glob('*.expected.json'))


# ----------------------------------------------------------------------------
# Helpers.


def save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(pixels).save(path)


def random_pixels(seed: int, height: int, width: int, channels: int = 3) -> np.ndarray:
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def read_dataset(dest: Path) -> tuple[list[str], bytes, dict[str, np.ndarray]]:
    """(sorted member names, raw dataset.json, {png name: pixels}) of a ZIP or folder dataset."""
    if dest.is_dir():
        files = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob('*') if p.is_file()}
    else:
        with zipfile.ZipFile(dest) as zf:
            files = {name: zf.read(name) for name in zf.namelist() if not name.endswith('/')}
    images = {name: np.asarray(PIL.Image.open(io.BytesIO(data))) for name, data in files.items()
              if name.endswith('.png')}
    return sorted(files), files['dataset.json'], images


def convert(args: list[str]) -> 'click.testing.Result':
    """Run the CLI in-process; exceptions other than click's own are re-raised."""
    result = CliRunner().invoke(dataset_tool.main, args, catch_exceptions=False)
    return result


def fails_with(args: list[str], pattern: str, exit_code: int = 1) -> str:
    result = convert(args)
    assert result.exit_code == exit_code, result.output
    assert re.search(pattern, result.output), result.output
    return result.output


def leftover_entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ----------------------------------------------------------------------------
# Golden conversions (outputs of the original dataset_tool.py).


def _stage_source(case: dict, command: list[str], workdir: Path) -> None:
    """Put the case's source where its --source flag points, extracting folder sources that were zipped."""
    source_arg = next(a.split('=', 1)[1] for a in command if a.startswith('--source='))
    source_file = GOLDEN_DIR / case['source_file'].split(' ', 1)[0]
    target = workdir / source_arg
    if 'extract' in case['source_file']:
        with zipfile.ZipFile(source_file) as zf:
            members = zf.namelist()
            # A zip holding the named file itself (several files that belong together) lands in workdir;
            # otherwise the zip's root becomes the --source folder.
            zf.extractall(workdir if source_arg.rstrip('/') in members else target)
    else:
        shutil.copy(source_file, target)


@pytest.mark.parametrize('case_path', GOLDEN_CASES, ids=[p.name.split('.')[0] for p in GOLDEN_CASES])
def test_golden_conversion(case_path: Path, tmp_path: Path, golden_manifest: dict) -> None:
    # The case file has the expectations; its MANIFEST entry adds where the original's own output was kept.
    case = {**golden_manifest['files'][f'dataset_tool/{case_path.name}'], **json.loads(case_path.read_text())}
    command = shlex.split(case['command'])
    assert command[:2] == ['python', 'dataset_tool.py']
    args = command[2:]
    _stage_source(case, args, tmp_path)
    run_python([TOOL, *args], cwd=tmp_path)

    dest = tmp_path / next(a.split('=', 1)[1] for a in args if a.startswith('--dest='))
    names, labels_raw, images = read_dataset(dest)
    assert names == case['names_sorted']
    assert labels_raw.decode('utf8') == case['dataset_json_raw']
    for name, expected in case['images'].items():
        pixels = images[name]
        assert list(pixels.shape) == expected['shape'], name
        assert hashlib.sha256(pixels.tobytes()).hexdigest() == expected['pixel_sha256'], name

    # The kept output of the original decodes to exactly the same pixels.
    kept_names, kept_labels, kept_images = read_dataset(GOLDEN_DIR / case['output_kept'])
    assert kept_names == names and kept_labels == labels_raw
    for name, pixels in kept_images.items():
        np.testing.assert_array_equal(images[name], pixels, err_msg=name)


def test_golden_cases_present() -> None:
    assert {p.name.split('.')[0] for p in GOLDEN_CASES} >= {'cifar10', 'folder_center_crop', 'folder_center_crop_wide'}


# ----------------------------------------------------------------------------
# Sources, labels and options.


def test_convert_word_is_optional_and_folder_dest(tmp_path: Path) -> None:
    for k in range(3):
        save_png(tmp_path / 'src' / f'{k}.png', random_pixels(k, 8, 8))
    assert convert(['convert', f'--source={tmp_path / "src"}', f'--dest={tmp_path / "a.zip"}']).exit_code == 0
    assert convert([f'--source={tmp_path / "src"}', f'--dest={tmp_path / "b"}']).exit_code == 0
    names_a, labels_a, images_a = read_dataset(tmp_path / 'a.zip')
    names_b, labels_b, images_b = read_dataset(tmp_path / 'b')
    assert names_a == names_b == ['00000/img00000000.png', '00000/img00000001.png', '00000/img00000002.png',
                                  'dataset.json']
    assert json.loads(labels_a) == {'labels': None} and labels_a == labels_b
    for k in range(3):
        np.testing.assert_array_equal(images_a[f'00000/img{k:08d}.png'], random_pixels(k, 8, 8))
    assert leftover_entries(tmp_path) == ['a.zip', 'b', 'src']  # no temporary files left behind


def test_zip_source_carries_labels_and_max_images(tmp_path: Path) -> None:
    source = tmp_path / 'in.zip'
    with zipfile.ZipFile(source, 'w') as zf:
        for k in range(5):
            png = io.BytesIO()
            PIL.Image.fromarray(random_pixels(k, 4, 4, channels=1)).save(png, format='png')
            zf.writestr(f'x/{k}.png', png.getvalue())
        zf.writestr('dataset.json', json.dumps({'labels': [[f'x/{k}.png', [k, 0.5]] for k in range(5)]}))
    assert convert([f'--source={source}', f'--dest={tmp_path / "out.zip"}', '--max-images=3']).exit_code == 0
    names, labels, images = read_dataset(tmp_path / 'out.zip')
    assert len(images) == 3
    assert json.loads(labels)['labels'] == [[f'00000/img{k:08d}.png', [k, 0.5]] for k in range(3)]
    assert images['00000/img00000002.png'].shape == (4, 4)  # grayscale stays single-channel without a transform


def test_folder_labels_from_dataset_json_and_from_folders(tmp_path: Path) -> None:
    # Top-level folders become classes in sorted order; files at the root form the class "".
    save_png(tmp_path / 'f' / 'b' / '0.png', random_pixels(0, 4, 4))
    save_png(tmp_path / 'f' / 'a' / 'deep' / '1.png', random_pixels(1, 4, 4))
    save_png(tmp_path / 'f' / 'root.png', random_pixels(2, 4, 4))
    convert([f'--source={tmp_path / "f"}', f'--dest={tmp_path / "folders.zip"}'])
    _, labels, _ = read_dataset(tmp_path / 'folders.zip')
    assert [label for _, label in json.loads(labels)['labels']] == [1, 2, 0]  # a/deep/1, b/0, root

    # An explicit dataset.json wins; an image it does not mention is an error (the original dropped all labels).
    (tmp_path / 'f' / 'dataset.json').write_text(
        json.dumps({'labels': [['b/0.png', 7], ['root.png', 3], ['a/deep/1.png', 5]]}))
    convert([f'--source={tmp_path / "f"}', f'--dest={tmp_path / "json.zip"}'])
    assert [label for _, label in json.loads(read_dataset(tmp_path / 'json.zip')[1])['labels']] == [5, 7, 3]
    (tmp_path / 'f' / 'dataset.json').write_text(json.dumps({'labels': [['b/0.png', 7]]}))
    fails_with([f'--source={tmp_path / "f"}', f'--dest={tmp_path / "partial.zip"}'],
               r"dataset\.json: 2 of 3 images have no label \(e.g. 'a/deep/1.png', 'root.png'\)")
    assert not (tmp_path / 'partial.zip').exists()

    # A single top-level folder is not a labelling.
    save_png(tmp_path / 'one' / 'only' / '0.png', random_pixels(3, 4, 4))
    convert([f'--source={tmp_path / "one"}', f'--dest={tmp_path / "one.zip"}'])
    assert json.loads(read_dataset(tmp_path / 'one.zip')[1]) == {'labels': None}


def _write_idx(path: Path, magic: int, dims: list[int], payload: np.ndarray) -> None:
    with gzip.open(path, 'wb') as stream:
        stream.write(np.array([magic, *dims], dtype='>u4').tobytes() + payload.astype(np.uint8).tobytes())


def test_mnist_is_padded_to_32(tmp_path: Path) -> None:
    digits = np.random.default_rng(5).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    # The header keeps the real file's count: like the original, counts come from the data itself.
    _write_idx(tmp_path / 'train-images-idx3-ubyte.gz', 0x803, [60000, 28, 28], digits)
    _write_idx(tmp_path / 'train-labels-idx1-ubyte.gz', 0x801, [4], np.array([3, 1, 4, 1]))
    mnist = tmp_path / 'train-images-idx3-ubyte.gz'
    assert convert([f'--source={mnist}', f'--dest={tmp_path / "m.zip"}']).exit_code == 0
    _, labels, images = read_dataset(tmp_path / 'm.zip')
    assert [label for _, label in json.loads(labels)['labels']] == [3, 1, 4, 1]
    for k in range(4):
        np.testing.assert_array_equal(images[f'00000/img{k:08d}.png'], np.pad(digits[k], 2))

    _write_idx(tmp_path / 'train-labels-idx1-ubyte.gz', 0x801, [3], np.array([3, 1, 4]))
    fails_with([f'--source={tmp_path / "train-images-idx3-ubyte.gz"}', f'--dest={tmp_path / "m2.zip"}'],
               'pixels do not make 3 images of 28x28')
    _write_idx(tmp_path / 't10k-images-idx3-ubyte.gz', 0x801, [4, 28, 28], digits)
    _write_idx(tmp_path / 't10k-labels-idx1-ubyte.gz', 0x801, [4], np.array([3, 1, 4, 1]))
    fails_with([f'--source={tmp_path / "t10k-images-idx3-ubyte.gz"}', f'--dest={tmp_path / "m2.zip"}'],
               r't10k-images-idx3-ubyte.gz: not an MNIST idx file \(expected magic number 0x00000803\)')
    (tmp_path / 'train-labels-idx1-ubyte.gz').unlink()
    fails_with([f'--source={tmp_path / "train-images-idx3-ubyte.gz"}', f'--dest={tmp_path / "m2.zip"}'],
               'labels file .*train-labels-idx1-ubyte.gz is missing')


def test_center_crop_wide_and_resize_arithmetic(tmp_path: Path) -> None:
    # A 64x40 gray image at 16x8: the middle round(16*40/64) = 10 rows (15..24) keep the 2:1 aspect ratio; they
    # are made RGB, resized to 16x8 and pasted into rows 4..11 of a black 16x16 canvas.
    pixels = random_pixels(9, 40, 64, channels=1)
    save_png(tmp_path / 'w' / 'img.png', pixels)
    save_png(tmp_path / 'w' / 'narrow.png', random_pixels(1, 40, 8))  # narrower than 16: skipped
    assert convert([f'--source={tmp_path / "w"}', f'--dest={tmp_path / "w.zip"}', '--transform=center-crop-wide',
                    '--resolution=16x8']).exit_code == 0
    names, _, images = read_dataset(tmp_path / 'w.zip')
    assert names == ['00000/img00000000.png', 'dataset.json']  # 'img.png' sorts first; 'narrow.png' (index 1) skipped
    out = images['00000/img00000000.png']
    band = round(16 * 40 / 64)
    expected = np.array(PIL.Image.fromarray(np.repeat(pixels[(40 - band) // 2:(40 + band) // 2, :, None], 3, axis=2))
                        .resize((16, 8), PIL.Image.Resampling.LANCZOS))
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out[4:12], expected)
    assert not out[:4].any() and not out[12:].any()


def test_cifar_tarball_rejects_foreign_pickle_globals(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())
    tarball = tmp_path / 'cifar-10-python.tar.gz'
    with tarfile.open(tarball, 'w:gz') as tar:
        data = pickle.dumps({'data': Evil(), 'labels': [0]}, protocol=2)
        info = tarfile.TarInfo('cifar-10-batches-py/data_batch_1')
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    fails_with([f'--source={tarball}', f'--dest={tmp_path / "c.zip"}'], r'not a readable CIFAR-10 .*refusing to load')


# ----------------------------------------------------------------------------
# LSUN: optional lmdb dependency.


FAKE_LMDB = '''
"""Minimal in-memory stand-in for the lmdb package: records come from records.json next to the database."""
import base64, builtins, json, os

class _Txn:
    def __init__(self, path):
        with builtins.open(os.path.join(path, 'records.json')) as f:
            self._items = [(k.encode(), base64.b64decode(v)) for k, v in json.load(f)]
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return False
    def stat(self):
        return {'entries': len(self._items)}
    def cursor(self):
        return iter(self._items)

class _Env:
    def __init__(self, path):
        self._path = path
    def begin(self, write=False):
        return _Txn(self._path)

def open(path, readonly=True, lock=False):
    return _Env(path)
'''


def _make_lsun_dir(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    import base64
    db = tmp_path / 'bedroom_train_lmdb'
    db.mkdir()
    images, records = [], []
    for k in range(3):
        pixels = random_pixels(k, 8, 8)
        png = io.BytesIO()
        PIL.Image.fromarray(pixels).save(png, format='png')
        images.append(pixels)
        records.append([f'key{k}', base64.b64encode(png.getvalue()).decode()])
    records.insert(1, ['broken', base64.b64encode(b'not an image').decode()])
    (db / 'records.json').write_text(json.dumps(records))
    return db, images


def test_lsun_without_lmdb_is_a_clear_error(tmp_path: Path) -> None:
    if importlib.util.find_spec('lmdb') is not None:
        pytest.skip('lmdb is installed in this environment')
    db, _ = _make_lsun_dir(tmp_path)
    proc = run_python([TOOL, f'--source={db}', f'--dest={tmp_path / "l.zip"}'], check=False)
    assert proc.returncode == 1
    assert 'needs the optional package "lmdb"' in proc.stderr and 'Traceback' not in proc.stderr
    assert not (tmp_path / 'l.zip').exists()


def test_lsun_reader_with_stand_in_lmdb(tmp_path: Path) -> None:
    db, images = _make_lsun_dir(tmp_path)
    fake = tmp_path / 'fake_site'
    fake.mkdir()
    (fake / 'lmdb.py').write_text(FAKE_LMDB)
    env = {'PYTHONPATH': f'{REPO_ROOT}{os.pathsep}{fake}'}
    proc = run_python([TOOL, f'--source={db}', f'--dest={tmp_path / "l.zip"}', '--max-images=3'], env=env)
    assert 'skipping record' in proc.stderr  # the undecodable record is reported, and counts toward --max-images
    names, labels, out = read_dataset(tmp_path / 'l.zip')
    assert names == ['00000/img00000000.png', '00000/img00000001.png', 'dataset.json']
    assert json.loads(labels) == {'labels': None}
    np.testing.assert_array_equal(out['00000/img00000000.png'], images[0])
    np.testing.assert_array_equal(out['00000/img00000001.png'], images[1])


# ----------------------------------------------------------------------------
# Errors: one line each, nothing half-written.


def test_corrupt_image_is_named_and_leaves_no_output(tmp_path: Path) -> None:
    src = tmp_path / 'src'
    save_png(src / 'a.png', random_pixels(0, 8, 8))
    good = io.BytesIO()
    PIL.Image.fromarray(random_pixels(1, 8, 8)).save(good, format='png')
    (src / 'b.png').write_bytes(good.getvalue()[:60])  # truncated
    (src / 'c.png').write_bytes(b'definitely not a png')
    proc = run_python([TOOL, f'--source={src}', f'--dest={tmp_path / "out.zip"}'], cwd=tmp_path, check=False)
    assert proc.returncode == 1
    # c.png has no readable header, which the scan before writing finds; b.png fails only when decoded.
    assert re.search(r'Error: .*c\.png: cannot read image', proc.stderr) and 'Traceback' not in proc.stderr
    assert leftover_entries(tmp_path) == ['src']

    (src / 'c.png').unlink()
    fails_with([f'--source={src}', f'--dest={tmp_path / "out"}'], r'b\.png: cannot read image')
    assert leftover_entries(tmp_path) == ['src']  # the partial dataset was removed


def test_different_sizes_need_resolution(tmp_path: Path) -> None:
    save_png(tmp_path / 's' / 'a.png', random_pixels(0, 8, 8))
    save_png(tmp_path / 's' / 'b.png', random_pixels(1, 16, 16))
    fails_with([f'--source={tmp_path / "s"}', f'--dest={tmp_path / "o.zip"}'],
               r's/b\.png: image is 16x16 but .*s/a\.png is 8x8; use --resolution=WxH')
    assert convert([f'--source={tmp_path / "s"}', f'--dest={tmp_path / "o.zip"}', '--resolution=8x8']).exit_code == 0
    assert all(p.shape == (8, 8, 3) for p in read_dataset(tmp_path / 'o.zip')[2].values())


def test_non_square_and_non_power_of_two(tmp_path: Path) -> None:
    save_png(tmp_path / 's' / 'a.png', random_pixels(0, 8, 16))
    fails_with([f'--source={tmp_path / "s"}', f'--dest={tmp_path / "o.zip"}'], r'must be square .* got 16x8')
    fails_with([f'--source={tmp_path / "s"}', f'--dest={tmp_path / "o.zip"}', '--resolution=12x12'],
               r'power of two .* got 12')
    fails_with([f'--source={tmp_path / "s"}', f'--dest={tmp_path / "o.zip"}', '--resolution=16x8x'],
               r'--resolution.*expected WxH', exit_code=2)
    assert leftover_entries(tmp_path) == ['s']


def test_unknown_missing_and_empty_sources(tmp_path: Path) -> None:
    (tmp_path / 'notes.txt').write_text('hello')
    fails_with([f'--source={tmp_path / "notes.txt"}', f'--dest={tmp_path / "o.zip"}'],
               r'notes\.txt: unknown source type')
    fails_with([f'--source={tmp_path / "nope"}', f'--dest={tmp_path / "o.zip"}'], r'nope: no such file or directory')
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'readme.md').write_text('no images here')
    fails_with([f'--source={tmp_path / "empty"}', f'--dest={tmp_path / "o.zip"}'], r'empty: no images found')
    (tmp_path / 'bad.zip').write_bytes(b'PK but not really')
    fails_with([f'--source={tmp_path / "bad.zip"}', f'--dest={tmp_path / "o.zip"}'], r'bad\.zip: not a readable ZIP')


def test_transform_without_resolution(tmp_path: Path) -> None:
    save_png(tmp_path / 's' / 'a.png', random_pixels(0, 8, 8))
    for transform in ('center-crop', 'center-crop-wide'):
        fails_with([f'--source={tmp_path / "s"}', f'--dest={tmp_path / "o.zip"}', f'--transform={transform}'],
                   rf'--transform={transform} needs --resolution=WxH', exit_code=2)


def test_existing_destination_needs_overwrite(tmp_path: Path) -> None:
    save_png(tmp_path / 's' / 'a.png', random_pixels(0, 8, 8))
    (tmp_path / 'o.zip').write_bytes(b'old')
    (tmp_path / 'dir').mkdir()
    (tmp_path / 'dir' / 'keep.txt').write_text('old')
    for dest in ('o.zip', 'dir'):
        fails_with([f'--source={tmp_path / "s"}', f'--dest={tmp_path / dest}'],
                   'already exists and is not empty .*--overwrite')
    assert (tmp_path / 'o.zip').read_bytes() == b'old' and (tmp_path / 'dir' / 'keep.txt').exists()
    for dest in ('o.zip', 'dir'):
        assert convert([f'--source={tmp_path / "s"}', f'--dest={tmp_path / dest}', '--overwrite']).exit_code == 0
        assert read_dataset(tmp_path / dest)[0] == ['00000/img00000000.png', 'dataset.json']
    assert leftover_entries(tmp_path) == ['dir', 'o.zip', 's']
    (tmp_path / 'empty_dir').mkdir()  # an empty folder is not "existing data"
    assert convert([f'--source={tmp_path / "s"}', f'--dest={tmp_path / "empty_dir"}']).exit_code == 0


def test_progress_bar_shows_total(tmp_path: Path) -> None:
    for k in range(3):
        save_png(tmp_path / 's' / f'{k}.png', random_pixels(k, 4, 4))
    proc = run_python([TOOL, f'--source={tmp_path / "s"}', f'--dest={tmp_path / "o.zip"}', '--max-images=2'])
    assert '2/2' in proc.stderr


# ----------------------------------------------------------------------------
# Where a dataset.json can sit: each layout is used, or named in one line (never dropped in silence).


def _png(seed: int) -> bytes:
    stream = io.BytesIO()
    PIL.Image.fromarray(random_pixels(seed, 4, 4)).save(stream, format='png')
    return stream.getvalue()


def _labels_json(pairs: dict[str, int]) -> bytes:
    return json.dumps({'labels': [[name, label] for name, label in pairs.items()]}).encode()


def _nested_zip(members: dict[str, bytes]) -> bytes:
    stream = io.BytesIO()
    with zipfile.ZipFile(stream, 'w') as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return stream.getvalue()


def _make_source(tmp_path: Path, kind: str, files: dict[str, bytes]) -> Path:
    """The same files as a folder or as a ZIP (names relative to its root)."""
    if kind == 'zip':
        path = tmp_path / 'source.zip'
        path.write_bytes(_nested_zip(files))
        return path
    path = tmp_path / 'source'
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


# layout -> (files, expected labels in output order or None, pattern the output must show or None)
LABEL_LAYOUTS = {
    'root': ({'a/0.png': _png(0), 'b/1.png': _png(1), 'dataset.json': _labels_json({'a/0.png': 4, 'b/1.png': 6})},
             [4, 6], None),
    'zipped-folder': ({'data/0.png': _png(0), 'data/1.png': _png(1),
                       'data/dataset.json': _labels_json({'0.png': 3, '1.png': 5})},
                      [3, 5], r"sits in the folder 'data'"),
    'twice-zipped-folder': ({'x/data/0.png': _png(0), 'x/data/1.png': _png(1),
                             'x/data/dataset.json': _labels_json({'0.png': 8, '1.png': 9})},
                            [8, 9], r"sits in the folder 'x/data'"),
    'zipped-folder-of-classes': ({'data/cat/0.png': _png(0), 'data/dog/1.png': _png(1), 'data/dog/2.png': _png(2)},
                                 [0, 1, 1], r'Classes from the top-level folders of .*data.*cat -> 0, dog -> 1'),
    'classes-at-root': ({'cat/0.png': _png(0), 'dog/1.png': _png(1)},
                        [0, 1], r'cat -> 0, dog -> 1'),
    'wrong-case': ({'0.png': _png(0), '1.png': _png(1), 'Dataset.json': _labels_json({'0.png': 2, '1.png': 7})},
                   [2, 7], r'Note: reading labels from .*Dataset\.json .*letter case'),
    'root-and-sub-folder': ({'a/0.png': _png(0), 'b/1.png': _png(1), 'b/dataset.json': _labels_json({'1.png': 9}),
                             'dataset.json': _labels_json({'a/0.png': 1, 'b/1.png': 0})},
                            [1, 0], r"ignoring 1 other label file\(s\) below it: '.*dataset\.json'"),
    'nested-archive': ({'0.png': _png(0), '1.png': _png(1),
                        'more.zip': _nested_zip({'2.png': _png(2), 'dataset.json': _labels_json({'2.png': 1})})},
                       None, r"Note: nested archives are not read .*'.*more\.zip'"),
}

# layout -> (files, pattern of the one error line)
REFUSED_LABEL_LAYOUTS = {
    'beside-images-in-a-sub-folder': ({'cat/0.png': _png(0), 'dog/1.png': _png(1),
                                       'cat/dataset.json': _labels_json({'0.png': 1})},
                                      r'cat.dataset\.json: a dataset\.json below the dataset root is not read'),
    'in-a-labels-folder': ({'0.png': _png(0), '1.png': _png(1),
                            'meta/dataset.json': _labels_json({'0.png': 1, '1.png': 2})},
                           r'meta.dataset\.json: a dataset\.json below the dataset root is not read; expected the '
                           r'labels at .*source.*dataset\.json'),
}


@pytest.mark.parametrize('kind', ['folder', 'zip'])
@pytest.mark.parametrize('layout', list(LABEL_LAYOUTS))
def test_every_labels_layout_is_used_or_named(layout: str, kind: str, tmp_path: Path) -> None:
    files, expected, shown = LABEL_LAYOUTS[layout]
    source = _make_source(tmp_path, kind, files)
    result = convert([f'--source={source}', f'--dest={tmp_path / "out.zip"}'])
    assert result.exit_code == 0, result.output
    labels = json.loads(read_dataset(tmp_path / 'out.zip')[1])['labels']
    assert (None if labels is None else [label for _, label in labels]) == expected
    if shown is not None:
        assert re.search(shown, result.output), result.output


@pytest.mark.parametrize('kind', ['folder', 'zip'])
@pytest.mark.parametrize('layout', list(REFUSED_LABEL_LAYOUTS))
def test_a_labels_file_that_would_be_passed_over_is_refused(layout: str, kind: str, tmp_path: Path) -> None:
    files, pattern = REFUSED_LABEL_LAYOUTS[layout]
    source = _make_source(tmp_path, kind, files)
    output = fails_with([f'--source={source}', f'--dest={tmp_path / "out.zip"}'], pattern)
    assert len(output.strip().splitlines()) == 1, output
    assert not (tmp_path / 'out.zip').exists()


def test_zip_made_by_macos_reads_the_wrapped_labels_without_its_resource_forks(tmp_path: Path) -> None:
    fork = b'\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        '  # an AppleDouble header, not an image
    source = _make_source(tmp_path, 'zip', {'data/0.png': _png(0), 'data/1.png': _png(1),
                                            'data/dataset.json': _labels_json({'0.png': 5, '1.png': 6}),
                                            '__MACOSX/data/._0.png': fork, '__MACOSX/data/._1.png': fork,
                                            '__MACOSX/data/._dataset.json': fork})
    result = convert([f'--source={source}', f'--dest={tmp_path / "out.zip"}'])
    assert result.exit_code == 0, result.output
    names, labels, _ = read_dataset(tmp_path / 'out.zip')
    assert len(names) == 3 and [k for _, k in json.loads(labels)['labels']] == [5, 6]


def test_two_spellings_of_the_labels_file_in_a_zip_are_refused(tmp_path: Path) -> None:
    source = _make_source(tmp_path, 'zip', {'0.png': _png(0), 'Dataset.json': _labels_json({'0.png': 1}),
                                            'DATASET.JSON': _labels_json({'0.png': 2})})
    fails_with([f'--source={source}', f'--dest={tmp_path / "out.zip"}'],
               r'2 label files differ only in letter case .*expected one dataset\.json')


def test_zip_class_folders_take_class_order(tmp_path: Path) -> None:
    source = _make_source(tmp_path, 'zip', {'10/0.png': _png(0), '2/1.png': _png(1)})
    assert convert([f'--source={source}', f'--dest={tmp_path / "text.zip"}']).exit_code == 0
    assert [k for _, k in json.loads(read_dataset(tmp_path / 'text.zip')[1])['labels']] == [0, 1]
    assert convert([f'--source={source}', f'--dest={tmp_path / "num.zip"}', '--class-order=numeric']).exit_code == 0
    assert [k for _, k in json.loads(read_dataset(tmp_path / 'num.zip')[1])['labels']] == [1, 0]


def test_script_is_thin_and_the_library_converts_without_click(tmp_path: Path) -> None:
    from formats import dataset_writer
    assert len((REPO_ROOT / 'dataset_tool.py').read_text().splitlines()) <= 250
    lines: list[str] = []
    source = _make_source(tmp_path, 'folder', {'cat/0.png': _png(0), 'dog/1.png': _png(1)})
    assert dataset_writer.convert_dataset(str(source), str(tmp_path / 'o'), log=lines.append) == 2
    assert lines == [f'Classes from the top-level folders of {source} (text order): cat -> 0, dog -> 1']
    with pytest.raises(dataset_writer.DatasetError, match='--dest .*already exists'):
        dataset_writer.convert_dataset(str(source), str(tmp_path / 'o'), log=lines.append)


# ----------------------------------------------------------------------------
# Hostile and broken input: one ``Error:`` line naming the file or flag, no traceback, no partial output.


def run_dataset_tool(*args: Any) -> Any:
    import dataset_tool
    return invoke(dataset_tool.main, list(args))


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
