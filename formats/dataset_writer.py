"""Writing datasets in the layout ``training/dataset.py`` reads: crop/resize transforms, the ZIP and folder
destinations, and :func:`convert_dataset`, which runs a source (``formats.dataset_sources``) through them.

The result is a ZIP archive (members stored, not deflated) or a directory holding uncompressed PNGs named
``{i // 1000:05d}/img{i:08d}.png`` and a ``dataset.json`` of the form ``{"labels": [[name, label], ...]}``
or ``{"labels": null}``. For the same source and flags the names, labels and pixels equal those written by
NVlabs/edm's dataset_tool.py, so datasets made by either tool are interchangeable.

Both destinations are built under a hidden temporary name (created by ``dnnlib.util.temporary_file`` /
``temporary_folder``, so the result has the permissions of a plain create under the umask) and renamed into
place at the end: an interrupted run leaves no partial dataset. Errors are ``DatasetError`` (one line naming the
file or flag), ``DatasetUsageError`` for flags that do not fit together.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from typing import Callable, Optional

import numpy as np
import PIL.Image
from tqdm import tqdm

import dnnlib
from formats.dataset_files import LABELS_FILE, DatasetError, check_same_size, gray_to_rgb
from formats.dataset_sources import DatasetUsageError, Log, open_source

# PNGs are written without compression: larger files, but decoding them while training costs almost nothing.
PNG_SAVE_OPTIONS = dict(format='png', compress_level=0, optimize=False)
IMAGES_PER_SUBDIR = 1000
TRANSFORMS = ('center-crop', 'center-crop-wide')
RESIZE_HINT = 'use --resolution=WxH to resize every image to one size (--transform=center-crop crops them square first)'


def archive_name(index: int) -> str:
    """Name of the index-th output image: 1000 images per subdirectory."""
    return f'{index // IMAGES_PER_SUBDIR:05d}/img{index:08d}.png'


# ----------------------------------------------------------------------------
# Crop and resize. A transform returns None for an image it rejects.


def _resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.array(PIL.Image.fromarray(pixels).resize(size, PIL.Image.Resampling.LANCZOS))


Transform = Callable[[np.ndarray], Optional[np.ndarray]]


def make_transform(kind: Optional[str], resolution: Optional[tuple[int, int]]) -> Transform:
    """uint8 image [H, W] or [H, W, 3] -> transformed image (or None to skip it) for --transform and
    --resolution=(width, height); Lanczos resampling as the original tool. Raises DatasetUsageError for a
    transform without a resolution, or one that cannot give that resolution."""
    if kind is None:
        def rescale(pixels: np.ndarray) -> np.ndarray:
            height, width = pixels.shape[:2]
            if resolution is None or resolution == (width, height):
                return pixels
            return _resize(pixels, resolution)
        return rescale

    if resolution is None:
        raise DatasetUsageError(f'--transform={kind} needs --resolution=WxH')
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
            raise DatasetUsageError(f'--transform=center-crop-wide needs a height <= width, got '
                                    f'--resolution={out_w}x{out_h}')

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

    raise DatasetUsageError(f'--transform={kind}: expected one of {", ".join(TRANSFORMS)}')


# ----------------------------------------------------------------------------
# Destinations, written under a temporary name and renamed into place by commit().


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
        fd, self._tmp = dnnlib.util.temporary_file(directory, f'.{os.path.basename(path)}.', '.partial')
        self._file = os.fdopen(fd, 'wb')
        self._zip = zipfile.ZipFile(self._file, mode='w', compression=zipfile.ZIP_STORED)

    def write(self, name: str, data: bytes | str) -> None:
        self._zip.writestr(name, data)

    def commit(self) -> None:
        self._zip.close()
        self._file.close()
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
        self._tmp = dnnlib.util.temporary_folder(parent, f'.{os.path.basename(self.path)}.', '.partial')

    def write(self, name: str, data: bytes | str) -> None:
        target = os.path.join(self._tmp, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, 'wb') as stream:
            stream.write(data.encode('utf8') if isinstance(data, str) else data)

    def commit(self) -> None:
        if not os.path.exists(self.path):
            os.rename(self._tmp, self.path)
            return
        # An existing folder is moved aside first so that the final name always holds a complete dataset.
        old = dnnlib.util.temporary_folder(os.path.dirname(self._tmp), f'.{os.path.basename(self.path)}.', '.old')
        os.rename(self.path, os.path.join(old, 'replaced'))
        os.rename(self._tmp, self.path)
        shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


def open_destination(dest: str, overwrite: bool) -> ZipDestination | FolderDestination:
    """The writer for --dest (a ZIP when the name ends in .zip, else a folder).

    Raises:
        DatasetUsageError: an empty --dest.
        DatasetError: --dest is of the other kind, is not empty without ``overwrite``, or cannot be created.
    """
    if dest == '':
        raise DatasetUsageError('--dest must not be empty')
    is_zip = dest.lower().endswith('.zip')
    if is_zip and os.path.isdir(dest):
        raise DatasetError(f'--dest {dest}: is a directory, but the name asks for a ZIP archive')
    if not is_zip and os.path.isfile(dest):
        raise DatasetError(f'--dest {dest}: is a file; name a folder or a .zip archive')
    if _is_nonempty(dest) and not overwrite:
        raise DatasetError(f'--dest {dest}: already exists and is not empty (pass --overwrite to replace it)')
    try:
        return ZipDestination(dest) if is_zip else FolderDestination(dest)
    except OSError as err:  # a parent that is a file, a read-only or full file system
        raise DatasetError(f'--dest {dest}: cannot create it ({err.strerror or err})') from None


# ----------------------------------------------------------------------------
# Conversion.


def _check_first_image(pixels: np.ndarray, name: str) -> None:
    """The first written image fixes the dataset's geometry; it must be square with a power-of-two side (every
    source gives grayscale or RGB pixels)."""
    height, width = pixels.shape[:2]
    if width != height:
        raise DatasetError(f'{name}: images must be square after --transform/--resolution, got {width}x{height}')
    if width & (width - 1) != 0:
        raise DatasetError(f'{name}: image side must be a power of two after --transform/--resolution, got {width}')


def convert_dataset(source: str, dest: str, max_images: Optional[int] = None, transform: Optional[str] = None,
                    resolution: Optional[tuple[int, int]] = None, overwrite: bool = False,
                    class_order: Optional[str] = None, log: Log = print) -> int:
    """Convert ``source`` into a dataset at ``dest``; returns the number of images written.

    ``resolution`` is (width, height) in pixels; notes (class mapping, label files passed over) go to ``log``.

    Raises:
        DatasetUsageError: flags that do not fit together or do not fit the source.
        DatasetError: unreadable or unusable input, or --dest cannot be written; nothing is left under ``dest``.
    """
    PIL.Image.init()
    transform_fn = make_transform(transform, resolution)
    data = open_source(source, max_images, class_order, log)
    if data.num_images == 0:
        raise DatasetError(f'--source {source}: no images found')
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
                raise DatasetError(
                    f'{item.where}: image is {pixels.shape[1]}x{pixels.shape[0]} but {first} is '
                    f'{reference.shape[1]}x{reference.shape[0]}; {RESIZE_HINT}')
            if pixels.ndim < reference.ndim:
                pixels = gray_to_rgb(pixels)  # grayscale in a colour dataset
            elif pixels.ndim > reference.ndim:
                raise DatasetError(
                    f'{item.where}: image is colour but {first} and the images before it are grayscale; expected '
                    f'one kind (--transform=center-crop makes every image RGB)')
            png = io.BytesIO()
            PIL.Image.fromarray(pixels).save(png, **PNG_SAVE_OPTIONS)
            target.write(name, png.getvalue())
            labels.append(None if item.label is None else [name, item.label])
        if reference is None:
            raise DatasetError(f'--source {source}: every image was skipped by --transform={transform}')
        # Sources label every image or none (a dataset.json that misses images is an error when it is read).
        complete = all(entry is not None for entry in labels)
        target.write(LABELS_FILE, json.dumps({'labels': labels if complete else None}))
        target.commit()
    except OSError as err:
        # Sources report their own read errors as DatasetErrors, so an OSError here comes from writing.
        target.abort()
        raise DatasetError(f'--dest {dest}: cannot write the dataset ({err.strerror or err}); '
                           f'nothing was written') from None
    except BaseException:
        target.abort()
        raise
    return len(labels)
