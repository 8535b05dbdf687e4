"""Readers of the image collections ``dataset_tool.py`` converts: image folders, ZIPs of images, the CIFAR-10
python tarball, MNIST idx files and LSUN LMDB folders.

Each reader returns a :class:`Source`: how many images it will yield and an iterator of :class:`SourceImage`
(uint8 pixels [H, W] or [H, W, 3], a JSON label or None, and the file it came from). Errors are
:class:`formats.dataset_files.DatasetError` (a ``ValueError``) whose message is one line naming the file or flag;
:class:`DatasetUsageError` marks a wrong combination of flags. Notes for the user go through a ``log`` callable.

Labels of folders and ZIPs (the layout the original NVlabs/edm tool reads, extended so that no label file is
passed over in silence):

* the *dataset root* is the source's root or, when everything in it sits in one folder (a zipped folder), that
  folder, repeatedly;
* ``dataset.json`` at the dataset root gives the labels; a name that differs only in letter case is read with a
  note; ``{"labels": null}`` or no file at all means labels from the top-level class folders of the dataset root
  (at least two), numbered as :func:`folder_classes` says;
* a ``dataset.json`` anywhere else is an error when no root file gives the labels, and is named in a note when one
  does; nested archives (``.zip``, ``.tar``, ``.tgz``) are not read, and each is named in a note.
"""

from __future__ import annotations

import gzip
import os
import pickle
import posixpath
import re
import sys
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import PIL.Image
from tqdm import tqdm

from formats.dataset_files import (LABELS_FILE, DatasetError, ImageHeader, dataset_channels, decode_image,
                                   match_labels, parse_labels_json, read_image_header)

CLASS_ORDERS = ('text', 'numeric')

CIFAR10_TARBALL_NAME = 'cifar-10-python.tar.gz'
CIFAR10_TRAIN_MEMBERS = [f'cifar-10-batches-py/data_batch_{k}' for k in range(1, 6)]  # test_batch is not used
CIFAR10_IMAGE_CHW = (3, 32, 32)

MNIST_IMAGES_SUFFIX = '-images-idx3-ubyte.gz'
MNIST_LABELS_SUFFIX = '-labels-idx1-ubyte.gz'
MNIST_IMAGES_MAGIC = 0x00000803  # idx3: unsigned bytes, three dimensions
MNIST_LABELS_MAGIC = 0x00000801  # idx1: unsigned bytes, one dimension
MNIST_BORDER = 2  # 28x28 digits padded to 32x32, a power of two

LSUN_DIR_SUFFIX = '_lmdb'
MACOS_FORKS = '__MACOSX/'  # not images: resource forks the macOS archiver adds beside every file
ARCHIVE_SUFFIXES = ('.zip', '.tar', '.tar.gz', '.tgz', '.tar.bz2', '.tar.xz')  # nested ones are not read

# CIFAR-10 batches are pickles; only the numpy pieces an array needs may be unpickled from them.
_ALLOWED_PICKLE_GLOBALS = {
    ('numpy', 'ndarray'), ('numpy', 'dtype'),
    ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
}
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, zlib.error)

Log = Callable[[str], None]


class DatasetUsageError(DatasetError):
    """Flags that do not fit together or do not fit the source (the command line shows its usage)."""


def has_image_extension(name: str | os.PathLike) -> bool:
    """Whether PIL knows the text after the last dot as an image extension (the original's test)."""
    PIL.Image.init()
    suffix = str(name).rsplit('.', 1)[-1].lower()
    return '.' + suffix in PIL.Image.EXTENSION


@dataclass
class SourceImage:
    pixels: np.ndarray  # [H, W] or [H, W, 3] uint8
    label: Any          # JSON value carried into dataset.json, or None
    where: str          # the source file (or file[index]) it came from, for error messages


@dataclass
class Source:
    num_images: int
    images: Iterator[SourceImage]
    headers: Optional[list[ImageHeader]] = None  # of the images to convert, for sources that are image files
    wheres: Optional[list[str]] = None           # their file names, for error messages


def _limit(count: int, max_images: Optional[int]) -> int:
    return count if max_images is None else min(count, max_images)


# ----------------------------------------------------------------------------
# Labels of folders and ZIPs.


def folder_classes(root: str, names: list[str], class_order: Optional[str], log: Log = print) -> Optional[list[int]]:
    """Class of every image from the top-level folder it sits in (files directly under root form the class "").

    Classes are numbered in text order of the folder names, as the original tool did, or with
    ``class_order='numeric'`` in order of the numbers the folders are named by; one class means no labels.
    The folder -> class mapping is logged. Raises :class:`DatasetError` when numeric order does not apply.
    """
    class_of = [name.split('/', 1)[0] if '/' in name else '' for name in names]
    folders = sorted(set(class_of))
    if len(folders) < 2:
        return None
    numbers: dict[str, int] = {}
    for folder in folders:
        if re.fullmatch(r'[+-]?\d+', folder):
            numbers[folder] = int(folder)
    if class_order == 'numeric':
        odd = [f for f in folders if f not in numbers]
        if odd:
            what = f'files directly in {root}' if odd[0] == '' else f'the folder {odd[0]!r}'
            raise DatasetError(f'--class-order=numeric: {what} of --source {root} is not named by a '
                               f'number; expected only top-level folders named 0, 1, 2, ...')
        if len(set(numbers.values())) < len(numbers):
            raise DatasetError(f'--class-order=numeric: two top-level folders of {root} name the same number '
                               f'({", ".join(repr(f) for f in folders)})')
        folders.sort(key=numbers.__getitem__)
    class_ids = {folder: k for k, folder in enumerate(folders)}
    mapping = ', '.join(f'{folder or "(files at the top)"} -> {k}' for folder, k in class_ids.items())
    log(f'Classes from the top-level folders of {root} ({class_order or "text"} order): {mapping}')
    if class_order != 'numeric' and len(numbers) == len(folders) and folders != sorted(folders, key=numbers.get):
        log('Note: the folders are named by numbers but classes follow their text order (as the original '
            'tool); --class-order=numeric numbers them by value')
    return [class_ids[cls] for cls in class_of]


def _is_labels_name(name: str) -> bool:
    return posixpath.basename(name).casefold() == LABELS_FILE


def _is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def dataset_root(files: list[str]) -> str:
    """Folder prefix ('' or 'a/b/') that holds every image and label file of a source listed by relative
    '/'-separated ``files``: while all of them sit in one folder, that folder (a zipped folder's wrapper)."""
    relevant = [f for f in files if has_image_extension(f) or _is_labels_name(f)]
    prefix = ''
    while relevant and all('/' in f for f in relevant):
        top = {f.split('/', 1)[0] for f in relevant}
        if len(top) != 1:
            break
        folder = top.pop() + '/'
        prefix += folder
        relevant = [f[len(folder):] for f in relevant]
    return prefix


@dataclass
class LabelPlan:
    root: str                  # dataset root prefix within the source ('' or 'folder/')
    labels_file: Optional[str]  # the file (relative to the source) to read labels from, or None


def plan_labels(files: list[str], describe: Callable[[str], str], source: str, log: Log = print) -> LabelPlan:
    """Where a folder or ZIP source keeps its labels (module docstring), given every file in it by relative
    '/'-separated name; ``describe`` turns such a name into one for messages. Notes go to ``log``.

    Raises:
        DatasetError: a dataset.json that would be passed over (not at the dataset root, none there).
    """
    root = dataset_root(files)
    candidates = [f for f in files if _is_labels_name(f)]
    at_root = [f for f in candidates if f.startswith(root) and '/' not in f[len(root):]]
    exact = [f for f in at_root if f[len(root):] == LABELS_FILE]
    chosen = exact[0] if exact else (at_root[0] if len(at_root) == 1 else None)
    if not exact and len(at_root) > 1:
        raise DatasetError(f'--source {source}: {len(at_root)} label files differ only in letter case '
                           f'({", ".join(repr(describe(f)) for f in at_root)}); expected one {LABELS_FILE}')
    if chosen is not None and not exact:
        log(f'Note: reading labels from {describe(chosen)} (expected the name {LABELS_FILE}; letter case differs)')
    if root:
        log(f'Note: everything in --source {source} sits in the folder {root.rstrip("/")!r}; image names and class '
            f'folders are taken relative to it')
    others = [f for f in candidates if f != chosen]
    if others and chosen is None:
        raise DatasetError(f'{describe(others[0])}: a {LABELS_FILE} below the dataset root is not read; expected '
                           f'the labels at {describe(root + LABELS_FILE)} naming images relative to '
                           f'{describe(root) if root else "the source root"}'
                           + (f' ({len(others)} such files)' if len(others) > 1 else ''))
    if others:
        log(f'Note: labels come from {describe(chosen)}; ignoring {len(others)} other label file(s) below it: '
            f'{", ".join(repr(describe(f)) for f in others[:3])}{", ..." if len(others) > 3 else ""}')
    nested = [f for f in files if _is_archive_name(f)]
    if nested:
        log(f'Note: nested archives are not read (neither their images nor a {LABELS_FILE} in them), unpack them '
            f'first: {", ".join(repr(describe(f)) for f in nested[:3])}{", ..." if len(nested) > 3 else ""}')
    return LabelPlan(root, chosen)


def _source_labels(plan: LabelPlan, read: Callable[[str], bytes], describe: Callable[[str], str], source: str,
                   images: list[str], count: int, class_order: Optional[str], log: Log) -> Optional[list[Any]]:
    """Labels of ``images`` (relative to the source) by ``plan``, or None for an unlabelled source."""
    names = [name[len(plan.root):] for name in images]
    labels = None
    if plan.labels_file is not None:
        where = describe(plan.labels_file)
        table = parse_labels_json(read(plan.labels_file), where)
        if table:
            labels, notes = match_labels(table, names, where, num_used=count)
            for note in notes:
                log(f'Note: {note}')
            if class_order is not None:
                raise DatasetUsageError(f'--class-order applies to labels from class folders, but {where} gives '
                                        f'the labels')
    if labels is None:
        labels = folder_classes(describe(plan.root.rstrip('/')) if plan.root else source, names, class_order, log)
    return labels


def _scan_headers(wheres: list[str], opener: Callable[[int], Any]) -> list[ImageHeader]:
    """Header of every image (size, channels after conversion): reads no pixels, fails on the first bad file."""
    return [read_image_header(opener(k), where) for k, where in enumerate(wheres)]


# ----------------------------------------------------------------------------
# Sources.


def open_image_folder(root: str, max_images: Optional[int], class_order: Optional[str] = None,
                      log: Log = print) -> Source:
    """Every image under ``root`` (recursively) in sorted path order, with labels from dataset.json or folders."""
    everything = [path for path in sorted(Path(root).rglob('*')) if path.is_file()]
    relative = {path: os.path.relpath(path, root).replace('\\', '/') for path in everything}
    paths = [path for path in everything if has_image_extension(path)]
    names = [relative[path] for path in paths]
    count = _limit(len(paths), max_images)

    def describe(name: str) -> str:
        return os.path.join(root, *name.rstrip('/').split('/')) if name else root

    def read(name: str) -> bytes:
        with open(describe(name), 'rb') as stream:
            return stream.read()
    plan = plan_labels([relative[path] for path in everything], describe, root, log)
    labels = _source_labels(plan, read, describe, root, names, count, class_order, log)

    wheres = [str(path) for path in paths[:count]]
    headers = _scan_headers(wheres, lambda k: paths[k])
    channels = dataset_channels(headers)

    def generate() -> Iterator[SourceImage]:
        for k, path in enumerate(paths[:count]):
            yield SourceImage(decode_image(path, wheres[k], channels), None if labels is None else labels[k], wheres[k])
    return Source(count, generate(), headers, wheres)


def open_image_zip(archive: str, max_images: Optional[int], class_order: Optional[str] = None,
                   log: Log = print) -> Source:
    """Every image in a ZIP in sorted member order (but those under __MACOSX/), with labels from dataset.json or
    folders as for a folder."""
    def describe(name: str) -> str:
        return f'{archive}:{name}' if name else archive
    try:
        with zipfile.ZipFile(archive) as zf:
            # macOS adds __MACOSX/ (resource forks named like the images, ._0.png) to the ZIPs it makes.
            files = [name for name in zf.namelist() if not name.endswith('/') and not name.startswith(MACOS_FORKS)]
            members = sorted(name for name in files if has_image_extension(name))
            count = _limit(len(members), max_images)
            plan = plan_labels(files, describe, archive, log)
            labels = _source_labels(plan, zf.read, describe, archive, members, count, class_order, log)
            wheres = [f'{archive}:{member}' for member in members[:count]]
            headers = _scan_headers(wheres, lambda k: zf.open(members[k]))
    except _ZIP_ERRORS as err:
        raise DatasetError(f'--source {archive}: not a readable ZIP archive ({err})') from None
    channels = dataset_channels(headers)

    def generate() -> Iterator[SourceImage]:
        with zipfile.ZipFile(archive) as zf:
            for k, member in enumerate(members[:count]):
                try:
                    data = zf.read(member)
                except _ZIP_ERRORS as err:
                    raise DatasetError(f'{wheres[k]}: cannot read member ({err})') from None
                yield SourceImage(decode_image(data, wheres[k], channels), None if labels is None else labels[k],
                                  wheres[k])
    return Source(count, generate(), headers, wheres)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except the numpy pieces needed to rebuild an array."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f'refusing to load {module}.{name}')
        return super().find_class(module, name)


def open_cifar10(tarball: str, max_images: Optional[int]) -> Source:
    """The 50,000 training images of the CIFAR-10 python tarball with their class labels."""
    batches, batch_labels = [], []
    try:
        with tarfile.open(tarball, mode='r:gz') as archive:
            for member in CIFAR10_TRAIN_MEMBERS:
                with archive.extractfile(member) as stream:
                    batch = _NumpyOnlyUnpickler(stream, encoding='latin1').load()
                data = np.asarray(batch['data'])
                if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != np.prod(CIFAR10_IMAGE_CHW):
                    raise ValueError(f'{member}: expected uint8 data of shape [N, 3072], got {data.dtype} {data.shape}')
                batches.append(data.reshape(-1, *CIFAR10_IMAGE_CHW))
                batch_labels.append(np.asarray(batch['labels'], dtype=np.int64))
    except (OSError, EOFError, KeyError, ValueError, tarfile.TarError, pickle.UnpicklingError) as err:
        raise DatasetError(f'--source {tarball}: not a readable CIFAR-10 python tarball ({err})') from None
    images = np.concatenate(batches).transpose(0, 2, 3, 1)  # NCHW -> NHWC
    labels = np.concatenate(batch_labels)
    if len(labels) != len(images):
        raise DatasetError(f'--source {tarball}: {len(images)} images but {len(labels)} labels')
    count = _limit(len(images), max_images)
    return Source(count, (SourceImage(images[k], int(labels[k]), f'{tarball}[{k}]') for k in range(count)))


def _read_idx_file(path: str, magic: int, header_ints: int) -> tuple[list[int], np.ndarray]:
    """Header dimensions and payload of a gzip-compressed MNIST idx file."""
    try:
        with gzip.open(path, 'rb') as stream:
            raw = stream.read()
    except (OSError, EOFError) as err:
        raise DatasetError(f'{path}: cannot read gzip file ({err})') from None
    header = np.frombuffer(raw[:4 * header_ints], dtype='>u4').tolist() if len(raw) >= 4 * header_ints else []
    if not header or header[0] != magic:
        raise DatasetError(f'{path}: not an MNIST idx file (expected magic number {magic:#010x})')
    return header[1:], np.frombuffer(raw, dtype=np.uint8, offset=4 * header_ints)


def open_mnist(images_gz: str, max_images: Optional[int]) -> Source:
    """MNIST digits padded with a black border to 32x32, labels from the matching *-labels-idx1-ubyte.gz."""
    labels_gz = images_gz[:-len(MNIST_IMAGES_SUFFIX)] + MNIST_LABELS_SUFFIX
    if not os.path.isfile(labels_gz):
        raise DatasetError(f'--source {images_gz}: the labels file {labels_gz} is missing')
    # Counts come from the payload sizes, as in the original, which never read the headers' counts.
    (_, rows, cols), pixels = _read_idx_file(images_gz, MNIST_IMAGES_MAGIC, 4)
    _, labels = _read_idx_file(labels_gz, MNIST_LABELS_MAGIC, 2)
    num = labels.size
    if rows * cols == 0 or pixels.size != num * rows * cols:
        raise DatasetError(f'--source {images_gz}: {pixels.size} pixels do not make {num} images of '
                           f'{rows}x{cols} (one per label in {labels_gz})')
    border = ((0, 0), (MNIST_BORDER, MNIST_BORDER), (MNIST_BORDER, MNIST_BORDER))
    images = np.pad(pixels.reshape(num, rows, cols), border, mode='constant', constant_values=0)
    count = _limit(num, max_images)
    return Source(count, (SourceImage(images[k], int(labels[k]), f'{images_gz}[{k}]') for k in range(count)))


def open_lsun(lmdb_dir: str, max_images: Optional[int]) -> Source:
    """Images of an LSUN LMDB folder, unlabelled. Needs the optional ``lmdb`` package."""
    try:
        import lmdb  # optional dependency: only LSUN sources need it
    except ImportError:
        raise DatasetError(f'--source {lmdb_dir}: reading an LSUN LMDB folder needs the optional '
                           f'package "lmdb" (pip install lmdb)') from None
    try:
        import cv2  # optional: decodes like the original did; PIL is used without it
    except ImportError:
        cv2 = None

    def open_txn() -> Any:
        return lmdb.open(lmdb_dir, readonly=True, lock=False).begin(write=False)

    with open_txn() as txn:
        count = _limit(int(txn.stat()['entries']), max_images)

    def decode(value: bytes) -> np.ndarray:
        if cv2 is not None:
            bgr = cv2.imdecode(np.frombuffer(value, dtype=np.uint8), cv2.IMREAD_COLOR)
            if bgr is not None:
                return bgr[:, :, ::-1]
        # Like cv2's IMREAD_COLOR, always three channels.
        return decode_image(value, f'{lmdb_dir} record', channels=3)

    def generate() -> Iterator[SourceImage]:
        with open_txn() as txn:
            for position, (key, value) in enumerate(txn.cursor()):
                if position >= count:
                    break
                # LSUN holds a few undecodable records; like the original, they are reported and skipped.
                try:
                    pixels = decode(value)
                except (OSError, ValueError, SyntaxError) as err:
                    tqdm.write(f'{lmdb_dir}: skipping record {bytes(key)!r}: cannot decode image ({err})',
                               file=sys.stderr)
                    continue
                yield SourceImage(pixels, None, f'{lmdb_dir}:{bytes(key).decode("utf8", "replace")}')
    return Source(count, generate())


def open_source(source: str, max_images: Optional[int], class_order: Optional[str] = None,
                log: Log = print) -> Source:
    """Pick the reader from what --source names.

    Raises:
        DatasetUsageError: --class-order for a source without class folders.
        DatasetError: a missing, unknown or unreadable source, or labels that do not fit its images.
    """
    is_folder = os.path.isdir(source) and not source.rstrip('/\\').endswith(LSUN_DIR_SUFFIX)
    is_zip = not os.path.isdir(source) and os.path.basename(source).lower().endswith('.zip')
    if class_order is not None and not (is_folder or is_zip):
        raise DatasetUsageError(f'--class-order applies to image folders and ZIPs labelled by their top-level '
                                f'folders, not to --source {source}')
    if is_folder:
        return open_image_folder(source, max_images, class_order, log)
    if os.path.isdir(source):
        return open_lsun(source, max_images)
    if not os.path.isfile(source):
        raise DatasetError(f'--source {source}: no such file or directory')
    base = os.path.basename(source)
    if base == CIFAR10_TARBALL_NAME:
        return open_cifar10(source, max_images)
    if base.endswith(MNIST_IMAGES_SUFFIX):
        return open_mnist(source, max_images)
    if is_zip:
        return open_image_zip(source, max_images, class_order, log)
    raise DatasetError(
        f'--source {source}: unknown source type; expected an image folder, a *{LSUN_DIR_SUFFIX} folder, '
        f'a .zip of images, {CIFAR10_TARBALL_NAME} or an MNIST *{MNIST_IMAGES_SUFFIX} file')
