"""Datasets in the dataset_tool.py layout: a ZIP archive or a directory of images with an optional dataset.json.

Items are ``(image, label)``: the image a uint8 CHW numpy array, the label a float32 vector (one-hot for integer
class labels, the stored vector otherwise, empty without labels). Indexing, the ``max_size`` subset and the
``xflip`` mirrors follow NVlabs/edm exactly, so an index names the same image in both implementations.

Memory stays small for large archives: the ZIP central directory is kept as flat numpy arrays (tens of bytes per
image, no per-member Python objects) and members are read with positional reads, which DataLoader workers can
share without reopening or locking anything.
"""

from __future__ import annotations

import array
import io
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
from training.dataset_files import (LABELS_FILE, DatasetError, ImageHeader, check_same_size, dataset_channels,
                                    decode_image, match_labels, parse_labels_json, read_image_header)

SUBSET_SEED_MODULUS = 1 << 31  # max_size seeds wrap like this so that any integer seed is accepted
# Members named like dataset_tool.py's output come from an archive whose images it made uniform.
DATASET_TOOL_MEMBER = re.compile(rb'\d{5}/img\d{8}\.png')
HEADER_READ_BYTES = 1 << 16  # enough for the header of nearly every image file; larger ones are read whole

# ----------------------------------------------------------------------------
# ZIP archives read through their central directory.

_EOCD = struct.Struct('<4s4H2LH')               # end of central directory record (22 bytes)
_ZIP64_LOCATOR = struct.Struct('<4sLQL')        # zip64 end-of-central-directory locator (20 bytes)
_ZIP64_EOCD = struct.Struct('<4sQ2H2L4Q')       # zip64 end of central directory record (56 bytes)
_CENTRAL_HEADER = struct.Struct('<4s6H3L5H2L')  # one central directory entry before its name (46 bytes)
_LOCAL_HEADER = struct.Struct('<4s5H3L2H')      # local file header before its name (30 bytes)
_EOCD_SIG, _ZIP64_LOCATOR_SIG, _ZIP64_EOCD_SIG = b'PK\x05\x06', b'PK\x06\x07', b'PK\x06\x06'
_CENTRAL_SIG, _LOCAL_SIG = b'PK\x01\x02', b'PK\x03\x04'
_MAX_COMMENT = 0xFFFF
_ZIP64_MARKER_32 = 0xFFFFFFFF  # a 32-bit field whose value is in the zip64 extra field
_ZIP64_EXTRA_ID = 0x0001
_FLAG_ENCRYPTED, _FLAG_UTF8 = 0x1, 0x800
_STORED, _DEFLATED = 0, 8
_LOCAL_READ_SLACK = 512  # bytes read past the data so that one read usually covers a local header's name and extra


class ZipMembers:
    """Name, position and size of every member of a ZIP archive, and reads of single members.

    ``zipfile.ZipFile`` keeps a ZipInfo object per member (about half a gigabyte for ImageNet's 1.28M images)
    and reads through a file position that processes forked from it share. Here a member costs a few dozen bytes
    of numpy arrays, and ``os.pread`` needs no file position, so forked workers can use the descriptor they
    inherit. Pickling drops the descriptor; it is reopened on first use.
    """

    def __init__(self, path: str):
        self.path = path
        self._fd: Optional[int] = None
        self._fallback: Optional[zipfile.ZipFile] = None
        try:
            with open(path, 'rb') as stream:
                directory = self._read_central_directory(stream)
        except (OSError, struct.error) as err:
            raise DatasetError(f'{path}: cannot read ZIP archive ({err})') from None
        self._parse(directory)

    def _read_central_directory(self, stream: io.BufferedReader) -> bytes:
        size = stream.seek(0, os.SEEK_END)
        tail_start = max(0, size - _EOCD.size - _MAX_COMMENT)
        stream.seek(tail_start)
        tail = stream.read()
        # The end record is followed only by its comment: prefer the signature whose comment length reaches the
        # end of the file exactly, else accept the last one (some writers append junk after the archive).
        pos, fallback = len(tail), None
        while (pos := tail.rfind(_EOCD_SIG, 0, pos)) >= 0:
            if len(tail) - pos >= _EOCD.size:
                fields = _EOCD.unpack_from(tail, pos)
                fallback = fallback or (pos, fields)
                if pos + _EOCD.size + fields[7] == len(tail):
                    break
        else:
            if fallback is None:
                raise DatasetError(f'{self.path}: not a ZIP archive (no end of central directory record)')
            pos, fields = fallback
        eocd_pos = tail_start + pos
        cd_size, cd_offset, record_pos = fields[5], fields[6], eocd_pos

        # A zip64 locator right before the end record points at the 64-bit sizes and offsets.
        if eocd_pos >= _ZIP64_LOCATOR.size + _ZIP64_EOCD.size:
            stream.seek(eocd_pos - _ZIP64_LOCATOR.size)
            if stream.read(_ZIP64_LOCATOR.size)[:4] == _ZIP64_LOCATOR_SIG:
                record_pos = eocd_pos - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size
                stream.seek(record_pos)
                record = _ZIP64_EOCD.unpack(stream.read(_ZIP64_EOCD.size))
                if record[0] != _ZIP64_EOCD_SIG:
                    raise DatasetError(f'{self.path}: corrupt ZIP64 end of central directory record')
                cd_size, cd_offset = record[8], record[9]

        # Bytes prepended to the archive (self-extractor stubs) shift every stored offset by the same amount.
        self._shift = record_pos - cd_size - cd_offset
        stream.seek(cd_offset + self._shift)
        directory = stream.read(cd_size)
        if len(directory) != cd_size:
            raise DatasetError(f'{self.path}: truncated ZIP central directory')
        return directory

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
        # array.array rather than lists: no Python int object per value while a large directory is parsed.
        names, offsets, sizes, methods, flags = [], array.array('q'), array.array('q'), array.array('H'), array.array('H')
        pos = 0
        while pos < len(directory):
            (sig, _made_by, _needed, flag, method, _time, _date, _crc, csize, usize, name_len, extra_len,
             comment_len, _disk, _internal, _external, offset) = _CENTRAL_HEADER.unpack_from(directory, pos)
            if sig != _CENTRAL_SIG:
                raise DatasetError(f'{self.path}: corrupt ZIP central directory at byte {pos}')
            name_start = pos + _CENTRAL_HEADER.size
            extra_start = name_start + name_len
            name = directory[name_start:extra_start]
            if _ZIP64_MARKER_32 in (csize, usize, offset):
                usize, csize, offset = self._zip64_values(directory[extra_start:extra_start + extra_len], usize, csize, offset)
            if not flag & _FLAG_UTF8 and not name.isascii():
                name = name.decode('cp437').encode('utf8')  # legacy encoding of names without the UTF-8 flag
            names.append(name)
            offsets.append(offset)
            sizes.append(csize)
            methods.append(method)
            flags.append(flag)
            pos = extra_start + extra_len + comment_len
        self.names = np.array(names, dtype=bytes) if names else np.zeros(0, dtype='S1')
        self._offsets = np.frombuffer(offsets, dtype=np.int64) + self._shift
        self._sizes = np.frombuffer(sizes, dtype=np.int64).copy()
        self._methods = np.frombuffer(methods, dtype=np.uint16).copy()
        self._flags = np.frombuffer(flags, dtype=np.uint16).copy()

    def keep(self, members: np.ndarray) -> None:
        """Restrict (and reorder) the table to ``members``; later reads use the new positions."""
        for attr in ('names', '_offsets', '_sizes', '_methods', '_flags'):
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
        offset, size = int(self._offsets[member]), int(self._sizes[member])
        method, flag = int(self._methods[member]), int(self._flags[member])
        if limit is not None and method == _STORED:
            size = min(size, limit)
        if flag & _FLAG_ENCRYPTED:
            raise DatasetError(f'{self._where(member)}: encrypted ZIP members are not supported')
        block = self._read_at(offset, _LOCAL_HEADER.size + size + _LOCAL_READ_SLACK)
        if len(block) < _LOCAL_HEADER.size or block[:4] != _LOCAL_SIG:
            raise DatasetError(f'{self._where(member)}: corrupt ZIP local header')
        header = _LOCAL_HEADER.unpack_from(block)
        start = _LOCAL_HEADER.size + header[9] + header[10]
        if len(block) < start + size:
            block += self._read_at(offset + len(block), start + size - len(block))
        data = block[start:start + size]
        if len(data) != size:
            raise DatasetError(f'{self._where(member)}: member is truncated')
        if method == _STORED:
            return data
        if method == _DEFLATED:
            try:
                if limit is not None:
                    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data, limit)
                return zlib.decompress(data, -zlib.MAX_WBITS)
            except zlib.error as err:
                raise DatasetError(f'{self._where(member)}: corrupt compressed data ({err})') from None
        # Rare compression methods (bzip2, lzma): let zipfile handle them.
        if self._fallback is None:
            self._fallback = zipfile.ZipFile(self.path)
        return self._fallback.read(self.names[member].decode('utf8'))

    def _where(self, member: int) -> str:
        return f"{self.path}:{self.names[member].decode('utf8')}"

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._fallback is not None:
            self._fallback.close()
            self._fallback = None

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _fd=None, _fallback=None)

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


Dataset = ImageDataset  # the original's name for the base class


class ImageFolderDataset(ImageDataset):
    """Images (any format PIL reads, found recursively, in sorted name order) of a directory or ZIP archive,
    with labels from ``dataset.json`` at its root when ``use_labels`` is set.

    Pixels are converted as ``dataset_tool.py`` converts them (``training/dataset_files.py``: 16-bit to 8-bit,
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

        def is_image(name: bytes) -> bool:
            return os.path.splitext(name)[1].lower() in extensions

        if os.path.isdir(self._path):
            self._type = 'dir'
            found = []
            for root, _dirs, files in os.walk(self._path):
                rel_root = os.path.relpath(root, self._path)
                for file in files:
                    rel = file if rel_root == '.' else os.path.join(rel_root, file)
                    found.append(os.fsencode(rel.replace(os.sep, '/')))
            has_labels_file = os.path.isfile(os.path.join(self._path, LABELS_FILE))
            names = np.array(sorted(name for name in found if is_image(name)), dtype=bytes)
        elif self._path.lower().endswith('.zip') and os.path.isfile(self._path):
            self._type = 'zip'
            self._zip = ZipMembers(self._path)
            has_labels_file = self._zip.find(LABELS_FILE) is not None
            self._labels_blob = self._zip.read(self._zip.find(LABELS_FILE)) if has_labels_file and use_labels else None
            image_mask = np.fromiter(map(is_image, self._zip.names.tolist()), dtype=bool, count=self._zip.names.size)
            members = np.flatnonzero(image_mask)
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
