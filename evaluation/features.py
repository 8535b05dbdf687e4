"""Detector features of image sets, for FID and the other metrics: loading feature detectors and reference
statistics, running the detectors over a folder or ZIP of images or over images a network generates in memory,
and accumulating float64 moments summed over torchrun ranks.

Statistics files are ``.npz`` archives holding ``mu`` [D] and ``sigma`` [D, D] (float64), the format of NVIDIA's
published reference files (EDM's ``fid.py``), plus the arrays of the other metrics
(:data:`evaluation.metrics.REF_KEYS`). The metrics themselves are in :mod:`evaluation.metrics`, the runs of
``fid.py``'s commands in :mod:`evaluation.runs`.

Errors are :class:`FeatureError` (a ``ValueError``) with a one-line message naming the file or flag and what was
expected; the metric code raises :class:`evaluation.metrics.MetricError` and
:class:`evaluation.metrics.DetectorUnavailable`.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import zipfile
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from formats import export
from formats import manifest as manifest_lib
from evaluation import metrics
from sampling import pipeline, schedules
from training.dataset import DatasetError, ImageFolderDataset

#: NVIDIA's PyTorch translation of the TensorFlow Inception-v3 graph used by every FID paper.
DETECTOR_URL = ('https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/'
                'inception-2015-12-05.pkl')

#: Environment knobs for fetching the detector and remote reference files; tests use them to fail fast offline.
ENV_DOWNLOAD_ATTEMPTS = 'PFGMPP_DOWNLOAD_ATTEMPTS'
ENV_DOWNLOAD_TIMEOUT = 'PFGMPP_DOWNLOAD_TIMEOUT'


#: DataLoader workers per process unless asked otherwise (fewer where the cores are fewer: :func:`default_workers`).
DEFAULT_WORKERS = 3

#: Name of the Frechet distance in a detector's feature space, for detectors that do not name their own.
INCEPTION_DISTANCE = 'fid'


class FeatureError(ValueError):
    """A detector, reference file, image folder or seed list that cannot be used; the message is one line."""


# ----------------------------------------------------------------------------
# Small helpers.


def _download_kwargs() -> dict[str, Any]:
    return dict(num_attempts=max(int(os.environ.get(ENV_DOWNLOAD_ATTEMPTS, '3')), 1),
                timeout=float(os.environ.get(ENV_DOWNLOAD_TIMEOUT, '30')))


def default_workers() -> int:
    """DataLoader worker processes per process when none are asked for: :data:`DEFAULT_WORKERS`, but at most the
    usable cores (this process's affinity mask) divided among this machine's torchrun processes, at least 1.

    More workers than cores only make the workers wait for each other (and DataLoader warns about it).
    """
    return min(DEFAULT_WORKERS, dist.intra_op_thread_limit())


def distance_name(detector: torch.nn.Module) -> str:
    """What the Frechet distance in ``detector``'s feature space is called in printed lines and JSON keys.

    ``fid`` for Inception-v3 (NVIDIA's pickle, and any detector that does not say otherwise); a detector class
    names its own distance with a ``distance_name`` attribute (the digits classifier: ``fd_digits``), since an
    FD in another feature space is not comparable with FID.
    """
    return str(getattr(detector, 'distance_name', INCEPTION_DISTANCE))


def batches_of_this_rank(items: Sequence[Any], max_batch_size: int) -> list[list[Any]]:
    """This rank's batches of ``items``: near-equal consecutive batches of at most ``max_batch_size``, dealt out
    round-robin.

    The split depends on the item count only, never on the number of ranks: every image meets the detector in
    the same batch whatever the world size, so sharded statistics differ from single-process ones only by the
    order of the float64 additions. With one process it is generate.py's split, so ``gen`` draws every image in
    the batch generate.py would have drawn it in.
    """
    return dist.shard(pipeline.split_batches(list(items), max_batch_size))


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, flag: str = '--save-stats') -> str:
    """Write ``mu``/``sigma`` the way NVIDIA's files are written (uncompressed ``np.savez``); returns the path used.

    Like ``np.savez`` given a file name, a missing ``.npz`` suffix is added.
    """
    return save_arrays(path, dict(mu=mu, sigma=sigma), flag)


def save_arrays(path: str, arrays: dict[str, np.ndarray], flag: str = '--save-stats') -> str:
    """Write named arrays as an uncompressed ``.npz`` (keys :data:`evaluation.metrics.REF_KEYS`), atomically; returns
    the path used (``.npz`` added when missing)."""
    if not path.endswith('.npz'):
        path += '.npz'
    try:
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with dnnlib.util.atomic_write(path) as f:
            np.savez(f, **arrays)
    except OSError as err:  # disk full, quota, read-only: atomic_write left nothing under the final name
        raise FeatureError(f'{flag} {path}: cannot write the statistics ({err.strerror or err})') from None
    return path


# ----------------------------------------------------------------------------
# Detector and reference statistics.


def load_detector(path_or_url: Optional[str] = None, device: torch.device | str = 'cpu',
                  verbose: bool = True) -> torch.nn.Module:
    """Load a feature detector pickle (default: NVIDIA's Inception-v3 from :data:`DETECTOR_URL`), or a weights-only
    detector file (recognised by content, see :func:`_load_weights_detector`).

    URLs go through dnnlib's download cache (``DNNLIB_CACHE_DIR``), so the detector is fetched once per machine.
    The pickle is a ``torch_utils.persistence`` object; unpickling runs code stored in it, so use trusted files.
    Raises :class:`FeatureError` (missing, unreadable or foreign file; a URL that cannot be fetched).
    """
    source = path_or_url or DETECTOR_URL
    if dnnlib.util.is_url(source):
        try:
            stream = dnnlib.util.open_url(source, cache=True, verbose=verbose, **_download_kwargs())
        except OSError as err:
            cause = str(err).removeprefix(f'{source}: ')
            cache = dnnlib.make_cache_dir_path('downloads')
            raise FeatureError(
                f'cannot fetch the FID detector from {source} ({cause}). Without network access, download that file '
                f'elsewhere and pass it with --detector=PATH (or copy it into {cache})') from None
    else:
        if not os.path.isfile(source):
            raise FeatureError(f'--detector {source}: no such file')
        stream = open(source, 'rb')
    with stream:
        is_archive = zipfile.is_zipfile(stream)  # torch.save archives are ZIPs; detector pickles are not
        stream.seek(0)
        if is_archive:
            return _load_weights_detector(stream.read(), source, device)
        try:
            detector = pickle.load(stream)
        except Exception as err:  # a truncated or foreign file can fail in many ways; all mean the same here
            raise FeatureError(f'--detector {source}: not a loadable detector pickle ({type(err).__name__}: '
                               f'{err})') from None
    if not isinstance(detector, torch.nn.Module):
        raise FeatureError(f'--detector {source}: expected a pickled torch.nn.Module, '
                           f'found {type(detector).__name__}')
    return detector.eval().requires_grad_(False).to(device)


#: Leading bytes that tell what a file that is not an .npz archive holds, for the error message.
_FILE_KINDS = ((b'PK\x03\x04', 'a truncated or damaged ZIP archive'), (b'\x93NUMPY', 'a bare .npy array'),
               (b'\x80', 'a pickle'), (b'\x89PNG', 'a PNG image'), (b'\x1f\x8b', 'a gzip file'))


def _describe_non_npz(head: bytes) -> str:
    if not head:
        return 'an empty file'
    for magic, kind in _FILE_KINDS:
        if head.startswith(magic):
            return kind
    return 'text' if all(32 <= b < 127 or b in b'\t\r\n' for b in head) else 'unrecognised binary data'


def _load_weights_detector(data: bytes, source: str, device: torch.device | str) -> torch.nn.Module:
    """A feature detector stored as a weights-only file (``formats.export`` format), such as the demo's digits
    classifier; loading it runs no code from the file."""
    try:
        net = export.load_weights_bytes(data, source)
    except export.WeightsFormatError as err:
        raise FeatureError(f'--detector {err}') from None
    if f'{type(net).__module__}.{type(net).__name__}' not in export.DETECTOR_CLASSES:
        raise FeatureError(f'--detector {source}: holds a {type(net).__name__}, not a feature detector; '
                           f'expected a detector pickle or a weights-only {", ".join(export.DETECTOR_CLASSES)}')
    return net.eval().requires_grad_(False).to(device)


def load_ref_stats(path_or_url: str) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate reference statistics: an ``.npz`` with ``mu`` [D] and ``sigma`` [D, D], all finite."""
    arrays = load_reference(path_or_url, ['fid'])
    return arrays['mu'], arrays['sigma']


def _ref_metrics_hint(metrics_needing: str) -> str:
    return f'write one with fid.py ref --metrics={metrics_needing}'


def load_reference(path_or_url: str, metric_names: Sequence[str] = ('fid',)) -> dict[str, np.ndarray]:
    """Read and validate the reference arrays the chosen metrics need (:data:`evaluation.metrics.REF_KEYS`).

    ``mu``/``sigma`` (FID; NVIDIA's files hold only these) and ``fd_dinov2_mu``/``fd_dinov2_sigma`` must be [D] and
    [D, D]; ``features`` (KID, precision/recall) [n, D] with n >= 2; all finite. Moments come back as float64,
    features as stored. Every problem is one :class:`FeatureError` line naming the file and what was expected;
    numpy's own messages (such as its refusal to unpickle) are not passed on.
    """
    label = f'--ref {path_or_url}'
    expected = 'expected an .npz archive with arrays mu [D] and sigma [D, D] (as fid.py ref writes)'
    try:
        stream = dnnlib.util.open_url(path_or_url, cache=True, verbose=dist.is_main(), **_download_kwargs())
    except OSError as err:
        raise FeatureError(f'{label}: cannot open ({err})') from None
    wanted = sorted({key for name in metric_names for key in metrics.REF_KEYS[name]})
    with stream:
        try:
            data = stream.read()
        except OSError as err:
            raise FeatureError(f'{label}: cannot read ({err.strerror or err})') from None
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise FeatureError(f'{label}: holds {_describe_non_npz(data[:16])}, not an .npz archive; {expected}')
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            missing = metrics.missing_reference_keys(metric_names, archive.files)
            if 'fid' in missing:  # the message of the FID-only format
                raise FeatureError(f'{label}: missing {", ".join(missing["fid"])}; found keys '
                                   f'{sorted(archive.files)}; {expected}')
            if missing:
                names = ','.join(missing)
                raise FeatureError(
                    f'{label}: holds no {", ".join(sorted({k for keys in missing.values() for k in keys}))} '
                    f'for --metrics={names} (found keys {sorted(archive.files)}); {_ref_metrics_hint(names)}')
            arrays = {key: archive[key] for key in wanted}
    except FeatureError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as err:
        # A ZIP whose members are not .npy arrays, object arrays (pickles), truncated members.
        kind = 'object (pickled) arrays' if 'pickle' in str(err) else f'unreadable members ({type(err).__name__})'
        raise FeatureError(f'{label}: a ZIP archive with {kind}; {expected}') from None
    for name, array in arrays.items():
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise FeatureError(f'{label}: {name} has dtype {array.dtype}; expected floating point')
    for mu_key, sigma_key in (metrics.REF_KEYS['fid'], metrics.REF_KEYS['fd_dinov2']):
        if mu_key not in arrays:
            continue
        mu, sigma = arrays[mu_key], arrays[sigma_key]
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or mu.shape[0] == 0:
            raise FeatureError(f'{label}: {mu_key} has shape {list(mu.shape)} and {sigma_key} '
                               f'{list(sigma.shape)}; expected [D] and [D, D]')
        arrays[mu_key], arrays[sigma_key] = mu.astype(np.float64), sigma.astype(np.float64)
    if 'features' in arrays and (arrays['features'].ndim != 2 or arrays['features'].shape[0] < 2):
        raise FeatureError(f'{label}: features has shape {list(arrays["features"].shape)}; expected [n, D] '
                           f'with n >= 2')
    for name in wanted:
        bad = int(np.count_nonzero(~np.isfinite(arrays[name])))
        if bad:
            raise FeatureError(f'{label}: {name} holds {bad} NaN/inf value(s)')
    return arrays


# ----------------------------------------------------------------------------
# Feature statistics.


def _as_detector(detector: Optional[torch.nn.Module | str], device: torch.device) -> torch.nn.Module:
    """A loaded detector as is; a path, URL or None (the Inception URL) loaded on every rank, rank 0 first."""
    if isinstance(detector, torch.nn.Module):
        return detector
    dist.print0('Loading the feature detector...')
    return dist.rank0_first(lambda: load_detector(detector, device=device, verbose=dist.is_main()))


@contextlib.contextmanager
def _full_float32() -> Iterator[None]:
    """Run the detector in true float32 on GPUs, then restore the caller's settings.

    PyTorch lets cuDNN use TF32 for float32 convolutions by default; on the stand-in detector that moves the mean
    features by ~1e-4 (against ~4e-8 without), and an FID should not depend on the GPU generation.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def extract_features(detector: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Detector features in float64 for a uint8 NCHW batch; grayscale is repeated to RGB as the detector expects."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise FeatureError(f'images of shape {list(images.shape[1:])} (CHW); the detector needs 1 or 3 '
                           f'channels')
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    with torch.no_grad(), _full_float32():
        features = detector(images, return_features=True)
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != images.shape[0]:
        shape = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise FeatureError(f'the detector returned {shape} for {images.shape[0]} images; expected '
                           f'[{images.shape[0]}, feature_dim] (is --detector a feature network?)')
    return features.to(torch.float64)


class FeatureStats:
    """Running float64 sums of features and of their outer products, from which mean and covariance follow.

    Each rank adds its own batches; :meth:`compute` sums the totals over ranks (a collective: every rank calls it).
    """

    def __init__(self, device: torch.device | str = 'cpu'):
        self.device = torch.device(device)
        self.count = 0
        self.total: Optional[torch.Tensor] = None   # sum of f, [D]
        self.gram: Optional[torch.Tensor] = None    # sum of f^T f, [D, D]

    @property
    def feature_dim(self) -> int:
        return 0 if self.total is None else self.total.shape[0]

    def _allocate(self, dim: int) -> None:
        self.total = torch.zeros([dim], dtype=torch.float64, device=self.device)
        self.gram = torch.zeros([dim, dim], dtype=torch.float64, device=self.device)

    def add(self, features: torch.Tensor) -> None:
        features = features.to(self.device, torch.float64)
        if self.total is None:
            self._allocate(features.shape[1])
        elif features.shape[1] != self.feature_dim:
            raise FeatureError(f'the detector returned {features.shape[1]} features after returning '
                               f'{self.feature_dim} before; expected a fixed feature_dim')
        self.total += features.sum(dim=0)
        self.gram += features.T @ features
        self.count += features.shape[0]

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance over all ranks' features, as float64 numpy arrays."""
        # A rank that received no batch learns the feature size from the others.
        dim = int(dist.all_reduce(torch.tensor([self.feature_dim], device=self.device), op='max').item())
        count = int(dist.all_reduce(torch.tensor([self.count], device=self.device)).item())
        if self.total is None and dim:
            self._allocate(dim)
        if count < 2 or self.total is None:
            raise FeatureError(f'{count} image(s) reached the detector; need at least 2 for a covariance')
        total = dist.all_reduce(self.total.clone())
        gram = dist.all_reduce(self.gram.clone())
        mu = total / count
        sigma = (gram - torch.outer(mu, mu) * count) / (count - 1)
        self.count_all = count
        return mu.to('cpu').numpy(), sigma.to('cpu').numpy()


class _ImageReadError:
    """Stands in for an image that could not be read, so the error reaches the main process as one clear line
    (an exception raised inside a DataLoader worker comes back wrapped in a traceback dump)."""

    def __init__(self, message: str):
        self.message = message


class _CheckedImages(torch.utils.data.Dataset):
    """Wraps an ImageFolderDataset: yields bare uint8 CHW arrays, and read errors as :class:`_ImageReadError`."""

    def __init__(self, dataset: Any, source: str):
        self.dataset = dataset
        self.source = source

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index][0]
        except DatasetError as err:  # names the file and says what was expected (size, format)
            return _ImageReadError(str(err))
        except Exception as err:  # anything else from a decoder still means "this image cannot be used"
            return _ImageReadError(f'{self.source}: cannot read image number {index} ({type(err).__name__}: {err})')


def _collate_images(items: list[Any]) -> Any:
    for item in items:
        if isinstance(item, _ImageReadError):
            return item
    return torch.from_numpy(np.stack(items))


def open_image_dataset(image_path: str, num_expected: Optional[int] = None, seed: int = 0,
                       flag: str = '--images') -> Any:
    """Open a folder or ZIP of images; with ``num_expected``, exactly that many (a seeded subset if there are more).

    Fewer images than ``num_expected`` is an error: an FID over fewer images is biased and not comparable.
    """
    try:
        dataset = ImageFolderDataset(path=image_path, max_size=num_expected, random_seed=seed)
    except Exception as err:  # missing path, no images, unreadable archive, ...
        raise FeatureError(f'{flag} {image_path}: {err}') from None
    if num_expected is not None and len(dataset) < num_expected:
        raise FeatureError(f'{flag} {image_path}: found {len(dataset)} images, but --num-images asks for '
                           f'{num_expected}')
    if len(dataset) < 2:
        raise FeatureError(f'{flag} {image_path}: found {len(dataset)} image(s); need at least 2')
    if int(dataset.num_channels) not in (1, 3):
        raise FeatureError(f'{flag} {image_path}: images have {dataset.num_channels} channels; expected 1 '
                           f'(grayscale) or 3 (RGB)')
    return dataset


def check_single_origin(image_path: str, flag: str = '--images') -> None:
    """One line, and no FID, for a folder or ZIP that pools images made by different runs or settings."""
    try:
        manifest_lib.check_single_origin(image_path)
    except manifest_lib.ManifestError as err:
        example = next((o for o in err.origins if o != '.'), None)
        one = f', e.g. {flag}={os.path.join(image_path, example)}' if example and os.path.isdir(image_path) else ''
        raise FeatureError(f'{flag} {err}; evaluate each folder separately{one} (pooling gives an FID '
                           f'of neither), or add --allow-mixed') from None
    except (OSError, zipfile.BadZipFile) as err:
        raise FeatureError(f'{flag} {image_path}: cannot list its files ({err})') from None


class FeatureCollector:
    """One pass of several detectors over image batches: per detector, the float64 moments (:class:`FeatureStats`)
    and, for the detectors in ``keep``, the features themselves (float32, as the detectors return them).

    Batches are added with the ids of their items (dataset index or seed); :meth:`compute` (a collective) returns
    :class:`evaluation.metrics.Features` per detector, the kept features gathered on rank 0 in id order.
    ``keep_ids`` limits the kept features to those ids (a reference's subset); None keeps all.
    """

    def __init__(self, detectors: dict[str, torch.nn.Module], keep: set[str], device: torch.device,
                 keep_ids: Optional[np.ndarray] = None):
        self.detectors = detectors
        self.keep = keep
        self.keep_ids = keep_ids
        self.stats = {name: FeatureStats(device) for name in detectors}
        self.kept: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in keep}

    def add(self, images: torch.Tensor, ids: Sequence[int]) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        chosen = None if self.keep_ids is None else np.isin(ids, self.keep_ids)
        for name, detector in self.detectors.items():
            features = extract_features(detector, images)
            self.stats[name].add(features)
            if name in self.keep:
                rows = features.to('cpu', torch.float32).numpy()
                self.kept[name].append((ids, rows) if chosen is None else (ids[chosen], rows[chosen]))

    def compute(self) -> dict[str, metrics.Features]:
        result = {}
        for name in self.detectors:
            mu, sigma = self.stats[name].compute()
            features = None
            if name in self.keep:
                parts = dist.gather_object(self.kept[name])
                if parts is not None:
                    pieces = [piece for part in parts for piece in part]
                    ids = np.concatenate([i for i, _ in pieces])
                    features = np.concatenate([f for _, f in pieces])[np.argsort(ids, kind='stable')]
            result[name] = metrics.Features(mu=mu, sigma=sigma, count=self.stats[name].count_all, features=features)
        return result


def load_detectors(detectors: dict[str, Optional[torch.nn.Module | str]],
                  device: torch.device) -> dict[str, torch.nn.Module]:
    """Load what is not loaded yet: the Inception detector by path/URL, DINOv2 from a local copy or torch.hub."""
    loaded = {}
    for name, detector in detectors.items():
        if isinstance(detector, torch.nn.Module):
            loaded[name] = detector
        elif name == metrics.INCEPTION:
            loaded[name] = _as_detector(detector, device)
        else:
            loaded[name] = _as_dinov2(detector, device)
    return loaded


def _as_dinov2(source: Optional[str], device: torch.device) -> torch.nn.Module:
    dist.print0('Loading DINOv2 ViT-L/14...')
    return dist.rank0_first(lambda: metrics.load_dinov2(source, device))


def calculate_features(image_path: str, detectors: dict[str, Optional[torch.nn.Module | str]],
                       keep: set[str] = frozenset(), keep_ids: Optional[np.ndarray] = None,
                       num_expected: Optional[int] = None, seed: int = 0, max_batch_size: int = 64,
                       num_workers: Optional[int] = None, prefetch_factor: int = 2,
                       device: Optional[torch.device | str] = None,
                       flag: str = '--images') -> dict[str, metrics.Features]:
    """One pass of every detector in ``detectors`` (name -> module, or path/URL/None to load) over the images of a
    folder or ZIP, sharded over the torchrun ranks; see :class:`FeatureCollector` for ``keep``/``keep_ids``.

    ``num_expected``/``seed`` select exactly that many images as ``fid.py calc --num-images/--seed`` do.
    ``num_workers`` None means :func:`default_workers`; workers follow :func:`torch_utils.misc.data_loader_kwargs`
    (spawned, so this is safe after CUDA or NCCL are initialised).
    """
    device = torch.device(device) if device is not None else dist.get_device()
    dist.print0(f'Reading images from {image_path} ...')
    dataset = open_image_dataset(image_path, num_expected=num_expected, seed=seed, flag=flag)
    images = _CheckedImages(dataset, source=f'{flag} {image_path}')
    collector = FeatureCollector(load_detectors(detectors, device), set(keep), device, keep_ids)

    rank_batches = batches_of_this_rank(range(len(images)), max_batch_size)
    workers = default_workers() if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(images, batch_sampler=rank_batches, collate_fn=_collate_images,
                                         **misc.data_loader_kwargs(workers, device.type == 'cuda', prefetch_factor))

    dist.print0(f'Calculating statistics for {len(images)} images...')
    for ids, batch in zip(rank_batches, dist.progress(loader, unit='batch', total=len(rank_batches))):
        if isinstance(batch, _ImageReadError):
            raise FeatureError(batch.message)
        collector.add(batch.to(device, non_blocking=True), ids)
    return collector.compute()


def calculate_inception_stats(image_path: str, num_expected: Optional[int] = None, seed: int = 0,
                              max_batch_size: int = 64, num_workers: Optional[int] = None, prefetch_factor: int = 2,
                              device: Optional[torch.device | str] = None,
                              detector: Optional[torch.nn.Module | str] = None,
                              flag: str = '--images') -> tuple[np.ndarray, np.ndarray]:
    """Feature mean and covariance of the images in a folder or ZIP, sharded over the torchrun ranks.

    ``detector`` is a loaded module or a path/URL for :func:`load_detector` (None: the Inception URL).
    ``num_expected``/``seed`` select exactly that many images as ``fid.py calc --num-images/--seed`` do.
    """
    result = calculate_features(image_path, {metrics.INCEPTION: detector}, num_expected=num_expected, seed=seed,
                                max_batch_size=max_batch_size, num_workers=num_workers,
                                prefetch_factor=prefetch_factor, device=device, flag=flag)[metrics.INCEPTION]
    return result.mu, result.sigma


def calculate_features_for_network(net: torch.nn.Module, seeds: Sequence[int],
                                   detectors: dict[str, Optional[torch.nn.Module | str]],
                                   keep: set[str] = frozenset(), max_batch_size: int = 64,
                                   device: Optional[torch.device | str] = None, class_idx: Optional[int] = None,
                                   D: Optional[float] = None,
                                   **sampler_kwargs: Any) -> dict[str, metrics.Features]:
    """One pass of every detector over the images ``net`` generates for ``seeds``, made in memory and never
    written out (see :func:`calculate_stats_for_network`); kept features are in seed order.

    Raises :class:`FeatureError` for a repeated seed or fewer than two, and the sampler's ``ValueError`` for
    settings the network cannot honour (its message names sampler keywords, e.g. ``num_steps``).
    """
    ordered = sorted(int(s) for s in seeds)
    repeated = sorted({s for s, t in zip(ordered, ordered[1:]) if s == t})
    if repeated:
        raise FeatureError(f'--seeds lists seed {repeated[0]} more than once; each image is counted once')
    if len(ordered) < 2:
        raise FeatureError(f'--seeds gives {len(ordered)} image(s); need at least 2 for a covariance')
    device = torch.device(device) if device is not None else dist.get_device()
    collector = FeatureCollector(load_detectors(detectors, device), set(keep), device)

    rank_batches = batches_of_this_rank(ordered, max_batch_size)
    nfe = pipeline.sampler_nfe(sampler_kwargs.get('num_steps') or schedules.DEFAULT_STEPS, sampler_kwargs)
    plural = 's' if nfe != 1 else ''
    dist.print0(f'Generating {len(ordered)} images in memory ({nfe} network evaluation{plural} each) and '
                f'calculating their statistics...')
    for batch_seeds in dist.progress(rank_batches, unit='batch', total=len(rank_batches)):
        # One batch exactly as given (the batching above is generate.py's), through the pipeline's checked path.
        for seeds_done, images in pipeline.generate_images(net, batch_seeds, batch_size=max(len(batch_seeds), 1),
                                                           device=device, class_idx=class_idx, D=D,
                                                           **sampler_kwargs):
            collector.add(images, seeds_done)
    return collector.compute()


def calculate_stats_for_network(net: torch.nn.Module, seeds: Sequence[int], max_batch_size: int = 64,
                                device: Optional[torch.device | str] = None,
                                detector: Optional[torch.nn.Module | str] = None, class_idx: Optional[int] = None,
                                D: Optional[float] = None,
                                **sampler_kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Feature statistics of the images ``net`` generates for ``seeds``, made in memory and never written out.

    The images are the uint8 ones generate.py writes as PNGs (same sampler, same per-seed randomness, same
    quantization), taken in file-name order and batched as ``calc`` batches them, so the result equals running
    generate.py and then ``fid.py calc`` on its folder. ``sampler_kwargs`` are those of
    :func:`sampling.pipeline.sample_batch` (None means the default).
    """
    result = calculate_features_for_network(net, seeds, {metrics.INCEPTION: detector}, max_batch_size=max_batch_size,
                                            device=device, class_idx=class_idx, D=D,
                                            **sampler_kwargs)[metrics.INCEPTION]
    return result.mu, result.sigma


def calculate_fid_from_inception_stats(mu: np.ndarray, sigma: np.ndarray, mu_ref: np.ndarray,
                                       sigma_ref: np.ndarray) -> float:
    """Frechet distance between two Gaussians (EDM's name for :func:`evaluation.metrics.frechet_distance`).

    Raises :class:`evaluation.metrics.MetricError` for moments of different sizes or that are not finite.
    """
    return metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref)


def probe_feature_dim(detector: torch.nn.Module, image_shape: Sequence[int], device: torch.device | str) -> int:
    """Number of features the detector returns for uint8 images of ``image_shape`` [C, H, W] (one black image is
    run through it)."""
    probe = torch.zeros([1, *image_shape], dtype=torch.uint8, device=device)
    return int(extract_features(detector, probe).shape[1])


def stats_arrays(metric_names: Sequence[str], features: dict[str, metrics.Features]) -> dict[str, np.ndarray]:
    """The arrays a reference file holds for these metrics (:data:`evaluation.metrics.REF_KEYS`)."""
    arrays: dict[str, np.ndarray] = {}
    for name in metric_names:
        source = features[metrics.DETECTOR_OF[name]]
        if name in ('fid', 'fd_dinov2'):
            mu_key, sigma_key = metrics.REF_KEYS[name]
            arrays.update({mu_key: source.mu, sigma_key: source.sigma})
        else:
            arrays['features'] = source.features
    return arrays
