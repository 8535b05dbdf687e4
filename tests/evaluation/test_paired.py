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
    got = paired._weighted_fd(x, counts, metrics.FrechetReference(*_reference()))
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
# Linear contrasts of several settings (paired_fd_contrast).


def _difference_before_contrasts(a: np.ndarray, b: np.ndarray, generator: np.random.Generator,
                                 num_resamples: int) -> paired.PairedResult:
    """paired_fd_difference as it was written before it became a contrast ([M, N, F] inputs), kept here to pin
    that the rewrite changed no bit of its results."""
    mu_ref, sigma_ref = _reference(a.shape[2])
    reference = metrics.FrechetReference(mu_ref, sigma_ref)
    models, count = a.shape[0], a.shape[1]
    fd_a = np.array([paired.frechet_of(a[m], mu_ref, sigma_ref) for m in range(models)])
    fd_b = np.array([paired.frechet_of(b[m], mu_ref, sigma_ref) for m in range(models)])
    diffs = np.empty(num_resamples)
    for r in range(num_resamples):
        chosen = generator.integers(0, models, size=models) if models > 1 else np.zeros(1, dtype=np.int64)
        total = 0.0
        for m in chosen:
            counts = np.bincount(generator.integers(0, count, size=count), minlength=count).astype(np.float64)
            total += paired._weighted_fd(a[m], counts, reference) - paired._weighted_fd(b[m], counts, reference)
        diffs[r] = total / models
    low, high = paired._percentile_interval(diffs, 0.95)
    return paired.PairedResult(fd_a=float(fd_a.mean()), fd_b=float(fd_b.mean()), diff=float((fd_a - fd_b).mean()),
                               diff_mean=float(diffs.mean()), diff_se=float(diffs.std(ddof=1)), ci_low=low,
                               ci_high=high, confidence=0.95, num_resamples=num_resamples, num_images=count,
                               num_models=models)


@pytest.mark.parametrize('models', [1, 3])
def test_difference_is_the_contrast_one_minus_one_to_the_bit(models: int) -> None:
    rng = np.random.default_rng(11)
    a = rng.standard_normal((models, 40, F)) + 0.2
    b = rng.standard_normal((models, 40, F))
    sides = (a[0], b[0]) if models == 1 else (list(a), list(b))
    difference = paired.paired_fd_difference(*sides, *_reference(), np.random.default_rng(5), num_resamples=60)
    assert difference == _difference_before_contrasts(a, b, np.random.default_rng(5), 60)
    contrast = paired.paired_fd_contrast(list(sides), (1, -1), *_reference(), np.random.default_rng(5),
                                         num_resamples=60)
    assert contrast == difference
    assert difference.num_models == models


def test_known_difference_in_differences_is_found() -> None:
    rng = np.random.default_rng(12)
    base = rng.standard_normal((300, F))
    clean_a = base + 0.05 * rng.standard_normal((300, F))
    clean_b = base + 0.05 * rng.standard_normal((300, F))
    # The perturbation moves A's features by 0.5 and B's by 0.1: it hurts A by about F (0.25 - 0.01) more.
    sets = [clean_a + 0.5, clean_a, clean_b + 0.1, clean_b]
    result = paired.paired_fd_contrast(sets, (1, -1, -1, 1), *_reference(), np.random.default_rng(0),
                                       num_resamples=200)
    fds = [paired.frechet_of(x, *_reference()) for x in sets]
    assert result.fd_a == pytest.approx(fds[0] + fds[3], rel=1e-12)
    assert result.fd_b == pytest.approx(fds[1] + fds[2], rel=1e-12)
    assert result.diff == pytest.approx(fds[0] - fds[1] - fds[2] + fds[3], rel=1e-12)
    assert result.diff == pytest.approx(result.fd_a - result.fd_b, rel=1e-12)
    assert result.ci_low > 0 and result.excludes_zero
    assert result.ci_low < result.diff < result.ci_high
    assert abs(result.diff - 0.24 * F) < 0.12 * F


def test_contrast_fields_carry_the_weights() -> None:
    rng = np.random.default_rng(13)
    x, y = rng.standard_normal((30, F)) + 0.3, rng.standard_normal((30, F))
    fx, fy = (paired.frechet_of(v, *_reference()) for v in (x, y))
    result = paired.paired_fd_contrast([x, y], (2.0, -0.5), *_reference(), np.random.default_rng(0),
                                       num_resamples=20)
    assert result.fd_a == pytest.approx(2 * fx, rel=1e-12) and result.fd_b == pytest.approx(0.5 * fy, rel=1e-12)
    # One set alone bootstraps its own FD; a zero weight leaves its set out.
    alone = paired.paired_fd_contrast([x], [1.0], *_reference(), np.random.default_rng(0), num_resamples=20)
    assert alone.fd_a == pytest.approx(fx, rel=1e-12) and alone.fd_b == 0 and alone.diff == pytest.approx(fx)
    skipped = paired.paired_fd_contrast([x, y], [1.0, 0.0], *_reference(), np.random.default_rng(0),
                                        num_resamples=20)
    assert skipped == alone


def test_identical_degradation_is_mostly_not_found() -> None:
    rng = np.random.default_rng(14)
    shift = np.array([0.4, -0.3, 0.2])
    # Exactly the same features on both sides: the contrast vanishes on every resample (up to rounding).
    a = rng.standard_normal((60, F))
    same = paired.paired_fd_contrast([a + shift, a, a + shift, a.copy()], (1, -1, -1, 1), *_reference(),
                                     np.random.default_rng(0), num_resamples=30)
    assert abs(same.diff) < 1e-12 and abs(same.ci_low) < 1e-12 and abs(same.ci_high) < 1e-12
    # Two settings alike in distribution, degraded alike: a null difference-in-differences.
    repetitions, found = 20, 0
    for _ in range(repetitions):
        base = rng.standard_normal((100, F))
        clean_a = base + 0.3 * rng.standard_normal((100, F))
        clean_b = base + 0.3 * rng.standard_normal((100, F))
        found += paired.paired_fd_contrast([clean_a + shift, clean_a, clean_b + shift, clean_b], (1, -1, -1, 1),
                                           *_reference(), rng, num_resamples=100).excludes_zero
    # Nominal false-positive rate 5%: 1 in 20 on average; more than 5 has probability < 1e-3.
    assert found <= 5


def test_contrast_images_needed_finds_a_degradation_and_not_its_absence() -> None:
    rng = np.random.default_rng(15)
    base = rng.standard_normal((256, F))
    base -= base.mean(axis=0)
    clean_a, clean_b = base.copy(), base.copy()
    # A is hurt by the perturbation (0.6 shift, F * 0.36 in FD), B not at all: decided, with A the worse one.
    hurt = paired.contrast_images_needed([clean_a + 0.6, clean_a, clean_b, clean_b], (1, -1, -1, 1),
                                         *_reference(), np.random.default_rng(0), num_resamples=100, smallest=16)
    assert [s.num_images for s in hurt.steps] == [16, 32, 64, 128, 256]
    assert hurt.n_needed is not None and hurt.full.ci_low > 0
    assert all(s.ci_low > 0 for s in hurt.steps if s.num_images >= hurt.n_needed)
    # Both hurt alike: the contrast is zero (up to rounding) on every prefix, so no number of images decides it.
    alike = paired.contrast_images_needed([clean_a + 0.6, clean_a, clean_b + 0.6, clean_b], (1, -1, -1, 1),
                                          *_reference(), np.random.default_rng(0), num_resamples=30, smallest=16)
    assert alike.n_needed is None
    # With weights (1, -1) it is images_needed, draw for draw.
    two = paired.contrast_images_needed([clean_a + 0.3, clean_b], (1, -1), *_reference(), np.random.default_rng(3),
                                        num_resamples=40, smallest=32)
    one = paired.images_needed(clean_a + 0.3, clean_b, *_reference(), np.random.default_rng(3), num_resamples=40,
                               smallest=32)
    assert two == one
    with pytest.raises(paired.PairedError, match='same seeds') as info:
        paired.contrast_images_needed([clean_a, clean_b[:100]], (1, -1), *_reference(), np.random.default_rng(0))
    assert '\n' not in str(info.value)
    with pytest.raises(paired.PairedError, match='one weight per set'):
        paired.contrast_images_needed([clean_a, clean_b], (1,), *_reference(), np.random.default_rng(0))


@pytest.mark.parametrize('case, message', [
    ('none', 'at least one'), ('count', 'one weight per set'), ('nan', 'NaN or infinite'),
    ('inf', 'NaN or infinite'), ('shape', 'same seeds'), ('few', 'at least 2'),
])
def test_contrast_bad_input_is_one_line(case: str, message: str) -> None:
    a = np.zeros((10, F)) + np.arange(10)[:, None]
    sets, weights = [a, a.copy(), a.copy()], [1.0, -1.0, 0.5]
    if case == 'none':
        sets, weights = [], []
    elif case == 'count':
        weights = [1.0, -1.0]
    elif case == 'nan':
        weights[2] = float('nan')
    elif case == 'inf':
        weights[0] = float('inf')
    elif case == 'shape':
        sets[2] = a[:9]
    else:
        sets = [x[:1] for x in sets]
    with pytest.raises(paired.PairedError, match=message) as info:
        paired.paired_fd_contrast(sets, weights, *_reference(), np.random.default_rng(0))
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


# ----------------------------------------------------------------------------
# paired_t_interval: Student's t interval from a handful of paired replicate values (e.g. one FD per seed range).

def test_t_interval_matches_a_hand_computation() -> None:
    # Differences 1, 2, 3: mean 2, sample sd 1, standard error 1 / sqrt(3); t_{0.975, 2} = 4.3027 (tables).
    result = paired.paired_t_interval([11.0, 22.0, 33.0], [10.0, 20.0, 30.0])
    se = 1 / math.sqrt(3)
    assert result.diff == pytest.approx(2.0) and result.diff_mean == pytest.approx(2.0)
    assert result.fd_a == pytest.approx(22.0) and result.fd_b == pytest.approx(20.0)
    assert result.diff_se == pytest.approx(se)
    assert result.ci_low == pytest.approx(2 - 4.3027 * se, abs=1e-3)
    assert result.ci_high == pytest.approx(2 + 4.3027 * se, abs=1e-3)
    assert not result.excludes_zero   # -0.484 .. 4.484
    assert result.num_resamples == 0 and result.num_images == 3 and result.num_models == 1
    assert result.confidence == 0.95


def test_t_interval_hand_computation_excludes_zero_only_when_it_should() -> None:
    # The interval above is -0.484 .. 4.484: it includes zero. Differences 4, 5, 6 give 5 -/+ 2.484: it excludes it.
    assert not paired.paired_t_interval([11.0, 22.0, 33.0], [10.0, 20.0, 30.0]).excludes_zero
    shifted = paired.paired_t_interval([14.0, 25.0, 36.0], [10.0, 20.0, 30.0])
    assert shifted.excludes_zero and shifted.ci_low == pytest.approx(5 - 4.3027 / math.sqrt(3), abs=1e-3)
    # 90%, K = 2: t_{0.95, 1} = 6.3138; differences 1 and 3: mean 2, sd sqrt(2), se 1.
    two = paired.paired_t_interval([1.0, 3.0], [0.0, 0.0], confidence=0.9)
    assert two.diff_se == pytest.approx(1.0)
    assert (two.ci_low, two.ci_high) == pytest.approx((2 - 6.3138, 2 + 6.3138), abs=1e-3)
    # Identical differences: zero spread, a zero-width interval at the difference.
    flat = paired.paired_t_interval(np.array([5.0, 6.0, 7.0]), np.array([4.0, 5.0, 6.0]))
    assert flat.diff_se == 0 and flat.ci_low == pytest.approx(1.0) and flat.ci_high == pytest.approx(1.0)


def test_t_interval_coverage_is_near_nominal() -> None:
    # Pairs sharing a large common term (the seed range) plus independent noise; true mean difference 0.7.
    rng = np.random.default_rng(7)
    repetitions, count, truth = 400, 5, 0.7
    covered = 0
    for _ in range(repetitions):
        common = 10 * rng.standard_normal(count)
        a = common + truth + rng.standard_normal(count)
        b = common + rng.standard_normal(count)
        result = paired.paired_t_interval(a, b)
        covered += result.ci_low <= truth <= result.ci_high
    assert 0.91 <= covered / repetitions <= 0.99


@pytest.mark.parametrize('a, b, kwargs, message', [
    ([1.0, 2.0, 3.0], [1.0, 2.0], {}, '3 value(s) for A but 2 for B'),
    ([1.0], [2.0], {}, '1 replicate(s); need at least 2'),
    ([1.0, float('nan')], [1.0, 2.0], {}, 'NaN or infinite'),
    ([1.0, 2.0], [1.0, float('inf')], {}, 'NaN or infinite'),
    ([1.0, 2.0], [1.0, 2.0], dict(confidence=1.0), 'confidence 1.0; expected a value between 0 and 1'),
    ([[1.0, 2.0]], [[1.0, 2.0]], {}, 'expected [K], one per replicate'),
])
def test_t_interval_errors_are_one_line(a, b, kwargs, message: str) -> None:
    with pytest.raises(paired.PairedError) as error:
        paired.paired_t_interval(a, b, **kwargs)
    assert message in str(error.value) and '\n' not in str(error.value)
