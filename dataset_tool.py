"""Convert image collections into the dataset layout that training/dataset.py reads.

The result is a ZIP archive (members stored, not deflated) or a directory holding uncompressed PNGs named
``{i // 1000:05d}/img{i:08d}.png`` and a ``dataset.json`` of the form ``{"labels": [[name, label], ...]}``
or ``{"labels": null}``. For the same source and flags the names, labels and pixels equal those written by
NVlabs/edm's dataset_tool.py, so datasets made by either tool are interchangeable.

Both ``python dataset_tool.py --source=... --dest=...`` (the original's form) and
``python dataset_tool.py convert --source=... --dest=...`` work.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import re
import shutil
import sys
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import click
import numpy as np
import PIL.Image
from tqdm import tqdm

from formats.dataset_files import (LABELS_FILE, DatasetError, ImageHeader, check_same_size, dataset_channels,
                                    decode_image, gray_to_rgb, match_labels, parse_labels_json, read_image_header)

# PNGs are written without compression: larger files, but decoding them while training costs almost nothing.
PNG_SAVE_OPTIONS = dict(format='png', compress_level=0, optimize=False)
IMAGES_PER_SUBDIR = 1000
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
TRANSFORMS = ('center-crop', 'center-crop-wide')

# CIFAR-10 batches are pickles; only the numpy pieces an array needs may be unpickled from them.
_ALLOWED_PICKLE_GLOBALS = {
    ('numpy', 'ndarray'), ('numpy', 'dtype'),
    ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
}

# ----------------------------------------------------------------------------
# Small helpers.


def parse_resolution(text: str) -> tuple[int, int]:
    """'512x384' or '512,384' -> (width, height)."""
    match = re.fullmatch(r'\s*(\d+)\s*[x,]\s*(\d+)\s*', text)
    if match is None or min(int(match[1]), int(match[2])) < 1:
        raise click.BadParameter(f'expected WxH with positive integers (e.g. 64x64), got {text!r}',
                                 param_hint='--resolution')
    return int(match[1]), int(match[2])


def has_image_extension(name: str | os.PathLike) -> bool:
    """Whether PIL knows the text after the last dot as an image extension (the original's test)."""
    suffix = str(name).rsplit('.', 1)[-1].lower()
    return '.' + suffix in PIL.Image.EXTENSION


def archive_name(index: int) -> str:
    """Name of the index-th output image: 1000 images per subdirectory."""
    return f'{index // IMAGES_PER_SUBDIR:05d}/img{index:08d}.png'


# ----------------------------------------------------------------------------
# Sources. Each returns how many images it will yield and an iterator of them.


@dataclass
class SourceImage:
    pixels: np.ndarray  # HW or HWC uint8
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


def _labels_from_json(blob: bytes, where: str, names: list[str], count: int) -> Optional[list[Any]]:
    """Label of every image from a dataset.json (None when it has no labels); mismatches are errors."""
    table = parse_labels_json(blob, where)
    if not table:
        return None
    labels, notes = match_labels(table, names, where, num_used=count)
    for note in notes:
        click.echo(f'Note: {note}')
    return labels


def _folder_classes(root: str, names: list[str], class_order: Optional[str]) -> Optional[list[int]]:
    """Class of every image from the top-level folder it sits in (files directly under root form the class "").

    Classes are numbered in text order of the folder names, as the original tool did, or with
    ``class_order='numeric'`` in order of the numbers the folders are named by; one class means no labels.
    The folder -> class mapping is printed.
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
            raise click.ClickException(f'--class-order=numeric: {what} of --source {root} is not named by a '
                                       f'number; expected only top-level folders named 0, 1, 2, ...')
        if len(set(numbers.values())) < len(numbers):
            raise click.ClickException(f'--class-order=numeric: two top-level folders of {root} name the same number '
                                       f'({", ".join(repr(f) for f in folders)})')
        folders.sort(key=numbers.__getitem__)
    class_ids = {folder: k for k, folder in enumerate(folders)}
    mapping = ', '.join(f'{folder or "(files at the top)"} -> {k}' for folder, k in class_ids.items())
    click.echo(f'Classes from the top-level folders of {root} ({class_order or "text"} order): {mapping}')
    if class_order != 'numeric' and len(numbers) == len(folders) and folders != sorted(folders, key=numbers.get):
        click.echo('Note: the folders are named by numbers but classes follow their text order (as the original '
                   'tool); --class-order=numeric numbers them by value')
    return [class_ids[cls] for cls in class_of]


def _scan_headers(wheres: list[str], opener: Callable[[int], Any]) -> list[ImageHeader]:
    """Header of every image (size, channels after conversion): reads no pixels, fails on the first bad file."""
    return [read_image_header(opener(k), where) for k, where in enumerate(wheres)]


def open_image_folder(root: str, max_images: Optional[int], class_order: Optional[str] = None) -> Source:
    """Every image under ``root`` (recursively) in sorted path order, with labels from dataset.json or folders."""
    paths = [path for path in sorted(Path(root).rglob('*')) if has_image_extension(path) and path.is_file()]
    names = [os.path.relpath(path, root).replace('\\', '/') for path in paths]
    count = _limit(len(paths), max_images)

    labels = None
    labels_path = os.path.join(root, LABELS_FILE)
    if os.path.isfile(labels_path):
        with open(labels_path, 'rb') as stream:
            labels = _labels_from_json(stream.read(), labels_path, names, count)
        if labels is not None and class_order is not None:
            raise click.UsageError(f'--class-order applies to labels from class folders, but {labels_path} '
                                   f'gives the labels')
    if labels is None:
        labels = _folder_classes(root, names, class_order)

    wheres = [str(path) for path in paths[:count]]
    headers = _scan_headers(wheres, lambda k: paths[k])
    channels = dataset_channels(headers)

    def generate() -> Iterator[SourceImage]:
        for k, path in enumerate(paths[:count]):
            yield SourceImage(decode_image(path, wheres[k], channels), None if labels is None else labels[k], wheres[k])
    return Source(count, generate(), headers, wheres)


def open_image_zip(archive: str, max_images: Optional[int]) -> Source:
    """Every image in a ZIP in sorted member order; labels only from a dataset.json at the archive root."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = sorted(name for name in zf.namelist() if has_image_extension(name))
            labels = None
            count = _limit(len(members), max_images)
            if LABELS_FILE in zf.namelist():
                labels = _labels_from_json(zf.read(LABELS_FILE), f'{archive}:{LABELS_FILE}', members, count)
            wheres = [f'{archive}:{member}' for member in members[:count]]
            headers = _scan_headers(wheres, lambda k: zf.open(members[k]))
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
        raise click.ClickException(f'--source {archive}: not a readable ZIP archive ({err})') from None
    channels = dataset_channels(headers)

    def generate() -> Iterator[SourceImage]:
        with zipfile.ZipFile(archive) as zf:
            for k, member in enumerate(members[:count]):
                try:
                    data = zf.read(member)
                except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
                    raise click.ClickException(f'{wheres[k]}: cannot read member ({err})') from None
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
        raise click.ClickException(f'--source {tarball}: not a readable CIFAR-10 python tarball ({err})') from None
    images = np.concatenate(batches).transpose(0, 2, 3, 1)  # NCHW -> NHWC
    labels = np.concatenate(batch_labels)
    if len(labels) != len(images):
        raise click.ClickException(f'--source {tarball}: {len(images)} images but {len(labels)} labels')
    count = _limit(len(images), max_images)
    return Source(count, (SourceImage(images[k], int(labels[k]), f'{tarball}[{k}]') for k in range(count)))


def _read_idx_file(path: str, magic: int, header_ints: int) -> tuple[list[int], np.ndarray]:
    """Header dimensions and payload of a gzip-compressed MNIST idx file."""
    try:
        with gzip.open(path, 'rb') as stream:
            raw = stream.read()
    except (OSError, EOFError) as err:
        raise click.ClickException(f'{path}: cannot read gzip file ({err})') from None
    header = np.frombuffer(raw[:4 * header_ints], dtype='>u4').tolist() if len(raw) >= 4 * header_ints else []
    if not header or header[0] != magic:
        raise click.ClickException(f'{path}: not an MNIST idx file (expected magic number {magic:#010x})')
    return header[1:], np.frombuffer(raw, dtype=np.uint8, offset=4 * header_ints)


def open_mnist(images_gz: str, max_images: Optional[int]) -> Source:
    """MNIST digits padded with a black border to 32x32, labels from the matching *-labels-idx1-ubyte.gz."""
    labels_gz = images_gz[:-len(MNIST_IMAGES_SUFFIX)] + MNIST_LABELS_SUFFIX
    if not os.path.isfile(labels_gz):
        raise click.ClickException(f'--source {images_gz}: the labels file {labels_gz} is missing')
    # Counts come from the payload sizes, as in the original, which never read the headers' counts.
    (_, rows, cols), pixels = _read_idx_file(images_gz, MNIST_IMAGES_MAGIC, 4)
    _, labels = _read_idx_file(labels_gz, MNIST_LABELS_MAGIC, 2)
    num = labels.size
    if rows * cols == 0 or pixels.size != num * rows * cols:
        raise click.ClickException(f'--source {images_gz}: {pixels.size} pixels do not make {num} images of '
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
        raise click.ClickException(f'--source {lmdb_dir}: reading an LSUN LMDB folder needs the optional '
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
                    tqdm.write(f'{lmdb_dir}: skipping record {bytes(key)!r}: cannot decode image ({err})', file=sys.stderr)
                    continue
                yield SourceImage(pixels, None, f'{lmdb_dir}:{bytes(key).decode("utf8", "replace")}')
    return Source(count, generate())


def open_source(source: str, max_images: Optional[int], class_order: Optional[str] = None) -> Source:
    """Pick the reader from what --source names."""
    is_folder = os.path.isdir(source) and not source.rstrip('/\\').endswith(LSUN_DIR_SUFFIX)
    if class_order is not None and not is_folder:
        raise click.UsageError(f'--class-order applies to image folders labelled by their top-level folders, '
                               f'not to --source {source}')
    if is_folder:
        return open_image_folder(source, max_images, class_order)
    if os.path.isdir(source):
        return open_lsun(source, max_images)
    if not os.path.isfile(source):
        raise click.ClickException(f'--source {source}: no such file or directory')
    base = os.path.basename(source)
    if base == CIFAR10_TARBALL_NAME:
        return open_cifar10(source, max_images)
    if base.endswith(MNIST_IMAGES_SUFFIX):
        return open_mnist(source, max_images)
    if base.lower().endswith('.zip'):
        return open_image_zip(source, max_images)
    raise click.ClickException(
        f'--source {source}: unknown source type; expected an image folder, a *{LSUN_DIR_SUFFIX} folder, '
        f'a .zip of images, {CIFAR10_TARBALL_NAME} or an MNIST *{MNIST_IMAGES_SUFFIX} file')


# ----------------------------------------------------------------------------
# Crop and resize. A transform returns None for an image it rejects.


def _resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.array(PIL.Image.fromarray(pixels).resize(size, PIL.Image.Resampling.LANCZOS))


Transform = Callable[[np.ndarray], Optional[np.ndarray]]


def make_transform(kind: Optional[str], resolution: Optional[tuple[int, int]]) -> Transform:
    """Image -> transformed image (or None to skip it) for --transform and --resolution."""
    if kind is None:
        def rescale(pixels: np.ndarray) -> np.ndarray:
            height, width = pixels.shape[:2]
            if resolution is None or resolution == (width, height):
                return pixels
            return _resize(pixels, resolution)
        return rescale

    if resolution is None:
        raise click.UsageError(f'--transform={kind} needs --resolution=WxH')
    out_w, out_h = resolution

    if kind == 'center-crop':
        def crop_square(pixels: np.ndarray) -> np.ndarray:
            height, width = pixels.shape[:2]
            side = min(height, width)
            top, left = (height - side) // 2, (width - side) // 2
            return _resize(gray_to_rgb(pixels[top:top + side, left:left + side]), (out_w, out_h))
        return crop_square

    if kind == 'center-crop-wide':
        if out_h > out_w:
            raise click.UsageError(f'--transform=center-crop-wide needs a height <= width, got --resolution={out_w}x{out_h}')

        def crop_letterbox(pixels: np.ndarray) -> Optional[np.ndarray]:
            height, width = pixels.shape[:2]
            band = int(round(out_w * height / width))  # rows kept so that the band has the target aspect ratio
            if width < out_w or band < out_h:
                return None
            top = (height - band) // 2
            strip = _resize(gray_to_rgb(pixels[top:top + band]), (out_w, out_h))
            canvas = np.zeros((out_w, out_w, 3), dtype=np.uint8)
            offset = (out_w - out_h) // 2
            canvas[offset:offset + out_h] = strip
            return canvas
        return crop_letterbox

    raise click.UsageError(f'--transform={kind}: expected one of {", ".join(TRANSFORMS)}')


# ----------------------------------------------------------------------------
# Destinations, written under a temporary name and renamed into place by commit().


def _apply_umask(path: str, mode: int) -> None:
    # mkstemp/mkdtemp create owner-only entries; give the result the permissions a plain create would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _is_nonempty(path: str) -> bool:
    if os.path.isdir(path):
        return len(os.listdir(path)) > 0
    return os.path.exists(path) and (not os.path.isfile(path) or os.path.getsize(path) > 0)


class ZipDestination:
    """Stored (uncompressed) ZIP written to a hidden temporary file next to ``path``."""

    def __init__(self, path: str):
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.partial', dir=directory)
        self._file = os.fdopen(fd, 'wb')
        self._zip = zipfile.ZipFile(self._file, mode='w', compression=zipfile.ZIP_STORED)

    def write(self, name: str, data: bytes | str) -> None:
        self._zip.writestr(name, data)

    def commit(self) -> None:
        self._zip.close()
        self._file.close()
        _apply_umask(self._tmp, 0o666)
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        # The archive is thrown away, so closing may fail (typically on a full disk) without consequence.
        for close in (self._zip.close, self._file.close):
            try:
                close()
            except OSError:
                pass
        if os.path.exists(self._tmp):
            os.remove(self._tmp)


class FolderDestination:
    """Directory tree built in a hidden temporary sibling of ``path``."""

    def __init__(self, path: str):
        self.path = os.path.normpath(path)
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self._tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(self.path)}.', suffix='.partial', dir=parent)

    def write(self, name: str, data: bytes | str) -> None:
        target = os.path.join(self._tmp, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, 'wb') as stream:
            stream.write(data.encode('utf8') if isinstance(data, str) else data)

    def commit(self) -> None:
        _apply_umask(self._tmp, 0o777)
        if not os.path.exists(self.path):
            os.rename(self._tmp, self.path)
            return
        # An existing folder is moved aside first so that the final name always holds a complete dataset.
        old = tempfile.mkdtemp(prefix=f'.{os.path.basename(self.path)}.', suffix='.old', dir=os.path.dirname(self._tmp))
        os.rename(self.path, os.path.join(old, 'replaced'))
        os.rename(self._tmp, self.path)
        shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


def open_destination(dest: str, overwrite: bool) -> ZipDestination | FolderDestination:
    if dest == '':
        raise click.UsageError('--dest must not be empty')
    is_zip = dest.lower().endswith('.zip')
    if is_zip and os.path.isdir(dest):
        raise click.ClickException(f'--dest {dest}: is a directory, but the name asks for a ZIP archive')
    if not is_zip and os.path.isfile(dest):
        raise click.ClickException(f'--dest {dest}: is a file; name a folder or a .zip archive')
    if _is_nonempty(dest) and not overwrite:
        raise click.ClickException(f'--dest {dest}: already exists and is not empty (pass --overwrite to replace it)')
    try:
        return ZipDestination(dest) if is_zip else FolderDestination(dest)
    except OSError as err:  # a parent that is a file, a read-only or full file system
        raise click.ClickException(f'--dest {dest}: cannot create it ({err.strerror or err})') from None


# ----------------------------------------------------------------------------
# Conversion.


RESIZE_HINT = 'use --resolution=WxH to resize every image to one size (--transform=center-crop crops them square first)'


def _check_first_image(pixels: np.ndarray, name: str) -> None:
    """The first written image fixes the dataset's geometry; it must be square with a power-of-two side (every
    source gives grayscale or RGB pixels)."""
    height, width = pixels.shape[:2]
    if width != height:
        raise click.ClickException(f'{name}: images must be square after --transform/--resolution, got {width}x{height}')
    if width & (width - 1) != 0:
        raise click.ClickException(f'{name}: image side must be a power of two after --transform/--resolution, got {width}')


def convert_dataset(source: str, dest: str, max_images: Optional[int] = None, transform: Optional[str] = None,
                    resolution: Optional[tuple[int, int]] = None, overwrite: bool = False,
                    class_order: Optional[str] = None) -> int:
    """Convert ``source`` into a dataset at ``dest``; returns the number of images written."""
    PIL.Image.init()
    transform_fn = make_transform(transform, resolution)
    data = open_source(source, max_images, class_order)
    if data.num_images == 0:
        raise click.ClickException(f'--source {source}: no images found')
    if data.headers is not None and transform is None and resolution is None:
        check_same_size(data.headers, data.wheres, RESIZE_HINT)  # before anything is written

    target = open_destination(dest, overwrite)
    try:
        labels: list[Optional[list]] = []
        reference: Optional[np.ndarray] = None
        for index, item in enumerate(tqdm(data.images, total=data.num_images, unit='img', desc=os.path.basename(dest))):
            name = archive_name(index)  # skipped images still use up their index, as in the original
            pixels = transform_fn(item.pixels)
            if pixels is None:
                continue
            if reference is None:
                _check_first_image(pixels, item.where)
                reference, first = pixels, item.where
            if pixels.shape[:2] != reference.shape[:2]:
                raise click.ClickException(
                    f'{item.where}: image is {pixels.shape[1]}x{pixels.shape[0]} but {first} is '
                    f'{reference.shape[1]}x{reference.shape[0]}; {RESIZE_HINT}')
            if pixels.ndim < reference.ndim:
                pixels = gray_to_rgb(pixels)  # grayscale in a colour dataset
            elif pixels.ndim > reference.ndim:
                raise click.ClickException(
                    f'{item.where}: image is colour but {first} and the images before it are grayscale; expected '
                    f'one kind (--transform=center-crop makes every image RGB)')
            png = io.BytesIO()
            PIL.Image.fromarray(pixels).save(png, **PNG_SAVE_OPTIONS)
            target.write(name, png.getvalue())
            labels.append(None if item.label is None else [name, item.label])
        if reference is None:
            raise click.ClickException(f'--source {source}: every image was skipped by --transform={transform}')
        # Sources label every image or none (a dataset.json that misses images is an error when it is read).
        complete = all(entry is not None for entry in labels)
        target.write(LABELS_FILE, json.dumps({'labels': labels if complete else None}))
        target.commit()
    except OSError as err:
        # Sources report their own read errors as ClickExceptions, so an OSError here comes from writing.
        target.abort()
        raise click.ClickException(f'--dest {dest}: cannot write the dataset ({err.strerror or err}); '
                                   f'nothing was written') from None
    except BaseException:
        target.abort()
        raise
    return len(labels)


# ----------------------------------------------------------------------------
# Command line.


def _resolution_option(_ctx: click.Context, _param: click.Parameter, value: Optional[str]) -> Optional[tuple[int, int]]:
    return None if value is None else parse_resolution(value)


class _ConvertWhenNoCommand(click.Group):
    """A group that treats ``dataset_tool.py --source ...`` as ``dataset_tool.py convert --source ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ['convert', *args]
        return super().parse_args(ctx, args)


@click.group(cls=_ConvertWhenNoCommand)
def main() -> None:
    """Make datasets for training. `dataset_tool.py --source=... --dest=...` means `convert` (see convert --help)."""


@main.command()
@click.option('--source', help='Input folder, archive or file (see below)', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Output folder, or a path ending in .zip', metavar='PATH', type=str, required=True)
@click.option('--max-images', help='Convert at most this many input images', metavar='INT', type=click.IntRange(min=1))
@click.option('--transform', help='Crop mode before resizing', type=click.Choice(TRANSFORMS))
@click.option('--resolution', help='Output size, e.g. 64x64', metavar='WxH', callback=_resolution_option)
@click.option('--overwrite', help='Replace an existing non-empty --dest', is_flag=True)
@click.option('--class-order', help='Class numbers of label folders: text order of their names (the original\'s) or '
              'numeric order  [default: text]', type=click.Choice(CLASS_ORDERS))
def convert(source: str, dest: str, max_images: Optional[int], transform: Optional[str],
            resolution: Optional[tuple[int, int]], overwrite: bool, class_order: Optional[str]) -> None:
    """Convert images into a dataset folder or ZIP of uncompressed PNGs plus dataset.json.

    \b
    --source kinds:
      path/                         images found recursively under path/, in sorted order
      archive.zip                   images in the ZIP, in sorted order
      cifar-10-python.tar.gz        the 50,000 CIFAR-10 training images, labelled
      train-images-idx3-ubyte.gz    MNIST (labels read from train-labels-idx1-ubyte.gz), padded to 32x32
      name_lmdb/                    LSUN LMDB folder (needs `pip install lmdb`)

    Labels come from a dataset.json at the root of a folder or ZIP source ({"labels": [[name, label], ...]},
    names relative to that root; "./a.png", "a\\b.png" and names relative to another folder are matched when
    unambiguous). Every image needs a label and every entry an image, else nothing is written. A folder
    without a dataset.json is labelled by its top-level subfolders when there are at least two, numbered in
    text order of the folder names ("10" before "2", as the original tool) or, with --class-order=numeric,
    by the numbers they are named by; the folder -> class mapping is printed.

    Image modes: 1-bit, palette, CMYK/YCbCr/HSV/LAB become grayscale or RGB; alpha is composited over black;
    16-bit grayscale (I;16, and I from older Pillow) keeps its high byte (v >> 8); 32-bit float (F) is refused.
    Grayscale images among colour ones are stored as RGB. All headers are checked before anything is written.

    Output images must be square with a power-of-two side and all of one size: use --resolution to resize,
    and --transform=center-crop (square crop) or center-crop-wide (crop to the WxH aspect ratio and letterbox
    into a WxW square; narrower images are skipped) to crop first.

    The output is written under a temporary name and renamed at the end, so an interrupted run leaves no
    partial dataset; an existing non-empty --dest is only replaced with --overwrite.
    """
    try:
        convert_dataset(source, dest, max_images=max_images, transform=transform, resolution=resolution,
                        overwrite=overwrite, class_order=class_order)
    except DatasetError as err:
        raise click.ClickException(str(err)) from None


if __name__ == '__main__':
    main()
