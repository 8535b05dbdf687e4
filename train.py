"""Train a diffusion model (EDM, VP, VE) or a PFGM++ model.

The flags are those of NVIDIA's EDM ``train.py`` with the same meanings and defaults, plus PFGM++'s
``--pfgmpp --aug_dim --stf --rbatch --lsun --nblock --name``, and a few of our own (``--device --precision
--channels-last --compile``, ``--resume=auto``). The options become one configuration dict, saved as
``training_options.json`` in the run directory and passed to ``training.training_loop.training_loop``.

Examples::

    # PFGM++ (D=128) on CIFAR-10 with the DDPM++ network, 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --outdir=runs --data=datasets/cifar10-32x32.zip \\
        --cond=0 --arch=ddpmpp --pfgmpp=1 --aug_dim=128

    # Continue the newest training state of the matching run in training-runs (or start one)
    python train.py --outdir=runs --data=... --resume=auto
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import warnings
from typing import Any, Optional

import click

import dnnlib

# DDP on recent PyTorch warns about bucket view strides for channels-last parameters; the warning is harmless.
warnings.filterwarnings('ignore', 'Grad strides do not match bucket view strides')

#: Network presets of ``--arch`` (EDM's train.py).
ARCH_PRESETS: dict[str, dict[str, Any]] = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                   decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual',
                   decoder_type='standard', channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    'adm': dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
}
#: ``--precond`` -> (preconditioner, loss).
PRECOND_CLASSES = {
    'vp': ('training.networks.VPPrecond', 'training.loss.VPLoss'),
    've': ('training.networks.VEPrecond', 'training.loss.VELoss'),
    'edm': ('training.networks.EDMPrecond', 'training.loss.EDMLoss'),
}
#: Augmentation probability multipliers that ``--augment`` turns on (9 augmentation labels).
AUGMENT_SETTINGS = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
AUGMENT_LABEL_DIM = 9

#: Adam's remaining hyperparameters (EDM's). The fused kernel (CPU and CUDA) does the same update in one pass over
#: the parameters, where the default per-tensor loop makes several; that matters most on CPU.
ADAM_SETTINGS = dict(betas=[0.9, 0.999], eps=1e-8, fused=True)
#: Flags that override a network preset entry when given.
NETWORK_OVERRIDES = (('cbase', 'model_channels'), ('cres', 'channel_mult'), ('nblock', 'num_blocks'),
                     ('attn', 'attn_resolutions'))

PROCESS_COUNT_IN_DESC = re.compile(r'-gpus\d+-')


def _float_list(value: str, flag: str) -> list[float]:
    """'0.05,0.1' -> [0.05, 0.1]; a one-line usage error names ``flag`` otherwise."""
    try:
        numbers = [float(item) for item in str(value).split(',') if item.strip()]
    except ValueError:
        raise click.UsageError(f'{flag} {value}: expected comma-separated numbers such as 0.05,0.1') from None
    if not numbers:
        raise click.UsageError(f'{flag}: no numbers given')
    return numbers


def _int_list(value: Any) -> Optional[list[int]]:
    if value is None:
        return None
    try:
        return dnnlib.util.parse_int_list(value, name='--cres')
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


def _attn_list(value: Optional[str]) -> Optional[list[int]]:
    """--attn: resolutions that get self-attention, or "none" (small images, where attention at full resolution
    is the costliest layer of the U-Net)."""
    if value is None:
        return None
    if value.strip().lower() == 'none':
        return []
    try:
        return dnnlib.util.parse_int_list(value, name='--attn')
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


# ----------------------------------------------------------------------------
# Run directories and resume files.


def _run_dirs(outdir: str, desc: str) -> list[tuple[int, str]]:
    """Existing run directories ``{id:05d}-{desc}`` under ``outdir``, as (id, path).

    The process count in the name (``-gpus{N}-``) is not compared: a run continues on any number of nodes.
    """
    def kind(name: str) -> str:
        return PROCESS_COUNT_IN_DESC.sub('-gpus*-', name, count=1)

    found = []
    if os.path.isdir(outdir):
        for name in os.listdir(outdir):
            match = re.fullmatch(r'(\d+)-(.*)', name)
            if match and kind(match.group(2)) == kind(desc) and os.path.isdir(os.path.join(outdir, name)):
                found.append((int(match.group(1)), os.path.join(outdir, name)))
    return sorted(found)


def _next_run_dir(outdir: str, desc: str) -> str:
    ids = []
    if os.path.isdir(outdir):
        for name in os.listdir(outdir):
            match = re.match(r'\d+', name)
            if match and os.path.isdir(os.path.join(outdir, name)):
                ids.append(int(match.group()))
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')


def _choose_run_dir(opts: dnnlib.EasyDict, desc: str) -> tuple[str, Optional[str]]:
    """(run directory, training state to resume or None) following --outdir/--nosubdir/--name/--resume."""
    if opts.nosubdir:
        fixed = opts.outdir
    elif opts.name:
        fixed = os.path.join(opts.outdir, opts.name)
    else:
        fixed = None
    if opts.resume != 'auto':
        return fixed or _next_run_dir(opts.outdir, desc), opts.resume
    from training.training_state import newest_state
    candidates = [fixed] if fixed else [path for _id, path in reversed(_run_dirs(opts.outdir, desc))]
    for run_dir in candidates:
        state = newest_state(run_dir)
        if state is not None:
            return run_dir, state
    return fixed or _next_run_dir(opts.outdir, desc), None


# ----------------------------------------------------------------------------
# Options -> configuration.


def _check_options(opts: dnnlib.EasyDict) -> None:
    """Checks that need no dataset and no process group; each failure is one line naming the flag."""
    from training import pfgmpp
    try:
        pfgmpp.flags_D(True, opts.aug_dim)  # also without --pfgmpp: a bad value is a typo whatever is trained
    except ValueError as err:
        raise click.UsageError(f'--aug_dim: {err}') from None
    if opts.transfer is not None and opts.resume is not None:
        raise click.UsageError('--transfer and --resume cannot be used together (resume continues a run, '
                               'transfer starts a new one from a snapshot)')
    if opts.precision is not None and opts.fp16 and opts.precision != 'fp16':
        raise click.UsageError(f'--fp16=1 contradicts --precision={opts.precision}; give only one of them')
    if opts.lsun and opts.precond != 'edm':
        raise click.UsageError('--lsun rescales the EDM noise levels and needs --precond=edm')
    if opts.stf and opts.batch_gpu is not None:
        raise click.UsageError('--stf loads the whole --rbatch per process and cannot be combined with --batch-gpu')
    if opts.stf and opts.rbatch < opts.batch:
        raise click.UsageError(f'--rbatch ({opts.rbatch}) must be at least --batch ({opts.batch}) with --stf')
    if opts.resume is not None and opts.resume != 'auto':
        from training.training_state import state_kimg
        if state_kimg(opts.resume) is None:
            raise click.UsageError(f'--resume {opts.resume}: expected a training-state-<kimg>.pt file from a '
                                   f'previous run, or "auto"')
        if not os.path.isfile(opts.resume):
            raise click.UsageError(f'--resume {opts.resume}: no such file')
    if opts.phema is not None:
        from training import phema
        try:
            opts.phema = phema.check_sigma_rel_list(_float_list(opts.phema, '--phema'))
        except phema.PhemaError as err:
            raise click.UsageError(str(err)) from None
    if opts.label_dropout and not opts.cond:
        raise click.UsageError('--label-dropout trains classifier-free guidance and needs class labels (--cond=1)')
    if opts.transfer is not None and not dnnlib.util.is_url(opts.transfer) and not os.path.isfile(opts.transfer):
        raise click.UsageError(f'--transfer {opts.transfer}: no such file (expected a network-snapshot .pkl)')
    if opts.tensorboard and importlib.util.find_spec('tensorboard') is None:
        raise click.UsageError('--tensorboard needs the optional tensorboard package: pip install tensorboard')


def _describe_dataset(c: dnnlib.EasyDict, opts: dnnlib.EasyDict) -> str:
    """Open the dataset once to validate it and pin its resolution and size; returns its name."""
    from training.dataset import DatasetError
    try:
        dataset = dnnlib.util.construct_class_by_name(**dict(c.dataset_kwargs, use_labels=False))
        name, size, resolution = dataset.name, len(dataset), dataset.resolution
        del dataset
    except (OSError, DatasetError) as err:
        raise click.ClickException(f'--data: {err}') from None
    if size == 0:
        raise click.ClickException(f'--data {opts.data}: the dataset contains no images')
    if opts.cond:
        try:
            labelled = dnnlib.util.construct_class_by_name(**c.dataset_kwargs)
            has_labels = labelled.has_labels
            del labelled
        except DatasetError as err:
            raise click.ClickException(f'--cond=1 needs class labels in dataset.json ({err})') from None
        if not has_labels:
            raise click.ClickException(f'--cond=1 needs class labels, but {opts.data} has none in dataset.json')
    c.dataset_kwargs.resolution = resolution
    c.dataset_kwargs.max_size = size
    return name


def _check_depth(c: dnnlib.EasyDict, opts: dnnlib.EasyDict) -> None:
    """The U-Net's levels (--cres) must fit the dataset's resolution (training.networks.check_unet_depth)."""
    from training.networks import check_unet_depth
    try:
        check_unet_depth(c.dataset_kwargs.resolution, c.network_kwargs.channel_mult)
    except ValueError as err:
        cres = ','.join(map(str, c.network_kwargs.channel_mult))
        source = '' if opts.cres is not None else f' (the default of --arch={opts.arch})'
        raise click.UsageError(f'--cres={cres}{source} does not fit the {opts.data} images: {err}; give '
                               f'--cres fewer entries or resize the images') from None


def _precision(opts: dnnlib.EasyDict) -> str:
    """fp32, fp16 or bf16 from --precision, or from the original --fp16 flag."""
    return opts.precision or ('fp16' if opts.fp16 else 'fp32')


def _cpu_precision(opts: dnnlib.EasyDict, device: Any) -> Optional[str]:
    """Settle the precision the U-Net can train in on ``device`` (updates ``opts.precision``); returns the line to print.

    fp16 stays CUDA-only as in the original (the network keeps ``use_fp16`` for CUDA use, and trains fp32 on CPU);
    bf16 on a CPU without oneDNN bfloat16 kernels trains fp32 (``torch_utils.cpu_support``).
    """
    from torch_utils import cpu_support
    precision = _precision(opts)
    if device.type != 'cpu':
        return None
    if precision == 'fp16':
        return ('Precision: fp16 is CUDA-only (as the original --fp16); on CPU the U-Net trains in fp32 '
                '(--precision=bf16 gives reduced precision on CPUs with bf16 kernels).')
    used, reason = cpu_support.supported_precision(precision, device)
    if reason is not None:
        opts.precision = used
    return reason


def _check_batch(opts: dnnlib.EasyDict, world: int) -> None:
    if opts.batch % world != 0:
        raise click.UsageError(f'--batch {opts.batch} must be divisible by the number of processes ({world})')
    per_rank = opts.batch // world
    if opts.batch_gpu is not None and opts.batch_gpu < per_rank and per_rank % opts.batch_gpu != 0:
        raise click.UsageError(f'--batch {opts.batch} must be divisible by processes ({world}) x --batch-gpu '
                               f'({opts.batch_gpu}) = {world * opts.batch_gpu}')


def build_config(opts: dnnlib.EasyDict, world: int) -> tuple[dnnlib.EasyDict, str]:
    """The training-loop configuration and the run description ``{dataset}-{cond}-{arch}-...``."""
    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=opts.data,
                                       use_labels=opts.cond, xflip=opts.xflip, cache=opts.cache)
    c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=True, num_workers=opts.workers)
    if opts.workers > 0:
        # Workers are spawned, not forked: forking a process that has touched CUDA is unsafe.
        c.data_loader_kwargs.update(prefetch_factor=2, multiprocessing_context='spawn')
    net_class, loss_class = PRECOND_CLASSES[opts.precond]
    c.network_kwargs = dnnlib.EasyDict(ARCH_PRESETS[opts.arch], class_name=net_class)
    c.loss_kwargs = dnnlib.EasyDict(class_name=loss_class)
    if opts.lsun:
        from training.loss import LSUN_SIGMA_SCALE
        c.loss_kwargs.sigma_scale = LSUN_SIGMA_SCALE
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr, **ADAM_SETTINGS)

    dataset_name = _describe_dataset(c, opts)

    for flag, key in NETWORK_OVERRIDES:
        if opts[flag] is not None:
            c.network_kwargs[key] = opts[flag]
    _check_depth(c, opts)
    if opts.augment:
        c.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=opts.augment,
                                           **AUGMENT_SETTINGS)
        c.network_kwargs.augment_dim = AUGMENT_LABEL_DIM
    precision = _precision(opts)
    c.network_kwargs.update(dropout=opts.dropout, use_fp16=precision == 'fp16')
    if opts.label_dropout:
        # The U-Net zeroes whole label vectors from the global generator, which the loop seeds per micro-batch.
        c.network_kwargs.label_dropout = opts.label_dropout
    if precision == 'bf16':
        # bf16 also on CPU (native bf16 dot products on recent x86); fp16 stays CUDA-only, as the original's --fp16.
        c.network_kwargs.update(use_bf16=True, reduced_precision_on_cpu=True)

    c.total_kimg = opts.duration * 1000
    c.lr_rampup_kimg = opts.lr_rampup
    c.ema_halflife_kimg = opts.ema * 1000
    if opts.phema:
        c.phema_stds = list(opts.phema)
    from training import pfgmpp
    c.update(D=pfgmpp.flags_D(opts.pfgmpp, opts.aug_dim), stf=opts.stf, rbatch=opts.rbatch)
    c.batch_size, c.batch_gpu, c.loss_scaling = opts.batch, opts.batch_gpu, opts.ls
    c.kimg_per_tick, c.snapshot_ticks, c.state_dump_ticks = opts.tick, opts.snap, opts.dump
    c.snapshot_format = opts.snap_format
    c.cudnn_benchmark, c.channels_last, c.compile = opts.bench, opts.channels_last, opts.compile
    if opts.tensorboard:
        c.tensorboard = True
    if opts.transfer is not None:
        c.resume_pkl = opts.transfer
        c.ema_rampup_ratio = None

    cond = 'cond' if opts.cond else 'uncond'
    desc = f'{dataset_name}-{cond}-{opts.arch}-{opts.precond}-gpus{world}-batch{opts.batch}-{precision}'
    if opts.desc is not None:
        desc += f'-{opts.desc}'
    return c, desc


def _prepare_run_dir(c: dnnlib.EasyDict) -> None:
    """Create the run directory and write training_options.json (one-line errors)."""
    try:
        dnnlib.util.check_writable_dir(c.run_dir, flag='--outdir')
    except OSError as err:
        raise click.ClickException(str(err)) from None
    try:
        with dnnlib.util.atomic_write(os.path.join(c.run_dir, 'training_options.json'), 'w') as f:
            json.dump(c, f, indent=2)
    except OSError as err:
        raise click.ClickException(f'--outdir {c.run_dir}: cannot write training_options.json '
                                   f'({err.strerror or err})') from None


# ----------------------------------------------------------------------------


@click.command()
# Main options.
@click.option('--outdir', help='Parent directory of the run directories', metavar='DIR', type=str, required=True)
@click.option('--data', help='Training set (dataset_tool ZIP or folder)', metavar='ZIP|DIR', type=str, required=True)
@click.option('--cond', help='Train class-conditional model', metavar='BOOL', type=bool, default=False,
              show_default=True)
@click.option('--arch', help='Network architecture', type=click.Choice(list(ARCH_PRESETS)), default='ddpmpp',
              show_default=True)
@click.option('--precond', help='Preconditioning & loss function', type=click.Choice(list(PRECOND_CLASSES)),
              default='edm', show_default=True)
@click.option('--pfgmpp', '--pfgmv2', 'pfgmpp', help='Train PFGM++ instead of a diffusion model (--pfgmv2: the '
              'PFGM++ fork\'s early name)', metavar='BOOL', type=bool, default=False, show_default=True)
@dnnlib.util.refused_option('--align', type=bool, script='train.py', advice=(
    '--align=1 scaled sigma by sqrt(1+N/D), an early alignment its release dropped; this train.py trains the '
    'released r = sigma*sqrt(D) alignment: drop the flag and give --pfgmpp=1 --aug_dim=D'))
@dnnlib.util.refused_option('--align_precond', type=bool, script='train.py', advice=(
    '--align_precond=1 is an early preconditioning variant its release dropped: drop the flag (the released '
    'PFGM++ uses EDM\'s preconditioning with sigma = r/sqrt(D))'))
@click.option('--aug_dim', help='PFGM++ augmented dimensions D', metavar='INT', type=int, default=128,
              show_default=True)
@click.option('--stf', help='Stable target field (reference-batch targets)', metavar='BOOL', type=bool,
              default=False, show_default=True)
@click.option('--rbatch', help='STF reference batch per process', metavar='INT', type=click.IntRange(min=1),
              default=4096, show_default=True)
@click.option('--lsun', help='Scale noise levels for LSUN 256x256 (PFGM++)', metavar='BOOL', type=bool,
              default=False, show_default=True)
# Hyperparameters.
@click.option('--duration', help='Training duration', metavar='MIMG', type=dnnlib.util.float_range(min=0, min_open=True),
              default=200, show_default=True)
@click.option('--batch', help='Total batch size', metavar='INT', type=click.IntRange(min=1), default=512,
              show_default=True)
@click.option('--batch-gpu', help='Limit batch size per process', metavar='INT', type=click.IntRange(min=1))
@click.option('--cbase', help='Channel multiplier  [default: varies]', metavar='INT', type=click.IntRange(min=1))
@click.option('--cres', help='Channels per resolution  [default: varies]', metavar='LIST',
              callback=lambda _ctx, _param, value: _int_list(value))
@click.option('--nblock', help='Residual blocks per resolution  [default: varies]', metavar='INT',
              type=click.IntRange(min=1))
@click.option('--attn', help='Resolutions with self-attention, or none  [default: varies]', metavar='LIST|none',
              callback=lambda _ctx, _param, value: _attn_list(value))
@click.option('--lr', help='Learning rate', metavar='FLOAT', type=dnnlib.util.float_range(min=0, min_open=True),
              default=10e-4, show_default=True)
@click.option('--lr-rampup', help='Learning-rate warm-up length', metavar='KIMG', type=dnnlib.util.float_range(min=0),
              default=10000, show_default=True)
@click.option('--ema', help='EMA half-life', metavar='MIMG', type=dnnlib.util.float_range(min=0), default=0.5,
              show_default=True)
@click.option('--phema', help='Also track power-function EMAs for post-hoc EMA (reconstruct_phema.py)',
              metavar='STD,...', type=str, default=None)
@click.option('--label-dropout', 'label_dropout', help='Drop class labels with this probability (for CFG)',
              metavar='FLOAT', type=dnnlib.util.float_range(min=0, max=1, max_open=True), default=0, show_default=True)
@click.option('--dropout', help='Dropout probability', metavar='FLOAT', type=dnnlib.util.float_range(min=0, max=1),
              default=0.13, show_default=True)
@click.option('--augment', help='Augment probability', metavar='FLOAT', type=dnnlib.util.float_range(min=0, max=1),
              default=0.12, show_default=True)
@click.option('--xflip', help='Enable dataset x-flips', metavar='BOOL', type=bool, default=False,
              show_default=True)
# Performance-related.
@click.option('--fp16', help='Enable mixed-precision training', metavar='BOOL', type=bool, default=False,
              show_default=True)
@click.option('--precision', help='U-Net precision (fp16 = --fp16=1)  [default: fp32]',
              type=click.Choice(['fp32', 'fp16', 'bf16']))
@click.option('--ls', help='Loss scaling', metavar='FLOAT', type=dnnlib.util.float_range(min=0, min_open=True), default=1,
              show_default=True)
@click.option('--bench', help='Enable cuDNN benchmarking', metavar='BOOL', type=bool, default=True,
              show_default=True)
@click.option('--cache', help='Cache dataset in CPU memory', metavar='BOOL', type=bool, default=True,
              show_default=True)
@click.option('--workers', help='DataLoader worker processes (0 = load in the main process)', metavar='INT',
              type=click.IntRange(min=0), default=1, show_default=True)
@click.option('--device', help='Training device  [default: cuda if available]', type=click.Choice(['cpu', 'cuda']))
@click.option('--channels-last', help='Channels-last memory layout', metavar='BOOL', type=bool, default=False,
              show_default=True)
@click.option('--tensorboard', help='Also write the stats.jsonl scalars as TensorBoard events (optional extra)',
              is_flag=True)
@click.option('--compile', help='torch.compile the network', metavar='BOOL', type=bool, default=False,
              show_default=True)
# I/O-related.
@click.option('--desc', help='Suffix for the run directory name', metavar='STR', type=str)
@click.option('--nosubdir', help='Write into --outdir itself, no numbered run directory', is_flag=True)
@click.option('--name', help='Run directory name under --outdir (instead of a numbered one)', metavar='STR',
              type=str)
@click.option('--tick', help='How often to print progress', metavar='KIMG',
              type=dnnlib.util.float_range(min=0, min_open=True), default=50, show_default=True)
@click.option('--snap', help='How often to save snapshots', metavar='TICKS', type=click.IntRange(min=1), default=50,
              show_default=True)
@click.option('--snap-format', 'snap_format', help='Snapshot files: pickle, weights-only (.weights.pt) or both',
              type=click.Choice(['pkl', 'weights', 'both']), default='pkl', show_default=True)
@click.option('--dump', help='How often to dump state (EDM\'s default holds; the PFGM++ fork\'s train.py used 50)',
              metavar='TICKS', type=click.IntRange(min=1), default=500, show_default=True)
@click.option('--seed', help='Seed of every random stream  [default: random]', metavar='INT', type=int)
@click.option('--transfer', help='Start from the weights of a network snapshot', metavar='PKL|URL', type=str)
@click.option('--resume', help='Resume from previous training state ("auto": newest in the run dir)',
              metavar='PT|auto', type=str)
@click.option('-n', '--dry-run', help='Validate, print the options and stop', is_flag=True)
def main(**kwargs: Any) -> None:
    """Train a diffusion-based or PFGM++ generative model.

    \b
    # DDPM++ with PFGM++ (D=128) on CIFAR-10, 8 GPUs:
    torchrun --standalone --nproc_per_node=8 train.py --outdir=runs --data=datasets/cifar10-32x32.zip \\
        --arch=ddpmpp --pfgmpp=1 --aug_dim=128
    """
    opts = dnnlib.EasyDict(kwargs)
    _check_options(opts)

    from torch_utils import distributed as dist
    from torch_utils import host_memory
    from training import training_loop
    from training.training_state import state_kimg

    host_memory.retain_freed_host_memory()
    try:
        device = dist.init(opts.device)
    except RuntimeError as err:
        raise click.UsageError(f'--device: {err}') from None
    failed = False
    try:
        for note in (dist.limit_intra_op_threads(device), _cpu_precision(opts, device)):
            if note:
                dist.print0(note)
        world = dist.get_world_size()
        _check_batch(opts, world)
        c, desc = build_config(opts, world)

        if opts.seed is not None:
            c.seed = opts.seed
        else:
            c.seed = dist.broadcast_object(int.from_bytes(os.urandom(4), 'little') % (1 << 31))

        run_dir, state = _choose_run_dir(opts, desc) if dist.is_main() else (None, None)
        run_dir, state = dist.broadcast_object((run_dir, state))
        c.run_dir = run_dir
        if state is not None:
            kimg = state_kimg(state)
            c.resume_state_dump = state
            c.resume_kimg = kimg if kimg is not None else 0

        precision = _precision(opts)
        summary = [
            ('Run directory', c.run_dir),
            ('Dataset', f'{c.dataset_kwargs.path} ({"class-conditional" if opts.cond else "unconditional"})'),
            ('Architecture / precond', f'{opts.arch} / {opts.precond}'),
            ('Model', 'diffusion' if c.D is None else f'PFGM++ with D={c.D}'),
            ('Processes', f'{world} on {device.type}'),
            ('Batch', f'{c.batch_size} per step'),
            ('Precision', precision),
        ]
        if opts.resume == 'auto':
            summary.append(('Resume', state or 'nothing to resume, starting a new run'))
        dist.print0(f'\nResolved options:\n{json.dumps(c, indent=2)}\n')
        for label, value in summary:
            dist.print0(f'{label + ":":<25}{value}')
        dist.print0()
        if opts.dry_run:
            dist.print0('Dry run: nothing was written.')
            return

        dist.print0('Preparing the run directory...')
        logger = None
        # Rank 0 prepares the folder; its error stops every rank (the others would wait for it forever).
        error = None
        if dist.is_main():
            try:
                _prepare_run_dir(c)
            except click.ClickException as err:
                error = err.format_message()
        error = dist.broadcast_object(error)
        if error is not None:
            raise click.ClickException(error)
        if dist.is_main():
            logger = dnnlib.util.Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a')
        try:
            training_loop.training_loop(**c, device=device)
        except training_loop.TrainingError as err:
            raise click.ClickException(str(err)) from None
        finally:
            if logger is not None:
                logger.close()
    except BaseException:
        failed = True
        raise
    finally:
        # After a failure another rank may never reach the shutdown barrier (it was killed, or failed on its own):
        # leave without waiting; the process exit closes the group and torchrun ends the job naming the rank.
        if not (failed and dist.is_distributed()):
            dist.shutdown()


if __name__ == '__main__':
    dnnlib.util.run_click_command(main)  # under torchrun, errors are printed by rank 0 only
