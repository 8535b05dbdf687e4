"""Shared test fixtures: where the golden files live and how to run this repo's code in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import math

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
# Reference outputs of the original code, kept in the repository (tests/golden/MANIFEST.json says how they were
# made); PFGMPP_GOLDEN may point at another copy.
GOLDEN_DIR = Path(os.environ.get('PFGMPP_GOLDEN', REPO_ROOT / 'tests' / 'golden'))

# Tests run on small CPUs; keep intra-op threads predictable.
os.environ.setdefault('OMP_NUM_THREADS', '2')


@pytest.fixture(scope='session')
def golden_dir() -> Path:
    if not GOLDEN_DIR.is_dir():
        pytest.fail(f'golden directory not found at {GOLDEN_DIR} (set PFGMPP_GOLDEN)')
    return GOLDEN_DIR


@pytest.fixture(scope='session')
def golden_manifest(golden_dir: Path) -> dict:
    return json.loads((golden_dir / 'MANIFEST.json').read_text())


def run_python(args: list[str], cwd: Path | None = None, env: dict | None = None, timeout: float = 600,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` with this repository (and nothing else of ours) importable."""
    full_env = dict(os.environ)
    full_env['PYTHONPATH'] = str(REPO_ROOT)
    full_env.setdefault('OMP_NUM_THREADS', '2')
    if env:
        full_env.update(env)
    proc = subprocess.run([sys.executable, *args], cwd=cwd or REPO_ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'python {" ".join(args)} failed with {proc.returncode}:\n'
                             f'--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}')
    return proc


def randomize_parameters_(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter by the golden files' randomisation rule (MANIFEST ``randomisation_rule``).

    Freshly built U-Nets have (near) zero output layers, so D(x) ~ c_skip x would hardly depend on the
    network; random weights make every layer count. Returns ``net`` for chaining.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith('weight'):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


@pytest.fixture()
def one_intra_op_thread():
    """Tiny networks gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads that
    wait for each other can make them many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run_torchrun(script: str | os.PathLike, args: list[str], nproc: int = 2, timeout: float = 300,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` under ``torchrun --standalone --nproc_per_node=nproc`` (gloo on CPU, one thread per rank)."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS='1')
    full_env.update(env or {})
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', str(script),
           *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f'torchrun {script} failed with {proc.returncode}:\n{proc.stderr[-3000:]}'
    return proc


# Fixtures of the command-line contract tests (each script's test file): hostile inputs, a full disk, a full tmpfs.
from tests._cli_inputs import detector, full_disk, inputs, tiny_tmpfs  # noqa: E402,F401
