"""Generate images with a trained EDM or PFGM++ network.

A thin command line over ``sampling/``, with the flags it shares with ``fid.py gen`` in
``cli/common.py``: the flags of EDM's and PFGM++'s
generate.py keep their names and meaning, plus resumable output (existing PNGs
are skipped unless --force), a preview grid, and the robustness studies of the
PFGM++ paper (noise injection, weight quantization, step-count sweeps).
"""

from __future__ import annotations

import functools
import glob
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import click
import numpy as np
import PIL.Image
import torch
from tqdm import tqdm

import dnnlib
from torch_utils import distributed as dist
from torch_utils import host_memory
from training import pfgmpp as pfgmpp_lib
from formats import manifest as manifest_lib
from sampling import quantize
from sampling import pipeline, schedules
from formats import network_io
from cli.common import (DEFAULT_STEPS, NON_NEGATIVE, Failure, FloatList, IntList, SeedList, check_noise_range,
                          check_solver_flags, compact_seeds, guidance_options, guidance_record, make_guide,
                          network_evaluations, on_main_rank, resolve_pfgmpp, sampler_error,
                          sampler_options)
from formats.manifest import image_path
from formats.network_io import NetworkLoadError, load_network, network_summary

GRID_MAX_IMAGES = 256           # a preview grid shows at most this many images (the first seeds)

# ----------------------------------------------------------------------------
# One generation run (a sweep makes several).


@dataclass
class Run:
    """Everything that decides the pixels of one output folder."""

    outdir: str
    num_steps: int
    alpha: float
    bits: Optional[int]
    tag: str = ''                                  # sweep folder name, '' for a plain run
    sweep: dict = field(default_factory=dict)      # swept values of this folder


def plan_runs(outdir: str, steps: Optional[int], alpha: Optional[float], bits: Optional[int],
              sweep_steps: Optional[list[int]], sweep_alpha: Optional[list[float]],
              sweep_bits: Optional[list[int]]) -> list[Run]:
    """One run for a plain command; the cartesian product of the sweep lists otherwise."""
    steps_values = sweep_steps or [steps if steps is not None else DEFAULT_STEPS]
    alpha_values = sweep_alpha or [alpha if alpha is not None else 0.0]
    bits_values = sweep_bits or [bits]
    if not (sweep_steps or sweep_alpha or sweep_bits):
        return [Run(outdir, steps_values[0], alpha_values[0], bits_values[0])]
    runs = []
    for n in steps_values:
        for a in alpha_values:
            for b in bits_values:
                parts, swept = [], {}
                if sweep_steps:
                    parts.append(f'steps{n:03d}')
                    swept['steps'] = n
                if sweep_alpha:
                    parts.append(f'alpha{a:g}')
                    swept['alpha'] = a
                if sweep_bits:
                    parts.append(f'bits{b:02d}')
                    swept['bits'] = b
                tag = '-'.join(parts)
                runs.append(Run(os.path.join(outdir, tag), n, a, b, tag=tag, sweep=swept))
    return runs


def to_pil(image_hwc: np.ndarray) -> PIL.Image.Image:
    """uint8 HWC array -> PIL image (1 channel as 'L', 3 as 'RGB')."""
    channels = image_hwc.shape[2]
    if channels == 1:
        return PIL.Image.fromarray(image_hwc[:, :, 0], 'L')
    if channels == 3:
        return PIL.Image.fromarray(image_hwc, 'RGB')
    raise Failure(f'cannot write {channels}-channel images as PNG; expected 1 or 3 channels')


def save_png(image: PIL.Image.Image, path: str) -> None:
    """Write a PNG under a temporary name and rename it, so a crash never leaves a truncated image."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with dnnlib.util.atomic_write(path, 'wb') as f:
        image.save(f, format='PNG')


def write_grid(paths: Sequence[str], grid_path: str) -> None:
    """Tile the given PNGs (all the same size) into one nearly square PNG."""
    images = [np.asarray(PIL.Image.open(p)) for p in paths]
    images = [im[:, :, None] if im.ndim == 2 else im for im in images]
    height, width, channels = images[0].shape
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    canvas = np.zeros([rows * height, cols * width, channels], dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * height:(r + 1) * height, c * width:(c + 1) * width] = im
    save_png(to_pil(canvas), grid_path)


def grid_path_for(grid: str, run: Run) -> str:
    if not run.tag:
        return grid
    stem, ext = os.path.splitext(grid)
    return f'{stem}-{run.tag}{ext or ".png"}'


# ----------------------------------------------------------------------------
# The command.


#: The PFGM++ fork's generate.py sampled every checkpoint it found in --outdir, into --outdir/ckpt_{kimg:06d}.
FORK_PER_CHECKPOINT = ('this generate.py samples the one --network it is given; run it once per checkpoint, e.g. '
                       'python generate.py --network=DIR/training-state-NNNNNN.pt --outdir=DIR/ckpt_NNNNNN '
                       '--seeds=0-49999 --subdirs')


def fork_options(fn: Callable) -> Callable:
    """The PFGM++ fork's generate.py flags: --use_pickle is accepted (the file format is read from the file),
    the others stop with one line giving the equivalent command."""
    script = 'generate.py'
    for option in (
        dnnlib.util.refused_option('--ckpt', type=int, script=script, advice=FORK_PER_CHECKPOINT),
        dnnlib.util.refused_option('--end_ckpt', type=int, script=script, advice=FORK_PER_CHECKPOINT),
        dnnlib.util.refused_option('--resume', type=int, script=script, advice=FORK_PER_CHECKPOINT),
        dnnlib.util.refused_option('--edm', type=bool, script=script,
                                   advice='drop it: --network names the file to sample, EDM or PFGM++ alike'),
        dnnlib.util.refused_option('--save_images', is_flag=True, script=script,
                                   advice='for a grid of one batch use --grid=DIR/ode_images.png --seeds=0-63'),
        click.option('--use_pickle', type=bool, default=None, hidden=True, expose_value=False),
    ):
        fn = option(fn)
    return fn


def missing_network_advice(outdir: str, seeds: list[int]) -> str:
    """The one line for a command without --network, with the equivalent command for a checkpoint in --outdir."""
    found = sorted(path for ext in ('pt', 'pkl')
                   for path in glob.glob(os.path.join(glob.escape(outdir), f'training-state-*.{ext}')))
    example = found[0] if found else os.path.join(outdir, 'training-state-NNNNNN.pt')
    kimg = re.search(r'(\d+)\.p[kt]l?$', example)
    folder = os.path.join(outdir, f'ckpt_{kimg.group(1)}' if kimg else 'ckpt_NNNNNN')
    return (f'--network is required (the PFGM++ fork\'s generate.py scanned --outdir for checkpoints); run once '
            f'per checkpoint{f" ({len(found)} found in {outdir})" if found else ""}, e.g. python generate.py '
            f'--network={example} --outdir={folder} --seeds={compact_seeds(seeds)} --subdirs')

@click.command(context_settings=dict(max_content_width=120))
# What to sample from and where the images go.
@click.option('--network', 'network_pkl', type=str, default=None, metavar='PATH|URL',
              help='Snapshot .pkl, training state .pt or weights-only file; a path or a URL (cached)  [required]')
@click.option('--outdir', type=str, required=True, metavar='DIR', help='Folder that receives the PNGs')
@click.option('--seeds', type=SeedList(), default='0-63', show_default=True, metavar='LIST',
              help='Seeds, one image each (e.g. 0-63,100)')
@click.option('--subdirs', is_flag=True, help='Group the PNGs into one folder per 1000 seeds')
@click.option('--class', 'class_idx', type=click.IntRange(min=0), default=None, metavar='INT',
              help='Fix the class label of a conditional network  [default: drawn per seed]')
@click.option('--batch', 'max_batch_size', type=click.IntRange(min=1), default=64, show_default=True, metavar='INT',
              help='Images sampled together (per process)')
@sampler_options
@guidance_options
# Robustness studies of the PFGM++ paper.
@click.option('--alpha', type=NON_NEGATIVE, default=None, metavar='FLOAT',
              help='Inject noise: x += alpha*t_i*randn before every step  [default: 0]')
@click.option('--quantize-bits', 'quantize_bits', type=int, default=None, metavar='K',
              help='Quantize the conv/linear weights to K bits before sampling')
@click.option('--quantize-scheme', 'quantize_scheme', type=click.Choice(quantize.SCHEMES), default='symmetric',
              show_default=True, help='symmetric (per tensor, zero kept) or minmax (the PFGM++ fork\'s quantizer)')
@click.option('--sweep-steps', 'sweep_steps', type=IntList(), default=None, metavar='LIST',
              help='Several step counts, each into its own folder (e.g. 5,10,18)')
@click.option('--sweep-alpha', 'sweep_alpha', type=FloatList(), default=None, metavar='LIST',
              help='Several noise injection strengths (e.g. 0,0.1,0.2)')
@click.option('--sweep-bits', 'sweep_bits', type=IntList(), default=None, metavar='LIST',
              help='Several quantization widths (e.g. 4,6,8)')
# Housekeeping.
@click.option('--force', is_flag=True, help='Delete the PNGs and manifest a previous run left in --outdir, then '
              'generate (default: keep them and add the missing seeds, if its manifest records the same network '
              'and settings; refuse otherwise)')
@click.option('--grid', 'grid', type=str, default=None, metavar='PATH',
              help=f'Also tile the first {GRID_MAX_IMAGES} images into this PNG')
@click.option('--device', type=str, default=None, metavar='DEV', help='cpu or cuda  [default: cuda if available]')
@click.option('--precision', type=click.Choice(network_io.PRECISIONS), default=None,
              help='U-Net precision  [default: as the network was built]')
@click.option('--channels-last', 'channels_last', is_flag=True,
              help='NHWC memory layout; on CPU also packs the weights for oneDNN once per batch (faster; results '
                   'within float32 rounding)')
@click.option('--compile', 'compile_net', is_flag=True,
              help='torch.compile the network (pays off for long runs; results within float32 rounding)')
@fork_options
def main(network_pkl: str, outdir: str, seeds: list[int], subdirs: bool, class_idx: Optional[int],
         max_batch_size: int, pfgmpp: Optional[bool], aug_dim: Optional[int], alpha: Optional[float],
         quantize_bits: Optional[int], quantize_scheme: str, sweep_steps: Optional[list[int]],
         sweep_alpha: Optional[list[float]], sweep_bits: Optional[list[int]], force: bool, grid: Optional[str],
         device: Optional[str], precision: Optional[str], channels_last: bool, compile_net: bool,
         num_steps: Optional[int], gnet: Optional[str], guidance: float,
         guidance_interval: Optional[tuple[float, float]],
         **sampler_kwargs: Any) -> None:
    """Generate images with a trained EDM or PFGM++ network.

    Each image depends only on its seed: batch size, number of processes and
    order do not change its bytes. Images already present are skipped unless
    --force, so an interrupted run continues where it stopped; --outdir/manifest.json
    records the network (content hash) and every setting that changes pixels, and
    a folder made otherwise is refused.

    \b
    # 64 images of a CIFAR-10 network into out/, plus a preview grid
    python generate.py --outdir=out --seeds=0-63 --network=network-snapshot.pkl --grid=out.png

    \b
    # 50k images on 2 GPUs, grouped into subfolders of 1000
    torchrun --standalone --nproc_per_node=2 generate.py --outdir=out --seeds=0-49999 --subdirs \\
        --network=training-state-200000.pt

    \b
    # Robustness of PFGM++: step counts, noise injection, 4..8-bit weights
    python generate.py --outdir=sweep --seeds=0-9999 --network=net.pkl --sweep-steps=5,10,18
    python generate.py --outdir=sweep --seeds=0-9999 --network=net.pkl --sweep-alpha=0,0.1,0.2
    python generate.py --outdir=sweep --seeds=0-9999 --network=net.pkl --sweep-bits=4,6,8

    \b
    # Autoguidance by an earlier snapshot, and classifier-free guidance of a --label-dropout network
    python generate.py --outdir=out --network=net.pkl --gnet=early.pkl --guidance=2
    python generate.py --outdir=out --network=net.pkl --gnet=uncond --guidance=1.5 --guidance-interval=0.3,5
    """
    if network_pkl is None:
        raise click.UsageError(missing_network_advice(outdir, seeds))
    # Flags that can be checked before anything is loaded.
    for single, single_name, sweep, sweep_name in ((num_steps, '--steps', sweep_steps, '--sweep-steps'),
                                                   (alpha, '--alpha', sweep_alpha, '--sweep-alpha'),
                                                   (quantize_bits, '--quantize-bits', sweep_bits, '--sweep-bits')):
        if single is not None and sweep:
            raise click.UsageError(f'{single_name} and {sweep_name} both given; use one of them')
    if sweep_steps and min(sweep_steps) < 1:
        raise click.BadParameter(f'step counts must be >= 1, got {min(sweep_steps)}', param_hint='--sweep-steps')
    for bits in ([quantize_bits] if quantize_bits is not None else []) + list(sweep_bits or []):
        try:
            quantize.check_bits(bits, quantize_scheme)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint='--sweep-bits' if sweep_bits else '--quantize-bits')
    check_noise_range(sampler_kwargs)
    check_solver_flags(dict(sampler_kwargs, noise_injection=max([alpha or 0.0] + list(sweep_alpha or []))),
                       sweep_steps or [num_steps if num_steps is not None else DEFAULT_STEPS])
    if device is not None and not (device == 'cpu' or device.startswith('cuda')):
        raise click.BadParameter(f'{device!r}: expected cpu or cuda', param_hint='--device')

    host_memory.retain_freed_host_memory()
    try:
        dev = dist.init(device)
    except RuntimeError as err:
        raise Failure(str(err)) from None
    thread_note = dist.limit_intra_op_threads(dev)
    if thread_note:
        dist.print0(thread_note)
    try:
        _generate(network_pkl, outdir, seeds, subdirs, class_idx, max_batch_size, pfgmpp, aug_dim, quantize_scheme,
                  force, grid, dev, plan_runs(outdir, num_steps, alpha, quantize_bits, sweep_steps, sweep_alpha,
                                               sweep_bits), sampler_kwargs, precision=precision, channels_last=channels_last,
                  compile_net=compile_net, guidance=(gnet, guidance, guidance_interval))
    except OSError as err:
        # Network reading reports its own errors; this is a write that failed (disk full, quota, read-only).
        # Files are written under temporary names, so every image already there is complete.
        raise Failure(f'cannot write {err.filename or "under --outdir " + outdir} ({err.strerror or err}); '
                      f'the images already written are complete, rerun to continue') from None
    finally:
        dist.shutdown()


def _generate(network_pkl: str, outdir: str, seeds: list[int], subdirs: bool, class_idx: Optional[int],
              max_batch_size: int, pfgmpp_flag: Optional[bool], aug_dim: Optional[int], quantize_scheme: str,
              force: bool, grid: Optional[str], device: torch.device, runs: list[Run], cli_kwargs: dict,
              precision: Optional[str] = None, channels_last: bool = False, compile_net: bool = False,
              guidance: tuple[Optional[str], float, Optional[tuple[float, float]]] = (None, 1.0, None)) -> None:
    def check_output_dirs() -> None:
        try:
            dnnlib.util.check_writable_dir(outdir, '--outdir')
            if grid:
                dnnlib.util.check_writable_dir(os.path.dirname(os.path.abspath(grid)), '--grid')
        except OSError as err:
            raise Failure(str(err)) from None
    on_main_rank(check_output_dirs)

    # Rank 0 loads first so that a URL is downloaded to the cache once.
    dist.print0(f'Reading the network {network_pkl} ...')
    try:
        net = dist.rank0_first(lambda: load_network(network_pkl, device))
    except NetworkLoadError as err:
        raise click.BadParameter(str(err), param_hint='--network') from None

    precision, precision_note = network_io.precision_for_device(net, precision, device)
    if precision_note:
        dist.print0(precision_note)
    try:
        network_io.apply_speed_options(net, precision, channels_last)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--precision') from None
    D = resolve_pfgmpp(net, pfgmpp_flag, aug_dim)
    if class_idx is not None and not net.label_dim:
        raise click.BadParameter(f'{class_idx}: the network is unconditional (label_dim=0)', param_hint='--class')
    if class_idx is not None and class_idx >= net.label_dim:
        raise click.BadParameter(f'{class_idx} is out of range; expected 0..{net.label_dim - 1} '
                                 f'(the network has {net.label_dim} classes)', param_hint='--class')
    gnet_source, guidance_weight, guidance_interval = guidance
    guide = make_guide(net, gnet_source, guidance_weight, guidance_interval, D, device, precision, channels_last)
    base_kwargs = {k: v for k, v in cli_kwargs.items() if v is not None}
    ablation = pipeline.uses_ablation_sampler(base_kwargs)
    if ablation and D is not None:
        raise click.UsageError('--solver/--disc/--schedule/--scaling select the ablation sampler, which does not '
                               'support PFGM++ networks; drop them')
    if D is not None:
        values_per_image = net.img_channels * net.img_resolution ** 2
        requested = min(base_kwargs.get('sigma_max', schedules.EDM_SIGMA_MAX), net.sigma_max)
        used = pfgmpp_lib.prior_sigma_max(values_per_image, requested)
        if used != requested:
            dist.print0(f'Note: the PFGM++ prior starts at sigma={used:g} for images of fewer than 256x256x3 values '
                        f'(reference behaviour); --sigma_max only moves the time steps.')

    # Manifests identify the network by content; the path is kept for people reading them.
    is_url = dnnlib.util.is_url(network_pkl, allow_file_urls=True)
    network_source = network_pkl if is_url else os.path.abspath(network_pkl)

    @functools.lru_cache(maxsize=None)
    def network_sha256() -> str:
        try:
            return network_io.network_file_sha256(network_pkl)
        except NetworkLoadError as err:
            raise click.BadParameter(str(err), param_hint='--network') from None
    quantized_cache: dict[int, torch.nn.Module] = {}
    compiled_net: Optional[torch.nn.Module] = None
    for run in runs:
        run_net = net
        if run.bits is not None:
            if run.bits not in quantized_cache:
                quantized = quantize.quantize_network(net, run.bits, quantize_scheme)
                # Compile after quantizing: the compiled graph captures the weights it was traced with.
                quantized_cache[run.bits] = torch.compile(quantized) if compile_net else quantized
            run_net = quantized_cache[run.bits]
        elif compile_net:
            run_net = compiled_net = compiled_net or torch.compile(net)
        run_net = guide(run_net)
        kwargs = dict(base_kwargs, num_steps=run.num_steps)
        if run.alpha:
            kwargs['noise_injection'] = run.alpha
        # Exactly what the sampler receives decides the pixels, so the manifest is derived from it.
        sampler_call = dict(class_idx=class_idx, D=D, **kwargs)
        options = dict(precision=_effective_precision(net), channels_last=channels_last, compile=compile_net,
                       quantize_bits=run.bits, quantize_scheme=quantize_scheme if run.bits is not None else None,
                       device=device.type, subdirs=subdirs,
                       guidance=guidance_record(gnet_source, guidance_weight, guidance_interval))
        info = dict(
            network=network_source, network_summary=network_summary(net), sweep=run.sweep,
            sampler=pipeline.sampler_name(kwargs), sampler_kwargs=kwargs,
            nfe_per_image=network_evaluations(run.num_steps, kwargs), class_idx=class_idx,
            pfgmpp=D is not None, D=D, noise_injection_alpha=run.alpha, quantize_bits=run.bits,
            quantize_scheme=quantize_scheme if run.bits is not None else None,
            quantized_weights=(len(quantize.quantized_weight_names(net)) if run.bits is not None else 0),
            subdirs=subdirs, guidance=options['guidance'],
        )
        settings = functools.partial(_describe_run, network_sha256, net, sampler_call, options)
        _generate_run(run_net, run, seeds, subdirs, max_batch_size, sampler_call, force, device, info, settings)
        if grid and dist.is_main():
            paths = [image_path(run.outdir, s, subdirs) for s in seeds[:GRID_MAX_IMAGES]]
            write_grid(paths, grid_path_for(grid, run))
            print(f'Wrote grid of {len(paths)} images to "{grid_path_for(grid, run)}"')
        dist.barrier()
    dist.print0('Done.')


def _describe_run(network_sha256: Callable[[], str], net: Any, sampler_call: dict, options: dict) -> dict:
    return manifest_lib.describe_settings(network_sha256(), net, sampler_call, **options)


def _effective_precision(net: Any) -> dict[str, Any]:
    """The U-Net precision switches in force after --precision (the network file sets them otherwise)."""
    return {name: getattr(net, name, None) for name in ('use_fp16', 'use_bf16', 'reduced_precision_on_cpu')}


def _seed_union(manifest: Optional[dict], seeds: list[int]) -> list[int]:
    """The seeds a folder holds after this run: those its manifest lists plus the new ones, sorted."""
    previous = []
    if manifest is not None and isinstance(manifest.get('seeds'), str) and manifest['seeds']:
        try:
            previous = dnnlib.util.parse_int_list(manifest['seeds'])
        except ValueError:
            previous = []
    return sorted(set(previous) | set(seeds))


def _prepare_folder(run: Run, seeds: list[int], force: bool, settings: dict, info: dict) -> dict:
    """Rank 0: check that ``run.outdir`` may receive these images (clearing it for --force) and record what makes
    them; returns the manifest written (marked incomplete until the run ends)."""
    previous = None
    if force:
        removed = manifest_lib.clear_generated(run.outdir)
        if removed:
            print(f'--force: deleted {removed} PNG(s) a previous run left in "{run.outdir}"')
    else:
        try:
            previous = manifest_lib.check_resumable(run.outdir, settings)
        except manifest_lib.ManifestError as err:
            raise Failure(f'--outdir {err}; add --force to delete them and start over, or choose another '
                          f'--outdir') from None
    held = _seed_union(previous, seeds)
    manifest = dict(settings=settings, **dnnlib.util.json_safe(info), seeds=compact_seeds(held), num_images=len(held),
                    complete=False)
    try:
        manifest_lib.write_manifest(run.outdir, manifest)
    except OSError as err:  # disk full, quota: atomic_write left nothing under the final name
        raise Failure(f'--outdir {run.outdir}: cannot write {err.filename or manifest_lib.MANIFEST_NAME} '
                      f'({err.strerror or err})') from None
    return manifest


def _generate_run(net: Any, run: Run, seeds: list[int], subdirs: bool, max_batch_size: int, sampler_call: dict,
                  force: bool, device: torch.device, info: dict, settings: Callable[[], dict]) -> None:
    # Rank 0 checks the folder, decides what is missing and tells the others, so all ranks split the same list.
    def missing_seeds() -> tuple[list[int], dict]:
        manifest = _prepare_folder(run, seeds, force, settings(), info)
        return [s for s in seeds if not os.path.isfile(image_path(run.outdir, s, subdirs))], manifest
    todo, manifest = on_main_rank(missing_seeds)
    skipped = len(seeds) - len(todo)
    world, rank = dist.get_world_size(), dist.get_rank()
    my_batches = pipeline.split_batches(todo, max_batch_size, world)[rank::world]

    dist.print0(f'Generating {len(todo)} images to "{run.outdir}"' + (f' ({skipped} already there)' if skipped else '')
                + f', {info["nfe_per_image"]} network evaluations each...')
    bar = tqdm(total=len(todo), unit='img', file=sys.stderr, mininterval=1.0, dynamic_ncols=True,
               disable=not dist.is_main() or not todo)
    start = time.time()
    try:
        for batch_seeds in my_batches:
            if not batch_seeds:
                continue
            try:
                images = pipeline.sample_batch(net, batch_seeds, device=device, **sampler_call)
            except ValueError as err:
                raise Failure(sampler_error(err)) from None
            pixels_hwc = pipeline.to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
            for seed, pixels in zip(batch_seeds, pixels_hwc):
                save_png(to_pil(pixels), image_path(run.outdir, seed, subdirs))
            bar.update(min(len(batch_seeds) * world, bar.total - bar.n))  # other ranks move at the same pace
    finally:
        bar.close()  # ends the bar's line, so an error message starts on a line of its own
    dist.barrier()
    elapsed = time.time() - start
    if todo:
        dist.print0(f'{len(todo)} images in {elapsed:.1f} s ({len(todo) / max(elapsed, 1e-9):.2f} images/s)')
    if dist.is_main():
        manifest_lib.write_manifest(run.outdir, dict(manifest, complete=True, seconds=round(elapsed, 3)))


if __name__ == '__main__':
    dnnlib.util.run_click_command(main)  # under torchrun, errors are printed by rank 0 only
