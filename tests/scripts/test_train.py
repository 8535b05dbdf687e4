"""train.py and training/training_loop.py end to end on CPU: tiny networks on 8x8 images, a few steps each.

Covers: fast mode (bf16 + channels_last) tracking exact mode, a two-process torchrun run (outputs load, losses
finite), equal updates for 1 vs 2 processes with gradient accumulation, bit-exact resume after kill -9 and after
SIGTERM, --transfer, resuming the original PFGM++ training state (golden), the one-line validation errors, --dry-run
and the NaN-loss stop.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
import contextlib
from typing import Any, Callable, Iterator

import pytest
import torch
from click.testing import CliRunner

import dnnlib

from tests._train_data import make_dataset_zip, start_ranks, tiny_train_args
from tests.conftest import REPO_ROOT, run_python
from tests._cli_inputs import copy_file, zip_with, _FullDiskFile, assert_one_error, invoke, png_bytes, under_a_file

STEP_IMAGES = 4                      # --batch of the single-process runs
LONG_MIMG = 60 * STEP_IMAGES / 1e6   # 60 steps: long enough to be killed half-way
SINGLE_THREAD = {'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}


@pytest.fixture(scope='module')
def data_zip(tmp_path_factory) -> Path:
    return make_dataset_zip(tmp_path_factory.mktemp('data') / 'tiny.zip', count=16, resolution=8)


def _train(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    return run_python(['train.py', *args], env=SINGLE_THREAD, check=check, timeout=300)


def _state(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=False)


def _only(pattern: str, directory: Path) -> Path:
    found = sorted(directory.glob(pattern))
    assert len(found) == 1, (pattern, found)
    return found[0]


def _assert_modules_equal(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        if atol == 0:
            assert torch.equal(sa[name], sb[name]), name
        else:
            torch.testing.assert_close(sa[name], sb[name], atol=atol, rtol=0, msg=name)


# ----------------------------------------------------------------------------
# Fast mode (bf16 + channels_last on CPU) against exact mode.

FAST_CURVE_ARGS = dict(batch=8, duration=48 * 8 / 1e6, tick=8 * 8 / 1e3, lr_rampup=0, lr=0.002, dropout=0, augment=0,
                       snap=100, dump=100)  # 48 steps; no dropout, so that only the arithmetic differs


def _tick_losses(run: Path) -> list[float]:
    return [json.loads(line)['Loss/loss']['mean'] for line in (run / 'stats.jsonl').read_text().splitlines()]


def test_fast_mode_loss_curve_tracks_exact_mode(data_zip: Path, tmp_path: Path):
    from torch_utils import cpu_support
    if not cpu_support.bf16_supported():
        pytest.skip('this CPU has no oneDNN bf16 kernels: --precision=bf16 trains fp32 here (tested elsewhere)')
    curves = {}
    for name, extra in (('exact', {}), ('fast', dict(precision='bf16', channels_last=1))):
        _train(tiny_train_args(data_zip, tmp_path / name, **FAST_CURVE_ARGS, **extra))
        run = _only('0*', tmp_path / name)
        curves[name] = _tick_losses(run)
        if name == 'fast':
            net = pickle.load(open(_only('network-snapshot-*.pkl', run), 'rb'))['ema']
            assert net.use_bf16 and net.reduced_precision_on_cpu  # --precision=bf16 really ran bf16 on the CPU
    exact, fast = curves['exact'], curves['fast']
    assert len(exact) == len(fast) == 7  # the first step, then every 8 steps
    assert exact[-1] < 0.9 * exact[0]  # the run learns, so the comparison means something
    # Same data, noise and initial weights; bf16 rounding moves the tick means by ~0.1% here, allow 2%.
    for tick, (a, b) in enumerate(zip(exact, fast)):
        assert abs(a - b) <= 0.02 * a, f'tick {tick}: exact {a:.4f} vs bf16 {b:.4f}'


# ----------------------------------------------------------------------------
# Two processes.

DDP_ARGS = dict(batch=8, batch_gpu=2, duration=4 * 8 / 1e6, tick=2 * 8 / 1e3, lr_rampup=0)  # 4 steps, 2 rounds each


@pytest.fixture(scope='module')
def ddp_run(data_zip, tmp_path_factory) -> Path:
    outdir = tmp_path_factory.mktemp('ddp')
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **SINGLE_THREAD)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(REPO_ROOT / 'train.py'), *tiny_train_args(data_zip, outdir, **DDP_ARGS)]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DDP is built with the buffer option this PyTorch names without deprecation: no FutureWarning per rank.
    assert 'FutureWarning' not in proc.stderr and 'broadcast_buffers' not in proc.stderr, proc.stderr[-3000:]
    return _only('00000-*', outdir)


def test_two_process_run_writes_loadable_outputs(ddp_run: Path):
    from formats.network_io import load_network

    assert ddp_run.name == '00000-tiny-uncond-ddpmpp-edm-gpus2-batch8-fp32'
    options = json.loads((ddp_run / 'training_options.json').read_text())
    assert options['batch_size'] == 8 and options['batch_gpu'] == 2 and options['D'] == 128
    log = (ddp_run / 'log.txt').read_text()
    status = [line for line in log.splitlines() if line.startswith('tick ')]
    assert len(status) == 3  # ticks after steps 1, 3 and 4
    for field in ('kimg', 'time', 'sec/tick', 'sec/kimg', 'maintenance', 'cpumem', 'gpumem'):
        assert f' {field} ' in status[0]

    stats = [json.loads(line) for line in (ddp_run / 'stats.jsonl').read_text().splitlines()]
    assert len(stats) == 3
    for tick in stats:
        loss = tick['Loss/loss']
        assert loss['num'] > 0 and torch.isfinite(torch.tensor([loss['mean'], loss['std']])).all()
    assert stats[-1]['Progress/kimg']['mean'] == pytest.approx(0.032)

    with open(_only('network-snapshot-*.pkl', ddp_run), 'rb') as f:
        snapshot = pickle.load(f)
    assert set(snapshot) == {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}
    assert not snapshot['ema'].training and snapshot['augment_pipe'].label_dim == 9
    net = load_network(str(_only('network-snapshot-*.pkl', ddp_run)))
    x = torch.randn(2, 3, 8, 8)
    assert torch.isfinite(net(x, torch.tensor([1.0, 5.0]))).all()

    state = _state(_only('training-state-*.pt', ddp_run))
    assert state['step'] == 32 and state['world_size'] == 2 and len(state['rng']) == 2
    assert state['cur_tick'] == 3 and state['format'] == 'pfgmpp-training-state'
    _assert_modules_equal(state['ema'].eval(), net)
    assert state['optimizer_state']['state'][0]['step'] == 4


def test_one_and_two_processes_with_accumulation_agree(ddp_run: Path, data_zip: Path, tmp_path: Path):
    # 1 process x 4 rounds of 2 images vs 2 processes x 2 rounds of 2 images: the same micro-batches, so the same
    # data, noise, dropout and augmentation; only the order of the floating-point gradient sums differs.
    _train(tiny_train_args(data_zip, tmp_path, **DDP_ARGS))
    run = _only('0*', tmp_path)
    single, double = _state(_only('training-state-*.pt', run)), _state(_only('training-state-*.pt', ddp_run))
    assert single['step'] == double['step'] == 32

    # The gradients (Adam's running moments over the 4 steps) agree to float32 reduction noise.
    names = [name for name, _ in single['net'].named_parameters()]
    for index, name in enumerate(names):
        for moment in ('exp_avg', 'exp_avg_sq'):
            a = single['optimizer_state']['state'][index][moment]
            b = double['optimizer_state']['state'][index][moment]
            assert (a - b).abs().max() <= 1e-4 * a.abs().max() + 1e-12, (name, moment)

    # So do the per-tick losses and the weights. Adam turns rounding noise in a gradient that is zero in exact
    # arithmetic (the attention key bias: softmax ignores it) into steps of up to +-lr, so the weights are
    # compared at 10% of one step: a real difference (other data or noise) moves nearly every weight by ~lr.
    losses = [[json.loads(line)['Loss/loss']['mean'] for line in (d / 'stats.jsonl').read_text().splitlines()]
              for d in (run, ddp_run)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    lr = 0.01
    _assert_modules_equal(single['net'], double['net'], atol=0.1 * lr)
    _assert_modules_equal(single['ema'], double['ema'], atol=0.1 * lr)
    moved = max((a - b).abs().max().item() for a, b in zip(single['net'].parameters(), single['ema'].parameters()))
    assert moved > 0  # the check is not vacuous: training changed the weights


# ----------------------------------------------------------------------------
# Exact resume.

RESUME_ARGS = dict(duration=LONG_MIMG, tick=4 * STEP_IMAGES / 1e3, snap=5, dump=1, lr_rampup=0, nosubdir=True)


@pytest.fixture(scope='module')
def uninterrupted(data_zip, tmp_path_factory) -> Path:
    outdir = tmp_path_factory.mktemp('uninterrupted')
    _train(tiny_train_args(data_zip, outdir, **RESUME_ARGS))
    return outdir


def _start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **SINGLE_THREAD)
    return subprocess.Popen([sys.executable, 'train.py', *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_state(proc: subprocess.Popen, outdir: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not list(outdir.glob('training-state-*.pt')):
        if proc.poll() is not None:
            raise AssertionError(f'run ended before writing a training state:\n{proc.stdout.read()[-3000:]}')
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError('no training state appeared')
        time.sleep(0.01)


def _assert_same_final_result(a: Path, b: Path) -> None:
    sa, sb = _state(_only('training-state-*.pt', a)), _state(_only('training-state-*.pt', b))
    assert sa['step'] == sb['step'] == 60 * STEP_IMAGES
    _assert_modules_equal(sa['net'], sb['net'])
    _assert_modules_equal(sa['ema'], sb['ema'])
    for key in ('state', 'param_groups'):
        assert repr(sa['optimizer_state'][key]) == repr(sb['optimizer_state'][key])
    with open(_only('network-snapshot-*.pkl', a), 'rb') as f:
        ema_a = pickle.load(f)['ema']
    with open(_only('network-snapshot-*.pkl', b), 'rb') as f:
        ema_b = pickle.load(f)['ema']
    _assert_modules_equal(ema_a, ema_b)


def test_kill_9_and_resume_is_bit_exact(uninterrupted: Path, data_zip: Path, tmp_path: Path):
    args = tiny_train_args(data_zip, tmp_path, resume='auto', **RESUME_ARGS)
    proc = _start(args)
    _wait_for_state(proc, tmp_path)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    interrupted_at = _state(_only('training-state-*.pt', tmp_path))['step']
    assert interrupted_at < 60 * STEP_IMAGES  # really killed half-way
    assert not list(tmp_path.glob('*.tmp'))

    resumed = _train(args)
    assert 'Resuming from the training state' in resumed.stdout
    assert re.search(rf'Resume: +{re.escape(str(tmp_path))}', resumed.stdout)
    _assert_same_final_result(uninterrupted, tmp_path)
    ticks = [json.loads(line)['Progress/tick']['mean'] for line in (tmp_path / 'stats.jsonl').read_text().splitlines()]
    # Tick numbering continues across the restart (a tick logged after the last state may appear twice).
    assert ticks[-1] == 15 and set(ticks) == set(range(16))


def test_sigterm_finishes_the_step_saves_and_resumes_exactly(uninterrupted: Path, data_zip: Path, tmp_path: Path):
    args = tiny_train_args(data_zip, tmp_path, resume='auto', **RESUME_ARGS)
    proc = _start(args)
    _wait_for_state(proc, tmp_path)
    os.kill(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, output[-3000:]  # "preempted", told apart from "finished" (0) and errors (1, 2)
    assert 'Stop requested: saving and exiting' in output and 'Exiting...' in output
    assert 'exit code 3; continue with --resume=auto' in output
    saved = _state(_only('training-state-*.pt', tmp_path))
    assert 0 < saved['step'] < 60 * STEP_IMAGES and saved['step'] % STEP_IMAGES == 0

    _train(args)
    _assert_same_final_result(uninterrupted, tmp_path)


def _wait_for_states(procs: list, outdir: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not list(outdir.glob('*/training-state-*.pt')):
        if any(p.poll() is not None for p in procs) or time.time() > deadline:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError('no training state appeared:\n' + '\n'.join(p.communicate()[1][-2000:]
                                                                             for p in procs))
        time.sleep(0.02)


def _communicate(procs: list, timeout: float = 300) -> list[tuple[str, str]]:
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


TWO_RANK_LONG = dict(batch=8, batch_gpu=None, duration=200 * 8 / 1e6, tick=8 / 1e3, snap=1000, dump=1, lr_rampup=0)


def test_sigterm_to_one_of_two_ranks_stops_both_with_exit_code_3(data_zip: Path, tmp_path: Path):
    """A preemption notice reaching one rank: the ranks agree on the main (gloo) group, save and exit 3."""
    procs = start_ranks(['train.py', *tiny_train_args(data_zip, tmp_path, **TWO_RANK_LONG)])
    _wait_for_states(procs, tmp_path)
    os.kill(procs[1].pid, signal.SIGTERM)
    outputs = _communicate(procs)
    assert [p.returncode for p in procs] == [3, 3], outputs
    assert 'Stopped on request with the training state saved: exit code 3' in outputs[0][0]
    assert all('Traceback' not in err for _out, err in outputs), outputs
    state = _state(_only('*/training-state-*.pt', tmp_path))
    assert 0 < state['step'] < 200 * 8 and state['world_size'] == 2


def test_the_surviving_rank_of_a_killed_job_prints_one_line(data_zip: Path, tmp_path: Path):
    procs = start_ranks(['train.py', *tiny_train_args(data_zip, tmp_path, **TWO_RANK_LONG)])
    _wait_for_states(procs, tmp_path)
    os.killpg(procs[1].pid, signal.SIGKILL)
    (_out, err), _killed = _communicate(procs)
    assert procs[0].returncode == 1 and procs[1].returncode == -signal.SIGKILL
    assert 'Traceback' not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1 and 'rank 0: another process of the job ended' in errors[0], err[-3000:]
    assert 'relaunch the job with --resume=auto' in errors[0]


def test_a_restarted_job_names_the_cause_and_the_remedy_not_the_device(data_zip: Path, tmp_path: Path,
                                                                        monkeypatch):
    """torchrun --max-restarts on CPU/gloo: restarted workers fail or hang when they re-form the group (a PyTorch
    limit), so they are refused before trying, in one line naming the cause and the remedy."""
    from torch_utils import distributed as dist_utils

    tried = []
    monkeypatch.setattr(torch.distributed, 'init_process_group', lambda **kwargs: tried.append(kwargs))
    monkeypatch.setattr(dist_utils, '_device', None)
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: False)
    for key, value in dict(RANK='1', LOCAL_RANK='1', WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT='29500',
                           TORCHELASTIC_RESTART_COUNT='1').items():
        monkeypatch.setenv(key, value)
    code, output = _invoke(tiny_train_args(data_zip, tmp_path / 'runs'))
    errors = [line for line in output.splitlines() if line.startswith('Error:')]
    assert code == 1 and len(errors) == 1 and not tried, output
    assert '--device' not in errors[0] and 'Traceback' not in output
    for part in ('after torchrun restarted the job', 'restart 1 of --max-restarts', 'rank 1 of 2 at 127.0.0.1:29500',
                 'PyTorch limitation', 'without --max-restarts', 'relaunch the job with --resume=auto'):
        assert part in errors[0], errors[0]
    assert not (tmp_path / 'runs').exists()

    # The first launch of a job is not refused: its failure to form the group is named as such.
    def cannot_connect(**_kwargs: object) -> None:
        raise RuntimeError('Connection closed by peer [127.0.0.1]:29500\nmore gloo detail')

    monkeypatch.setattr(torch.distributed, 'init_process_group', cannot_connect)
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '0')
    code, output = _invoke(tiny_train_args(data_zip, tmp_path / 'runs'))
    (error,) = [line for line in output.splitlines() if line.startswith('Error:')]
    assert code == 1 and 'cannot form the process group (rank 1 of 2' in error and 'Connection closed by peer' in error
    assert '--device' not in error and '--resume=auto' in error


def test_transfer_starts_from_the_snapshot_weights(ddp_run: Path, data_zip: Path, tmp_path: Path):
    snapshot = _only('network-snapshot-*.pkl', ddp_run)
    # One step at lr 0 (the warm-up starts at 0): the weights must be exactly the snapshot's.
    _train(tiny_train_args(data_zip, tmp_path, transfer=snapshot, duration=STEP_IMAGES / 1e6, lr_rampup=10000))
    with open(snapshot, 'rb') as f:
        source = pickle.load(f)['ema']
    state = _state(_only('*/training-state-*.pt', tmp_path))
    _assert_modules_equal(state['net'].eval(), source)
    _assert_modules_equal(state['ema'], source)


# ----------------------------------------------------------------------------
# The original PFGM++ training state (golden).

GOLDEN_STATE = 'snapshots/training-state-000000.pt'


def test_original_training_state_loads_into_our_network(golden_dir: Path):
    from training import networks
    from training.training_state import load_training_state

    expected = torch.load(golden_dir / 'snapshots/training-state-000000.expected.pt', weights_only=True)
    data = torch.load(golden_dir / GOLDEN_STATE, map_location='cpu', weights_only=False)
    torch.manual_seed(0)
    net = networks.EDMPrecond(**expected['ema_init_kwargs'])
    ema = networks.EDMPrecond(**expected['ema_init_kwargs'])
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    load_training_state(data, net, ema, optimizer, source=GOLDEN_STATE)
    for name, value in expected['ema_state_dict'].items():
        assert torch.equal(ema.state_dict()[name], value), name
    for name, value in expected['net_state_dict'].items():
        assert torch.equal(net.state_dict()[name], value), name
    assert optimizer.state_dict()['state'][0]['step'] == expected['optimizer_state']['state'][0]['step']
    assert torch.equal(optimizer.state_dict()['state'][5]['exp_avg_sq'],
                       expected['optimizer_state']['state'][5]['exp_avg_sq'])
    inputs = expected['inputs']
    with torch.no_grad():
        for module, key in ((ema.eval(), 'ema_output'), (net.eval(), 'net_output')):
            out = module(inputs['x'], inputs['sigma'], inputs['class_labels'])
            scale = max(1.0, expected[key].abs().max().item())
            assert (out - expected[key]).abs().max().item() <= 2e-5 * scale, key


def test_resume_of_the_original_training_state(golden_dir: Path, tmp_path: Path):
    # The flags that rebuild the network of the golden run (tiny DDPM++, PFGM++ D=128, no augmentation).
    args = tiny_train_args(golden_dir / 'snapshots/training-state-000000.train-data.zip', tmp_path,
                           resume=golden_dir / GOLDEN_STATE, augment=0, batch=4, duration=12 / 1e6, tick=1,
                           lr_rampup=0, ema=4 / 1e6, seed=0)
    proc = _train(args)
    assert 'written by the original code' in proc.stdout and 'data order cannot be restored' in proc.stdout
    state = _state(_only('*/training-state-*.pt', tmp_path))
    assert state['step'] == 12  # the golden state's 8 images plus one step of 4
    assert state['optimizer_state']['state'][0]['step'] == 3
    golden = torch.load(golden_dir / GOLDEN_STATE, map_location='cpu', weights_only=False)
    moved = [(a - b).abs().max().item() for a, b in zip(state['net'].parameters(), golden['net'].parameters())]
    assert 0 < max(moved) < 0.1  # continued from the golden weights (one Adam step of lr 0.01)


# ----------------------------------------------------------------------------
# Validation: one clear line, before anything is written.


def _invoke(args: list) -> tuple[int, str]:
    import train
    result = CliRunner().invoke(train.main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.mark.parametrize('case', ['missing-data', 'cond-without-labels', 'batch-split', 'aug-dim', 'resume-missing',
                                  'resume-name', 'transfer-and-resume', 'transfer-missing', 'precision'])
def test_bad_input_fails_with_one_line(case: str, data_zip: Path, tmp_path: Path):
    outdir = tmp_path / 'runs'
    overrides = {
        'missing-data': dict(data=tmp_path / 'nope.zip'),
        'cond-without-labels': dict(cond=1),
        'batch-split': dict(batch=6, batch_gpu=4),
        'aug-dim': dict(aug_dim=0),
        'resume-missing': dict(resume=tmp_path / 'training-state-000010.pt'),
        'resume-name': dict(resume=data_zip),
        'transfer-and-resume': dict(transfer=data_zip, resume='auto'),
        'transfer-missing': dict(transfer=tmp_path / 'network-snapshot-000000.pkl'),
        'precision': dict(fp16=1, precision='bf16'),
    }[case]
    expected = {
        'missing-data': '--data', 'cond-without-labels': '--cond', 'batch-split': '--batch-gpu',
        'aug-dim': '--aug_dim', 'resume-missing': 'no such file', 'resume-name': 'training-state-<kimg>.pt',
        'transfer-and-resume': '--transfer and --resume', 'transfer-missing': '--transfer',
        'precision': '--precision',
    }[case]
    args = tiny_train_args(overrides.pop('data', data_zip), outdir, **overrides)
    code, output = _invoke(args)
    assert code != 0
    error_lines = [line for line in output.splitlines() if line.startswith('Error:')]
    assert len(error_lines) == 1 and expected in error_lines[0], output
    assert 'Traceback' not in output
    assert not outdir.exists() or not any(outdir.iterdir())


def test_dry_run_prints_options_and_writes_nothing(data_zip: Path, tmp_path: Path):
    code, output = _invoke(tiny_train_args(data_zip, tmp_path / 'runs', dry_run=True))
    assert code == 0, output
    assert '"total_kimg": 0.016' in output and 'Dry run: nothing was written.' in output
    assert 'tiny-uncond-ddpmpp-edm-gpus1-batch4-fp32' in output
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('dump', [1, 1000])
def test_diverging_loss_stops_with_one_line(data_zip: Path, tmp_path: Path, dump: int):
    """The advice names a training state that exists (the newest), or says that there is none."""
    proc = _train(tiny_train_args(data_zip, tmp_path, lr=1e30, lr_rampup=0, duration=5 * STEP_IMAGES / 1e6,
                                  tick=STEP_IMAGES / 1e3, dump=dump), check=False)
    assert proc.returncode == 1
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith('Error:')]
    assert 'Error: the training loss became' in error and 'lower --lr' in error
    assert 'Traceback' not in proc.stderr
    states = sorted(tmp_path.glob('*/training-state-*.pt'))
    if states:
        assert f'--resume={states[-1]}' in error
    else:
        assert dump == 1000 and 'no training state was written' in error and '--resume' not in error


def _fake_run(run_dir: Path, options: dict, states: dict[str, bytes]) -> None:
    run_dir.mkdir(parents=True)
    if options is not None:
        (run_dir / 'training_options.json').write_text(json.dumps(options))
    for name, content in states.items():
        (run_dir / name).write_bytes(content)


def _complete_state() -> bytes:
    import io
    buffer = io.BytesIO()
    torch.save(dict(net=torch.zeros(64), optimizer_state={}), buffer)
    return buffer.getvalue()


def _options(**changes: object) -> dict:
    base = dict(dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path='data/tiny.zip',
                                    use_labels=False, xflip=False, cache=True, resolution=8, max_size=16),
                network_kwargs=dict(class_name='training.networks.EDMPrecond', model_type='SongUNet',
                                    channel_mult=[1, 2], model_channels=8, dropout=0.13, use_fp16=False),
                loss_kwargs=dict(class_name='training.loss.EDMLoss'), D=128, stf=False, batch_size=4, batch_gpu=None,
                optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=0.01), total_kimg=0.016, seed=7)
    for key, value in changes.items():
        target = base
        *parents, leaf = key.split('.')
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return base


def test_resume_auto_matches_runs_by_identity_not_by_name(tmp_path: Path):
    from training import config, run_dir

    identity = config.run_identity(_options())
    complete = _complete_state()
    _fake_run(tmp_path / '00000-tiny-uncond-ddpmpp-edm-gpus1-batch4-fp32', _options(),
              {'training-state-000002.pt': complete})
    # Same name, other architecture: another run whatever its name says.
    _fake_run(tmp_path / '00001-tiny-uncond-ddpmpp-edm-gpus1-batch4-fp32', _options(**{
        'network_kwargs.model_channels': 16}), {'training-state-000009.pt': complete})
    # The newest matching run, launched with another batch, process count, lr, duration, precision and dropout.
    newest = tmp_path / '00002-tiny-uncond-ddpmpp-edm-gpus8-batch64-fp16'
    _fake_run(newest, _options(**{'batch_size': 64, 'optimizer_kwargs.lr': 0.1, 'total_kimg': 5,
                                  'network_kwargs.dropout': 0, 'network_kwargs.use_fp16': True,
                                  'dataset_kwargs.path': '/elsewhere/tiny.zip'}),
              {'training-state-000001.pt': complete, 'training-state-000004.pt': complete})
    _fake_run(tmp_path / '00003-tiny-cond-ddpmpp-edm-gpus1-batch4-fp32', _options(**{
        'dataset_kwargs.use_labels': True}), {'training-state-000005.pt': complete})
    _fake_run(tmp_path / '00004-other-D', _options(D=2048), {'training-state-000006.pt': complete})
    choice = run_dir.choose_run_dir(str(tmp_path), 'tiny-uncond-ddpmpp-edm-gpus1-batch4-fp32', identity, 'auto')
    assert choice.as_tuple() == (str(newest), str(newest / 'training-state-000004.pt'), [])

    # Nothing of this identity: a new numbered run directory; an explicit state: a new run directory too.
    other = config.run_identity(_options(**{'loss_kwargs.class_name': 'training.loss.VELoss'}))
    choice = run_dir.choose_run_dir(str(tmp_path), 'tiny-uncond-ddpmpp-ve', other, 'auto')
    assert choice.as_tuple() == (str(tmp_path / '00005-tiny-uncond-ddpmpp-ve'), None, [])
    choice = run_dir.choose_run_dir(str(tmp_path), 'd', identity, 'x/training-state-000007.pt')
    assert choice.as_tuple() == (str(tmp_path / '00005-d'), 'x/training-state-000007.pt', [])


def test_resume_auto_of_a_run_without_options_file_matches_its_name_for_any_batch(tmp_path: Path):
    from training import config, run_dir

    run = tmp_path / '00003-tiny-uncond-ddpmpp-edm-gpus2-batch8-fp32'
    _fake_run(run, None, {'training-state-000004.pt': _complete_state()})
    identity = config.run_identity(_options())
    for desc in ('tiny-uncond-ddpmpp-edm-gpus1-batch8-fp32', 'tiny-uncond-ddpmpp-edm-gpus16-batch512-fp32'):
        assert run_dir.choose_run_dir(str(tmp_path), desc, identity, 'auto').state == str(
            run / 'training-state-000004.pt')
    assert run_dir.choose_run_dir(str(tmp_path), 'tiny-cond-ddpmpp-edm-gpus1-batch8-fp32', identity,
                                  'auto').state is None


def test_resume_auto_skips_truncated_states_and_names_them(tmp_path: Path):
    from training import config, run_dir

    complete = _complete_state()
    run = tmp_path / '00000-tiny'
    _fake_run(run, _options(), {'training-state-000002.pt': complete, 'training-state-000004.pt': complete[:-100],
                                'training-state-000006.pt': b''})
    choice = run_dir.choose_run_dir(str(tmp_path), 'tiny', config.run_identity(_options()), 'auto')
    assert choice.state == str(run / 'training-state-000002.pt')
    assert [path for path, _reason in choice.skipped] == [str(run / 'training-state-000006.pt'),
                                                          str(run / 'training-state-000004.pt')]
    assert all('truncated' in reason for _path, reason in choice.skipped)
    (run / 'training-state-000002.pt').write_bytes(complete[:200])
    with pytest.raises(run_dir.RunDirError, match=r'no training state of .*00000-tiny is complete \(3 skipped; '
                                                   r'the newest, .*training-state-000006.pt: not a complete'):
        run_dir.choose_run_dir(str(tmp_path), 'tiny', config.run_identity(_options()), 'auto')


def test_resume_auto_into_a_named_directory_of_another_run_is_refused(tmp_path: Path):
    from training import config, run_dir

    _fake_run(tmp_path / 'mine', _options(), {})
    with pytest.raises(run_dir.RunDirError, match=r'--resume=auto: .*mine holds another run \(D: 128 -> 64\)'):
        run_dir.choose_run_dir(str(tmp_path), 'tiny', config.run_identity(_options(D=64)), 'auto', name='mine')


def test_resume_after_changing_the_batch_continues_the_run_and_keeps_every_segment(data_zip: Path, tmp_path: Path):
    first = _train(tiny_train_args(data_zip, tmp_path, resume='auto'))
    assert 'nothing to resume, starting a new run' in first.stdout
    run = _only('0*', tmp_path)
    shutil.copy(_only('training-state-*.pt', run), run / 'training-state-000009.pt')
    with open(run / 'training-state-000009.pt', 'r+b') as f:  # a newer state cut short by a crash
        f.truncate(1000)
    resumed = _train(tiny_train_args(data_zip, tmp_path, resume='auto', batch=8, duration=32 / 1e6, lr=0.02))
    assert _only('0*', tmp_path) == run  # the run's name says batch4; it is continued, not left behind
    assert f'Skipped:                 {run / "training-state-000009.pt"}: not a complete' in resumed.stdout
    assert f'Resuming from the training state {run / "training-state-000000.pt"}' in resumed.stdout
    for change in ('batch_size 4 -> 8', 'total_kimg 0.016 -> 0.032', 'optimizer_kwargs.lr 0.01 -> 0.02'):
        assert f'Changed on resume:       {change}' in resumed.stdout, resumed.stdout
    options = json.loads((run / 'training_options.json').read_text())
    assert options['batch_size'] == 4 and 'resume_state_dump' not in options  # the first segment's, as written
    segments = json.loads((run / 'training_segments.json').read_text())
    assert [s['segment'] for s in segments] == [0, 1] and [s['world_size'] for s in segments] == [1, 1]
    assert segments[0]['options']['batch_size'] == 4 and segments[1]['options']['batch_size'] == 8
    assert segments[1]['resumed_from'] == str(run / 'training-state-000000.pt')
    assert segments[1]['changes']['batch_size'] == [4, 8]
    assert _state(run / 'training-state-000000.pt')['step'] == 16 + 16  # two steps of 8 after the first 16


def test_fp16_on_cpu_says_it_trains_fp32(data_zip: Path, tmp_path: Path):
    code, output = _invoke(tiny_train_args(data_zip, tmp_path / 'runs', dry_run=True, fp16=1))
    assert code == 0, output
    notes = [line for line in output.splitlines() if 'CUDA-only' in line]
    assert len(notes) == 1 and 'fp16' in notes[0] and 'trains in fp32' in notes[0], output
    assert '"use_fp16": true' in output  # kept for CUDA use of the snapshot, as the original


def test_bf16_without_cpu_bf16_kernels_trains_fp32_with_one_line(data_zip: Path, tmp_path: Path, monkeypatch):
    from torch_utils import cpu_support
    monkeypatch.setattr(cpu_support, 'bf16_supported', lambda: False)
    code, output = _invoke(tiny_train_args(data_zip, tmp_path / 'runs', dry_run=True, precision='bf16'))
    assert code == 0, output
    notes = [line for line in output.splitlines() if 'no oneDNN bfloat16 kernels' in line]
    assert len(notes) == 1 and 'running fp32 instead' in notes[0], output
    assert '"use_bf16"' not in output and 'batch4-fp32' in output
    monkeypatch.setattr(cpu_support, 'bf16_supported', lambda: True)
    code, output = _invoke(tiny_train_args(data_zip, tmp_path / 'runs', dry_run=True, precision='bf16'))
    assert code == 0 and '"use_bf16": true' in output and 'bfloat16 kernels' not in output, output


# ----------------------------------------------------------------------------
# Hostile and broken input: one ``Error:`` line naming the file or flag, no traceback, no partial output.


def run_train(data: Path, outdir: Path, **overrides: Any) -> Any:
    import train
    return invoke(train.main, tiny_train_args(data, outdir, **overrides))


def assert_no_training_output(outdir: Path) -> None:
    """No snapshot, training state or temporary file (a run folder with its log may remain)."""
    leftovers = [p.name for p in outdir.rglob('*') if p.is_file() and (p.suffix in ('.pkl', '.pt', '.tmp')
                                                                          or p.name.startswith('.'))]
    assert leftovers == [], leftovers


def labelled_zip(path: Path, labels_json: bytes) -> Path:
    return zip_with(path, {'00000/img00000000.png': png_bytes(), '00000/img00000001.png': png_bytes(seed=1),
                           'dataset.json': labels_json})


TRAIN_CASES: dict[str, tuple[Callable[[dict, Path], dict], tuple[str, ...]]] = {
    'truncated-zip': (lambda f, t: dict(data=f['truncated_zip']), ('--data',)),
    'truncated-png': (lambda f, t: dict(data=f['truncated_png_zip']), ('--data', 'img00000000.png')),
    'labels-wrong-types': (lambda f, t: dict(data=labelled_zip(t / 'l.zip', b'{"labels": [["x", 1, 2]]}'), cond=1),
                           ('l.zip/dataset.json', 'expected {"labels"')),
    'labels-out-of-range': (lambda f, t: dict(data=labelled_zip(
        t / 'l.zip', b'{"labels": [["00000/img00000000.png", -1], ["00000/img00000001.png", 2]]}'), cond=1),
        ('l.zip/dataset.json', 'non-negative integers')),
    'resume-empty': (lambda f, t: dict(resume=copy_file(f['empty'], t / 'training-state-000000.pt')),
                     ('--resume', 'training-state-000000.pt')),
    'resume-wrong-kind': (lambda f, t: dict(resume=copy_file(f['uncond'], t / 'training-state-000000.pt')),
                          ('--resume', 'training state')),
    'transfer-empty': (lambda f, t: dict(transfer=f['empty']), ('--transfer', 'empty')),
    'transfer-wrong-kind': (lambda f, t: dict(transfer=f['optimizer_pt']), ('--transfer', '"ema"')),
    'transfer-bad-weights': (lambda f, t: dict(transfer=f['weights_bad_shape']), ('--transfer', 'do not match')),
    'cres-not-integers': (lambda f, t: dict(cres='a,b'), ('--cres',)),
    'unwritable-outdir': (lambda f, t: dict(outdir=under_a_file(t, 'runs')), ('--outdir', 'not writable')),
}


@pytest.mark.parametrize('case', list(TRAIN_CASES))
def test_train_hostile_input(case, inputs, tmp_path):
    make_overrides, fragments = TRAIN_CASES[case]
    given = tmp_path / 'given'
    given.mkdir()
    overrides = make_overrides(inputs, given)
    data = overrides.pop('data', inputs['dataset'])
    outdir = overrides.pop('outdir', tmp_path / 'runs')
    assert_one_error(run_train(data, outdir, **overrides), *fragments)
    assert_no_training_output(outdir)


def test_train_full_disk(inputs, tmp_path, full_disk):
    assert_one_error(run_train(inputs['dataset'], tmp_path / 'runs'), '--outdir', 'training_options.json',
                     'No space left on device')
    assert_no_training_output(tmp_path)


def test_train_full_disk_at_the_first_snapshot(inputs, tmp_path, monkeypatch):
    real = dnnlib.util.atomic_write

    @contextlib.contextmanager
    def fail_for_snapshots(path: Any, mode: str = 'wb') -> Iterator[Any]:
        with real(path, mode) as f:
            yield _FullDiskFile(f, os.fspath(path)) if 'network-snapshot' in os.fspath(path) else f
    monkeypatch.setattr(dnnlib.util, 'atomic_write', fail_for_snapshots)
    assert_one_error(run_train(inputs['dataset'], tmp_path / 'runs', snap=1, dump=1), 'network-snapshot-000000.pkl',
                     'No space left on device')
    assert_no_training_output(tmp_path)


@pytest.mark.parametrize('workers', [0, 1])
def test_an_image_that_fails_while_training_is_one_line(tmp_path: Path, workers: int):
    """Headers are checked before the start; a PNG whose pixel data is cut off fails only when a step reads it, in
    this process or in a DataLoader worker, whose error arrives with the worker's traceback in front of it."""
    import io
    import numpy as np
    import PIL.Image
    folder = tmp_path / 'images'
    folder.mkdir()
    for index in range(4):
        buffer = io.BytesIO()
        PIL.Image.fromarray(np.random.RandomState(index).randint(0, 256, [8, 8, 3], dtype=np.uint8)).save(
            buffer, format='png', compress_level=0)
        data = buffer.getvalue()
        (folder / f'img{index}.png').write_bytes(data[:len(data) - 120] if index == 3 else data)
    proc = _train(tiny_train_args(folder, tmp_path / 'runs', workers=workers, pfgmpp=None, aug_dim=None),
                  check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1 and errors[0].startswith('Error: --data: ') and 'img3.png' in errors[0], proc.stderr
