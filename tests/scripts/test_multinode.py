"""Two torchrun agents on this machine acting as two nodes (c10d rendezvous on loopback), one CPU rank each.

Covers: training (final EMA, network and training state), generate.py (bytes of every image) and fid.py
(statistics) equal to the single-node two-rank run; the two-node run records the options it was given and the same
run identity as the one-node run; resuming a two-node run on one node, bit-exact; rank 0 alone writes and no
temporary file is left; a rank killed with kill -9 ends the whole job naming the rank, the surviving rank says so in
one line, and ``--resume=auto`` continues that run on a different number of processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from tests._train_data import make_dataset_zip, tiny_train_args
from tests.conftest import REPO_ROOT, run_python, run_torchrun
from tests.scripts.test_train import _only, _state

pytestmark = pytest.mark.slow

# The README's recipe (section "Scale"), with the port and run id filled in per test.
TWO_NODE_LAUNCH = ('torchrun --nnodes=2 --node_rank={node} --nproc_per_node=1 --rdzv_backend=c10d '
                   '--rdzv_endpoint=127.0.0.1:{port} --rdzv_id={run_id}')
SINGLE_THREAD = {'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
TIMEOUT_S = 600  # generous: the machine running the tests may be busy
STEP_IMAGES = 8
TRAIN_ARGS = dict(batch=STEP_IMAGES, batch_gpu=2, duration=4 * STEP_IMAGES / 1e6, tick=2 * STEP_IMAGES / 1e3,
                  lr_rampup=0)  # 4 steps of 2 rounds per rank, a tick every 2 steps
HALF_ARGS = dict(TRAIN_ARGS, duration=2 * STEP_IMAGES / 1e6)
GENERATE_ARGS = ['--seeds=0-5', '--batch=2', '--steps=3', '--S_churn=10', '--S_min=0.01', '--S_max=50',
                 '--device=cpu']


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), **SINGLE_THREAD)


def start_two_nodes(script: str, args: list[str], run_id: str) -> list[subprocess.Popen]:
    """The README's two torchrun agents, started as separate process groups (as on two machines)."""
    port = _free_port()
    agents = []
    for node in (0, 1):
        launch = shlex.split(TWO_NODE_LAUNCH.format(node=node, port=port, run_id=run_id))
        cmd = [sys.executable, '-m', 'torch.distributed.run', *launch[1:], script, *map(str, args)]
        agents.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, start_new_session=True))
    return agents


def _kill(agents: list[subprocess.Popen]) -> None:
    for agent in agents:
        try:
            os.killpg(agent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _finish(agents: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> list[str]:
    """Outputs of the agents once both ended; kills both (and their workers) if one outlives the timeout."""
    deadline = time.time() + timeout
    outputs = []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=max(deadline - time.time(), 1))[0])
    except subprocess.TimeoutExpired:
        _kill(agents)
        raise AssertionError('a node did not finish in time:\n' +
                             '\n'.join((a.communicate()[0] or '')[-3000:] for a in agents))
    return outputs


def run_two_nodes(script: str, args: list[str], run_id: str) -> str:
    agents = start_two_nodes(script, args, run_id)
    outputs = _finish(agents)
    for agent, output in zip(agents, outputs):
        assert agent.returncode == 0, output[-3000:]
    return '\n'.join(outputs)


def _assert_states_equal(a: dict, b: dict) -> None:
    assert a['step'] == b['step'] and a['data_position'] == b['data_position'] and a['cur_tick'] == b['cur_tick']
    for module in ('net', 'ema'):
        sa, sb = a[module].state_dict(), b[module].state_dict()
        assert sa.keys() == sb.keys()
        for name in sa:
            assert torch.equal(sa[name], sb[name]), (module, name)
    for key in ('state', 'param_groups'):
        assert repr(a['optimizer_state'][key]) == repr(b['optimizer_state'][key])
    np.testing.assert_equal(a['sampler'], b['sampler'])


def _assert_runs_equal(a: Path, b: Path) -> None:
    _assert_states_equal(_state(_only('training-state-*.pt', a)), _state(_only('training-state-*.pt', b)))
    snapshots = []
    for run in (a, b):
        with open(_only('network-snapshot-*.pkl', run), 'rb') as f:
            snapshots.append(pickle.load(f)['ema'].state_dict())
    for name, value in snapshots[0].items():
        assert torch.equal(value, snapshots[1][name]), name


def _files(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def data_zip(tmp_path_factory) -> Path:
    return make_dataset_zip(tmp_path_factory.mktemp('data') / 'tiny.zip', count=16, resolution=8)


@pytest.fixture(scope='module')
def one_node_run(data_zip, tmp_path_factory) -> Path:
    outdir = tmp_path_factory.mktemp('one-node')
    run_torchrun(REPO_ROOT / 'train.py', tiny_train_args(data_zip, outdir, **TRAIN_ARGS), timeout=TIMEOUT_S)
    return _only('00000-*', outdir)


@pytest.fixture(scope='module')
def two_node_run(data_zip, tmp_path_factory) -> tuple[Path, str]:
    outdir = tmp_path_factory.mktemp('two-nodes')
    output = run_two_nodes('train.py', tiny_train_args(data_zip, outdir, **TRAIN_ARGS), 'train')
    return _only('00000-*', outdir), output


def test_two_nodes_record_the_given_options_and_the_one_node_identity(one_node_run: Path,
                                                                       two_node_run: tuple[Path, str]):
    """The flags reach both nodes as given (one group of two ranks on two agents) and the run is the same run as
    the one-node launch: --resume=auto of either continues the other."""
    from training import config, run_dir

    run, output = two_node_run
    options = json.loads((run / 'training_options.json').read_text())
    assert options['batch_size'] == STEP_IMAGES and options['batch_gpu'] == 2 and options['lr_rampup_kimg'] == 0
    assert options['total_kimg'] == pytest.approx(4 * STEP_IMAGES / 1e3)
    assert options['kimg_per_tick'] == pytest.approx(2 * STEP_IMAGES / 1e3)
    one_node = json.loads((one_node_run / 'training_options.json').read_text())
    assert {k: v for k, v in options.items() if k != 'run_dir'} == \
        {k: v for k, v in one_node.items() if k != 'run_dir'}
    assert config.run_identity(options) == config.run_identity(one_node)
    (segment,) = json.loads((run / run_dir.SEGMENTS_FILE).read_text())
    assert segment['world_size'] == 2 and segment['resumed_from'] is None
    state = _state(_only('training-state-*.pt', run))
    assert state['world_size'] == 2 and len(state['rng']) == 2  # one group of two ranks, not two runs of one
    assert 'Processes:               2 on cpu' in output


def test_two_nodes_train_like_one_node(one_node_run: Path, two_node_run: tuple[Path, str]):
    run, output = two_node_run
    assert run.name == one_node_run.name  # same world size, so the same run name
    _assert_runs_equal(one_node_run, run)
    # Rank 0 alone wrote: one status line per tick, one log, nothing left under a temporary name.
    assert output.count('Exiting...') == 1 and len(re.findall(r'^tick 0 ', output, flags=re.M)) == 1
    assert sorted(_files(run)) == sorted(_files(one_node_run))
    assert not [p for p in run.rglob('*') if p.name.startswith('.') or p.suffix == '.tmp']
    assert (run / 'log.txt').read_text().count('tick 0 ') == 1


def test_two_node_run_resumes_bit_exactly_on_one_node(one_node_run: Path, data_zip: Path, tmp_path: Path):
    run_two_nodes('train.py', tiny_train_args(data_zip, tmp_path, **HALF_ARGS), 'half')
    half = _state(_only('*/training-state-*.pt', tmp_path))
    assert half['step'] == 2 * STEP_IMAGES and half['world_size'] == 2
    proc = run_torchrun(REPO_ROOT / 'train.py', tiny_train_args(data_zip, tmp_path, resume='auto', **TRAIN_ARGS),
                        timeout=TIMEOUT_S)
    assert 'Resuming from the training state' in proc.stdout and 'host random states restart' not in proc.stdout
    _assert_runs_equal(one_node_run, _only('00000-*', tmp_path))


def test_generate_and_fid_on_two_nodes_match_one_node(two_node_run: tuple[Path, str], golden_dir: Path,
                                                      tmp_path: Path):
    network = _only('network-snapshot-*.pkl', two_node_run[0])
    images = {}
    for layout in ('one', 'two'):
        outdir = tmp_path / f'images-{layout}'
        args = ['--network', network, '--outdir', outdir, *GENERATE_ARGS]
        if layout == 'one':
            output = run_torchrun(REPO_ROOT / 'generate.py', args, timeout=TIMEOUT_S).stdout
        else:
            output = run_two_nodes('generate.py', args, 'generate')
        assert output.count('Done.') == 1
        images[layout] = _files(outdir)
    manifests = {layout: json.loads((tmp_path / f'images-{layout}' / 'manifest.json').read_text())
                 for layout in ('one', 'two')}
    assert manifests['one']['settings'] == manifests['two']['settings']  # the folders record the same settings
    pngs = {layout: {name: digest for name, digest in files.items() if name.endswith('.png')}
            for layout, files in images.items()}
    assert sorted(pngs['one']) == [f'{seed:06d}.png' for seed in range(6)]
    assert pngs['one'] == pngs['two']

    stats = {}
    for layout in ('one', 'two'):
        dest = tmp_path / f'stats-{layout}.npz'
        # torchrun's parser would take '--num' for its --numa-binding: the long spelling passes.
        args = ['calc', f'--images={tmp_path / "images-two"}', '--num-images=6', '--batch=4', '--workers=0',
                '--device=cpu', f'--detector={golden_dir / "fid" / "detector-standin.pkl"}', f'--save-stats={dest}']
        if layout == 'one':
            output = run_torchrun(REPO_ROOT / 'fid.py', args, timeout=TIMEOUT_S).stdout
        else:
            output = run_two_nodes('fid.py', args, 'fid')
        assert output.count('Saved statistics') == 1  # rank 0 alone writes
        stats[layout] = np.load(dest)
    for key in ('mu', 'sigma'):
        assert np.array_equal(stats['one'][key], stats['two'][key]), key
    assert np.abs(stats['one']['sigma']).max() > 0  # the images differ, so the comparison means something


# ----------------------------------------------------------------------------
# Failure: one rank killed.

LONG_STEPS = 40
LONG_ARGS = dict(TRAIN_ARGS, duration=LONG_STEPS * STEP_IMAGES / 1e6, tick=STEP_IMAGES / 1e3, snap=1000, dump=1)


def _worker_of_rank(agents: list[subprocess.Popen], rank: int, timeout: float = TIMEOUT_S) -> psutil.Process:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for agent in agents:
            for child in psutil.Process(agent.pid).children(recursive=True):
                try:
                    if child.environ().get('RANK') == str(rank):
                        return child
                except psutil.Error:
                    continue
        time.sleep(0.1)
    raise AssertionError(f'no worker with RANK={rank} appeared')


def test_killed_rank_ends_the_job_and_resume_auto_continues(data_zip: Path, tmp_path: Path):
    args = tiny_train_args(data_zip, tmp_path, resume='auto', **LONG_ARGS)
    agents = start_two_nodes('train.py', args, 'kill')
    try:
        victim = _worker_of_rank(agents, rank=1)
        deadline = time.time() + TIMEOUT_S
        while not list(tmp_path.glob('*/training-state-*.pt')):
            assert time.time() < deadline and all(a.poll() is None for a in agents), 'no training state appeared'
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
    except BaseException:
        _kill(agents)
        raise
    outputs = _finish(agents)  # the surviving rank must not wait forever
    assert all(agent.returncode != 0 for agent in agents), outputs
    # torchrun's report names the killed rank and the signal.
    assert re.search(r'rank +: 1 \(local_rank: 0\)\s+exitcode +: -9', '\n'.join(outputs)), '\n'.join(outputs)[-4000:]
    # The surviving rank (node 0) says why in one line, without gloo's traceback.
    survivor = outputs[0]
    assert survivor.count('Error: rank 0: another process of the job ended') == 1, survivor[-4000:]
    assert 'relaunch the job with --resume=auto' in survivor
    assert not re.search(r'File "[^"]*(train|launch|training_loop|distributed)\.py"', survivor), survivor[-4000:]
    run = _only('00000-*', tmp_path)
    killed_at = _state(_only('training-state-*.pt', run))['step']
    assert killed_at < LONG_STEPS * STEP_IMAGES
    assert not [p for p in run.iterdir() if p.suffix == '.tmp']

    # The next launch, here on one process, continues that run from its last complete training state.
    resumed = run_python(['train.py', *tiny_train_args(data_zip, tmp_path, resume='auto',
                                                       **dict(LONG_ARGS, batch_gpu=None))],
                         env=SINGLE_THREAD, timeout=TIMEOUT_S)
    assert f'Resuming from the training state {run}' in resumed.stdout, resumed.stdout[-3000:]
    assert 'this run has 1; data order continues exactly' in resumed.stdout
    assert 'Changed on resume:       processes 2 -> 1' in resumed.stdout
    assert 'Changed on resume:       batch_gpu 2 -> null' in resumed.stdout
    final = _state(_only('training-state-*.pt', run))
    assert final['step'] == LONG_STEPS * STEP_IMAGES and final['world_size'] == 1
    ticks = [json.loads(line)['Progress/kimg']['mean'] for line in (run / 'stats.jsonl').read_text().splitlines()]
    assert ticks[-1] == pytest.approx(LONG_STEPS * STEP_IMAGES / 1e3)


def test_max_restarts_on_cpu_names_the_cause_and_the_remedy(data_zip: Path, tmp_path: Path):
    """torchrun --max-restarts restarts the workers after a rank is killed. On CPU/gloo they fail or hang when they
    re-form the group (a PyTorch limitation, timing-dependent), so they are refused at once: the error names the
    cause and the remedy, not --device."""
    args = tiny_train_args(data_zip, tmp_path, resume='auto', **LONG_ARGS)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '--max-restarts=1',
           'train.py', *args]
    agent = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        victim = _worker_of_rank([agent], rank=1)
        deadline = time.time() + TIMEOUT_S
        while not list(tmp_path.glob('*/training-state-*.pt')):
            assert time.time() < deadline and agent.poll() is None, 'no training state appeared'
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
    except BaseException:
        _kill([agent])
        raise
    (output,) = _finish([agent])
    assert agent.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith('Error:')]
    assert not [line for line in errors if '--device' in line], output[-4000:]
    restart = [line for line in errors if 'cannot re-form the process group after torchrun restarted' in line]
    assert restart, output[-4000:]
    assert 'PyTorch limitation' in restart[0] and 'relaunch the job with --resume=auto' in restart[0]
    # Nothing was trained after the restart: the state written before the kill is the newest, ready to resume.
    assert _state(_only('*/training-state-*.pt', tmp_path))['step'] < LONG_STEPS * STEP_IMAGES


def test_resume_auto_finds_the_run_of_another_process_count_and_batch(two_node_run: tuple[Path, str]):
    """The run recorded by the two-node launch is found by a launch on 1, 2 or 16 processes with any batch; a
    launch on other data is another run."""
    from training import config, run_dir

    run, _output = two_node_run
    options = json.loads((run / 'training_options.json').read_text())
    identity = config.run_identity(options)
    newest = str(_only('training-state-*.pt', run))
    for world, batch in ((1, 8), (2, 8), (16, 512)):
        desc = f'tiny-uncond-ddpmpp-edm-gpus{world}-batch{batch}-fp32'
        assert run_dir.choose_run_dir(str(run.parent), desc, identity, 'auto').as_tuple() == (str(run), newest, [])
    other = config.run_identity(dict(options, dataset_kwargs=dict(options['dataset_kwargs'], max_size=17)))
    choice = run_dir.choose_run_dir(str(run.parent), 'tiny-uncond-ddpmpp-edm-gpus1-batch8-fp32', other, 'auto')
    assert choice.state is None and choice.run_dir != str(run)
