"""The runs behind ``fid.py``'s commands: reference statistics of a dataset (:func:`write_reference`), the metrics
of a folder or ZIP of images (:func:`evaluate_folder`) and of the images a network generates in memory
(:func:`evaluate_network`), each repeated over seeds or seed ranges, with their records: the printed lines
(:meth:`Report.lines`), the appended JSON lines and the optional statistics files; and the paired comparison of
two folders generated from the same seeds (:func:`compare_folders`, :mod:`evaluation.paired`).

Features come from :mod:`evaluation.features` (one pass of every detector the metrics need), the values from
:mod:`evaluation.metrics`. Reference files are read on rank 0 before any feature is computed, and its error (if
any) is raised on every rank. The Frechet distance in the ``--detector``'s feature space is reported under that
detector's name (:func:`evaluation.features.distance_name`): ``fid`` for Inception-v3, ``fd_digits`` for the digits
classifier; the other result keys are those of :data:`evaluation.metrics.RESULT_KEYS`.

Errors are the library's one-line ``ValueError`` subclasses (:data:`ONE_LINE_ERRORS`); the sampler's own
``ValueError`` passes through :func:`evaluate_network` unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import host_memory
from evaluation import features as feature_lib
from evaluation import metrics, paired
from formats import manifest, network_io
from sampling import consistency as consistency_sampling
from sampling import pipeline, schedules

#: Reference files keep the features of at most this many images for KID and precision/recall (a seeded subset).
REF_FEATURES_DEFAULT = 50000

#: Seed of the reference-feature subset, of KID's subsets and of the bootstrap resamples: results are reproducible.
METRICS_SEED = 0

#: Coverage of the bootstrap intervals.
BOOTSTRAP_CONFIDENCE = 0.95


class DeviceUnavailable(ValueError):
    """The device or the torchrun process group of a run cannot be set up (e.g. CUDA asked for but absent)."""


#: The library's errors whose message is a complete line for the user.
ONE_LINE_ERRORS = (feature_lib.FeatureError, metrics.MetricError, metrics.DetectorUnavailable, DeviceUnavailable)

#: How the per-repeat lines name each result (the summary lines use the result keys themselves).
DISPLAY_NAMES = dict(fid='FID', fd_dinov2='FD_DINOv2', kid='KID', precision='Precision', recall='Recall')


def display_name(key: str) -> str:
    """``fid`` -> ``FID``, ``fd_digits`` -> ``FD_digits``: a result key as the per-repeat lines print it."""
    return DISPLAY_NAMES.get(key, f'FD_{key[3:]}' if key.startswith('fd_') else key)


@dataclasses.dataclass
class Request:
    """What to compute from a set of images and where it goes: the options ``calc`` and ``gen`` share.

    ``metric_names`` are ``--metrics`` names (:data:`evaluation.metrics.METRICS`); ``detector_path`` None means
    the Inception URL, ``dinov2_path`` None torch.hub. ``stats_path`` gets ``-{index}`` before ``.npz`` when
    ``repeat`` > 1. ``bootstrap`` is the number of resamples (0: no intervals).
    """
    metric_names: Sequence[str] = ('fid',)
    ref_path: Optional[str] = None
    detector_path: Optional[str] = None
    dinov2_path: Optional[str] = None
    stats_path: Optional[str] = None
    jsonl_path: Optional[str] = None
    repeat: int = 1
    bootstrap: int = 0

    def detector_sources(self) -> dict[str, Optional[str]]:
        """Detector name -> path/URL (None: the default source) for the detectors the metrics need."""
        sources = {metrics.INCEPTION: self.detector_path, metrics.DINOV2: self.dinov2_path}
        return {name: sources[name] for name in metrics.detectors_for(self.metric_names)}

    def detector_record(self) -> dict[str, Any]:
        """The detectors behind a result and the metrics asked for, for its JSON line."""
        record: dict[str, Any] = {}
        if metrics.INCEPTION in metrics.detectors_for(self.metric_names):
            record['detector'] = self.detector_path or feature_lib.DETECTOR_URL
        if metrics.DINOV2 in metrics.detectors_for(self.metric_names):
            record['dinov2'] = self.dinov2_path or metrics.DINOV2_HUB_REPO
        return dict(record, metrics=list(self.metric_names))

    def stats_path_of(self, index: int) -> Optional[str]:
        """Where repeat ``index`` writes its statistics (None: nowhere)."""
        if self.stats_path is None or self.repeat == 1:
            return self.stats_path
        stem = self.stats_path[:-4] if self.stats_path.endswith('.npz') else self.stats_path
        return f'{stem}-{index}.npz'


# ----------------------------------------------------------------------------
# Processes: the session of a run, rank 0's work and every rank's error.


@contextlib.contextmanager
def session(device: Optional[str] = None) -> Iterator[torch.device]:
    """Join torchrun's process group (if any) for one run on ``device`` ('cpu', 'cuda' or None: cuda when
    available), with intra-op threads limited to this process's share of the cores, and leave it afterwards.

    Raises DeviceUnavailable when the device or the process group cannot be set up.
    """
    host_memory.retain_freed_host_memory()
    try:
        device_obj = dist.init(device)
    except RuntimeError as err:
        raise DeviceUnavailable(str(err)) from None
    thread_note = dist.limit_intra_op_threads(device_obj)
    if thread_note:
        dist.print0(thread_note)
    try:
        yield device_obj
    except BaseException:
        # Shutting a process group down waits for every rank, and after an error some may never arrive: only a
        # single process resets its state here; under torchrun the exit ends the group.
        if not dist.is_distributed():
            dist.shutdown()
        raise
    dist.shutdown()


def on_main_rank(task: Callable[[], Any]) -> Any:
    """Run ``task`` on rank 0 only and return its result on every rank; its one-line error (:data:`ONE_LINE_ERRORS`
    or another ``ValueError``) is raised as :class:`evaluation.features.FeatureError` on every rank, so no rank
    waits for one that stopped."""
    outcome: tuple[Any, Optional[str]] = (None, None)
    if dist.is_main():
        try:
            outcome = (task(), None)
        except ValueError as err:
            outcome = (None, str(err))
        except OSError as err:
            outcome = (None, f'cannot write {err.filename or "the output"} ({err.strerror or err})')
    result, error = dist.broadcast_object(outcome)
    if error is not None:
        raise feature_lib.FeatureError(error)
    return result


def load_reference_on_main(request: Request) -> Optional[dict[str, np.ndarray]]:
    """Rank 0 reads ``request.ref_path`` and checks it holds what every chosen metric needs
    (:func:`evaluation.features.load_reference`); None on the other ranks and without a reference."""
    if request.ref_path is None:
        return None

    def load() -> dict[str, np.ndarray]:
        dist.print0(f'Reading reference statistics {request.ref_path} ...')
        return feature_lib.load_reference(request.ref_path, request.metric_names)
    return on_main_rank(load)


def check_ref_features(ref: Optional[dict[str, np.ndarray]], ref_path: Optional[str],
                       detectors: dict[str, torch.nn.Module], image_shape: Sequence[int], device: torch.device) -> None:
    """Before any statistics: the reference's arrays of the ``--detector`` features (``mu``, ``sigma``,
    ``features``) must have as many features as that detector returns for images of ``image_shape`` [C, H, W].
    (DINOv2 is one fixed model.) Raises FeatureError on every rank."""
    def check() -> None:
        keys = sorted({key for metric, of in metrics.DETECTOR_OF.items() if of == metrics.INCEPTION
                       for key in metrics.REF_KEYS[metric] if ref is not None and key in ref})
        if not keys or metrics.INCEPTION not in detectors:
            return
        dim = feature_lib.probe_feature_dim(detectors[metrics.INCEPTION], image_shape, device)
        for key in keys:
            if ref[key].shape[-1] != dim:
                raise feature_lib.FeatureError(
                    f'--ref {ref_path}: {key} has {ref[key].shape[-1]} features but the detector returns {dim}; '
                    f'expected reference statistics made with the same detector')
    on_main_rank(check)


# ----------------------------------------------------------------------------
# Results and their records.


@dataclasses.dataclass
class Report:
    """The results of every repeat (result key -> value) and their records (the JSON lines); ``label`` names what
    differs between repeats (``seed`` for calc, ``seeds`` for gen). Empty off rank 0 and without a reference."""
    results: list[dict[str, float]]
    records: list[dict[str, Any]]
    label: str

    def summaries(self) -> dict[str, dict[str, float]]:
        return {key: metrics.summarize_repeats([r[key] for r in self.results]) for key in self.results[0]}

    def lines(self) -> list[str]:
        """Each result as ``name value  (counts)``; with repeats, each run's, then the minimum with mean and spread;
        last, the first result's minimum alone, so the last line is always the reported figure."""
        if not self.results:
            return []
        keys, first = list(self.results[0]), self.records[0]
        if len(self.results) == 1:
            lines = [f'{key} {first[key]:g}  ({_counts(first, key)})' for key in keys]
        else:
            lines = [f'{display_name(key)} {record[key]:g}  ({self.label} {record[self.label]}; '
                     f'{_counts(record, key)})' for record in self.records for key in keys]
            lines.append(f'Minimum over {len(self.results)} repeats:')
            lines += [f'{key} {s["min"]:g}  ({first["num_images"]} images each; mean {s["mean"]:g}, std {s["std"]:g} '
                      f'over {len(self.results)} repeats)' for key, s in self.summaries().items()]
        return lines + [f'{min(r[keys[0]] for r in self.results):g}']

    def print(self) -> None:
        """Print :meth:`lines` (nothing off rank 0)."""
        for line in self.lines():
            print(line)

    def json_lines(self) -> list[dict[str, Any]]:
        """One record per repeat and, with repeats, a summary: ``{key}_min/_mean/_std/_values`` per result, the
        shared settings, and the per-repeat labels."""
        lines = list(self.records)
        if len(self.results) > 1:
            keys = list(self.results[0])
            per_run = {*keys, *(f'{key}_ci' for key in keys), 'elapsed_s', 'repeat', self.label}
            summary = {k: v for k, v in self.records[0].items() if k not in per_run}
            for key, values in self.summaries().items():
                summary.update({f'{key}_{stat}': value for stat, value in values.items()})
                summary[f'{key}_values'] = [r[key] for r in self.results]
            if 'fid' in keys:
                summary['fids'] = [r['fid'] for r in self.results]
            summary.update(repeats=len(self.results), **{self.label: [r[self.label] for r in self.records]},
                           elapsed_s=round(sum(r['elapsed_s'] for r in self.records), 3))
            lines.append(summary)
        return lines


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


def append_json_line(path: str, record: dict[str, Any]) -> None:
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


def _renamed(values: dict[str, Any], distance: str) -> dict[str, Any]:
    """The ``fid`` result under the name of the detector's distance, in place (order kept)."""
    return {(distance if key == 'fid' else key): value for key, value in values.items()}


def _finish_run(request: Request, ref: Optional[dict[str, np.ndarray]], features: dict[str, metrics.Features],
                index: int, record: dict[str, Any], started: float, distance: str,
                device: torch.device) -> Optional[dict[str, float]]:
    """Rank 0: save the statistics if asked and compute the metrics (and their intervals) into ``record``;
    returns the values (None without a reference or off rank 0)."""
    if not dist.is_main():
        return None
    stats_path = request.stats_path_of(index)
    if stats_path is not None:
        written = feature_lib.save_arrays(stats_path, feature_lib.stats_arrays(request.metric_names, features))
        print(f'Saved statistics to "{written}"')
    if ref is None:
        return None
    names = request.metric_names
    try:
        results = metrics.compute_metrics(names, features, ref, seed=METRICS_SEED, device=device)
        intervals = {}
        if request.bootstrap:
            dist.print0(f'Bootstrapping {request.bootstrap} resamples...')
            intervals = metrics.bootstrap_intervals(names, features, ref, request.bootstrap, BOOTSTRAP_CONFIDENCE,
                                                    seed=METRICS_SEED, device=device,
                                                    progress=lambda it: dist.progress(it, unit='resample'))
    except metrics.MetricError as err:
        raise metrics.MetricError(f'--ref {request.ref_path}: {err}') from None
    results, intervals = _renamed(results, distance), _renamed(intervals, distance)
    record.update(results)
    if 'features' in ref and ({'kid', 'pr'} & set(names)):
        record['num_ref_features'] = int(ref['features'].shape[0])
    if 'kid' in names:
        record['kid_subsets'] = metrics.KID_NUM_SUBSETS
        record['kid_subset_size'] = metrics.kid_subset_size(record['num_images'], record['num_ref_features'])
    if request.bootstrap:
        record.update({f'{key}_ci': list(bounds) for key, bounds in intervals.items()})
        record.update(bootstrap=request.bootstrap, confidence=BOOTSTRAP_CONFIDENCE)
    record['elapsed_s'] = round(time.time() - started, 3)
    return results


def _run_repeats(request: Request, ref: Optional[dict[str, np.ndarray]], detectors: dict[str, torch.nn.Module],
                 runs: Sequence[tuple[Callable[[], dict[str, metrics.Features]], dict[str, Any]]], label: str,
                 device: torch.device) -> Report:
    """Compute each run's features (``runs``: a feature pass and its record), its metrics, and the report; the
    JSON lines are appended on rank 0."""
    distance = feature_lib.distance_name(detectors[metrics.INCEPTION]) if metrics.INCEPTION in detectors else 'fid'
    report = Report([], [], label)
    for index, (compute, record) in enumerate(runs):
        started = time.time()
        values = _finish_run(request, ref, compute(), index, record, started, distance, device)
        if values is not None:
            report.results.append(values)
            report.records.append(record)
    if request.jsonl_path is not None and report.results:
        for line in report.json_lines():
            append_json_line(request.jsonl_path, line)
    return report


# ----------------------------------------------------------------------------
# The three runs.


def load_network(network_pkl: str, device: torch.device) -> torch.nn.Module:
    """The network of ``fid.py gen``, loaded as generate.py loads it: rank 0 first (one download), in the precision
    its device runs best (:func:`formats.network_io.precision_for_device`). Raises FeatureError naming
    ``--network`` for a file that cannot be loaded."""
    def load() -> torch.nn.Module:
        dist.print0(f'Reading network {network_pkl} ...')
        try:
            return network_io.load_network(network_pkl, device)
        except network_io.NetworkLoadError as err:
            raise feature_lib.FeatureError(f'--network {err}') from None
    net = dist.rank0_first(load)
    try:  # weights holding NaN/inf sample NaN everywhere: name them now, not as the seeds that failed
        pipeline.check_finite_weights(net, f'--network {network_pkl}')
    except pipeline.NonFiniteError as err:
        raise feature_lib.FeatureError(str(err)) from None
    precision, precision_note = network_io.precision_for_device(net, None, device)
    if precision_note:
        dist.print0(precision_note)
    network_io.apply_speed_options(net, precision)
    return net


def write_reference(dataset_path: str, dest_path: str, metric_names: Sequence[str] = ('fid',),
                    detector_path: Optional[str] = None, dinov2_path: Optional[str] = None,
                    max_ref_features: int = REF_FEATURES_DEFAULT, max_batch_size: int = 64,
                    num_workers: Optional[int] = None, device: Optional[torch.device] = None) -> Optional[str]:
    """Reference statistics of every image of a dataset (folder or ZIP), for ``calc --ref``: the arrays the chosen
    metrics need (:data:`evaluation.metrics.REF_KEYS`), with the features of at most ``max_ref_features`` images
    (a subset seeded with :data:`METRICS_SEED`) for KID and precision/recall. Returns the path written on rank 0
    (``.npz`` added when missing), None elsewhere."""
    request = Request(metric_names, detector_path=detector_path, dinov2_path=dinov2_path)
    keep = metrics.needs_features(metric_names, bootstrap=0)
    count = len(feature_lib.open_image_dataset(dataset_path, flag='--data'))
    keep_ids = None
    if keep and count > max_ref_features:
        keep_ids = np.sort(np.random.default_rng(METRICS_SEED).permutation(count)[:max_ref_features])
    features = feature_lib.calculate_features(dataset_path, request.detector_sources(), keep, keep_ids,
                                              max_batch_size=max_batch_size, num_workers=num_workers, device=device,
                                              flag='--data')
    if not dist.is_main():
        return None
    return feature_lib.save_arrays(dest_path, feature_lib.stats_arrays(metric_names, features), flag='--dest')


def evaluate_folder(request: Request, image_path: str, num_images: int, seed: int = 0, max_batch_size: int = 64,
                    num_workers: Optional[int] = None, device: Optional[torch.device] = None,
                    allow_mixed: bool = False) -> Report:
    """The chosen metrics of exactly ``num_images`` images of a folder or ZIP, ``request.repeat`` times: repeat i
    draws the subset seeded with ``seed + i`` (:func:`evaluation.features.open_image_dataset`).

    Refused before any feature: a reference that lacks what a metric needs or has another feature size than the
    detector, fewer images than asked for (or no more than asked for with repeats), and, unless ``allow_mixed``,
    images of several origins (:func:`evaluation.features.check_single_origin`).
    """
    device = torch.device(device) if device is not None else dist.get_device()
    ref = load_reference_on_main(request)
    images = feature_lib.open_image_dataset(image_path, num_expected=num_images)  # look before a long download
    if not allow_mixed:
        on_main_rank(lambda: feature_lib.check_single_origin(image_path))
    if request.repeat > 1:
        available = len(feature_lib.open_image_dataset(image_path))
        if available <= num_images:
            raise feature_lib.FeatureError(
                f'--images {image_path}: --repeat={request.repeat} draws different subsets of '
                f'--num-images={num_images} images, but there are only {available}')
    detectors = feature_lib.load_detectors(request.detector_sources(), device)
    check_ref_features(ref, request.ref_path, detectors, [int(n) for n in images.image_shape], device)
    keep = metrics.needs_features(request.metric_names, request.bootstrap)

    def run(index: int) -> tuple[Callable[[], dict[str, metrics.Features]], dict[str, Any]]:
        record = dict(command='calc', images=image_path, num_images=num_images, ref=request.ref_path,
                      **request.detector_record(), seed=seed + index, repeat=index)
        return (lambda: feature_lib.calculate_features(
            image_path, detectors, keep, num_expected=num_images, seed=seed + index, max_batch_size=max_batch_size,
            num_workers=num_workers, device=device)), record
    return _run_repeats(request, ref, detectors, [run(i) for i in range(request.repeat)], 'seed', device)


def repeated_seed_ranges(seeds: Sequence[int], repeat: int, limit: int) -> list[list[int]]:
    """``repeat`` = K: the seeds, then the same pattern shifted past them K-1 times (0-49999, 50000-99999, ...).
    Raises FeatureError when a shifted seed reaches ``limit``."""
    span = max(seeds) - min(seeds) + 1
    ranges = [[s + index * span for s in seeds] for index in range(repeat)]
    if max(ranges[-1]) >= limit:
        raise feature_lib.FeatureError(f'--repeat={repeat} would need seeds up to {max(ranges[-1])}; seeds must stay '
                                       f'below {limit}')
    return ranges


def evaluate_network(request: Request, ref: Optional[dict[str, np.ndarray]], net: torch.nn.Module,
                     network: str, seed_ranges: Sequence[Sequence[int]], guidance: Optional[dict[str, Any]] = None,
                     max_batch_size: int = 64,
                     device: Optional[torch.device] = None, class_idx: Optional[int] = None,
                     D: Optional[float] = None, **sampler_kwargs: Any) -> Report:
    """The chosen metrics of the images ``net`` generates in memory for each of ``seed_ranges`` (one repeat each;
    see :func:`evaluation.features.calculate_features_for_network`: the images generate.py would write). Sampler
    keywords that are None are left out (the sampler's defaults).

    ``ref`` comes from :func:`load_reference_on_main` (read before the network, so a bad reference fails first);
    ``network`` names the network's file and ``guidance`` the guidance record each JSON line repeats. The
    reference's feature size is checked before any image is generated. The sampler's ``ValueError`` (settings the
    network cannot honour, non-finite samples) is passed on.
    """
    device = torch.device(device) if device is not None else dist.get_device()
    consistency_sampling.check_request(consistency_sampling.is_consistency_model(net),
                                       dict(sampler_kwargs, num_steps=sampler_kwargs.get('num_steps')
                                            or schedules.DEFAULT_STEPS))
    detectors = feature_lib.load_detectors(request.detector_sources(), device)
    check_ref_features(ref, request.ref_path, detectors, [net.img_channels, net.img_resolution, net.img_resolution],
                       device)
    keep = metrics.needs_features(request.metric_names, request.bootstrap)

    sampler_kwargs = pipeline.recorded_sampler_kwargs(sampler_kwargs)
    settings = dict(pfgmpp=D is not None, D=D, sampler_kwargs=dnnlib.util.json_safe(sampler_kwargs), guidance=guidance)
    runs = []
    for index, seeds in enumerate(seed_ranges):
        label = manifest.compact_seeds(seeds)
        line = dict(command='gen', network=network, num_images=len(seeds), ref=request.ref_path,
                    **request.detector_record(), seeds=label, repeat=index, class_idx=class_idx, **settings)
        runs.append(((lambda seeds=seeds: feature_lib.calculate_features_for_network(
            net, seeds, detectors, keep, max_batch_size=max_batch_size, device=device, class_idx=class_idx, D=D,
            **sampler_kwargs)), line))
    return _run_repeats(request, ref, detectors, runs, 'seeds', device)


# ----------------------------------------------------------------------------
# Paired comparison of two folders of images generated from the same seeds.


@dataclasses.dataclass
class CompareReport:
    """``fid.py compare``'s result: the paired comparison on nested prefixes (:class:`evaluation.paired.
    PowerResult`), the name of the distance (``fid``, ``fd_digits``, ...) and the JSON line. Empty off rank 0."""
    power: Optional[paired.PowerResult]
    distance: str
    record: dict[str, Any]

    def lines(self) -> list[str]:
        """One ``name value`` line per quantity: fd_a, fd_b, diff, diff_ci_low, diff_ci_high, n_needed."""
        if self.power is None:
            return []
        full = self.power.full
        return [f'fd_a {full.fd_a:g}', f'fd_b {full.fd_b:g}', f'diff {full.diff:g}', f'diff_ci_low {full.ci_low:g}',
                f'diff_ci_high {full.ci_high:g}', f'n_needed {self.power.n_needed or "none"}']

    def print(self) -> None:
        """Print :meth:`lines` (nothing off rank 0)."""
        for line in self.lines():
            print(line)


def seed_images(folder: str, flag: str) -> dict[int, str]:
    """Seed -> path of the PNGs named by seed (``{seed:06d}.png``, optionally in numeric subfolders, as generate.py
    writes them) in ``folder``. Raises FeatureError naming ``flag`` when there are none or a seed repeats."""
    if not os.path.isdir(folder):
        raise feature_lib.FeatureError(f'{flag} {folder}: no such folder')
    found: dict[int, str] = {}
    for path in manifest.generated_pngs(folder):
        seed = int(os.path.basename(path)[:-4])
        if seed in found:
            raise feature_lib.FeatureError(f'{flag} {folder}: seed {seed} has two images ({found[seed]}, {path})')
        found[seed] = path
    if not found:
        raise feature_lib.FeatureError(f'{flag} {folder}: no PNG named by seed (e.g. 000042.png); expected a folder '
                                       f'written by generate.py')
    return found


def paired_seeds(found_a: dict[int, str], found_b: dict[int, str], seeds: Optional[Sequence[int]]) -> list[int]:
    """The seeds both sides are compared on: ``seeds`` (each must be in both), or all, which must be the same in
    both. Raises FeatureError naming a seed that one side lacks, or when fewer than 2 are left."""
    for flag, found, other in (('--images-a', found_a, found_b), ('--images-b', found_b, found_a)):
        missing = [s for s in (seeds if seeds is not None else other) if s not in found]
        if missing:
            raise feature_lib.FeatureError(
                f'{flag} has no image for {len(missing)} seed(s) that the comparison needs (e.g. seed {missing[0]}); '
                f'a paired comparison needs the same seeds on both sides')
    chosen = sorted(seeds if seeds is not None else found_a)
    if len(chosen) < 2:
        raise feature_lib.FeatureError(f'{len(chosen)} image(s) to compare; need at least 2 seeds in both folders')
    return chosen


def read_seed_images(paths: Sequence[str], flag: str) -> np.ndarray:
    """uint8 images [N, C, H, W] (C = 1 for grayscale, else 3) of ``paths``. Raises FeatureError naming ``flag`` for
    an unreadable file or images of different shapes."""
    from PIL import Image
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert('L' if image.mode in ('1', 'L', 'I', 'I;16') else 'RGB'))
        except (OSError, ValueError) as err:
            raise feature_lib.FeatureError(f'{flag} {path}: cannot read the image ({err})') from None
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        if images and array.shape != images[0].shape:
            raise feature_lib.FeatureError(f'{flag} {path}: shape {list(array.shape)} (CHW) differs from the first '
                                           f'image\'s {list(images[0].shape)}')
        images.append(array)
    return np.stack(images)


def folder_features(detector: torch.nn.Module, images: np.ndarray, max_batch_size: int,
                    device: torch.device) -> np.ndarray:
    """Detector features [N, F] float64 of uint8 images [N, C, H, W], in their order."""
    parts = [feature_lib.extract_features(detector, torch.from_numpy(images[i:i + max_batch_size]).to(device))
             for i in range(0, images.shape[0], max_batch_size)]
    return torch.cat(parts).cpu().numpy()


def compare_folders(images_a: str, images_b: str, ref_path: str, seeds: Optional[Sequence[int]] = None,
                    detector_path: Optional[str] = None, bootstrap: int = paired.DEFAULT_RESAMPLES,
                    confidence: float = paired.DEFAULT_CONFIDENCE, seed: int = METRICS_SEED,
                    max_batch_size: int = 64, device: Optional[torch.device] = None,
                    jsonl_path: Optional[str] = None) -> CompareReport:
    """Paired comparison of two folders of PNGs named by seed: the Frechet distance of each against the reference
    (in the ``detector_path`` detector's features), their difference A - B with its bootstrap interval and the
    number of images that decides (:func:`evaluation.paired.images_needed`, resamples from a generator seeded with
    ``seed``). Images are matched by the seed in their file name. Runs on rank 0 (the detector is loaded on every
    rank); appends the JSON line to ``jsonl_path``. Raises FeatureError (mismatched seeds, fewer than 2 images,
    unreadable images or reference, a reference of another detector) before any bootstrap.
    """
    device = torch.device(device) if device is not None else dist.get_device()
    started = time.time()
    if not 0 < confidence < 1:
        raise feature_lib.FeatureError(f'--confidence {confidence}: expected a coverage between 0 and 1, e.g. 0.95')
    if jsonl_path is not None:
        try:
            dnnlib.util.check_writable_dir(os.path.dirname(os.path.abspath(jsonl_path)), '--jsonl')
        except OSError as err:
            raise feature_lib.FeatureError(str(err)) from None
    request = Request(('fid',), ref_path=ref_path, detector_path=detector_path)
    ref = load_reference_on_main(request)
    found_a, found_b = seed_images(images_a, '--images-a'), seed_images(images_b, '--images-b')
    chosen = paired_seeds(found_a, found_b, seeds)
    detector = feature_lib.load_detectors(request.detector_sources(), device)[metrics.INCEPTION]
    distance = feature_lib.distance_name(detector)

    def compare() -> CompareReport:
        features = [folder_features(detector, read_seed_images([found[s] for s in chosen], flag), max_batch_size,
                                    device) for found, flag in ((found_a, '--images-a'), (found_b, '--images-b'))]
        if features[0].shape[1] != ref['mu'].shape[0]:
            raise feature_lib.FeatureError(f'--ref {ref_path}: mu has {ref["mu"].shape[0]} features but the detector '
                                           f'returns {features[0].shape[1]}; expected statistics of the same detector')
        dist.print0(f'Bootstrapping {bootstrap} paired resamples per prefix of {len(chosen)} seeds...')
        power = paired.images_needed(*features, ref['mu'], ref['sigma'], np.random.default_rng(seed), bootstrap,
                                     confidence)
        full = power.full
        record = dict(command='compare', images_a=images_a, images_b=images_b, ref=ref_path,
                      **request.detector_record(), distance=distance, num_images=len(chosen),
                      seeds=manifest.compact_seeds(chosen), bootstrap=bootstrap, confidence=confidence,
                      fd_a=full.fd_a, fd_b=full.fd_b, diff=full.diff, diff_se=full.diff_se,
                      diff_ci=[full.ci_low, full.ci_high], n_needed=power.n_needed,
                      prefixes=[dict(num_images=s.num_images, diff=s.diff, diff_ci=[s.ci_low, s.ci_high])
                                for s in power.steps], elapsed_s=round(time.time() - started, 3))
        if jsonl_path is not None:
            append_json_line(jsonl_path, dnnlib.util.json_safe(record))
        return CompareReport(power, distance, record)
    report = on_main_rank(compare)
    return report if report is not None else CompareReport(None, distance, {})
