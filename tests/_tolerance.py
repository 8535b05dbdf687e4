"""The one rule for comparing floating-point results that another CPU (or kernel) may round differently.

Two computations of the same quantity whose kernels differ only in rounding (SIMD width, FMA contraction, blocking
and order of sums, thread split: what changes between AVX-512, AVX2, SSE and aarch64 builds, or between batch
sizes on one machine) agree within

    atol = k * eps(dtype) * scale

* ``eps(dtype)`` is ``torch.finfo(dtype).eps`` of the dtype the computation ran in (not the dtype it is stored in);
* ``scale`` is the magnitude of the data, taken from the reference values: ``max |expected|``, at least 1 for network
  outputs (a denoiser's rounding is relative to its input of unit scale when the output is small);
* ``k`` counts the roundings that can pile up along the longest chain of dependent operations: 1 per elementwise
  operation, ``ceil(log2 n)`` for a sum of n terms (every SIMD kernel adds in a tree of partial sums, so rounding
  grows with the depth of that tree, not with n), summed over the layers a value passes through in sequence. This is
  the first-order worst case for unit-gain layers (normalised weights and GroupNorm keep the networks here near unit
  gain), so it holds on every CPU without being looser than float32 allows. Each site names its k and how it counts.

Comparisons that must be exact (same kernels, same inputs: pinned sampler bits, layout-only changes of exact ops)
use ``torch.equal`` and are not covered by this rule.
"""

from __future__ import annotations

import math
from typing import Union

import numpy as np
import torch


def eps(dtype: Union[torch.dtype, np.dtype, type]) -> float:
    """Machine epsilon of a torch or numpy floating dtype."""
    if isinstance(dtype, torch.dtype):
        return torch.finfo(dtype).eps
    return float(np.finfo(dtype).eps)


def sum_steps(n: int) -> int:
    """Roundings of a sum of ``n`` terms added as a tree: ceil(log2 n), at least 1."""
    return max(1, math.ceil(math.log2(max(n, 2))))


def tolerance(k: float, scale: float, dtype: Union[torch.dtype, np.dtype, type] = torch.float32) -> float:
    """``k * eps(dtype) * scale``: the module docstring's rule."""
    return k * eps(dtype) * scale


def network_rounding_steps(net: torch.nn.Module, pixels: int) -> int:
    """k for one forward pass of a training.networks U-Net whose feature maps have at most ``pixels`` pixels.

    Per convolution or linear layer: one sum over its fan-in plus bias and activation (2); per GroupNorm: the mean
    and the variance sums over a group (channels per group x pixels) plus 4 elementwise steps; per attention block:
    the query-key sum over channels, the softmax sum over pixels and the value sum over pixels, plus 4 steps for
    scaling and the exponential; plus 8 for the preconditioning and the noise embedding.
    """
    from training import networks
    steps = 8
    for module in net.modules():
        if isinstance(module, (networks.Conv2d, networks.Linear)) and getattr(module, 'weight', None) is not None:
            steps += sum_steps(module.weight[0].numel()) + 2
        elif isinstance(module, networks.GroupNorm):
            steps += 2 * sum_steps(module.weight.numel() // module.num_groups * pixels) + 4
        elif isinstance(module, networks.UNetBlock) and module.num_heads:
            steps += sum_steps(module.out_channels // module.num_heads) + 2 * sum_steps(pixels) + 4
    return steps


# torch.randn's Box-Muller transform is vectorised per ATen CPU capability. The golden files were drawn on x86 with
# the AVX2/AVX-512 kernels, which agree bit for bit; the DEFAULT kernel (and aarch64's) round log, sqrt and cos
# differently, so there normal draws are compared by the rule above rather than bit for bit.
GOLDEN_RANDN_CAPABILITIES = ('AVX2', 'AVX512')

# k for one normal draw: log, product, square root (radius), 2*pi*u and cosine, their product, and a scale factor.
NORMAL_DRAW_STEPS = 8


def randn_bits_match_golden() -> bool:
    """True when this process's torch.randn kernel is the one the golden files were drawn with."""
    return torch.backends.cpu.get_cpu_capability() in GOLDEN_RANDN_CAPABILITIES


def assert_within(actual: Union[torch.Tensor, np.ndarray], expected: Union[torch.Tensor, np.ndarray], k: float,
                  dtype: Union[torch.dtype, np.dtype, type] = torch.float32, min_scale: float = 0.0,
                  what: str = '') -> None:
    """``max |actual - expected| <= k * eps(dtype) * max(min_scale, max |expected|)`` (the module's rule)."""
    a = torch.as_tensor(actual).double()
    e = torch.as_tensor(expected).double()
    assert a.shape == e.shape, f'{what}: shape {tuple(a.shape)} != {tuple(e.shape)}'
    scale = max(min_scale, e.abs().max().item())
    err = (a - e).abs().max().item()
    bound = tolerance(k, scale, dtype)
    assert err <= bound, f'{what}: max |diff| {err:.3g} > {k:g} * eps * {scale:.3g} = {bound:.3g}'
