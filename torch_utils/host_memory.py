"""Keep freed host memory in the process instead of handing it back to the kernel after every tensor.

With its default, adaptive thresholds glibc keeps returning the memory of freed multi-MiB blocks to the kernel
(unmapping them, or trimming the top of the heap), so a large CPU tensor often lands on fresh pages and pays a page
fault per 4 KiB when first written; for the multi-MiB activations of a U-Net those faults can cost more than the
arithmetic of an elementwise op (figures: README, section Speed). Fixing glibc's mmap and trim thresholds high lets
freed blocks be reused.

``train.py``, ``generate.py`` and ``fid.py`` call :func:`retain_freed_host_memory` (also offered by
``training.cpu_speed``, with the other opt-in speed-ups) at start-up; set
``PFGMPP_RETAIN_HOST_MEMORY=0`` to keep glibc's defaults. Any program (the original code included) gets the same
effect from the environment: ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Optional

# mallopt() parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Largest mmap threshold glibc accepts on 64-bit systems; bigger blocks are always mapped.
GLIBC_MAX_MMAP_THRESHOLD = 32 * 1024 * 1024
# Free memory at the top of the heap kept before trimming (mallopt takes a C int).
RETAINED_TRIM_THRESHOLD = 2**31 - 1
ENV_SWITCH = 'PFGMPP_RETAIN_HOST_MEMORY'


def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith('linux'):
        return None
    name = ctypes.util.find_library('c')
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not hasattr(libc, 'mallopt') or not hasattr(libc, 'gnu_get_libc_version'):
        return None  # musl and other C libraries have no mallopt thresholds
    return libc


def retain_freed_host_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for the rest of the process; True when the setting took effect.

    A no-op returning False off glibc, or when ``PFGMPP_RETAIN_HOST_MEMORY=0`` asks to keep the defaults. There is
    no way back: setting a threshold switches off glibc's own adaptive thresholds, which restoring the numbers would
    not switch on again.
    """
    if os.environ.get(ENV_SWITCH, '1').strip() == '0':
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MAX_MMAP_THRESHOLD)) and \
        bool(libc.mallopt(M_TRIM_THRESHOLD, RETAINED_TRIM_THRESHOLD))
