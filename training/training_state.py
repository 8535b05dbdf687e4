"""Training states: the ``training-state-{kimg:06d}.pt`` files a run continues from, exactly.

A training state is a ``torch.save`` of a dict. Keys the original PFGM++ code writes and reads, with the same
meaning:
    ``net``             the network being trained (persistence module, training mode)
    ``ema``             the EMA network (persistence module)
    ``optimizer_state`` ``optimizer.state_dict()``
    ``step``            images seen so far (``cur_nimg``)
Keys our training loop adds for exact resumption (absent from the original's files, which therefore resume with a
fresh data order and fresh random states):
    ``format``           :data:`STATE_FORMAT`; ``format_version``: :data:`STATE_VERSION`
    ``cur_tick``         index of the next tick; ``tick_start_nimg``: ``step`` at the start of that tick
    ``data_position``    global data-stream index of the next step's first image
    ``sampler``          :meth:`torch_utils.misc.InfiniteSampler.state_dict` at ``data_position``
    ``rng``              one dict per rank: ``torch``, ``cuda`` (or None), ``numpy``, ``python`` states
    ``world_size``, ``seed``, ``batch_size``, ``loss_scaling``
    ``options``          the loop's keyword arguments (JSON-compatible), for reference
    ``phema``            with ``--phema``: the tracked sigma_rel values and their averaged weights
                         (:meth:`training.phema.PowerFunctionEMA.state_dict`)
Loading needs ``torch.load(..., weights_only=False)`` because of the pickled modules: load only files you trust.

This module is the one home of the file name, the keys, reading, loading and (atomic) writing;
:mod:`training.run_dir` (``--resume=auto``) and :mod:`training.training_loop` import it.
"""

from __future__ import annotations

import functools
import glob
import os
import pickle
import random
import re
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc

if TYPE_CHECKING:
    from training.phema import PowerFunctionEMA

#: Marks a training state written by our loop (the original's states have no such key).
STATE_FORMAT = 'pfgmpp-training-state'
STATE_VERSION = 1
#: File names of training states in a run directory; the group is the kimg (see :func:`kimg_tag`).
STATE_GLOB = 'training-state-*.pt'
STATE_PATTERN = re.compile(r'training-state-(\d+)\.pt')


class TrainingError(RuntimeError):
    """A problem with the configuration or the inputs of a training run, reported to the user as one line."""


# ----------------------------------------------------------------------------
# File names.


def kimg_tag(nimg: int) -> str:
    """The kimg part of checkpoint file names: thousands of images seen, rounded down, at least six digits."""
    return f'{nimg // 1000:06d}'


def state_file_name(tag: str) -> str:
    """``training-state-{tag}.pt`` for a :func:`kimg_tag`."""
    return f'training-state-{tag}.pt'


def state_kimg(path: str) -> Optional[int]:
    """The kimg in the name of a training-state file, or None when ``path`` is not named like one."""
    match = STATE_PATTERN.fullmatch(os.path.basename(path))
    return int(match.group(1)) if match else None


def list_states(run_dir: str) -> list[tuple[int, str]]:
    """(kimg, path) of every training-state file in ``run_dir`` (none when it is not a directory)."""
    if not run_dir or not os.path.isdir(run_dir):
        return []
    found = []
    for path in glob.glob(os.path.join(glob.escape(run_dir), STATE_GLOB)):
        kimg = state_kimg(path)
        if kimg is not None and os.path.isfile(path):
            found.append((kimg, path))
    return found


def newest_state(run_dir: str) -> Optional[str]:
    """The training state with the highest kimg in ``run_dir`` (ties: the most recently written), or None."""
    candidates = [(kimg, os.path.getmtime(path), path) for kimg, path in list_states(run_dir)]
    return max(candidates)[2] if candidates else None


# ----------------------------------------------------------------------------
# Host random states.


def host_rng_state(device: torch.device) -> dict[str, Any]:
    """This process's torch, CUDA (on a CUDA ``device``, else None), numpy and Python generator states."""
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state(device) if device.type == 'cuda' else None,
                numpy=np.random.get_state(), python=random.getstate())


def set_host_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`host_rng_state` returned (the CUDA state only on a CUDA ``device``)."""
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
# Reading.


def read_training_state(path: str) -> dict:
    """``torch.load`` a training state (ours or the original's) onto the CPU.

    Raises:
        TrainingError: the file is missing, unreadable, or not a dict with ``net`` and ``optimizer_state``.
    """
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

    Raises:
        TrainingError: the state's tensors do not fit ``net`` (names or shapes), or its optimiser state does not
            fit ``optimizer``.
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
            load_optimizer_state(optimizer, data['optimizer_state'])
    except (ValueError, KeyError, RuntimeError) as err:
        raise TrainingError(f'--resume {source}: does not fit the network built from the current options '
                            f'({str(err).splitlines()[0]}); use the --arch/--cbase/--cres/... of the original run'
                            ) from None


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """``optimizer.load_state_dict(saved)``, then every per-parameter state tensor shaped like its parameter is
    given that parameter's memory layout (strides).

    ``load_state_dict`` moves the saved moments to the parameter's device and dtype but keeps the layout they were
    saved in. A run resumed with the other --channels-last setting (or a CUDA run resumed on CPU) would then feed
    fused Adam moments whose layout differs from the parameter's: on CPU the step silently comes out wrong, on CUDA
    it raises. Elementwise optimiser updates need only the values, so copying them into the parameter's layout
    changes nothing else.

    Raises:
        ValueError: ``saved`` does not fit the optimiser's parameter groups (from ``load_state_dict``).
    """
    optimizer.load_state_dict(saved)
    for group in optimizer.param_groups:
        for param in group['params']:
            state = optimizer.state.get(param)
            if not state:
                continue
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim() > 1 \
                        and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def load_power_emas(power_emas: Optional[PowerFunctionEMA], data: dict, source: str) -> None:
    """Restore the post-hoc EMAs (``--phema``) a training state tracks into ``power_emas`` (None: not tracked).

    Raises:
        TrainingError: ``power_emas`` is given but the state tracks none (a power-function EMA averages the whole
            run, so it cannot start half-way), or the state's tracked profiles do not fit ``power_emas``.
    """
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


# ----------------------------------------------------------------------------
# Writing.


def _write_failure(err: BaseException) -> Optional[str]:
    """The reason a write failed when ``err`` (or an error it was raised from or during) is an OSError, else None.

    ``torch.save`` reports a failed write (ENOSPC, EDQUOT, EIO) as a RuntimeError of its archive writer raised
    while handling the OSError of the file object.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError):
            return err.strerror or str(err)
        err = err.__cause__ or err.__context__
    return None


def save_atomically(path: str, writer: Callable[[Any], None]) -> None:
    """Call ``writer(f)`` on a temporary file and rename it to ``path`` (:func:`dnnlib.util.atomic_write`);
    nothing appears under ``path`` on failure and the temporary file is removed.

    Raises:
        TrainingError: the file cannot be written (disk full, quota, read-only), in one line; earlier files are
            untouched.
    """
    try:
        with dnnlib.util.atomic_write(path, 'wb') as f:
            writer(f)
    except (OSError, RuntimeError) as err:
        reason = _write_failure(err)
        if reason is None:
            raise
        raise TrainingError(f'{path}: cannot write it ({reason}); earlier snapshots and training states are '
                            f'complete') from None


def make_training_state(*, net: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        cur_nimg: int, next_tick: int, data_position: int, sampler: misc.InfiniteSampler,
                        device: torch.device, seed: int, batch_size: int, loss_scaling: float,
                        options: dict[str, Any], power_emas: Optional[PowerFunctionEMA] = None) -> dict[str, Any]:
    """The dict a training state holds (keys above) at the end of a tick; every rank must call it.

    It gathers the host random states of all ranks (a collective call when distributed).
    """
    state = dict(net=net, ema=ema, optimizer_state=optimizer.state_dict(), step=cur_nimg,
                 format=STATE_FORMAT, format_version=STATE_VERSION, cur_tick=next_tick,
                 tick_start_nimg=cur_nimg, data_position=data_position,
                 sampler=sampler.state_dict(data_position), rng=_gather_objects(host_rng_state(device)),
                 world_size=dist.get_world_size(), seed=seed, batch_size=batch_size, loss_scaling=loss_scaling,
                 options=options)
    if power_emas is not None:
        state['phema'] = power_emas.state_dict()
    return state


def save_training_state(path: str, state: dict[str, Any]) -> None:
    """``torch.save`` a training state to ``path`` atomically (call it on one rank only).

    Raises:
        TrainingError: as :func:`save_atomically`.
    """
    save_atomically(path, functools.partial(torch.save, state))
