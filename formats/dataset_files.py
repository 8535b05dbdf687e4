"""What the files of an image dataset hold: pixels of every image mode, image headers, and dataset.json labels.

``dataset_tool.py`` (which writes datasets) and ``training/dataset.py`` (which reads datasets and raw image
folders for ``train.py --data``) both go through this module, so an image gives the same pixels and a
``dataset.json`` the same labels in either. It needs neither torch nor click.

Image modes (Pillow's names) become 8-bit grayscale or RGB like this:

==========================================  ===================================================================
``L``, ``RGB``                               kept
``1``                                        grayscale 0 / 255
``I;16``, ``I;16L``, ``I;16B``, ``I;16N``    16-bit grayscale: the high byte, ``v >> 8`` (the scaling Pillow
                                             itself applies when it opens 16-bit colour PNGs as ``RGB``)
``I``                                        32-bit integers, read as 16-bit samples (older Pillow opens 16-bit
                                             PNGs so): ``v >> 8``; values outside 0..65535 are refused
``P`` (palette), ``CMYK``, ``YCbCr``,        RGB through Pillow's conversion
``HSV``, ``LAB``, ``RGBX``
``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``,  composited over black: each colour value times alpha / 255,
``P`` with a transparent colour              rounded (premultiplied ``La``/``RGBa`` keep their stored values)
``F`` and anything else                      refused: float or exotic pixels have no standard 8-bit scaling
==========================================  ===================================================================

A dataset whose images convert to both grayscale and RGB is RGB: grayscale images are repeated into three
equal channels (lossless). Only a header read is needed to know an image's size and channel count, except for
mode ``I``, whose value range is checked by decoding it.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import unicodedata
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Optional, Sequence

import numpy as np
import PIL.Image

LABELS_FILE = 'dataset.json'
MAX_EXAMPLES = 3  # file names quoted in a mismatch report
# What reading a damaged image file can raise (zlib.error: a corrupt member read straight from a ZIP).
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zlib.error, PIL.Image.DecompressionBombError)

_GRAY_MODES = {'L', '1', 'I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'LA', 'La'}
_COLOUR_MODES = {'RGB', 'RGBX', 'P', 'PA', 'CMYK', 'YCbCr', 'HSV', 'LAB', 'RGBA', 'RGBa'}
_SIXTEEN_BIT_MODES = {'I;16', 'I;16L', 'I;16B', 'I;16N', 'I'}
_SIXTEEN_BIT_SHIFT = 8  # 16-bit samples keep their high byte
_UINT16_MAX = 65535
_ALPHA_MAX = 255
EXPECTED_MODES = ('8-bit grayscale or colour (L, RGB), 1-bit, 16-bit grayscale (I;16), palette, CMYK/YCbCr/HSV/LAB, '
                  'or one of these with alpha')


class DatasetError(ValueError):
    """Dataset content that cannot be used; the message names the path and what was expected."""

    def one_line(self) -> str:
        """The message as one line. A DataLoader worker re-raises the error with the worker's traceback in front
        of the original message; the original is its last line, after the class name."""
        lines = [line for line in str(self).strip().splitlines() if line.strip()]
        last = lines[-1] if lines else ''
        name = f'{type(self).__module__}.{type(self).__name__}: '
        return last.split(name, 1)[1] if name in last else last.removeprefix(f'{type(self).__name__}: ')


# ----------------------------------------------------------------------------
# Pixels.


def image_channels(image: PIL.Image.Image, where: str) -> int:
    """Channels (1 or 3) that :func:`image_pixels` gives for ``image``, known from its mode alone.

    Raises :class:`DatasetError` (naming ``where``) for modes that have no 8-bit conversion, such as ``F``.
    """
    if image.mode in _GRAY_MODES:
        return 1
    if image.mode in _COLOUR_MODES:
        return 3
    kind = '32-bit float pixels' if image.mode == 'F' else 'pixels'
    raise DatasetError(f'{where}: image mode {image.mode} ({kind}) has no standard 8-bit conversion; expected '
                       f'{EXPECTED_MODES}')


def gray_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """[H, W] uint8 -> [H, W, 3] with three equal channels; [H, W, 3] is returned as is."""
    return np.repeat(pixels[:, :, np.newaxis], 3, axis=2) if pixels.ndim == 2 else pixels


def _over_black(pixels: np.ndarray) -> np.ndarray:
    """HxWx(K+1) uint8 colour + alpha -> HxWxK (or HxW for K = 1), colour * alpha / 255 rounded to nearest."""
    colour, alpha = pixels[..., :-1].astype(np.uint32), pixels[..., -1:].astype(np.uint32)
    out = ((colour * alpha + _ALPHA_MAX // 2) // _ALPHA_MAX).astype(np.uint8)
    return out[..., 0] if out.shape[-1] == 1 else out


def image_pixels(image: PIL.Image.Image, where: str, channels: Optional[int] = None) -> np.ndarray:
    """uint8 pixels of ``image`` by the module's table: [H, W] for grayscale, [H, W, 3] for colour.

    ``channels=3`` repeats grayscale into three equal channels (a dataset with some colour images); ``channels=1``
    refuses colour images. Raises :class:`DatasetError` naming ``where`` for modes without a conversion, 32-bit
    integer values outside 0..65535, or colour where grayscale was required. Decodes the image.
    """
    own = image_channels(image, where)
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image)
        if mode == 'I' and values.size and (values.min() < 0 or values.max() > _UINT16_MAX):
            raise DatasetError(f'{where}: 32-bit integer pixels range over {values.min()}..{values.max()}; expected '
                               f'16-bit samples 0..{_UINT16_MAX} (they are scaled by >> {_SIXTEEN_BIT_SHIFT})')
        pixels = (values.astype(np.uint32) >> _SIXTEEN_BIT_SHIFT).astype(np.uint8)
    elif mode == '1':
        pixels = np.asarray(image.convert('L'))
    elif mode in ('La', 'RGBa'):
        pixels = np.asarray(image)[..., :-1]  # premultiplied: the stored values are already over black
        pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    elif mode == 'LA' or mode in ('RGBA', 'PA') or (mode == 'P' and 'transparency' in image.info):
        pixels = _over_black(np.asarray(image if mode in ('LA', 'RGBA') else image.convert('RGBA')))
    elif mode in ('L', 'RGB'):
        pixels = np.asarray(image)
    else:
        pixels = np.asarray(image.convert('RGB'))
    if channels == 3 and own == 1:
        pixels = gray_to_rgb(pixels)
    elif channels == 1 and own == 3:
        raise DatasetError(f'{where}: image is colour (mode {mode}) but the dataset\'s images are grayscale')
    return np.ascontiguousarray(pixels)


@dataclass
class ImageHeader:
    width: int
    height: int
    channels: int  # 1 or 3, after conversion
    mode: str


def read_image_header(source: str | os.PathLike | BinaryIO, where: str) -> ImageHeader:
    """Size and converted channel count of one image file from its header (mode ``I`` is decoded to check its
    range). Raises :class:`DatasetError` naming ``where`` if the file is not a readable image or its mode cannot
    be converted."""
    try:
        with PIL.Image.open(source) as image:
            header = ImageHeader(image.width, image.height, image_channels(image, where), image.mode)
            if image.mode == 'I':
                image_pixels(image, where)
    except _READ_ERRORS as err:
        if isinstance(err, DatasetError):
            raise
        raise DatasetError(f'{where}: cannot read image ({err})') from None
    return header


def decode_image(data: bytes | str | os.PathLike, where: str, channels: Optional[int] = None) -> np.ndarray:
    """:func:`image_pixels` of an encoded image (bytes or a path); unreadable files raise :class:`DatasetError`."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        with PIL.Image.open(source) as image:
            return image_pixels(image, where, channels)
    except _READ_ERRORS as err:
        if isinstance(err, DatasetError):
            raise
        raise DatasetError(f'{where}: cannot read image ({err})') from None


def dataset_channels(headers: Sequence[ImageHeader]) -> int:
    """3 if any image is colour, else 1."""
    return max((h.channels for h in headers), default=1)


def check_same_size(headers: Sequence[ImageHeader], names: Sequence[str], hint: str) -> None:
    """Raise :class:`DatasetError` naming the first image whose size differs from the first image's."""
    if not headers:
        return
    first = headers[0]
    for header, name in zip(headers, names):
        if (header.width, header.height) != (first.width, first.height):
            raise DatasetError(f'{name}: image is {header.width}x{header.height} but {names[0]} is '
                               f'{first.width}x{first.height}; {hint}')


# ----------------------------------------------------------------------------
# dataset.json labels.


def normalize_name(name: Any) -> str:
    """The spelling of a relative image name that dataset.json entries and files are compared by: '/'
    separators, no './' or empty components, 'a/../b' resolved (``'.\\\\cat\\\\0.png'`` -> ``'cat/0.png'``), and
    Unicode in composed form (macOS file systems store decomposed accents)."""
    text = unicodedata.normalize('NFC', str(name)).replace('\\', '/')
    normal = posixpath.normpath(text) if text else text
    return '' if normal == '.' else normal


def parse_labels_json(blob: bytes, where: str) -> Optional[dict[str, Any]]:
    """``{normalised name: label}`` of a dataset.json, or None when it says ``"labels": null``.

    Raises :class:`DatasetError` for another structure, or for two entries that name one image (after
    normalisation) with different labels.
    """
    try:
        entries = json.loads(blob)['labels']
        if entries is None:
            return None
        table: dict[str, Any] = {}
        for name, label in entries:
            key = normalize_name(name)
            if key in table and table[key] != label:
                raise DatasetError(f'{where}: {name!r} is labelled twice, {table[key]!r} and {label!r}')
            table[key] = label
        return table
    except (ValueError, KeyError, TypeError) as err:
        if isinstance(err, DatasetError):
            raise
        raise DatasetError(f'{where}: expected {{"labels": [[name, label], ...] or null}} '
                           f'({type(err).__name__}: {err})') from None


def _examples(names: Sequence[str]) -> str:
    shown = ', '.join(repr(n) for n in list(names)[:MAX_EXAMPLES])
    return shown + (', ...' if len(names) > MAX_EXAMPLES else '')


def _common_prefix_fix(unmatched: list[str], free: set[str]) -> Optional[tuple[dict[str, str], str]]:
    """Renaming of every unmatched entry to a free image name by removing or adding one leading folder path that
    is the same for all entries (names written relative to another root), and its description; None when no
    such path exists or several do."""
    stripped = [n.lstrip('/') for n in unmatched]
    parts = stripped[0].split('/')
    candidates = [('remove', '/'.join(parts[:cut]) + '/') for cut in range(1, len(parts))]
    candidates += [('add', image[:-len(stripped[0])]) for image in free
                   if image.endswith('/' + stripped[0])]
    fixes = []
    for action, prefix in candidates:
        if action == 'remove':
            renamed = {n: s[len(prefix):] for n, s in zip(unmatched, stripped) if s.startswith(prefix)}
        else:
            renamed = {n: prefix + s for n, s in zip(unmatched, stripped)}
        targets = set(renamed.values())
        if len(renamed) == len(unmatched) and targets <= free and len(targets) == len(renamed):
            fixes.append((renamed, f'{action}s the leading folder {prefix!r}'))
    return fixes[0] if len(fixes) == 1 else None


def match_labels(table: dict[str, Any], image_names: Sequence[str], where: str,
                 num_used: Optional[int] = None) -> tuple[list[Any], list[str]]:
    """Label of every image (in ``image_names`` order) from a table of :func:`parse_labels_json`, and notes on
    the unambiguous re-spellings that were needed (names relative to another folder, letter case).

    Every image (or the first ``num_used``) must have a label and every entry must name an image; otherwise
    :class:`DatasetError` gives the counts and a few examples of both kinds.
    """
    images = {normalize_name(n): k for k, n in enumerate(image_names)}
    labels: list[Any] = [None] * len(image_names)
    labelled = [False] * len(image_names)
    unmatched = []
    for name, label in table.items():
        k = images.get(name)
        if k is None:
            unmatched.append(name)
        elif label is not None:  # [name, null] leaves the image unlabelled
            labels[k], labelled[k] = label, True

    notes = []
    free = {n for n, k in images.items() if not labelled[k]}
    if unmatched and free:
        fix = _common_prefix_fix(unmatched, free)
        if fix is not None:
            renamed = fix[0]
            notes.append(f'{where}: names are relative to another folder; matching {fix[1]} '
                         f'(e.g. {_examples(sorted(renamed))[:200]})')
        else:
            # Letter case only, and only where exactly one entry and one image share the case-folded name.
            entries_by_fold: dict[str, list[str]] = {}
            for n in unmatched:
                entries_by_fold.setdefault(n.casefold(), []).append(n)
            images_by_fold: dict[str, list[str]] = {}
            for n in free:
                images_by_fold.setdefault(n.casefold(), []).append(n)
            renamed = {e[0]: images_by_fold[f][0] for f, e in entries_by_fold.items()
                       if len(e) == 1 and len(images_by_fold.get(f, ())) == 1}
            if renamed:
                notes.append(f'{len(renamed)} name(s) in {where} differ from the image files only in letter case, '
                             f'e.g. {_examples(sorted(renamed))}; matched regardless of case')
        for entry, image in renamed.items():
            k = images[image]
            labels[k], labelled[k] = table[entry], table[entry] is not None
        unmatched = [n for n in unmatched if n not in renamed]

    used = len(image_names) if num_used is None else min(num_used, len(image_names))
    missing = [image_names[k] for k in range(used) if not labelled[k]]
    if missing or unmatched:
        parts = []
        if missing:
            parts.append(f'{len(missing)} of {used} images have no label (e.g. {_examples(missing)})')
        if unmatched:
            parts.append(f'{len(unmatched)} of {len(table)} entries name no image '
                         f'(e.g. {_examples(sorted(unmatched))})')
        raise DatasetError(f'{where}: {"; ".join(parts)}; expected one [name, label] entry per image, named by its '
                           f'path relative to the dataset root')
    return labels, notes
