"""The demo's offline feature detector: the shipped weights-only file, fid.py's loading path and the name of its
distance (fd_digits), held-out accuracy."""

from __future__ import annotations

import shutil
import zipfile

import json

import numpy as np
import pytest
import torch

import fid
from tests.conftest import REPO_ROOT
from evaluation import features
from formats import export
from evaluation.digits_classifier import DigitsClassifier, accuracy

WEIGHTS = REPO_ROOT / 'demo' / 'digits-classifier.weights.pt'
# The shipped file reaches 0.9955 on its 449 held-out images (2 mistakes); a rebuild on another CPU kind may
# differ by a few images, and below 0.98 the features would no longer separate the classes well.
MIN_HELDOUT_ACCURACY = 0.98


@pytest.fixture(scope='module')
def detector() -> torch.nn.Module:
    return features.load_detector(str(WEIGHTS), device='cpu', verbose=False)


@pytest.fixture(scope='module')
def digits(tmp_path_factory) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo's 16x16 digits, prepared by dataset_tool.py as the demo prepares them."""
    from demo.digits import load_digits_dataset, make_digits_dataset
    return load_digits_dataset(make_digits_dataset(str(tmp_path_factory.mktemp('digits'))))


def test_weights_file_loads_weights_only():
    record = torch.load(WEIGHTS, map_location='cpu', weights_only=True)
    assert record['format'] == export.FORMAT
    assert record['class_name'] in export.DETECTOR_CLASSES
    assert all(type(t) is torch.Tensor for t in record['state_dict'].values())
    assert WEIGHTS.stat().st_size < 1 << 20  # "tiny": it lives in the repository


@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('dtype', [torch.uint8, torch.float32])
def test_detector_returns_features_for_uint8_nchw(detector, channels, dtype, one_intra_op_thread):
    assert isinstance(detector, DigitsClassifier) and not detector.training
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, [5, channels, 16, 16], generator=g, dtype=torch.uint8)
    features = detector(images.to(dtype), return_features=True)
    assert features.shape == (5, detector.feature_dim) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    # fid.py hands grayscale over repeated to RGB; the detector must see the same image either way.
    gray = images[:, :1]
    eps = torch.finfo(torch.float32).eps
    scale = float(features.abs().max())
    same = detector(gray.repeat(1, 3, 1, 1), return_features=True)
    torch.testing.assert_close(same, detector(gray, return_features=True), rtol=0, atol=64 * eps * max(scale, 1))


def test_detector_rejects_wrong_shapes(detector):
    with pytest.raises(ValueError, match=r'1 or 3'):
        detector(torch.zeros([2, 2, 16, 16], dtype=torch.uint8), return_features=True)


def test_other_sizes_are_resized(detector, one_intra_op_thread):
    images = torch.zeros([2, 1, 32, 32], dtype=torch.uint8)
    images[:, :, 8:24, 14:18] = 255  # a "1"
    assert detector(images, return_features=True).shape == (2, detector.feature_dim)


def test_heldout_accuracy(detector, digits, one_intra_op_thread):
    from demo.digits import split_indices
    from demo.train_digits_classifier import SPLIT_SEED, TEST_FRACTION
    images, labels = digits
    assert images.shape == (1797, 1, 16, 16) and images.dtype == torch.uint8
    _, test_idx = split_indices(images.shape[0], TEST_FRACTION, SPLIT_SEED)
    record = torch.load(WEIGHTS, map_location='cpu', weights_only=True)
    assert record['metadata']['num_test'] == len(test_idx)
    assert accuracy(detector, images[test_idx], labels[test_idx]) >= MIN_HELDOUT_ACCURACY


def test_real_digits_fd_against_themselves_is_small(detector, digits, one_intra_op_thread):
    """Two halves of the real digits are close in feature space; real digits against noise are far apart."""
    images, _ = digits
    def stats(x):
        f = features.extract_features(detector, x).numpy()
        return f.mean(axis=0), np.cov(f, rowvar=False)
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    a, b = stats(images[order[:800]]), stats(images[order[800:1600]])
    noise = stats(torch.randint(0, 256, [800, 1, 16, 16], generator=torch.Generator().manual_seed(1),
                                dtype=torch.uint8))
    same = features.calculate_fid_from_inception_stats(*a, *b)
    far = features.calculate_fid_from_inception_stats(*a, *noise)
    assert 0 <= same < far / 20


def test_fid_ref_accepts_the_weights_file(tmp_path):
    """fid.py ref/calc take the file through the same --detector option as the Inception pickle, and report the
    distance as fd_digits (printed lines and JSON keys), never as an FID."""
    from click.testing import CliRunner
    from demo.digits import write_digits_folder
    folder = tmp_path / 'digits'
    write_digits_folder(str(folder))  # 8x8 PNGs: the detector resizes them
    ref = tmp_path / 'ref.npz'
    result = CliRunner().invoke(fid.main, ['ref', f'--data={folder}', f'--dest={ref}', f'--detector={WEIGHTS}',
                                           '--workers=0', '--device=cpu', '--batch=512'])
    assert result.exit_code == 0, result.output
    mu, sigma = features.load_ref_stats(str(ref))
    assert mu.shape == (64,) and sigma.shape == (64, 64)

    jsonl = tmp_path / 'fd.jsonl'
    result = CliRunner().invoke(fid.main, ['calc', f'--images={folder}', f'--ref={ref}', '--num-images=300',
                                           '--repeat=2', f'--detector={WEIGHTS}', f'--jsonl={jsonl}', '--workers=0',
                                           '--device=cpu', '--batch=512'])
    assert result.exit_code == 0, result.output
    runs, summary = [json.loads(line) for line in jsonl.read_text().splitlines()][:2], \
        json.loads(jsonl.read_text().splitlines()[2])
    values = [r['fd_digits'] for r in runs]
    assert all('fid' not in r and 'FID' not in r for r in runs) and 'fids' not in summary
    assert summary['fd_digits_min'] == min(values) and summary['fd_digits_values'] == values
    lines = result.stdout.strip().splitlines()
    assert [line.split()[:2] for line in lines[-5:]] == [
        ['FD_digits', f'{values[0]:g}'], ['FD_digits', f'{values[1]:g}'], ['Minimum', 'over'],
        ['fd_digits', f'{min(values):g}'], [f'{min(values):g}']]
    assert not any(line.startswith(('fid ', 'FID ')) for line in lines)
    assert features.distance_name(features.load_detector(str(WEIGHTS))) == 'fd_digits'


def test_weights_file_of_a_network_is_not_a_detector(tmp_path):
    """A weights-only file of a denoiser is recognised, and refused as a detector with one clear line."""
    from training.networks import EDMPrecond
    net = EDMPrecond(img_resolution=8, img_channels=1, model_type='SongUNet', model_channels=8, channel_mult=[1],
                     num_blocks=1, attn_resolutions=[])
    path = export.export_weights(net, tmp_path / 'net.weights.pt')
    with pytest.raises(features.FeatureError, match='not a feature detector'):
        features.load_detector(path)
    broken = tmp_path / 'broken.weights.pt'
    shutil.copyfile(WEIGHTS, broken)
    with zipfile.ZipFile(broken, 'a') as archive:  # still a ZIP, but not what torch.save writes
        archive.writestr('extra.txt', 'x')
    with pytest.raises(features.FeatureError, match='--detector'):
        features.load_detector(str(broken))
