"""One code path for one or many processes.

``torchrun`` exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
:func:`init` joins that process group (nccl on CUDA, gloo on CPU). Without those
variables the program is a plain single process and every collective below is a
no-op, so library code never needs to ask which case it is in.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist

_device: Optional[torch.device] = None

#: The documented remedy after a process of a job was lost: a fresh launch continues from the newest training state.
RELAUNCH_REMEDY = 'relaunch the job with --resume=auto to continue from the newest training state'
#: Fragments of the errors a collective raises when another process of the group has gone (gloo, NCCL, the store).
_PEER_LOST_MARKERS = ('Connection reset by peer', 'Connection closed by peer', 'Broken pipe', 'gloo/transport',
                      'NCCL communicator was aborted', 'ProcessGroupNCCL', 'Socket Timeout', 'timed out')


class DeviceUnavailableError(RuntimeError):
    """The requested device cannot be used (CUDA asked for but not available); one line naming --device."""


class ProcessGroupError(RuntimeError):
    """torchrun's process group cannot be formed; one line naming the cause and the remedy."""


class PeerLostError(RuntimeError):
    """A collective failed because another process of the job ended; one line with the remedy."""


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'))


def init(device: Optional[str] = None, backend: Optional[str] = None) -> torch.device:
    """Join torchrun's process group if there is one and pick this rank's device.

    ``device`` may be 'cpu', 'cuda' or None (CUDA when available). Returns the
    device this rank should use; calling again returns the same answer.
    """
    global _device
    if _device is not None:
        return _device
    want_cuda = torch.cuda.is_available() if device is None else str(device).startswith('cuda')
    if want_cuda and not torch.cuda.is_available():
        raise DeviceUnavailableError('--device cuda was requested but CUDA is not available')
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if want_cuda:
        _device = torch.device('cuda', local_rank % torch.cuda.device_count())
        torch.cuda.set_device(_device)
    else:
        _device = torch.device('cpu')

    if launched_by_torchrun() and int(os.environ['WORLD_SIZE']) > 1 and not dist.is_initialized():
        backend = backend or ('nccl' if want_cuda else 'gloo')
        kwargs: dict[str, Any] = dict(backend=backend, init_method='env://')
        if backend == 'nccl':
            kwargs['device_id'] = _device
        try:
            dist.init_process_group(**kwargs)
        except Exception as err:  # the store, gloo and NCCL raise assorted RuntimeError/ValueError subclasses
            _device = None
            raise ProcessGroupError(process_group_failure(err)) from None
    return _device


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def process_group_failure(err: BaseException) -> str:
    """The one line for a process group that cannot be formed: where, why (the error's first line) and what to do.

    A restarted job (torchrun sets TORCHELASTIC_RESTART_COUNT above 0 after ``--max-restarts``) cannot re-form a
    gloo group in current PyTorch; the remedy is a fresh launch that resumes.
    """
    env = os.environ
    where = (f'rank {env.get("RANK", "?")} of {env.get("WORLD_SIZE", "?")} at '
             f'{env.get("MASTER_ADDR", "?")}:{env.get("MASTER_PORT", "?")}')
    restarts = int(env.get('TORCHELASTIC_RESTART_COUNT', '0') or 0)
    if restarts > 0:
        return (f'cannot re-form the process group after torchrun restarted the job (restart {restarts} of '
                f'--max-restarts; {where}): {_first_line(err)}; a restarted group cannot be re-formed on CPU/gloo '
                f'(a PyTorch limitation): run torchrun without --max-restarts and {RELAUNCH_REMEDY}')
    return (f'cannot form the process group ({where}): {_first_line(err)}; check that every process of the job '
            f'started and reaches MASTER_ADDR, then {RELAUNCH_REMEDY}')


def is_peer_failure(err: BaseException) -> bool:
    """Whether ``err``, raised inside a collective while distributed, means another process of the job ended."""
    dist_error = getattr(dist, 'DistError', None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    return isinstance(err, RuntimeError) and any(marker in str(err) for marker in _PEER_LOST_MARKERS)


def peer_lost(err: BaseException) -> PeerLostError:
    """The one-line error for a collective that failed because another process ended (see
    :func:`is_peer_failure`)."""
    return PeerLostError(f'rank {get_rank()}: another process of the job ended ({_first_line(err)}); '
                         f'{RELAUNCH_REMEDY}')


def usable_cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity query on this platform (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def intra_op_thread_limit(usable_cores: Optional[int] = None, local_ranks: Optional[int] = None) -> int:
    """The most intra-op threads one CPU rank should use: usable cores // ranks on this machine, at least 1.

    ``usable_cores`` defaults to :func:`usable_cpu_count`, ``local_ranks`` to torchrun's LOCAL_WORLD_SIZE (1 when
    not launched by torchrun). More threads than cores make OpenMP threads spin while they wait for each other.
    """
    cores = usable_cpu_count() if usable_cores is None else usable_cores
    ranks = int(os.environ.get('LOCAL_WORLD_SIZE', '1')) if local_ranks is None else local_ranks
    return max(1, cores // max(1, ranks))


def limit_intra_op_threads(device: torch.device) -> Optional[str]:
    """On CPU, lower torch's intra-op threads to :func:`intra_op_thread_limit` if they exceed it.

    Returns a one-line note for the caller to print when it lowered them (OMP_NUM_THREADS or torch's default), else
    None; CUDA devices are left alone.
    """
    limit = intra_op_thread_limit()
    threads = torch.get_num_threads()
    if torch.device(device).type != 'cpu' or threads <= limit:
        return None
    torch.set_num_threads(limit)
    ranks = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
    return (f'Threads: {threads} intra-op threads per process lowered to {limit} ({usable_cpu_count()} usable '
            f'cores / {ranks} local process{"es" if ranks != 1 else ""}; more would oversubscribe the cores).')


def get_device() -> torch.device:
    return _device if _device is not None else torch.device('cpu')


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        if dist.get_backend() == 'nccl':
            dist.barrier(device_ids=[get_device().index])
        else:
            dist.barrier()


def rank0_first(work: Callable[[], Any]) -> Any:
    """Run ``work`` on every rank, rank 0 before the others, and return its result.

    A file behind a URL is then downloaded into the cache once. Rank 0 releases the others even when ``work``
    fails; they then meet the same error instead of waiting forever.
    """
    if not is_main():
        barrier()
    try:
        return work()
    finally:
        if is_main():
            barrier()


def all_reduce(tensor: torch.Tensor, op: str = 'sum') -> torch.Tensor:
    """In-place all-reduce; returns ``tensor`` for convenience. No-op for one process."""
    if is_distributed():
        dist.all_reduce(tensor, op={'sum': dist.ReduceOp.SUM, 'max': dist.ReduceOp.MAX,
                                    'min': dist.ReduceOp.MIN}[op])
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from rank ``src`` to every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj: Any, dst: int = 0) -> Optional[list[Any]]:
    """Every rank's picklable ``obj``, as a list by rank, on rank ``dst`` (None on the others)."""
    if not is_distributed():
        return [obj]
    gathered: Optional[list[Any]] = [None] * get_world_size() if get_rank() == dst else None
    dist.gather_object(obj, gathered, dst=dst)
    return gathered


def shard(items: Iterable[Any]) -> list[Any]:
    """The items this rank handles: every world_size-th item starting at its rank."""
    return list(items)[get_rank()::get_world_size()]


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


def progress(iterable: Iterable[Any], **tqdm_kwargs: Any) -> Iterable[Any]:
    """A tqdm progress bar on rank 0 (to stderr, only when it is a terminal or forced); plain iteration elsewhere."""
    if not is_main():
        return iterable
    from tqdm import tqdm
    tqdm_kwargs.setdefault('file', sys.stderr)
    tqdm_kwargs.setdefault('dynamic_ncols', True)
    tqdm_kwargs.setdefault('mininterval', 1.0)
    return tqdm(iterable, **tqdm_kwargs)


def shutdown() -> None:
    """Leave the process group cleanly (safe to call when none was joined)."""
    global _device
    if is_distributed():
        try:
            barrier()
        finally:
            dist.destroy_process_group()
    _device = None
