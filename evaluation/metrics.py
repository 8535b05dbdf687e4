"""Sample-quality metrics on detector features: Frechet distance (FID, FD-DINOv2), KID, improved precision/recall,
percentile-bootstrap confidence intervals, and the DINOv2 ViT-L/14 detector of FD-DINOv2.

Every metric here is a function of feature arrays, so one pass of the detectors over the images serves all of them
(:mod:`evaluation.features` runs that pass, :mod:`evaluation.runs` the commands of ``fid.py``). Definitions:

- Frechet distance between Gaussians fitted to the features (Heusel et al. 2017, "GANs trained by a two time-scale
  update rule", eq. 6): |mu - mu_ref|^2 + tr(S + S_ref - 2 sqrtm(S S_ref)). FID uses Inception-v3 pool features
  (2048), FD-DINOv2 the DINOv2 ViT-L/14 class token (1024) as EDM2 does (Karras et al. 2024; Stein et al. 2023).
- KID (Binkowski et al. 2018, "Demystifying MMD GANs", eq. 4 with the kernel of section 4): the unbiased estimator
  of MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets; the subset
  count and size (100 subsets of min(1000, n_gen, n_ref) images each, drawn without replacement within a subset)
  are those of StyleGAN2-ADA's and torch-fidelity's implementations, whose numbers papers report.
- Improved precision and recall (Kynkaanniemi et al. 2019, eqs. 1-3): each set's manifold is the union of balls
  around its points whose radius is the distance to the point's k-th nearest neighbour in the same set (k = 3);
  precision is the fraction of generated points inside the reference manifold, recall the fraction of reference
  points inside the generated one. The paper uses VGG-16 fc2 features; here they are the FID detector's Inception
  features, as ADM's evaluation suite (Dhariwal & Nichol 2021) computes them, so no third network is needed and the
  features come from the same pass.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import scipy.linalg
import torch

import dnnlib

#: Feature arrays: numpy on the host, or tensors already on the device the metric runs on.
Array = Union[np.ndarray, torch.Tensor]

#: Metric names accepted by ``--metrics``, and the result keys each one reports (``name value`` lines, JSON lines).
METRICS = ('fid', 'fd_dinov2', 'kid', 'pr')
RESULT_KEYS = {'fid': ('fid',), 'fd_dinov2': ('fd_dinov2',), 'kid': ('kid',), 'pr': ('precision', 'recall')}

#: Which detector's features each metric reads.
INCEPTION, DINOV2 = 'inception', 'dinov2'
DETECTOR_OF = {'fid': INCEPTION, 'fd_dinov2': DINOV2, 'kid': INCEPTION, 'pr': INCEPTION}

#: Reference-file keys each metric needs. ``mu``/``sigma`` are the FID statistics of today's (and NVIDIA's) files.
REF_KEYS = {'fid': ('mu', 'sigma'), 'fd_dinov2': ('fd_dinov2_mu', 'fd_dinov2_sigma'), 'kid': ('features',),
            'pr': ('features',)}

#: Imaginary parts of sqrtm(sigma @ sigma_ref) above this fraction of its largest real entry are reported.
SQRTM_IMAG_TOLERANCE = 1e-6

#: KID: subsets per estimate and their maximum size (StyleGAN2-ADA / torch-fidelity), and the kernel's degree.
KID_NUM_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_DEGREE = 3

#: Improved precision/recall: the k of the k-nearest-neighbour radii (Kynkaanniemi et al. 2019, section 3).
PR_NEIGHBOURS = 3

#: Rows of a distance matrix computed at once; bounds memory at this many x n float64 values.
DISTANCE_BLOCK = 2048


class MetricError(ValueError):
    """Input a metric cannot be computed from (too few features, mismatched dimensions, missing reference data)."""


def parse_metrics(text: str) -> list[str]:
    """``'fid,kid'`` -> ``['fid', 'kid']``: known names only, in the given order, each once."""
    names = [name.strip() for name in text.split(',') if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise MetricError(f'unknown metric {unknown[0]!r}' if unknown else 'no metric named')
    return list(dict.fromkeys(names))


def result_keys(metrics: Sequence[str]) -> list[str]:
    """Reported names for the chosen metrics, in order (``pr`` reports precision and recall)."""
    return [key for metric in metrics for key in RESULT_KEYS[metric]]


def detectors_for(metrics: Sequence[str]) -> list[str]:
    """The detectors the chosen metrics need, each once, Inception first."""
    return [d for d in (INCEPTION, DINOV2) if any(DETECTOR_OF[m] == d for m in metrics)]


def missing_reference_keys(metrics: Sequence[str], available: Sequence[str]) -> dict[str, list[str]]:
    """For each metric whose reference data is absent from ``available`` keys, the missing keys."""
    missing = {m: [k for k in REF_KEYS[m] if k not in available] for m in metrics}
    return {m: keys for m, keys in missing.items() if keys}


# ----------------------------------------------------------------------------
# Frechet distance.


def feature_moments(features: Array) -> tuple[np.ndarray, np.ndarray]:
    """Mean [d] and unbiased covariance [d, d] (divided by n - 1) of features [n, d], computed in float64 on the
    features' device (numpy arrays: the CPU), returned as numpy arrays."""
    data = torch.as_tensor(features).to(torch.float64)
    if data.ndim != 2 or data.shape[0] < 2:
        raise MetricError(f'features of shape {list(data.shape)}; need [n, d] with n >= 2 for a covariance')
    mu = data.mean(dim=0)
    centered = data - mu
    sigma = centered.T @ centered / (data.shape[0] - 1)
    return tuple(moment.to('cpu').numpy() for moment in (mu, sigma))


def _check_same_detector(mu: np.ndarray, sigma: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> None:
    if mu.shape != mu_ref.shape or sigma.shape != sigma_ref.shape:
        raise MetricError(f'statistics have {mu.shape[0]} features but the reference has {mu_ref.shape[0]}; '
                          f'the reference must come from the same detector')


def frechet_distance(mu: np.ndarray, sigma: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """Frechet distance between N(mu, sigma) and N(mu_ref, sigma_ref) (Heusel et al. 2017, eq. 6), float64.

    |mu - mu_ref|^2 + tr(sigma + sigma_ref - 2 sqrtm(sigma sigma_ref)), real part: sqrtm of a product of
    covariances can pick up imaginary round-off, reported by a RuntimeWarning when larger than round-off.
    Shapes [d] and [d, d]. Raises MetricError for mismatched dimensions or a non-finite sqrtm.
    """
    _check_same_detector(mu, sigma, mu_ref, sigma_ref)
    mean_term = np.square(mu - mu_ref).sum()
    root = scipy.linalg.sqrtm(sigma @ sigma_ref)
    if isinstance(root, tuple):  # SciPy versions that still return (root, error estimate)
        root = root[0]
    if not np.all(np.isfinite(root)):
        raise MetricError('sqrtm(sigma @ sigma_ref) is not finite; the statistics are degenerate')
    if np.iscomplexobj(root):
        imag = float(np.abs(root.imag).max())
        scale = max(float(np.abs(root.real).max()), np.finfo(np.float64).tiny)
        if imag > SQRTM_IMAG_TOLERANCE * scale:
            warnings.warn(f'FD: sqrtm(sigma @ sigma_ref) has imaginary parts up to {imag:.3g} (largest real entry '
                          f'{scale:.3g}); using the real part', RuntimeWarning, stacklevel=3)
        root = root.real
    return float(mean_term + np.trace(sigma) + np.trace(sigma_ref) - 2 * np.trace(root))


class FrechetReference:
    """:func:`frechet_distance` against one fixed reference, for many statistics (a bootstrap's resamples).

    The trace term is computed without a general matrix square root: with R = sigma_ref^(1/2) (symmetric, from one
    eigendecomposition), sigma @ sigma_ref = (sigma R) R has the eigenvalues of R sigma R, which is symmetric positive
    semi-definite, so tr sqrtm(sigma @ sigma_ref) = sum of the square roots of its eigenvalues (negative round-off
    clipped to 0). Same value as :func:`frechet_distance` to float64 round-off, tens of times faster at d = 64.
    ``mu_ref`` [d], ``sigma_ref`` [d, d] (symmetric). Raises MetricError for a non-finite reference.
    """

    def __init__(self, mu_ref: np.ndarray, sigma_ref: np.ndarray):
        self.mu_ref = np.asarray(mu_ref, dtype=np.float64)
        self.sigma_ref = np.asarray(sigma_ref, dtype=np.float64)
        if not (np.all(np.isfinite(self.mu_ref)) and np.all(np.isfinite(self.sigma_ref))):
            raise MetricError('the reference statistics hold NaN or infinite values')
        values, vectors = np.linalg.eigh((self.sigma_ref + self.sigma_ref.T) / 2)
        self.root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
        self.trace_ref = float(np.trace(self.sigma_ref))

    def distance(self, mu: np.ndarray, sigma: np.ndarray) -> float:
        """FD of N(mu, sigma) ([d], [d, d] symmetric) to the reference; MetricError for mismatched dimensions."""
        _check_same_detector(mu, sigma, self.mu_ref, self.sigma_ref)
        inner = self.root @ sigma @ self.root
        eigen = np.linalg.eigvalsh((inner + inner.T) / 2)
        trace_root = float(np.sqrt(np.clip(eigen, 0, None)).sum())
        return float(np.square(mu - self.mu_ref).sum() + np.trace(sigma) + self.trace_ref - 2 * trace_root)


# ----------------------------------------------------------------------------
# KID.


def _check_pair(features: Array, ref_features: Array, minimum: int,
                what: str) -> None:
    for name, array in (('generated', features), ('reference', ref_features)):
        if array.ndim != 2 or array.shape[0] < minimum:
            raise MetricError(f'{what} needs at least {minimum} {name} feature vectors; got shape '
                              f'{list(array.shape)}')
    if features.shape[1] != ref_features.shape[1]:
        raise MetricError(f'{what}: generated features have {features.shape[1]} dimensions but the reference has '
                          f'{ref_features.shape[1]}; the reference must come from the same detector')


def kid_subset_size(num: int, num_ref: int, subset_size: int = KID_SUBSET_SIZE) -> int:
    """Images per KID subset: ``subset_size``, or fewer when either set is smaller."""
    return min(subset_size, num, num_ref)


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, skip_diagonal: bool) -> float:
    """Sum of (a.b / d + 1)^KID_DEGREE over all pairs of rows (or all pairs i != j).

    The dot products are taken in the features' own dtype (float32 for detector features: their rounding is
    random and averages out over the m^2 terms); the kernel values and the sums are float64, where the estimate's
    small difference of large sums is decided."""
    gram = (a @ b.T).to(torch.float64) / a.shape[1] + 1
    values = gram ** KID_DEGREE
    return float(values.sum() - (values.diagonal().sum() if skip_diagonal else 0))


def kernel_inception_distance(features: Array, ref_features: Array,
                              generator: np.random.Generator, num_subsets: int = KID_NUM_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, device: torch.device | str = 'cpu') -> float:
    """KID: the unbiased MMD^2 estimate with k(x, y) = (x.y / d + 1)^3, averaged over random subsets.

    Binkowski et al. 2018, eq. 4: for subsets X, Y of m points each,
    MMD^2_u = sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2.
    Each of ``num_subsets`` subsets draws m = min(subset_size, n, n_ref) generated and m reference rows without
    replacement from ``generator``. Features [n, d] and [n_ref, d] (float32 or float64, both the same), on
    ``device``. Raises MetricError for fewer than 2 rows or mismatched d.
    """
    _check_pair(features, ref_features, 2, 'KID')
    gen_t = torch.as_tensor(features, device=device)
    ref_t = torch.as_tensor(ref_features, device=device).to(gen_t.dtype)
    m = kid_subset_size(gen_t.shape[0], ref_t.shape[0], subset_size)
    total = 0.0
    for _ in range(num_subsets):
        x = gen_t[torch.as_tensor(generator.choice(gen_t.shape[0], m, replace=False), device=device)]
        y = ref_t[torch.as_tensor(generator.choice(ref_t.shape[0], m, replace=False), device=device)]
        within = (_kernel_sum(x, x, skip_diagonal=True) + _kernel_sum(y, y, skip_diagonal=True)) / (m * (m - 1))
        total += within - 2 * _kernel_sum(x, y, skip_diagonal=False) / (m * m)
    return total / num_subsets


# ----------------------------------------------------------------------------
# Improved precision and recall.


def _squared_distances(rows: torch.Tensor, cols: torch.Tensor, cols_sq: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """Squared Euclidean distances [len(rows), len(cols)] by the Gram formula, clamped at 0, and a bound on the
    formula's round-off for each entry (float64 epsilon x feature dim x the squared norms involved)."""
    rows_sq = rows.square().sum(dim=1, keepdim=True)
    dist = (rows_sq + cols_sq[None, :] - 2 * rows @ cols.T).clamp_(min=0)
    slack = (rows_sq + cols_sq[None, :]) * (torch.finfo(torch.float64).eps * rows.shape[1])
    return dist, slack


def manifold_radii(features: Array, k: int = PR_NEIGHBOURS, device: torch.device | str = 'cpu',
                   block: int = DISTANCE_BLOCK) -> np.ndarray:
    """Squared distance [n] from each row of ``features`` [n, d] to its k-th nearest other row (same set).

    A point's own zero distance is skipped by taking the (k+1)-th smallest distance of its row, as the reference
    implementations do. Raises MetricError with k or fewer points.
    """
    if features.shape[0] <= k:
        raise MetricError(f'precision/recall with k={k} needs more than {k} images in each set; got '
                          f'{features.shape[0]}')
    data = torch.as_tensor(features, device=device).to(torch.float64)
    data_sq = data.square().sum(dim=1)
    radii = []
    for start in range(0, data.shape[0], block):
        dist, _ = _squared_distances(data[start:start + block], data, data_sq)
        radii.append(dist.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii).cpu().numpy()


def inside_manifold(points: Array, centers: Array, radii: np.ndarray, device: torch.device | str = 'cpu',
                    block: int = DISTANCE_BLOCK) -> np.ndarray:
    """For each row of ``points`` [n, d]: is it within the radius of some row of ``centers`` [m, d]? bool [n].

    ``radii`` [m] are squared radii from :func:`manifold_radii`. A distance that equals a radius up to the Gram
    formula's round-off counts as inside, so a set always lies inside its own manifold.
    """
    centers_t = torch.as_tensor(centers, device=device).to(torch.float64)
    centers_sq = centers_t.square().sum(dim=1)
    radii_t = torch.as_tensor(radii, device=device, dtype=torch.float64)
    data = torch.as_tensor(points, device=device).to(torch.float64)
    inside = []
    for start in range(0, data.shape[0], block):
        dist, slack = _squared_distances(data[start:start + block], centers_t, centers_sq)
        inside.append((dist <= radii_t[None, :] + 2 * slack).any(dim=1))
    return torch.cat(inside).cpu().numpy()


def precision_recall(features: Array, ref_features: Array, k: int = PR_NEIGHBOURS,
                     device: torch.device | str = 'cpu') -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of generated ``features`` [n, d] against
    ``ref_features`` [n_ref, d], with k-nearest-neighbour manifolds (k = 3). Both in [0, 1].

    Precision: fraction of generated points inside the reference manifold; recall: fraction of reference points
    inside the generated manifold. Raises MetricError for k or fewer points in a set or mismatched d.
    """
    _check_pair(features, ref_features, k + 1, 'precision/recall')
    precision = inside_manifold(features, ref_features, manifold_radii(ref_features, k, device), device).mean()
    return float(precision), _recall(features, ref_features, k, device)


def _recall(features: Array, ref_features: Array, k: int, device: torch.device | str) -> float:
    return float(inside_manifold(ref_features, features, manifold_radii(features, k, device), device).mean())


# ----------------------------------------------------------------------------
# All chosen metrics from one set of features, and their bootstrap intervals.


@dataclasses.dataclass
class Features:
    """One detector's view of one image set: the accumulated float64 moments and, when a metric or the bootstrap
    needs them, the features themselves ([count, d], in the order the images were listed)."""
    mu: np.ndarray
    sigma: np.ndarray
    count: int
    features: Optional[np.ndarray] = None


def needs_features(metrics: Sequence[str], bootstrap: int) -> set[str]:
    """Detectors whose individual features (not only the moments) must be kept for these metrics."""
    keep = {DETECTOR_OF[m] for m in metrics if m in ('kid', 'pr')}
    if bootstrap:
        keep |= {DETECTOR_OF[m] for m in metrics}
    return keep


def compute_metrics(metrics: Sequence[str], gen: dict[str, Features], ref: dict[str, np.ndarray], seed: int = 0,
                    device: torch.device | str = 'cpu') -> dict[str, float]:
    """Values of the chosen metrics (keys :func:`result_keys`) of the generated features ``gen`` (by detector)
    against the reference arrays ``ref`` (keys :data:`REF_KEYS`). KID's subsets are drawn from a generator seeded
    with ``seed``. Raises MetricError when the reference lacks what a metric needs."""
    missing = missing_reference_keys(metrics, list(ref))
    if missing:
        metric, keys = next(iter(missing.items()))
        raise MetricError(f'the reference has no {", ".join(keys)} (needed by {metric})')
    results: dict[str, float] = {}
    for metric in metrics:
        source = gen[DETECTOR_OF[metric]]
        if metric in ('fid', 'fd_dinov2'):
            mu_key, sigma_key = REF_KEYS[metric]
            results[metric] = frechet_distance(source.mu, source.sigma, ref[mu_key], ref[sigma_key])
        elif metric == 'kid':
            results['kid'] = kernel_inception_distance(source.features, ref['features'],
                                                       np.random.default_rng(seed), device=device)
        else:
            results['precision'], results['recall'] = precision_recall(source.features, ref['features'],
                                                                       device=device)
    return results


def bootstrap_intervals(metrics: Sequence[str], gen: dict[str, Features], ref: dict[str, np.ndarray],
                        num_resamples: int, confidence: float = 0.95, seed: int = 0,
                        device: torch.device | str = 'cpu',
                        progress: Callable[[Any], Any] = lambda it: it) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap confidence intervals (Efron & Tibshirani 1993, ch. 13) for each result key.

    Each resample draws n generated images with replacement (seeded with ``seed``; the same images for every
    detector) while the reference stays fixed, recomputes every metric, and the interval is the
    (1 - confidence)/2 and (1 + confidence)/2 quantiles of the resampled values. FD and precision use the resample
    with its repeats; KID's within-set kernel terms and recall's k-NN radii compare generated images with each
    other, where a repeated image would be its own neighbour, so they use the distinct images of the resample.
    """
    rng = np.random.default_rng(seed)
    count = next(iter(gen.values())).count
    on_device = {name: torch.as_tensor(gen[name].features, device=device) for name in {DETECTOR_OF[m] for m in metrics}}
    ref_features = None if 'features' not in ref else torch.as_tensor(ref['features'], device=device)
    precision_inside = None
    if 'pr' in metrics:
        radii = manifold_radii(ref['features'], PR_NEIGHBOURS, device)
        precision_inside = inside_manifold(gen[INCEPTION].features, ref['features'], radii, device)
    samples: dict[str, list[float]] = {key: [] for key in result_keys(metrics)}
    for _ in progress(range(num_resamples)):
        index = rng.integers(0, count, size=count)
        distinct = np.unique(index)
        for metric in metrics:
            features = on_device[DETECTOR_OF[metric]]
            if metric in ('fid', 'fd_dinov2'):
                mu_key, sigma_key = REF_KEYS[metric]
                moments = feature_moments(features[torch.as_tensor(index, device=device)])
                samples[metric].append(frechet_distance(*moments, ref[mu_key], ref[sigma_key]))
            elif metric == 'kid':
                samples['kid'].append(kernel_inception_distance(features[torch.as_tensor(distinct, device=device)],
                                                                ref_features, rng, device=device))
            else:
                samples['precision'].append(float(precision_inside[index].mean()))
                samples['recall'].append(_recall(features[torch.as_tensor(distinct, device=device)], ref_features,
                                                 PR_NEIGHBOURS, device))
    tail = (1 - confidence) / 2
    return {key: (float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail)))
            for key, values in samples.items()}


def summarize_repeats(values: Sequence[float]) -> dict[str, float]:
    """Minimum (EDM's reported figure), mean and sample standard deviation (n - 1; 0 for one value)."""
    array = np.asarray(values, dtype=np.float64)
    return dict(min=float(array.min()), mean=float(array.mean()),
                std=float(array.std(ddof=1)) if array.size > 1 else 0.0)


# ----------------------------------------------------------------------------
# The DINOv2 detector of FD-DINOv2.

#: The official DINOv2 code is loaded through torch.hub, as EDM2 loads it; no package beyond torch is needed.
DINOV2_HUB_REPO = 'facebookresearch/dinov2:main'
DINOV2_ENTRY = 'dinov2_vitl14'
DINOV2_WEIGHTS_URL = 'https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth'
DINOV2_WEIGHTS_FILE = 'dinov2_vitl14_pretrain.pth'

#: EDM2's preprocessing: bicubic (antialiased) resize to 224 x 224, then ImageNet's mean and std on [0, 1] pixels.
DINOV2_RESOLUTION = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DINOv2Detector(torch.nn.Module):
    """A DINOv2 backbone behind the FID detector's interface: ``detector(images, return_features=True)`` on uint8
    NCHW RGB images returns the backbone's output for the preprocessed batch (for ViT-L/14, the normalised class
    token, [N, 1024] float32)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        x = torch.nn.functional.interpolate(images.to(torch.float32), size=(DINOV2_RESOLUTION, DINOV2_RESOLUTION),
                                            mode='bicubic', antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
        return self.model((x / 255 - mean) / std)


class DetectorUnavailable(OSError):
    """The DINOv2 code or weights cannot be reached; the message says how to supply them offline."""


def _hub_model(source: Optional[str]) -> torch.nn.Module:
    """The ViT-L/14 module from the official repository (``source`` None) or a local copy of it."""
    if source is None:
        try:
            return torch.hub.load(DINOV2_HUB_REPO, DINOV2_ENTRY, trust_repo=True, verbose=False, skip_validation=True)
        except OSError as err:  # URLError, HTTPError, socket timeouts, refused connections
            raise DetectorUnavailable(
                f'cannot fetch DINOv2 from github.com/{DINOV2_HUB_REPO.split(":")[0]} ({err}). Without network access, '
                f'clone that repository elsewhere, download {DINOV2_WEIGHTS_URL} into the clone, and pass it with '
                f'--dinov2=DIR') from None
    if not os.path.isfile(os.path.join(source, 'hubconf.py')):
        raise MetricError(f'--dinov2 {source}: expected a copy of github.com/facebookresearch/dinov2 (a directory '
                          f'with hubconf.py)')
    weights = os.path.join(source, DINOV2_WEIGHTS_FILE)
    have_weights = os.path.isfile(weights)
    try:
        model = torch.hub.load(source, DINOV2_ENTRY, source='local', pretrained=not have_weights)
    except OSError as err:
        raise DetectorUnavailable(f'--dinov2 {source}: cannot fetch the weights ({err}). Without network access, '
                                  f'download {DINOV2_WEIGHTS_URL} into {source}') from None
    if have_weights:
        state = torch.load(weights, map_location='cpu', weights_only=True)
        missing = model.load_state_dict(state, strict=False).missing_keys
        if missing:
            raise MetricError(f'--dinov2 {weights}: the weights lack {len(missing)} of the model\'s tensors (first: '
                              f'{missing[0]}); expected {DINOV2_WEIGHTS_FILE}, the ViT-L/14 weights')
    return model


def load_dinov2(source: Optional[str] = None, device: torch.device | str = 'cpu') -> DINOv2Detector:
    """The DINOv2 ViT-L/14 detector, through torch.hub like EDM2.

    ``source`` None: the official repository and weights, downloaded on first use into dnnlib's cache
    (``DNNLIB_CACHE_DIR``/torch_hub). ``source`` a directory: a local copy of github.com/facebookresearch/dinov2
    (its ``hubconf.py``), with the weights read from ``DINOV2_WEIGHTS_FILE`` inside it when that file is there.
    Loading runs the repository's code: use trusted copies. Raises DetectorUnavailable (no network, no local
    copy) or MetricError (a directory that is not a hub repository, weights that do not fit).
    """
    saved_dir = torch.hub.get_dir()
    torch.hub.set_dir(dnnlib.make_cache_dir_path('torch_hub'))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', 'xFormers is not available')  # an optional speed-up of that code
            model = _hub_model(source)
    finally:
        torch.hub.set_dir(saved_dir)
    return DINOv2Detector(model).eval().requires_grad_(False).to(device)
