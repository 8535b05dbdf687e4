"""Small torch helpers shared by the training code.

* :func:`constant` — cached constant tensors, so repeated small constants are not re-uploaded to the device.
* :func:`assert_shape` — shape checks with ``None`` as a wildcard.
* :func:`data_loader_kwargs` — the one worker rule of every DataLoader (spawned workers, prefetch, pinning).
* :class:`InfiniteSampler` — an endless, seeded, rank-sharded sampler whose position can be saved and restored,
  so a resumed run neither replays nor skips data.
* :func:`copy_params_and_buffers`, :func:`named_params_and_buffers` — move weights between modules by name.
* :func:`ddp_sync` — skip the DDP gradient all-reduce on all but the last accumulation round.
* :func:`check_ddp_consistency` — verify that every rank holds the same weights.
* :func:`print_module_summary` — a table of parameters, buffers and output shapes per submodule.
"""

from __future__ import annotations

import contextlib
import re
from collections import OrderedDict
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from torch_utils import distributed as dist

# ----------------------------------------------------------------------------
# Constants and shape checks.

_constants: dict[tuple, torch.Tensor] = {}


def constant(value: Any, shape: Optional[Sequence[int]] = None, dtype: Optional[torch.dtype] = None,
             device: Optional[torch.device | str] = None,
             memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """A tensor holding ``value`` (broadcast to ``shape``), created once per (value, shape, dtype, device).

    Callers must not modify the result in place: it is shared.
    """
    array = np.asarray(value)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    device = torch.device('cpu') if device is None else torch.device(device)
    shape_key = None if shape is None else tuple(shape)
    key = (array.dtype.str, array.shape, array.tobytes(), shape_key, dtype, device, memory_format)
    cached = _constants.get(key)
    if cached is None:
        cached = torch.as_tensor(array.copy(), dtype=dtype, device=device)
        if shape_key is not None:
            cached = cached.expand(shape_key)
        cached = cached.contiguous(memory_format=memory_format)
        _constants[key] = cached
    return cached


def assert_shape(tensor: torch.Tensor, ref_shape: Sequence[Optional[int]]) -> None:
    """Raise AssertionError unless ``tensor.shape`` matches ``ref_shape`` (``None`` matches any size)."""
    expected = list(ref_shape)
    if len(expected) != tensor.ndim:
        raise AssertionError(f'expected {len(expected)} dimensions, got {tensor.ndim} (shape {list(tensor.shape)})')
    for axis, (size, want) in enumerate(zip(tensor.shape, expected)):
        if want is not None and int(size) != int(want):
            raise AssertionError(f'dimension {axis} has size {int(size)}, expected {int(want)} '
                                 f'(shape {list(tensor.shape)} vs {list(ref_shape)})')


# ----------------------------------------------------------------------------
# DataLoader workers.


def data_loader_kwargs(num_workers: int, pin_memory: bool = True, prefetch_factor: int = 2) -> dict[str, Any]:
    """Keyword arguments for ``torch.utils.data.DataLoader``: the one worker rule of the project's loaders.

    With ``num_workers`` > 0 the workers are started by spawn, as EDM's loaders are: a process that has initialised
    CUDA or NCCL cannot safely fork (the child inherits driver state and locks it cannot use), and the default
    start method on Linux is fork. Each worker prefetches ``prefetch_factor`` batches. Without workers the loader
    runs in this process, and the worker-only arguments are left out (DataLoader refuses them). ``pin_memory``
    (page-locked host batches) only helps copies to a CUDA device.
    """
    kwargs: dict[str, Any] = dict(num_workers=int(num_workers), pin_memory=bool(pin_memory))
    if num_workers > 0:
        kwargs.update(prefetch_factor=int(prefetch_factor), multiprocessing_context='spawn')
    return kwargs


# ----------------------------------------------------------------------------
# Endless data order.

#: Pass-start snapshots kept by a sampler are capped at about this many bytes in total.
_SNAPSHOT_BUDGET_BYTES = 16 << 20


class InfiniteSampler(Sampler):
    """Endless index stream for a DataLoader: shuffled, seeded, split between ranks, resumable.

    All ranks walk the same *global* stream. With ``shuffle``, it starts from a seeded permutation, and after
    visiting position ``i`` the element there is swapped with one drawn from the ``window`` positions up to and
    including ``i`` (``window = round(window_size * len(dataset))``), as in the original sampler. Unlike the
    original, the draw never wraps around to the end of the array (positions not yet visited in the current
    pass), so every pass over the positions is an exact permutation of the dataset: one pass is one epoch, in
    which each image is seen exactly once by exactly one rank. Consecutive passes still differ.

    Global index ``g`` belongs to rank ``(g // block_size) % num_replicas``. ``block_size=1`` interleaves the
    ranks; the training loop uses one block per rank per step, so that step ``s`` covers global indices
    ``[s * batch, (s + 1) * batch)`` for any number of ranks.

    ``start_index`` (or :meth:`load_state_dict`) makes iteration begin at that global index, exactly as if the
    stream had been consumed up to there. :meth:`state_dict` returns what is needed to continue at a given
    global index; it stores the permutation at the start of the current pass, so restoring replays at most one
    pass of swaps instead of the whole history.
    """

    def __init__(self, dataset: Any, rank: int = 0, num_replicas: int = 1, shuffle: bool = True, seed: int = 0,
                 window_size: float = 0.5, block_size: int = 1, start_index: int = 0):
        # Deliberately no data_source argument to Sampler.__init__: current torch no longer accepts one.
        super().__init__()
        size = len(dataset)
        if size <= 0:
            raise ValueError('InfiniteSampler: the dataset is empty')
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f'InfiniteSampler: rank {rank} is not in [0, {num_replicas})')
        if not 0 <= window_size <= 1:
            raise ValueError(f'InfiniteSampler: window_size must lie in [0, 1], got {window_size}')
        if block_size < 1 or start_index < 0:
            raise ValueError('InfiniteSampler: block_size must be >= 1 and start_index >= 0')
        self.dataset_size = size
        self.rank = int(rank)
        self.num_replicas = int(num_replicas)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.window_size = float(window_size)
        self.block_size = int(block_size)
        self.start_index = int(start_index)
        self.window = int(np.rint(size * self.window_size)) if self.shuffle else 0
        self._loaded_pass: Optional[tuple[int, np.ndarray, Any]] = None  # from load_state_dict()
        self._passes: OrderedDict[int, tuple[np.ndarray, Any]] = OrderedDict()
        self._max_passes = max(2, _SNAPSHOT_BUDGET_BYTES // (8 * size + 4096))
        self.next_index = self.start_index  # global index the most recent iterator will look at next

    # -- the stream ---------------------------------------------------------

    def _initial_pass(self) -> tuple[np.ndarray, Optional[np.random.RandomState]]:
        order = np.arange(self.dataset_size)
        if not self.shuffle:
            return order, None
        rng = np.random.RandomState(seed=self.seed)
        rng.shuffle(order)
        return order, rng

    def _swap(self, order: np.ndarray, rnd: Optional[np.random.RandomState], g: int) -> None:
        """Apply the window swap that follows a visit of global index ``g``."""
        if self.window >= 2:
            i = g % self.dataset_size
            j = i - rnd.randint(min(self.window, i + 1))
            order[[i, j]] = order[[j, i]]

    def _state_at(self, index: int) -> tuple[np.ndarray, Optional[np.random.RandomState]]:
        """(order, rng) as they are just before global index ``index`` is visited."""
        size = self.dataset_size
        pass_no = index // size
        # Start from the latest remembered pass at or before the target; the initial order otherwise.
        known = {p: snap for p, snap in self._passes.items() if p <= pass_no}
        if self._loaded_pass is not None and self._loaded_pass[0] <= pass_no:
            known.setdefault(self._loaded_pass[0], self._loaded_pass[1:])
        if known:
            begin = max(known)
            order, rng_state = known[begin]
            start = begin * size
        else:
            start = 0
            order, rnd = self._initial_pass()
            rng_state = None if rnd is None else rnd.get_state()
        order = order.copy()
        rnd = None
        if self.shuffle:
            rnd = np.random.RandomState()
            rnd.set_state(rng_state)
        for g in range(start, index):
            self._swap(order, rnd, g)
        return order, rnd

    def _remember_pass(self, pass_no: int, order: np.ndarray, rnd: Optional[np.random.RandomState]) -> None:
        self._passes[pass_no] = (order.copy(), None if rnd is None else rnd.get_state())
        while len(self._passes) > self._max_passes:
            self._passes.popitem(last=False)

    def __iter__(self) -> Iterator[int]:
        size, block, replicas = self.dataset_size, self.block_size, self.num_replicas
        g = self.start_index
        order, rnd = self._state_at(g)
        if g % size == 0:
            self._remember_pass(g // size, order, rnd)
        while True:
            if (g // block) % replicas == self.rank:
                self.next_index = g + 1
                yield int(order[g % size])
            self._swap(order, rnd, g)
            g += 1
            if g % size == 0:
                self._remember_pass(g // size, order, rnd)

    # -- saving and restoring the position -------------------------------------

    def restart_at(self, index: int, seed: int) -> None:
        """Begin at global ``index`` with a fresh order drawn from ``seed``, without replaying the history.

        For continuing a run whose data position was not recorded: the order differs from the original run's,
        but the stream stays well shuffled and the cost is at most one pass of swaps.
        """
        rnd = np.random.RandomState(seed % (1 << 32))
        order = np.arange(self.dataset_size)
        if self.shuffle:
            rnd.shuffle(order)
        self.start_index = self.next_index = int(index)
        self._loaded_pass = (int(index) // self.dataset_size, order, rnd.get_state() if self.shuffle else None)
        self._passes.clear()

    def state_dict(self, index: Optional[int] = None) -> dict:
        """Everything needed to continue the global stream at ``index`` (default: where iteration stands).

        ``index`` is usually the number of global items the consumer has actually used; it may lag behind
        the iterator (DataLoader prefetching) but not by more than the remembered passes.
        """
        index = self.next_index if index is None else int(index)
        pass_no = index // self.dataset_size
        if pass_no in self._passes:
            order, rng_state = self._passes[pass_no]
        else:
            order, rnd = self._state_at(pass_no * self.dataset_size)
            rng_state = None if rnd is None else rnd.get_state()
        return dict(index=index, dataset_size=self.dataset_size, seed=self.seed, shuffle=self.shuffle,
                    window_size=self.window_size, pass_no=pass_no, pass_order=order.copy(),
                    pass_rng=rng_state)

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` (rank, number of ranks and block size may differ)."""
        for key in ('dataset_size', 'seed', 'shuffle', 'window_size'):
            mine = getattr(self, key)
            if state[key] != mine:
                raise ValueError(f'sampler state does not match this sampler: {key} is {state[key]!r}, '
                                 f'expected {mine!r}')
        self.start_index = self.next_index = int(state['index'])
        self._loaded_pass = (int(state['pass_no']), np.asarray(state['pass_order']).copy(), state['pass_rng'])
        self._passes.clear()


# ----------------------------------------------------------------------------
# Parameters and buffers.


def named_params_and_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f'expected a torch.nn.Module, got {type(module).__name__}')
    return [*module.named_parameters(), *module.named_buffers()]


def params_and_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    return [tensor for _name, tensor in named_params_and_buffers(module)]


@torch.no_grad()
def copy_params_and_buffers(src_module: torch.nn.Module, dst_module: torch.nn.Module,
                            require_all: bool = False) -> None:
    """Copy every tensor of ``dst_module`` that ``src_module`` has under the same name.

    With ``require_all``, a tensor missing from the source or a shape mismatch is an error naming the tensor.
    """
    source = dict(named_params_and_buffers(src_module))
    missing = []
    for name, target in named_params_and_buffers(dst_module):
        value = source.get(name)
        if value is None:
            missing.append(name)
            continue
        if value.shape != target.shape:
            raise ValueError(f'{name}: source has shape {list(value.shape)}, destination {list(target.shape)}')
        target.copy_(value)
    if require_all and missing:
        more = f' (and {len(missing) - 3} more)' if len(missing) > 3 else ''
        raise ValueError(f'source module lacks {", ".join(missing[:3])}{more}')


# ----------------------------------------------------------------------------
# DistributedDataParallel helpers.


@contextlib.contextmanager
def ddp_sync(module: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Inside the block, a DDP module all-reduces gradients only if ``sync`` (plain modules: no effect)."""
    skip_allreduce = not sync and isinstance(module, torch.nn.parallel.DistributedDataParallel)
    with module.no_sync() if skip_allreduce else contextlib.nullcontext():
        yield


def check_ddp_consistency(module: torch.nn.Module, ignore_regex: Optional[str] = None) -> None:
    """Assert that every parameter and buffer equals rank 0's copy (NaNs count as equal). No-op for one rank."""
    if not dist.is_distributed():
        return
    pattern = re.compile(ignore_regex) if ignore_regex is not None else None
    for name, value in named_params_and_buffers(module):
        full_name = f'{type(module).__name__}.{name}'
        if pattern is not None and pattern.fullmatch(full_name):
            continue
        mine = value.detach()
        if mine.is_floating_point():
            mine = torch.nan_to_num(mine)
        reference = mine.clone()
        torch.distributed.broadcast(reference, src=0)
        if not torch.equal(mine, reference):
            raise AssertionError(f'{full_name} differs between rank {dist.get_rank()} and rank 0')


# ----------------------------------------------------------------------------
# Module summary table.


def print_module_summary(module: torch.nn.Module, inputs: Sequence[Any], max_nesting: int = 3,
                         skip_redundant: bool = True) -> Any:
    """Run ``module(*inputs)`` once and print, per submodule down to ``max_nesting`` levels, the number of
    parameters and buffers it owns (not counted before) and the shapes and dtypes of its tensor outputs.

    Returns the module's output.
    """
    if not isinstance(inputs, (list, tuple)):
        raise TypeError('print_module_summary: inputs must be a list or tuple of positional arguments')
    records: list[tuple[torch.nn.Module, list[torch.Tensor]]] = []
    depth = [0]

    def enter(_mod: torch.nn.Module, _args: Any) -> None:
        depth[0] += 1

    def leave(mod: torch.nn.Module, _args: Any, output: Any) -> None:
        depth[0] -= 1
        if depth[0] <= max_nesting:
            outs = output if isinstance(output, (list, tuple)) else [output]
            records.append((mod, [t for t in outs if isinstance(t, torch.Tensor)]))

    handles = []
    for sub in module.modules():
        handles.append(sub.register_forward_pre_hook(enter))
        handles.append(sub.register_forward_hook(leave))
    try:
        result = module(*inputs)
    finally:
        for handle in handles:
            handle.remove()

    names = {sub: name for name, sub in module.named_modules()}
    seen: set[int] = set()
    header = [type(module).__name__, 'Parameters', 'Buffers', 'Output shape', 'Datatype']
    rows = [header, ['---'] * len(header)]
    total_params = total_buffers = 0
    for mod, outs in records:
        params = [t for t in mod.parameters() if id(t) not in seen]
        buffers = [t for t in mod.buffers() if id(t) not in seen]
        fresh_outs = [t for t in outs if id(t) not in seen]
        seen.update(id(t) for t in params + buffers + fresh_outs)
        if skip_redundant and not (params or buffers or fresh_outs):
            continue
        n_params = sum(t.numel() for t in params)
        n_buffers = sum(t.numel() for t in buffers)
        total_params += n_params
        total_buffers += n_buffers
        label = '<top-level>' if mod is module else names.get(mod, type(mod).__name__)
        shapes = [str(list(t.shape)) for t in outs] or ['-']
        dtypes = [str(t.dtype).replace('torch.', '') for t in outs] or ['-']
        suffix = ':0' if len(outs) > 1 else ''
        rows.append([label + suffix, str(n_params) if n_params else '-', str(n_buffers) if n_buffers else '-',
                     shapes[0], dtypes[0]])
        rows.extend([f'{label}:{k}', '-', '-', shapes[k], dtypes[k]] for k in range(1, len(outs)))
    rows.append(['---'] * len(header))
    rows.append(['Total', str(total_params), str(total_buffers), '-', '-'])

    widths = [max(len(row[col]) for row in rows) for col in range(len(header))]
    print()
    for row in rows:
        print('  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print()
    return result


def non_finite_tensors(net: Any) -> list[tuple[str, int]]:
    """``[(name, count), ...]``: the parameters and buffers of ``net`` holding NaN or infinity (empty for a
    non-module denoiser)."""
    if not isinstance(net, torch.nn.Module):
        return []
    found = []
    for name, tensor in [*net.named_parameters(), *net.named_buffers()]:
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor.detach())).sum())
            if bad:
                found.append((name, bad))
    return found


def non_finite_summary(net: Any) -> Optional[str]:
    """``'the network holds non-finite weights (NaN/inf in a (1), b (4) and 2 more tensors)'`` for the first
    tensors :func:`non_finite_tensors` finds, or None when every weight is finite."""
    found = non_finite_tensors(net)
    if not found:
        return None
    listed = ', '.join(f'{name} ({count})' for name, count in found[:3])
    more = f' and {len(found) - 3} more tensors' if len(found) > 3 else ''
    return f'the network holds non-finite weights (NaN/inf in {listed}{more})'
