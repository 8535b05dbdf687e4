"""Paired, powered comparison of two settings A and B scored on the same seeds.

Two settings (samplers, step counts, networks, guidance weights...) that generate an image per seed from the same
seeds share the noise of every image, so most of the seed-to-seed spread cancels in their difference: the paired
design. The Frechet distance (FD) is a statistic of a whole set, not a mean over images, so the difference
FD(A) - FD(B) is bootstrapped over seeds (Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 6 and
13): each resample draws seed indices with replacement and uses the *same* indices for A and B, which keeps the
pairing. The interval is the percentile interval of the resampled differences (ch. 13). With several training seeds
per setting (models trained alike but for their seed), a two-level bootstrap resamples the training seeds first,
then the image seeds within each chosen one (the two-stage bootstrap of hierarchical data; Davison & Hinkley 1997,
"Bootstrap Methods and their Application", ch. 3), so the interval carries the training-seed spread as well.

:func:`paired_fd_contrast` generalises the difference to a linear contrast sum_k w_k FD(set_k) of any number of
settings scored on the same seeds, every resample applying the same seed counts to all sets: e.g. the
difference-in-differences (FD(A') - FD(A)) - (FD(B') - FD(B)) with weights (1, -1, -1, 1) asks whether a
perturbation (quantization, noise injection) hurts A more than B. :func:`paired_fd_difference` is the contrast
with weights (1, -1).

:func:`images_needed` (and :func:`contrast_images_needed` for a contrast) evaluates the interval on nested
prefixes of the seed list (doubling sizes) and reports the smallest number of images whose interval excludes zero,
or None.

Everything works from feature arrays ([N, F] per setting, row i the image of seed i, any detector: Inception for
FID, DINOv2, the digits classifier) against fixed reference moments, with the one Frechet formula of
:func:`evaluation.metrics.frechet_distance`. A per-image value (e.g. a per-seed distance) is compared with
:func:`paired_mean_difference`. Randomness comes only from the ``numpy.random.Generator`` passed in.

When only a handful of paired replicate values exist (e.g. one FD per disjoint seed range, the same ranges for A
and B) and the images themselves are gone, :func:`paired_t_interval` gives the Student-t interval of the mean
paired difference instead of a bootstrap.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np
import scipy.stats

from evaluation import metrics

#: Default number of bootstrap resamples and coverage of the intervals.
DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95


class PairedError(ValueError):
    """Inputs that cannot be compared: mismatched shapes or seeds, too few images, a bad confidence."""


@dataclasses.dataclass
class PairedResult:
    """A paired comparison. ``fd_a``/``fd_b`` are the point estimates (with several training seeds: their mean over
    training seeds), ``diff`` = fd_a - fd_b, ``diff_mean`` the mean of the resampled differences, ``ci_low``/
    ``ci_high`` the percentile interval of coverage ``confidence`` and ``diff_se`` the bootstrap standard error (the
    standard deviation of the resampled differences) from ``num_resamples`` resamples, over
    ``num_images`` seeds and ``num_models`` training seeds per setting.

    For a contrast sum_k w_k FD_k (:func:`paired_fd_contrast`) ``fd_a`` is the weighted sum of the terms with a
    positive weight, sum_{w_k > 0} w_k FD_k, and ``fd_b`` that of the negative ones with their weights' magnitudes,
    sum_{w_k < 0} |w_k| FD_k (0 when there are none), so that ``diff`` = fd_a - fd_b (up to rounding) is the contrast
    and every other field describes it as it does a difference.

    From :func:`paired_t_interval` (K replicate values, no bootstrap) ``diff_se`` is the standard error of the mean
    difference, the interval is Student's t interval, ``num_resamples`` is 0 and ``num_images`` counts the K
    replicates."""
    fd_a: float
    fd_b: float
    diff: float
    diff_mean: float
    diff_se: float
    ci_low: float
    ci_high: float
    confidence: float
    num_resamples: int
    num_images: int
    num_models: int = 1

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies entirely above or entirely below zero."""
        return self.ci_low > 0 or self.ci_high < 0

    def as_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), excludes_zero=self.excludes_zero)


def _as_models(features: np.ndarray | Sequence[np.ndarray], name: str) -> np.ndarray:
    """Features as [M, N, F] float64: one [N, F] array is one model, a sequence of them several training seeds."""
    try:
        array = np.asarray(features, dtype=np.float64)
    except ValueError:   # training seeds with different numbers of images or features
        raise PairedError(f'features {name} of several training seeds differ in shape; expected [models, N, F] '
                          f'with the same seeds for every model') from None
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise PairedError(f'features {name} have shape {list(array.shape)}; expected [N, F] or [models, N, F]')
    if not np.all(np.isfinite(array)):
        raise PairedError(f'features {name} hold NaN or infinite values')
    return array


def _check(a: np.ndarray, b: np.ndarray, confidence: float, num_resamples: int) -> None:
    if a.shape != b.shape:
        raise PairedError(f'features A have shape {list(a.shape)} but B {list(b.shape)}; a paired comparison needs '
                          f'the same seeds (and training seeds) on both sides')
    _check_settings(a, confidence, num_resamples)


def _check_settings(a: np.ndarray, confidence: float, num_resamples: int) -> None:
    """The checks that do not depend on the pairing: images per model, confidence, resamples."""
    if a.shape[1] < 2:
        raise PairedError(f'{a.shape[1]} image(s) per setting; need at least 2 for a covariance')
    if not 0 < confidence < 1:
        raise PairedError(f'confidence {confidence}; expected a value between 0 and 1, e.g. 0.95')
    if num_resamples < 2:
        raise PairedError(f'{num_resamples} bootstrap resamples; need at least 2 (e.g. 1000)')


def _weighted_fd(features: np.ndarray, counts: np.ndarray, reference: metrics.FrechetReference) -> float:
    """FD of the multiset that holds row i of ``features`` [N, F] ``counts[i]`` times (a bootstrap resample),
    with the unbiased covariance of :func:`evaluation.metrics.feature_moments`; no copy of the repeated rows."""
    n = counts.sum()
    mu = counts @ features / n
    centered = features - mu
    sigma = (centered.T * counts) @ centered / (n - 1)
    return reference.distance(mu, sigma)


def frechet_of(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """FD of the features [N, F] against the reference moments mu_ref [F], sigma_ref [F, F] (float64)."""
    return metrics.frechet_distance(*metrics.feature_moments(features), mu_ref, sigma_ref)


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


def _as_weights(weights: Sequence[float], num_sets: int) -> np.ndarray:
    """The contrast weights as a [K] float64 array; PairedError unless one finite weight per set."""
    try:
        array = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise PairedError(f'weights {weights!r}; expected one number per feature set') from None
    if array.ndim != 1 or array.shape[0] != num_sets:
        raise PairedError(f'{array.size} weight(s) for {num_sets} feature set(s); expected one weight per set')
    if not np.all(np.isfinite(array)):
        raise PairedError(f'weights {array.tolist()} hold NaN or infinite values; expected finite numbers')
    return array


def _contrast_sets(feature_sets: Sequence[np.ndarray | Sequence[np.ndarray]], confidence: float,
                   num_resamples: int) -> list[np.ndarray]:
    """The sets of a contrast as [M, N, F] arrays, all of one shape, with the settings checked."""
    if len(feature_sets) == 0:
        raise PairedError('no feature sets; a contrast needs at least one')
    sets = [_as_models(features, f'set {k}') for k, features in enumerate(feature_sets)]
    for k, features in enumerate(sets[1:], start=1):
        if features.shape != sets[0].shape:
            raise PairedError(f'features set {k} have shape {list(features.shape)} but set 0 '
                              f'{list(sets[0].shape)}; a paired contrast needs the same seeds (and training seeds) '
                              f'in every set')
    _check_settings(sets[0], confidence, num_resamples)
    return sets


def paired_fd_contrast(feature_sets: Sequence[np.ndarray | Sequence[np.ndarray]], weights: Sequence[float],
                       mu_ref: np.ndarray, sigma_ref: np.ndarray, generator: np.random.Generator,
                       num_resamples: int = DEFAULT_RESAMPLES,
                       confidence: float = DEFAULT_CONFIDENCE) -> PairedResult:
    """Paired bootstrap of the linear contrast sum_k ``weights[k]`` FD(``feature_sets[k]``) on the same seeds.

    The bootstrap is Efron & Tibshirani's (1993, "An Introduction to the Bootstrap", ch. 6 and 13; percentile
    interval), two-level with several training seeds (module docstring). Every set is [N, F] float, row i the
    image of seed i in all sets; or [M, N, F] (a sequence of M such arrays) for M training seeds per setting, model
    m of every set paired (e.g. the same training seed). Each resample draws M training seeds with replacement
    (when M > 1), then for each draw N image seeds with replacement, in the order :func:`paired_fd_difference`
    always drew them, and applies the *same* counts to every set; the M contrasts are averaged. Example, does a
    perturbation hurt A more than B: sets (A_perturbed, A_clean, B_perturbed, B_clean), weights (1, -1, -1, 1).

    ``weights``: K finite numbers, one per set (a zero weight leaves its set out of the FDs computed). ``mu_ref``
    [F] and ``sigma_ref`` [F, F] are the reference moments (held fixed). ``generator`` draws every index. Returns a
    :class:`PairedResult` in FD units whose ``fd_a``/``fd_b`` are the positive and negative parts of the contrast
    (see there). Raises PairedError for no set, a number of weights other than the number of sets, a non-finite
    weight, sets of different shapes, fewer than 2 images, non-finite features, fewer than 2 resamples or a
    confidence outside (0, 1).

    Cost: M ``num_resamples`` Frechet distances per set of nonzero weight (see :func:`paired_fd_difference`).
    """
    sets = _contrast_sets(feature_sets, confidence, num_resamples)
    w = _as_weights(weights, len(sets))
    models, count = sets[0].shape[0], sets[0].shape[1]
    mu_ref, sigma_ref = np.asarray(mu_ref, dtype=np.float64), np.asarray(sigma_ref, dtype=np.float64)
    terms = [(float(w[k]), sets[k]) for k in range(len(sets)) if w[k] != 0]
    reference = metrics.FrechetReference(mu_ref, sigma_ref)   # one square root of sigma_ref for every resample
    # Point estimates per model: the contrast and its positive and negative parts.
    positive, negative, contrast = np.zeros(models), np.zeros(models), np.zeros(models)
    for m in range(models):
        for weight, features in terms:
            fd = frechet_of(features[m], mu_ref, sigma_ref)
            contrast[m] += weight * fd
            if weight > 0:
                positive[m] += weight * fd
            else:
                negative[m] += -weight * fd
    diffs = np.empty(num_resamples)
    for r in range(num_resamples):
        chosen = generator.integers(0, models, size=models) if models > 1 else np.zeros(1, dtype=np.int64)
        total = 0.0
        for m in chosen:
            counts = np.bincount(generator.integers(0, count, size=count), minlength=count).astype(np.float64)
            value = 0.0
            for weight, features in terms:
                value += weight * _weighted_fd(features[m], counts, reference)
            total += value
        diffs[r] = total / models
    low, high = _percentile_interval(diffs, confidence)
    return PairedResult(fd_a=float(positive.mean()), fd_b=float(negative.mean()), diff=float(contrast.mean()),
                        diff_mean=float(diffs.mean()), diff_se=float(diffs.std(ddof=1)), ci_low=low, ci_high=high,
                        confidence=confidence, num_resamples=num_resamples, num_images=count, num_models=models)


def paired_fd_difference(features_a: np.ndarray | Sequence[np.ndarray], features_b: np.ndarray | Sequence[np.ndarray],
                         mu_ref: np.ndarray, sigma_ref: np.ndarray, generator: np.random.Generator,
                         num_resamples: int = DEFAULT_RESAMPLES,
                         confidence: float = DEFAULT_CONFIDENCE) -> PairedResult:
    """Paired bootstrap of FD(A) - FD(B) on the same seeds (method: module docstring; Efron & Tibshirani 1993).

    ``features_a``/``features_b``: [N, F] float arrays, row i the image of seed i in both; or [M, N, F] (a sequence
    of M such arrays) for M training seeds per setting, model m of A paired with model m of B (e.g. the same
    training seed), which turns on the two-level bootstrap: each resample draws M training seeds with replacement,
    then for each draw N image seeds with replacement (the same for A and B), and averages the M differences.
    ``mu_ref`` [F] and ``sigma_ref`` [F, F] are the reference moments (held fixed). ``generator`` draws every
    index. Returns a :class:`PairedResult` in FD units. Raises PairedError for mismatched shapes, fewer than 2
    images, non-finite features, fewer than 2 resamples or a confidence outside (0, 1).

    It is :func:`paired_fd_contrast` with weights (1, -1): the same draws from ``generator`` and, as 1.0 * x - y
    is exact, the same numbers to the bit as before the contrast existed.

    Cost: 2 M ``num_resamples`` Frechet distances, each O(N F^2) for the moments plus an F x F matrix square root:
    milliseconds at the digits classifier's F = 64, seconds at Inception's F = 2048.
    """
    a, b = _as_models(features_a, 'A'), _as_models(features_b, 'B')
    _check(a, b, confidence, num_resamples)   # the two-sided wording of the errors
    return paired_fd_contrast([a, b], (1.0, -1.0), mu_ref, sigma_ref, generator, num_resamples, confidence)


def paired_mean_difference(values_a: np.ndarray, values_b: np.ndarray, generator: np.random.Generator,
                           num_resamples: int = DEFAULT_RESAMPLES,
                           confidence: float = DEFAULT_CONFIDENCE) -> PairedResult:
    """Paired bootstrap of mean(A) - mean(B) for a per-image value ([N] each, the same seeds in the same order, or
    [M, N] for M training seeds, resampled on two levels as in :func:`paired_fd_difference`). The ``fd_a``/``fd_b``
    fields hold the two means. Raises PairedError as :func:`paired_fd_difference` does."""
    a, b = (_as_models(np.asarray(v, dtype=np.float64)[..., None], name) for v, name in ((values_a, 'A'),
                                                                                        (values_b, 'B')))
    _check(a, b, confidence, num_resamples)
    models, count = a.shape[0], a.shape[1]
    delta = (a - b)[..., 0]
    if models == 1:
        index = generator.integers(0, count, size=(num_resamples, count))
        diffs = delta[0][index].mean(axis=1)
    else:
        chosen = generator.integers(0, models, size=(num_resamples, models))
        index = generator.integers(0, count, size=(num_resamples, models, count))
        diffs = delta[chosen[..., None], index].mean(axis=(1, 2))
    low, high = _percentile_interval(diffs, confidence)
    return PairedResult(fd_a=float(a.mean()), fd_b=float(b.mean()), diff=float(delta.mean()),
                        diff_mean=float(diffs.mean()), diff_se=float(diffs.std(ddof=1)), ci_low=low, ci_high=high,
                        confidence=confidence,
                        num_resamples=num_resamples, num_images=count, num_models=models)


def paired_t_interval(values_a: Sequence[float] | np.ndarray, values_b: Sequence[float] | np.ndarray,
                      confidence: float = DEFAULT_CONFIDENCE) -> PairedResult:
    """Student-t interval for mean(A - B) from K paired replicate values, e.g. the FD of each of K disjoint seed
    ranges scored for both settings (replicate k of A and of B from the same seeds).

    The paired t interval (Student 1908, "The probable error of a mean"; any statistics text): with d_k = a_k - b_k,
    the interval is mean(d) -/+ t_{(1 + confidence) / 2, K - 1} * sd(d) / sqrt(K), sd with K - 1 in the
    denominator. It assumes the K differences are independent draws from one normal distribution; with few
    replicates it is wide (at K = 3 the t quantile is 4.30 for 95%), which is the honest price of few replicates.
    No resampling and no generator: the result is a pure function of the values.

    ``values_a``/``values_b``: [K] finite floats each, K >= 2, the same replicates in the same order. Returns a
    :class:`PairedResult` whose ``fd_a``/``fd_b`` are the two means, ``diff`` and ``diff_mean`` the mean difference,
    ``diff_se`` its standard error sd(d) / sqrt(K), ``ci_low``/``ci_high`` the t interval, ``num_resamples`` 0 (no
    bootstrap), ``num_images`` K (here it counts replicates, not images) and ``num_models`` 1. Raises PairedError
    for values that are not [K] arrays of one length, K < 2, non-finite values or a confidence outside (0, 1).
    """
    arrays = []
    for values, name in ((values_a, 'A'), (values_b, 'B')):
        try:
            array = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise PairedError(f'values {name} {values!r}; expected a list of numbers, one per replicate') from None
        if array.ndim != 1:
            raise PairedError(f'values {name} have shape {list(array.shape)}; expected [K], one per replicate')
        arrays.append(array)
    a, b = arrays
    if a.shape != b.shape:
        raise PairedError(f'{a.size} value(s) for A but {b.size} for B; a paired interval needs the same '
                          f'replicates (e.g. seed ranges) on both sides')
    if a.size < 2:
        raise PairedError(f'{a.size} replicate(s); need at least 2 for a t interval')
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise PairedError('values hold NaN or infinite values; expected finite numbers')
    if not 0 < confidence < 1:
        raise PairedError(f'confidence {confidence}; expected a value between 0 and 1, e.g. 0.95')
    count = a.size
    delta = a - b
    mean = float(delta.mean())
    se = float(delta.std(ddof=1) / np.sqrt(count))
    half = float(scipy.stats.t.ppf((1 + confidence) / 2, count - 1)) * se
    return PairedResult(fd_a=float(a.mean()), fd_b=float(b.mean()), diff=mean, diff_mean=mean, diff_se=se,
                        ci_low=mean - half, ci_high=mean + half, confidence=confidence, num_resamples=0,
                        num_images=count, num_models=1)


def doubling_sizes(count: int, smallest: int) -> list[int]:
    """Nested prefix sizes smallest, 2*smallest, 4*smallest, ... below ``count``, then ``count`` itself."""
    if smallest < 2 or count < smallest:
        raise PairedError(f'{count} images; the smallest prefix has {smallest} and must be at least 2')
    sizes = []
    size = smallest
    while size < count:
        sizes.append(size)
        size *= 2
    return sizes + [count]


@dataclasses.dataclass
class PowerResult:
    """The paired comparison on every prefix size (``steps``) and the number of images that decides
    (``n_needed``, see :func:`images_needed`; None when not even all images do). ``full``: all images."""
    steps: list[PairedResult]
    n_needed: Optional[int]

    @property
    def full(self) -> PairedResult:
        return self.steps[-1]


def images_needed(features_a: np.ndarray | Sequence[np.ndarray], features_b: np.ndarray | Sequence[np.ndarray],
                  mu_ref: np.ndarray, sigma_ref: np.ndarray, generator: np.random.Generator,
                  num_resamples: int = DEFAULT_RESAMPLES, confidence: float = DEFAULT_CONFIDENCE,
                  smallest: Optional[int] = None) -> PowerResult:
    """How many images the paired FD comparison needs for its interval to exclude zero: the interval of
    :func:`paired_fd_difference` on the first n seeds for n in :func:`doubling_sizes` (from ``smallest``; default
    max(8, 2 F) capped at N, so the first covariances are not rank-deficient). ``n_needed`` is the smallest n from
    which the interval of every prefix excludes zero on the side of the full set's: a small prefix whose interval
    excludes zero by chance, or on the wrong side, does not count when a larger one then includes zero. The prefixes
    are nested (seeds 0..n-1), as a study that adds images would see them. Arrays and errors as
    :func:`paired_fd_difference`; it is :func:`contrast_images_needed` with weights (1, -1)."""
    a, b = _as_models(features_a, 'A'), _as_models(features_b, 'B')
    _check(a, b, confidence, num_resamples)   # the two-sided wording of the errors
    return contrast_images_needed([a, b], (1.0, -1.0), mu_ref, sigma_ref, generator, num_resamples, confidence,
                                  smallest)


def contrast_images_needed(feature_sets: Sequence[np.ndarray | Sequence[np.ndarray]], weights: Sequence[float],
                           mu_ref: np.ndarray, sigma_ref: np.ndarray, generator: np.random.Generator,
                           num_resamples: int = DEFAULT_RESAMPLES, confidence: float = DEFAULT_CONFIDENCE,
                           smallest: Optional[int] = None) -> PowerResult:
    """:func:`images_needed` for a linear contrast: the interval of :func:`paired_fd_contrast` on the first n seeds
    of every set (nested doubling prefixes, the same n for all sets and training seeds), and the smallest n from
    which every prefix's interval excludes zero on the full set's side (None when not even all seeds do). Arrays,
    weights and errors as :func:`paired_fd_contrast`; ``smallest`` as :func:`images_needed`. Cost: the contrast's
    on every prefix, i.e. M ``num_resamples`` Frechet distances per set of nonzero weight and prefix; the O(N F^2)
    moments of all prefixes together cost under twice the full set's, the F x F square roots once per prefix."""
    sets = _contrast_sets(feature_sets, confidence, num_resamples)
    _as_weights(weights, len(sets))
    count, dim = sets[0].shape[1], sets[0].shape[2]
    if smallest is None:
        smallest = min(count, max(8, 2 * dim))
    steps = [paired_fd_contrast([s[:, :n] for s in sets], weights, mu_ref, sigma_ref, generator, num_resamples,
                                confidence)
             for n in doubling_sizes(count, smallest)]
    needed = None
    for step in reversed(steps):   # the smallest n from which every larger prefix decides the same way
        if not step.excludes_zero or (step.ci_low > 0) != (steps[-1].ci_low > 0):
            break
        needed = step.num_images
    return PowerResult(steps=steps, n_needed=needed)
