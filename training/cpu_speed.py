"""Opt-in speed-ups for the layers of ``training.networks``, installed from outside and removable.

``training/networks.py`` is the model as EDM and PFGM++ define it and nothing else, because its source travels inside
every pickle (``torch_utils.persistence``) and must import in the original code. Faster ways to compute the same
layers live here and are switched on per network::

    handle = cpu_speed.accelerate(net)       # or: with cpu_speed.accelerate(net): ...
    ...
    handle.remove()                          # the plain layers again

What ``accelerate`` installs, each part only where its condition holds (otherwise the plain layer runs):

``prepack``   ``Conv2d``'s stride-1 convolution, for gradient-free float32 or bfloat16 calls on channels-last CPU
              tensors outside ``torch.compile``: oneDNN's inference convolution on a weight reordered once per (dtype,
              input shape) instead of at every call. Same products, summed by oneDNN in its own order: within float32
              rounding of ``F.conv2d``. bfloat16 only where ``torch_utils.cpu_support.bf16_supported()`` (oneDNN
              cannot reorder bfloat16 weights elsewhere). Weights changed in place are repacked. NCHW inputs keep
              ``F.conv2d``: the packed primitive returns channels-last, and converting back costs more than it saves.
``upsample``  ``Conv2d`` up-sampling with the 2-tap box filter, for inputs that are not float32 NCHW: nearest-neighbour
              ``F.interpolate`` instead of oneDNN's depthwise transposed convolution, which is slow for bfloat16 and
              channels-last inputs. Every output pixel is one input pixel times exactly 1, so the values are
              bit-identical.
``group_norm`` ``GroupNorm`` of a bfloat16 channels-last CPU tensor with fewer than
              ``BF16_GROUP_NORM_MIN_CHANNELS_PER_GROUP`` channels per group: normalised in float32 and rounded to
              bfloat16 once, because PyTorch's bfloat16 kernel is several times slower there (its float32 kernel is
              not) and no more accurate.
``dropout``   ``UNetBlock`` dropout in training on CPU: the keep mask is ``torch.rand_like(x) >= p`` from the global
              generator, about half the cost of ``F.dropout``'s Bernoulli sampling. Same distribution and scaling,
              other random numbers than ``F.dropout``: a run is reproducible with either choice, not across them.

How: each layer that qualifies has its class replaced by a subclass defined here that overrides one method and
falls back to the plain one; ``remove()`` puts the plain class back. The subclass keeps the plain class's name and
adds no attributes to the layer, and ``torch_utils.persistence`` pickles a layer under the class name and source it
was created with, so a pickle, ``torch.save`` or ``copy.deepcopy`` of an accelerated network is the same as one of the
plain network (a copy is plain). Layers are recognised by class name and the method overridden (``Conv2d`` with
``_convolve`` / ``_resample``, ``UNetBlock`` with ``_dropout``, ``GroupNorm``), so networks unpickled from earlier
versions of this project are accelerated too; other modules, and callables that are not modules, are left alone.

Process-wide: :func:`retain_freed_host_memory` (from ``torch_utils.host_memory``) keeps freed host memory for reuse;
the command-line tools call it at start-up.

The training loop accelerates the network it trains, ``formats.network_io.apply_speed_options`` the networks that
``generate.py`` and ``fid.py`` load. Figures: README, section Speed, and ``python -m bench.run``.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from torch_utils import cpu_support
from torch_utils.host_memory import retain_freed_host_memory

__all__ = ['Acceleration', 'accelerate', 'dropout', 'is_accelerated', 'packed_convolutions_available',
           'retain_freed_host_memory', 'BF16_GROUP_NORM_MIN_CHANNELS_PER_GROUP']

# Below this many channels per group PyTorch's CPU GroupNorm for bfloat16 channels-last inputs takes a slow path
# (mostly in the backward pass); float32 does not.
BF16_GROUP_NORM_MIN_CHANNELS_PER_GROUP = 16

# Packed weights of accelerated Conv2d layers: layer -> {(dtype, input shape): (weight version, packed, bias)}.
# Kept outside the layers so that nothing of this module is pickled with them.
_PACKS: 'weakref.WeakKeyDictionary[nn.Module, dict]' = weakref.WeakKeyDictionary()


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout in training: zero each element with probability ``p``, scale the rest by 1 / (1 - p).

    The keep mask is ``torch.rand_like(x, dtype=float32) >= p`` (global generator), stored in ``x``'s layout and dtype;
    the gradient is masked and scaled the same way. ``p`` in [0, 1]; 0 returns ``x`` itself.
    """
    if p == 0:
        return x
    if p == 1:
        return x * 0
    keep = torch.rand_like(x, dtype=torch.float32).ge_(p)
    return x * keep.to(x.dtype).div_(1 - p)


def packed_convolutions_available() -> bool:
    """True when this torch build has oneDNN and the two operators the packed convolutions use."""
    mkldnn = getattr(torch.ops, 'mkldnn', None)
    return (torch.backends.mkldnn.is_available() and hasattr(torch._C._nn, 'mkldnn_reorder_conv2d_weight')
            and mkldnn is not None and hasattr(mkldnn, '_convolution_pointwise'))


def _packable(x: torch.Tensor) -> bool:
    dtype_ok = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and cpu_support.bf16_supported())
    return (x.device.type == 'cpu' and _is_channels_last(x) and dtype_ok
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling())


def _packed_conv2d(conv: nn.Module, x: torch.Tensor, packs: dict) -> torch.Tensor:
    padding = [conv.weight.shape[-1] // 2] * 2
    unit = [1, 1]
    key = (x.dtype, tuple(x.shape))
    entry = packs.get(key)
    if entry is None or entry[0] != conv.weight._version:  # new shape, or the weights changed in place
        weight = conv.weight.detach().to(x.dtype)
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), padding, unit, unit, 1, list(x.shape))
        bias = None if conv.bias is None else conv.bias.detach().to(x.dtype)
        packs[key] = entry = (conv.weight._version, packed, bias)
    return torch.ops.mkldnn._convolution_pointwise(x, entry[1], entry[2], padding, unit, unit, 1, 'none', [], '')


# ----------------------------------------------------------------------------------------------------------------
# The overrides. Each is a mixin placed before the layer's own class; ``super()`` is the plain computation.


class _PrepackedConvolution:
    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        if _packable(x):
            packs = _PACKS.get(self)
            if packs is not None:
                return _packed_conv2d(self, x, packs)
        return super()._convolve(x)


class _NearestUpsampling:
    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or _is_channels_last(x):
            return F.interpolate(x, scale_factor=2, mode='nearest')
        return super()._resample(x)


class _Float32SmallGroups:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.bfloat16 and x.device.type == 'cpu' and _is_channels_last(x)
                and x.shape[1] // self.num_groups < BF16_GROUP_NORM_MIN_CHANNELS_PER_GROUP):
            return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)
        return super().forward(x)


class _MaskDropout:
    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.device.type == 'cpu':
            return dropout(x, self.dropout)
        return super()._dropout(x)


_MIXINS = (_PrepackedConvolution, _NearestUpsampling, _Float32SmallGroups, _MaskDropout)
_subclasses: dict[tuple[type, tuple[type, ...]], type] = {}


def _accelerated_class(base: type, mixins: tuple[type, ...]) -> type:
    key = (base, mixins)
    if key not in _subclasses:
        names = {name: getattr(base, name) for name in ('__module__', '__qualname__', '__doc__')}
        _subclasses[key] = type(base.__name__, (*mixins, base), names)
    return _subclasses[key]


def _is_box_upsampling(conv: nn.Module) -> bool:
    taps = getattr(conv, 'resample_filter', None)
    if not (getattr(conv, 'up', False) and not getattr(conv, 'fused_resample', False) and taps is not None):
        return False
    return taps.shape[-1] == 2 and bool((taps == taps.flatten()[0]).all()) and bool(taps.flatten()[0] != 0)


def _mixins_for(layer: nn.Module, prepack: bool, upsample: bool, group_norm: bool, dropout: bool) -> tuple[type, ...]:
    cls, name = type(layer), type(layer).__name__
    chosen = []
    if name == 'Conv2d':
        if prepack and hasattr(cls, '_convolve') and getattr(layer, 'weight', None) is not None:
            chosen.append(_PrepackedConvolution)
        if upsample and hasattr(cls, '_resample') and _is_box_upsampling(layer):
            chosen.append(_NearestUpsampling)
    elif name == 'GroupNorm' and group_norm and all(hasattr(layer, a) for a in ('num_groups', 'eps', 'weight')):
        chosen.append(_Float32SmallGroups)
    elif name == 'UNetBlock' and dropout and hasattr(cls, '_dropout'):
        chosen.append(_MaskDropout)
    return tuple(chosen)


class Acceleration:
    """What :func:`accelerate` installed on one network; :meth:`remove` (or leaving a ``with`` block) undoes it.

    ``len(handle)`` is the number of layers it accelerated.
    """

    def __init__(self, layers: list[tuple[nn.Module, type, type]]) -> None:
        self._layers = layers  # (layer, plain class, accelerated class)

    def __len__(self) -> int:
        return len(self._layers)

    def remove(self) -> None:
        """Give every layer its plain class back and drop the packed weights; safe to call twice."""
        for layer, plain, accelerated in self._layers:
            if type(layer) is accelerated:
                layer.__class__ = plain
            _PACKS.pop(layer, None)
        self._layers = []

    def __enter__(self) -> 'Acceleration':
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()


def accelerate(net: Any, *, prepack: bool = True, upsample: bool = True, group_norm: bool = True,
               dropout: bool = True) -> Acceleration:
    """Install the speed-ups of this module (see the module docstring) on the layers of ``net``.

    ``net`` is usually a network of ``training.networks`` (or a module containing some); anything else is accepted
    and left alone. Each keyword switches one speed-up. Layers already accelerated (by an enclosing call) are left
    to that call's handle. Returns the handle that removes what this call installed. ``prepack`` is skipped when
    this torch build lacks oneDNN (:func:`packed_convolutions_available`).
    """
    if not isinstance(net, nn.Module):
        return Acceleration([])
    prepack = prepack and packed_convolutions_available()
    installed = []
    for layer in net.modules():
        if isinstance(layer, _MIXINS):
            continue
        mixins = _mixins_for(layer, prepack, upsample, group_norm, dropout)
        if not mixins:
            continue
        plain = type(layer)
        accelerated = _accelerated_class(plain, mixins)
        layer.__class__ = accelerated
        if _PrepackedConvolution in mixins:
            _PACKS[layer] = {}
        installed.append((layer, plain, accelerated))
    return Acceleration(installed)


def is_accelerated(layer: Optional[nn.Module]) -> bool:
    """True when ``layer`` currently runs one of this module's overrides."""
    return isinstance(layer, _MIXINS)
