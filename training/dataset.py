"""Datasets in the dataset_tool.py layout: a ZIP archive or a directory of images with an optional dataset.json.

Items are ``(image, label)``: the image a uint8 CHW numpy array, the label a float32 vector (one-hot for integer
class labels, the stored vector otherwise, empty without labels). Indexing, the ``max_size`` subset and the
``xflip`` mirrors follow NVlabs/edm exactly, so an index names the same image in both implementations.

Memory stays small for large archives: the ZIP central directory is kept as flat numpy arrays (tens of bytes per
image, no per-member Python objects) and members are read with positional reads, which DataLoader workers can
share without reopening or locking anything.
"""

from __future__ import annotations

import io
import lzma
import os
import re
import struct
import zipfile
import zlib
from typing import Any, Optional, Sequence

import numpy as np
import PIL.Image
import torch

import dnnlib
from formats.dataset_files import (LABELS_FILE, DatasetError, ImageHeader, check_same_size, dataset_channels,
                                    decode_image, match_labels, parse_labels_json, read_image_header)

SUBSET_SEED_MODULUS = 1 << 31  # max_size seeds wrap like this so that any integer seed is accepted
# Members named like dataset_tool.py's output come from an archive whose images it made uniform.
DATASET_TOOL_MEMBER = re.compile(rb'\d{5}/img\d{8}\.png')
HEADER_READ_BYTES = 1 << 16  # enough for the header of nearly every image file; larger ones are read whole

# ----------------------------------------------------------------------------
# ZIP archives: a compact table of the central directory; zipfile reads and checks each member.

_MAX_COMMENT = 0xFFFF
_ZIP64_MARKER_32 = 0xFFFFFFFF  # a 32-bit field whose value is in the zip64 extra field
_ZIP64_EXTRA_ID = 0x0001
_FLAG_ENCRYPTED, _FLAG_UTF8 = 0x1, 0x800
# The fixed part of a central directory entry (APPNOTE.TXT 4.3.12, zipfile.structCentralDir); the name follows.
_CENTRAL_ENTRY = np.dtype(dict(
    names=['flags', 'method', 'crc', 'csize', 'usize', 'name_len', 'extra_len', 'comment_len', 'offset'],
    formats=['<u2', '<u2', '<u4', '<u4', '<u4', '<u2', '<u2', '<u2', '<u4'],
    offsets=[8, 10, 16, 20, 24, 28, 30, 32, 42], itemsize=zipfile.sizeCentralDir))
_LOCAL_NAME_LEN, _LOCAL_EXTRA_LEN = 10, 11  # fields of zipfile.structFileHeader
_LOCAL_READ_SLACK = 512  # bytes read past the data so that one read usually covers a local header's name and extra
_ROWS_PER_CHUNK = 1 << 16  # bounds the temporary arrays of vectorised steps over a million names


def _little_endian(table: np.ndarray, positions: np.ndarray, dtype: str) -> np.ndarray:
    """The values of little-endian ``dtype`` stored at byte ``positions`` of a uint8 array."""
    return table[positions[:, np.newaxis] + np.arange(np.dtype(dtype).itemsize)].view(dtype).reshape(-1)


def _central_entries(table: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The fixed parts of the central directory entries at byte positions ``starts`` (structured [N])."""
    entries = np.zeros([starts.size, _CENTRAL_ENTRY.itemsize], dtype=np.uint8)
    columns = np.arange(_CENTRAL_ENTRY.itemsize)
    for first in range(0, starts.size, _ROWS_PER_CHUNK):
        rows = slice(first, first + _ROWS_PER_CHUNK)
        entries[rows] = table[starts[rows, np.newaxis] + columns]
    return entries.view(_CENTRAL_ENTRY).reshape(-1)


class ZipMembers:
    """Name, position and size of every member of a ZIP archive, and reads of single members.

    ``zipfile.ZipFile`` keeps a ZipInfo object per member and reads through a file position that forked
    processes share. Here the central directory becomes flat numpy arrays (a few dozen bytes per member, parsed
    without a Python loop in the usual case), which forked DataLoader workers share without copying; members are
    read with ``os.pread`` (no shared file position) and decompressed and CRC-checked by ``zipfile.ZipExtFile``.
    Pickling drops the descriptor; it is reopened on first use.
    """

    def __init__(self, path: str):
        self.path = path
        self._fd: Optional[int] = None
        try:
            with open(path, 'rb') as stream:
                directory = self._read_central_directory(stream)
        except (OSError, struct.error) as err:
            raise DatasetError(f'{path}: cannot read ZIP archive ({err})') from None
        self._parse(directory)

    def _read_central_directory(self, stream: io.BufferedReader) -> bytes:
        eocd = struct.Struct(zipfile.structEndArchive)
        size = stream.seek(0, os.SEEK_END)
        tail_start = max(0, size - eocd.size - _MAX_COMMENT)
        stream.seek(tail_start)
        tail = stream.read()
        # The end record is followed only by its comment: prefer the signature whose comment length reaches the
        # end of the file exactly, else accept the last one (some writers append junk after the archive).
        pos, fallback = len(tail), None
        while (pos := tail.rfind(zipfile.stringEndArchive, 0, pos)) >= 0:
            if len(tail) - pos >= eocd.size:
                fields = eocd.unpack_from(tail, pos)
                fallback = fallback or (pos, fields)
                if pos + eocd.size + fields[7] == len(tail):
                    break
        else:
            if fallback is None:
                raise DatasetError(f'{self.path}: not a ZIP archive (no end of central directory record)')
            pos, fields = fallback
        eocd_pos = tail_start + pos
        cd_size, cd_offset, record_pos = fields[5], fields[6], eocd_pos

        # A zip64 locator right before the end record points at the 64-bit sizes and offsets.
        locator, record = struct.Struct(zipfile.structEndArchive64Locator), struct.Struct(zipfile.structEndArchive64)
        if eocd_pos >= locator.size + record.size:
            stream.seek(eocd_pos - locator.size)
            if stream.read(locator.size)[:4] == zipfile.stringEndArchive64Locator:
                record_pos = eocd_pos - locator.size - record.size
                stream.seek(record_pos)
                fields = record.unpack(stream.read(record.size))
                if fields[0] != zipfile.stringEndArchive64:
                    raise DatasetError(f'{self.path}: corrupt ZIP64 end of central directory record')
                cd_size, cd_offset = fields[8], fields[9]

        # Bytes prepended to the archive (self-extractor stubs) shift every stored offset by the same amount.
        self._shift = record_pos - cd_size - cd_offset
        stream.seek(cd_offset + self._shift)
        directory = stream.read(cd_size)
        if len(directory) != cd_size:
            raise DatasetError(f'{self.path}: truncated ZIP central directory')
        return directory

    def _entries(self, directory: bytes, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Byte positions of the directory's entries and their fixed parts.

        Every entry starts with a signature and its length fields lead to the next one. When the signature's
        occurrences chain like that from the first byte to the last, they are the entries; bytes inside a name
        or extra field that look like a signature break the chain, and then the entries are walked one by one.
        """
        signature = np.frombuffer(zipfile.stringCentralDir, dtype=np.uint8)
        starts = np.flatnonzero(table[:max(table.size - 3, 0)] == signature[0])
        for k in range(1, 4):
            starts = starts[table[starts + k] == signature[k]]
        fixed = zipfile.sizeCentralDir
        if starts.size and int(starts[-1]) + fixed <= table.size:
            entries = _central_entries(table, starts)
            ends = starts + fixed + entries['name_len'] + entries['extra_len'] + entries['comment_len']
            if starts[0] == 0 and ends[-1] == table.size and np.array_equal(ends[:-1], starts[1:]):
                return starts, entries
        walked, pos = [], 0
        while pos < len(directory):
            if directory[pos:pos + 4] != zipfile.stringCentralDir or pos + fixed > len(directory):
                raise DatasetError(f'{self.path}: corrupt ZIP central directory at byte {pos}')
            walked.append(pos)
            pos += fixed + sum(struct.unpack_from('<3H', directory, pos + _CENTRAL_ENTRY.fields['name_len'][1]))
        if pos > len(directory):
            raise DatasetError(f'{self.path}: corrupt ZIP central directory at byte {walked[-1]} '
                               f'(entry runs past its end)')
        starts = np.array(walked, dtype=np.int64)
        return starts, _central_entries(table, starts)

    @staticmethod
    def _zip64_values(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
        """Replace 32-bit placeholders by the values of the zip64 extra field, which lists only those present."""
        pos = 0
        while pos + 4 <= len(extra):
            tag, length = struct.unpack_from('<2H', extra, pos)
            if tag == _ZIP64_EXTRA_ID:
                values = iter(struct.unpack_from(f'<{length // 8}Q', extra, pos + 4))
                if usize == _ZIP64_MARKER_32:
                    usize = next(values)
                if csize == _ZIP64_MARKER_32:
                    csize = next(values)
                if offset == _ZIP64_MARKER_32:
                    offset = next(values)
                break
            pos += 4 + length
        return usize, csize, offset

    def _parse(self, directory: bytes) -> None:
        table = np.frombuffer(directory, dtype=np.uint8)
        starts, entries = self._entries(directory, table)
        flags, methods, crcs = entries['flags'], entries['method'], entries['crc']
        csizes, usizes, offsets = (entries[key].astype(np.int64) for key in ('csize', 'usize', 'offset'))
        name_starts, name_lens = starts + zipfile.sizeCentralDir, entries['name_len'].astype(np.int64)

        # Names as one fixed-width bytes array (like np.array(list_of_bytes)), gathered in chunks of rows.
        width = max(int(name_lens.max(initial=0)), 1)
        chars = np.zeros([starts.size, width], dtype=np.uint8)
        columns = np.arange(width)
        for first in range(0, starts.size, _ROWS_PER_CHUNK):
            rows = slice(first, first + _ROWS_PER_CHUNK)
            inside = columns < name_lens[rows, np.newaxis]
            chars[rows][inside] = table[(name_starts[rows, np.newaxis] + columns)[inside]]
        names = chars.view(f'S{width}').reshape(-1)

        # Legacy (cp437) names with non-ASCII bytes are rare: recoded one by one.
        legacy = np.flatnonzero(((flags & _FLAG_UTF8) == 0) & (chars >= 0x80).any(axis=1))
        if legacy.size:
            names = names.astype(object)
            for row in legacy:
                names[row] = names[row].decode('cp437').encode('utf8')
            names = np.array(names.tolist(), dtype=bytes)

        # zip64 values (every member past 4 GiB of a large archive) replace the 32-bit placeholders, in the order
        # usize, csize, offset, each present only where its placeholder is. When the zip64 record is the first
        # extra field, as zipfile and most writers put it, they are gathered at once; other layouts one by one.
        placeholders = np.stack([usizes, csizes, offsets]) == _ZIP64_MARKER_32
        zip64 = np.flatnonzero(placeholders.any(axis=0))
        counts = placeholders[:, zip64].sum(axis=0)
        extra_starts = name_starts[zip64] + name_lens[zip64]
        record_end = extra_starts + 4 + 8 * counts
        first = (record_end <= extra_starts + entries['extra_len'][zip64]) & (record_end <= table.size)
        first[first] = ((_little_endian(table, extra_starts[first], '<u2') == _ZIP64_EXTRA_ID) &
                        (_little_endian(table, extra_starts[first] + 2, '<u2') >= 8 * counts[first]))
        cursor = extra_starts[first] + 4
        for values, present in zip((usizes, csizes, offsets), placeholders[:, zip64[first]]):
            values[zip64[first][present]] = _little_endian(table, cursor[present], '<u8')
            cursor += 8 * present
        for row in zip64[~first]:
            extra_start = int(name_starts[row] + name_lens[row])
            extra = directory[extra_start:extra_start + int(entries['extra_len'][row])]
            usizes[row], csizes[row], offsets[row] = self._zip64_values(extra, int(usizes[row]), int(csizes[row]),
                                                                        int(offsets[row]))
        self.names = names
        self._offsets = offsets + self._shift
        self._csizes, self._usizes = csizes, usizes
        self._crcs, self._methods, self._flags = crcs.copy(), methods.copy(), flags.copy()  # not views of entries

    _TABLE = ('names', '_offsets', '_csizes', '_usizes', '_crcs', '_methods', '_flags')

    def keep(self, members: np.ndarray) -> None:
        """Restrict (and reorder) the table to ``members``; later reads use the new positions."""
        for attr in self._TABLE:
            setattr(self, attr, getattr(self, attr)[members])

    def find(self, name: str) -> Optional[int]:
        hits = np.flatnonzero(self.names == name.encode('utf8'))
        return int(hits[0]) if hits.size else None

    def _read_at(self, offset: int, size: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, 'O_BINARY', 0))
        if hasattr(os, 'pread'):
            return os.pread(self._fd, size, offset)
        os.lseek(self._fd, offset, os.SEEK_SET)  # platforms without pread use spawned workers: no shared offsets
        return os.read(self._fd, size)

    def read(self, member: int, limit: Optional[int] = None) -> bytes:
        """Uncompressed bytes of the member at position ``member``; only the first ``limit`` bytes (or fewer)
        when given, which for stored members also limits what is read from disk."""
        offset, size = int(self._offsets[member]), int(self._csizes[member])
        stored = int(self._methods[member]) == zipfile.ZIP_STORED
        if limit is not None and stored:
            size = min(size, limit)
        if self._flags[member] & _FLAG_ENCRYPTED:
            raise DatasetError(f'{self._where(member)}: encrypted ZIP members are not supported')
        header = struct.Struct(zipfile.structFileHeader)
        block = self._read_at(offset, header.size + size + _LOCAL_READ_SLACK)
        if len(block) < header.size or block[:4] != zipfile.stringFileHeader:
            raise DatasetError(f'{self._where(member)}: corrupt ZIP local header')
        fields = header.unpack_from(block)
        start = header.size + fields[_LOCAL_NAME_LEN] + fields[_LOCAL_EXTRA_LEN]
        if len(block) < start + size:
            block += self._read_at(offset + len(block), start + size - len(block))
        if len(block) < start + size:
            raise DatasetError(f'{self._where(member)}: member is truncated')
        if limit is not None and stored:
            return block[start:start + size]
        info = zipfile.ZipInfo(self.names[member].decode('utf8'))
        info.compress_type, info.flag_bits = int(self._methods[member]), int(self._flags[member])
        info.compress_size, info.file_size, info.CRC = size, int(self._usizes[member]), int(self._crcs[member])
        try:
            with zipfile.ZipExtFile(io.BytesIO(block[start:start + size]), 'r', info) as member_file:
                return member_file.read(-1 if limit is None else limit)
        except NotImplementedError as err:
            raise DatasetError(f'{self._where(member)}: {err} (ZIP method {info.compress_type})') from None
        except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError) as err:
            raise DatasetError(f'{self._where(member)}: corrupt compressed data ({err})') from None

    def _where(self, member: int) -> str:
        return f"{self.path}:{self.names[member].decode('utf8')}"

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _fd=None)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# ----------------------------------------------------------------------------
# Indexing, subsets, mirroring, labels and caching, independent of where images are stored.


class ImageDataset(torch.utils.data.Dataset):
    """Base class: subclasses provide ``_load_raw_image(raw_idx)`` (CHW uint8), ``_load_raw_labels()`` and
    ``_describe(raw_idx)`` (a name for error messages) and call this constructor once they can load images."""

    def __init__(self,
        name: str,                      # Shown in logs; the file or folder name.
        raw_shape: Sequence[int],       # [number of images, C, H, W] of the stored images.
        max_size: Optional[int] = None, # Keep a seeded random subset of this many images (before xflip).
        use_labels: bool = False,       # Load labels from dataset.json; otherwise labels are empty vectors.
        xflip: bool = False,            # Append a mirrored copy of every image (after max_size).
        random_seed: int = 0,           # Seed of the max_size subset.
        cache: bool = False,            # Keep decoded images in memory after first use.
    ):
        self._name = name
        self._raw_shape = [int(x) for x in raw_shape]
        self._cache = cache
        num_raw = self._raw_shape[0]

        # max_size keeps a seeded random subset, listed in storage order.
        order = np.arange(num_raw, dtype=np.int64)
        if max_size is not None:
            if max_size < 0:
                raise ValueError(f'max_size must be >= 0, got {max_size}')
            if num_raw > max_size:
                np.random.RandomState(random_seed % SUBSET_SEED_MODULUS).shuffle(order)
                order = np.sort(order[:max_size])

        # xflip appends the whole list once more, mirrored.
        mirrored = np.zeros(order.size, dtype=np.uint8)
        if xflip:
            order = np.concatenate([order, order])
            mirrored = np.concatenate([mirrored, mirrored + 1])
        self._raw_idx, self._xflip = order, mirrored

        labels = self._load_raw_labels() if use_labels else None
        if labels is None:
            labels = np.zeros([num_raw, 0], dtype=np.float32)
        if labels.dtype != np.int64:
            self._label_shape = list(labels.shape[1:])
        else:
            self._label_shape = [int(labels.max()) + 1 if labels.size else 0]
        self._raw_labels = labels

        # The cache holds one row per distinct stored image in use, filled on first access.
        self._cache_rows = np.unique(self._raw_idx) if cache else None
        self._cache_row_of_item = np.searchsorted(self._cache_rows, self._raw_idx) if cache else None
        self._cache_images: Optional[np.ndarray] = None
        self._cache_filled: Optional[np.ndarray] = None

    # Storage interface -------------------------------------------------------

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        raise NotImplementedError

    def _load_raw_labels(self) -> Optional[np.ndarray]:
        raise NotImplementedError

    def _describe(self, raw_idx: int) -> str:
        return f'{self._name}[{raw_idx}]'

    def close(self) -> None:
        """Release open files (they are reopened on next use)."""

    # Images ----------------------------------------------------------------

    def _load_checked(self, raw_idx: int) -> np.ndarray:
        pixels = self._load_raw_image(raw_idx)
        if list(pixels.shape) != self.image_shape:
            raise DatasetError(f'{self._describe(raw_idx)}: image is {"x".join(map(str, pixels.shape))} (CxHxW) but '
                               f'the dataset\'s images are {"x".join(map(str, self.image_shape))}')
        return pixels

    def _stored_image(self, idx: int) -> np.ndarray:
        """CHW image of item ``idx`` before mirroring; a view into the cache when caching, so do not modify."""
        raw_idx = int(self._raw_idx[idx])
        if not self._cache:
            return self._load_checked(raw_idx)
        row = self._cache_row_of_item[idx]
        if self._cache_images is None:
            # np.zeros maps pages lazily: memory grows with the images actually cached, not the table size.
            self._cache_images = np.zeros([self._cache_rows.size, *self.image_shape], dtype=np.uint8)
            self._cache_filled = np.zeros(self._cache_rows.size, dtype=bool)
        if not self._cache_filled[row]:
            self._cache_images[row] = self._load_checked(raw_idx)
            self._cache_filled[row] = True
        return self._cache_images[row]

    def __len__(self) -> int:
        return self._raw_idx.size

    def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        stored = self._stored_image(idx)
        # Always a fresh contiguous array: callers may modify it, and cached pixels must stay intact.
        pixels = (stored[:, :, ::-1] if self._xflip[idx] else stored).copy()
        return pixels, self.get_label(idx)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (uint8 [B, C, H, W]) and labels (float32 [B, label_dim]) of many items at once.

        With ``cache=True`` and the images already cached this is one gather, without per-item Python work.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self._cache:
            rows = self._cache_row_of_item[indices]
            if self._cache_filled is None or not self._cache_filled[rows].all():
                for idx in indices:
                    self._stored_image(int(idx))
            images = self._cache_images[rows]
        else:
            images = np.zeros([indices.size, *self.image_shape], dtype=np.uint8)
            for k, idx in enumerate(indices):
                images[k] = self._load_checked(int(self._raw_idx[idx]))
        mirrored = self._xflip[indices].astype(bool)
        if mirrored.any():
            images[mirrored] = images[mirrored][:, :, :, ::-1]
        return torch.from_numpy(images), torch.from_numpy(self._labels_of(self._raw_idx[indices]))

    # Labels ----------------------------------------------------------------

    def _labels_of(self, raw_indices: np.ndarray) -> np.ndarray:
        """float32 [len(raw_indices), label_dim]: integer labels become one-hot rows."""
        raw = self._raw_labels[raw_indices]
        if raw.dtype != np.int64:
            return raw.astype(np.float32, copy=True)
        onehot = np.zeros([raw.size, *self._label_shape], dtype=np.float32)
        onehot[np.arange(raw.size), raw] = 1
        return onehot

    def get_label(self, idx: int) -> np.ndarray:
        return self._labels_of(self._raw_idx[[idx]])[0]

    def get_details(self, idx: int) -> dnnlib.EasyDict:
        raw_idx = int(self._raw_idx[idx])
        return dnnlib.EasyDict(raw_idx=raw_idx, xflip=bool(self._xflip[idx]), raw_label=self._raw_labels[raw_idx].copy())

    # Properties ------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def image_shape(self) -> list[int]:
        return self._raw_shape[1:]  # a new list each time

    @property
    def num_channels(self) -> int:
        return self.image_shape[0]

    @property
    def resolution(self) -> int:
        _, height, width = self.image_shape
        if height != width:
            raise DatasetError(f'{self._name}: images are {width}x{height}; a resolution needs square images')
        return height

    @property
    def label_shape(self) -> list[int]:
        return list(self._label_shape)

    @property
    def label_dim(self) -> int:
        if len(self._label_shape) != 1:
            raise DatasetError(f'{self._name}: labels have shape {self._label_shape}, not a vector')
        return self._label_shape[0]

    @property
    def has_labels(self) -> bool:
        return any(dim != 0 for dim in self._label_shape)

    @property
    def has_onehot_labels(self) -> bool:
        return self._raw_labels.dtype == np.int64

    # Lifetime --------------------------------------------------------------

    def __getstate__(self) -> dict:
        # Workers and pickles start with an empty cache rather than a copy of a possibly huge array.
        return dict(self.__dict__, _cache_images=None, _cache_filled=None)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# ----------------------------------------------------------------------------
# Images stored in a ZIP archive or a directory tree.


def _has_extension(names: np.ndarray, extensions: set[bytes]) -> np.ndarray:
    """``os.path.splitext(name)[1].lower() in extensions`` for every name of a fixed-width bytes array (bool [N]).

    Vectorised: a Python loop over ImageNet's 1.28M names takes seconds. As in splitext, the extension runs from
    the last dot of the base name (after the last '/') and exists only if a character other than a dot precedes
    that dot in the base name.
    """
    if names.size > _ROWS_PER_CHUNK:
        return np.concatenate([_has_extension(names[first:first + _ROWS_PER_CHUNK], extensions)
                               for first in range(0, names.size, _ROWS_PER_CHUNK)])
    width = names.dtype.itemsize
    chars = np.ascontiguousarray(names).view(np.uint8).reshape(names.size, width)
    columns = np.arange(width)

    def last(mask: np.ndarray) -> np.ndarray:  # column of the last True of each row, -1 for none
        return np.where(mask.any(axis=1), width - 1 - np.argmax(mask[:, ::-1], axis=1), -1)

    length, slash, dot = last(chars != 0) + 1, last(chars == ord('/')), last(chars == ord('.'))
    before_dot = (columns > slash[:, np.newaxis]) & (columns < dot[:, np.newaxis]) & (chars != ord('.'))
    has_dot = (dot > slash) & before_dot.any(axis=1)
    upper = (chars >= ord('A')) & (chars <= ord('Z'))
    lowered = np.where(upper, chars + (ord('a') - ord('A')), chars).astype(np.uint8)
    result = np.zeros(names.size, dtype=bool)
    for size in {len(ext) for ext in extensions}:
        rows = np.flatnonzero(has_dot & (length - dot == size))
        suffixes = lowered[rows[:, np.newaxis], dot[rows, np.newaxis] + np.arange(size)]
        result[rows] = np.isin(suffixes.view(f'S{size}').reshape(-1), [ext for ext in extensions if len(ext) == size])
    return result


Dataset = ImageDataset  # the original's name for the base class


class ImageFolderDataset(ImageDataset):
    """Images (any format PIL reads, found recursively, in sorted name order) of a directory or ZIP archive,
    with labels from ``dataset.json`` at its root when ``use_labels`` is set.

    Pixels are converted as ``dataset_tool.py`` converts them (``formats/dataset_files.py``: 16-bit to 8-bit,
    alpha over black, palette/CMYK to RGB; grayscale repeated to RGB when other images are colour). A directory
    or a ZIP of raw images is checked image by image from the headers when opened (readable, convertible mode,
    one size); an archive whose members are named like dataset_tool.py's output only by its first image.
    """

    def __init__(self,
        path: str | os.PathLike,        # Directory or .zip archive.
        resolution: Optional[int] = None, # Require this image size; None accepts whatever the images have.
        use_labels: bool = False,
        max_size: Optional[int] = None,
        xflip: bool = False,
        random_seed: int = 0,
        cache: bool = False,
    ):
        self._path = os.fspath(path)
        self._zip: Optional[ZipMembers] = None
        self._labels_blob: Optional[bytes] = None  # a ZIP's dataset.json, read before its table keeps only images
        PIL.Image.init()
        extensions = {ext.encode() for ext in PIL.Image.EXTENSION}

        if os.path.isdir(self._path):
            self._type = 'dir'
            found = []
            for root, _dirs, files in os.walk(self._path):
                rel_root = os.path.relpath(root, self._path)
                for file in files:
                    rel = file if rel_root == '.' else os.path.join(rel_root, file)
                    found.append(os.fsencode(rel.replace(os.sep, '/')))
            has_labels_file = os.path.isfile(os.path.join(self._path, LABELS_FILE))
            found = np.array(sorted(found), dtype=bytes) if found else np.zeros(0, dtype='S1')
            names = found[_has_extension(found, extensions)]
        elif self._path.lower().endswith('.zip') and os.path.isfile(self._path):
            self._type = 'zip'
            self._zip = ZipMembers(self._path)
            has_labels_file = self._zip.find(LABELS_FILE) is not None
            self._labels_blob = self._zip.read(self._zip.find(LABELS_FILE)) if has_labels_file and use_labels else None
            members = np.flatnonzero(_has_extension(self._zip.names, extensions))
            members = members[np.argsort(self._zip.names[members], kind='stable')]
            self._zip.keep(members)
            names = self._zip.names
        elif not os.path.exists(self._path):
            raise FileNotFoundError(f'{self._path}: dataset not found (expected a directory or a .zip archive)')
        else:
            raise DatasetError(f'{self._path}: expected a directory or a .zip archive')

        self._image_names = names
        self._has_labels_file = has_labels_file
        if names.size == 0:
            raise DatasetError(f'{self._path}: no image files found (expected PNG/JPEG/... files, as written by '
                               f'dataset_tool.py)')

        self._channels: Optional[int] = None
        if self._type == 'zip' and all(DATASET_TOOL_MEMBER.fullmatch(n) for n in names.tolist()):
            # dataset_tool.py's archives are uniform by construction: the first image sets the shape.
            first = self._load_raw_image(0)
            self._channels, shape = first.shape[0], first.shape
        else:
            # Raw folders (and other archives) may hold anything: every image's header is read now, without
            # decoding, so that a mode without conversion or a size that differs is reported before training
            # starts rather than when the image is first drawn.
            headers = [self._read_header(k) for k in range(names.size)]
            check_same_size(headers, [self._describe(k) for k in range(len(headers))],
                            'expected images of one size (dataset_tool.py --resolution=WxH resizes them)')
            self._channels = dataset_channels(headers)
            shape = (self._channels, headers[0].height, headers[0].width)
        if resolution is not None and shape[1:] != (resolution, resolution):
            raise DatasetError(f'{self._path}: images are {shape[2]}x{shape[1]} (e.g. '
                               f'{self._image_name(0)}) but resolution={resolution} was requested')
        name = os.path.splitext(os.path.basename(os.path.normpath(self._path)))[0]
        super().__init__(name=name, raw_shape=[names.size, *shape], max_size=max_size, use_labels=use_labels,
                         xflip=xflip, random_seed=random_seed, cache=cache)
        self._labels_blob = None  # parsed by now

    def _image_name(self, raw_idx: int) -> str:
        return os.fsdecode(self._image_names[raw_idx]) if self._type == 'dir' else self._image_names[raw_idx].decode('utf8')

    def _describe(self, raw_idx: int) -> str:
        return f'{self._path}:{self._image_name(raw_idx)}'

    def _read_header(self, raw_idx: int) -> ImageHeader:
        if self._type == 'dir':
            return read_image_header(os.path.join(self._path, os.fsdecode(self._image_names[raw_idx])),
                                     self._describe(raw_idx))
        head = self._zip.read(raw_idx, limit=HEADER_READ_BYTES)
        try:
            return read_image_header(io.BytesIO(head), self._describe(raw_idx))
        except DatasetError:
            if len(head) < HEADER_READ_BYTES:
                raise
            return read_image_header(io.BytesIO(self._zip.read(raw_idx)), self._describe(raw_idx))

    def _read_bytes(self, raw_idx: int) -> bytes:
        if self._type == 'zip':
            return self._zip.read(raw_idx)
        with open(os.path.join(self._path, os.fsdecode(self._image_names[raw_idx])), 'rb') as stream:
            return stream.read()

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        pixels = decode_image(self._read_bytes(raw_idx), self._describe(raw_idx), self._channels)
        if pixels.ndim == 2:
            return pixels[np.newaxis]  # HW -> 1HW
        return pixels.transpose(2, 0, 1)  # HWC -> CHW

    def _load_raw_labels(self) -> np.ndarray:
        where = os.path.join(self._path, LABELS_FILE)
        if not self._has_labels_file:
            raise DatasetError(f'{self._path}: there is no {LABELS_FILE} with labels (train.py does not read class '
                               f'subfolders as labels; dataset_tool.py --source=FOLDER makes a labelled dataset)')
        if self._type == 'zip':
            blob = self._labels_blob
        else:
            with open(where, 'rb') as stream:
                blob = stream.read()
        table = parse_labels_json(blob, where)
        if table is None:
            raise DatasetError(f'{where}: "labels": null, the dataset was made without labels (dataset_tool.py '
                               f'labels from a dataset.json or at least two class subfolders in its source)')
        labels, _notes = match_labels(table, [self._image_name(k) for k in range(self._image_names.size)], where)
        try:
            array = np.array(labels)
        except ValueError as err:
            raise DatasetError(f'{where}: labels must all be integers or all vectors of one length ({err})') from None
        if array.ndim == 1 and array.dtype.kind in 'biuf':
            if array.dtype.kind == 'f' and not np.all(array == np.round(array)) or np.any(array < 0):
                raise DatasetError(f'{where}: class labels must be non-negative integers')
            return array.astype(np.int64)
        if array.ndim == 2 and array.dtype.kind in 'biuf':
            return array.astype(np.float32)
        raise DatasetError(f'{where}: labels must be integers (classes) or numeric vectors, got {array.dtype} {array.shape}')

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
