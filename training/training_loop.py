"""The training loop: data, loss, optimiser, EMA, snapshots and exactly resumable training states.

One code path serves a single process and ``torchrun`` (see ``torch_utils.distributed``). Each step takes
``batch_size`` images from the global data stream, splits them between the ranks and, on each rank, into
``num_accumulation_rounds`` micro-batches of ``batch_gpu`` images whose gradients are accumulated; DDP averages
them across ranks.

Reading order: :func:`training_loop` sets up (the ``_build_*``/``_open_*`` functions), resumes (:func:`_resume`),
then runs the step loop; at the end of each tick it reports (:class:`_TickReporter`) and writes checkpoints
(:func:`_save_snapshots`, :func:`training.training_state.save_training_state`).

Randomness
    Every micro-batch re-seeds the loop's loss generator (noise levels, noise, augmentation) and torch's global
    generator (dropout) from ``(seed, position of the micro-batch in the global data stream)``. Together with the
    block-sharded :class:`torch_utils.misc.InfiniteSampler`, a step is therefore a pure function of the weights,
    the seed and the stream position: the same for 1 or 2 ranks (when the micro-batch size is the same) and the
    same after a resume. The host and process-wide generators (torch, CUDA, numpy, Python) are saved and restored
    all the same, for code outside the loop that may draw from them.

Stopping
    SIGTERM or SIGINT on any rank ends the run within a step of the request (the ranks agree on the training's
    process group, :class:`_StopVote`) with a snapshot and a training state; :func:`training_loop` then returns
    :data:`STOPPED` (train.py exits with code 3) instead of :data:`FINISHED`.

Files written to ``run_dir`` (rank 0, each written to a temporary name and renamed):
    ``stats.jsonl``                     one JSON line per tick (training_stats averages plus a timestamp)
    ``network-snapshot-{kimg:06d}.pkl`` pickle of ``dict(ema, loss_fn, augment_pipe, dataset_kwargs)`` with the
                                        modules as persistence objects (evaluation mode, CPU), as EDM writes it
    ``training-state-{kimg:06d}.pt``    ``torch.save`` of a training state (keys: :mod:`training.training_state`)
    ``network-snapshot-{kimg:07d}-{std:.3f}.pkl``  with ``phema_stds`` (``--phema``), one per tracked power-function
                                        EMA, plus a ``phema`` entry with the exact image count (``training/phema.py``)
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
import pickle
import random
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator, Optional

import numpy as np
import psutil
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc, training_stats
from training import cpu_speed, training_state
from training import pfgmpp as pfgmpp_lib
from training.training_state import TrainingError

if TYPE_CHECKING:
    from training.phema import PowerFunctionEMA

#: Name of the per-element training loss in training_stats / stats.jsonl.
LOSS_STAT = 'Loss/loss'
#: Gradients are scrubbed of NaN/Inf before each optimiser step; infinities become these values.
GRAD_CLAMP = 1e5
#: What :func:`training_loop` returns: the run reached ``total_kimg``, or it stopped on request after saving.
FINISHED, STOPPED = 'finished', 'stopped'
#: Streams for :func:`derive_seed`, so that the random numbers of different purposes never coincide.
STREAM_INIT, STREAM_LOSS, STREAM_DROPOUT, STREAM_LOADER, STREAM_HOST = 1, 2, 3, 4, 5

_MASK64 = (1 << 64) - 1


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
    """Whether any rank was asked to stop, agreed on the training's own process group, one step late.

    Each step starts a non-blocking all-reduce (max) of this rank's flag, a tensor on the training device as NCCL
    needs, and reads the result started the step before. The vote therefore neither waits for the current step's
    device work nor needs a second backend, and every rank reads the same results at the same steps: all stop
    together, one step after the first request.
    """

    def __init__(self, stop: StopRequest, device: torch.device) -> None:
        self.stop, self.device = stop, device
        self.pending: Optional[tuple[Any, torch.Tensor]] = None

    def __call__(self) -> bool:
        if not dist.is_distributed():
            return self.stop.requested
        decided = self._collect()
        flag = torch.full([1], int(self.stop.requested), dtype=torch.int32, device=self.device)
        work = torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, async_op=True)
        self.pending = (work, flag)
        return decided

    def _collect(self) -> bool:
        if self.pending is None:
            return False
        work, flag = self.pending
        self.pending = None
        work.wait()
        return bool(flag.item())

    def finish(self) -> None:
        """Complete the outstanding vote (every rank calls it at the same step), so no collective stays open."""
        self._collect()


# ----------------------------------------------------------------------------
# The loop.


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
) -> str:
    """Train; returns :data:`FINISHED` when ``total_kimg`` is reached, :data:`STOPPED` when a stop was requested
    (SIGTERM/SIGINT), after saving a training state and snapshot.

    Raises:
        TrainingError: a configuration that does not fit (batch geometry, --phema, --transfer), an unusable
            training state, a NaN/Inf loss (with advice on where to continue), or a file that cannot be written.
    """
    options = dnnlib.util.json_safe({k: v for k, v in locals().items() if k != 'stop'})
    start_time = time.time()
    device = torch.device(device) if device is not None else dist.get_device()
    rank, world = dist.get_rank(), dist.get_world_size()
    _configure_process(seed, rank, cudnn_benchmark)
    batch_per_rank, batch_gpu, rounds, loaded_per_rank = _batch_geometry(batch_size, batch_gpu, world, stf, rbatch)
    stream_per_step = loaded_per_rank * world
    # Image counts, rounded so that fractional kimg from the command line (0.24 -> 240.00000000000003) are exact.
    total_nimg = round(total_kimg * 1000)
    tick_nimg = max(round(kimg_per_tick * 1000), 1)

    # Data, network, loss, optimiser, augmentation and EMAs.
    dist.print0(f'Opening the dataset {dataset_kwargs.get("path", "")}...')
    dataset = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    sampler = misc.InfiniteSampler(dataset, rank=rank, num_replicas=world, seed=seed, block_size=loaded_per_rank)
    interface = dict(img_resolution=dataset.resolution, img_channels=dataset.num_channels,
                     label_dim=dataset.label_dim, **pfgmpp_lib.network_kwargs(D))
    net = _build_network(network_kwargs, interface, seed, device, channels_last,
                         probe_batch=min(batch_gpu, batch_per_rank))  # not the whole STF reference batch
    dist.print0('Creating loss, optimizer and augmentation...')
    loss_kwargs = dict(loss_kwargs)
    loss_kwargs.setdefault('D', D)
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **optimizer_kwargs)
    augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs is not None else None
    ddp = _wrap_ddp(net, device)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    power_emas = _build_power_emas(net, phema_stds)

    # Where training starts: the beginning, a transferred snapshot, or a training state.
    cur_nimg, cur_tick, data_position = int(round(resume_kimg * 1000)), 0, None
    if resume_pkl is not None:
        _transfer_weights(resume_pkl, net, ema)
    if resume_state_dump is not None:
        cur_nimg, cur_tick, data_position = _resume(resume_state_dump, cur_nimg, tick_nimg, net, ema, optimizer,
                                                    power_emas, sampler, device)
    if data_position is None:
        # No recorded position: continue the stream numbering where the step count says, with a fresh order.
        data_position = (cur_nimg // batch_size) * stream_per_step
        if data_position:
            sampler.restart_at(data_position, derive_seed(seed, STREAM_LOADER, data_position))
    data_iter = _open_data_iterator(dataset, sampler, batch_gpu, data_loader_kwargs, device,
                                    derive_seed(seed, STREAM_LOADER, rank, data_position))

    # What every step uses.
    forward_net: torch.nn.Module = ddp if ddp is not None else net
    if compile:
        forward_net = torch.compile(forward_net)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    loss_generator = torch.Generator(device=device)
    augment = functools.partial(augment_pipe, generator=loss_generator) if augment_pipe is not None else None
    params = list(net.parameters())
    # Detached views share storage with the live parameters, so they are made once rather than every step.
    params_data = [p.detach() for p in params]
    ema_params = list(ema.parameters())
    base_lr = optimizer_kwargs['lr']
    snapshot_contents = dict(loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dataset_kwargs)

    stop = stop if stop is not None else StopRequest()
    with stop, _TickReporter(run_dir, device, start_time, tensorboard) as report_tick:
        vote = _StopVote(stop, device)
        stopped = False
        dist.print0(f'Training for {total_kimg:g} kimg...')
        dist.print0()
        tick_start_nimg = cur_nimg
        tick_start_time = time.time()
        maintenance_sec = tick_start_time - start_time
        while True:
            # Accumulate gradients over the micro-batches of this rank.
            for p in params:
                p.grad = None
            if hasattr(loss_fn, 'set_progress'):
                loss_fn.set_progress(cur_nimg)  # losses with a schedule over training (consistency stages)
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

            # EMAs of the weights.
            ema_beta = ema_decay(cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio)
            with torch.no_grad():
                torch._foreach_copy_(ema_params, torch._foreach_lerp(params_data, ema_params, ema_beta))
            cur_nimg += batch_size
            if power_emas is not None:
                power_emas.update(params_data, cur_nimg, batch_size)

            # A tick ends after tick_nimg images, at the end, on a stop request; tick 0 is a single step.
            data_position += stream_per_step
            done = cur_nimg >= total_nimg
            stopping = vote()
            if not (done or stopping or cur_tick == 0 or cur_nimg >= tick_start_nimg + tick_nimg):
                continue

            # Status line and statistics; a NaN/Inf loss ends training with advice.
            tick_end_time = time.time()
            loss_mean = report_tick(cur_tick, cur_nimg, tick_start_nimg, tick_start_time, tick_end_time,
                                    maintenance_sec)
            if not np.isfinite(loss_mean):
                raise TrainingError(f'the training loss became {loss_mean} at {cur_nimg / 1e3:.3f} kimg '
                                    f'(tick {cur_tick}); {_nan_advice(run_dir, resume_state_dump)}')
            if stopping and not done:
                done = stopped = True
                dist.print0()
                dist.print0('Stop requested: saving and exiting...')

            # Network snapshots and the training state.
            tag = training_state.kimg_tag(cur_nimg)
            if snapshot_ticks is not None and (done or cur_tick % snapshot_ticks == 0):
                _save_snapshots(run_dir, tag, cur_nimg, ema, snapshot_format, net, power_emas, batch_size,
                                **snapshot_contents)
            if state_dump_ticks is not None and (done or (cur_tick % state_dump_ticks == 0 and cur_tick != 0)):
                state = training_state.make_training_state(
                    net=net, ema=ema, optimizer=optimizer, cur_nimg=cur_nimg, next_tick=cur_tick + 1,
                    data_position=data_position, sampler=sampler, device=device, seed=seed, batch_size=batch_size,
                    loss_scaling=loss_scaling, options=options, power_emas=power_emas)
                if dist.is_main():
                    training_state.save_training_state(
                        os.path.join(run_dir, training_state.state_file_name(tag)), state)
                del state
                dist.barrier()

            cur_tick += 1
            tick_start_nimg = cur_nimg
            tick_start_time = time.time()
            maintenance_sec = tick_start_time - tick_end_time
            if done:
                break
        vote.finish()

    dist.print0()
    dist.print0('Exiting...')
    return STOPPED if stopped else FINISHED


# ----------------------------------------------------------------------------
# Setup.


def _configure_process(seed: int, rank: int, cudnn_benchmark: bool) -> None:
    """Numerics and process-wide generators: full float32 matmuls and convolutions (no TF32, no reduced-precision
    fp16 sums), as the original; numpy and Python generators derived per rank so ranks differ, as the original."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    cudnn.benchmark = cudnn_benchmark
    cudnn.allow_tf32 = matmul.allow_tf32 = matmul.allow_fp16_reduced_precision_reduction = False
    host_seed = derive_seed(seed, STREAM_HOST, rank)
    np.random.seed(host_seed % (1 << 31))
    random.seed(host_seed)


def _batch_geometry(batch_size: int, batch_gpu: Optional[int], world: int, stf: bool,
                    rbatch: int) -> tuple[int, int, int, int]:
    """(images per rank and step, images per micro-batch, micro-batches per step, images loaded per rank and step).

    With STF each rank loads its whole reference batch (``rbatch``) in one micro-batch; the first images of it
    are the ones trained on.
    """
    if batch_size % world != 0:
        raise TrainingError(f'--batch {batch_size} must be divisible by the number of processes ({world})')
    batch_per_rank = batch_size // world
    if stf:
        if rbatch < batch_per_rank:
            raise TrainingError(f'--rbatch {rbatch} must be at least the per-process batch ({batch_per_rank})')
        return batch_per_rank, rbatch, 1, rbatch
    batch_gpu = batch_per_rank if batch_gpu is None else min(batch_gpu, batch_per_rank)
    if batch_per_rank % batch_gpu != 0:
        raise TrainingError(f'--batch {batch_size} must be divisible by processes ({world}) x --batch-gpu '
                            f'({batch_gpu}) = {world * batch_gpu}')
    return batch_per_rank, batch_gpu, batch_per_rank // batch_gpu, batch_per_rank


def _build_network(network_kwargs: dict, interface: dict, seed: int, device: torch.device, channels_last: bool,
                   probe_batch: int) -> torch.nn.Module:
    """The network in training mode on ``device``, with identical initial weights on every rank; rank 0 prints
    its summary from one forward pass of ``probe_batch`` images."""
    dist.print0('Building the network...')
    torch.manual_seed(derive_seed(seed, STREAM_INIT))
    net = dnnlib.util.construct_class_by_name(**network_kwargs, **interface)
    net.to(device).train().requires_grad_(True)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    cpu_speed.accelerate(net)  # faster CPU layers (prepacking, bf16 GroupNorm, dropout mask); pickles stay plain
    if dist.is_main():
        with torch.no_grad():
            probe = [torch.zeros([probe_batch, net.img_channels, net.img_resolution, net.img_resolution],
                                 device=device), torch.ones([probe_batch], device=device),
                     torch.zeros([probe_batch, net.label_dim], device=device)]
            misc.print_module_summary(net, probe, max_nesting=2)
    return net


def _wrap_ddp(net: torch.nn.Module, device: torch.device) -> Optional[torch.nn.parallel.DistributedDataParallel]:
    """DDP around ``net`` when distributed (None otherwise)."""
    if not dist.is_distributed():
        return None
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None,
                                                     **_ddp_buffer_options())


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


def _build_power_emas(net: torch.nn.Module, stds: Optional[list]) -> Optional[PowerFunctionEMA]:
    """The post-hoc EMA tracker for ``--phema`` (None without it)."""
    if not stds:
        return None
    from training import phema
    try:
        return phema.PowerFunctionEMA(net, stds)
    except phema.PhemaError as err:
        raise TrainingError(str(err)) from None


def _open_data_iterator(dataset: Any, sampler: misc.InfiniteSampler, batch_gpu: int, data_loader_kwargs: dict,
                        device: torch.device, loader_seed: int) -> Iterator:
    """Micro-batches of ``(uint8 images, labels)``; the sampler runs in this process, so its position is ours to
    track."""
    loader_kwargs = dict(data_loader_kwargs)
    if not loader_kwargs.get('num_workers'):
        loader_kwargs.pop('prefetch_factor', None)
        loader_kwargs.pop('multiprocessing_context', None)
    if device.type != 'cuda':
        loader_kwargs['pin_memory'] = False
    loader_generator = torch.Generator().manual_seed(loader_seed)
    return iter(torch.utils.data.DataLoader(dataset=dataset, sampler=sampler, batch_size=batch_gpu,
                                            generator=loader_generator, **loader_kwargs))


def ema_decay(cur_nimg: int, batch_size: int, halflife_kimg: float, rampup_ratio: Optional[float]) -> float:
    """Per-step EMA decay for a half-life in images, capped early in training at ``rampup_ratio * cur_nimg``."""
    halflife = halflife_kimg * 1000 if rampup_ratio is None else min(halflife_kimg * 1000, cur_nimg * rampup_ratio)
    return 0.5 ** (batch_size / max(halflife, 1e-8))


# ----------------------------------------------------------------------------
# Resume.


def _transfer_weights(resume_pkl: str, net: torch.nn.Module, ema: torch.nn.Module) -> None:
    """--transfer: start ``net`` and ``ema`` from the EMA weights of a network snapshot (names that match)."""
    from formats.network_io import NetworkLoadError, load_network
    dist.print0(f'Transfer: starting from the weights of {resume_pkl}')
    try:
        source_net = load_network(resume_pkl, device='cpu')
        if getattr(net, 'consistency', False):
            # A consistency model is built around the snapshot's own network: every tensor must be found.
            from training.consistency import copy_teacher_weights
            copy_teacher_weights(source_net, net)
            copy_teacher_weights(source_net, ema)
            return
        misc.copy_params_and_buffers(src_module=source_net, dst_module=net, require_all=False)
        misc.copy_params_and_buffers(src_module=source_net, dst_module=ema, require_all=False)
    except (NetworkLoadError, ValueError) as err:
        raise TrainingError(f'{"--init" if getattr(net, "consistency", False) else "--transfer"}: {err}') from None


def _resume(path: str, cur_nimg: int, tick_nimg: int, net: torch.nn.Module, ema: torch.nn.Module,
            optimizer: torch.optim.Optimizer, power_emas: Optional[PowerFunctionEMA],
            sampler: misc.InfiniteSampler, device: torch.device) -> tuple[int, int, Optional[int]]:
    """Load the training state ``path`` into the training objects; returns (images seen, next tick, data position).

    ``cur_nimg`` is the progress to assume when the state does not record it. The data position is None for a
    state written by the original code: it records no position or random states.
    """
    dist.print0(f'Resuming from the training state {path}')
    data = training_state.read_training_state(path)
    tag = training_state.STATE_PATTERN.fullmatch(os.path.basename(path))
    fallback = None
    if tag is not None:
        fallback = os.path.join(os.path.dirname(path), _snapshot_file_name(tag.group(1)))
    training_state.load_training_state(data, net, ema, optimizer, source=path, ema_fallback=fallback)
    training_state.load_power_emas(power_emas, data, path)
    cur_nimg = int(data['step']) if 'step' in data else cur_nimg
    if data.get('format') != training_state.STATE_FORMAT:
        dist.print0('Note: this training state was written by the original code; it has no data position or '
                    'random states, so the data order cannot be restored (training continues with a fresh '
                    'order; network, EMA, optimizer and step are restored).')
        return cur_nimg, cur_nimg // tick_nimg, None
    sampler.load_state_dict(data['sampler'])
    rng = data['rng']
    if len(rng) == dist.get_world_size():
        training_state.set_host_rng_state(rng[dist.get_rank()], device)
    else:
        dist.print0(f'Note: the state was written by {len(rng)} process(es), this run has {dist.get_world_size()}; '
                    f'data order continues exactly, host random states restart.')
    return cur_nimg, int(data['cur_tick']), int(data['data_position'])


# ----------------------------------------------------------------------------
# Tick reporting.


class _TickReporter:
    """The end of a tick: statistics into training_stats, the status line, and (rank 0) a stats.jsonl line and
    TensorBoard scalars. The files open at the first tick and close with the ``with`` block."""

    def __init__(self, run_dir: str, device: torch.device, start_time: float, tensorboard: bool) -> None:
        self.run_dir, self.device, self.start_time, self.tensorboard = run_dir, device, start_time, tensorboard
        self.stats_file: Any = None
        self.tensorboard_writer: Any = None

    def __enter__(self) -> '_TickReporter':
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.stats_file is not None:
            self.stats_file.close()
        if self.tensorboard_writer is not None:
            self.tensorboard_writer.close()

    def __call__(self, cur_tick: int, cur_nimg: int, tick_start_nimg: int, tick_start_time: float,
                 tick_end_time: float, maintenance_sec: float) -> float:
        """Report the tick that ends now; returns its mean training loss over all ranks."""
        device = self.device
        report0 = training_stats.report0
        report0('Progress/tick', cur_tick)
        report0('Progress/kimg', cur_nimg / 1e3)
        report0('Timing/total_sec', tick_end_time - self.start_time)
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
            f'time {dnnlib.util.format_time(tick_end_time - self.start_time):<12s}',
            f'sec/tick {tick_end_time - tick_start_time:<7.1f}',
            f'sec/kimg {collector.mean("Timing/sec_per_kimg"):<7.2f}',
            f'maintenance {maintenance_sec:<6.1f}',
            f'cpumem {collector.mean("Resources/cpu_mem_gb"):<6.2f}',
            f'gpumem {gpu_mem:<6.2f}',
            f'reserved {gpu_reserved:<6.2f}',
            f'loss {loss_mean:.4f}',
        ]))
        if dist.is_main():
            if self.stats_file is None:
                self.stats_file = open(os.path.join(self.run_dir, 'stats.jsonl'), 'at', encoding='utf-8')
            self.stats_file.write(json.dumps(dict(collector.as_dict(), timestamp=time.time())) + '\n')
            self.stats_file.flush()
            if self.tensorboard:
                if self.tensorboard_writer is None:
                    self.tensorboard_writer = open_tensorboard(self.run_dir)
                write_tensorboard_scalars(self.tensorboard_writer, collector.as_dict(), cur_nimg)
        return loss_mean


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


def _nan_advice(run_dir: str, resume_state_dump: Optional[str]) -> str:
    """What to do after a NaN/Inf loss: resume from the newest training state that exists, or start over."""
    states = training_state.list_states(run_dir)
    if resume_state_dump is not None and os.path.isfile(resume_state_dump):
        kimg = training_state.state_kimg(resume_state_dump)
        states.append((kimg if kimg is not None else -1, resume_state_dump))
    if not states:
        return ('no training state was written before it (one is written every --dump ticks), so start over '
                'with a lower --lr or check the data')
    return f'lower --lr or check the data, then continue with --resume={max(states)[1]}'


# ----------------------------------------------------------------------------
# Checkpointing.


def _snapshot_file_name(tag: str) -> str:
    """``network-snapshot-{tag}.pkl`` for a :func:`training.training_state.kimg_tag`."""
    return f'network-snapshot-{tag}.pkl'


def _save_snapshots(run_dir: str, tag: str, nimg: int, ema: torch.nn.Module, snapshot_format: str,
                    net: torch.nn.Module, power_emas: Optional[PowerFunctionEMA], batch_size: int,
                    **contents: Any) -> None:
    """The snapshots of this tick: EDM's pickle and/or the weights-only file (``snapshot_format``), and with
    ``--phema`` one pickle per tracked power-function EMA. ``contents``: the snapshot's other entries."""
    snapshot_path = os.path.join(run_dir, _snapshot_file_name(tag))
    if snapshot_format in ('pkl', 'both'):
        _write_snapshot(snapshot_path, ema=ema, **contents)
    if snapshot_format in ('weights', 'both') and dist.is_main():
        _write_weights(snapshot_path, ema, kimg=nimg / 1e3)
    if power_emas is not None:
        _write_power_ema_snapshots(run_dir, power_emas, net, nimg, batch_size, **contents)


def _write_power_ema_snapshots(run_dir: str, power_emas: PowerFunctionEMA, net: torch.nn.Module, nimg: int,
                               batch_size: int, **snapshot: Any) -> None:
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
        training_state.save_atomically(path, functools.partial(pickle.dump, data))


def _write_weights(snapshot_path: str, ema: torch.nn.Module, kimg: float) -> None:
    """The weights-only twin of a snapshot (``X.weights.pt`` beside ``X.pkl``), safe to share; rank 0 only."""
    from formats import export
    try:
        record = export.network_record(ema, metadata=dict(kimg=kimg), source='--snap-format')
    except export.WeightsFormatError as err:
        raise TrainingError(str(err)) from None
    training_state.save_atomically(export.weights_path_for(snapshot_path), functools.partial(torch.save, record))
