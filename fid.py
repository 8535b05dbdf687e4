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
import warnings
import zipfile
from typing import Any, Callable, Iterator, Optional, Sequence

import click
import numpy as np
import scipy.linalg
import torch

import dnnlib
import generate
from torch_utils import distributed as dist
from torch_utils import host_memory
from training import manifest as manifest_lib
from training import network_io
from training import sampler as sampling
from training.dataset import DatasetError, ImageFolderDataset

#: NVIDIA's PyTorch translation of the TensorFlow Inception-v3 graph used by every FID paper.
DETECTOR_URL = ('https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/'
                'inception-2015-12-05.pkl')

#: Environment knobs for fetching the detector and remote reference files; tests use them to fail fast offline.
ENV_DOWNLOAD_ATTEMPTS = 'PFGMPP_DOWNLOAD_ATTEMPTS'
ENV_DOWNLOAD_TIMEOUT = 'PFGMPP_DOWNLOAD_TIMEOUT'

#: Imaginary parts of sqrtm(sigma @ sigma_ref) above this fraction of its largest real entry are reported.
SQRTM_IMAG_TOLERANCE = 1e-6


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
    if not path.endswith('.npz'):
        path += '.npz'
    try:
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with dnnlib.util.atomic_write(path) as f:
            np.savez(f, mu=mu, sigma=sigma)
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
    """Read and validate reference statistics: an ``.npz`` with ``mu`` [D] and ``sigma`` [D, D], all finite.

    Every problem is one ``click.ClickException`` line naming the file and what was expected; numpy's own messages
    (such as its refusal to unpickle) are not passed on.
    """
    label = f'--ref {path_or_url}'
    expected = 'expected an .npz archive with arrays mu [D] and sigma [D, D] (as fid.py ref writes)'
    try:
        stream = dnnlib.util.open_url(path_or_url, cache=True, verbose=dist.is_main(), **_download_kwargs())
    except OSError as err:
        raise click.ClickException(f'{label}: cannot open ({err})') from None
    with stream:
        try:
            data = stream.read()
        except OSError as err:
            raise click.ClickException(f'{label}: cannot read ({err.strerror or err})') from None
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise click.ClickException(f'{label}: holds {_describe_non_npz(data[:16])}, not an .npz archive; {expected}')
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            missing = {'mu', 'sigma'} - set(archive.files)
            if missing:
                raise click.ClickException(f'{label}: missing {", ".join(sorted(missing))}; found keys '
                                           f'{sorted(archive.files)}; {expected}')
            mu, sigma = archive['mu'], archive['sigma']
    except click.ClickException:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as err:
        # A ZIP whose members are not .npy arrays, object arrays (pickles), truncated members.
        kind = 'object (pickled) arrays' if 'pickle' in str(err) else f'unreadable members ({type(err).__name__})'
        raise click.ClickException(f'{label}: a ZIP archive with {kind}; {expected}') from None
    for name, array in (('mu', mu), ('sigma', sigma)):
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise click.ClickException(f'{label}: {name} has dtype {array.dtype}; expected floating point')
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or mu.shape[0] == 0:
        raise click.ClickException(f'{label}: mu has shape {list(mu.shape)} and sigma {list(sigma.shape)}; '
                                   f'expected [D] and [D, D]')
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    for name, array in (('mu', mu), ('sigma', sigma)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise click.ClickException(f'{label}: {name} holds {bad} NaN/inf value(s)')
    return mu, sigma


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


def calculate_inception_stats(image_path: str, num_expected: Optional[int] = None, seed: int = 0,
                              max_batch_size: int = 64, num_workers: int = 3, prefetch_factor: int = 2,
                              device: Optional[torch.device | str] = None,
                              detector: Optional[torch.nn.Module | str] = None,
                              flag: str = '--images') -> tuple[np.ndarray, np.ndarray]:
    """Feature mean and covariance of the images in a folder or ZIP, sharded over the torchrun ranks.

    ``detector`` is a loaded module or a path/URL for :func:`load_detector` (None: the Inception URL).
    ``num_expected``/``seed`` select exactly that many images as ``fid.py calc --num/--seed`` do.
    """
    device = torch.device(device) if device is not None else dist.get_device()
    dist.print0(f'Reading images from {image_path} ...')
    dataset = open_image_dataset(image_path, num_expected=num_expected, seed=seed, flag=flag)
    images = _CheckedImages(dataset, source=f'{flag} {image_path}')
    detector = _as_detector(detector, device)

    rank_batches = _rank_batches(range(len(images)), max_batch_size)
    loader = torch.utils.data.DataLoader(
        images, batch_sampler=rank_batches, collate_fn=_collate_images, num_workers=num_workers,
        prefetch_factor=(prefetch_factor if num_workers > 0 else None), pin_memory=(device.type == 'cuda'))

    dist.print0(f'Calculating statistics for {len(images)} images...')
    stats = FeatureStats(device)
    for batch in dist.progress(loader, unit='batch', total=len(rank_batches)):
        if isinstance(batch, _ImageReadError):
            raise click.ClickException(batch.message)
        stats.add(extract_features(detector, batch.to(device, non_blocking=True)))
    return stats.compute()


def calculate_stats_for_network(net: torch.nn.Module, seeds: Sequence[int], max_batch_size: int = 64,
                                device: Optional[torch.device | str] = None,
                                detector: Optional[torch.nn.Module | str] = None, class_idx: Optional[int] = None,
                                pfgmpp: bool = False, D: Optional[int] = None,
                                **sampler_kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Feature statistics of the images ``net`` generates for ``seeds``, made in memory and never written out.

    The images are the uint8 ones generate.py writes as PNGs (same sampler, same per-seed randomness, same
    quantization), taken in file-name order and batched as ``calc`` batches them, so the result equals running
    generate.py and then ``fid.py calc`` on its folder. ``sampler_kwargs`` are those of
    ``training.sampler.sample_batch`` (None means the default).
    """
    ordered = sorted(int(s) for s in seeds)
    repeated = sorted({s for s, t in zip(ordered, ordered[1:]) if s == t})
    if repeated:
        raise click.ClickException(f'--seeds lists seed {repeated[0]} more than once; each image is counted once')
    if len(ordered) < 2:
        raise click.ClickException(f'--seeds gives {len(ordered)} image(s); need at least 2 for a covariance')
    device = torch.device(device) if device is not None else dist.get_device()
    detector = _as_detector(detector, device)

    rank_batches = _rank_batches(ordered, max_batch_size)
    try:
        nfe = sampling.sampler_nfe(sampler_kwargs.get('num_steps') or generate.DEFAULT_STEPS, sampler_kwargs)
    except ValueError as err:
        raise click.ClickException(generate.sampler_error(err)) from None
    dist.print0(f'Generating {len(ordered)} images in memory ({nfe} network evaluations each) and calculating '
                f'their statistics...')
    stats = FeatureStats(device)
    for batch_seeds in dist.progress(rank_batches, unit='batch', total=len(rank_batches)):
        try:
            samples = sampling.sample_batch(net, batch_seeds, device=device, class_idx=class_idx, pfgmpp=pfgmpp,
                                            D=D, **sampler_kwargs)
        except ValueError as err:  # sampler settings the network cannot honour
            raise click.ClickException(generate.sampler_error(err)) from None
        stats.add(extract_features(detector, sampling.to_uint8(samples)))
    return stats.compute()


def calculate_fid_from_inception_stats(mu: np.ndarray, sigma: np.ndarray, mu_ref: np.ndarray,
                                       sigma_ref: np.ndarray) -> float:
    """Frechet distance between two Gaussians: |mu - mu_ref|^2 + tr(S + S_ref - 2 sqrtm(S S_ref)), real part.

    sqrtm of a product of covariances can pick up imaginary round-off; only the real part is used, with a warning
    giving the magnitude when it is more than round-off.
    """
    if mu.shape != mu_ref.shape or sigma.shape != sigma_ref.shape:
        raise click.ClickException(f'statistics have {mu.shape[0]} features but the reference has {mu_ref.shape[0]}; '
                                   f'the reference must come from the same detector')
    mean_term = np.square(mu - mu_ref).sum()
    root = scipy.linalg.sqrtm(sigma @ sigma_ref)
    if isinstance(root, tuple):  # SciPy versions that still return (root, error estimate)
        root = root[0]
    if not np.all(np.isfinite(root)):
        raise click.ClickException('sqrtm(sigma @ sigma_ref) is not finite; the statistics are degenerate')
    if np.iscomplexobj(root):
        imag = float(np.abs(root.imag).max())
        scale = max(float(np.abs(root.real).max()), np.finfo(np.float64).tiny)
        if imag > SQRTM_IMAG_TOLERANCE * scale:
            warnings.warn(f'FID: sqrtm(sigma @ sigma_ref) has imaginary parts up to {imag:.3g} (largest real entry '
                          f'{scale:.3g}); using the real part', RuntimeWarning, stacklevel=2)
        root = root.real
    return float(mean_term + np.trace(sigma) + np.trace(sigma_ref) - 2 * np.trace(root))


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


def _load_ref_on_main(ref_path: Optional[str]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Rank 0 reads and checks the reference; its error, if any, stops every rank (None elsewhere / without)."""
    if ref_path is None:
        return None
    loaded: list[tuple[np.ndarray, np.ndarray]] = []

    def load() -> None:
        dist.print0(f'Reading reference statistics {ref_path} ...')
        loaded.append(load_ref_stats(ref_path))
    generate.on_main_rank(load)
    return loaded[0] if loaded else None


def probe_feature_dim(detector: torch.nn.Module, image_shape: Sequence[int], device: torch.device | str) -> int:
    """Number of features the detector returns for uint8 images of ``image_shape`` [C, H, W] (one black image is
    run through it)."""
    probe = torch.zeros([1, *image_shape], dtype=torch.uint8, device=device)
    return int(extract_features(detector, probe).shape[1])


def check_ref_features(ref: Optional[tuple[np.ndarray, np.ndarray]], ref_path: Optional[str],
                       detector: torch.nn.Module, image_shape: Sequence[int], device: torch.device) -> None:
    """Before any statistics are computed: the reference must have as many features as the detector returns."""
    def check() -> None:
        if ref is None:
            return
        dim = probe_feature_dim(detector, image_shape, device)
        if ref[0].shape[0] != dim:
            raise click.ClickException(f'--ref {ref_path}: has {ref[0].shape[0]} features but the detector returns '
                                       f'{dim}; expected reference statistics made with the same detector')
    generate.on_main_rank(check)


def _finish_run(ref: Optional[tuple[np.ndarray, np.ndarray]], mu: np.ndarray, sigma: np.ndarray,
                stats_path: Optional[str], record: dict[str, Any], started: float) -> Optional[float]:
    """Rank 0: save statistics if asked and compute the FID; returns it (None without --ref or off rank 0)."""
    if not dist.is_main():
        return None
    if stats_path is not None:
        written = save_stats(stats_path, mu, sigma)
        print(f'Saved statistics to "{written}"')
    if ref is None:
        return None
    fid = calculate_fid_from_inception_stats(mu, sigma, *ref)
    record.update(fid=fid, elapsed_s=round(time.time() - started, 3))
    return fid


def _report(fids: list[float], records: list[dict[str, Any]], jsonl_path: Optional[str], label: str) -> None:
    """Print the FIDs (the last stdout line is always the reported figure) and append the JSON lines."""
    if not dist.is_main() or not fids:
        return
    if len(fids) > 1:
        for record in records:
            print(f'FID {record["fid"]:g}  ({label} {record[label]})')
        print(f'Minimum over {len(fids)} repeats:')
    print(f'{min(fids):g}')
    if jsonl_path is not None:
        for record in records:
            _append_json_line(jsonl_path, record)
        if len(fids) > 1:
            summary = {k: v for k, v in records[0].items() if k not in ('fid', 'elapsed_s', 'repeat', label)}
            summary.update(fid_min=min(fids), fids=fids, repeats=len(fids), **{label: [r[label] for r in records]},
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
         stats_path: Optional[str], jsonl_path: Optional[str], detector_path: Optional[str], num_workers: int,
         device: Optional[str], allow_mixed: bool) -> None:
    """FID of a folder or ZIP of images.

    Exactly --num images are used: a --seed-selected subset when there are more, an error when there are fewer.
    With --repeat=K the subset seeds are --seed, --seed+1, ..., which needs more images than --num.
    Images of several origins (subfolders whose manifests record different settings, or folders without
    manifest such as the PFGM++ fork's ckpt_* folders) are refused unless --allow-mixed: evaluate one folder each.
    """
    if ref_path is None and stats_path is None:
        raise click.UsageError('give --ref to compute an FID, --save-stats to keep the statistics, or both')
    check_output_file(stats_path, '--save-stats')
    check_output_file(jsonl_path, '--jsonl')
    with _session(device) as device_obj:
        ref = _load_ref_on_main(ref_path)
        images = open_image_dataset(image_path, num_expected=num_expected)  # look before a long download
        if not allow_mixed:
            generate.on_main_rank(lambda: check_single_origin(image_path))
        if repeat > 1:
            available = len(open_image_dataset(image_path))
            if available <= num_expected:
                raise click.ClickException(f'--images {image_path}: --repeat={repeat} draws different subsets of '
                                           f'--num={num_expected} images, but there are only {available}')
        detector = _as_detector(detector_path, device_obj)
        check_ref_features(ref, ref_path, detector, [int(n) for n in images.image_shape], device_obj)
        fids, records = [], []
        for index in range(repeat):
            started = time.time()
            mu, sigma = calculate_inception_stats(image_path, num_expected=num_expected, seed=seed + index,
                                                  max_batch_size=batch, num_workers=num_workers, device=device_obj,
                                                  detector=detector)
            record = dict(command='calc', images=image_path, num_images=num_expected, ref=ref_path,
                          detector=detector_path or DETECTOR_URL, seed=seed + index, repeat=index)
            fid = _finish_run(ref, mu, sigma, _numbered_stats_path(stats_path, index, repeat), record, started)
            if fid is not None:
                fids.append(fid)
                records.append(record)
        _report(fids, records, jsonl_path, label='seed')


@main.command()
@click.option('--data', 'dataset_path', help='Dataset to describe', metavar='PATH|ZIP', type=str, required=True)
@click.option('--dest', 'dest_path', help='Where to write the statistics', metavar='NPZ', type=str, required=True)
@click.option('--batch', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64,
              show_default=True)
@_workers_option
@_detector_options
def ref(dataset_path: str, dest_path: str, batch: int, detector_path: Optional[str], num_workers: int,
        device: Optional[str]) -> None:
    """Reference statistics of a dataset (all of its images), for calc --ref."""
    check_output_file(dest_path, '--dest')
    with _session(device) as device_obj:
        mu, sigma = calculate_inception_stats(dataset_path, max_batch_size=batch, num_workers=num_workers,
                                              device=device_obj, detector=detector_path, flag='--data')
        if dist.is_main():
            written = save_stats(dest_path, mu, sigma, flag='--dest')
            print(f'Saved dataset reference statistics to "{written}"')


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
        pfgmpp: Optional[bool], aug_dim: Optional[int], repeat: int, stats_path: Optional[str],
        jsonl_path: Optional[str], detector_path: Optional[str], device: Optional[str], gnet: Optional[str],
        guidance: float, guidance_interval: Optional[tuple[float, float]], **sampler_kwargs: Any) -> None:
    """FID of a network, from images generated in memory (no PNGs are written).

    The statistics equal those of generate.py with the same flags followed by calc on its folder (same
    images, same uint8 quantization). With --repeat=K the seed list is shifted past itself K-1 times and the
    minimum FID is reported last, the protocol of the EDM and PFGM++ papers.
    """
    from training.network_io import NetworkLoadError, load_network

    if ref_path is None and stats_path is None:
        raise click.UsageError('give --ref to compute an FID, --save-stats to keep the statistics, or both')
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
        ref = _load_ref_on_main(ref_path)

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
        use_pfgmpp, D = generate.resolve_pfgmpp(net, pfgmpp, aug_dim)
        net = generate.make_guide(net, gnet, guidance, guidance_interval, D, device_obj)(net)
        if class_idx is not None and class_idx >= net.label_dim:
            raise click.BadParameter(f'{class_idx} is out of range; the network has {net.label_dim} classes',
                                     param_hint='--class')
        kwargs = {key: value for key, value in sampler_kwargs.items() if value is not None}
        detector = _as_detector(detector_path, device_obj)
        check_ref_features(ref, ref_path, detector, [net.img_channels, net.img_resolution, net.img_resolution],
                           device_obj)

        fids, records = [], []
        for index, run_seeds in enumerate(seed_ranges):
            started = time.time()
            mu, sigma = calculate_stats_for_network(net, run_seeds, max_batch_size=max_batch_size, device=device_obj,
                                                    detector=detector, class_idx=class_idx, pfgmpp=use_pfgmpp, D=D,
                                                    **kwargs)
            record = dict(command='gen', network=network_pkl, num_images=len(run_seeds), ref=ref_path,
                          detector=detector_path or DETECTOR_URL, seeds=generate.compact_seeds(run_seeds),
                          repeat=index, class_idx=class_idx, pfgmpp=use_pfgmpp, D=D,
                          sampler_kwargs=generate.jsonable(kwargs),
                          guidance=generate.guidance_record(gnet, guidance, guidance_interval))
            fid = _finish_run(ref, mu, sigma, _numbered_stats_path(stats_path, index, repeat), record, started)
            if fid is not None:
                fids.append(fid)
                records.append(record)
        _report(fids, records, jsonl_path, label='seeds')


if __name__ == '__main__':
    dnnlib.util.run_click_command(main)  # under torchrun, errors are printed by rank 0 only
