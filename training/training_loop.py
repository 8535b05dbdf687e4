"""The training loop: data, loss, optimiser, EMA, snapshots and exactly resumable training states.

One code path serves a single process and ``torchrun`` (see ``torch_utils.distributed``). Each step takes
``batch_size`` images from the global data stream, splits them between the ranks and, on each rank, into
``num_accumulation_rounds`` micro-batches of ``batch_gpu`` images whose gradients are accumulated; DDP averages
them across ranks.

Randomness
    Every micro-batch re-seeds the loop's loss generator (noise levels, noise, augmentation) and torch's global
    generator (dropout) from ``(seed, position of the micro-batch in the global data stream)``. Together with the
    block-sharded :class:`torch_utils.misc.InfiniteSampler`, a step is therefore a pure function of the weights,
    the seed and the stream position: the same for 1 or 2 ranks (when the micro-batch size is the same) and the
    same after a resume. The host and process-wide generators (torch, CUDA, numpy, Python) are saved and restored
    all the same, for code outside the loop that may draw from them.

Files written to ``run_dir`` (rank 0, each written to a temporary name and renamed):
    ``stats.jsonl``                     one JSON line per tick (training_stats averages plus a timestamp)
    ``network-snapshot-{kimg:06d}.pkl`` pickle of ``dict(ema, loss_fn, augment_pipe, dataset_kwargs)`` with the
                                        modules as persistence objects (evaluation mode, CPU), as EDM writes it
    ``training-state-{kimg:06d}.pt``    ``torch.save`` of the training state below
    ``network-snapshot-{kimg:07d}-{std:.3f}.pkl``  with ``phema_stds`` (``--phema``), one per tracked power-function
                                        EMA, plus a ``phema`` entry with the exact image count (``training/phema.py``)

Training state (``training-state-*.pt``)
    Keys the original PFGM++ code writes and reads, with the same meaning:
        ``net``             the network being trained (persistence module, training mode)
        ``ema``             the EMA network (persistence module)
        ``optimizer_state`` ``optimizer.state_dict()``
        ``step``            images seen so far (``cur_nimg``)
    Keys this loop adds for exact resumption (absent from the original's files, which therefore resume with a
    fresh data order and fresh random states):
        ``format``           :data:`STATE_FORMAT`; ``format_version``: :data:`STATE_VERSION`
        ``cur_tick``         index of the next tick; ``tick_start_nimg``: ``step`` at the start of that tick
        ``data_position``    global data-stream index of the next step's first image
        ``sampler``          :meth:`InfiniteSampler.state_dict` at ``data_position``
        ``rng``              one dict per rank: ``torch``, ``cuda`` (or None), ``numpy``, ``python`` states
        ``world_size``, ``seed``, ``batch_size``, ``loss_scaling``
        ``options``          the loop's keyword arguments (JSON-compatible), for reference
        ``phema``            with ``--phema``: the tracked sigma_rel values and their averaged weights
    Loading needs ``torch.load(..., weights_only=False)`` because of the pickled modules: load only files you trust.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
import pickle
import random
import re
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional

import numpy as np
import psutil
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc, training_stats
from training import pfgmpp as pfgmpp_lib

#: Marks a training state written by this loop (the original's states have no such key).
STATE_FORMAT = 'pfgmpp-training-state'
STATE_VERSION = 1
#: Name of the per-element training loss in training_stats / stats.jsonl.
LOSS_STAT = 'Loss/loss'
#: Gradients are scrubbed of NaN/Inf before each optimiser step; infinities become these values.
GRAD_CLAMP = 1e5
#: Streams for :func:`derive_seed`, so that the random numbers of different purposes never coincide.
STREAM_INIT, STREAM_LOSS, STREAM_DROPOUT, STREAM_LOADER, STREAM_HOST = 1, 2, 3, 4, 5

_MASK64 = (1 << 64) - 1


class TrainingError(RuntimeError):
    """A problem with the configuration or the inputs, reported to the user as one line."""


# ----------------------------------------------------------------------------
# Seeds.


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed for ``(seed, *keys)``; distinct key tuples give unrelated streams."""
    state = _splitmix64(seed & _MASK64)
    for key in keys:
        state = _splitmix64(state ^ (key & _MASK64))
    return state >> 1


# ----------------------------------------------------------------------------
# Stopping on SIGTERM / SIGINT.


class StopRequest:
    """Remembers SIGTERM/SIGINT so the loop can finish its step, save and exit; a second SIGINT interrupts."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> 'StopRequest':
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class _StopVote:
    """Whether any rank was asked to stop; one tiny CPU all-reduce per step when distributed."""

    def __init__(self, stop: StopRequest) -> None:
        self.stop = stop
        self.group = None
        if dist.is_distributed():
            # A gloo side group keeps the vote on the host even when training uses NCCL: no device sync.
            backend = torch.distributed.get_backend()
            self.group = torch.distributed.new_group(backend='gloo') if backend != 'gloo' else None
            self.flag = torch.zeros([1], dtype=torch.int32)

    def __call__(self) -> bool:
        if not dist.is_distributed():
            return self.stop.requested
        self.flag.fill_(int(self.stop.requested))
        torch.distributed.all_reduce(self.flag, group=self.group)
        return bool(self.flag.item())


# ----------------------------------------------------------------------------
# Host random states.


def _host_rng_state(device: torch.device) -> dict:
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state(device) if device.type == 'cuda' else None,
                numpy=np.random.get_state(), python=random.getstate())


def _set_host_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state['torch'])
    if device.type == 'cuda' and state.get('cuda') is not None:
        torch.cuda.set_rng_state(state['cuda'], device)
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])


def _gather_objects(obj: Any) -> list[Any]:
    if not dist.is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------
# Loading what a previous run left.


def read_training_state(path: str) -> dict:
    """``torch.load`` a training state (ours or the original's) with a one-line error on failure."""
    try:
        data = torch.load(path, map_location='cpu', weights_only=False)
    except FileNotFoundError:
        raise TrainingError(f'--resume {path}: no such file') from None
    except Exception as err:  # pickle, zip and persistence errors all mean "not a usable state"
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TrainingError(f'--resume {path}: cannot read it as a training state ({first})') from None
    if not isinstance(data, dict) or not isinstance(data.get('net'), torch.nn.Module) \
            or 'optimizer_state' not in data:
        keys = sorted(map(str, data.keys())) if isinstance(data, dict) else type(data).__name__
        raise TrainingError(f'--resume {path}: expected a training state with "net" and "optimizer_state", '
                            f'found {keys}')
    return data


def load_training_state(data: dict, net: torch.nn.Module, ema: torch.nn.Module,
                        optimizer: Optional[torch.optim.Optimizer] = None, source: str = 'training state',
                        ema_fallback: Optional[str] = None) -> None:
    """Copy the weights (and optimiser state) of a loaded training state into ``net``/``ema``/``optimizer``.

    A state without ``ema`` (EDM writes none) takes the EMA from the network snapshot ``ema_fallback`` when
    that file exists, as EDM's resume does, and from ``net`` otherwise.
    """
    try:
        misc.copy_params_and_buffers(data['net'], net, require_all=True)
        if isinstance(data.get('ema'), torch.nn.Module):
            misc.copy_params_and_buffers(data['ema'], ema, require_all=True)
        elif ema_fallback is not None and os.path.isfile(ema_fallback):
            with open(ema_fallback, 'rb') as f:
                snapshot = pickle.load(f)
            misc.copy_params_and_buffers(snapshot['ema'], ema, require_all=True)
        else:
            dist.print0(f'Note: {source} has no EMA network; the EMA restarts from the network weights.')
            misc.copy_params_and_buffers(data['net'], ema, require_all=True)
        if optimizer is not None:
            saved_optimizer = data['optimizer_state']
            optimizer.load_state_dict(saved_optimizer)
    except (ValueError, KeyError, RuntimeError) as err:
        raise TrainingError(f'--resume {source}: does not fit the network built from the current options '
                            f'({str(err).splitlines()[0]}); use the --arch/--cbase/--cres/... of the original run'
                            ) from None


# ----------------------------------------------------------------------------
# Writing.


def _save_atomically(path: str, writer: Callable[[Any], None]) -> None:
    try:
        with dnnlib.util.atomic_write(path, 'wb') as f:
            writer(f)
    except OSError as err:  # disk full, quota, read-only: the temporary file is gone, earlier files are intact
        raise TrainingError(f'{path}: cannot write it ({err.strerror or err}); earlier snapshots and training '
                            f'states are complete') from None


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# ----------------------------------------------------------------------------


def open_tensorboard(run_dir: str) -> Any:
    """A TensorBoard ``SummaryWriter`` writing event files into ``run_dir`` (beside stats.jsonl).

    Raises:
        ImportError: the optional ``tensorboard`` package is not installed.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError('TensorBoard logging needs the tensorboard package (pip install tensorboard)') from None
    return SummaryWriter(log_dir=run_dir)


def write_tensorboard_scalars(writer: Any, stats: dict[str, Any], nimg: int) -> None:
    """One scalar per statistic of a tick (its mean, as stats.jsonl holds it), at step = images seen so far.

    Images rather than whole kimg keep short runs (ticks of a fraction of a kimg) apart on the step axis.
    """
    for name, value in stats.items():
        mean = value.get('mean') if isinstance(value, dict) else None
        if mean is not None:
            writer.add_scalar(name, mean, global_step=int(nimg))
    writer.flush()


def training_loop(
    run_dir: str = '.',                       # Output directory (rank 0 writes there).
    dataset_kwargs: dict = {},                # Training set: class_name plus its arguments.
    data_loader_kwargs: dict = {},            # Options for torch.utils.data.DataLoader.
    network_kwargs: dict = {},                # Preconditioner class_name plus architecture options.
    loss_kwargs: dict = {},                   # Loss class_name plus its options.
    optimizer_kwargs: dict = {},              # Optimiser class_name plus its options (lr is the peak rate).
    augment_kwargs: Optional[dict] = None,    # Augmentation pipe options, None = no augmentation.
    seed: int = 0,                            # Global seed; every random stream is derived from it.
    batch_size: int = 512,                    # Images per optimiser step, all ranks together.
    batch_gpu: Optional[int] = None,          # Images per micro-batch on one rank, None = no accumulation.
    total_kimg: float = 200000,               # Training length in thousands of images.
    ema_halflife_kimg: float = 500,           # Half-life of the EMA of the weights.
    ema_rampup_ratio: Optional[float] = 0.05, # Half-life is at most this fraction of the images seen, None = off.
    lr_rampup_kimg: float = 10000,            # Linear learning-rate warm-up length.
    loss_scaling: float = 1,                  # Constant loss scale (helps float16).
    kimg_per_tick: float = 50,                # Status-line interval.
    snapshot_ticks: Optional[int] = 50,       # Network snapshot every this many ticks, None = never.
    state_dump_ticks: Optional[int] = 500,    # Training state every this many ticks, None = never.
    snapshot_format: str = 'pkl',             # Snapshot as 'pkl', 'weights' (X.weights.pt) or 'both'.
    resume_pkl: Optional[str] = None,         # Start from this network snapshot's EMA weights.
    resume_state_dump: Optional[str] = None,  # Continue from this training state.
    resume_kimg: float = 0,                   # Progress to assume when the training state does not say.
    cudnn_benchmark: bool = True,             # torch.backends.cudnn.benchmark.
    device: Optional[torch.device] = None,    # None = the device chosen by torch_utils.distributed.init().
    D: Optional[float] = None,                # PFGM++ augmented dimensions; None (or inf) trains diffusion.
    stf: bool = False,                        # Stable target field: regress onto a reference-batch average.
    rbatch: int = 4096,                       # STF reference batch per rank (includes the training images).
    channels_last: bool = False,              # Keep network and images in channels-last layout.
    compile: bool = False,                    # torch.compile the network for the training forward pass.
    tensorboard: bool = False,                # Also write each tick's statistics as TensorBoard scalars.
    phema_stds: Optional[list] = None,        # Post-hoc EMA: sigma_rel of each tracked power-function EMA.
    stop: Optional[StopRequest] = None,       # Shared stop flag (tests); None installs SIGTERM/SIGINT handlers.
) -> None:
    """Train; returns when ``total_kimg`` is reached or a stop was requested (after saving)."""
    options = _json_safe({k: v for k, v in locals().items() if k != 'stop'})
    start_time = time.time()
    device = torch.device(device) if device is not None else dist.get_device()
    rank, world = dist.get_rank(), dist.get_world_size()

    # Process-wide generators: derived per rank so ranks differ, as in the original.
    # Full float32 matmuls and convolutions (no TF32, no reduced-precision fp16 sums), as the original.
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    cudnn.benchmark = cudnn_benchmark
    cudnn.allow_tf32 = matmul.allow_tf32 = matmul.allow_fp16_reduced_precision_reduction = False
    host_seed = derive_seed(seed, STREAM_HOST, rank)
    np.random.seed(host_seed % (1 << 31))
    random.seed(host_seed)

    # Batch geometry.
    if batch_size % world != 0:
        raise TrainingError(f'--batch {batch_size} must be divisible by the number of processes ({world})')
    batch_per_rank = batch_size // world
    if stf:
        if rbatch < batch_per_rank:
            raise TrainingError(f'--rbatch {rbatch} must be at least the per-process batch ({batch_per_rank})')
        batch_gpu, rounds, loaded_per_rank = rbatch, 1, rbatch
    else:
        batch_gpu = batch_per_rank if batch_gpu is None else min(batch_gpu, batch_per_rank)
        if batch_per_rank % batch_gpu != 0:
            raise TrainingError(f'--batch {batch_size} must be divisible by processes ({world}) x --batch-gpu '
                                f'({batch_gpu}) = {world * batch_gpu}')
        rounds, loaded_per_rank = batch_per_rank // batch_gpu, batch_per_rank
    stream_per_step = loaded_per_rank * world
    # Image counts, rounded so that fractional kimg from the command line (0.24 -> 240.00000000000003) are exact.
    total_nimg = round(total_kimg * 1000)
    tick_nimg = max(round(kimg_per_tick * 1000), 1)

    # Dataset and network.
    dist.print0(f'Opening the dataset {dataset_kwargs.get("path", "")}...')
    dataset = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    sampler = misc.InfiniteSampler(dataset, rank=rank, num_replicas=world, seed=seed, block_size=loaded_per_rank)

    dist.print0('Building the network...')
    interface = dict(img_resolution=dataset.resolution, img_channels=dataset.num_channels,
                     label_dim=dataset.label_dim, **pfgmpp_lib.network_kwargs(D))
    torch.manual_seed(derive_seed(seed, STREAM_INIT))  # identical initial weights on every rank
    net = dnnlib.util.construct_class_by_name(**network_kwargs, **interface)
    net.to(device).train().requires_grad_(True)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        net.to(memory_format=torch.channels_last)
    if dist.is_main():
        probe_batch = min(batch_gpu, batch_per_rank)  # not the whole STF reference batch
        with torch.no_grad():
            probe = [torch.zeros([probe_batch, net.img_channels, net.img_resolution, net.img_resolution],
                                 device=device), torch.ones([probe_batch], device=device),
                     torch.zeros([probe_batch, net.label_dim], device=device)]
            misc.print_module_summary(net, probe, max_nesting=2)

    dist.print0('Creating loss, optimizer and augmentation...')
    loss_kwargs = dict(loss_kwargs)
    loss_kwargs.setdefault('D', D)
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **optimizer_kwargs)
    augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs is not None else None
    ddp = None
    if dist.is_distributed():
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None,
                                                        **_ddp_buffer_options())
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    power_emas = _power_emas(net, phema_stds)

    # Where training starts.
    cur_nimg = int(round(resume_kimg * 1000))
    cur_tick = 0
    data_position = None
    if resume_pkl is not None:
        from training.network_io import NetworkLoadError, load_network
        dist.print0(f'Transfer: starting from the weights of {resume_pkl}')
        try:
            source_net = load_network(resume_pkl, device='cpu')
            misc.copy_params_and_buffers(src_module=source_net, dst_module=net, require_all=False)
            misc.copy_params_and_buffers(src_module=source_net, dst_module=ema, require_all=False)
        except (NetworkLoadError, ValueError) as err:
            raise TrainingError(f'--transfer: {err}') from None
        del source_net
    if resume_state_dump is not None:
        dist.print0(f'Resuming from the training state {resume_state_dump}')
        data = read_training_state(resume_state_dump)
        kimg_tag = re.fullmatch(r'training-state-(\d+)\.pt', os.path.basename(resume_state_dump))
        fallback = None
        if kimg_tag is not None:
            fallback = os.path.join(os.path.dirname(resume_state_dump), f'network-snapshot-{kimg_tag.group(1)}.pkl')
        load_training_state(data, net, ema, optimizer, source=resume_state_dump, ema_fallback=fallback)
        _load_power_emas(power_emas, data, resume_state_dump)
        cur_nimg = int(data['step']) if 'step' in data else cur_nimg
        if data.get('format') == STATE_FORMAT:
            cur_tick = int(data['cur_tick'])
            data_position = int(data['data_position'])
            sampler.load_state_dict(data['sampler'])
            rng = data['rng']
            if len(rng) == world:
                _set_host_rng_state(rng[rank], device)
            else:
                dist.print0(f'Note: the state was written by {len(rng)} process(es), this run has {world}; data '
                            f'order continues exactly, host random states restart.')
        else:
            cur_tick = cur_nimg // tick_nimg
            dist.print0('Note: this training state was written by the original code; it has no data position or '
                        'random states, so the data order cannot be restored (training continues with a fresh '
                        'order; network, EMA, optimizer and step are restored).')
        del data
    if data_position is None:
        # No recorded position: continue the stream numbering where the step count says, with a fresh order.
        data_position = (cur_nimg // batch_size) * stream_per_step
        if data_position:
            sampler.restart_at(data_position, derive_seed(seed, STREAM_LOADER, data_position))

    # Data loader: the sampler runs in this process, so its position is ours to track.
    loader_kwargs = dict(data_loader_kwargs)
    if not loader_kwargs.get('num_workers'):
        loader_kwargs.pop('prefetch_factor', None)
        loader_kwargs.pop('multiprocessing_context', None)
    if device.type != 'cuda':
        loader_kwargs['pin_memory'] = False
    loader_generator = torch.Generator().manual_seed(derive_seed(seed, STREAM_LOADER, rank, data_position))
    data_iter: Iterator = iter(torch.utils.data.DataLoader(dataset=dataset, sampler=sampler, batch_size=batch_gpu,
                                                           generator=loader_generator, **loader_kwargs))

    forward_net: torch.nn.Module = ddp if ddp is not None else net
    if compile:
        forward_net = torch.compile(forward_net)
    loss_generator = torch.Generator(device=device)
    augment = functools.partial(augment_pipe, generator=loss_generator) if augment_pipe is not None else None
    params = list(net.parameters())
    # Detached views share storage with the live parameters, so they are made once rather than every step.
    params_data = [p.detach() for p in params]
    ema_params = list(ema.parameters())
    base_lr = optimizer_kwargs['lr']

    stop = stop if stop is not None else StopRequest()
    with stop:
        vote = _StopVote(stop)
        dist.print0(f'Training for {total_kimg:g} kimg...')
        dist.print0()
        tick_start_nimg = cur_nimg
        tick_start_time = time.time()
        maintenance_sec = tick_start_time - start_time
        stats_file = None
        tensorboard_writer = None
        while True:
            # Accumulate gradients over the micro-batches of this rank.
            for p in params:
                p.grad = None
            for round_idx in range(rounds):
                position = data_position + rank * loaded_per_rank + round_idx * batch_gpu
                loss_generator.manual_seed(derive_seed(seed, STREAM_LOSS, position))
                torch.manual_seed(derive_seed(seed, STREAM_DROPOUT, position))
                with misc.ddp_sync(ddp if ddp is not None else net, round_idx == rounds - 1):
                    images, labels = next(data_iter)
                    images = images.to(device, non_blocking=True).to(torch.float32) / 127.5 - 1
                    images = images.contiguous(memory_format=memory_format)
                    labels = labels.to(device, non_blocking=True)
                    reference = None
                    if stf:
                        images, reference, labels = images[:batch_per_rank], images[batch_per_rank:], \
                            labels[:batch_per_rank]
                    loss = loss_fn(net=forward_net, images=images, labels=labels, augment_pipe=augment,
                                   generator=loss_generator, reference_images=reference)
                    training_stats.report(LOSS_STAT, loss)
                    loss.sum().mul(loss_scaling / batch_per_rank).backward()

            # Optimiser step with the warm-up learning rate, on gradients scrubbed of NaN/Inf.
            for group in optimizer.param_groups:
                group['lr'] = base_lr * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)
            for p in params:
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0, posinf=GRAD_CLAMP, neginf=-GRAD_CLAMP, out=p.grad)
            optimizer.step()

            ema_beta = ema_decay(cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio)
            with torch.no_grad():
                torch._foreach_copy_(ema_params, torch._foreach_lerp(params_data, ema_params, ema_beta))

            cur_nimg += batch_size
            if power_emas is not None:
                power_emas.update(params_data, cur_nimg, batch_size)
            data_position += stream_per_step
            done = cur_nimg >= total_nimg
            stopping = vote()
            if not (done or stopping or cur_tick == 0 or cur_nimg >= tick_start_nimg + tick_nimg):
                continue

            # Tick: status line, statistics, snapshots.
            tick_end_time = time.time()
            report0 = training_stats.report0
            report0('Progress/tick', cur_tick)
            report0('Progress/kimg', cur_nimg / 1e3)
            report0('Timing/total_sec', tick_end_time - start_time)
            report0('Timing/sec_per_tick', tick_end_time - tick_start_time)
            report0('Timing/sec_per_kimg', (tick_end_time - tick_start_time) / max(cur_nimg - tick_start_nimg, 1) * 1e3)
            report0('Timing/maintenance_sec', maintenance_sec)
            report0('Resources/cpu_mem_gb', psutil.Process(os.getpid()).memory_info().rss / 2**30)
            gpu_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else 0.0
            gpu_reserved = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == 'cuda' else 0.0
            report0('Resources/peak_gpu_mem_gb', gpu_mem)
            report0('Resources/peak_gpu_mem_reserved_gb', gpu_reserved)
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
            collector = training_stats.default_collector
            collector.update()
            loss_mean = collector.mean(LOSS_STAT)
            dist.print0(' '.join([
                f'tick {cur_tick:<5d}',
                f'kimg {cur_nimg / 1e3:<9.3f}',
                f'time {dnnlib.util.format_time(tick_end_time - start_time):<12s}',
                f'sec/tick {tick_end_time - tick_start_time:<7.1f}',
                f'sec/kimg {collector.mean("Timing/sec_per_kimg"):<7.2f}',
                f'maintenance {maintenance_sec:<6.1f}',
                f'cpumem {collector.mean("Resources/cpu_mem_gb"):<6.2f}',
                f'gpumem {gpu_mem:<6.2f}',
                f'reserved {gpu_reserved:<6.2f}',
                f'loss {loss_mean:.4f}',
            ]))
            if dist.is_main():
                if stats_file is None:
                    stats_file = open(os.path.join(run_dir, 'stats.jsonl'), 'at', encoding='utf-8')
                stats_file.write(json.dumps(dict(collector.as_dict(), timestamp=time.time())) + '\n')
                stats_file.flush()
                if tensorboard:
                    if tensorboard_writer is None:
                        tensorboard_writer = open_tensorboard(run_dir)
                    write_tensorboard_scalars(tensorboard_writer, collector.as_dict(), cur_nimg)
            if not np.isfinite(loss_mean):
                raise TrainingError(f'the training loss became {loss_mean} at {cur_nimg / 1e3:.3f} kimg '
                                    f'(tick {cur_tick}); {_nan_advice(run_dir, resume_state_dump)}')
            if stopping and not done:
                done = True
                dist.print0()
                dist.print0('Stop requested: saving and exiting...')

            kimg_name = f'{int(cur_nimg // 1000):06d}'
            if snapshot_ticks is not None and (done or cur_tick % snapshot_ticks == 0):
                snapshot_path = os.path.join(run_dir, f'network-snapshot-{kimg_name}.pkl')
                if snapshot_format in ('pkl', 'both'):
                    _write_snapshot(snapshot_path, ema=ema, loss_fn=loss_fn, augment_pipe=augment_pipe,
                                    dataset_kwargs=dataset_kwargs)
                if snapshot_format in ('weights', 'both') and dist.is_main():
                    _write_weights(snapshot_path, ema, kimg=cur_nimg / 1e3)
                if power_emas is not None:
                    _write_power_ema_snapshots(run_dir, power_emas, net, cur_nimg, batch_size, loss_fn=loss_fn,
                                               augment_pipe=augment_pipe, dataset_kwargs=dataset_kwargs)
            if state_dump_ticks is not None and (done or (cur_tick % state_dump_ticks == 0 and cur_tick != 0)):
                state = dict(net=net, ema=ema, optimizer_state=optimizer.state_dict(), step=cur_nimg,
                             format=STATE_FORMAT, format_version=STATE_VERSION, cur_tick=cur_tick + 1,
                             tick_start_nimg=cur_nimg, data_position=data_position,
                             sampler=sampler.state_dict(data_position), rng=_gather_objects(_host_rng_state(device)),
                             world_size=world, seed=seed, batch_size=batch_size, loss_scaling=loss_scaling,
                             options=options)
                if power_emas is not None:
                    state['phema'] = power_emas.state_dict()
                if dist.is_main():
                    _save_atomically(os.path.join(run_dir, f'training-state-{kimg_name}.pt'),
                                     functools.partial(torch.save, state))
                del state
                dist.barrier()

            cur_tick += 1
            tick_start_nimg = cur_nimg
            tick_start_time = time.time()
            maintenance_sec = tick_start_time - tick_end_time
            if done:
                break

    if stats_file is not None:
        stats_file.close()
    if tensorboard_writer is not None:
        tensorboard_writer.close()
    dist.print0()
    dist.print0('Exiting...')


def _ddp_buffer_options() -> dict[str, bool]:
    """DDP keywords that stop it copying rank 0's buffers before every forward pass.

    The buffers (resampling filters, Fourier frequencies) are built identically on every rank and never change,
    so the per-forward broadcast EDM turned off stays off. PyTorch versions that name this ``forward_sync_buffers``
    deprecate ``broadcast_buffers`` with a FutureWarning per rank; older versions only know ``broadcast_buffers``.
    The one-time copy at start-up that ``forward_sync_buffers=False`` keeps copies identical values.
    """
    parameters = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    if 'forward_sync_buffers' in parameters:
        return dict(forward_sync_buffers=False)
    return dict(broadcast_buffers=False)


def _nan_advice(run_dir: str, resume_state_dump: Optional[str]) -> str:
    """What to do after a NaN/Inf loss: resume from the newest training state that exists, or start over."""
    states = []
    for name in os.listdir(run_dir) if run_dir and os.path.isdir(run_dir) else []:
        match = re.fullmatch(r'training-state-(\d+)\.pt', name)
        if match:
            states.append((int(match.group(1)), os.path.join(run_dir, name)))
    if resume_state_dump is not None and os.path.isfile(resume_state_dump):
        match = re.fullmatch(r'training-state-(\d+)\.pt', os.path.basename(resume_state_dump))
        states.append((int(match.group(1)) if match else -1, resume_state_dump))
    if not states:
        return ('no training state was written before it (one is written every --dump ticks), so start over '
                'with a lower --lr or check the data')
    return f'lower --lr or check the data, then continue with --resume={max(states)[1]}'


def ema_decay(cur_nimg: int, batch_size: int, halflife_kimg: float, rampup_ratio: Optional[float]) -> float:
    """Per-step EMA decay for a half-life in images, capped early in training at ``rampup_ratio * cur_nimg``."""
    halflife = halflife_kimg * 1000 if rampup_ratio is None else min(halflife_kimg * 1000, cur_nimg * rampup_ratio)
    return 0.5 ** (batch_size / max(halflife, 1e-8))


def _power_emas(net: torch.nn.Module, stds: Optional[list]) -> Any:
    """The post-hoc EMA tracker for ``--phema`` (None without it)."""
    if not stds:
        return None
    from training import phema
    try:
        return phema.PowerFunctionEMA(net, stds)
    except phema.PhemaError as err:
        raise TrainingError(str(err)) from None


def _load_power_emas(power_emas: Any, data: dict, source: str) -> None:
    """Restore the tracked post-hoc EMAs of a training state; they cannot start half-way through training."""
    from training import phema
    saved = data.get('phema')
    if power_emas is None:
        if saved:
            dist.print0(f'Note: {source} tracks post-hoc EMAs (--phema); this run without --phema drops them.')
        return
    if not saved:
        raise TrainingError(f'--phema: {source} tracks no post-hoc EMA; a power-function EMA averages the whole '
                            f'run, so it must be on from the start (resume without --phema)')
    try:
        power_emas.load_state_dict(saved, source=source)
    except phema.PhemaError as err:
        raise TrainingError(str(err)) from None


def _write_power_ema_snapshots(run_dir: str, power_emas: Any, net: torch.nn.Module, nimg: int, batch_size: int,
                               **snapshot: Any) -> None:
    """One ``network-snapshot-{kimg:07d}-{std:.3f}.pkl`` per tracked sigma_rel, with its exact image count."""
    from training import phema
    for std, averaged in power_emas.networks(net):
        path = os.path.join(run_dir, phema.snapshot_name(phema.TRACKED_PREFIX, nimg, std))
        _write_snapshot(path, ema=averaged, **snapshot,
                        extra={phema.RECORD_KEY: phema.snapshot_record(nimg, std, batch_size=batch_size)})


def _write_snapshot(path: str, ema: torch.nn.Module, loss_fn: Any, augment_pipe: Any, dataset_kwargs: dict,
                    extra: Optional[dict] = None) -> None:
    """EDM's network-snapshot layout: evaluation-mode CPU copies of the modules, written by rank 0."""
    def frozen_cpu_copy(module: Any) -> Any:
        if not isinstance(module, torch.nn.Module):
            return module
        clone = copy.deepcopy(module).requires_grad_(False).eval()
        misc.check_ddp_consistency(clone)
        return clone.cpu()

    data = dict(ema=frozen_cpu_copy(ema), loss_fn=loss_fn, augment_pipe=frozen_cpu_copy(augment_pipe),
                dataset_kwargs=dict(dataset_kwargs), **(extra or {}))
    if dist.is_main():
        _save_atomically(path, functools.partial(pickle.dump, data))


def _write_weights(snapshot_path: str, ema: torch.nn.Module, kimg: float) -> None:
    """The weights-only twin of a snapshot (``X.weights.pt`` beside ``X.pkl``), safe to share; rank 0 only."""
    from training import export
    try:
        record = export.network_record(ema, metadata=dict(kimg=kimg), source='--snap-format')
    except export.WeightsFormatError as err:
        raise TrainingError(str(err)) from None
    _save_atomically(export.weights_path_for(snapshot_path), functools.partial(torch.save, record))
