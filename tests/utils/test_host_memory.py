"""torch_utils.host_memory: glibc's thresholds are raised once, on request, and can be declined by environment."""

from __future__ import annotations

import platform
import sys

import pytest

from tests.conftest import run_python

GLIBC = sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'
PROBE = 'from torch_utils import host_memory; print(host_memory.retain_freed_host_memory())'


@pytest.mark.skipif(not GLIBC, reason='the setting exists only with glibc')
def test_applies_on_glibc():
    assert run_python(['-c', PROBE]).stdout.strip() == 'True'


def test_environment_switch_declines():
    assert run_python(['-c', PROBE], env={'PFGMPP_RETAIN_HOST_MEMORY': '0'}).stdout.strip() == 'False'


@pytest.mark.skipif(not GLIBC, reason='the setting exists only with glibc')
def test_tensors_still_work_after_the_switch():
    code = ('import torch; from torch_utils import host_memory; host_memory.retain_freed_host_memory(); '
            'xs = [torch.full([1 << 20], float(i)) for i in range(8)]; del xs[::2]; '
            'ys = [torch.ones(1 << 21) for _ in range(4)]; '
            'print(sum(float(x[0]) for x in xs), float(sum(y.sum() for y in ys)))')
    assert run_python(['-c', code]).stdout.split() == ['16.0', '8388608.0']
