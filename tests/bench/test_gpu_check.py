"""The GPU check script (bench/gpu_check.sh, bench/gpu_check.py) in its CPU dry run, the benchmark's incremental
results (bench/run.py), and the Docker image's torch pin and compiler."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / 'bench' / 'gpu_check.sh'


def _env(out: Path, **extra: str) -> dict:
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS='1', PYTHONPATH=str(REPO_ROOT))
    env.pop('PFGMPP_GPU_CHECK_DRY_RUN', None)
    env.update(extra)
    return env


def _rows(out: Path) -> list[dict]:
    return json.loads((out / 'gpu-check.json').read_text())['rows']


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_each_row_as_it_ends(tmp_path: Path):
    from bench.gpu_check import STEPS
    out = tmp_path / 'out'
    work = tmp_path / 'work'
    proc = subprocess.Popen(['bash', str(SCRIPT), '--dry-run', f'--work={work}'], cwd=tmp_path, env=_env(out),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []  # row counts read while the script runs; every read must parse (the file is replaced atomically)
    try:
        while proc.poll() is None:
            if (out / 'gpu-check.json').is_file():
                seen.append(len(_rows(out)))
            time.sleep(0.2)
        output = proc.communicate(timeout=600)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-4000:]
    results = json.loads((out / 'gpu-check.json').read_text())
    assert results['dry_run'] and results['complete'] and results['failed'] == []
    statuses = {row['step']: row['status'] for row in results['rows']}
    assert list(statuses) == list(STEPS)
    assert statuses.pop('speed') == 'not run'  # speed figures come from a GPU only
    assert set(statuses.values()) == {'ok'}, results['rows']
    rows = {row['step']: row for row in results['rows']}
    assert rows['ddp_two_processes']['backend'] == 'gloo'
    assert rows['environment']['install'].startswith('dry run')
    assert rows['reference_network']['path'] == 'tests/golden/snapshots/network-snapshot-000000.pkl'
    assert rows['reference_network']['max_abs_error'] <= rows['reference_network']['tolerance']
    assert rows['resume_cpu_run_on_cuda']['resumed_from'].startswith('resume_cuda_run_on_cpu/')
    assert set(rows['samplers']['samplers']) >= {'dpmpp2m', 'dpmpp3m', 'restart', 'ablation_euler', 'edm_heun'}
    assert results['work'] == str(work) and len(list((work / 'generated').rglob('*.png'))) == 4
    assert sorted(path.name for path in out.iterdir()) == ['gpu-check.json']  # results only, nothing else
    # Rows appeared one at a time while the steps ran, not all at the end.
    assert seen == sorted(seen) and len(set(seen) - {0, len(STEPS)}) >= 5, seen
    assert output.rstrip().splitlines()[-1].startswith('gpu_check: all steps passed')


def test_a_run_cut_short_keeps_its_finished_rows(tmp_path: Path):
    out = tmp_path / 'out'
    proc = subprocess.Popen(['bash', str(SCRIPT), f'--work={tmp_path / "work"}'], cwd=tmp_path,
                            env=_env(out, PFGMPP_GPU_CHECK_DRY_RUN='1'),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / 'gpu-check.json').is_file() and len(_rows(out)) >= 3:
                break
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    results = json.loads((out / 'gpu-check.json').read_text())
    assert not results['complete']
    assert 3 <= len(results['rows']) < 10
    assert [row['step'] for row in results['rows'][:3]] == ['environment', 'reference_network', 'dataset']
    assert all(row['status'] == 'ok' for row in results['rows'])


@pytest.mark.parametrize('case', ['missing', 'corrupt'])
def test_a_failing_step_fails_the_script_and_is_named(case: str, tmp_path: Path):
    reference = tmp_path / 'network-snapshot-000000.pkl'
    if case == 'corrupt':
        reference.write_bytes(b'not a pickle')
    out = tmp_path / 'out'
    proc = subprocess.run(['bash', str(SCRIPT), '--dry-run', '--only=samplers', f'--work={tmp_path / "work"}'],
                          cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=_env(out, PFGMPP_GPU_CHECK_REFERENCE=str(reference)))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stderr.rstrip().splitlines()[-1]
    assert last.startswith('gpu_check: FAILED steps: reference_network '), proc.stderr
    assert 'gpu_check: step reference_network FAILED' in proc.stderr
    rows = {row['step']: row for row in _rows(out)}
    assert rows['reference_network']['status'] == 'failed'
    assert str(reference) in rows['reference_network']['error']
    if case == 'missing':
        assert 'reference network not found at' in rows['reference_network']['error']
    # --only=samplers brought in the steps it needs; samplers itself is skipped with the reason.
    assert rows['environment']['status'] == 'ok'
    assert rows['samplers']['status'] == 'skipped' and 'reference_network' in rows['samplers']['reason']
    assert rows['dataset'] == dict(step='dataset', status='not run', reason='not selected by --only')


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the refusal on a machine without CUDA')
def test_the_gpu_mode_refuses_to_run_on_the_cpu(tmp_path: Path):
    env = _env(tmp_path)
    proc = subprocess.run([sys.executable, '-m', 'bench.gpu_check', f'--out={tmp_path}', f'--work={tmp_path}/work',
                           '--only=fid_features'],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1
    rows = {row['step']: row for row in _rows(tmp_path)}
    assert rows['environment']['status'] == 'failed' and 'sees no CUDA device' in rows['environment']['error']
    assert rows['fid_features']['status'] == 'skipped'


def test_a_command_past_its_limit_fails_its_step_and_leaves_no_process(tmp_path: Path):
    import psutil
    from bench.gpu_check import GpuCheck, StepError
    check = GpuCheck(tmp_path, tmp_path, dry_run=True, python=sys.executable, budget_s=60, only=None,
                     reference=tmp_path / 'unused.pkl')
    pid_file = tmp_path / 'grandchild.pid'
    grandchild = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    child = (f'import subprocess, sys, time; subprocess.Popen([sys.executable, "-c", {grandchild!r}]); '
             f'print("started", flush=True); time.sleep(60)')
    start = time.monotonic()
    with pytest.raises(StepError, match=r'^-c ran past its 3 s limit$') as failure:
        check.run_cli(['-c', child], timeout=3)
    assert time.monotonic() - start < 30
    assert 'started' in failure.value.output
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, 'the grandchild survived its step'
        time.sleep(0.1)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the refusal on a machine without CUDA')
def test_without_an_installable_cuda_torch_the_script_fails_at_install(tmp_path: Path):
    venv = tmp_path / 'venv'
    (venv / 'bin').mkdir(parents=True)
    stub = venv / 'bin' / 'python'  # a venv whose pip install fails, as on a machine without network
    stub.write_text('#!/bin/sh\nexit 1\n')
    stub.chmod(0o755)
    env = _env(tmp_path / 'out', PFGMPP_GPU_CHECK_VENV=str(venv))
    env.pop('PYTHON')
    proc = subprocess.run(['bash', str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1
    from bench.gpu_check import pinned_torch
    assert proc.stderr.rstrip().splitlines()[-1].startswith(
        f'gpu_check: step install FAILED: no CUDA build of torch {pinned_torch()} could be installed')
    assert not (tmp_path / 'out' / 'gpu-check.json').exists()


def test_unknown_step_is_refused():
    from bench import gpu_check
    result = CliRunner().invoke(gpu_check.main, ['--out=unused', '--only=samplers,nope'])
    assert result.exit_code == 2 and "unknown step 'nope'" in result.output


def test_the_shell_script_fails_loudly():
    text = SCRIPT.read_text()
    assert 'set -euo pipefail' in text
    assert not re.search(r'\|\s*tail\b', text)  # a pipe into tail would hide the step's exit status


# ----------------------------------------------------------------------------
# bench.run: figures in the JSON after every round; a missing reference is said.


def test_benchmark_writes_figures_after_every_round_and_names_a_missing_reference(tmp_path: Path, monkeypatch):
    from bench import run
    path = tmp_path / 'bench.json'
    missing = tmp_path / 'absent.pkl'
    monkeypatch.setattr(run, 'REFERENCE_NETWORK', missing)
    snapshots = []

    def fake_measure(specs, settings, rounds, on_round=None):
        best = [(1.0, 0.5)] * len(specs)
        for done in range(1, rounds + 1):
            best = [(1.0 / done, 0.5 / done)] * len(specs)
            on_round(done, best)
            snapshots.append(json.loads(path.read_text()))  # what a run killed here would leave
        return best

    monkeypatch.setattr(run, 'measure_modes', fake_measure)
    monkeypatch.setattr(run, 'training_flops_per_image', lambda device: 1e9)
    monkeypatch.setattr(run, 'build', lambda *args, **kwargs: torch.nn.Linear(1, 1))
    monkeypatch.setattr(run, 'loop_overheads', lambda *args: {'data': 0.01})
    monkeypatch.setattr(run, 'fid_features_per_second', lambda *args: None)
    result = CliRunner().invoke(run.main, ['--device=cpu', '--repeats=3', f'--json={path}'])
    assert result.exit_code == 0, result.output
    assert [s['rounds_done'] for s in snapshots] == [1, 2, 3]
    assert not any(s['complete'] for s in snapshots)
    assert [s['rows'][0]['train_step_s'] for s in snapshots] == [1.0, 0.5, 1 / 3]
    final = json.loads(path.read_text())
    assert final['complete'] and len(final['rows']) == len(snapshots[-1]['rows'])
    assert final['reference'] == f'not run: reference network not found at {missing}'
    assert not any(row['mode'].startswith('reference') for row in final['rows'])
    assert str(missing) in result.stderr


# ----------------------------------------------------------------------------
# The Docker image.


def test_dockerfile_pins_the_torch_of_requirements_and_can_compile():
    from bench.gpu_check import pinned_torch
    text = (REPO_ROOT / 'Dockerfile').read_text()
    args = dict(re.findall(r'^ARG (\w+)=(\S+)', text, flags=re.MULTILINE))
    base = re.search(r'^FROM (\S+)', text, flags=re.MULTILINE).group(1)
    for name, value in args.items():
        base = base.replace(f'${{{name}}}', value)
    assert pinned_torch() == '2.13.0'
    assert base.startswith(f'pytorch/pytorch:{pinned_torch()}-')
    # A devel image (nvcc, headers, a compiler for Triton) or an explicit compiler install.
    assert base.endswith('-devel') or re.search(r'apt-get install[^\n]*(build-essential|gcc)', text)
    # The build refuses a base image whose torch is not the pinned one.
    assert 'torch.__version__' in text and 'requirements.txt' in text
