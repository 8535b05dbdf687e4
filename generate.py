"""Generate images with a trained EDM or PFGM++ network.

A thin command line over ``sampling/``, with the flags it shares with ``fid.py gen`` in
``cli/common.py``: the flags of EDM's and PFGM++'s
generate.py keep their names and meaning, plus resumable output (existing PNGs
are skipped unless --force), a preview grid, and the robustness studies of the
PFGM++ paper (noise injection, weight quantization, step-count sweeps).
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any, Callable, Optional

import click

import dnnlib
from cli import common as cli
from formats import network_io
from sampling import generation, quantize

# ----------------------------------------------------------------------------
# Flags of the PFGM++ fork's generate.py.


#: The PFGM++ fork's generate.py sampled every checkpoint it found in --outdir, into --outdir/ckpt_{kimg:06d}.
FORK_PER_CHECKPOINT = ('this generate.py samples the one --network it is given; run it once per checkpoint, e.g. '
                       'python generate.py --network=DIR/training-state-NNNNNN.pt --outdir=DIR/ckpt_NNNNNN '
                       '--seeds=0-49999 --subdirs')


def fork_options(fn: Callable) -> Callable:
    """The PFGM++ fork's generate.py flags: --use_pickle is accepted (the file format is read from the file),
    the others stop with one line giving the equivalent command."""
    script = 'generate.py'
    for option in (
        cli.refused_option('--ckpt', type=int, script=script, advice=FORK_PER_CHECKPOINT),
        cli.refused_option('--end_ckpt', type=int, script=script, advice=FORK_PER_CHECKPOINT),
        cli.refused_option('--resume', type=int, script=script, advice=FORK_PER_CHECKPOINT),
        cli.refused_option('--edm', type=bool, script=script,
                                   advice='drop it: --network names the file to sample, EDM or PFGM++ alike'),
        cli.refused_option('--save_images', is_flag=True, script=script,
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
            f'--network={example} --outdir={folder} --seeds={cli.compact_seeds(seeds)} --subdirs')

@click.command(context_settings=dict(max_content_width=120))
# What to sample from and where the images go.
@click.option('--network', 'network_pkl', type=str, default=None, metavar='PATH|URL',
              help='Snapshot .pkl, training state .pt or weights-only file; a path or a URL (cached)  [required]')
@click.option('--outdir', type=str, required=True, metavar='DIR', help='Folder that receives the PNGs')
@click.option('--seeds', type=cli.SeedList(), default='0-63', show_default=True, metavar='LIST',
              help='Seeds, one image each (e.g. 0-63,100)')
@click.option('--subdirs', is_flag=True, help='Group the PNGs into one folder per 1000 seeds')
@click.option('--class', 'class_idx', type=click.IntRange(min=0), default=None, metavar='INT',
              help='Fix the class label of a conditional network  [default: drawn per seed]')
@click.option('--batch', 'max_batch_size', type=click.IntRange(min=1), default=64, show_default=True, metavar='INT',
              help='Images sampled together (per process)')
@cli.sampler_options
@cli.guidance_options
# Robustness studies of the PFGM++ paper.
@click.option('--alpha', type=cli.NON_NEGATIVE, default=None, metavar='FLOAT',
              help='Inject noise: x += alpha*t_i*randn before every step  [default: 0]')
@click.option('--quantize-bits', 'quantize_bits', type=int, default=None, metavar='K',
              help='Quantize the conv/linear weights to K bits before sampling')
@click.option('--quantize-scheme', 'quantize_scheme', type=click.Choice(quantize.SCHEMES), default='symmetric',
              show_default=True, help='symmetric (zero kept) or minmax (the PFGM++ fork\'s quantizer)')
@click.option('--quantize-granularity', 'quantize_granularity', type=click.Choice(quantize.GRANULARITIES),
              default='tensor', show_default=True,
              help='One quantization scale per weight tensor (the paper\'s) or one per output channel')
@click.option('--sweep-steps', 'sweep_steps', type=cli.IntList(), default=None, metavar='LIST',
              help='Several step counts, each into its own folder (e.g. 5,10,18)')
@click.option('--sweep-alpha', 'sweep_alpha', type=cli.FloatList(), default=None, metavar='LIST',
              help='Several noise injection strengths (e.g. 0,0.1,0.2)')
@click.option('--sweep-bits', 'sweep_bits', type=cli.IntList(), default=None, metavar='LIST',
              help='Several quantization widths (e.g. 4,6,8)')
# Housekeeping.
@click.option('--force', is_flag=True, help='Delete the PNGs and manifest a previous run left in --outdir, then '
              'generate (default: keep them and add the missing seeds, if its manifest records the same network '
              'and settings; refuse otherwise)')
@click.option('--grid', 'grid', type=str, default=None, metavar='PATH',
              help=f'Also tile the first {generation.GRID_MAX_IMAGES} images into this PNG')
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
         quantize_bits: Optional[int], quantize_scheme: str, quantize_granularity: str,
         sweep_steps: Optional[list[int]], sweep_alpha: Optional[list[float]], sweep_bits: Optional[list[int]],
         force: bool, grid: Optional[str],
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
    try:
        runs = generation.plan_runs(outdir, num_steps, alpha, quantize_bits, sweep_steps, sweep_alpha, sweep_bits,
                                    quantize_scheme, quantize_granularity)
    except generation.GenerationError as err:
        raise cli.click_error(err) from None
    cli.check_noise_range(sampler_kwargs)
    cli.check_solver_flags(dict(sampler_kwargs, noise_injection=max([alpha or 0.0] + list(sweep_alpha or []))),
                           [run.num_steps for run in runs])
    if device is not None and not (device == 'cpu' or device.startswith('cuda')):
        raise click.BadParameter(f'{device!r}: expected cpu or cuda', param_hint='--device')
    request = generation.Request(
        network=network_pkl, outdir=outdir, seeds=seeds, runs=runs, sampler_kwargs=sampler_kwargs, subdirs=subdirs,
        class_idx=class_idx, max_batch_size=max_batch_size, pfgmpp=pfgmpp, aug_dim=aug_dim,
        quantize_scheme=quantize_scheme, quantize_granularity=quantize_granularity, force=force, grid=grid,
        device=device, precision=precision, channels_last=channels_last, compile=compile_net, gnet=gnet,
        guidance=guidance, guidance_interval=guidance_interval)
    try:
        generation.generate(request)
    except generation.GenerationError as err:
        raise cli.click_error(err) from None


if __name__ == '__main__':
    cli.run_click_command(main)  # under torchrun, errors are printed by rank 0 only
