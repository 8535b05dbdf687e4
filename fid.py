"""Frechet Inception Distance (FID): dataset reference statistics, FID of a folder or ZIP of images, and FID of a
network computed from images generated in memory.

Statistics are the mean and the unbiased covariance of detector features, accumulated in float64 and summed over
torchrun ranks. Statistics files are ``.npz`` archives holding ``mu`` [D] and ``sigma`` [D, D] (float64), the format
of NVIDIA's published reference files, so those can be passed to ``--ref`` by path or URL.

The library half (``load_detector``, ``load_ref_stats``, ``calculate_inception_stats``,
``calculate_stats_for_network``, ``calculate_fid_from_inception_stats``) is importable; the click commands below are
a thin layer over it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import time
import zipfile
from typing import Any, Callable, Iterator, Optional, Sequence

import click
import numpy as np
import torch

import dnnlib
import generate
from torch_utils import distributed as dist
from torch_utils import host_memory
from training import manifest as manifest_lib
from training import network_io
from training import metrics
from training import sampler as sampling
from training.dataset import DatasetError, ImageFolderDataset

#: NVIDIA's PyTorch translation of the TensorFlow Inception-v3 graph used by every FID paper.
DETECTOR_URL = ('https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/'
                'inception-2015-12-05.pkl')

#: Environment knobs for fetching the detector and remote reference files; tests use them to fail fast offline.
ENV_DOWNLOAD_ATTEMPTS = 'PFGMPP_DOWNLOAD_ATTEMPTS'
ENV_DOWNLOAD_TIMEOUT = 'PFGMPP_DOWNLOAD_TIMEOUT'

#: Reference files keep the features of at most this many images for KID and precision/recall (a seeded subset).
REF_FEATURES_DEFAULT = 50000

#: Seed of the reference-feature subset, of KID's subsets and of the bootstrap resamples: results are reproducible.
METRICS_SEED = 0

#: Coverage of the --bootstrap intervals.
BOOTSTRAP_CONFIDENCE = 0.95


# ----------------------------------------------------------------------------
# Small helpers.


def _download_kwargs() -> dict[str, Any]:
    return dict(num_attempts=max(int(os.environ.get(ENV_DOWNLOAD_ATTEMPTS, '3')), 1),
                timeout=float(os.environ.get(ENV_DOWNLOAD_TIMEOUT, '30')))


def _rank0_first(work: Callable[[], Any]) -> Any:
    """Run ``work`` on rank 0 before the other ranks, so that a download lands in the cache only once."""
    if not dist.is_main():
        dist.barrier()
    result = work()
    if dist.is_main():
        dist.barrier()
    return result


def _rank_batches(items: Sequence[Any], max_batch_size: int) -> list[list[Any]]:
    """This rank's batches of ``items``: near-equal consecutive batches of at most ``max_batch_size``, dealt out
    round-robin.

    The split depends on the item count only, never on the number of ranks: every image meets the detector in
    the same batch whatever the world size, so sharded statistics differ from single-process ones only by the
    order of the float64 additions. With one process it is generate.py's split, so ``gen`` draws every image in
    the batch generate.py would have drawn it in.
    """
    return dist.shard(sampling.split_batches(list(items), max_batch_size))


def _append_json_line(path: str, record: dict[str, Any]) -> None:
    """Append one JSON line; the file is rewritten under a temporary name and renamed, never left half-written."""
    old = b''
    if os.path.exists(path):
        with open(path, 'rb') as f:
            old = f.read()
        if old and not old.endswith(b'\n'):
            old += b'\n'
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with dnnlib.util.atomic_write(path) as f:
        f.write(old + (json.dumps(record) + '\n').encode('utf-8'))


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, flag: str = '--save-stats') -> str:
    """Write ``mu``/``sigma`` the way NVIDIA's files are written (uncompressed ``np.savez``); returns the path used.

    Like ``np.savez`` given a file name, a missing ``.npz`` suffix is added.
    """
    return save_arrays(path, dict(mu=mu, sigma=sigma), flag)


def save_arrays(path: str, arrays: dict[str, np.ndarray], flag: str = '--save-stats') -> str:
    """Write named arrays as an uncompressed ``.npz`` (keys :data:`training.metrics.REF_KEYS`), atomically; returns
    the path used (``.npz`` added when missing)."""
    if not path.endswith('.npz'):
        path += '.npz'
    try:
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with dnnlib.util.atomic_write(path) as f:
            np.savez(f, **arrays)
    except OSError as err:  # disk full, quota, read-only: atomic_write left nothing under the final name
        raise click.ClickException(f'{flag} {path}: cannot write the statistics ({err.strerror or err})') from None
    return path


def check_output_file(path: Optional[str], flag: str) -> None:
    """Fail before any work when the folder of an output file cannot be created or written."""
    if path is None:
        return
    try:
        dnnlib.util.check_writable_dir(os.path.dirname(os.path.abspath(path)), flag)
    except OSError as err:
        raise click.ClickException(str(err)) from None


# ----------------------------------------------------------------------------
# Detector and reference statistics.


def load_detector(path_or_url: Optional[str] = None, device: torch.device | str = 'cpu',
                  verbose: bool = True) -> torch.nn.Module:
    """Load a feature detector pickle (default: NVIDIA's Inception-v3 from :data:`DETECTOR_URL`), or a weights-only
    detector file (recognised by content, see :func:`_load_weights_detector`).

    URLs go through dnnlib's download cache (``DNNLIB_CACHE_DIR``), so the detector is fetched once per machine.
    The pickle is a ``torch_utils.persistence`` object; unpickling runs code stored in it, so use trusted files.
    """
    source = path_or_url or DETECTOR_URL
    if dnnlib.util.is_url(source):
        try:
            stream = dnnlib.util.open_url(source, cache=True, verbose=verbose, **_download_kwargs())
        except OSError as err:
            cause = str(err).removeprefix(f'{source}: ')
            cache = dnnlib.make_cache_dir_path('downloads')
            raise click.ClickException(
                f'cannot fetch the FID detector from {source} ({cause}). Without network access, download that file '
                f'elsewhere and pass it with --detector=PATH (or copy it into {cache})') from None
    else:
        if not os.path.isfile(source):
            raise click.ClickException(f'--detector {source}: no such file')
        stream = open(source, 'rb')
    with stream:
        is_archive = zipfile.is_zipfile(stream)  # torch.save archives are ZIPs; detector pickles are not
        stream.seek(0)
        if is_archive:
            return _load_weights_detector(stream.read(), source, device)
        try:
            detector = pickle.load(stream)
        except Exception as err:  # a truncated or foreign file can fail in many ways; all mean the same here
            raise click.ClickException(f'--detector {source}: not a loadable detector pickle ({type(err).__name__}: '
                                       f'{err})') from None
    if not isinstance(detector, torch.nn.Module):
        raise click.ClickException(f'--detector {source}: expected a pickled torch.nn.Module, '
                                   f'found {type(detector).__name__}')
    return detector.eval().requires_grad_(False).to(device)


#: Leading bytes that tell what a file that is not an .npz archive holds, for the error message.
_FILE_KINDS = ((b'PK\x03\x04', 'a truncated or damaged ZIP archive'), (b'\x93NUMPY', 'a bare .npy array'), (b'\x80', 'a pickle'),
               (b'\x89PNG', 'a PNG image'), (b'\x1f\x8b', 'a gzip file'))


def _describe_non_npz(head: bytes) -> str:
    if not head:
        return 'an empty file'
    for magic, kind in _FILE_KINDS:
        if head.startswith(magic):
            return kind
    return 'text' if all(32 <= b < 127 or b in b'\t\r\n' for b in head) else 'unrecognised binary data'
def _load_weights_detector(data: bytes, source: str, device: torch.device | str) -> torch.nn.Module:
    """A feature detector stored as a weights-only file (``training.export`` format), such as the demo's digits
    classifier; loading it runs no code from the file."""
    from training import export
    try:
        net = export.load_weights_bytes(data, source)
    except export.WeightsFormatError as err:
        raise click.ClickException(f'--detector {err}') from None
    if f'{type(net).__module__}.{type(net).__name__}' not in export.DETECTOR_CLASSES:
        raise click.ClickException(f'--detector {source}: holds a {type(net).__name__}, not a feature detector; '
                                   f'expected a detector pickle or a weights-only {", ".join(export.DETECTOR_CLASSES)}')
    return net.eval().requires_grad_(False).to(device)


def load_ref_stats(path_or_url: str) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate reference statistics: an ``.npz`` with ``mu`` [D] and ``sigma`` [D, D], all finite."""
    arrays = load_reference(path_or_url, ['fid'])
    return arrays['mu'], arrays['sigma']


def _ref_metrics_hint(metrics_needing: str) -> str:
    return f'write one with fid.py ref --metrics={metrics_needing}'


def load_reference(path_or_url: str, metric_names: Sequence[str] = ('fid',)) -> dict[str, np.ndarray]:
    """Read and validate the reference arrays the chosen metrics need (:data:`training.metrics.REF_KEYS`).

    ``mu``/``sigma`` (FID; NVIDIA's files hold only these) and ``fd_dinov2_mu``/``fd_dinov2_sigma`` must be [D] and
    [D, D]; ``features`` (KID, precision/recall) [n, D] with n >= 2; all finite. Moments come back as float64,
    features as stored. Every problem is one ``click.ClickException`` line naming the file and what was expected;
    numpy's own messages (such as its refusal to unpickle) are not passed on.
    """
    label = f'--ref {path_or_url}'
    expected = 'expected an .npz archive with arrays mu [D] and sigma [D, D] (as fid.py ref writes)'
    try:
        stream = dnnlib.util.open_url(path_or_url, cache=True, verbose=dist.is_main(), **_download_kwargs())
    except OSError as err:
        raise click.ClickException(f'{label}: cannot open ({err})') from None
    wanted = sorted({key for name in metric_names for key in metrics.REF_KEYS[name]})
    with stream:
        try:
            data = stream.read()
        except OSError as err:
            raise click.ClickException(f'{label}: cannot read ({err.strerror or err})') from None
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise click.ClickException(f'{label}: holds {_describe_non_npz(data[:16])}, not an .npz archive; {expected}')
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            missing = metrics.missing_reference_keys(metric_names, archive.files)
            if 'fid' in missing:  # the message of the FID-only format
                raise click.ClickException(f'{label}: missing {", ".join(missing["fid"])}; found keys '
                                           f'{sorted(archive.files)}; {expected}')
            if missing:
                names = ','.join(missing)
                raise click.ClickException(
                    f'{label}: holds no {", ".join(sorted({k for keys in missing.values() for k in keys}))} '
                    f'for --metrics={names} (found keys {sorted(archive.files)}); {_ref_metrics_hint(names)}')
            arrays = {key: archive[key] for key in wanted}
    except click.ClickException:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as err:
        # A ZIP whose members are not .npy arrays, object arrays (pickles), truncated members.
        kind = 'object (pickled) arrays' if 'pickle' in str(err) else f'unreadable members ({type(err).__name__})'
        raise click.ClickException(f'{label}: a ZIP archive with {kind}; {expected}') from None
    for name, array in arrays.items():
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise click.ClickException(f'{label}: {name} has dtype {array.dtype}; expected floating point')
    for mu_key, sigma_key in (metrics.REF_KEYS['fid'], metrics.REF_KEYS['fd_dinov2']):
        if mu_key not in arrays:
            continue
        mu, sigma = arrays[mu_key], arrays[sigma_key]
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or mu.shape[0] == 0:
            raise click.ClickException(f'{label}: {mu_key} has shape {list(mu.shape)} and {sigma_key} '
                                       f'{list(sigma.shape)}; expected [D] and [D, D]')
        arrays[mu_key], arrays[sigma_key] = mu.astype(np.float64), sigma.astype(np.float64)
    if 'features' in arrays and (arrays['features'].ndim != 2 or arrays['features'].shape[0] < 2):
        raise click.ClickException(f'{label}: features has shape {list(arrays["features"].shape)}; expected [n, D] '
                                   f'with n >= 2')
    for name in wanted:
        bad = int(np.count_nonzero(~np.isfinite(arrays[name])))
        if bad:
            raise click.ClickException(f'{label}: {name} holds {bad} NaN/inf value(s)')
    return arrays


# ----------------------------------------------------------------------------
# Feature statistics.


def _as_detector(detector: Optional[torch.nn.Module | str], device: torch.device) -> torch.nn.Module:
    """A loaded detector as is; a path, URL or None (the Inception URL) loaded on every rank, rank 0 first."""
    if isinstance(detector, torch.nn.Module):
        return detector
    dist.print0('Loading the feature detector...')
    return _rank0_first(lambda: load_detector(detector, device=device, verbose=dist.is_main()))


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
        raise click.ClickException(f'images of shape {list(images.shape[1:])} (CHW); the detector needs 1 or 3 '
                                   f'channels')
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    with torch.no_grad(), _full_float32():
        features = detector(images, return_features=True)
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != images.shape[0]:
        shape = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise click.ClickException(f'the detector returned {shape} for {images.shape[0]} images; expected '
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
            raise click.ClickException(f'the detector returned {features.shape[1]} features after returning '
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
            raise click.ClickException(f'{count} image(s) reached the detector; need at least 2 for a covariance')
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
        raise click.ClickException(f'{flag} {image_path}: {err}') from None
    if num_expected is not None and len(dataset) < num_expected:
        raise click.ClickException(f'{flag} {image_path}: found {len(dataset)} images, but --num asks for '
                                   f'{num_expected}')
    if len(dataset) < 2:
        raise click.ClickException(f'{flag} {image_path}: found {len(dataset)} image(s); need at least 2')
    if int(dataset.num_channels) not in (1, 3):
        raise click.ClickException(f'{flag} {image_path}: images have {dataset.num_channels} channels; expected 1 '
                                   f'(grayscale) or 3 (RGB)')
    return dataset


def check_single_origin(image_path: str, flag: str = '--images') -> None:
    """One line, and no FID, for a folder or ZIP that pools images made by different runs or settings."""
    try:
        manifest_lib.check_single_origin(image_path)
    except manifest_lib.ManifestError as err:
        example = next((o for o in err.origins if o != '.'), None)
        one = f', e.g. {flag}={os.path.join(image_path, example)}' if example and os.path.isdir(image_path) else ''
        raise click.ClickException(f'{flag} {err}; evaluate each folder separately{one} (pooling gives an FID '
                                   f'of neither), or add --allow-mixed') from None
    except (OSError, zipfile.BadZipFile) as err:
        raise click.ClickException(f'{flag} {image_path}: cannot list its files ({err})') from None


class FeatureCollector:
    """One pass of several detectors over image batches: per detector, the float64 moments (:class:`FeatureStats`)
    and, for the detectors in ``keep``, the features themselves (float32, as the detectors return them).

    Batches are added with the ids of their items (dataset index or seed); :meth:`compute` (a collective) returns
    :class:`training.metrics.Features` per detector, the kept features gathered on rank 0 in id order.
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


def _as_detectors(detectors: dict[str, Optional[torch.nn.Module | str]],
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

    def load() -> torch.nn.Module:
        try:
            return metrics.load_dinov2(source, device)
        except (metrics.MetricError, metrics.DetectorUnavailable) as err:
            raise click.ClickException(str(err)) from None
    return _rank0_first(load)


def calculate_features(image_path: str, detectors: dict[str, Optional[torch.nn.Module | str]],
                       keep: set[str] = frozenset(), keep_ids: Optional[np.ndarray] = None,
                       num_expected: Optional[int] = None, seed: int = 0, max_batch_size: int = 64,
                       num_workers: int = 3, prefetch_factor: int = 2, device: Optional[torch.device | str] = None,
                       flag: str = '--images') -> dict[str, metrics.Features]:
    """One pass of every detector in ``detectors`` (name -> module, or path/URL/None to load) over the images of a
    folder or ZIP, sharded over the torchrun ranks; see :class:`FeatureCollector` for ``keep``/``keep_ids``.

    ``num_expected``/``seed`` select exactly that many images as ``fid.py calc --num/--seed`` do.
    """
    device = torch.device(device) if device is not None else dist.get_device()
    dist.print0(f'Reading images from {image_path} ...')
    dataset = open_image_dataset(image_path, num_expected=num_expected, seed=seed, flag=flag)
    images = _CheckedImages(dataset, source=f'{flag} {image_path}')
    collector = FeatureCollector(_as_detectors(detectors, device), set(keep), device, keep_ids)

    rank_batches = _rank_batches(range(len(images)), max_batch_size)
    loader = torch.utils.data.DataLoader(
        images, batch_sampler=rank_batches, collate_fn=_collate_images, num_workers=num_workers,
        prefetch_factor=(prefetch_factor if num_workers > 0 else None), pin_memory=(device.type == 'cuda'))

    dist.print0(f'Calculating statistics for {len(images)} images...')
    for ids, batch in zip(rank_batches, dist.progress(loader, unit='batch', total=len(rank_batches))):
        if isinstance(batch, _ImageReadError):
            raise click.ClickException(batch.message)
        collector.add(batch.to(device, non_blocking=True), ids)
    return collector.compute()


def calculate_inception_stats(image_path: str, num_expected: Optional[int] = None, seed: int = 0,
                              max_batch_size: int = 64, num_workers: int = 3, prefetch_factor: int = 2,
                              device: Optional[torch.device | str] = None,
                              detector: Optional[torch.nn.Module | str] = None,
                              flag: str = '--images') -> tuple[np.ndarray, np.ndarray]:
    """Feature mean and covariance of the images in a folder or ZIP, sharded over the torchrun ranks.

    ``detector`` is a loaded module or a path/URL for :func:`load_detector` (None: the Inception URL).
    ``num_expected``/``seed`` select exactly that many images as ``fid.py calc --num/--seed`` do.
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
    written out (see :func:`calculate_stats_for_network`); kept features are in seed order."""
    ordered = sorted(int(s) for s in seeds)
    repeated = sorted({s for s, t in zip(ordered, ordered[1:]) if s == t})
    if repeated:
        raise click.ClickException(f'--seeds lists seed {repeated[0]} more than once; each image is counted once')
    if len(ordered) < 2:
        raise click.ClickException(f'--seeds gives {len(ordered)} image(s); need at least 2 for a covariance')
    device = torch.device(device) if device is not None else dist.get_device()
    collector = FeatureCollector(_as_detectors(detectors, device), set(keep), device)

    rank_batches = _rank_batches(ordered, max_batch_size)
    try:
        nfe = sampling.sampler_nfe(sampler_kwargs.get('num_steps') or generate.DEFAULT_STEPS, sampler_kwargs)
    except ValueError as err:
        raise click.ClickException(generate.sampler_error(err)) from None
    dist.print0(f'Generating {len(ordered)} images in memory ({nfe} network evaluations each) and calculating '
                f'their statistics...')
    for batch_seeds in dist.progress(rank_batches, unit='batch', total=len(rank_batches)):
        try:
            samples = sampling.sample_batch(net, batch_seeds, device=device, class_idx=class_idx, D=D,
                                            **sampler_kwargs)
        except ValueError as err:  # sampler settings the network cannot honour
            raise click.ClickException(generate.sampler_error(err)) from None
        collector.add(sampling.to_uint8(samples), batch_seeds)
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
    ``training.sampler.sample_batch`` (None means the default).
    """
    result = calculate_features_for_network(net, seeds, {metrics.INCEPTION: detector}, max_batch_size=max_batch_size,
                                            device=device, class_idx=class_idx, D=D,
                                            **sampler_kwargs)[metrics.INCEPTION]
    return result.mu, result.sigma


def calculate_fid_from_inception_stats(mu: np.ndarray, sigma: np.ndarray, mu_ref: np.ndarray,
                                       sigma_ref: np.ndarray) -> float:
    """Frechet distance between two Gaussians (:func:`training.metrics.frechet_distance`), errors as one line."""
    try:
        return metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref)
    except metrics.MetricError as err:
        raise click.ClickException(str(err)) from None


# ----------------------------------------------------------------------------
# Command line.


def _detector_options(fn: Callable) -> Callable:
    """Options shared by every command that runs the detector."""
    fn = click.option('--device', help='Device  [default: cuda when available]', metavar='cpu|cuda',
                      type=click.Choice(['cpu', 'cuda']), default=None)(fn)
    fn = click.option('--detector', 'detector_path', help='Feature detector pickle  [default: Inception-v3 URL]',
                      metavar='PATH|URL', type=str, default=None)(fn)
    return fn


def _workers_option(fn: Callable) -> Callable:
    return click.option('--workers', 'num_workers', help='DataLoader worker processes', metavar='INT',
                        type=click.IntRange(min=0), default=3, show_default=True)(fn)


def _report_options(fn: Callable) -> Callable:
    """Options shared by the commands that compute an FID."""
    fn = click.option('--jsonl', 'jsonl_path', help='Append one JSON line per result to this file', metavar='FILE',
                      type=str, default=None)(fn)
    fn = click.option('--save-stats', 'stats_path', help='Also write the statistics (mu, sigma) of the images',
                      metavar='NPZ', type=str, default=None)(fn)
    fn = click.option('--repeat', help='Evaluate this many times and report each and the minimum', metavar='INT',
                      type=click.IntRange(min=1), default=1, show_default=True)(fn)
    fn = click.option('--bootstrap', help='Bootstrap resamples for a 95% confidence interval of each metric  '
                      '[default: none]', metavar='INT', type=click.IntRange(min=0), default=0)(fn)
    return _metric_options(fn)


class _MetricList(click.ParamType):
    name = 'list'

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> list[str]:
        if isinstance(value, list):
            return value
        try:
            return metrics.parse_metrics(str(value))
        except metrics.MetricError as err:
            self.fail(f'{err}; expected a comma-separated list of {", ".join(metrics.METRICS)}', param, ctx)


def _metric_options(fn: Callable) -> Callable:
    """--metrics and the DINOv2 source, shared by ref, calc and gen."""
    fn = click.option('--dinov2', 'dinov2_path', metavar='DIR', type=str, default=None,
                      help='Local copy of github.com/facebookresearch/dinov2 for fd_dinov2, with '
                      f'{metrics.DINOV2_WEIGHTS_FILE} inside  [default: download through torch.hub]')(fn)
    fn = click.option('--metrics', 'metric_names', help=f'Metrics to compute: {",".join(metrics.METRICS)}',
                      metavar='LIST', type=_MetricList(), default='fid', show_default=True)(fn)
    return fn


@click.group()
def main() -> None:
    """Frechet Inception Distance (FID) of generated images against dataset reference statistics.

    Examples:

    \b
    # Reference statistics of a dataset
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz

    \b
    # FID of 50,000 PNGs written by generate.py --outdir=out/cifar10 --seeds=0-49999 --subdirs (8 GPUs)
    torchrun --standalone --nproc_per_node=8 fid.py calc --images=out/cifar10 --seed=0 \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz --jsonl=out/fid.jsonl

    \b
    # FID straight from a network, three seed ranges, minimum reported (no PNGs written)
    torchrun --standalone --nproc_per_node=1 fid.py gen --network=run/network-snapshot-200000.pkl \\
        --ref=fid-refs/cifar10-32x32.npz --seeds=0-49999 --repeat=3 --steps=18
    """


@contextlib.contextmanager
def _session(device: Optional[str]) -> Iterator[torch.device]:
    """Join torchrun's process group (if any) for one command, and leave it afterwards."""
    host_memory.retain_freed_host_memory()
    try:
        device_obj = dist.init(device)
    except RuntimeError as err:
        raise click.ClickException(str(err)) from None
    thread_note = dist.limit_intra_op_threads(device_obj)
    if thread_note:
        dist.print0(thread_note)
    try:
        yield device_obj
    except BaseException:
        # A process group's shutdown waits for every rank, and after an error some may never arrive: only a
        # single process resets its state here; under torchrun the exit ends the group.
        if not dist.is_distributed():
            dist.shutdown()
        raise
    dist.shutdown()


def _load_ref_on_main(ref_path: Optional[str], metric_names: Sequence[str] = ('fid',)) \
        -> Optional[dict[str, np.ndarray]]:
    """Rank 0 reads the reference and checks it holds what every chosen metric needs, before any feature; its
    error, if any, stops every rank (None elsewhere / without)."""
    if ref_path is None:
        return None
    loaded: list[dict[str, np.ndarray]] = []

    def load() -> None:
        dist.print0(f'Reading reference statistics {ref_path} ...')
        loaded.append(load_reference(ref_path, metric_names))
    generate.on_main_rank(load)
    return loaded[0] if loaded else None


def probe_feature_dim(detector: torch.nn.Module, image_shape: Sequence[int], device: torch.device | str) -> int:
    """Number of features the detector returns for uint8 images of ``image_shape`` [C, H, W] (one black image is
    run through it)."""
    probe = torch.zeros([1, *image_shape], dtype=torch.uint8, device=device)
    return int(extract_features(detector, probe).shape[1])


def check_ref_features(ref: Optional[dict[str, np.ndarray]], ref_path: Optional[str],
                       detectors: dict[str, torch.nn.Module], image_shape: Sequence[int], device: torch.device) -> None:
    """Before any statistics are computed: the reference's arrays of the ``--detector`` features (``mu``,
    ``sigma``, ``features``) must have as many features as that detector returns. (DINOv2 is one fixed model.)"""
    def check() -> None:
        keys = sorted({key for metric, of in metrics.DETECTOR_OF.items() if of == metrics.INCEPTION
                       for key in metrics.REF_KEYS[metric] if ref is not None and key in ref})
        if not keys or metrics.INCEPTION not in detectors:
            return
        dim = probe_feature_dim(detectors[metrics.INCEPTION], image_shape, device)
        for key in keys:
            if ref[key].shape[-1] != dim:
                raise click.ClickException(f'--ref {ref_path}: {key} has {ref[key].shape[-1]} features but the '
                                           f'detector returns {dim}; expected reference statistics made with the '
                                           f'same detector')
    generate.on_main_rank(check)


def _detector_sources(metric_names: Sequence[str], detector_path: Optional[str],
                      dinov2_path: Optional[str]) -> dict[str, Optional[str]]:
    sources = {metrics.INCEPTION: detector_path, metrics.DINOV2: dinov2_path}
    return {name: sources[name] for name in metrics.detectors_for(metric_names)}


def _stats_arrays(metric_names: Sequence[str], features: dict[str, metrics.Features]) -> dict[str, np.ndarray]:
    """The arrays a reference file holds for these metrics (:data:`training.metrics.REF_KEYS`)."""
    arrays: dict[str, np.ndarray] = {}
    for name in metric_names:
        source = features[metrics.DETECTOR_OF[name]]
        if name in ('fid', 'fd_dinov2'):
            mu_key, sigma_key = metrics.REF_KEYS[name]
            arrays.update({mu_key: source.mu, sigma_key: source.sigma})
        else:
            arrays['features'] = source.features
    return arrays


def _check_bootstrap(bootstrap: int, ref_path: Optional[str]) -> None:
    if bootstrap == 1:
        raise click.BadParameter('one resample gives no interval; use 0 (none) or at least 2 (e.g. 200)',
                                 param_hint='--bootstrap')
    if bootstrap and ref_path is None:
        raise click.UsageError('--bootstrap needs --ref: the interval is of a metric against a reference')


def _finish_run(ref: Optional[dict[str, np.ndarray]], metric_names: Sequence[str],
                features: dict[str, metrics.Features], stats_path: Optional[str], record: dict[str, Any],
                started: float, bootstrap: int = 0, device: torch.device | str = 'cpu') -> Optional[dict[str, float]]:
    """Rank 0: save statistics if asked and compute the metrics (and their intervals) into ``record``; returns
    the values (None without --ref or off rank 0)."""
    if not dist.is_main():
        return None
    if stats_path is not None:
        written = save_arrays(stats_path, _stats_arrays(metric_names, features))
        print(f'Saved statistics to "{written}"')
    if ref is None:
        return None
    try:
        results = metrics.compute_metrics(metric_names, features, ref, seed=METRICS_SEED, device=device)
        intervals = {}
        if bootstrap:
            dist.print0(f'Bootstrapping {bootstrap} resamples...')
            intervals = metrics.bootstrap_intervals(metric_names, features, ref, bootstrap, BOOTSTRAP_CONFIDENCE,
                                                    seed=METRICS_SEED, device=device,
                                                    progress=lambda it: dist.progress(it, unit='resample'))
    except metrics.MetricError as err:
        raise click.ClickException(f'--ref {record["ref"]}: {err}') from None
    record.update(results)
    if 'features' in ref and ({'kid', 'pr'} & set(metric_names)):
        record['num_ref_features'] = int(ref['features'].shape[0])
    if 'kid' in metric_names:
        record['kid_subsets'] = metrics.KID_NUM_SUBSETS
        record['kid_subset_size'] = metrics.kid_subset_size(record['num_images'], record['num_ref_features'])
    if bootstrap:
        record.update({f'{key}_ci': list(bounds) for key, bounds in intervals.items()})
        record.update(bootstrap=bootstrap, confidence=BOOTSTRAP_CONFIDENCE)
    record['elapsed_s'] = round(time.time() - started, 3)
    return results


#: How the per-repeat lines name each result (the summary lines use the result keys themselves).
_DISPLAY_NAMES = dict(fid='FID', fd_dinov2='FD_DINOv2', kid='KID', precision='Precision', recall='Recall')


def _counts(record: dict[str, Any], key: str) -> str:
    """What a value was computed from, printed beside it."""
    text = f'{record["num_images"]} images'
    if key == 'kid':
        text += (f' vs {record["num_ref_features"]} reference; {record["kid_subsets"]} subsets of '
                 f'{record["kid_subset_size"]}')
    elif key in ('precision', 'recall'):
        text += f' vs {record["num_ref_features"]} reference; k={metrics.PR_NEIGHBOURS}'
    if f'{key}_ci' in record:
        low, high = record[f'{key}_ci']
        text += (f'; {record["confidence"]:.0%} CI [{low:g}, {high:g}] from {record["bootstrap"]} bootstrap '
                 f'resamples')
    return text


def _report(results: list[dict[str, float]], records: list[dict[str, Any]], jsonl_path: Optional[str],
            label: str) -> None:
    """Print each result as ``name value  (counts)`` and, last, the first result alone (the minimum over repeats):
    the last stdout line is always the reported figure. Append the JSON lines."""
    if not dist.is_main() or not results:
        return
    keys = list(results[0])
    if len(results) > 1:
        for record in records:
            for key in keys:
                print(f'{_DISPLAY_NAMES[key]} {record[key]:g}  ({label} {record[label]}; {_counts(record, key)})')
        print(f'Minimum over {len(results)} repeats:')
        summaries = {key: metrics.summarize_repeats([r[key] for r in results]) for key in keys}
        for key, summary in summaries.items():
            print(f'{key} {summary["min"]:g}  ({records[0]["num_images"]} images each; mean {summary["mean"]:g}, '
                  f'std {summary["std"]:g} over {len(results)} repeats)')
    else:
        for key in keys:
            print(f'{key} {records[0][key]:g}  ({_counts(records[0], key)})')
    print(f'{min(r[keys[0]] for r in results):g}')
    if jsonl_path is not None:
        for record in records:
            _append_json_line(jsonl_path, record)
        if len(results) > 1:
            per_run = {*keys, *(f'{key}_ci' for key in keys), 'elapsed_s', 'repeat', label}
            summary = {k: v for k, v in records[0].items() if k not in per_run}
            for key, values in summaries.items():
                summary.update({f'{key}_{stat}': value for stat, value in values.items()})
                summary[f'{key}_values'] = [r[key] for r in results]
            if 'fid' in keys:
                summary['fids'] = [r['fid'] for r in results]
            summary.update(repeats=len(results), **{label: [r[label] for r in records]},
                           elapsed_s=round(sum(r['elapsed_s'] for r in records), 3))
            _append_json_line(jsonl_path, summary)


def _numbered_stats_path(stats_path: Optional[str], index: int, repeats: int) -> Optional[str]:
    if stats_path is None or repeats == 1:
        return stats_path
    stem = stats_path[:-4] if stats_path.endswith('.npz') else stats_path
    return f'{stem}-{index}.npz'


@main.command()
@click.option('--images', 'image_path', help='Images to evaluate', metavar='PATH|ZIP', type=str, required=True)
@click.option('--ref', 'ref_path', help='Dataset reference statistics', metavar='NPZ|URL', type=str)
@click.option('--num', '--num-images', 'num_expected', metavar='INT', type=click.IntRange(min=2), default=50000,
              show_default=True, help="Number of images to use (spell it --num-images under torchrun, whose own parser "
              "takes --num for an abbreviation of its --numa-binding)")
@click.option('--seed', help='Random seed for selecting the images', metavar='INT', type=int, default=0,
              show_default=True)
@click.option('--batch', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64,
              show_default=True)
@dnnlib.util.refused_option('--ckpt', '--end_ckpt', type=int, script='fid.py calc', advice=(
    'this calc evaluates one folder: run it once per checkpoint folder, e.g. fid.py calc --images=DIR/ckpt_NNNNNN '
    '--ref=REF.npz'))
@dnnlib.util.refused_option('--gen_seed', type=int, script='fid.py calc', advice=(
    'pass the folder of that seed range instead, e.g. --images=DIR/ckpt_2_NNNNNN for seeds 50000-99999'))
@dnnlib.util.refused_option('--steps', '--alpha', '--prune', '--quant', type=bool, script='fid.py calc', advice=(
    'pass each sweep folder to --images, e.g. --images=DIR/steps018 after generate.py --outdir=DIR '
    '--sweep-steps=...  (alpha0.1, bits08 likewise; pruning is not offered)'))
@click.option('--allow-mixed', 'allow_mixed', is_flag=True,
              help='Pool images whose folders were made by different runs or settings (refused otherwise)')
@_report_options
@_workers_option
@_detector_options
def calc(image_path: str, ref_path: Optional[str], num_expected: int, seed: int, batch: int, repeat: int,
         bootstrap: int, metric_names: list[str], dinov2_path: Optional[str], stats_path: Optional[str],
         jsonl_path: Optional[str], detector_path: Optional[str], num_workers: int, device: Optional[str],
         allow_mixed: bool) -> None:
    """FID (and the other --metrics) of a folder or ZIP of images.

    Exactly --num images are used: a --seed-selected subset when there are more, an error when there are fewer.
    With --repeat=K the subset seeds are --seed, --seed+1, ..., which needs more images than --num.
    Images of several origins (subfolders whose manifests record different settings, or folders without
    manifest such as the PFGM++ fork's ckpt_* folders) are refused unless --allow-mixed: evaluate one folder each.
    """
    if ref_path is None and stats_path is None:
        raise click.UsageError('give --ref to compute an FID, --save-stats to keep the statistics, or both')
    _check_bootstrap(bootstrap, ref_path)
    check_output_file(stats_path, '--save-stats')
    check_output_file(jsonl_path, '--jsonl')
    with _session(device) as device_obj:
        ref = _load_ref_on_main(ref_path, metric_names)
        images = open_image_dataset(image_path, num_expected=num_expected)  # look before a long download
        if not allow_mixed:
            generate.on_main_rank(lambda: check_single_origin(image_path))
        if repeat > 1:
            available = len(open_image_dataset(image_path))
            if available <= num_expected:
                raise click.ClickException(f'--images {image_path}: --repeat={repeat} draws different subsets of '
                                           f'--num={num_expected} images, but there are only {available}')
        detectors = _as_detectors(_detector_sources(metric_names, detector_path, dinov2_path), device_obj)
        check_ref_features(ref, ref_path, detectors, [int(n) for n in images.image_shape], device_obj)
        keep = metrics.needs_features(metric_names, bootstrap)
        results, records = [], []
        for index in range(repeat):
            started = time.time()
            features = calculate_features(image_path, detectors, keep, num_expected=num_expected, seed=seed + index,
                                          max_batch_size=batch, num_workers=num_workers, device=device_obj)
            record = dict(command='calc', images=image_path, num_images=num_expected, ref=ref_path,
                          **_detector_record(metric_names, detector_path, dinov2_path), seed=seed + index,
                          repeat=index)
            values = _finish_run(ref, metric_names, features, _numbered_stats_path(stats_path, index, repeat),
                                 record, started, bootstrap, device_obj)
            if values is not None:
                results.append(values)
                records.append(record)
        _report(results, records, jsonl_path, label='seed')


@main.command()
@click.option('--data', 'dataset_path', help='Dataset to describe', metavar='PATH|ZIP', type=str, required=True)
@click.option('--dest', 'dest_path', help='Where to write the statistics', metavar='NPZ', type=str, required=True)
@click.option('--batch', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64,
              show_default=True)
@click.option('--ref-features', 'max_ref_features', metavar='INT', type=click.IntRange(min=2),
              default=REF_FEATURES_DEFAULT, show_default=True,
              help='For kid/pr: keep the Inception features of at most this many images (a seeded subset)')
@_metric_options
@_workers_option
@_detector_options
def ref(dataset_path: str, dest_path: str, batch: int, max_ref_features: int, metric_names: list[str],
        dinov2_path: Optional[str], detector_path: Optional[str], num_workers: int, device: Optional[str]) -> None:
    """Reference statistics of a dataset (all of its images), for calc --ref.

    The file holds what the chosen --metrics need: mu/sigma (fid), fd_dinov2_mu/fd_dinov2_sigma (fd_dinov2) and
    the features of up to --ref-features images (kid, pr).
    """
    check_output_file(dest_path, '--dest')
    with _session(device) as device_obj:
        keep = metrics.needs_features(metric_names, bootstrap=0)
        count = len(open_image_dataset(dataset_path, flag='--data'))
        keep_ids = None
        if keep and count > max_ref_features:
            keep_ids = np.sort(np.random.default_rng(METRICS_SEED).permutation(count)[:max_ref_features])
        features = calculate_features(dataset_path, _detector_sources(metric_names, detector_path, dinov2_path),
                                      keep, keep_ids, max_batch_size=batch, num_workers=num_workers,
                                      device=device_obj, flag='--data')
        if dist.is_main():
            written = save_arrays(dest_path, _stats_arrays(metric_names, features), flag='--dest')
            print(f'Saved dataset reference statistics to "{written}"')


def _detector_record(metric_names: Sequence[str], detector_path: Optional[str],
                     dinov2_path: Optional[str]) -> dict[str, str]:
    """The detectors behind a result, for its JSON line."""
    record = {}
    if metrics.INCEPTION in metrics.detectors_for(metric_names):
        record['detector'] = detector_path or DETECTOR_URL
    if metrics.DINOV2 in metrics.detectors_for(metric_names):
        record['dinov2'] = dinov2_path or metrics.DINOV2_HUB_REPO
    return dict(record, metrics=list(metric_names))


def _repeated_seed_ranges(seeds: list[int], repeat: int, limit: int) -> list[list[int]]:
    """--repeat=K: the seeds, then the same pattern shifted past them K-1 times (0-49999, 50000-99999, ...)."""
    span = max(seeds) - min(seeds) + 1
    ranges = [[s + index * span for s in seeds] for index in range(repeat)]
    if max(ranges[-1]) >= limit:
        raise click.BadParameter(f'--repeat={repeat} would need seeds up to {max(ranges[-1])}; seeds must stay below '
                                 f'{limit}', param_hint='--repeat')
    return ranges


@main.command()
@click.option('--network', 'network_pkl', help='Network snapshot .pkl, training state .pt, path or URL',
              metavar='PATH|URL', type=str, required=True)
@click.option('--ref', 'ref_path', help='Dataset reference statistics', metavar='NPZ|URL', type=str)
@click.option('--seeds', help='Random seeds, one image each (e.g. 0-49999)', metavar='LIST', type=str,
              default='0-49999', show_default=True)
@click.option('--class', 'class_idx', help='Class label  [default: random]', metavar='INT',
              type=click.IntRange(min=0), default=None)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1),
              default=64, show_default=True)
@generate.sampler_options
@generate.guidance_options
@_report_options
@_detector_options
def gen(network_pkl: str, ref_path: Optional[str], seeds: str, class_idx: Optional[int], max_batch_size: int,
        pfgmpp: Optional[bool], aug_dim: Optional[int], repeat: int, bootstrap: int, metric_names: list[str],
        dinov2_path: Optional[str], stats_path: Optional[str], jsonl_path: Optional[str],
        detector_path: Optional[str], device: Optional[str], gnet: Optional[str], guidance: float,
        guidance_interval: Optional[tuple[float, float]], **sampler_kwargs: Any) -> None:
    """FID (and the other --metrics) of a network, from images generated in memory (no PNGs are written).

    The statistics equal those of generate.py with the same flags followed by calc on its folder (same
    images, same uint8 quantization). With --repeat=K the seed list is shifted past itself K-1 times and the
    minimum FID is reported last, the protocol of the EDM and PFGM++ papers.
    """
    from training.network_io import NetworkLoadError, load_network

    if ref_path is None and stats_path is None:
        raise click.UsageError('give --ref to compute an FID, --save-stats to keep the statistics, or both')
    _check_bootstrap(bootstrap, ref_path)
    try:
        seed_list = generate.SeedList().convert(seeds, None, None)
    except click.BadParameter as err:
        err.param_hint = '--seeds'
        raise
    generate.check_noise_range(sampler_kwargs)
    generate.check_solver_flags(sampler_kwargs, [sampler_kwargs.get('num_steps') or generate.DEFAULT_STEPS])
    seed_ranges = _repeated_seed_ranges(sorted(seed_list), repeat, limit=generate.SEED_LIMIT)
    check_output_file(stats_path, '--save-stats')
    check_output_file(jsonl_path, '--jsonl')
    with _session(device) as device_obj:
        ref = _load_ref_on_main(ref_path, metric_names)

        def load() -> torch.nn.Module:
            dist.print0(f'Reading network {network_pkl} ...')
            try:
                return load_network(network_pkl, device_obj)
            except NetworkLoadError as err:
                raise click.ClickException(f'--network {err}') from None
        net = _rank0_first(load)
        precision, precision_note = network_io.precision_for_device(net, None, device_obj)
        if precision_note:
            dist.print0(precision_note)
            network_io.apply_speed_options(net, precision)
        D = generate.resolve_pfgmpp(net, pfgmpp, aug_dim)
        net = generate.make_guide(net, gnet, guidance, guidance_interval, D, device_obj)(net)
        if class_idx is not None and class_idx >= net.label_dim:
            raise click.BadParameter(f'{class_idx} is out of range; the network has {net.label_dim} classes',
                                     param_hint='--class')
        kwargs = {key: value for key, value in sampler_kwargs.items() if value is not None}
        detectors = _as_detectors(_detector_sources(metric_names, detector_path, dinov2_path), device_obj)
        check_ref_features(ref, ref_path, detectors, [net.img_channels, net.img_resolution, net.img_resolution],
                           device_obj)
        keep = metrics.needs_features(metric_names, bootstrap)

        results, records = [], []
        for index, run_seeds in enumerate(seed_ranges):
            started = time.time()
            features = calculate_features_for_network(net, run_seeds, detectors, keep, max_batch_size=max_batch_size,
                                                      device=device_obj, class_idx=class_idx, D=D, **kwargs)
            record = dict(command='gen', network=network_pkl, num_images=len(run_seeds), ref=ref_path,
                          **_detector_record(metric_names, detector_path, dinov2_path),
                          seeds=generate.compact_seeds(run_seeds), repeat=index, class_idx=class_idx,
                          pfgmpp=D is not None, D=D, sampler_kwargs=generate.jsonable(kwargs),
                          guidance=generate.guidance_record(gnet, guidance, guidance_interval))
            values = _finish_run(ref, metric_names, features, _numbered_stats_path(stats_path, index, repeat),
                                 record, started, bootstrap, device_obj)
            if values is not None:
                results.append(values)
                records.append(record)
        _report(results, records, jsonl_path, label='seeds')


if __name__ == '__main__':
    dnnlib.util.run_click_command(main)  # under torchrun, errors are printed by rank 0 only
