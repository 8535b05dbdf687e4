"""What the CPU this process runs on supports, asked of PyTorch and oneDNN (never learnt by catching a crash).

One home for the decision every bfloat16 CPU path depends on: oneDNN's bfloat16 kernels (convolution, matmul,
weight reordering for prepacked convolutions) exist only on CPUs with AVX-512 (BW, VL, DQ), AVX512-BF16, AMX or
AVX-NE-CONVERT. Elsewhere (AVX2-only x86 such as AMD Zen 3, or an ISA lowered with ``ONEDNN_MAX_CPU_ISA``)
PyTorch computes bfloat16 convolutions in a generic loop that is several times slower than float32, and oneDNN's
weight reorder refuses bfloat16 outright. Elementwise ATen kernels (GroupNorm, interpolation, activations) handle
bfloat16 on every CPU and need no decision.
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import torch

PRECISION_FALLBACK = 'fp32'


@functools.lru_cache(maxsize=None)
def _onednn_bf16() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    query = getattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', None)
    return bool(query is not None and query())


def bf16_supported() -> bool:
    """True when oneDNN runs bfloat16 kernels on this CPU (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``).

    The answer follows the CPU and the ISA limit oneDNN was started with (``ONEDNN_MAX_CPU_ISA``); it is asked once
    per process. False without oneDNN.
    """
    return _onednn_bf16()


def capability_summary() -> str:
    """One line naming the ATen dispatch level and whether oneDNN has bfloat16 kernels, e.g. 'AVX2, no bf16'."""
    return f'{torch.backends.cpu.get_cpu_capability()}, {"bf16" if bf16_supported() else "no bf16"} kernels'


def supported_precision(precision: Optional[str],
                        device: Union[str, torch.device]) -> tuple[Optional[str], Optional[str]]:
    """The U-Net precision to run on ``device`` for the requested ``precision``, and why it differs.

    Returns ``(precision, None)`` when the request runs as asked (any CUDA request, None, 'fp32', 'fp16', or 'bf16'
    on a CPU with bfloat16 kernels), else ``('fp32', reason)`` with a one-line reason for the caller to print:
    bfloat16 on a CPU without bfloat16 kernels would be emulated and slower than float32.
    """
    if precision != 'bf16' or torch.device(device).type != 'cpu' or bf16_supported():
        return precision, None
    return PRECISION_FALLBACK, (f'bf16: this CPU ({capability_summary()}) has no oneDNN bfloat16 kernels (they need '
                                f'AVX-512, AMX or AVX-NE-CONVERT) and emulated bf16 is slower than fp32; running '
                                f'{PRECISION_FALLBACK} instead.')
