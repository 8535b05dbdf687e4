"""Paired, powered comparison (evaluation/paired.py) and ``fid.py compare`` on synthetic features and images.

The synthetic features are Gaussian with a reference N(0, I): a setting A whose features are B's plus a fixed shift
has covariance exactly B's on every resample, so FD(A) - FD(B) = 2 shift . mean_B + |shift|^2 on every resample and
the population difference is |shift|^2 (against B drawn from the reference's distribution); its estimate is normal
with variance 4 shift' I shift / N, which makes the nominal coverage of the interval checkable.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation import metrics, paired
from tests.conftest import run_python

F = 3   # features: small, so a covariance is well estimated from few images and every sqrtm is cheap


def _reference(dim: int = F) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(dim), np.eye(dim)


def _binomial_band(p: float, trials: int, sds: float = 3.0) -> tuple[float, float]:
    half = sds * math.sqrt(p * (1 - p) / trials)
    return p - half, p + half


def test_known_difference_is_found() -> None:
    rng = np.random.default_rng(1)
    base = rng.standard_normal((300, F))
    a = base + 0.05 * rng.standard_normal((300, F))
    b = base + 0.05 * rng.standard_normal((300, F)) + 0.5   # B's mean shifted: B is farther from the reference
    result = paired.paired_fd_difference(a, b, *_reference(), np.random.default_rng(0), num_resamples=300)
    assert result.fd_b > result.fd_a
    assert result.diff == pytest.approx(result.fd_a - result.fd_b, rel=1e-12)
    assert result.ci_high < 0 and result.excludes_zero
    assert result.ci_low < result.diff < result.ci_high
    # The shift's own contribution to FD(B) - FD(A) is about |0.5|^2 * F; the interval must be near it.
    assert abs(-result.diff - 0.25 * F) < 0.25 * F


def test_null_difference_is_mostly_not_found() -> None:
    rng = np.random.default_rng(2)
    repetitions, found = 40, 0
    for _ in range(repetitions):
        base = rng.standard_normal((120, F))
        a = base + 0.3 * rng.standard_normal((120, F))
        b = base + 0.3 * rng.standard_normal((120, F))   # same distribution as A, paired through ``base``
        found += paired.paired_fd_difference(a, b, *_reference(), rng, num_resamples=200).excludes_zero
    # Nominal false-positive rate 5%: 40 repetitions give 2 on average; more than 8 has probability < 1e-3.
    assert found <= 8


def test_intervals_cover_the_true_difference_at_their_nominal_rate() -> None:
    rng = np.random.default_rng(3)
    shift = np.array([0.3, -0.2, 0.1])
    true_diff = float(shift @ shift)   # FD(A) - FD(B) in the population, B ~ N(0, I) = the reference
    repetitions, confidence, covered = 150, 0.9, 0
    for _ in range(repetitions):
        b = rng.standard_normal((80, F))
        result = paired.paired_fd_difference(b + shift, b, *_reference(), rng, num_resamples=200,
                                             confidence=confidence)
        covered += result.ci_low <= true_diff <= result.ci_high
    low, high = _binomial_band(confidence, repetitions)
    # The percentile interval of a mean undercovers by the factor sqrt((n - 1) / n) in its width: allow for it.
    assert low - 0.02 <= covered / repetitions <= high, covered


def test_same_indices_for_both_sides() -> None:
    """The pairing: identical A and B give exactly zero on every resample, independent sides would not."""
    rng = np.random.default_rng(4)
    a = rng.standard_normal((50, F))
    result = paired.paired_fd_difference(a, a.copy(), *_reference(), np.random.default_rng(0), num_resamples=50)
    assert result.diff == 0 and result.ci_low == 0 and result.ci_high == 0 and result.diff_se == 0


def test_resampled_fd_matches_the_metrics_formula() -> None:
    """The weighted moments of a resample equal the moments of its rows repeated (one FD formula)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((30, F))
    index = rng.integers(0, 30, size=30)
    counts = np.bincount(index, minlength=30).astype(np.float64)
    expected = metrics.frechet_distance(*metrics.feature_moments(x[index]), *_reference())
    got = paired._weighted_fd(x, counts, *_reference())
    assert got == pytest.approx(expected, rel=100 * np.finfo(np.float64).eps * F, abs=1e-12)


def test_seeded_generator_reproduces() -> None:
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((40, F)), rng.standard_normal((40, F))
    one = paired.paired_fd_difference(a, b, *_reference(), np.random.default_rng(9), num_resamples=30)
    two = paired.paired_fd_difference(a, b, *_reference(), np.random.default_rng(9), num_resamples=30)
    assert one == two


def test_hierarchical_bootstrap_carries_the_training_seed_spread() -> None:
    rng = np.random.default_rng(7)
    # Three training seeds whose own differences disagree far more than the image seeds can tell apart.
    models_b = [rng.standard_normal((200, F)) for _ in range(3)]
    models_a = [b + shift for b, shift in zip(models_b, (0.1, 0.4, 0.7))]
    result = paired.paired_fd_difference(models_a, models_b, *_reference(), np.random.default_rng(0),
                                         num_resamples=300)
    assert result.num_models == 3 and result.num_images == 200
    per_model = [paired.frechet_of(a, *_reference()) - paired.frechet_of(b, *_reference())
                 for a, b in zip(models_a, models_b)]
    assert result.diff == pytest.approx(np.mean(per_model), rel=1e-12)
    assert result.ci_low < result.diff < result.ci_high
    # Its standard error is that of a mean of 3 training seeds (the bootstrap's divides by 3, not 2: ~0.82 of it)...
    between = np.std(per_model, ddof=1) / math.sqrt(3)
    assert 0.5 * between < result.diff_se < 1.2 * between
    # ... several times what pooling the images of all training seeds into one level would claim.
    pooled = paired.paired_fd_difference(np.concatenate(models_a), np.concatenate(models_b), *_reference(),
                                         np.random.default_rng(0), num_resamples=300)
    assert result.diff_se > 3 * pooled.diff_se


def test_paired_mean_difference_per_image_values() -> None:
    rng = np.random.default_rng(8)
    base = rng.standard_normal(400)
    result = paired.paired_mean_difference(base + 0.1, base, np.random.default_rng(0), num_resamples=200)
    assert result.diff == pytest.approx(0.1, rel=1e-9)
    assert result.ci_low == pytest.approx(0.1, rel=1e-9) and result.ci_high == pytest.approx(0.1, rel=1e-9)
    two_level = paired.paired_mean_difference(np.stack([base, base + 1]), np.stack([base, base]),
                                              np.random.default_rng(0), num_resamples=200)
    assert two_level.num_models == 2 and two_level.ci_low < 0.5 < two_level.ci_high


def test_images_needed_is_monotone_in_the_effect_and_none_without_one() -> None:
    rng = np.random.default_rng(10)
    b = rng.standard_normal((512, F))
    b -= b.mean(axis=0)   # all 512 then differ by exactly F size^2; the prefixes keep their chance means
    needed = {}
    for size in (0.6, 0.25):
        result = paired.images_needed(b + size, b, *_reference(), np.random.default_rng(0), num_resamples=200,
                                      smallest=8)
        assert [step.num_images for step in result.steps] == [8, 16, 32, 64, 128, 256, 512]
        assert result.n_needed is not None
        decided = [s.num_images for s in result.steps if s.num_images >= result.n_needed]
        assert all(s.ci_high < 0 or s.ci_low > 0 for s in result.steps if s.num_images in decided)
        assert all(s.ci_low > 0 for s in result.steps if s.num_images in decided)   # A is the farther one
        needed[size] = result.n_needed
    assert needed[0.6] <= needed[0.25]
    same = paired.images_needed(b, b.copy(), *_reference(), np.random.default_rng(0), num_resamples=50, smallest=8)
    assert same.n_needed is None and same.full.num_images == 512


def test_doubling_sizes() -> None:
    assert paired.doubling_sizes(100, 10) == [10, 20, 40, 80, 100]
    assert paired.doubling_sizes(80, 10) == [10, 20, 40, 80]
    with pytest.raises(paired.PairedError, match='at least 2'):
        paired.doubling_sizes(10, 1)


@pytest.mark.parametrize('case, message', [
    ('shape', 'same seeds'), ('few', 'at least 2'), ('confidence', 'between 0 and 1'), ('nan', 'NaN'),
    ('ragged', 'differ in shape'),
])
def test_bad_input_is_one_line(case: str, message: str) -> None:
    a = np.zeros((10, F)) + np.arange(10)[:, None]
    b, confidence = a.copy(), 0.95
    if case == 'shape':
        b = b[:9]
    elif case == 'few':
        a, b = a[:1], b[:1]
    elif case == 'confidence':
        confidence = 1.5
    elif case == 'ragged':
        a, b = [a, a[:9]], [b, b[:9]]
    else:
        a[3, 1] = np.nan
    with pytest.raises(paired.PairedError, match=message) as info:
        paired.paired_fd_difference(a, b, *_reference(), np.random.default_rng(0), confidence=confidence)
    assert '\n' not in str(info.value)


# ----------------------------------------------------------------------------
# fid.py compare on two tiny folders, with the digits classifier shipped with the demo as the detector.

WEIGHTS = 'demo/digits-classifier.weights.pt'


def _write_folder(folder, images: np.ndarray, seeds) -> None:
    os.makedirs(folder, exist_ok=True)
    for image, seed in zip(images, seeds):
        Image.fromarray(image[0], 'L').save(os.path.join(folder, f'{seed:06d}.png'))


def _blobs(rng: np.random.Generator, count: int) -> np.ndarray:
    """uint8 [count, 1, 16, 16]: smooth random strokes, so the classifier's features vary between images."""
    noise = rng.random((count, 1, 4, 4))
    return (np.kron(noise, np.ones((4, 4))) * 200).astype(np.uint8)


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp('compare')
    rng = np.random.default_rng(0)
    seeds = list(range(100, 260))
    images = _blobs(rng, len(seeds))
    _write_folder(root / 'a', images, seeds)
    _write_folder(root / 'b', np.clip(images.astype(np.int64) + 50, 0, 255).astype(np.uint8), seeds)
    from evaluation import features
    detector = features.load_detector(WEIGHTS, device='cpu')
    ref = features.extract_features(detector, torch.from_numpy(_blobs(rng, 300)))
    features.save_stats(str(root / 'ref.npz'), *metrics.feature_moments(ref))
    return root


def test_compare_cli_end_to_end(folders) -> None:
    jsonl = folders / 'out' / 'compare.jsonl'
    proc = run_python(['fid.py', 'compare', f'--images-a={folders / "a"}', f'--images-b={folders / "b"}',
                       f'--ref={folders / "ref.npz"}', f'--detector={WEIGHTS}', '--device=cpu', '--bootstrap=100',
                       '--confidence=0.9', f'--jsonl={jsonl}'], env={'OMP_NUM_THREADS': '1'})
    values = dict(line.split(' ', 1) for line in proc.stdout.strip().splitlines()[-6:])
    assert list(values) == ['fd_a', 'fd_b', 'diff', 'diff_ci_low', 'diff_ci_high', 'n_needed']
    (record,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert record['command'] == 'compare' and record['distance'] == 'fd_digits'
    assert record['num_images'] == 160 and record['seeds'] == '100-259'
    assert record['bootstrap'] == 100 and record['confidence'] == 0.9
    assert float(values['fd_a']) == pytest.approx(record['fd_a'], rel=1e-5)
    assert float(values['diff']) == pytest.approx(record['fd_a'] - record['fd_b'], rel=1e-5)  # printed with %g
    low, high = float(values['diff_ci_low']), float(values['diff_ci_high'])
    assert record['diff_ci'] == pytest.approx([low, high], rel=1e-5)
    # The brightened B is a different distribution, seen on every seed: the interval excludes zero.
    assert low > 0 or high < 0
    assert values['n_needed'] != 'none' and int(values['n_needed']) == record['n_needed']
    assert [p['num_images'] for p in record['prefixes']] == [128, 160]
    # fd_a is the Frechet distance fid.py calc reports for the same folder with the same detector.
    calc = run_python(['fid.py', 'calc', f'--images={folders / "a"}', f'--ref={folders / "ref.npz"}',
                       f'--detector={WEIGHTS}', '--device=cpu', '--num-images=160', '--workers=0'],
                      env={'OMP_NUM_THREADS': '1'})
    assert float(calc.stdout.strip().splitlines()[-1]) == pytest.approx(record['fd_a'], rel=1e-6)


@pytest.mark.parametrize('case, message', [
    ('missing', '--images-a has no image for 1 seed(s) that the comparison needs (e.g. seed 5)'),
    ('few', '1 image(s) to compare; need at least 2'),
    ('confidence', '--confidence 1.5: expected a coverage between 0 and 1'),
])
def test_compare_cli_bad_input_is_one_line(folders, tmp_path, case: str, message: str) -> None:
    rng = np.random.default_rng(1)
    seeds = [3] if case == 'few' else [1, 2, 3, 4]
    images = _blobs(rng, len(seeds))
    _write_folder(tmp_path / 'a', images, seeds)
    _write_folder(tmp_path / 'b', images, seeds if case != 'missing' else [1, 2, 4, 5])
    proc = run_python(['fid.py', 'compare', f'--images-a={tmp_path / "a"}', f'--images-b={tmp_path / "b"}',
                       f'--ref={folders / "ref.npz"}', f'--detector={WEIGHTS}', '--device=cpu',
                       *(['--confidence=1.5'] if case == 'confidence' else [])], check=False,
                      env={'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('Error: ') and message in lines[0], proc.stderr
