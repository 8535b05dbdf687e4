"""training/dataset.py: items, labels, max_size/xflip semantics, caching, workers, the ZIP reader and errors."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import dnnlib
from training.dataset import DatasetError, ImageFolderDataset, ZipMembers

# ----------------------------------------------------------------------------
# Helpers.


def png_bytes(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    PIL.Image.fromarray(pixels).save(out, format='png', compress_level=0)
    return out.getvalue()


def make_images(count: int, size: int = 8, channels: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (size, size) if channels == 1 else (size, size, channels)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for _ in range(count)]


def as_chw(pixels: np.ndarray) -> np.ndarray:
    return pixels[np.newaxis] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def write_zip(path: Path, images: list[np.ndarray], labels=None, **zip_kwargs) -> list[str]:
    names = [f'{k // 1000:05d}/img{k:08d}.png' for k in range(len(images))]
    with zipfile.ZipFile(path, 'w', **zip_kwargs) as zf:
        for name, pixels in zip(names, images):
            zf.writestr(name, png_bytes(pixels))
        if labels is not None:
            zf.writestr('dataset.json', json.dumps({'labels': [[n, l] for n, l in zip(names, labels)]}))
    return names


def write_folder(root: Path, images: list[np.ndarray], labels=None) -> list[str]:
    names = [f'{k // 1000:05d}/img{k:08d}.png' for k in range(len(images))]
    for name, pixels in zip(names, images):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(png_bytes(pixels))
    if labels is not None:
        (root / 'dataset.json').write_text(json.dumps({'labels': [[n, l] for n, l in zip(names, labels)]}))
    return names


@pytest.fixture
def labelled_zip(tmp_path: Path) -> tuple[Path, list[np.ndarray], list[int]]:
    images = make_images(12)
    labels = [k % 4 for k in range(12)]
    write_zip(tmp_path / 'data.zip', images, labels)
    return tmp_path / 'data.zip', images, labels


# ----------------------------------------------------------------------------
# Items and properties.


def test_golden_cifar_zip_items(golden_dir: Path) -> None:
    path = golden_dir / 'dataset_tool' / 'cifar10.output.zip'
    ds = ImageFolderDataset(path, use_labels=True)
    assert (len(ds), ds.name, ds.resolution, ds.num_channels) == (100, 'cifar10.output', 32, 3)
    assert ds.image_shape == [3, 32, 32] and ds.label_shape == [10] and ds.label_dim == 10
    assert ds.has_labels and ds.has_onehot_labels
    with zipfile.ZipFile(path) as zf:
        labels = dict(json.loads(zf.read('dataset.json'))['labels'])
        for idx in (0, 37, 99):
            name = f'00000/img{idx:08d}.png'
            image, label = ds[idx]
            assert image.dtype == np.uint8 and image.flags.c_contiguous
            np.testing.assert_array_equal(image, as_chw(np.asarray(PIL.Image.open(io.BytesIO(zf.read(name))))))
            assert label.dtype == np.float32 and label.tolist() == np.eye(10)[labels[name]].tolist()
    ds.close()


def test_folder_and_zip_agree_and_names(tmp_path: Path, labelled_zip) -> None:
    path, images, labels = labelled_zip
    write_folder(tmp_path / 'folder', images, labels)
    a = ImageFolderDataset(path, use_labels=True)
    b = ImageFolderDataset(str(tmp_path / 'folder') + '/', use_labels=True)
    assert (a.name, b.name) == ('data', 'folder')
    for idx in range(len(images)):
        np.testing.assert_array_equal(a[idx][0], as_chw(images[idx]))
        np.testing.assert_array_equal(b[idx][0], as_chw(images[idx]))
        np.testing.assert_array_equal(a[idx][1], b[idx][1])
        assert a.get_details(idx).raw_label == labels[idx]


def test_generated_png_folder_without_dataset_json(tmp_path: Path) -> None:
    # generate.py output: 000000.png ... (here grayscale, in a subdirectory per 1000 seeds).
    images = make_images(5, size=16, channels=1)
    for seed, pixels in enumerate(images):
        (tmp_path / '000000').mkdir(exist_ok=True)
        PIL.Image.fromarray(pixels).save(tmp_path / '000000' / f'{seed:06d}.png')
    (tmp_path / 'notes.txt').write_text('not an image')
    ds = ImageFolderDataset(tmp_path, resolution=16)
    assert len(ds) == 5 and ds.image_shape == [1, 16, 16] and ds.resolution == 16
    assert ds.label_shape == [0] and ds.label_dim == 0 and not ds.has_labels
    image, label = ds[4]
    np.testing.assert_array_equal(image, images[4][np.newaxis])
    assert label.shape == (0,) and label.dtype == np.float32


def test_vector_labels_are_float32(tmp_path: Path) -> None:
    write_zip(tmp_path / 'v.zip', make_images(3), labels=[[0.5, 1.0], [2, 3], [-1, 0.25]])
    ds = ImageFolderDataset(tmp_path / 'v.zip', use_labels=True)
    assert ds.label_shape == [2] and not ds.has_onehot_labels
    assert ds[2][1].dtype == np.float32 and ds[2][1].tolist() == [-1.0, 0.25]
    unlabelled = ImageFolderDataset(tmp_path / 'v.zip')  # labels present but not requested
    assert unlabelled.label_dim == 0 and unlabelled[0][1].shape == (0,)


def test_construct_from_training_kwargs(labelled_zip) -> None:
    path, images, _ = labelled_zip
    kwargs = dict(class_name='training.dataset.ImageFolderDataset', path=str(path), use_labels=True, xflip=True,
                  cache=True, resolution=8, max_size=None)
    ds = dnnlib.util.construct_class_by_name(**kwargs)
    assert len(ds) == 2 * len(images) and ds.label_dim == 4


# ----------------------------------------------------------------------------
# max_size, xflip and the cache.


def test_max_size_subset_is_the_originals(labelled_zip) -> None:
    path, images, _ = labelled_zip
    for seed in (0, 1, 2**40 + 3):
        ds = ImageFolderDataset(path, max_size=5, random_seed=seed)
        expected = np.arange(len(images))
        np.random.RandomState(seed % (1 << 31)).shuffle(expected)
        assert ds._raw_idx.tolist() == sorted(expected[:5].tolist())
        for idx, raw in enumerate(ds._raw_idx):
            np.testing.assert_array_equal(ds[idx][0], as_chw(images[raw]))
    assert ImageFolderDataset(path, max_size=5, random_seed=0)._raw_idx.tolist() != \
        ImageFolderDataset(path, max_size=5, random_seed=1)._raw_idx.tolist()
    assert len(ImageFolderDataset(path, max_size=100)) == len(images)  # larger than the dataset: everything, in order


def test_xflip_appends_mirrored_copies(labelled_zip) -> None:
    path, images, labels = labelled_zip
    ds = ImageFolderDataset(path, use_labels=True, xflip=True, max_size=4, random_seed=3)
    assert len(ds) == 8
    for idx in range(4):
        plain, label = ds[idx]
        mirrored, mirrored_label = ds[idx + 4]
        np.testing.assert_array_equal(mirrored, plain[:, :, ::-1])
        np.testing.assert_array_equal(label, mirrored_label)
        assert ds.get_details(idx + 4).xflip and not ds.get_details(idx).xflip
        assert ds.get_details(idx + 4).raw_idx == ds.get_details(idx).raw_idx


def test_cache_and_get_batch_match_items(labelled_zip) -> None:
    path, images, _ = labelled_zip
    plain = ImageFolderDataset(path, use_labels=True, xflip=True)
    cached = ImageFolderDataset(path, use_labels=True, xflip=True, cache=True)
    order = np.random.default_rng(0).permutation(len(plain))
    for ds in (plain, cached):
        for _ in range(2):  # the second pass reads from the cache
            batch, labels = ds.get_batch(order)
            assert batch.dtype == torch.uint8 and labels.dtype == torch.float32
            for row, idx in enumerate(order):
                image, label = plain[idx]
                np.testing.assert_array_equal(batch[row].numpy(), image)
                np.testing.assert_array_equal(labels[row].numpy(), label)
    # Items are copies: changing one must not change what the cache returns next time.
    image, _ = cached[1]
    image[:] = 0
    np.testing.assert_array_equal(cached[1][0], as_chw(images[1]))
    assert cached._cache_filled.all()


def test_pickling_drops_handles_and_cache(labelled_zip) -> None:
    path, images, _ = labelled_zip
    ds = ImageFolderDataset(path, use_labels=True, cache=True)
    ds[0]
    state = ds.__getstate__()
    assert state['_cache_images'] is None and state['_zip'].__getstate__()['_fd'] is None
    copy = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(copy[3][0], as_chw(images[3]))
    np.testing.assert_array_equal(copy[3][1], ds[3][1])


@pytest.mark.parametrize('workers,context', [(0, None), (2, 'fork'), (1, 'spawn')])
def test_dataloader_workers(labelled_zip, workers: int, context) -> None:
    path, images, labels = labelled_zip
    ds = ImageFolderDataset(path, use_labels=True, xflip=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, shuffle=False, num_workers=workers,
                                         multiprocessing_context=context)
    got_images, got_labels = zip(*loader)
    expected = [as_chw(p) for p in images] + [as_chw(p)[:, :, ::-1] for p in images]
    np.testing.assert_array_equal(torch.cat(got_images).numpy(), np.stack(expected))
    np.testing.assert_array_equal(torch.cat(got_labels).argmax(dim=1).numpy(), labels + labels)


def test_opening_reads_only_the_first_image(tmp_path: Path, monkeypatch) -> None:
    write_zip(tmp_path / 'many.zip', make_images(300, size=4))
    reads = []
    original = ZipMembers.read
    monkeypatch.setattr(ZipMembers, 'read', lambda self, member: reads.append(member) or original(self, member))
    ds = ImageFolderDataset(tmp_path / 'many.zip', resolution=4, max_size=100)
    assert len(ds) == 100 and reads == [0]


# ----------------------------------------------------------------------------
# The ZIP reader.


def test_zip_reader_handles_methods_zip64_comments_and_prefixes(tmp_path: Path) -> None:
    path = tmp_path / 'mixed.zip'
    payloads = {'stored.png': b'abc' * 50, 'deflated.bin': b'xyz' * 500, 'lzma.bin': bytes(range(256)) * 3,
                'dir/': b'', 'ünïcode/ñame.png': b'\x00\x01' * 40, 'empty.txt': b''}
    methods = {'deflated.bin': zipfile.ZIP_DEFLATED, 'lzma.bin': zipfile.ZIP_LZMA}
    with zipfile.ZipFile(path, 'w') as zf:
        zf.comment = b'an archive comment'
        for name, data in payloads.items():
            if name.endswith('/'):
                zf.mkdir(name)
                continue
            info = zipfile.ZipInfo(name)
            info.compress_type = methods.get(name, zipfile.ZIP_STORED)
            with zf.open(info, 'w', force_zip64=name == 'stored.png') as out:  # zip64 extra fields on one member
                out.write(data)
    # Bytes prepended to the archive (like a self-extractor stub) shift every offset.
    shifted = tmp_path / 'shifted.zip'
    shifted.write_bytes(b'#!stub\n' * 10 + path.read_bytes())
    for archive in (path, shifted):
        reader = ZipMembers(str(archive))
        assert [n.decode('utf8') for n in reader.names.tolist()] == list(payloads)
        for k, (name, data) in enumerate(payloads.items()):
            assert reader.read(k) == data, name
        reader.close()

    # An end-record signature inside the comment is not mistaken for the end record (zipfile itself would).
    tricky = tmp_path / 'tricky.zip'
    with zipfile.ZipFile(tricky, 'w') as zf:
        zf.comment = b'comment with PK\x05\x06 inside'
        zf.writestr('a.png', b'payload')
    assert ZipMembers(str(tricky)).read(0) == b'payload'


def test_zip_reader_large_member_count_uses_zip64_directory(tmp_path: Path) -> None:
    path = tmp_path / 'many.zip'
    with zipfile.ZipFile(path, 'w') as zf:  # more than 65535 members needs the zip64 end records
        for k in range(70000):
            zf.writestr(f'{k:06d}.bin', k.to_bytes(3, 'little'))
    reader = ZipMembers(str(path))
    assert reader.names.size == 70000
    assert reader.read(69999) == (69999).to_bytes(3, 'little') and reader.find('012345.bin') == 12345


def _move_to_zip64_extras(source: Path, dest: Path, moved: list[tuple[str, ...]], lead: dict[int, bytes]) -> None:
    """Copy ``source`` with the central directory's sizes and offsets of entry k named in ``moved[k]`` ('usize',
    'csize', 'offset') moved into a zip64 extra field, as writers store them past 4 GiB; ``lead[k]`` is an extra
    field placed before that record."""
    data = source.read_bytes()
    eocd_pos = data.rfind(zipfile.stringEndArchive)
    eocd = list(struct.unpack_from(zipfile.structEndArchive, data, eocd_pos))
    pos, end, directory = eocd[6], eocd[6] + eocd[5], b''
    for k in range(eocd[4]):
        fields = list(struct.unpack_from(zipfile.structCentralDir, data, pos))
        name_len, extra_len, comment_len = fields[12:15]
        rest = data[pos + zipfile.sizeCentralDir:pos + zipfile.sizeCentralDir + name_len + extra_len + comment_len]
        values = []
        for key, index in (('usize', 11), ('csize', 10), ('offset', 18)):
            if key in moved[k]:
                values.append(fields[index])
                fields[index] = 0xFFFFFFFF
        extra = lead.get(k, b'') + (struct.pack(f'<2H{len(values)}Q', 1, 8 * len(values), *values) if values else b'')
        fields[13] = extra_len + len(extra)
        directory += struct.pack(zipfile.structCentralDir, *fields) + rest[:name_len] + extra + rest[name_len:]
        pos += zipfile.sizeCentralDir + name_len + extra_len + comment_len
    assert pos == end
    eocd[5] = len(directory)
    dest.write_bytes(data[:eocd[6]] + directory + struct.pack(zipfile.structEndArchive, *eocd))


def test_zip_reader_zip64_extras_of_the_central_directory(tmp_path: Path) -> None:
    payloads = {f'm{k}.bin': bytes([k]) * (10 + k) for k in range(5)}
    with zipfile.ZipFile(tmp_path / 'plain.zip', 'w') as zf:
        for name, data in payloads.items():
            zf.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED if name == 'm1.bin' else zipfile.ZIP_STORED)
    moved = [('usize', 'csize', 'offset'), ('offset',), ('usize', 'csize'), (), ('csize', 'offset')]
    lead = {2: struct.pack('<2H2s', 0xCAFE, 2, b'xy')}  # another extra field first: the one-by-one path
    _move_to_zip64_extras(tmp_path / 'plain.zip', tmp_path / 'zip64.zip', moved, lead)
    with zipfile.ZipFile(tmp_path / 'zip64.zip') as zf:  # the archive is valid: zipfile reads it too
        assert {name: zf.read(name) for name in zf.namelist()} == payloads
    reader = ZipMembers(str(tmp_path / 'zip64.zip'))
    assert [reader.read(k) for k in range(len(payloads))] == list(payloads.values())

    # A last entry whose name would run past the end of the directory is reported, not read out of bounds.
    data = bytearray((tmp_path / 'plain.zip').read_bytes())
    last = data.rfind(zipfile.stringCentralDir)
    data[last + 28:last + 30] = struct.pack('<H', 200)
    (tmp_path / 'overrun.zip').write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r'overrun\.zip: corrupt ZIP central directory at byte \d+'):
        ZipMembers(str(tmp_path / 'overrun.zip'))


# ----------------------------------------------------------------------------
# Errors.


def test_missing_path_and_wrong_kind(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match='nope.zip: dataset not found'):
        ImageFolderDataset(tmp_path / 'nope.zip')
    (tmp_path / 'data.txt').write_text('x')
    with pytest.raises(DatasetError, match=r'data\.txt: expected a directory or a \.zip'):
        ImageFolderDataset(tmp_path / 'data.txt')
    (tmp_path / 'bad.zip').write_bytes(b'not a zip at all')
    with pytest.raises(DatasetError, match=r'bad\.zip: not a ZIP archive'):
        ImageFolderDataset(tmp_path / 'bad.zip')


def test_no_images(tmp_path: Path) -> None:
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'dataset.json').write_text('{"labels": null}')
    with pytest.raises(DatasetError, match='empty: no image files found'):
        ImageFolderDataset(tmp_path / 'empty')
    with zipfile.ZipFile(tmp_path / 'empty.zip', 'w') as zf:
        zf.writestr('readme.txt', 'nothing')
    with pytest.raises(DatasetError, match=r'empty\.zip: no image files found'):
        ImageFolderDataset(tmp_path / 'empty.zip')


def test_mismatched_resolution(tmp_path: Path) -> None:
    write_zip(tmp_path / 'mixed.zip', make_images(2, size=8) + make_images(1, size=16))
    with pytest.raises(DatasetError, match=r'images are 8x8 .* but resolution=16 was requested'):
        ImageFolderDataset(tmp_path / 'mixed.zip', resolution=16)
    ds = ImageFolderDataset(tmp_path / 'mixed.zip', resolution=8)
    ds[1]
    with pytest.raises(DatasetError, match=r'mixed\.zip:00000/img00000002\.png: image is 3x16x16 .* are 3x8x8'):
        ds[2]
    with pytest.raises(DatasetError, match='img00000002.png: image is 3x16x16'):
        ds.get_batch([0, 2])


def test_label_errors(tmp_path: Path) -> None:
    images = make_images(3)
    write_folder(tmp_path / 'nolabels', images)
    with pytest.raises(DatasetError, match='nolabels: there is no dataset.json with labels .*class subfolders'):
        ImageFolderDataset(tmp_path / 'nolabels', use_labels=True)
    write_folder(tmp_path / 'null', images)
    (tmp_path / 'null' / 'dataset.json').write_text('{"labels": null}')
    with pytest.raises(DatasetError, match='"labels": null'):
        ImageFolderDataset(tmp_path / 'null', use_labels=True)

    names = write_folder(tmp_path / 'extra', images, labels=[0, 1, 2])
    table = [[n, 0] for n in names] + [['00000/ghost.png', 1]]
    (tmp_path / 'extra' / 'dataset.json').write_text(json.dumps({'labels': table}))
    with pytest.raises(DatasetError, match=r"1 of 4 entries name no image \(e.g. '00000/ghost.png'\)"):
        ImageFolderDataset(tmp_path / 'extra', use_labels=True)
    (tmp_path / 'extra' / 'dataset.json').write_text(json.dumps({'labels': table[:2]}))
    with pytest.raises(DatasetError, match=r"1 of 3 images have no label \(e.g. '00000/img00000002.png'\)"):
        ImageFolderDataset(tmp_path / 'extra', use_labels=True)
    (tmp_path / 'extra' / 'dataset.json').write_text(json.dumps({'labels': [[n, 0.5] for n in names]}))
    with pytest.raises(DatasetError, match='class labels must be non-negative integers'):
        ImageFolderDataset(tmp_path / 'extra', use_labels=True)
    (tmp_path / 'extra' / 'dataset.json').write_text('{"labels": [["a"')
    with pytest.raises(DatasetError, match=r'dataset\.json: expected \{"labels"'):
        ImageFolderDataset(tmp_path / 'extra', use_labels=True)


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    names = write_folder(tmp_path / 'd', make_images(3))
    good = (tmp_path / 'd' / names[1]).read_bytes()
    (tmp_path / 'd' / names[1]).write_bytes(b'\x89PNG\r\n\x1a\n garbage')
    with pytest.raises(DatasetError, match=r'd:00000/img00000001\.png: cannot read image'):
        ImageFolderDataset(tmp_path / 'd')  # a folder's headers are all read when it is opened
    # A readable header with truncated pixel data is only found when the image is decoded.
    (tmp_path / 'd' / names[1]).write_bytes(good[:len(good) // 2])
    ds = ImageFolderDataset(tmp_path / 'd')
    with pytest.raises(DatasetError, match=r'd:00000/img00000001\.png: cannot read image'):
        ds[1]
