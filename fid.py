"""FID and the other sample-quality metrics: reference statistics (``ref``), the metrics of a folder or ZIP
(``calc``), of a network's images generated in memory (``gen``) and paired comparisons of two folders (``compare``).
The command line over :mod:`evaluation.runs`; the library's one-line errors become click's ``Error:`` line here."""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, Iterator, Optional

import click
import torch

import dnnlib
from cli import common as cli
from evaluation import metrics, runs


class _OneSpelling(click.Option):
    """An option whose help and error messages name its first spelling only; the others stay accepted."""

    def get_help_record(self, ctx: click.Context) -> Optional[tuple[str, str]]:
        record = super().get_help_record(ctx)
        return record and (record[0].replace(', '.join(self.opts), self.opts[0], 1), record[1])

    def get_error_hint(self, ctx: click.Context) -> str:
        return f"'{self.opts[0]}'"


def _metric_list(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    try:
        return metrics.parse_metrics(value)
    except metrics.MetricError as err:
        raise click.BadParameter(f'{err}; expected a comma-separated list of {", ".join(metrics.METRICS)}') from None


def _options(*options: Callable) -> Callable[[Callable], Callable]:
    return lambda fn: functools.reduce(lambda decorated, option: option(decorated), reversed(options), fn)


_batch_option = click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT',
                             type=click.IntRange(min=1), default=64, show_default=True)
_metric_options = _options(
    click.option('--metrics', 'metric_names', help=f'Metrics to compute: {",".join(metrics.METRICS)}',
                 metavar='LIST', callback=_metric_list, default='fid', show_default=True),
    click.option('--dinov2', 'dinov2_path', metavar='DIR', type=str, default=None,
                 help='Local copy of github.com/facebookresearch/dinov2 for fd_dinov2, with '
                 f'{metrics.DINOV2_WEIGHTS_FILE} inside  [default: download through torch.hub]'))
_report_options = _options(
    _metric_options,
    click.option('--bootstrap', help='Bootstrap resamples for a 95% confidence interval of each metric  '
                 '[default: none]', metavar='INT', type=click.IntRange(min=0), default=0),
    click.option('--repeat', help='Evaluate this many times and report each and the minimum', metavar='INT',
                 type=click.IntRange(min=1), default=1, show_default=True),
    click.option('--save-stats', 'stats_path', help='Also write the statistics (mu, sigma) of the images',
                 metavar='NPZ', type=str, default=None),
    click.option('--jsonl', 'jsonl_path', help='Append one JSON line per result to this file', metavar='FILE',
                 type=str, default=None))
_workers_option = click.option('--workers', 'num_workers', metavar='INT', type=click.IntRange(min=0), default=None,
                               help='DataLoader worker processes  [default: 3, at most the usable cores divided '
                               'among the local processes]')
_detector_options = _options(
    click.option('--detector', 'detector_path', help='Feature detector pickle  [default: Inception-v3 URL]',
                 metavar='PATH|URL', type=str, default=None),
    click.option('--device', help='Device  [default: cuda when available]', metavar='cpu|cuda',
                 type=click.Choice(['cpu', 'cuda']), default=None))


def _check_output_file(*paths_and_flags: tuple[Optional[str], str]) -> None:
    """Fail before any work when the folder of an output file (path, flag) cannot be created or written."""
    for path, flag in paths_and_flags:
        if path is not None:
            try:
                dnnlib.util.check_writable_dir(os.path.dirname(os.path.abspath(path)), flag)
            except OSError as err:
                raise click.ClickException(str(err)) from None


def _request(ref_path: Optional[str], stats_path: Optional[str], jsonl_path: Optional[str], bootstrap: int,
             **kwargs: Any) -> runs.Request:
    """The options calc and gen share, checked before any work."""
    if ref_path is None and stats_path is None:
        raise click.UsageError('give --ref to compute an FID, --save-stats to keep the statistics, or both')
    if bootstrap == 1:
        raise click.BadParameter('one resample gives no interval; use 0 (none) or at least 2 (e.g. 200)',
                                 param_hint='--bootstrap')
    if bootstrap and ref_path is None:
        raise click.UsageError('--bootstrap needs --ref: the interval is of a metric against a reference')
    _check_output_file((stats_path, '--save-stats'), (jsonl_path, '--jsonl'))
    return runs.Request(ref_path=ref_path, stats_path=stats_path, jsonl_path=jsonl_path, bootstrap=bootstrap,
                        **kwargs)


@contextlib.contextmanager
def _session(device: Optional[str], sampling: bool = False) -> Iterator[torch.device]:
    """:func:`evaluation.runs.session`; one-line errors (and with ``sampling`` the sampler's) become click's."""
    try:
        with runs.session(device) as device_obj:
            yield device_obj
    except runs.ONE_LINE_ERRORS as err:
        raise click.ClickException(str(err)) from None
    except ValueError as err:
        if not sampling:
            raise
        raise click.ClickException(cli.sampler_error(err)) from None


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


@main.command()
@click.option('--images', 'image_path', help='Images to evaluate', metavar='PATH|ZIP', type=str, required=True)
@click.option('--ref', 'ref_path', help='Dataset reference statistics', metavar='NPZ|URL', type=str)
@click.option('--num-images', '--num', 'num_images', cls=_OneSpelling, metavar='INT', type=click.IntRange(min=2),
              default=50000, show_default=True, help='Number of images to use')
@click.option('--seed', help='Random seed for selecting the images', metavar='INT', type=int, default=0,
              show_default=True)
@_batch_option
@cli.refused_option('--ckpt', '--end_ckpt', type=int, script='fid.py calc', advice=(
    'this calc evaluates one folder: run it once per checkpoint folder, e.g. fid.py calc --images=DIR/ckpt_NNNNNN '
    '--ref=REF.npz'))
@cli.refused_option('--gen_seed', type=int, script='fid.py calc', advice=(
    'pass the folder of that seed range instead, e.g. --images=DIR/ckpt_2_NNNNNN for seeds 50000-99999'))
@cli.refused_option('--steps', '--alpha', '--prune', '--quant', type=bool, script='fid.py calc', advice=(
    'pass each sweep folder to --images, e.g. --images=DIR/steps018 after generate.py --outdir=DIR '
    '--sweep-steps=...  (alpha0.1, bits08 likewise; pruning is not offered)'))
@click.option('--allow-mixed', 'allow_mixed', is_flag=True,
              help='Pool images whose folders were made by different runs or settings (refused otherwise)')
@_report_options
@_workers_option
@_detector_options
def calc(image_path: str, num_images: int, seed: int, max_batch_size: int, num_workers: Optional[int],
         device: Optional[str], allow_mixed: bool, **options: Any) -> None:
    """FID (and the other --metrics) of a folder or ZIP of images.

    Exactly --num-images images are used: a --seed-selected subset when there are more, an error when there are
    fewer. With --repeat=K the subset seeds are --seed, --seed+1, ..., which needs more images than --num-images.
    Images of several origins (subfolders whose manifests record different settings, or folders without
    manifest such as the PFGM++ fork's ckpt_* folders) are refused unless --allow-mixed: evaluate one folder each.
    The Frechet distance is named after the --detector: fid for Inception-v3, fd_digits for the digits classifier.
    """
    request = _request(**options)
    with _session(device) as device_obj:
        runs.evaluate_folder(request, image_path, num_images, seed, max_batch_size, num_workers, device_obj,
                             allow_mixed).print()


@main.command()
@click.option('--data', 'dataset_path', help='Dataset to describe', metavar='PATH|ZIP', type=str, required=True)
@click.option('--dest', 'dest_path', help='Where to write the statistics', metavar='NPZ', type=str, required=True)
@_batch_option
@click.option('--ref-features', 'max_ref_features', metavar='INT', type=click.IntRange(min=2),
              default=runs.REF_FEATURES_DEFAULT, show_default=True,
              help='For kid/pr: keep the Inception features of at most this many images (a seeded subset)')
@_metric_options
@_workers_option
@_detector_options
def ref(dest_path: str, device: Optional[str], **options: Any) -> None:
    """Reference statistics of a dataset (all of its images), for calc --ref.

    The file holds what the chosen --metrics need: mu/sigma (fid), fd_dinov2_mu/fd_dinov2_sigma (fd_dinov2) and
    the features of up to --ref-features images (kid, pr).
    """
    _check_output_file((dest_path, '--dest'))
    with _session(device) as device_obj:
        written = runs.write_reference(dest_path=dest_path, device=device_obj, **options)
        if written is not None:
            print(f'Saved dataset reference statistics to "{written}"')


@main.command()
@click.option('--images-a', help='Images of setting A, named by seed', metavar='DIR', required=True)
@click.option('--images-b', help='Images of setting B from the same seeds', metavar='DIR', required=True)
@click.option('--ref', 'ref_path', help='Dataset reference statistics', metavar='NPZ|URL', type=str, required=True)
@click.option('--bootstrap', help='Resamples', metavar='INT', type=click.IntRange(2), default=1000, show_default=True)
@click.option('--confidence', help='Interval coverage', metavar='FLOAT', type=float, default=0.95, show_default=True)
@click.option('--jsonl', 'jsonl_path', help='Append the result as a JSON line', metavar='FILE', type=str)
@_batch_option
@_detector_options
def compare(device: Optional[str], **options: Any) -> None:
    """Paired comparison of two folders from the same seeds: fd_a, fd_b, diff = fd_a - fd_b with a bootstrap interval
    over seeds (the same for A and B), and n_needed: the images from which the interval excludes zero, or none."""
    with _session(device) as device_obj:
        runs.compare_folders(device=device_obj, **options).print()


@main.command()
@click.option('--network', 'network_pkl', help='Network snapshot .pkl, training state .pt, path or URL',
              metavar='PATH|URL', type=str, required=True)
@click.option('--ref', 'ref_path', help='Dataset reference statistics', metavar='NPZ|URL', type=str)
@click.option('--seeds', help='Random seeds, one image each (e.g. 0-49999)', metavar='LIST', type=cli.SeedList(),
              default='0-49999', show_default=True)
@click.option('--class', 'class_idx', help='Class label  [default: random]', metavar='INT',
              type=click.IntRange(min=0), default=None)
@_batch_option
@cli.sampler_options
@cli.guidance_options
@_report_options
@_detector_options
def gen(network_pkl: str, seeds: list[int], class_idx: Optional[int], max_batch_size: int, pfgmpp: Optional[bool],
        aug_dim: Optional[int], device: Optional[str], gnet: Optional[str], guidance: float,
        guidance_interval: Optional[tuple[float, float]], repeat: int, **options: Any) -> None:
    """FID (and the other --metrics) of a network, from images generated in memory (no PNGs are written).

    The statistics equal those of generate.py with the same flags followed by calc on its folder (same
    images, same uint8 quantization). With --repeat=K the seed list is shifted past itself K-1 times and the
    minimum FID is reported last, the protocol of the EDM and PFGM++ papers.
    """
    sampler_kwargs = {key: options.pop(key) for key in list(options) if key not in runs.Request.__dataclass_fields__}
    request = _request(repeat=repeat, **options)
    cli.check_noise_range(sampler_kwargs)
    cli.check_solver_flags(sampler_kwargs, [sampler_kwargs.get('num_steps') or cli.DEFAULT_STEPS])
    try:
        seed_ranges = runs.repeated_seed_ranges(sorted(seeds), repeat, limit=cli.SEED_LIMIT)
    except runs.ONE_LINE_ERRORS as err:
        raise click.BadParameter(str(err), param_hint='--repeat') from None
    with _session(device, sampling=True) as device_obj:
        ref = runs.load_reference_on_main(request)
        net = runs.load_network(network_pkl, device_obj)
        D = cli.resolve_pfgmpp(net, pfgmpp, aug_dim)
        net = cli.make_guide(net, gnet, guidance, guidance_interval, D, device_obj)(net)
        if class_idx is not None and class_idx >= net.label_dim:
            raise click.BadParameter(f'{class_idx} is out of range; the network has {net.label_dim} classes',
                                     param_hint='--class')
        runs.evaluate_network(request, ref, net, network_pkl, seed_ranges, cli.guidance_record(
            gnet, guidance, guidance_interval), max_batch_size, device_obj, class_idx, D, **sampler_kwargs).print()


if __name__ == '__main__':
    cli.run_click_command(main)  # under torchrun, errors are printed by rank 0 only
