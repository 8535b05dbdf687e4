"""evaluation/metrics.py against analytic answers, hand-checked cases and straightforward independent implementations
of the papers' formulas (Frechet distance, KID, improved precision/recall, bootstrap, repeats)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from evaluation import metrics

EPS = np.finfo(np.float64).eps


def _orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# ----------------------------------------------------------------------------
# Frechet distance.


def test_fd_of_commuting_covariances_is_the_closed_form():
    """Covariances Q diag(a) Q^T and Q diag(b) Q^T commute: FD = |dmu|^2 + sum (sqrt a - sqrt b)^2."""
    rng = np.random.default_rng(0)
    d = 7
    q = _orthogonal(d, rng)
    a, b = rng.uniform(0.2, 3, d), rng.uniform(0.2, 3, d)
    mu, mu_ref = rng.normal(size=d), rng.normal(size=d)
    expected = np.square(mu - mu_ref).sum() + np.square(np.sqrt(a) - np.sqrt(b)).sum()
    value = metrics.frechet_distance(mu, q @ np.diag(a) @ q.T, mu_ref, q @ np.diag(b) @ q.T)
    assert value == pytest.approx(expected, rel=1e3 * EPS * d)


def test_fd_of_gaussian_samples_converges_to_the_population_value():
    """Features drawn from two known Gaussians: the sample FD is the population FD up to sampling error."""
    rng = np.random.default_rng(1)
    d, n = 3, 40000
    a, b = np.array([1.0, 2.0, 0.5]), np.array([2.0, 0.5, 0.5])
    shift = np.array([1.0, 0.0, -0.5])
    x = rng.normal(size=(n, d)) * np.sqrt(a)
    y = rng.normal(size=(n, d)) * np.sqrt(b) + shift
    population = np.square(shift).sum() + np.square(np.sqrt(a) - np.sqrt(b)).sum()
    value = metrics.frechet_distance(*metrics.feature_moments(x), *metrics.feature_moments(y))
    # The estimate's standard error is O(trace / sqrt(n)); five of them bound it.
    assert abs(value - population) < 5 * (a.sum() + b.sum()) / np.sqrt(n)


def test_fd_of_identical_statistics_is_zero_to_round_off():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(300, 24)) @ rng.normal(size=(24, 24)) * 10 + 3
    mu, sigma = metrics.feature_moments(features)
    # sqrtm recovers eigenvalues lam of sigma from lam^2, to sqrt(eps) * lam_max each.
    tolerance = sigma.shape[0] * np.sqrt(EPS) * np.linalg.eigvalsh(sigma).max()
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) <= tolerance


def test_fd_against_a_fixed_reference_equals_the_general_formula():
    """FrechetReference (eigendecompositions, for bootstrap resamples) gives frechet_distance's value, for full-rank
    and rank-deficient statistics; dimension mismatches and a non-finite reference are refused."""
    rng = np.random.default_rng(4)
    d = 16
    ref_features = rng.normal(size=(400, d)) @ rng.normal(size=(d, d)) + 1
    mu_ref, sigma_ref = metrics.feature_moments(ref_features)
    reference = metrics.FrechetReference(mu_ref, sigma_ref)
    for n in (300, 9):   # 9 images: a covariance of rank 8 < d
        mu, sigma = metrics.feature_moments(rng.normal(size=(n, d)) * 2 + 0.5)
        expected = metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref)
        scale = np.trace(sigma) + np.trace(sigma_ref)
        assert reference.distance(mu, sigma) == pytest.approx(expected, abs=d * np.sqrt(EPS) * scale)
    with pytest.raises(metrics.MetricError, match='same detector'):
        reference.distance(np.zeros(3), np.eye(3))
    with pytest.raises(metrics.MetricError, match='NaN or infinite'):
        metrics.FrechetReference(np.full(2, np.nan), np.eye(2))


def test_feature_moments_and_errors():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(9, 4)).astype(np.float32)
    mu, sigma = metrics.feature_moments(features)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-12)
    with pytest.raises(metrics.MetricError, match='n >= 2'):
        metrics.feature_moments(features[:1])
    with pytest.raises(metrics.MetricError, match='same detector'):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# ----------------------------------------------------------------------------
# KID.


def _kernel(x: np.ndarray, y: np.ndarray) -> float:
    return (float(np.dot(x, y)) / x.shape[0] + 1) ** 3


def _mmd2_unbiased_by_pairs(x: np.ndarray, y: np.ndarray) -> float:
    """Binkowski et al. 2018, eq. 4, written out pair by pair."""
    m = len(x)
    xx = sum(_kernel(x[i], x[j]) for i, j in itertools.permutations(range(m), 2))
    yy = sum(_kernel(y[i], y[j]) for i, j in itertools.permutations(range(m), 2))
    xy = sum(_kernel(x[i], y[j]) for i in range(m) for j in range(m))
    return (xx + yy) / (m * (m - 1)) - 2 * xy / m ** 2


def test_kid_with_one_full_subset_is_the_unbiased_mmd2():
    """With one subset of all points, KID is the unbiased estimator on the whole sets (order does not matter)."""
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(9, 3)), rng.normal(size=(9, 3)) + [0.5, 0, 0]
    value = metrics.kernel_inception_distance(x, y, np.random.default_rng(0), num_subsets=1, subset_size=9)
    assert value == pytest.approx(_mmd2_unbiased_by_pairs(x, y), rel=1e-12)


def test_kid_hand_checked():
    """d = 1, x = (0, 1), y = (1, 2): k(a, b) = (ab + 1)^3.
    xx pairs: 2 k(0, 1) = 2; yy: 2 k(1, 2) = 54; xy: k(0,1) + k(0,2) + k(1,1) + k(1,2) = 1 + 1 + 8 + 27 = 37.
    MMD^2_u = (2 + 54) / 2 - 2 * 37 / 4 = 9.5."""
    x, y = np.array([[0.0], [1.0]]), np.array([[1.0], [2.0]])
    assert metrics.kernel_inception_distance(x, y, np.random.default_rng(0), num_subsets=3) == pytest.approx(9.5)


def test_kid_of_a_set_against_itself_is_its_known_small_negative_value():
    """Same set on both sides, one full subset: E = 2 (S - T) / (N (N - 1)) - 2 S / N^2 with S the sum of the kernel
    matrix and T its trace, a -O(1/N) value; it is ~0 next to the kernel's scale."""
    rng = np.random.default_rng(5)
    n = 50
    x = rng.normal(size=(n, 6))
    k = (x @ x.T / 6 + 1) ** 3
    expected = 2 * (k.sum() - np.trace(k)) / (n * (n - 1)) - 2 * k.sum() / n ** 2
    value = metrics.kernel_inception_distance(x, x, np.random.default_rng(0), num_subsets=1, subset_size=n)
    assert value == pytest.approx(expected, rel=1e-10)
    assert abs(value) < 2 * np.diag(k).max() / (n - 1)


def test_kid_grows_with_a_shift_and_averages_subsets():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(400, 8))
    same = rng.normal(size=(400, 8))
    kids = [metrics.kernel_inception_distance(x, same + shift, np.random.default_rng(1), num_subsets=20,
                                              subset_size=100) for shift in (0.0, 0.3, 1.0)]
    assert abs(kids[0]) < 0.2 * kids[1] and kids[1] < kids[2]
    # The subset mean estimates the full-set estimator (both unbiased for the same MMD^2).
    full = metrics.kernel_inception_distance(x, same + 1.0, np.random.default_rng(0), num_subsets=1,
                                             subset_size=400)
    assert kids[2] == pytest.approx(full, rel=0.1)


def test_kid_subset_size_and_errors():
    assert metrics.kid_subset_size(50000, 50000) == 1000
    assert metrics.kid_subset_size(64, 500) == 64
    with pytest.raises(metrics.MetricError, match='at least 2 generated'):
        metrics.kernel_inception_distance(np.zeros((1, 3)), np.zeros((5, 3)), np.random.default_rng(0))
    with pytest.raises(metrics.MetricError, match='same detector'):
        metrics.kernel_inception_distance(np.zeros((4, 3)), np.zeros((5, 2)), np.random.default_rng(0))


# ----------------------------------------------------------------------------
# Improved precision and recall.


def _pr_brute_force(gen: np.ndarray, real: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019, eqs. 1-3, with explicit per-point distances."""
    def radii(points):
        return np.array([np.sort(np.linalg.norm(points - p, axis=1))[k] for p in points])

    def inside(points, centers):
        r = radii(centers)
        return np.mean([np.any(np.linalg.norm(centers - p, axis=1) <= r) for p in points])
    return inside(gen, real), inside(real, gen)


def test_pr_hand_checked_with_boundaries():
    """1-D, k = 1. Real 0..4: every radius 1. Generated -1, -0.5, 10, 11: radii 0.5, 0.5, 1, 1.
    Precision: -1 (on the ball of 0) and -0.5 inside, 10 and 11 outside -> 0.5.
    Recall: 0 lies on the ball of -0.5 (radius 0.5), 1..4 are outside every ball -> 0.2."""
    real = np.arange(5.0)[:, None]
    gen = np.array([[-1.0], [-0.5], [10.0], [11.0]])
    assert metrics.precision_recall(gen, real, k=1) == (0.5, 0.2)


def test_pr_matches_brute_force_on_random_features():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(60, 5))
    gen = rng.normal(size=(45, 5)) * 1.3 + 0.4
    ours = metrics.precision_recall(gen, real, k=3)
    assert ours == pytest.approx(_pr_brute_force(gen, real, 3), abs=0)
    assert 0 < ours[0] < 1 and 0 < ours[1] < 1


def test_pr_of_identical_sets_is_one_even_with_repeated_points():
    rng = np.random.default_rng(8)
    features = rng.normal(size=(40, 16)).astype(np.float32) * 50 + 100
    features[5:10] = features[4]  # five copies: radius 0 for these points
    assert metrics.precision_recall(features, features.copy()) == (1.0, 1.0)


def test_pr_blocks_do_not_change_the_answer():
    rng = np.random.default_rng(9)
    real, gen = rng.normal(size=(37, 4)), rng.normal(size=(29, 4)) + 0.5
    radii = metrics.manifold_radii(real, 3)
    np.testing.assert_allclose(metrics.manifold_radii(real, 3, block=5), radii, rtol=64 * EPS)
    np.testing.assert_array_equal(metrics.inside_manifold(gen, real, radii, block=4),
                                  metrics.inside_manifold(gen, real, radii))


def test_pr_needs_more_than_k_points():
    with pytest.raises(metrics.MetricError, match='at least 4 generated'):
        metrics.precision_recall(np.zeros((3, 2)), np.ones((10, 2)))


# ----------------------------------------------------------------------------
# All metrics at once, bootstrap, repeats.


def _features(x: np.ndarray) -> metrics.Features:
    mu, sigma = metrics.feature_moments(x)
    return metrics.Features(mu=mu, sigma=sigma, count=x.shape[0], features=x.astype(np.float32))


def test_compute_metrics_agrees_with_the_single_functions():
    rng = np.random.default_rng(10)
    real, gen = rng.normal(size=(80, 6)), rng.normal(size=(70, 6)) + 0.2
    mu, sigma = metrics.feature_moments(real)
    ref = dict(mu=mu, sigma=sigma, features=real.astype(np.float32))
    gen_features = _features(gen)
    values = metrics.compute_metrics(['fid', 'kid', 'pr'], {metrics.INCEPTION: gen_features}, ref, seed=3)
    assert list(values) == ['fid', 'kid', 'precision', 'recall']
    assert values['fid'] == metrics.frechet_distance(gen_features.mu, gen_features.sigma, mu, sigma)
    assert values['kid'] == metrics.kernel_inception_distance(gen_features.features, ref['features'],
                                                              np.random.default_rng(3))
    assert (values['precision'], values['recall']) == metrics.precision_recall(gen_features.features,
                                                                                ref['features'])
    with pytest.raises(metrics.MetricError, match='no fd_dinov2_mu, fd_dinov2_sigma'):
        metrics.compute_metrics(['fd_dinov2'], {metrics.DINOV2: gen_features}, ref)


def test_bootstrap_interval_of_precision_has_the_binomial_width():
    """Half of the generated points lie inside the reference manifold: precision 0.5, and its 95% percentile
    interval over n resampled points is close to 0.5 +- 1.96 sqrt(0.25 / n)."""
    rng = np.random.default_rng(11)
    real = rng.normal(size=(100, 2)) * 0.1
    n = 400
    gen = np.concatenate([real[rng.integers(0, 100, n // 2)], rng.normal(size=(n // 2, 2)) + 50])
    gen_features = {metrics.INCEPTION: _features(gen)}
    ref = dict(features=real)
    low, high = metrics.bootstrap_intervals(['pr'], gen_features, ref, num_resamples=200, seed=0)['precision']
    half_width = 1.96 * np.sqrt(0.25 / n)
    assert low < 0.5 < high
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.25)
    again = metrics.bootstrap_intervals(['pr'], gen_features, ref, num_resamples=200, seed=0)['precision']
    assert again == (low, high)  # seeded


def test_bootstrap_covers_every_metric_and_shrinks_with_more_images():
    rng = np.random.default_rng(12)
    real = rng.normal(size=(300, 4))
    mu, sigma = metrics.feature_moments(real)
    ref = dict(mu=mu, sigma=sigma, features=real, fd_dinov2_mu=mu, fd_dinov2_sigma=sigma)
    widths = []
    for n in (40, 300):
        gen = rng.normal(size=(n, 4)) + 0.3
        features = _features(gen)
        intervals = metrics.bootstrap_intervals(['fid', 'fd_dinov2', 'kid', 'pr'],
                                                {metrics.INCEPTION: features, metrics.DINOV2: features}, ref,
                                                num_resamples=10, seed=1)
        assert list(intervals) == ['fid', 'fd_dinov2', 'kid', 'precision', 'recall']
        assert all(low <= high for low, high in intervals.values())
        assert intervals['fid'] == intervals['fd_dinov2']  # same features, same resamples
        widths.append(intervals['fid'][1] - intervals['fid'][0])
    assert widths[1] < widths[0]


def test_summarize_repeats():
    summary = metrics.summarize_repeats([3.0, 1.0, 2.0])
    assert summary == dict(min=1.0, mean=2.0, std=1.0)
    assert metrics.summarize_repeats([4.0]) == dict(min=4.0, mean=4.0, std=0.0)


def test_parse_metrics():
    assert metrics.parse_metrics('kid, fid,kid') == ['kid', 'fid']
    assert metrics.result_keys(['pr', 'fid']) == ['precision', 'recall', 'fid']
    assert metrics.detectors_for(['fd_dinov2', 'kid']) == [metrics.INCEPTION, metrics.DINOV2]
    with pytest.raises(metrics.MetricError, match="unknown metric 'is'"):
        metrics.parse_metrics('fid,is')
