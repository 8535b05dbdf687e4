"""Generation runs: one network, a list of seeds, one output folder per run (a sweep makes several).

:func:`generate` is what ``generate.py`` calls once its flags are parsed: it loads the network, checks it, sets up
precision, memory layout, guidance, quantization and compilation, plans what each folder still needs, samples every
seed through :mod:`sampling.pipeline`, writes one PNG per seed (``formats.manifest.image_path``) and records in
``manifest.json`` what decides the pixels, marking a folder complete only once every rank has written its images.

Errors are :class:`GenerationError`, one line each; ``flag`` names the command-line flag at fault, and the
command-line layer (``cli/common.py``) turns them into click's errors. Under torchrun every rank raises the same
error: a rank that fails hands its line to the others at the end of the run, so the job fails and nothing is
recorded complete that is not.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import PIL.Image
import torch
from tqdm import tqdm

import dnnlib
from formats import manifest as manifest_lib
from formats import network_io
from sampling import consistency as consistency_sampling
from sampling import guidance as guidance_lib
from sampling import pipeline, quantize, schedules
from torch_utils import distributed as dist
from torch_utils import host_memory
from training import pfgmpp as pfgmpp_lib

GRID_MAX_IMAGES = 256           # a preview grid shows at most this many images (the first seeds)


class GenerationError(ValueError):
    """A one-line error for the user.

    ``flag``: the command-line flag at fault (None when no single flag is); ``usage``: the flags contradict each
    other (click's usage error rather than a bad value).
    """

    def __init__(self, message: str, flag: Optional[str] = None, usage: bool = False) -> None:
        super().__init__(message)
        self.flag, self.usage = flag, usage


# ----------------------------------------------------------------------------
# Sampler keywords as flags.


#: Sampler keyword -> the flag that sets it, so library errors name the flag.
SAMPLER_FLAGS = {'num_steps': '--steps', 'restart_interval': '--restart-interval',
                 'restart_repeats': '--restart-repeats', 'restart_steps': '--restart-steps', 'S_churn': '--S_churn',
                 'noise_injection': '--alpha', 'discretization': '--disc', 'schedule': '--schedule',
                 'scaling': '--scaling', 'spacing': '--spacing', 'sigma_min': '--sigma_min',
                 'sigma_max': '--sigma_max', 'solver_order': '--solver-order'}


def sampler_message(err: Exception) -> str:
    """A sampler's error message as one line that names flags instead of keywords."""
    message = str(err)
    for keyword, flag in SAMPLER_FLAGS.items():
        message = re.sub(rf'(?<![\w-]){keyword}\b', flag, message)
    return message


# ----------------------------------------------------------------------------
# Planning: one run per output folder.


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
              sweep_bits: Optional[list[int]], quantize_scheme: str = 'symmetric',
              quantize_granularity: str = 'tensor') -> list[Run]:
    """One run for a plain command; the cartesian product of the sweep lists otherwise (``outdir/steps005-...``).

    Raises :class:`GenerationError` for a single value given with its sweep, a step count below 1, a bit width
    ``quantize_scheme`` cannot use, or a ``quantize_granularity`` not in ``quantize.GRANULARITIES`` or other than
    'tensor' without a bit width.
    """
    for single, single_name, sweep, sweep_name in ((steps, '--steps', sweep_steps, '--sweep-steps'),
                                                   (alpha, '--alpha', sweep_alpha, '--sweep-alpha'),
                                                   (bits, '--quantize-bits', sweep_bits, '--sweep-bits')):
        if single is not None and sweep:
            raise GenerationError(f'{single_name} and {sweep_name} both given; use one of them', usage=True)
    if sweep_steps and min(sweep_steps) < 1:
        raise GenerationError(f'step counts must be >= 1, got {min(sweep_steps)}', flag='--sweep-steps')
    try:
        quantize.check_granularity(quantize_granularity)
    except ValueError as err:
        raise GenerationError(str(err), flag='--quantize-granularity') from None
    if quantize_granularity != 'tensor' and bits is None and not sweep_bits:
        raise GenerationError('quantizes nothing without --quantize-bits or --sweep-bits',
                              flag='--quantize-granularity')
    for width in ([bits] if bits is not None else []) + list(sweep_bits or []):
        try:
            quantize.check_bits(width, quantize_scheme)
        except ValueError as err:
            raise GenerationError(str(err), flag='--sweep-bits' if sweep_bits else '--quantize-bits') from None
    steps_values = sweep_steps or [steps if steps is not None else schedules.DEFAULT_STEPS]
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


# ----------------------------------------------------------------------------
# PNG files.


def to_pil(image_hwc: np.ndarray) -> PIL.Image.Image:
    """uint8 HWC array -> PIL image (1 channel as 'L', 3 as 'RGB'); GenerationError for other channel counts."""
    channels = image_hwc.shape[2]
    if channels == 1:
        return PIL.Image.fromarray(image_hwc[:, :, 0], 'L')
    if channels == 3:
        return PIL.Image.fromarray(image_hwc, 'RGB')
    raise GenerationError(f'cannot write {channels}-channel images as PNG; expected 1 or 3 channels')


def save_png(image: PIL.Image.Image, path: str) -> None:
    """Write a PNG through ``dnnlib.util.atomic_write``, so a crash never leaves a truncated image."""
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
    """The grid of a sweep folder gets its tag: ``grid.png`` -> ``grid-steps005.png``."""
    if not run.tag:
        return grid
    stem, ext = os.path.splitext(grid)
    return f'{stem}-{run.tag}{ext or ".png"}'


# ----------------------------------------------------------------------------
# torchrun ranks.


def on_main_rank(task: Callable[[], Any]) -> Any:
    """Run ``task`` on rank 0 only and hand its result, or its one-line error, to every rank.

    Errors passed on: :class:`GenerationError` (flag kept), the library's one-line ``ValueError`` subclasses, and
    ``OSError`` (disk full, read-only folder); every rank then raises the same :class:`GenerationError`.
    """
    outcome: tuple[Any, Optional[tuple[str, Optional[str], bool]]] = (None, None)
    if dist.is_main():
        try:
            outcome = (task(), None)
        except GenerationError as err:
            outcome = (None, (str(err), err.flag, err.usage))
        except ValueError as err:
            outcome = (None, (str(err), None, False))
        except OSError as err:
            outcome = (None, (f'cannot write {err.filename or "under --outdir"} ({err.strerror or err})', None,
                              False))
    result, error = dist.broadcast_object(outcome)
    if error is not None:
        raise GenerationError(error[0], flag=error[1], usage=error[2])
    return result


def _first_failure(error: Optional[str]) -> None:
    """Every rank hands in its error (None when it succeeded); all raise the first one, naming its rank."""
    gathered = dist.gather_object(error)
    first = None
    if dist.is_main():
        first = next(((rank, message) for rank, message in enumerate(gathered) if message is not None), None)
    first = dist.broadcast_object(first)
    if first is not None:
        rank, message = first
        raise GenerationError(f'rank {rank}: {message}' if dist.get_world_size() > 1 else message)


def _leave_process_group(success: bool) -> None:
    """Leave cleanly after success; after an error leave without the closing barrier, which a healthy rank could
    pair with a barrier of its own and so walk past the failure."""
    if not success and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    dist.shutdown()


# ----------------------------------------------------------------------------
# Setting up the network.


def _load(source: str, device: torch.device, flag: str) -> torch.nn.Module:
    """Load a network file (rank 0 first, so a URL is downloaded to the cache once) and refuse non-finite
    weights, naming the file."""
    try:
        net = dist.rank0_first(lambda: network_io.load_network(source, device))
        pipeline.check_finite_weights(net, source)
    except network_io.NetworkLoadError as err:
        raise GenerationError(str(err), flag=flag) from None
    except pipeline.NonFiniteError as err:
        raise GenerationError(str(err), flag=flag) from None
    return net


def resolve_kernel(net: Any, pfgmpp_flag: Optional[bool], aug_dim: Optional[int]) -> Optional[float]:
    """The kernel D to sample ``net`` with (None = diffusion) from the network and the --pfgmpp/--aug_dim flags."""
    try:
        return pfgmpp_lib.resolve_D(net, pfgmpp_flag, aug_dim)
    except pfgmpp_lib.KernelError as err:
        raise GenerationError(str(err), flag=f'--{err.option}') from None
    except ValueError as err:
        raise GenerationError(f'the network records an invalid PFGM++ kernel: {err}', flag='--network') from None


def make_guide(net: torch.nn.Module, gnet_source: Optional[str], weight: float,
               interval: Optional[tuple[float, float]], D: Optional[float], device: torch.device,
               precision: Optional[str] = None, channels_last: bool = False,
               log: Callable[[str], None] = dist.print0) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """Load and check the --gnet guide once; the result wraps ``net`` (or a quantized/compiled copy) in guidance,
    and returns its argument itself when unguided (no --gnet, or --guidance=1).

    Raises :class:`GenerationError` naming --guidance (not finite, or given without --gnet), --guidance-interval
    (without --gnet) or --gnet (a guide that does not fit; --gnet=uncond on a network trained without label
    dropout; a consistency model, which guidance does not apply to). Notes (costs, a label dropout that cannot be
    known) go to ``log``.
    """
    if not math.isfinite(weight):
        raise GenerationError(f'{weight}: expected a finite guidance weight (1 = unguided)', flag='--guidance')
    if gnet_source is None:
        for flag, given in (('--guidance', weight != 1), ('--guidance-interval', interval is not None)):
            if given:
                raise GenerationError('needs a guiding network: give --gnet=PATH (or '
                                      f'--gnet={guidance_lib.DROPPED_LABEL} for classifier-free guidance)', flag=flag)
        return lambda module: module
    if consistency_sampling.is_consistency_model(net):
        raise GenerationError('the network is a consistency model; guidance mixes denoisers and does not apply to '
                              'it', flag='--gnet')
    drop_labels = gnet_source == guidance_lib.DROPPED_LABEL
    gnet = None
    if not drop_labels:
        gnet = _load(gnet_source, device, '--gnet')
        try:
            network_io.apply_speed_options(gnet, precision, channels_last)
        except ValueError as err:
            raise GenerationError(str(err), flag='--gnet') from None

    def guide(module: torch.nn.Module) -> torch.nn.Module:
        try:
            return guidance_lib.guided_denoiser(module, gnet, weight, interval, drop_labels=drop_labels, D=D)
        except guidance_lib.GuidanceError as err:
            raise GenerationError(f'{gnet_source}: {err}', flag='--gnet') from None
    if guide(net) is not net:  # a guide that does not fit fails here, before any work
        if drop_labels:
            try:
                note = guidance_lib.check_label_dropout(net)
            except guidance_lib.GuidanceError as err:
                raise GenerationError(f'{gnet_source}: {err}', flag='--gnet') from None
            if note:
                log(f'Note: {note}')
        where = f' for {interval[0]:g} <= sigma <= {interval[1]:g}' if interval else ''
        log(f'Guidance W={weight:g} by {gnet_source}: every network evaluation{where} also evaluates the '
            f'guide, so up to twice the NFE below are paid.')
    return guide


def _dry_run(net: Any, D: Optional[float], class_idx: Optional[int], kwargs: dict,
             interval: Optional[tuple[float, float]], guided: bool) -> None:
    """Run the sampler's schedule without the network (:func:`sampling.pipeline.evaluated_noise_levels`) before
    any file is written, and refuse a guidance interval that no evaluated noise level reaches."""
    try:
        levels = pipeline.evaluated_noise_levels(net, D=D, class_idx=class_idx, **kwargs)
    except ValueError as err:
        raise GenerationError(sampler_message(err)) from None
    if guided and interval is not None and levels and not any(interval[0] <= s <= interval[1] for s in levels):
        raise GenerationError(f'{interval[0]:g},{interval[1]:g} contains none of the {len(levels)} noise levels '
                              f'the sampler evaluates ({levels[-1]:.4g} down to {levels[0]:.4g}), so guidance '
                              f'would change nothing', flag='--guidance-interval')


# ----------------------------------------------------------------------------
# The entry point.


@dataclass
class Request:
    """What ``generate.py``'s flags ask for (see its --help for the meaning of each)."""

    network: str
    outdir: str
    seeds: list[int]
    runs: list[Run]
    sampler_kwargs: dict = field(default_factory=dict)   # the sampler flags, None = default
    subdirs: bool = False
    class_idx: Optional[int] = None
    max_batch_size: int = 64
    pfgmpp: Optional[bool] = None
    aug_dim: Optional[int] = None
    quantize_scheme: str = 'symmetric'
    quantize_granularity: str = 'tensor'
    force: bool = False
    grid: Optional[str] = None
    device: Optional[str] = None
    precision: Optional[str] = None
    channels_last: bool = False
    compile: bool = False
    gnet: Optional[str] = None
    guidance: float = 1.0
    guidance_interval: Optional[tuple[float, float]] = None


def generate(request: Request) -> None:
    """Make every image ``request`` asks for (one process, or one rank of torchrun); prints progress on rank 0.

    Each image depends only on its seed. Existing images of a folder whose manifest records the same settings are
    kept (all are deleted first with ``force``). Raises :class:`GenerationError` (one line) for anything the user
    can fix: flags, network files, folders, non-finite samples, a full disk.
    """
    host_memory.retain_freed_host_memory()
    try:
        device = dist.init(request.device)
    except RuntimeError as err:
        raise GenerationError(str(err)) from None
    thread_note = dist.limit_intra_op_threads(device)
    if thread_note:
        dist.print0(thread_note)
    success = False
    created = not os.path.exists(request.outdir)
    try:
        _generate(request, device)
        success = True
    except OSError as err:
        # Network reading reports its own errors; this is a write that failed (disk full, quota, read-only).
        # Files are written under temporary names, so every image already there is complete.
        raise GenerationError(f'cannot write {err.filename or "under --outdir " + request.outdir} '
                              f'({err.strerror or err}); the images already written are complete, rerun to '
                              f'continue') from None
    finally:
        if not success and created:
            _remove_empty_folders(request.outdir)
        _leave_process_group(success)


def _remove_empty_folders(outdir: str) -> None:
    """Undo the folders a refused or failed run created and left empty (the folder checks create --outdir before
    the network and flags are known to work); a folder holding any file stays."""
    for root, _dirs, _files in os.walk(outdir, topdown=False):
        with contextlib.suppress(OSError):  # not empty, or another rank removed it first
            os.rmdir(root)


def _check_output_dirs(request: Request) -> None:
    try:
        dnnlib.util.check_writable_dir(request.outdir, '--outdir')
        if request.grid:
            dnnlib.util.check_writable_dir(os.path.dirname(os.path.abspath(request.grid)), '--grid')
    except OSError as err:
        raise GenerationError(str(err)) from None


def _effective_precision(net: Any) -> dict[str, Any]:
    """The U-Net precision switches in force after --precision (the network file sets them otherwise)."""
    return {name: getattr(net, name, None) for name in ('use_fp16', 'use_bf16', 'reduced_precision_on_cpu')}


def _generate(request: Request, device: torch.device) -> None:
    on_main_rank(lambda: _check_output_dirs(request))
    dist.print0(f'Reading the network {request.network} ...')
    net = _load(request.network, device, '--network')
    # Rank 0 records the folders; hashed before the speed options, which may add prepacked weights.
    content_sha256 = manifest_lib.network_content_sha256(net) if dist.is_main() else ''
    precision, precision_note = network_io.precision_for_device(net, request.precision, device)
    if precision_note:
        dist.print0(precision_note)
    try:
        network_io.apply_speed_options(net, precision, request.channels_last)
    except ValueError as err:
        raise GenerationError(str(err), flag='--precision') from None
    D = resolve_kernel(net, request.pfgmpp, request.aug_dim)
    class_idx = request.class_idx
    if class_idx is not None and not net.label_dim:
        raise GenerationError(f'{class_idx}: the network is unconditional (label_dim=0)', flag='--class')
    if class_idx is not None and class_idx >= net.label_dim:
        raise GenerationError(f'{class_idx} is out of range; expected 0..{net.label_dim - 1} (the network has '
                              f'{net.label_dim} classes)', flag='--class')
    guide = make_guide(net, request.gnet, request.guidance, request.guidance_interval, D, device, precision,
                       request.channels_last)
    guided = guide(net) is not net
    base_kwargs = pipeline.recorded_sampler_kwargs(request.sampler_kwargs)
    is_consistency = consistency_sampling.is_consistency_model(net)
    for run in request.runs:
        try:
            consistency_sampling.check_request(is_consistency, dict(base_kwargs, num_steps=run.num_steps))
        except ValueError as err:
            raise GenerationError(str(err)) from None
    if pipeline.uses_ablation_sampler(base_kwargs) and D is not None:
        raise GenerationError('--solver/--disc/--schedule/--scaling select the ablation sampler, which does not '
                              'support PFGM++ networks; drop them', usage=True)
    if D is not None:
        values_per_image = net.img_channels * net.img_resolution ** 2
        requested = min(base_kwargs.get('sigma_max', schedules.EDM_SIGMA_MAX), net.sigma_max)
        used = pfgmpp_lib.prior_sigma_max(values_per_image, requested)
        if used != requested:
            dist.print0(f'Note: the PFGM++ prior starts at sigma={used:g} for images of fewer than 256x256x3 values '
                        f'(reference behaviour); --sigma_max only moves the time steps.')

    # Manifests identify the network by content; the path is kept for people reading them.
    source = request.network
    network_source = source if dnnlib.util.is_url(source, allow_file_urls=True) else os.path.abspath(source)

    @functools.lru_cache(maxsize=None)
    def file_sha256s() -> tuple[str, ...]:
        """How earlier versions named the network: the SHA-256 of the file read, or of ``x.pkl`` when its exported
        ``x.weights.pt`` is read and holds the same network. Only for folders they recorded."""
        read = network_io.network_file_sha256(source)
        given = network_io.network_file_sha256(source, prefer_weights=False)
        if given == read or manifest_lib.network_content_sha256(
                network_io.load_network(source, 'cpu', prefer_weights=False)) != content_sha256:
            return (read,)
        return read, given
    guidance = guidance_lib.guidance_record(request.gnet, request.guidance, request.guidance_interval)
    quantized_cache: dict[int, torch.nn.Module] = {}
    compiled_net: Optional[torch.nn.Module] = None
    def run_kwargs(run: Run) -> dict:
        return dict(base_kwargs, num_steps=run.num_steps, **({'noise_injection': run.alpha} if run.alpha else {}))
    for run in request.runs:  # every run's settings are checked before any file is written
        _dry_run(net, D, class_idx, run_kwargs(run), request.guidance_interval, guided)
    for run in request.runs:
        kwargs = run_kwargs(run)
        run_net = net
        if run.bits is not None:
            if run.bits not in quantized_cache:
                quantized = quantize.quantize_network(net, run.bits, request.quantize_scheme,
                                                      granularity=request.quantize_granularity)
                # Compile after quantizing: the compiled graph captures the weights it was traced with.
                quantized_cache[run.bits] = torch.compile(quantized) if request.compile else quantized
            run_net = quantized_cache[run.bits]
        elif request.compile:
            run_net = compiled_net = compiled_net or torch.compile(net)
        run_net = guide(run_net)
        # Exactly what the sampler receives decides the pixels, so the manifest is derived from it.
        sampler_call = dict(class_idx=class_idx, D=D, **kwargs)
        scheme = request.quantize_scheme if run.bits is not None else None
        granularity = request.quantize_granularity if run.bits is not None else None
        # Per-tensor quantization is all earlier versions did: its folders record no granularity, so they resume.
        granularity_setting = {} if granularity in (None, 'tensor') else {'quantize_granularity': granularity}
        options = dict(precision=_effective_precision(net), channels_last=request.channels_last,
                       compile=request.compile, quantize_bits=run.bits, quantize_scheme=scheme,
                       **granularity_setting, device=device.type, subdirs=request.subdirs, guidance=guidance)
        info = dict(
            network=network_source, network_summary=network_io.network_summary(net), sweep=run.sweep,
            sampler='consistency' if is_consistency else pipeline.sampler_name(kwargs), sampler_kwargs=kwargs,
            nfe_per_image=run.num_steps if is_consistency else pipeline.sampler_nfe(run.num_steps, kwargs),
            class_idx=class_idx,
            pfgmpp=D is not None, D=D, noise_injection_alpha=run.alpha, quantize_bits=run.bits,
            quantize_scheme=scheme, quantize_granularity=granularity,
            quantized_weights=(len(quantize.quantized_weight_names(net)) if run.bits is not None else 0),
            subdirs=request.subdirs, guidance=guidance,
        )

        def settings(network_id: str, call: dict = sampler_call, opts: dict = options) -> dict:
            return manifest_lib.describe_settings(network_id, net, call, **opts)
        _generate_run(run_net, run, request, sampler_call, device, info, functools.partial(settings, content_sha256),
                      lambda: [settings(sha) for sha in file_sha256s()])
        if request.grid and dist.is_main():
            paths = [manifest_lib.image_path(run.outdir, s, request.subdirs) for s in request.seeds[:GRID_MAX_IMAGES]]
            write_grid(paths, grid_path_for(request.grid, run))
            print(f'Wrote grid of {len(paths)} images to "{grid_path_for(request.grid, run)}"')
        dist.barrier()
    dist.print0('Done.')


# ----------------------------------------------------------------------------
# One folder.


def _seed_union(manifest: Optional[dict], seeds: list[int]) -> list[int]:
    """The seeds a folder holds after this run: those its manifest lists plus the new ones, sorted."""
    previous = []
    if manifest is not None and isinstance(manifest.get('seeds'), str) and manifest['seeds']:
        try:
            previous = dnnlib.util.parse_int_list(manifest['seeds'])
        except ValueError:
            previous = []
    return sorted(set(previous) | set(seeds))


def _prepare_folder(run: Run, seeds: list[int], force: bool, settings: dict,
                    legacy_settings: Callable[[], list[dict]], info: dict) -> dict:
    """Rank 0: check that ``run.outdir`` may receive these images (clearing it for --force) and record what makes
    them; returns the manifest written (marked incomplete until the run ends)."""
    previous = None
    if force:
        removed = manifest_lib.clear_generated(run.outdir)
        if removed:
            print(f'--force: deleted {removed} PNG(s) a previous run left in "{run.outdir}"')
    else:
        try:
            previous = manifest_lib.check_resumable(run.outdir, settings, legacy_settings)
        except manifest_lib.ManifestError as err:
            raise GenerationError(f'--outdir {err}; add --force to delete them and start over, or choose another '
                                  f'--outdir') from None
    held = _seed_union(previous, seeds)
    manifest = dict(settings=settings, **dnnlib.util.json_safe(info), seeds=manifest_lib.compact_seeds(held),
                    num_images=len(held), complete=False)
    try:
        manifest_lib.write_manifest(run.outdir, manifest)
    except OSError as err:  # disk full, quota: atomic_write left nothing under the final name
        raise GenerationError(f'--outdir {run.outdir}: cannot write {err.filename or manifest_lib.MANIFEST_NAME} '
                              f'({err.strerror or err})') from None
    return manifest


def _write_batch(net: Any, batch_seeds: list[int], run: Run, subdirs: bool, sampler_call: dict,
                 device: torch.device) -> None:
    images = pipeline.sample_batch(net, batch_seeds, device=device, **sampler_call)  # refuses non-finite samples
    pixels_hwc = pipeline.to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
    for seed, pixels in zip(batch_seeds, pixels_hwc):
        save_png(to_pil(pixels), manifest_lib.image_path(run.outdir, seed, subdirs))


def _generate_run(net: Any, run: Run, request: Request, sampler_call: dict, device: torch.device, info: dict,
                  settings: Callable[[], dict], legacy_settings: Callable[[], list[dict]]) -> None:
    seeds, subdirs = request.seeds, request.subdirs

    # Rank 0 checks the folder, decides what is missing and tells the others, so all ranks split the same list.
    def missing_seeds() -> tuple[list[int], dict]:
        manifest = _prepare_folder(run, seeds, request.force, settings(), legacy_settings, info)
        return [s for s in seeds if not os.path.isfile(manifest_lib.image_path(run.outdir, s, subdirs))], manifest
    todo, manifest = on_main_rank(missing_seeds)
    skipped = len(seeds) - len(todo)
    world, rank = dist.get_world_size(), dist.get_rank()
    my_batches = pipeline.split_batches(todo, request.max_batch_size, world)[rank::world]

    dist.print0(f'Generating {len(todo)} images to "{run.outdir}"' + (f' ({skipped} already there)' if skipped else '')
                + f', {info["nfe_per_image"]} network evaluation{"s" if info["nfe_per_image"] != 1 else ""} each...')
    bar = tqdm(total=len(todo), unit='img', file=sys.stderr, mininterval=1.0, dynamic_ncols=True,
               disable=not dist.is_main() or not todo)
    start = time.time()
    error = None
    try:
        for batch_seeds in my_batches:
            if batch_seeds:
                _write_batch(net, batch_seeds, run, subdirs, sampler_call, device)
            bar.update(min(len(batch_seeds) * world, bar.total - bar.n))  # other ranks move at the same pace
    except ValueError as err:  # the sampler's, the pipeline's non-finite samples, to_pil's
        error = sampler_message(err)
    except torch.cuda.OutOfMemoryError:
        error = (f'out of {device.type} memory sampling {request.max_batch_size} images at once; lower --batch '
                 f'(the images already written are complete, rerun to continue)')
    except OSError as err:
        error = (f'cannot write {err.filename or "under --outdir " + run.outdir} ({err.strerror or err}); the '
                 f'images already written are complete, rerun to continue')
    finally:
        bar.close()  # ends the bar's line, so an error message starts on a line of its own
    _first_failure(error)  # every rank stops here; a failure anywhere fails all, before anything is marked complete
    elapsed = time.time() - start
    if todo:
        dist.print0(f'{len(todo)} images in {elapsed:.1f} s ({len(todo) / max(elapsed, 1e-9):.2f} images/s)')
    if dist.is_main():
        manifest_lib.write_manifest(run.outdir, dict(manifest, complete=True, seconds=round(elapsed, 3)))
