"""Raw image folders and hostile dataset files (issue 16, items 2-7).

Every image mode is converted once (formats/dataset_files.py), by dataset_tool.py and by the folder reader that
``train.py --data=FOLDER`` uses, so both must give the same pixels, and both must refuse the same files with one
line naming the file. Also: mismatch errors name the source file, dataset.json names are normalised and
mismatches reported, numbered class folders, 16-bit images, and U-Nets deeper than the images allow.
"""

from __future__ import annotations

import io
import json
import re
import unicodedata
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
import train
from tests._train_data import tiny_train_args
from training import networks
from training.dataset import DatasetError, ImageFolderDataset

SIZE = 8

# ----------------------------------------------------------------------------
# Helpers.


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def over_black(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Reference compositing, written independently of the library: round(c * a / 255)."""
    return np.floor(colour.astype(np.float64) * alpha.astype(np.float64)[..., None] / 255 + 0.5).astype(np.uint8)


def palette_image(seed: int, transparent_index: int | None = None) -> tuple[PIL.Image.Image, np.ndarray, np.ndarray]:
    """P image, the RGB each pixel shows, and the alpha of each pixel."""
    palette = rng(seed).integers(0, 256, size=(256, 3), dtype=np.uint8)
    index = rng(seed + 1).integers(0, 16, size=(SIZE, SIZE), dtype=np.uint8)
    image = PIL.Image.fromarray(index, 'P')
    image.putpalette(palette.reshape(-1).tolist())
    alpha = np.full((SIZE, SIZE), 255, dtype=np.uint8)
    if transparent_index is not None:
        image.info['transparency'] = transparent_index
        alpha[index == transparent_index] = 0
    return image, palette[index], alpha


def mode_case(mode: str, seed: int) -> tuple[PIL.Image.Image, str, np.ndarray]:
    """(image, file format, expected 8-bit pixels HW or HWC) for one Pillow mode."""
    r = rng(seed)
    rgb = r.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    alpha = r.integers(0, 256, size=(SIZE, SIZE), dtype=np.uint8)
    sixteen = r.integers(0, 65536, size=(SIZE, SIZE), dtype=np.uint16)
    if mode == 'L':
        return PIL.Image.fromarray(gray), 'png', gray
    if mode == 'RGB':
        return PIL.Image.fromarray(rgb), 'png', rgb
    if mode == '1':
        bits = gray > 127
        return PIL.Image.fromarray(bits), 'png', np.where(bits, 255, 0).astype(np.uint8)
    if mode == 'LA':
        return PIL.Image.fromarray(np.dstack([gray, alpha]), 'LA'), 'png', over_black(gray[..., None], alpha)[..., 0]
    if mode == 'RGBA':
        return PIL.Image.fromarray(np.dstack([rgb, alpha])), 'png', over_black(rgb, alpha)
    if mode == 'P':
        image, shown, _ = palette_image(seed)
        return image, 'png', shown
    if mode == 'P+transparency':
        image, shown, see_through = palette_image(seed, transparent_index=3)
        return image, 'png', over_black(shown, see_through)
    if mode == 'PA':
        image, shown, _ = palette_image(seed)
        image = image.convert('PA')
        image.putalpha(PIL.Image.fromarray(alpha))
        return image, 'tiff', over_black(shown, alpha)
    if mode == 'CMYK':
        cmyk = PIL.Image.fromarray(np.dstack([rgb, alpha]), 'CMYK')
        return cmyk, 'tiff', np.asarray(cmyk.convert('RGB'))
    if mode == 'LAB':
        lab = PIL.Image.fromarray(rgb, 'LAB')
        return lab, 'tiff', np.asarray(lab.convert('RGB'))
    if mode == 'I;16':  # 16-bit PNG: the high byte
        return PIL.Image.fromarray(sixteen), 'png', (sixteen // 256).astype(np.uint8)
    if mode == 'I;16B':
        return PIL.Image.fromarray(sixteen.astype('>u2')), 'tiff', (sixteen // 256).astype(np.uint8)
    if mode == 'I':  # 32-bit integers holding 16-bit samples
        return PIL.Image.fromarray(sixteen.astype(np.int32)), 'tiff', (sixteen // 256).astype(np.uint8)
    raise AssertionError(mode)


CONVERTED_MODES = ['L', 'RGB', '1', 'LA', 'RGBA', 'P', 'P+transparency', 'PA', 'CMYK', 'LAB', 'I;16', 'I;16B', 'I']


def save(image: PIL.Image.Image, path: Path, fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


def tool(args: list[Any]) -> Any:
    return CliRunner().invoke(dataset_tool.main, [str(a) for a in args], catch_exceptions=True)


def one_error_line(result: Any) -> str:
    assert result.exit_code not in (0, None), result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert 'Traceback' not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(lines) == 1, result.output
    return lines[0]


def dataset_pixels(dest: Path) -> tuple[dict[str, np.ndarray], Any]:
    with zipfile.ZipFile(dest) as zf:
        images = {n: np.asarray(PIL.Image.open(io.BytesIO(zf.read(n)))) for n in zf.namelist() if n.endswith('.png')}
        return images, json.loads(zf.read('dataset.json'))['labels']


def hwc(chw: np.ndarray) -> np.ndarray:
    return chw[0] if chw.shape[0] == 1 else chw.transpose(1, 2, 0)


def run_train(data: Path, outdir: Path, **overrides: Any) -> Any:
    return CliRunner().invoke(train.main, tiny_train_args(data, outdir, **overrides), catch_exceptions=True)


# ----------------------------------------------------------------------------
# Items 2 and 6: image modes, converted the same way by dataset_tool.py and the folder reader.


@pytest.mark.parametrize('mode', CONVERTED_MODES)
def test_mode_is_converted_identically_by_the_tool_and_the_folder_reader(mode: str, tmp_path: Path) -> None:
    expected = []
    for k in range(2):
        image, fmt, pixels = mode_case(mode, seed=10 * k + 1)
        save(image, tmp_path / 'src' / f'{k}.{fmt}', fmt)
        expected.append(pixels)
    result = tool([f'--source={tmp_path / "src"}', f'--dest={tmp_path / "out.zip"}'])
    assert result.exit_code == 0, result.output
    written, _ = dataset_pixels(tmp_path / 'out.zip')
    reader = ImageFolderDataset(tmp_path / 'src')
    for k in range(2):
        np.testing.assert_array_equal(written[f'00000/img{k:08d}.png'], expected[k])
        np.testing.assert_array_equal(hwc(reader[k][0]), expected[k])
    assert reader.num_channels == (1 if expected[0].ndim == 2 else 3)


def test_sixteen_bit_scaling_keeps_the_high_byte(tmp_path: Path) -> None:
    values = np.array([[0, 255, 256, 257, 32767, 32768, 65279, 65280, 65535]], dtype=np.uint16)
    save(PIL.Image.fromarray(values), tmp_path / 'src' / 'a.png', 'png')
    assert PIL.Image.open(tmp_path / 'src' / 'a.png').mode == 'I;16'
    reader = ImageFolderDataset(tmp_path / 'src')
    assert reader[0][0].tolist() == [[[0, 0, 1, 1, 127, 128, 254, 255, 255]]]


@pytest.mark.parametrize('case', ['F', 'I-out-of-range'])
def test_modes_without_a_conversion_are_refused_up_front(case: str, tmp_path: Path) -> None:
    save(PIL.Image.fromarray(rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)), tmp_path / 'src' / 'a.png', 'png')
    if case == 'F':
        bad = PIL.Image.fromarray(rng(1).random((SIZE, SIZE), dtype=np.float32))
        fragments = ['b.tiff', 'mode F', 'expected 8-bit']
    else:
        bad = PIL.Image.fromarray(np.full((SIZE, SIZE), 70000, dtype=np.int32))
        fragments = ['b.tiff', '70000', 'expected 16-bit samples']
    save(bad, tmp_path / 'src' / 'b.tiff', 'tiff')

    line = one_error_line(tool([f'--source={tmp_path / "src"}', f'--dest={tmp_path / "out.zip"}']))
    assert all(f in line for f in fragments), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ['src']  # nothing written, not even a temporary file
    with pytest.raises(DatasetError, match=re.escape(fragments[0])):
        ImageFolderDataset(tmp_path / 'src')  # when opened, not when the image is first drawn
    line = one_error_line(run_train(tmp_path / 'src', tmp_path / 'runs', dry_run=True))
    assert '--data' in line and all(f in line for f in fragments), line


def test_mixed_modes_make_one_rgb_dataset_and_train_past_the_first_snapshot(tmp_path: Path) -> None:
    src = tmp_path / 'src'
    expected = []
    for k, mode in enumerate(['L', 'RGBA', 'P', 'RGB', '1', 'I;16', 'CMYK', 'LA']):
        image, fmt, pixels = mode_case(mode, seed=k)
        save(image, src / f'{k}.{fmt}', fmt)
        expected.append(pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=2))
    assert tool([f'--source={src}', f'--dest={tmp_path / "out.zip"}']).exit_code == 0
    written, _ = dataset_pixels(tmp_path / 'out.zip')
    reader = ImageFolderDataset(src)
    assert reader.image_shape == [3, SIZE, SIZE]
    for k, pixels in enumerate(expected):
        np.testing.assert_array_equal(written[f'00000/img{k:08d}.png'], pixels)
        np.testing.assert_array_equal(hwc(reader[k][0]), pixels)

    # The raw folder trains through a snapshot, and the network is a 3-channel one.
    result = run_train(src, tmp_path / 'runs', batch=2, cache=False)
    assert result.exit_code == 0, result.output
    snapshots = sorted((tmp_path / 'runs').rglob('network-snapshot-*.pkl'))
    assert snapshots
    import pickle
    with open(snapshots[-1], 'rb') as f:
        assert pickle.load(f)['ema'].img_channels == 3


def test_folder_of_mixed_sizes_is_refused_when_opened(tmp_path: Path) -> None:
    save(PIL.Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)), tmp_path / 'src' / 'a.png', 'png')
    save(PIL.Image.fromarray(np.zeros((2 * SIZE, 2 * SIZE), np.uint8)), tmp_path / 'src' / 'sub' / 'b.png', 'png')
    with pytest.raises(DatasetError, match=r'src:sub/b\.png: image is 16x16 but .*src:a\.png is 8x8.*--resolution'):
        ImageFolderDataset(tmp_path / 'src')


# ----------------------------------------------------------------------------
# Item 3: dataset_tool.py errors name the source file and the right fix.


@pytest.mark.parametrize('kind', ['folder', 'zip'])
def test_mismatch_errors_name_the_source_file(kind: str, tmp_path: Path) -> None:
    files = {'a.png': np.zeros((SIZE, SIZE), np.uint8), 'b.png': np.zeros((SIZE, SIZE, 3), np.uint8),
             'c.png': np.zeros((SIZE // 2, SIZE // 2, 3), np.uint8)}
    for name, pixels in files.items():
        save(PIL.Image.fromarray(pixels), tmp_path / 'src' / name, 'png')
    source = tmp_path / 'src'
    if kind == 'zip':
        source = tmp_path / 'src.zip'
        with zipfile.ZipFile(source, 'w') as zf:
            for name in files:
                zf.write(tmp_path / 'src' / name, name)
    line = one_error_line(tool([f'--source={source}', f'--dest={tmp_path / "out.zip"}']))
    assert re.search(r'c\.png: image is 4x4 but \S*a\.png is 8x8; use --resolution=WxH', line), line
    assert 'img0000' not in line  # not the output member name
    # Different channel counts are not an error: grayscale is stored as RGB beside colour images.
    result = tool([f'--source={source}', f'--dest={tmp_path / "out.zip"}', '--resolution=8x8'])
    assert result.exit_code == 0, result.output
    written, _ = dataset_pixels(tmp_path / 'out.zip')
    assert {p.shape for p in written.values()} == {(SIZE, SIZE, 3)}


def test_non_square_first_image_is_named_by_its_source_file(tmp_path: Path) -> None:
    save(PIL.Image.fromarray(np.zeros((SIZE, 2 * SIZE), np.uint8)), tmp_path / 'src' / 'wide.png', 'png')
    line = one_error_line(tool([f'--source={tmp_path / "src"}', f'--dest={tmp_path / "out.zip"}']))
    assert 'wide.png' in line and 'square' in line


# ----------------------------------------------------------------------------
# Item 4: dataset.json names normalised when unambiguous, mismatches reported, labels never dropped silently.


def labelled_folder(root: Path, names: list[str]) -> Path:
    for k, name in enumerate(names):
        save(PIL.Image.fromarray(np.full((SIZE, SIZE), k, np.uint8)), root / name, 'png')
    return root


SPELLINGS: dict[str, Callable[[str], str]] = {
    'dot-slash': lambda n: './' + n,
    'backslashes': lambda n: n.replace('/', '\\'),
    'dot-backslash': lambda n: '.\\' + n.replace('/', '\\'),
    'double-slash-and-dot': lambda n: n.replace('/', '//./'),
    'parent-folder': lambda n: 'photos/' + n,
    'absolute': lambda n: '/home/user/photos/' + n,
    'letter-case': lambda n: n.upper(),
    'windows-absolute': lambda n: 'C:\\data\\photos\\' + n.replace('/', '\\'),
    'decomposed-accents': lambda n: unicodedata.normalize('NFD', n),
}


@pytest.mark.parametrize('spelling', list(SPELLINGS))
def test_label_names_are_normalised(spelling: str, tmp_path: Path) -> None:
    names = ['cat/0.png', 'cat/1.png', 'chien/é.png']
    root = labelled_folder(tmp_path / 'src', names)
    labels = {'cat/0.png': 0, 'cat/1.png': 2, 'chien/é.png': 1}
    entries = [[SPELLINGS[spelling](n), labels[n]] for n in names]
    (root / 'dataset.json').write_text(json.dumps({'labels': entries}))
    result = tool([f'--source={root}', f'--dest={tmp_path / "out.zip"}'])
    assert result.exit_code == 0, result.output
    assert [label for _, label in dataset_pixels(tmp_path / 'out.zip')[1]] == [0, 2, 1]
    reader = ImageFolderDataset(root, use_labels=True)
    assert [int(reader.get_details(k).raw_label) for k in range(3)] == [0, 2, 1]


def test_label_mismatches_are_reported_with_counts_and_examples(tmp_path: Path) -> None:
    root = labelled_folder(tmp_path / 'src', ['a.png', 'b.png', 'c.png', 'd.png'])
    entries = [['a.png', 0], ['b.png', 1], ['x.png', 0], ['y/z.png', 1], ['w.png', 1]]
    (root / 'dataset.json').write_text(json.dumps({'labels': entries}))
    line = one_error_line(tool([f'--source={root}', f'--dest={tmp_path / "out.zip"}']))
    assert "2 of 4 images have no label (e.g. 'c.png', 'd.png')" in line, line
    assert "3 of 5 entries name no image (e.g. 'w.png', 'x.png', 'y/z.png')" in line, line
    assert 'dataset.json' in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ['src']
    with pytest.raises(DatasetError, match=r'2 of 4 images have no label .* 3 of 5 entries name no image'):
        ImageFolderDataset(root, use_labels=True)

    # Two spellings of one image with different labels are ambiguous.
    (root / 'dataset.json').write_text(json.dumps({'labels': [['a.png', 0], ['./a.png', 1]]}))
    assert "'./a.png' is labelled twice, 0 and 1" in one_error_line(tool([f'--source={root}', f'--dest={tmp_path / "o.zip"}']))
    # [name, null] leaves an image unlabelled, which is reported too.
    (root / 'dataset.json').write_text(json.dumps({'labels': [[n, None if n == 'b.png' else 0]
                                                              for n in ['a.png', 'b.png', 'c.png', 'd.png']]}))
    assert "1 of 4 images have no label (e.g. 'b.png')" in one_error_line(
        tool([f'--source={root}', f'--dest={tmp_path / "o.zip"}']))


def test_zip_source_labels_are_matched_the_same_way(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / 'src.zip', 'w') as zf:
        for k, name in enumerate(['b/1.png', 'a/0.png']):
            buffer = io.BytesIO()
            PIL.Image.fromarray(np.full((SIZE, SIZE), k, np.uint8)).save(buffer, format='png')
            zf.writestr(name, buffer.getvalue())
        zf.writestr('dataset.json', json.dumps({'labels': [['./a/0.png', 4], ['b\\1.png', 5]]}))
    assert tool([f'--source={tmp_path / "src.zip"}', f'--dest={tmp_path / "out.zip"}']).exit_code == 0
    assert [label for _, label in dataset_pixels(tmp_path / 'out.zip')[1]] == [4, 5]


def test_cond_on_an_unlabelled_dataset_says_why(tmp_path: Path) -> None:
    root = labelled_folder(tmp_path / 'classes', ['cat/0.png', 'dog/0.png'])
    line = one_error_line(run_train(root, tmp_path / 'runs', cond=1, dry_run=True))
    assert '--cond=1' in line and 'no dataset.json' in line and 'dataset_tool.py' in line, line
    (root / 'dataset.json').write_text('{"labels": null}')
    line = one_error_line(run_train(root, tmp_path / 'runs', cond=1, dry_run=True))
    assert '"labels": null' in line and 'made without labels' in line, line
    (root / 'dataset.json').write_text(json.dumps({'labels': [['./cat/0.png', 0], ['./dog/0.png', 1]]}))
    result = run_train(root, tmp_path / 'runs', cond=1, dry_run=True)
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------
# Item 5: class folders named by numbers.


def test_numbered_class_folders_keep_text_order_and_print_the_mapping(tmp_path: Path) -> None:
    root = labelled_folder(tmp_path / 'src', ['0/a.png', '1/a.png', '10/a.png', '2/a.png'])
    result = tool([f'--source={root}', f'--dest={tmp_path / "text.zip"}'])
    assert result.exit_code == 0, result.output
    assert '0 -> 0, 1 -> 1, 10 -> 2, 2 -> 3' in result.output and '--class-order=numeric' in result.output
    assert dataset_pixels(tmp_path / 'text.zip')[1] == [[f'00000/img{k:08d}.png', k] for k in range(4)]

    result = tool([f'--source={root}', f'--dest={tmp_path / "numeric.zip"}', '--class-order=numeric'])
    assert result.exit_code == 0, result.output
    assert '0 -> 0, 1 -> 1, 2 -> 2, 10 -> 3' in result.output
    assert [label for _, label in dataset_pixels(tmp_path / 'numeric.zip')[1]] == [0, 1, 3, 2]  # 0, 1, 10, 2

    labelled_folder(root, ['cats/b.png'])
    line = one_error_line(tool([f'--source={root}', f'--dest={tmp_path / "o.zip"}', '--class-order=numeric']))
    assert "--class-order=numeric" in line and "'cats'" in line
    (root / 'dataset.json').write_text('{"labels": null}')  # null: labels still come from the folders
    assert tool([f'--source={root}', f'--dest={tmp_path / "null.zip"}']).exit_code == 0
    assert len(dataset_pixels(tmp_path / 'null.zip')[1]) == 5


# ----------------------------------------------------------------------------
# Item 7: the U-Net's depth against the image side.


def tiny_unet(model_type: str, side: int, levels: int) -> torch.nn.Module:
    common = dict(img_resolution=side, in_channels=1, out_channels=1, model_channels=8, channel_mult=[1] * levels,
                  num_blocks=1, attn_resolutions=[], dropout=0)
    if model_type == 'ncsnpp':
        return networks.SongUNet(**common, embedding_type='fourier', encoder_type='residual', channel_mult_noise=2,
                                 resample_filter=[1, 3, 3, 1])
    if model_type == 'ddpmpp':
        return networks.SongUNet(**common)
    return networks.DhariwalUNet(**common)


@pytest.mark.parametrize('model_type', ['ddpmpp', 'ncsnpp', 'adm'])
def test_depth_check_is_exactly_what_the_networks_can_run(model_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real_check = networks.check_unet_depth
    monkeypatch.setattr(networks, 'check_unet_depth', lambda *args: None)  # build the nets the check refuses
    for levels, side in [(3, 4), (3, 6), (3, 8), (3, 10), (3, 12), (3, 2), (2, 7), (2, 6), (4, 28), (4, 24)]:
        try:
            real_check(side, [1] * levels)
            allowed = True
        except ValueError:
            allowed = False
        net = tiny_unet(model_type, side, levels)
        x = torch.zeros(1, 1, side, side)
        try:
            with torch.no_grad():
                net(x, torch.ones(1), None)
            runs = True
        except RuntimeError:
            runs = False
        assert allowed == runs, (model_type, levels, side)
    monkeypatch.undo()
    with pytest.raises(ValueError, match='multiple of 8, but 28x28 images give sides 28 -> 14 -> 7'):
        tiny_unet(model_type, 28, 4)


def test_train_refuses_a_unet_deeper_than_the_images(tmp_path: Path) -> None:
    src = tmp_path / 'mnist28'
    for k in range(2):
        save(PIL.Image.fromarray(rng(k).integers(0, 256, (28, 28), dtype=np.uint8)), src / f'{k}.png', 'png')
    line = one_error_line(run_train(src, tmp_path / 'runs', cres='1,2,2,2', dry_run=True))
    assert '--cres=1,2,2,2' in line and '28x28' in line and 'multiple of 8' in line, line
    line = one_error_line(run_train(src, tmp_path / 'runs', cres=None, arch='adm', dry_run=True))
    assert '--cres=1,2,3,4 (the default of --arch=adm)' in line, line
    result = run_train(src, tmp_path / 'runs', cres='1,2,2', dry_run=True)  # 28 -> 14 -> 7 is fine
    assert result.exit_code == 0, result.output
    assert not (tmp_path / 'runs').exists() or not any((tmp_path / 'runs').rglob('*.pkl'))


def test_zip_of_raw_images_is_checked_like_a_folder(tmp_path: Path) -> None:
    expected = []
    big_text = PIL.PngImagePlugin.PngInfo()
    big_text.add_text('comment', 'x' * 100_000)  # a header larger than the first read
    with zipfile.ZipFile(tmp_path / 'raw.zip', 'w') as zf:
        for k, mode in enumerate(['L', 'RGBA', 'P+transparency']):
            image, fmt, pixels = mode_case(mode, seed=k)
            buffer = io.BytesIO()
            image.save(buffer, format=fmt, pnginfo=big_text if k == 2 else None)
            compression = zipfile.ZIP_DEFLATED if k == 1 else zipfile.ZIP_STORED
            zf.writestr(f'photos/{k}.{fmt}', buffer.getvalue(), compress_type=compression)
            expected.append(pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=2))
    reader = ImageFolderDataset(tmp_path / 'raw.zip')
    assert reader.image_shape == [3, SIZE, SIZE]
    for k, pixels in enumerate(expected):
        np.testing.assert_array_equal(hwc(reader[k][0]), pixels)

    with zipfile.ZipFile(tmp_path / 'raw.zip', 'a') as zf:
        buffer = io.BytesIO()
        PIL.Image.fromarray(np.zeros((SIZE, SIZE), np.float32)).save(buffer, format='tiff')
        zf.writestr('photos/9.tiff', buffer.getvalue())
    with pytest.raises(DatasetError, match=r'raw\.zip:photos/9\.tiff: image mode F'):
        ImageFolderDataset(tmp_path / 'raw.zip')
