"""training/training_state.py on its own: file names, finding the newest state, random states, a save/read/load
round trip and the one-line errors. Tiny modules, no training (the end-to-end resume tests are in
test_training.py, test_multinode.py and test_phema.py)."""

from __future__ import annotations

import contextlib
import errno
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import dnnlib
from torch_utils import misc
from training import training_state
from training.training_state import TrainingError


@pytest.mark.parametrize('nimg', [0, 999, 1000, 123_456, 987_654_321])
def test_the_written_name_is_the_one_resume_recognises(nimg: int):
    name = training_state.state_file_name(training_state.kimg_tag(nimg))
    assert training_state.STATE_PATTERN.fullmatch(name)
    assert Path(name).match(training_state.STATE_GLOB)
    assert training_state.state_kimg(os.path.join('some', 'run', name)) == nimg // 1000
    assert name == f'training-state-{nimg // 1000:06d}.pt'


@pytest.mark.parametrize('name', ['training-state-.pt', 'training-state-000001.pt.tmp', 'network-snapshot-000001.pkl',
                                  'training-state-000001.weights.pt', 'xtraining-state-000001.pt'])
def test_other_names_are_not_states(name: str):
    assert training_state.state_kimg(name) is None


def test_newest_state_is_the_highest_kimg_and_ignores_other_files(tmp_path: Path):
    run = tmp_path / 'run [1]'  # glob metacharacters in the folder name
    run.mkdir()
    for name in ['training-state-000002.pt', 'training-state-000010.pt', 'training-state-000009.pt',
                 'training-state-000099.pt.tmp', 'network-snapshot-000500.pkl']:
        (run / name).write_bytes(b'')
    (run / 'training-state-000777.pt').mkdir()  # not a file
    assert training_state.newest_state(str(run)) == str(run / 'training-state-000010.pt')
    assert sorted(kimg for kimg, _path in training_state.list_states(str(run))) == [2, 9, 10]
    assert training_state.newest_state(str(tmp_path / 'missing')) is None
    assert training_state.list_states('') == []


def test_host_random_states_round_trip():
    device = torch.device('cpu')
    saved = training_state.host_rng_state(device)
    first = (torch.rand(3), np.random.rand(3), random.random())
    training_state.set_host_rng_state(saved, device)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
    assert saved['cuda'] is None


def _tiny() -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    net = torch.nn.Linear(3, 2)
    return net, torch.nn.Linear(3, 2), torch.optim.Adam(net.parameters(), lr=1e-3)


def test_save_read_load_round_trip(tmp_path: Path):
    net, ema, optimizer = _tiny()
    sampler = misc.InfiniteSampler(list(range(10)), seed=1)
    state = training_state.make_training_state(
        net=net, ema=ema, optimizer=optimizer, cur_nimg=12, next_tick=3, data_position=12, sampler=sampler,
        device=torch.device('cpu'), seed=5, batch_size=4, loss_scaling=1.0, options=dict(seed=5))
    path = tmp_path / training_state.state_file_name(training_state.kimg_tag(12))
    training_state.save_training_state(str(path), state)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left
    data = training_state.read_training_state(str(path))
    assert data['format'] == training_state.STATE_FORMAT and data['format_version'] == training_state.STATE_VERSION
    assert (data['step'], data['cur_tick'], data['data_position'], data['world_size']) == (12, 3, 12, 1)
    assert 'phema' not in data and len(data['rng']) == 1

    fresh, fresh_ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.5)
    training_state.load_training_state(data, fresh, fresh_ema, fresh_optimizer, source=str(path))
    for a, b in [(net, fresh), (ema, fresh_ema)]:
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)
    assert fresh_optimizer.param_groups[0]['lr'] == 1e-3


def test_a_state_without_ema_takes_it_from_the_network(tmp_path: Path, capsys):
    net, _ema, optimizer = _tiny()
    data = dict(net=net, optimizer_state=optimizer.state_dict(), step=0)
    ema = torch.nn.Linear(3, 2)
    training_state.load_training_state(data, torch.nn.Linear(3, 2), ema, source='old.pt')
    assert torch.equal(ema.weight, net.weight)
    assert 'old.pt has no EMA network' in capsys.readouterr().out


def test_errors_are_one_line_naming_the_file(tmp_path: Path):
    with pytest.raises(TrainingError, match='no such file'):
        training_state.read_training_state(str(tmp_path / 'training-state-000000.pt'))
    junk = tmp_path / 'training-state-000001.pt'
    junk.write_bytes(b'not a state')
    with pytest.raises(TrainingError, match='cannot read it as a training state') as err:
        training_state.read_training_state(str(junk))
    assert '\n' not in str(err.value) and str(junk) in str(err.value)
    other = tmp_path / 'training-state-000002.pt'
    torch.save(dict(weights=torch.zeros(2)), other)
    with pytest.raises(TrainingError, match='expected a training state with "net"'):
        training_state.read_training_state(str(other))
    net, ema, optimizer = _tiny()
    data = dict(net=net, ema=ema, optimizer_state=optimizer.state_dict())
    with pytest.raises(TrainingError, match='does not fit the network'):
        training_state.load_training_state(data, torch.nn.Linear(3, 5), torch.nn.Linear(3, 5), source='x.pt')


def test_a_failed_write_leaves_nothing_under_the_final_name(tmp_path: Path):
    def failing(_f: object) -> None:
        raise OSError(28, 'No space left on device')

    path = tmp_path / 'training-state-000003.pt'
    with pytest.raises(TrainingError, match='No space left on device'):
        training_state.save_atomically(str(path), failing)
    assert list(tmp_path.iterdir()) == []


def test_power_emas_cannot_start_half_way():
    with pytest.raises(TrainingError, match='must be on from the start'):
        training_state.load_power_emas(object(), dict(net=None), 'x.pt')
    training_state.load_power_emas(None, dict(), 'x.pt')  # neither side tracks: nothing to do


class _DiskFillsUp:
    """A file object that accepts ``room`` bytes and then fails like a full disk (ENOSPC)."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, 'No space left on device')
        self.room -= len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def test_a_full_disk_during_torch_save_is_one_line_and_leaves_nothing(tmp_path: Path, monkeypatch):
    """torch.save reports ENOSPC as its archive writer's RuntimeError raised while handling the OSError."""
    real_atomic_write = dnnlib.util.atomic_write

    @contextlib.contextmanager
    def filling_atomic_write(path, mode='wb'):
        with real_atomic_write(path, mode) as f:
            yield _DiskFillsUp(f, room=100)

    net, ema, optimizer = _tiny()
    state = dict(net=net, ema=ema, optimizer_state=optimizer.state_dict(), big=torch.zeros(10_000))
    path = tmp_path / 'training-state-000004.pt'
    with pytest.raises(RuntimeError) as raw:  # what the save helper meets
        with real_atomic_write(str(tmp_path / 'probe.pt')) as f:
            torch.save(state, _DiskFillsUp(f, room=100))
    assert not isinstance(raw.value, OSError)
    monkeypatch.setattr(dnnlib.util, 'atomic_write', filling_atomic_write)
    with pytest.raises(TrainingError) as err:
        training_state.save_training_state(str(path), state)
    message = str(err.value)
    assert '\n' not in message and str(path) in message and 'No space left on device' in message
    assert err.value.__suppress_context__  # no second, chained traceback
    assert list(tmp_path.iterdir()) == []  # neither the state nor a temporary file


def test_other_runtime_errors_of_a_writer_are_not_called_a_write_failure(tmp_path: Path):
    def broken(_f: object) -> None:
        raise RuntimeError('a bug, not a disk')

    with pytest.raises(RuntimeError, match='a bug, not a disk'):
        training_state.save_atomically(str(tmp_path / 'x.pt'), broken)
    assert list(tmp_path.iterdir()) == []


def _conv_net(channels_last: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 1))
    return net.to(memory_format=torch.channels_last) if channels_last else net


def _grads(net: torch.nn.Module, seed: int) -> None:
    """The same gradient values whatever the layout, each in its parameter's layout (as autograd gives them)."""
    generator = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize('saved_channels_last,resumed_channels_last', [(True, False), (False, True)])
def test_resume_after_flipping_channels_last_steps_like_the_uninterrupted_run(saved_channels_last: bool,
                                                                              resumed_channels_last: bool):
    """Fused Adam (train.py's optimiser) after resuming in the other memory layout: the first step equals the
    uninterrupted run's, bit for bit (the update is elementwise, so the layout must not change a value)."""
    import io
    uninterrupted = _conv_net(saved_channels_last)
    optimizer = torch.optim.Adam(uninterrupted.parameters(), lr=0.1, fused=True)
    _grads(uninterrupted, seed=1)
    optimizer.step()
    buffer = io.BytesIO()
    torch.save(dict(weights=uninterrupted.state_dict(), optimizer=optimizer.state_dict()), buffer)

    def resumed_step(load: object) -> torch.nn.Module:
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=False)
        net = _conv_net(resumed_channels_last)
        net.load_state_dict(saved['weights'])
        resumed_optimizer = torch.optim.Adam(net.parameters(), lr=0.1, fused=True)
        load(resumed_optimizer, saved['optimizer'])
        _grads(net, seed=2)
        resumed_optimizer.step()
        return net

    _grads(uninterrupted, seed=2)
    optimizer.step()
    resumed = resumed_step(training_state.load_optimizer_state)
    for expected, got in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(expected, got)
    # The plain load keeps the saved layout, and the fused step then comes out wrong: the check can fail.
    plain = resumed_step(torch.optim.Optimizer.load_state_dict)
    assert not all(torch.equal(a, b) for a, b in zip(uninterrupted.parameters(), plain.parameters()))
