"""Cheap statistics reporting for training loops, reduced across ranks once per tick.

Anywhere in the code, ``report(name, value)`` adds the elements of ``value`` (a number, list, array or tensor,
on any device) to running moments ``[count, sum, sum of squares]`` kept on the value's device. Nothing is
copied to the host then, so reporting a loss on every step costs no synchronisation. ``report0`` does the
same on rank 0 only (for values every rank knows, such as timings).

A :class:`Collector` turns the moments into numbers: ``update()`` moves everything reported since the previous
``update()`` to the host, sums it over all ranks with a single float64 all-reduce, and exposes ``num``, ``mean``
and ``std`` per name, or all of them at once with ``as_dict()`` (what the training loop writes to
``stats.jsonl`` each tick). Every rank must call ``update()`` at the same points, and must have reported each
name at least once (``report(name, [])`` reports nothing but registers the name).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

import dnnlib
from torch_utils import distributed as dist

#: Moments kept per statistic: number of elements, their sum and the sum of their squares.
NUM_MOMENTS = 3
#: Dtype of the moments and of the reductions that produce them (float32 sums lose digits on large tensors).
MOMENT_DTYPE = torch.float64

_pending: dict[str, dict[torch.device, torch.Tensor]] = {}  # name -> device -> moments since the last sync
_totals: dict[str, torch.Tensor] = {}                         # name -> all-rank moments since program start (CPU)


def report(name: str, value: Any) -> Any:
    """Add the elements of ``value`` to statistic ``name``; returns ``value`` unchanged."""
    per_device = _pending.setdefault(name, {})
    elems = torch.as_tensor(value).detach()
    if elems.numel() == 0:
        return value
    elems = elems.flatten().to(MOMENT_DTYPE)
    moments = torch.stack([torch.ones_like(elems).sum(), elems.sum(), elems.square().sum()])
    slot = per_device.get(moments.device)
    if slot is None:
        per_device[moments.device] = moments
    else:
        slot.add_(moments)
    return value


def report0(name: str, value: Any) -> Any:
    """Like :func:`report`, but only rank 0's values count (the name is still registered on every rank)."""
    report(name, value if dist.get_rank() == 0 else [])
    return value


def _sync_device() -> torch.device:
    """Where the cross-rank reduction happens: the rank's CUDA device for NCCL, the CPU otherwise."""
    if dist.is_distributed() and torch.distributed.get_backend() == 'nccl':
        return dist.get_device()
    return torch.device('cpu')


def _sync(names: list[str]) -> None:
    """Fold everything reported under ``names`` into the all-rank totals (one all-reduce)."""
    if not names:
        return
    device = _sync_device()
    deltas = torch.zeros([len(names), NUM_MOMENTS], dtype=MOMENT_DTYPE, device=device)
    for row, name in enumerate(names):
        for moments in _pending.get(name, {}).values():
            deltas[row].add_(moments.to(device))
        _pending[name] = {}
    dist.all_reduce(deltas)
    deltas = deltas.cpu()
    for row, name in enumerate(names):
        total = _totals.setdefault(name, torch.zeros([NUM_MOMENTS], dtype=MOMENT_DTYPE))
        total.add_(deltas[row])


class Collector:
    """Averages of the statistics whose names fully match ``regex``, over the interval between the last two
    calls of :meth:`update`.

    With ``keep_previous`` (default), a statistic that received nothing during an interval keeps the values of
    the interval before; otherwise it reads as empty (``num`` 0, ``mean`` and ``std`` NaN).
    """

    def __init__(self, regex: str = '.*', keep_previous: bool = True):
        self._regex = re.compile(regex)
        self._sticky = keep_previous
        self._seen: dict[str, torch.Tensor] = {}     # totals at the previous update()
        self._interval: dict[str, torch.Tensor] = {}  # moments of the last interval
        # Start the first interval now: whatever was reported before this collector existed is not its business.
        self.update()
        self._interval.clear()

    def names(self) -> list[str]:
        """Names reported so far (on this rank) that this collector follows, sorted."""
        return sorted(name for name in _pending.keys() | _totals.keys() if self._regex.fullmatch(name))

    def update(self) -> None:
        """Close the current interval: reduce across ranks and make its averages readable."""
        if not self._sticky:
            self._interval.clear()
        names = self.names()
        _sync(names)
        for name in names:
            total = _totals[name]
            before = self._seen.get(name)
            delta = total.clone() if before is None else total - before
            self._seen[name] = total.clone()
            if delta[0] != 0:
                self._interval[name] = delta

    def _moments(self, name: str) -> torch.Tensor:
        return self._interval.get(name, torch.zeros([NUM_MOMENTS], dtype=MOMENT_DTYPE))

    def num(self, name: str) -> int:
        return int(self._moments(name)[0])

    def mean(self, name: str) -> float:
        count, total, _ = self._moments(name).tolist()
        return total / count if count else float('nan')

    def std(self, name: str) -> float:
        """Population standard deviation (0 for a single value, NaN when empty or not finite)."""
        count, total, squares = self._moments(name).tolist()
        if count == 0 or not math.isfinite(total):
            return float('nan')
        if count == 1:
            return 0.0
        mean = total / count
        return math.sqrt(max(squares / count - mean * mean, 0.0))

    def as_dict(self) -> dnnlib.EasyDict:
        """``{name: {num, mean, std}}`` for every followed name."""
        return dnnlib.EasyDict({name: dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
                                for name in self.names()})

    def __getitem__(self, name: str) -> float:
        return self.mean(name)


#: The collector the training loop reads each tick.
default_collector = Collector()
