"""Post-training weight quantization for the PFGM++ robustness study.

The PFGM++ paper (Xu et al., 2023, robustness experiments) quantizes a trained
network's weights to k bits and samples from it unchanged otherwise. Which layers
its experiment touches (the fork's quantization script, reconstructed here):

* the weights of the convolution and fully connected layers of the U-Net;
* NOT their biases, NOT the normalisation layers;
* NOT the ``affine`` layers that turn the noise embedding into per-block scale/shift;
* NOT the ``map_*`` layers (noise/label/augmentation embedding network);
* NOT the layers working at the full image resolution (the fork excluded every
  parameter whose name contains "32" -- the 32x32 layers of its CIFAR-10 model,
  i.e. the input convolution, the output layers and the highest-resolution
  blocks). We exclude the ``{R}x{R}`` layers for the network's own resolution R.

Each selected weight tensor is quantized per tensor by default, as the paper
does (``granularity='tensor'``: one scale for the whole tensor), or per output
channel (``granularity='channel'``: each slice ``weight[i]`` along dim 0 gets its
own scale, and zero point for minmax, from its own values), which keeps the
small-valued channels of a tensor from collapsing onto a few levels. A channel
(or tensor) that is all zeros, or constant for minmax, is left as it is.
``scheme='symmetric'`` (default) uses 2**(k-1) - 1 levels each side of zero with
scale max|w| / levels; ``scheme='minmax'`` is the fork's asymmetric uniform
quantizer over [min, max] with an integer zero point. Weights are replaced by
their dequantized values (float), so the network runs exactly as before, just
with coarser weights.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch

SCHEMES = ('symmetric', 'minmax')
GRANULARITIES = ('tensor', 'channel')  # one scale per tensor | one per output channel (slice along dim 0)
MIN_BITS = {'symmetric': 2, 'minmax': 1}  # symmetric needs at least one level on each side of zero
MAX_BITS = 16

# Module class names treated as convolution / fully connected layers (ours, persistence-loaded
# copies of the originals, and torch.nn's own).
QUANTIZED_LAYER_TYPES = ('Conv2d', 'Linear')

# Name fragments of layers the paper's experiment keeps in full precision (see the module docstring).
EXCLUDED_NAME_PARTS = ('affine', 'map')


def check_bits(bits: int, scheme: str = 'symmetric') -> None:
    """Raise ValueError unless ``bits`` is usable with ``scheme``."""
    if scheme not in SCHEMES:
        raise ValueError(f'quantization scheme must be one of {"|".join(SCHEMES)}, got {scheme!r}')
    if int(bits) != bits or not MIN_BITS[scheme] <= bits <= MAX_BITS:
        raise ValueError(f'{scheme} quantization needs {MIN_BITS[scheme]}..{MAX_BITS} bits, got {bits!r}')


def check_granularity(granularity: str) -> None:
    """Raise ValueError unless ``granularity`` is one of :data:`GRANULARITIES`."""
    if granularity not in GRANULARITIES:
        raise ValueError(f'quantization granularity must be one of {"|".join(GRANULARITIES)}, got {granularity!r}')


def quantize_tensor(weight: torch.Tensor, bits: int, scheme: str = 'symmetric',
                    granularity: str = 'tensor') -> torch.Tensor:
    """Quantize ``weight`` to ``bits`` bits and return the dequantized values (same shape and dtype).

    ``granularity='tensor'`` derives one scale (and minmax zero point) from the whole tensor; ``'channel'`` derives
    them for every output channel ``weight[i]`` (dim 0) from that channel alone, with the same arithmetic, so the
    result equals the per-tensor quantization of each slice on its own. An all-zero tensor or channel (constant
    for minmax) is returned unchanged. Raises ValueError for a scheme, bit width or granularity it cannot use.
    """
    check_bits(bits, scheme)
    check_granularity(granularity)
    if granularity == 'channel':
        return _quantize_channels(weight, bits, scheme)
    w = weight.detach().to(torch.float32)
    if scheme == 'symmetric':
        levels = 2 ** (bits - 1) - 1
        peak = w.abs().max()
        if peak == 0:
            return weight.detach().clone()
        step = peak / levels
        return ((w / step).round().clamp(-levels, levels) * step).to(weight.dtype)

    # minmax: 2**bits levels spread over [min, max], zero point truncated to an integer level.
    top = 2.0 ** bits - 1
    lo, hi = w.min(), w.max()
    if hi == lo:
        return weight.detach().clone()
    step = (hi - lo) / top
    zero_point = int(float((-lo / step).clamp(0, top)))
    codes = (zero_point + w / step).clamp(0, top).round()
    return (step * (codes - zero_point)).to(weight.dtype)


def _quantize_channels(weight: torch.Tensor, bits: int, scheme: str) -> torch.Tensor:
    """Per-output-channel :func:`quantize_tensor`: the per-tensor formulas with [C, 1] scales, one row per channel.

    Every operation is elementwise in float32 as in the per-tensor path, so each row gets the same bits as the
    per-tensor quantization of that row alone. Degenerate rows (no spread) get a stand-in step of 1 to keep the
    arithmetic finite and are then replaced by their original values.
    """
    original = weight.detach()
    rows = original.reshape(original.shape[0] if original.ndim else 1, -1)
    w = rows.to(torch.float32)
    if scheme == 'symmetric':
        levels = 2 ** (bits - 1) - 1
        peak = w.abs().amax(dim=1, keepdim=True)
        usable = peak > 0
        step = torch.where(usable, peak / levels, torch.ones_like(peak))
        values = (w / step).round().clamp(-levels, levels) * step
    else:
        top = 2.0 ** bits - 1
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        usable = hi > lo
        step = torch.where(usable, (hi - lo) / top, torch.ones_like(hi))
        zero_point = (-lo / step).clamp(0, top).floor()   # non-negative, so floor truncates as int() does
        codes = (zero_point + w / step).clamp(0, top).round()
        values = step * (codes - zero_point)
    return torch.where(usable, values.to(original.dtype), rows).reshape(original.shape)


def _full_resolution_tag(net: torch.nn.Module) -> str | None:
    resolution = getattr(net, 'img_resolution', None)
    return f'{resolution}x{resolution}' if resolution else None


def quantized_weight_names(net: torch.nn.Module, keep_full_resolution: bool = True) -> list[str]:
    """Names of the parameters :func:`quantize_network` quantizes, in ``named_parameters`` order."""
    skip_tag = _full_resolution_tag(net) if keep_full_resolution else None
    names = []
    for module_name, module in net.named_modules():
        if type(module).__name__ not in QUANTIZED_LAYER_TYPES:
            continue
        weight = getattr(module, 'weight', None)
        if not isinstance(weight, torch.nn.Parameter) or weight.ndim < 2:
            continue
        parts = module_name.split('.')
        if any(fragment in part for part in parts for fragment in EXCLUDED_NAME_PARTS):
            continue
        if skip_tag is not None and any(part.startswith(skip_tag + '_') for part in parts):
            continue
        names.append(f'{module_name}.weight' if module_name else 'weight')
    order = {name: i for i, (name, _) in enumerate(net.named_parameters())}
    return sorted(names, key=lambda name: order.get(name, len(order)))


def quantize_network(net: torch.nn.Module, bits: int, scheme: str = 'symmetric',
                     keep_full_resolution: bool = True, names: Iterable[str] | None = None,
                     granularity: str = 'tensor') -> torch.nn.Module:
    """A deep copy of ``net`` whose selected conv/linear weights are quantized to ``bits`` bits.

    ``names`` overrides the layer selection (parameter names as in ``named_parameters``).
    ``granularity`` is per ``'tensor'`` (the paper's) or per output ``'channel'`` (see :func:`quantize_tensor`).
    The original network is left untouched. Raises ValueError for an unusable scheme, bit width or granularity and
    KeyError for a name that is not a parameter of ``net``.
    """
    check_bits(bits, scheme)
    check_granularity(granularity)
    quantized = copy.deepcopy(net)
    selected = list(names) if names is not None else quantized_weight_names(quantized, keep_full_resolution)
    params = dict(quantized.named_parameters())
    missing = [name for name in selected if name not in params]
    if missing:
        raise KeyError(f'no such parameter(s) to quantize: {", ".join(missing[:5])}')
    with torch.no_grad():
        for name in selected:
            params[name].copy_(quantize_tensor(params[name], bits, scheme, granularity))
    return quantized
