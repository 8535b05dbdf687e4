"""One launch of train.py: join the process group, build the configuration, choose the run directory, record the
launch and run the training loop. ``train.py`` parses the flags and calls :func:`train`.

Exit codes (:func:`train` returns the first two; train.py maps the errors to the others):
    0 (:data:`EXIT_FINISHED`)  the run reached --duration
    3 (:data:`EXIT_STOPPED`)   stopped on request (SIGTERM, e.g. a cluster's preemption, or Ctrl-C) after saving a
                               training state: relaunch with ``--resume=auto`` to continue
    1                          an error (one line); 2: a flag that does not fit (click's usage error)
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import dnnlib
from torch_utils import distributed as dist
from training import config as config_lib
from training import run_dir as run_dir_lib
from training.training_state import TrainingError

EXIT_FINISHED = 0
EXIT_STOPPED = 3


def train(opts: dnnlib.EasyDict) -> int:
    """Train as ``opts`` (train.py's flags by name) say; returns :data:`EXIT_FINISHED` or :data:`EXIT_STOPPED`.

    Prints the resolved options, the changes since the run's previous launch and (rank 0) the training progress.

    Raises:
        config.OptionError: a flag that does not fit (also --device cuda without CUDA).
        config.InputError: the dataset or a named file does not fit.
        run_dir.RunDirError: the run directory cannot be used or written.
        TrainingError: the training loop stopped with an error (a NaN loss, an unusable training state, a full
            disk...).
        dist.ProcessGroupError: the torchrun process group cannot be formed.
        dist.PeerLostError: another process of the job ended during training.
    """
    config_lib.check_options(opts)

    from torch_utils import host_memory
    host_memory.retain_freed_host_memory()
    try:
        device = dist.init(opts.device)
    except dist.DeviceUnavailableError as err:
        raise config_lib.OptionError(str(err)) from None
    failed = False
    try:
        return _train_in_group(opts, device)
    except RuntimeError as err:
        failed = True
        if dist.is_distributed() and not isinstance(err, TrainingError) and dist.is_peer_failure(err):
            raise dist.peer_lost(err) from None
        raise
    except BaseException:
        failed = True
        raise
    finally:
        # After a failure another rank may never reach the shutdown barrier (it was killed, or failed on its own):
        # leave without waiting; the process exit closes the group and torchrun ends the job naming the rank.
        if not (failed and dist.is_distributed()):
            dist.shutdown()


def _train_in_group(opts: dnnlib.EasyDict, device: Any) -> int:
    from training import training_loop
    from training.training_state import state_kimg

    for note in (dist.limit_intra_op_threads(device), config_lib.cpu_precision(opts, device)):
        if note:
            dist.print0(note)
    world = dist.get_world_size()
    config_lib.check_batch(opts, world)
    c, desc = config_lib.build_config(opts, world)

    choice = _on_main(lambda: run_dir_lib.choose_run_dir(opts.outdir, desc, config_lib.run_identity(c),
                                                         opts.resume, nosubdir=opts.nosubdir, name=opts.name))
    run_dir, state, skipped = choice.as_tuple()
    c.run_dir = run_dir
    c.seed = _seed(opts, state)
    if state is not None:
        kimg = state_kimg(state)
        c.resume_state_dump = state
        c.resume_kimg = kimg if kimg is not None else 0

    summary = [
        ('Run directory', c.run_dir),
        ('Dataset', f'{c.dataset_kwargs.path} ({"class-conditional" if opts.cond else "unconditional"})'),
        ('Architecture / precond', f'{opts.arch} / {opts.precond}' if not opts.get('consistency')
         else f'consistency tuning of {opts.init}'),
        ('Model', 'diffusion' if c.D is None else f'PFGM++ with D={c.D}'),
        ('Processes', f'{world} on {device.type}'),
        ('Batch', f'{c.batch_size} per step'),
        ('Precision', config_lib.precision(opts)),
    ]
    for path, reason in skipped:
        summary.append(('Skipped', f'{path}: {reason}'))
    if opts.resume == 'auto':
        summary.append(('Resume', state or 'nothing to resume, starting a new run'))
    changes = _changes_since_previous_launch(c, state, world) if dist.is_main() else {}
    dist.print0(f'\nResolved options:\n{json.dumps(c, indent=2)}\n')
    for label, value in summary:
        dist.print0(f'{label + ":":<25}{value}')
    for key, (old, new) in changes.items():
        dist.print0(f'{"Changed on resume:":<25}{key} {json.dumps(old)} -> {json.dumps(new)}')
    dist.print0()
    if opts.dry_run:
        dist.print0('Dry run: nothing was written.')
        return EXIT_FINISHED

    dist.print0('Preparing the run directory...')
    # Rank 0 prepares the folder; its error stops every rank (the others would wait for it forever).
    _on_main(lambda: run_dir_lib.record_segment(c.run_dir, c, world, state))
    logger = None
    if dist.is_main():
        logger = dnnlib.util.Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a')
    try:
        outcome = training_loop.training_loop(**c, device=device)
    finally:
        if logger is not None:
            logger.close()
    if outcome == training_loop.STOPPED:
        dist.print0(f'Stopped on request with the training state saved: exit code {EXIT_STOPPED}; continue with '
                    f'--resume=auto.')
        return EXIT_STOPPED
    return EXIT_FINISHED


def _changes_since_previous_launch(c: dnnlib.EasyDict, state: Optional[str], world: int) -> dict[str, list]:
    """``{option: [before, now]}`` against the launch that wrote ``state`` (empty for a new run); the process
    count appears as ``processes``."""
    if state is None:
        return {}
    previous = run_dir_lib.previous_options(os.path.dirname(state))
    changes = config_lib.option_changes(previous, c) if previous is not None else {}
    segments = run_dir_lib.read_segments(os.path.dirname(state))
    previous_world = segments[-1].get('world_size') if segments else None
    if previous_world not in (None, world):
        changes['processes'] = [previous_world, world]
    return changes


def _on_main(work: Any) -> Any:
    """``work()`` on rank 0, its result (or its one-line error, raised again) on every rank."""
    result, error = None, None
    if dist.is_main():
        try:
            result = work()
        except (ValueError, OSError) as err:
            error = err
    result, error = dist.broadcast_object((result, error))
    if error is not None:
        raise error
    return result


def _seed(opts: dnnlib.EasyDict, state: Optional[str]) -> int:
    """--seed, else the seed of the run being continued (its random streams go on), else a fresh random one."""
    if opts.seed is not None:
        return opts.seed
    previous = None
    if state is not None and dist.is_main():
        options = run_dir_lib.previous_options(os.path.dirname(state))
        previous = options.get('seed') if options is not None else None
    if not isinstance(previous, int):
        previous = int.from_bytes(os.urandom(4), 'little') % (1 << 31)
    return dist.broadcast_object(previous)
