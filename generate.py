"""Generate images with a trained EDM or PFGM++ network.

A thin command line over ``training/sampler.py``: the flags of EDM's and PFGM++'s
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
from training import guidance as guidance_lib
from training import pfgmpp as pfgmpp_lib
from training import manifest as manifest_lib
from training import quantize
from training import sampler as sampling
from training import network_io
from training.network_io import NetworkLoadError, load_network, network_summary

SEED_LIMIT = 1 << 32            # seeds index 32-bit generator seeds; larger values would alias smaller ones
IMAGES_PER_SUBDIR = 1000        # --subdirs groups seeds by thousands, as EDM does
GRID_MAX_IMAGES = 256           # a preview grid shows at most this many images (the first seeds)
DEFAULT_STEPS = 18

# ----------------------------------------------------------------------------
# Flag parsing.


class SeedList(click.ParamType):
    """Comma-separated seeds and inclusive ranges, e.g. 0-63,100; each in 0..2**32-1."""

    name = 'LIST'

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> list[int]:
        if isinstance(value, list):
            return value
        try:
            seeds = dnnlib.util.parse_int_list(value, name='--seeds')
        except ValueError as err:
            self.fail(str(err).removeprefix('--seeds: '), param, ctx)
        bad = [s for s in seeds if not 0 <= s < SEED_LIMIT]
        if bad:
            self.fail(f'seed {bad[0]} is out of range; expected integers in 0..{SEED_LIMIT - 1}', param, ctx)
        return list(dict.fromkeys(seeds))  # drop repeats, keep order


class IntList(click.ParamType):
    """Comma-separated integers or ranges (for the sweeps)."""

    name = 'LIST'

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> list[int]:
        if isinstance(value, list):
            return value
        try:
            return list(dict.fromkeys(dnnlib.util.parse_int_list(value)))
        except ValueError as err:
            self.fail(str(err).removeprefix('value: '), param, ctx)


class FloatList(click.ParamType):
    """Comma-separated non-negative numbers (for --sweep-alpha)."""

    name = 'LIST'

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> list[float]:
        if isinstance(value, list):
            return value
        numbers = []
        for item in str(value).split(','):
            if not item.strip():
                continue
            try:
                number = float(item)
            except ValueError:
                self.fail(f'cannot parse {item.strip()!r}; expected numbers like "0,0.05,0.1"', param, ctx)
            if not (math.isfinite(number) and number >= 0):
                self.fail(f'{item.strip()} is not a finite number >= 0', param, ctx)
            numbers.append(number)
        if not numbers:
            self.fail('no numbers given', param, ctx)
        return list(dict.fromkeys(numbers))


class Failure(click.ClickException):
    """A one-line error for the user (no traceback)."""


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


def resolve_pfgmpp(net: Any, pfgmpp_flag: Optional[bool], aug_dim: Optional[int]) -> Optional[float]:
    """The kernel D to sample ``net`` with (None = diffusion), from the network and the --pfgmpp/--aug_dim flags
    (:func:`training.pfgmpp.resolve_D`); errors become one line naming the flag."""
    try:
        return pfgmpp_lib.resolve_D(net, pfgmpp_flag, aug_dim)
    except pfgmpp_lib.KernelError as err:
        raise click.BadParameter(str(err), param_hint=f'--{err.option}') from None
    except ValueError as err:
        raise click.BadParameter(f'the network records an invalid PFGM++ kernel: {err}',
                                 param_hint='--network') from None


def image_path(outdir: str, seed: int, subdirs: bool) -> str:
    folder = os.path.join(outdir, f'{seed // IMAGES_PER_SUBDIR * IMAGES_PER_SUBDIR:06d}') if subdirs else outdir
    return os.path.join(folder, f'{seed:06d}.png')


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


def compact_seeds(seeds: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (manifests stay small for 50k seeds)."""
    parts, start, prev = [], None, None
    for s in seeds:
        if start is not None and s == prev + 1:
            prev = s
            continue
        if start is not None:
            parts.append(f'{start}-{prev}' if prev != start else f'{start}')
        start = prev = s
    if start is not None:
        parts.append(f'{start}-{prev}' if prev != start else f'{start}')
    return ','.join(parts)


def jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def network_evaluations(num_steps: int, sampler_kwargs: dict) -> int:
    """Network calls per image (NFE) of the sampler these options select (``training.sampler.sampler_nfe``)."""
    return sampling.sampler_nfe(num_steps, sampler_kwargs)


# ----------------------------------------------------------------------------
# The command.


POSITIVE = click.FloatRange(min=0, min_open=True)
NON_NEGATIVE = click.FloatRange(min=0)

#: The sampler flags (EDM sampler, ablation sampler, PFGM++ restatements), shared with ``fid.py gen``.
SAMPLER_OPTIONS = [
    # EDM sampler.
    click.option('--steps', 'num_steps', type=click.IntRange(min=1), default=None, metavar='INT',
                 help=f'Sampler steps; Heun costs 2*steps-1 network calls  [default: {DEFAULT_STEPS}]'),
    click.option('--sigma_min', type=POSITIVE, default=None, metavar='FLOAT',
                 help='Smallest noise level  [default: 0.002, or per --disc]'),
    click.option('--sigma_max', type=POSITIVE, default=None, metavar='FLOAT',
                 help='Largest noise level  [default: 80, or per --disc]'),
    click.option('--rho', type=POSITIVE, default=7, show_default=True, metavar='FLOAT',
                 help='Exponent that spaces the noise levels'),
    click.option('--S_churn', 'S_churn', type=NON_NEGATIVE, default=0, show_default=True, metavar='FLOAT',
                 help='Churn: how much noise the stochastic sampler re-adds'),
    click.option('--S_min', 'S_min', type=NON_NEGATIVE, default=0, show_default=True, metavar='FLOAT',
                 help='Churn only at noise levels from here ...'),
    click.option('--S_max', 'S_max', type=NON_NEGATIVE, default='inf', show_default=True, metavar='FLOAT',
                 help="... up to here (EDM's default holds; the PFGM++ fork's generate.py defaulted to 0)"),
    click.option('--S_noise', 'S_noise', type=float, default=1, show_default=True, metavar='FLOAT',
                 help="Scale of the re-added noise (EDM's default holds; the PFGM++ fork's defaulted to 0)"),
    # EDM's generalised (ablation) sampler: any of these selects it.
    click.option('--solver', type=click.Choice(sampling.ALL_SOLVERS), default=None,
                 metavar='|'.join(sampling.ALL_SOLVERS),
                 help='euler|heun: ablation sampler\'s ODE solver; dpmpp2m|dpmpp3m (DPM-Solver++ multistep, 1 NFE '
                      'per step) or restart (Restart sampling): fast solvers for every network, PFGM++ included'),
    click.option('--disc', 'discretization', type=click.Choice(sampling.DISCRETIZATIONS), default=None,
                 metavar='vp|ve|iddpm|edm', help='Ablation: how the noise levels are spaced'),
    click.option('--schedule', type=click.Choice(sampling.SCHEDULES), default=None, metavar='vp|ve|linear',
                 help='Ablation: noise schedule sigma(t)'),
    click.option('--scaling', type=click.Choice(sampling.SCALINGS), default=None, metavar='vp|none',
                 help='Ablation: signal scaling s(t)'),
    # Fast solvers (--solver=dpmpp2m|dpmpp3m|restart) and the spacing of the noise levels.
    click.option('--spacing', type=click.Choice(sampling.SPACINGS), default=None, metavar='|'.join(sampling.SPACINGS),
                 help='Noise levels of the EDM sampler and the fast solvers: edm (rho-spaced) or logsnr (uniform in '
                      'log sigma, DPM-Solver\'s choice for few steps)  [default: edm]'),
    click.option('--restart-interval', 'restart_interval', type=FloatList(), default=None, metavar='LO,HI',
                 help=f'Restart: noise levels t_min,t_max between which it restarts  '
                      f'[default: {",".join(map(str, sampling.RESTART_INTERVAL))}]'),
    click.option('--restart-repeats', 'restart_repeats', type=click.IntRange(min=1), default=None, metavar='K',
                 help=f'Restart: number of restarts K  [default: {sampling.RESTART_REPEATS}]'),
    click.option('--restart-steps', 'restart_steps', type=click.IntRange(min=1), default=None, metavar='INT',
                 help=f'Restart: Heun steps per restart (2 NFE each)  [default: {sampling.RESTART_STEPS}]'),
    # PFGM++ (normally read from the network).
    click.option('--pfgmpp', type=bool, default=None, metavar='BOOL',
                 help='Restate that the network is PFGM++ (an error if the network says otherwise)'),
    click.option('--aug_dim', type=click.IntRange(min=1), default=None, metavar='INT',
                 help='Restate its augmented dimensions D (an error if the network says otherwise)'),
]


def sampler_options(fn: Callable) -> Callable:
    """Decorator adding :data:`SAMPLER_OPTIONS` to a click command."""
    for option in reversed(SAMPLER_OPTIONS):
        fn = option(fn)
    return fn


def _parse_interval(_ctx: Any, _param: Any, value: Optional[str]) -> Optional[tuple[float, float]]:
    if value is None:
        return None
    try:
        lo, hi = (float(item) for item in value.split(','))
        return guidance_lib.check_interval((lo, hi))
    except ValueError as err:
        reason = str(err) if isinstance(err, guidance_lib.GuidanceError) else 'expected two numbers SIGMA_LO,SIGMA_HI'
        raise click.BadParameter(f'{value}: {reason}') from None


#: Guidance flags (EDM2's autoguidance and classifier-free guidance), shared with ``fid.py gen``.
GUIDANCE_OPTIONS = [
    click.option('--gnet', 'gnet', type=str, default=None, metavar='PATH|URL|uncond',
                 help='Guiding network for --guidance (autoguidance: a weaker one; CFG: an unconditional one, or '
                      f'"{guidance_lib.DROPPED_LABEL}" for --network itself with its label dropped)'),
    click.option('--guidance', type=float, default=1.0, show_default=True, metavar='W',
                 help='Guidance weight: D_gnet + W*(D_net - D_gnet); 1 = unguided'),
    click.option('--guidance-interval', 'guidance_interval', type=str, default=None, metavar='LO,HI',
                 callback=_parse_interval, help='Guide only at noise levels LO <= sigma <= HI  [default: all]'),
]


def guidance_options(fn: Callable) -> Callable:
    """Decorator adding :data:`GUIDANCE_OPTIONS` to a click command."""
    for option in reversed(GUIDANCE_OPTIONS):
        fn = option(fn)
    return fn


def make_guide(net: torch.nn.Module, gnet_source: Optional[str], guidance: float,
               interval: Optional[tuple[float, float]], D: Optional[int], device: torch.device,
               precision: Optional[str] = None,
               channels_last: bool = False) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """Load and check the --gnet guide once; the result wraps ``net`` (or a quantized/compiled copy) in guidance.

    The wrapper returns its argument itself when unguided (no --gnet, or --guidance=1).
    """
    if gnet_source is None:
        for flag, given in (('--guidance', guidance != 1), ('--guidance-interval', interval is not None)):
            if given:
                raise click.BadParameter('needs a guiding network: give --gnet=PATH (or '
                                         f'--gnet={guidance_lib.DROPPED_LABEL} for classifier-free guidance)',
                                         param_hint=flag)
        return lambda module: module
    drop_labels = gnet_source == guidance_lib.DROPPED_LABEL
    gnet = None
    if not drop_labels:
        try:
            gnet = load_network(gnet_source, device)
            network_io.apply_speed_options(gnet, precision, channels_last)
        except (NetworkLoadError, ValueError) as err:
            raise click.BadParameter(str(err), param_hint='--gnet') from None

    def guide(module: torch.nn.Module) -> torch.nn.Module:
        try:
            return guidance_lib.guided_denoiser(module, gnet, guidance, interval, drop_labels=drop_labels, D=D)
        except guidance_lib.GuidanceError as err:
            raise click.BadParameter(f'{gnet_source}: {err}', param_hint='--gnet') from None
    if guide(net) is not net:  # a guide that does not fit fails here, before any work
        where = f' for {interval[0]:g} <= sigma <= {interval[1]:g}' if interval else ''
        dist.print0(f'Guidance W={guidance:g} by {gnet_source}: every network evaluation{where} also evaluates the '
                    f'guide, so up to twice the NFE below are paid.')
    return guide


def guidance_record(gnet_source: Optional[str], guidance: float,
                    interval: Optional[tuple[float, float]]) -> Optional[dict]:
    """The guidance settings for manifests and result lines (None when unguided)."""
    if gnet_source is None or guidance == 1:
        return None
    network = gnet_source
    if gnet_source != guidance_lib.DROPPED_LABEL and not dnnlib.util.is_url(gnet_source, allow_file_urls=True):
        network = os.path.abspath(gnet_source)
    return dict(gnet=network, weight=guidance, interval=list(interval) if interval else None)


def check_noise_range(sampler_kwargs: dict) -> None:
    """--sigma_min must lie below --sigma_max when both are given."""
    lo, hi = sampler_kwargs.get('sigma_min'), sampler_kwargs.get('sigma_max')
    if lo is not None and hi is not None and not lo < hi:
        raise click.BadParameter(f'--sigma_min={lo} must be below --sigma_max={hi}', param_hint='--sigma_min')


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
# Sampler keyword -> the flag that sets it, so library errors name the flag.
SAMPLER_FLAGS = {'num_steps': '--steps', 'restart_interval': '--restart-interval',
                 'restart_repeats': '--restart-repeats', 'restart_steps': '--restart-steps', 'S_churn': '--S_churn', 'noise_injection': '--alpha',
                 'discretization': '--disc', 'schedule': '--schedule', 'scaling': '--scaling', 'spacing': '--spacing'}


def sampler_error(err: ValueError) -> str:
    """A sampler's ValueError as one line that names flags instead of keywords."""
    message = str(err)
    for keyword, flag in SAMPLER_FLAGS.items():
        message = re.sub(rf'(?<![\w-]){keyword}\b', flag, message)
    return message


def check_solver_flags(sampler_kwargs: dict, step_counts: Sequence[int]) -> None:
    """Refuse solver options that do not fit together, before anything is loaded (one line, naming flags).

    ``step_counts``: the --steps values that will run. The restart interval is checked against the noise range
    the flags give here and against the network's range once it is loaded.
    """
    kwargs = {k: v for k, v in sampler_kwargs.items() if v is not None}
    try:
        name = sampling.sampler_name(kwargs)
        if name in sampling.FAST_SOLVERS:
            for n in step_counts:
                sampling.check_fast_options(name, n, kwargs.get('restart_interval'), kwargs.get('restart_repeats'),
                                            kwargs.get('restart_steps'),
                                            kwargs.get('sigma_min', sampling.EDM_SIGMA_MIN),
                                            kwargs.get('sigma_max', sampling.EDM_SIGMA_MAX))
    except ValueError as err:
        raise click.UsageError(sampler_error(err)) from None


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
    if not dist.is_main():
        dist.barrier()
    dist.print0(f'Reading the network {network_pkl} ...')
    try:
        net = load_network(network_pkl, device)
    except NetworkLoadError as err:
        raise click.BadParameter(str(err), param_hint='--network') from None
    finally:
        if dist.is_main():
            dist.barrier()

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
    ablation = sampling.uses_ablation_sampler(base_kwargs)
    if ablation and D is not None:
        raise click.UsageError('--solver/--disc/--schedule/--scaling select the ablation sampler, which does not '
                               'support PFGM++ networks; drop them')
    if D is not None:
        values_per_image = net.img_channels * net.img_resolution ** 2
        requested = min(base_kwargs.get('sigma_max', sampling.EDM_SIGMA_MAX), net.sigma_max)
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
            sampler=sampling.sampler_name(kwargs), sampler_kwargs=kwargs,
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


def on_main_rank(task: Callable[[], Any]) -> Any:
    """Run ``task`` on rank 0 and hand its result, or its error, to every rank.

    Every rank then raises the same one-line error instead of waiting forever for a rank that stopped.
    """
    outcome: tuple[Any, Optional[str]] = (None, None)
    if dist.is_main():
        try:
            outcome = (task(), None)
        except click.ClickException as err:
            outcome = (None, err.format_message())
        except OSError as err:  # disk full, read-only folder: every rank must stop, not only this one
            outcome = (None, f'cannot write {err.filename or "under --outdir"} ({err.strerror or err})')
    result, error = dist.broadcast_object(outcome)
    if error is not None:
        raise Failure(error)
    return result


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
    manifest = dict(settings=settings, **jsonable(info), seeds=compact_seeds(held), num_images=len(held),
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
    my_batches = sampling.split_batches(todo, max_batch_size, world)[rank::world]

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
                images = sampling.sample_batch(net, batch_seeds, device=device, **sampler_call)
            except ValueError as err:
                raise Failure(sampler_error(err)) from None
            pixels_hwc = sampling.to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
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
