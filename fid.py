"""Frechet Inception Distance (FID): dataset reference statistics, FID of a folder or ZIP of images, and FID of a
network computed from images generated in memory.

Statistics are the mean and the unbiased covariance of detector features, accumulated in float64 and summed over
torchrun ranks. Statistics files are ``.npz`` archives holding ``mu`` [D] and ``sigma`` [D, D] (float64), the format
of NVIDIA's published reference files, so those can be passed to ``--ref`` by path or URL.

The click commands below are a thin layer over ``evaluation/features.py`` (detectors, reference files, feature
statistics) and ``evaluation/metrics.py``. That library's functions are importable from here under their EDM names
(``load_detector``, ``load_ref_stats``, ``calculate_inception_stats``, ``calculate_stats_for_network``,
``calculate_fid_from_inception_stats``, ...), with the library's plain exceptions (:class:`FeatureError`,
``evaluation.metrics.MetricError``) turned into click's one ``Error:`` line as EDM's fid.py did; import
``evaluation.features`` for the plain exceptions.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import click
import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import host_memory
from cli import common as cli
from evaluation import features as feature_lib
from evaluation import metrics
from formats import network_io

#: The library's errors whose message is a complete line for the user.
ONE_LINE_ERRORS = (feature_lib.FeatureError, metrics.MetricError, metrics.DetectorUnavailable)


def _one_line(function: Callable, sampling: bool = False) -> Callable:
    """``function`` of :mod:`evaluation.features` with its errors as click's one ``Error:`` line, as fid.py's
    functions have always raised them; with ``sampling``, the sampler's errors too, naming flags, not keywords."""
    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except ONE_LINE_ERRORS as err:
            raise click.ClickException(str(err)) from None
        except ValueError as err:
            if not sampling:
                raise
            raise click.ClickException(cli.sampler_error(err)) from None
    return call


# The library under EDM's names, as the commands below and Python callers of fid.py use it.
FeatureError = feature_lib.FeatureError
FeatureStats = feature_lib.FeatureStats
FeatureCollector = feature_lib.FeatureCollector
DETECTOR_URL = feature_lib.DETECTOR_URL
_rank_batches = feature_lib.batches_of_this_rank  # its name here before the move
load_ref_stats = _one_line(feature_lib.load_ref_stats)
load_reference = _one_line(feature_lib.load_reference)
save_stats = _one_line(feature_lib.save_stats)
save_arrays = _one_line(feature_lib.save_arrays)
extract_features = _one_line(feature_lib.extract_features)
probe_feature_dim = _one_line(feature_lib.probe_feature_dim)
open_image_dataset = _one_line(feature_lib.open_image_dataset)
check_single_origin = _one_line(feature_lib.check_single_origin)
calculate_features = _one_line(feature_lib.calculate_features)
calculate_inception_stats = _one_line(feature_lib.calculate_inception_stats)
calculate_features_for_network = _one_line(feature_lib.calculate_features_for_network, sampling=True)
calculate_stats_for_network = _one_line(feature_lib.calculate_stats_for_network, sampling=True)
calculate_fid_from_inception_stats = _one_line(feature_lib.calculate_fid_from_inception_stats)


def load_detector(path_or_url: Optional[str] = None, device: torch.device | str = 'cpu',
                  verbose: bool = True) -> torch.nn.Module:
    """:func:`evaluation.features.load_detector`, by default of :data:`DETECTOR_URL`."""
    return _one_line(feature_lib.load_detector)(path_or_url or DETECTOR_URL, device=device, verbose=verbose)


#: Reference files keep the features of at most this many images for KID and precision/recall (a seeded subset).
REF_FEATURES_DEFAULT = 50000

#: Seed of the reference-feature subset, of KID's subsets and of the bootstrap resamples: results are reproducible.
METRICS_SEED = 0

#: Coverage of the --bootstrap intervals.
BOOTSTRAP_CONFIDENCE = 0.95


# ----------------------------------------------------------------------------
# Small helpers.


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


def check_output_file(path: Optional[str], flag: str) -> None:
    """Fail before any work when the folder of an output file cannot be created or written."""
    if path is None:
        return
    try:
        dnnlib.util.check_writable_dir(os.path.dirname(os.path.abspath(path)), flag)
    except OSError as err:
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
    """Join torchrun's process group (if any) for one command, and leave it afterwards; the library's errors
    (:data:`ONE_LINE_ERRORS`) become click's one ``Error:`` line."""
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
    except BaseException as err:
        # A process group's shutdown waits for every rank, and after an error some may never arrive: only a
        # single process resets its state here; under torchrun the exit ends the group.
        if not dist.is_distributed():
            dist.shutdown()
        if isinstance(err, ONE_LINE_ERRORS):
            raise click.ClickException(str(err)) from None
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
    cli.on_main_rank(load)
    return loaded[0] if loaded else None


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
    cli.on_main_rank(check)


def _detector_sources(metric_names: Sequence[str], detector_path: Optional[str],
                      dinov2_path: Optional[str]) -> dict[str, Optional[str]]:
    sources = {metrics.INCEPTION: detector_path, metrics.DINOV2: dinov2_path}
    return {name: sources[name] for name in metrics.detectors_for(metric_names)}


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
        written = save_arrays(stats_path, feature_lib.stats_arrays(metric_names, features))
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
            cli.on_main_rank(lambda: check_single_origin(image_path))
        if repeat > 1:
            available = len(open_image_dataset(image_path))
            if available <= num_expected:
                raise click.ClickException(f'--images {image_path}: --repeat={repeat} draws different subsets of '
                                           f'--num={num_expected} images, but there are only {available}')
        detectors = feature_lib.load_detectors(_detector_sources(metric_names, detector_path, dinov2_path), device_obj)
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
            written = save_arrays(dest_path, feature_lib.stats_arrays(metric_names, features), flag='--dest')
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
@cli.sampler_options
@cli.guidance_options
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
    from formats.network_io import NetworkLoadError, load_network

    if ref_path is None and stats_path is None:
        raise click.UsageError('give --ref to compute an FID, --save-stats to keep the statistics, or both')
    _check_bootstrap(bootstrap, ref_path)
    try:
        seed_list = cli.SeedList().convert(seeds, None, None)
    except click.BadParameter as err:
        err.param_hint = '--seeds'
        raise
    cli.check_noise_range(sampler_kwargs)
    cli.check_solver_flags(sampler_kwargs, [sampler_kwargs.get('num_steps') or cli.DEFAULT_STEPS])
    seed_ranges = _repeated_seed_ranges(sorted(seed_list), repeat, limit=cli.SEED_LIMIT)
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
        net = dist.rank0_first(load)
        precision, precision_note = network_io.precision_for_device(net, None, device_obj)
        if precision_note:
            dist.print0(precision_note)
        network_io.apply_speed_options(net, precision)
        D = cli.resolve_pfgmpp(net, pfgmpp, aug_dim)
        net = cli.make_guide(net, gnet, guidance, guidance_interval, D, device_obj)(net)
        if class_idx is not None and class_idx >= net.label_dim:
            raise click.BadParameter(f'{class_idx} is out of range; the network has {net.label_dim} classes',
                                     param_hint='--class')
        kwargs = {key: value for key, value in sampler_kwargs.items() if value is not None}
        detectors = feature_lib.load_detectors(_detector_sources(metric_names, detector_path, dinov2_path), device_obj)
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
                          seeds=cli.compact_seeds(run_seeds), repeat=index, class_idx=class_idx,
                          pfgmpp=D is not None, D=D, sampler_kwargs=dnnlib.util.json_safe(kwargs),
                          guidance=cli.guidance_record(gnet, guidance, guidance_interval))
            values = _finish_run(ref, metric_names, features, _numbered_stats_path(stats_path, index, repeat),
                                 record, started, bootstrap, device_obj)
            if values is not None:
                results.append(values)
                records.append(record)
        _report(results, records, jsonl_path, label='seeds')


if __name__ == '__main__':
    dnnlib.util.run_click_command(main)  # under torchrun, errors are printed by rank 0 only
