"""train.py's options -> the training-loop configuration, with the checks that need no process group.

The configuration is the dict :func:`training.training_loop.training_loop` takes and ``training_options.json``
records (its keys are read by other tools and stay as EDM's train.py writes them). :func:`run_identity` reduces it
to what must not change when a run continues (dataset, architecture, preconditioner and loss, PFGM++ D,
conditioning); everything else (batch, per-process batch, process count, learning rate, durations, precision...)
may change on resume and is reported by :func:`option_changes`.

Errors are :class:`OptionError` (a flag that does not fit: train.py reports it as a usage error) or
:class:`InputError` (a file or dataset that does not fit); both are one line naming the flag.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping, Optional

import dnnlib

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

#: Entries of the dataset options that identify the training set (its path may move between launches).
IDENTITY_DATASET_KEYS = ('class_name', 'use_labels', 'xflip', 'resolution', 'max_size')
#: Network options that do not change the weights' meaning: a run may continue with other values.
RUNTIME_NETWORK_KEYS = frozenset({'use_fp16', 'use_bf16', 'reduced_precision_on_cpu', 'dropout', 'label_dropout'})
#: Configuration entries that differ between launches by nature and are not reported as changes.
PER_LAUNCH_KEYS = frozenset({'run_dir', 'resume_state_dump', 'resume_kimg'})


class OptionError(ValueError):
    """A flag (or combination of flags) that cannot work; one line naming the flag."""


class InputError(ValueError):
    """A dataset or file named by a flag that does not fit; one line naming the flag."""


def float_list(value: str, flag: str) -> list[float]:
    """'0.05,0.1' -> [0.05, 0.1].

    Raises:
        OptionError: not comma-separated numbers, or none at all.
    """
    try:
        numbers = [float(item) for item in str(value).split(',') if item.strip()]
    except ValueError:
        raise OptionError(f'{flag} {value}: expected comma-separated numbers such as 0.05,0.1') from None
    if not numbers:
        raise OptionError(f'{flag}: no numbers given')
    return numbers


def check_options(opts: dnnlib.EasyDict) -> None:
    """Checks that need no dataset and no process group (``opts``: train.py's flags by name).

    Normalises ``opts.phema`` into a list of sigma_rel values.

    Raises:
        OptionError: the first flag that does not fit, in one line.
    """
    from training import pfgmpp, training_state
    try:
        pfgmpp.flags_D(True, opts.aug_dim)  # also without --pfgmpp: a bad value is a typo whatever is trained
    except ValueError as err:
        raise OptionError(f'--aug_dim: {err}') from None
    if opts.transfer is not None and opts.resume is not None:
        raise OptionError('--transfer and --resume cannot be used together (resume continues a run, '
                          'transfer starts a new one from a snapshot)')
    if opts.precision is not None and opts.fp16 and opts.precision != 'fp16':
        raise OptionError(f'--fp16=1 contradicts --precision={opts.precision}; give only one of them')
    if opts.lsun and opts.precond != 'edm':
        raise OptionError('--lsun rescales the EDM noise levels and needs --precond=edm')
    if opts.stf and opts.batch_gpu is not None:
        raise OptionError('--stf loads the whole --rbatch per process and cannot be combined with --batch-gpu')
    if opts.stf and opts.rbatch < opts.batch:
        raise OptionError(f'--rbatch ({opts.rbatch}) must be at least --batch ({opts.batch}) with --stf')
    if opts.resume is not None and opts.resume != 'auto':
        if training_state.state_kimg(opts.resume) is None:
            raise OptionError(f'--resume {opts.resume}: expected a training-state-<kimg>.pt file from a '
                              f'previous run, or "auto"')
        if not os.path.isfile(opts.resume):
            raise OptionError(f'--resume {opts.resume}: no such file')
    if opts.phema is not None and not isinstance(opts.phema, list):
        from training import phema
        try:
            opts.phema = phema.check_sigma_rel_list(float_list(opts.phema, '--phema'))
        except phema.PhemaError as err:
            raise OptionError(str(err)) from None
    if opts.label_dropout and not opts.cond:
        raise OptionError('--label-dropout trains classifier-free guidance and needs class labels (--cond=1)')
    if opts.transfer is not None and not dnnlib.util.is_url(opts.transfer) and not os.path.isfile(opts.transfer):
        raise OptionError(f'--transfer {opts.transfer}: no such file (expected a network-snapshot .pkl)')
    _check_consistency_options(opts)
    if opts.tensorboard and importlib.util.find_spec('tensorboard') is None:
        raise OptionError('--tensorboard needs the optional tensorboard package: pip install tensorboard')


def _check_consistency_options(opts: dnnlib.EasyDict) -> None:
    """--consistency and --init: one needs the other, and the architecture flags belong to the snapshot."""
    if not opts.get('consistency'):
        if opts.get('init') is not None:
            raise OptionError('--init is the snapshot that --consistency=1 tunes; to start an ordinary run from a '
                              'snapshot\'s weights use --transfer')
        return
    if opts.init is None:
        raise OptionError('--consistency=1 needs --init=PKL, the trained snapshot (EDM or PFGM++) to tune')
    if opts.transfer is not None:
        raise OptionError('--consistency=1 takes its network from --init; drop --transfer')
    if opts.stf:
        raise OptionError('--consistency=1 does not use a stable target field; drop --stf')
    for flag in ('cbase', 'cres', 'nblock', 'attn'):
        if opts[flag] is not None:
            raise OptionError(f'--{flag}: with --consistency=1 the architecture comes from --init; drop --{flag}')
    if not dnnlib.util.is_url(opts.init) and not os.path.isfile(opts.init):
        raise OptionError(f'--init {opts.init}: no such file (expected a network snapshot .pkl or .weights.pt)')


def precision(opts: Mapping[str, Any]) -> str:
    """fp32, fp16 or bf16 from --precision, or from the original --fp16 flag."""
    return opts['precision'] or ('fp16' if opts['fp16'] else 'fp32')


def cpu_precision(opts: dnnlib.EasyDict, device: Any) -> Optional[str]:
    """Settle the precision the U-Net can train in on ``device`` (updates ``opts.precision``); returns the line to
    print, or None.

    fp16 stays CUDA-only as in the original (the network keeps ``use_fp16`` for CUDA use, and trains fp32 on CPU);
    bf16 on a CPU without oneDNN bfloat16 kernels trains fp32 (``torch_utils.cpu_support``).
    """
    from torch_utils import cpu_support
    wanted = precision(opts)
    if device.type != 'cpu':
        return None
    if wanted == 'fp16':
        return ('Precision: fp16 is CUDA-only (as the original --fp16); on CPU the U-Net trains in fp32 '
                '(--precision=bf16 gives reduced precision on CPUs with bf16 kernels).')
    used, reason = cpu_support.supported_precision(wanted, device)
    if reason is not None:
        opts.precision = used
    return reason


def check_batch(opts: Mapping[str, Any], world: int) -> None:
    """--batch must split evenly between ``world`` processes and their --batch-gpu micro-batches.

    Raises:
        OptionError: it does not.
    """
    batch, batch_gpu = opts['batch'], opts['batch_gpu']
    if batch % world != 0:
        raise OptionError(f'--batch {batch} must be divisible by the number of processes ({world})')
    per_rank = batch // world
    if batch_gpu is not None and batch_gpu < per_rank and per_rank % batch_gpu != 0:
        raise OptionError(f'--batch {batch} must be divisible by processes ({world}) x --batch-gpu '
                          f'({batch_gpu}) = {world * batch_gpu}')


def _describe_dataset(c: dnnlib.EasyDict, opts: Mapping[str, Any]) -> tuple[str, int, int]:
    """Open the dataset once to validate it and pin its resolution and size; returns its name, channel count
    and label dimension (0 without --cond)."""
    from training.dataset import DatasetError
    label_dim = 0
    try:
        dataset = dnnlib.util.construct_class_by_name(**dict(c.dataset_kwargs, use_labels=False))
        name, size, resolution, channels = dataset.name, len(dataset), dataset.resolution, dataset.num_channels
        del dataset
    except (OSError, DatasetError) as err:
        raise InputError(f'--data: {err}') from None
    if size == 0:
        raise InputError(f'--data {opts["data"]}: the dataset contains no images')
    if opts['cond']:
        try:
            labelled = dnnlib.util.construct_class_by_name(**c.dataset_kwargs)
            has_labels, label_dim = labelled.has_labels, labelled.label_dim
            del labelled
        except DatasetError as err:
            raise InputError(f'--cond=1 needs class labels in dataset.json ({err})') from None
        if not has_labels:
            raise InputError(f'--cond=1 needs class labels, but {opts["data"]} has none in dataset.json')
    c.dataset_kwargs.resolution = resolution
    c.dataset_kwargs.max_size = size
    return name, channels, label_dim


def _check_depth(c: dnnlib.EasyDict, opts: Mapping[str, Any]) -> None:
    """The U-Net's levels (--cres) must fit the dataset's resolution (training.networks.check_unet_depth)."""
    from training.networks import check_unet_depth
    try:
        check_unet_depth(c.dataset_kwargs.resolution, c.network_kwargs.channel_mult)
    except ValueError as err:
        cres = ','.join(map(str, c.network_kwargs.channel_mult))
        source = '' if opts['cres'] is not None else f' (the default of --arch={opts["arch"]})'
        raise OptionError(f'--cres={cres}{source} does not fit the {opts["data"]} images: {err}; give '
                          f'--cres fewer entries or resize the images') from None


def build_config(opts: dnnlib.EasyDict, world: int) -> tuple[dnnlib.EasyDict, str]:
    """The training-loop configuration and the run description ``{dataset}-{cond}-{arch}-...`` for ``world``
    processes. Opens the dataset once.

    Raises:
        OptionError: the network does not fit the images.
        InputError: the dataset cannot be read, is empty, or lacks the labels --cond=1 needs.
    """
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

    dataset_name, channels, label_dim = _describe_dataset(c, opts)
    if opts.get('consistency'):
        D = _consistency_network(c, opts, channels, label_dim)
        model = 'consistency'
    else:
        D = _network(c, opts)
        model = f'{opts.arch}-{opts.precond}'

    c.total_kimg = opts.duration * 1000
    c.lr_rampup_kimg = opts.lr_rampup
    c.ema_halflife_kimg = opts.ema * 1000
    if opts.phema:
        c.phema_stds = list(opts.phema)
    c.update(D=D, stf=opts.stf, rbatch=opts.rbatch)
    c.batch_size, c.batch_gpu, c.loss_scaling = opts.batch, opts.batch_gpu, opts.ls
    c.kimg_per_tick, c.snapshot_ticks, c.state_dump_ticks = opts.tick, opts.snap, opts.dump
    c.snapshot_format = opts.snap_format
    c.cudnn_benchmark, c.channels_last, c.compile = opts.bench, opts.channels_last, opts.compile
    if opts.tensorboard:
        c.tensorboard = True
    if opts.transfer is not None or opts.get('init') is not None:
        # --init: the teacher's weights start the run (a training state, when resuming, replaces them).
        c.resume_pkl = opts.transfer if opts.transfer is not None else opts.init
        c.ema_rampup_ratio = None

    cond = 'cond' if opts.cond else 'uncond'
    desc = f'{dataset_name}-{cond}-{model}-gpus{world}-batch{opts.batch}-{precision(opts)}'
    if opts.desc is not None:
        desc += f'-{opts.desc}'
    return c, desc


def _network(c: dnnlib.EasyDict, opts: dnnlib.EasyDict) -> Optional[float]:
    """The network and augmentation options of an ordinary run (--arch, --precond and their overrides); returns
    the kernel D of --pfgmpp/--aug_dim."""
    for flag, key in NETWORK_OVERRIDES:
        if opts[flag] is not None:
            c.network_kwargs[key] = opts[flag]
    _check_depth(c, opts)
    if opts.augment:
        c.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=opts.augment,
                                           **AUGMENT_SETTINGS)
        c.network_kwargs.augment_dim = AUGMENT_LABEL_DIM
    used_precision = precision(opts)
    c.network_kwargs.update(dropout=opts.dropout, use_fp16=used_precision == 'fp16')
    if opts.label_dropout:
        # The U-Net zeroes whole label vectors from the global generator, which the loop seeds per micro-batch.
        c.network_kwargs.label_dropout = opts.label_dropout
    if used_precision == 'bf16':
        # bf16 also on CPU (native bf16 dot products on recent x86); fp16 stays CUDA-only, as the original's --fp16.
        c.network_kwargs.update(use_bf16=True, reduced_precision_on_cpu=True)
    from training import pfgmpp
    return pfgmpp.flags_D(opts.pfgmpp, opts.aug_dim)


def _consistency_network(c: dnnlib.EasyDict, opts: dnnlib.EasyDict, channels: int,
                         label_dim: int) -> Optional[float]:
    """The network, loss and augmentation options of --consistency=1; returns the snapshot's kernel D.

    The network is a ``training.consistency.ConsistencyModel`` around the --init snapshot's denoiser (its class,
    constructor keywords and kernel D; the loop copies the weights when it starts), trained with
    ``training.consistency.ConsistencyLoss``; --dropout, --precision and --label-dropout apply to the denoiser.
    Augmentation is on (--augment) when the snapshot's network takes augmentation labels, off otherwise.

    Raises:
        InputError: --init cannot be read, is not a preconditioner, or does not fit the --data images.
        OptionError: --pfgmpp/--aug_dim contradict the snapshot's kernel.
    """
    from formats.network_io import NetworkLoadError, load_network
    from training import consistency, pfgmpp
    try:
        teacher = load_network(opts.init, device='cpu')
        denoiser_class, denoiser_kwargs, sigma_min = consistency.teacher_description(teacher)
        D = pfgmpp.network_D(teacher.denoiser if consistency.is_consistency_model(teacher) else teacher)
    except NetworkLoadError as err:
        raise InputError(f'--init: {err}') from None
    except ValueError as err:
        raise InputError(f'--init {opts.init}: {err}') from None
    if opts.pfgmpp and pfgmpp.flags_D(True, opts.aug_dim) != D:
        raise OptionError(f'--pfgmpp=1 --aug_dim={opts.aug_dim} contradicts the --init snapshot, which has '
                          f'{"D=" + str(D) if D is not None else "no PFGM++ kernel (diffusion)"}; drop the flags')
    expected = dict(img_resolution=c.dataset_kwargs.resolution, img_channels=channels, label_dim=label_dim)
    for key, value in expected.items():
        if int(getattr(teacher, key, value) or 0) != value:
            raise InputError(f'--init {opts.init}: the network has {key}={getattr(teacher, key)}, the --data '
                             f'images give {value} (with --cond={int(bool(opts.cond))})')
    if sigma_min is None:
        sigma_min = max(consistency.DEFAULT_SIGMA_MIN, float(getattr(teacher, 'sigma_min', 0) or 0))
    used_precision = precision(opts)
    denoiser_kwargs.update(dropout=opts.dropout, use_fp16=used_precision == 'fp16')
    if used_precision == 'bf16':
        denoiser_kwargs.update(use_bf16=True, reduced_precision_on_cpu=True)
    if opts.label_dropout:
        denoiser_kwargs['label_dropout'] = opts.label_dropout
    for key in pfgmpp.network_kwargs(D):
        denoiser_kwargs.pop(key, None)  # the loop passes the kernel keywords of c.D
    denoiser_kwargs.pop('D', None)
    c.network_kwargs = dnnlib.EasyDict(class_name='training.consistency.ConsistencyModel',
                                       denoiser_class=denoiser_class, denoiser_kwargs=denoiser_kwargs,
                                       sigma_min=sigma_min)
    c.loss_kwargs = dnnlib.EasyDict(class_name='training.consistency.ConsistencyLoss', P_mean=opts.cm_pmean,
                                    P_std=opts.cm_pstd, q=opts.cm_q, k=opts.cm_k, b=opts.cm_b,
                                    stage_kimg=opts.cm_stage, huber_c=opts.cm_huber or None, sigma_min=sigma_min)
    if opts.augment and denoiser_kwargs.get('augment_dim'):
        c.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=opts.augment,
                                           **AUGMENT_SETTINGS)
    return D


def run_identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a run is, independent of how it is launched: the dataset (name, resolution, size, labels, x-flips),
    the network class and architecture, the loss and preconditioner options, PFGM++'s D and the stable target field.

    ``config``: a configuration from :func:`build_config` or read back from ``training_options.json``. Two
    configurations with equal identities can continue each other's training states.
    """
    dataset = dict(config.get('dataset_kwargs') or {})
    path = str(dataset.get('path', ''))
    identity: dict[str, Any] = {'dataset': os.path.splitext(os.path.basename(os.path.normpath(path)))[0]}
    identity.update({f'dataset_kwargs.{key}': dataset.get(key) for key in IDENTITY_DATASET_KEYS})
    network = dict(config.get('network_kwargs') or {})
    identity.update({f'network_kwargs.{key}': _plain(value) for key, value in sorted(network.items())
                     if key not in RUNTIME_NETWORK_KEYS})
    identity.update({f'loss_kwargs.{key}': _plain(value)
                     for key, value in sorted(dict(config.get('loss_kwargs') or {}).items())})
    identity['D'] = config.get('D')
    identity['stf'] = bool(config.get('stf', False))
    return identity


def identity_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every entry of two :func:`run_identity` results that differs."""
    return [f'{key}: {old.get(key)!r} -> {new.get(key)!r}' for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)]


def option_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``{dotted key: [old, new]}`` for the configuration entries that differ between two launches of one run
    (entries that differ by nature, such as the run directory and the resumed file, are left out)."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    return {key: [flat_old.get(key), flat_new.get(key)] for key in sorted(set(flat_old) | set(flat_new))
            if key.split('.')[0] not in PER_LAUNCH_KEYS and flat_old.get(key) != flat_new.get(key)}


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples are lists), so a configuration compares equal to its JSON copy."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _flatten(config: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = _plain(value)
    return flat
