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

Each selected weight tensor is quantized per tensor. ``scheme='symmetric'``
(default) uses 2**(k-1) - 1 levels each side of zero with scale max|w| / levels;
``scheme='minmax'`` is the fork's asymmetric uniform quantizer over [min, max]
with an integer zero point. Weights are replaced by their dequantized values
(float), so the network runs exactly as before, just with coarser weights.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch

SCHEMES = ('symmetric', 'minmax')
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


def quantize_tensor(weight: torch.Tensor, bits: int, scheme: str = 'symmetric') -> torch.Tensor:
    """Quantize ``weight`` to ``bits`` bits per tensor and return the dequantized values (same dtype)."""
    check_bits(bits, scheme)
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
                     keep_full_resolution: bool = True, names: Iterable[str] | None = None) -> torch.nn.Module:
    """A deep copy of ``net`` whose selected conv/linear weights are quantized to ``bits`` bits.

    ``names`` overrides the layer selection (parameter names as in ``named_parameters``).
    The original network is left untouched.
    """
    check_bits(bits, scheme)
    quantized = copy.deepcopy(net)
    selected = list(names) if names is not None else quantized_weight_names(quantized, keep_full_resolution)
    params = dict(quantized.named_parameters())
    missing = [name for name in selected if name not in params]
    if missing:
        raise KeyError(f'no such parameter(s) to quantize: {", ".join(missing[:5])}')
    with torch.no_grad():
        for name in selected:
            params[name].copy_(quantize_tensor(params[name], bits, scheme))
    return quantized
