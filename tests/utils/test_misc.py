"""torch_utils.misc: the resumable InfiniteSampler, parameter copying, DDP helpers and the module summary."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from torch_utils import misc


class _Sized:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def _reference_stream(n: int, seed: int, window_size: float, count: int) -> list[int]:
    """The global index sequence, written out from its description: a seeded permutation walked cyclically,
    where after each visit of position i the element there is swapped with one of the ``window`` positions
    ending at i (never wrapping below 0)."""
    rnd = np.random.RandomState(seed)
    order = np.arange(n)
    rnd.shuffle(order)
    window = int(np.rint(n * window_size))
    out = []
    for g in range(count):
        i = g % n
        out.append(int(order[i]))
        if window >= 2:
            j = i - rnd.randint(min(window, i + 1))
            order[i], order[j] = int(order[j]), int(order[i])
    return out


def _take(sampler: misc.InfiniteSampler, count: int) -> tuple[list[int], list[int]]:
    """``count`` items and, after each, the sampler's next global index."""
    items, positions = [], []
    for item in itertools.islice(iter(sampler), count):
        items.append(item)
        positions.append(sampler.next_index)
    return items, positions


def test_sampler_follows_the_windowed_shuffle():
    stream = _reference_stream(13, seed=5, window_size=0.5, count=100)
    items, _ = _take(misc.InfiniteSampler(_Sized(13), seed=5), 100)
    assert items == stream
    # Interleaved ranks (block_size=1) read every num_replicas-th element of the same stream.
    rank1, _ = _take(misc.InfiniteSampler(_Sized(13), rank=1, num_replicas=3, seed=5), 30)
    assert rank1 == stream[1::3][:30]


def test_sampler_does_not_pass_data_source_to_torch():
    # Constructing must work on torch versions whose Sampler.__init__ takes no argument.
    sampler = misc.InfiniteSampler(_Sized(4), shuffle=False)
    assert _take(sampler, 6)[0] == [0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize('block_size', [1, 4])
def test_two_ranks_are_disjoint_and_cover_each_pass(block_size: int):
    n = 24
    per_rank = n // 2
    a, _ = _take(misc.InfiniteSampler(_Sized(n), rank=0, num_replicas=2, seed=3, block_size=block_size), 3 * per_rank)
    b, _ = _take(misc.InfiniteSampler(_Sized(n), rank=1, num_replicas=2, seed=3, block_size=block_size), 3 * per_rank)
    for epoch in range(3):
        mine = a[epoch * per_rank:(epoch + 1) * per_rank]
        theirs = b[epoch * per_rank:(epoch + 1) * per_rank]
        assert not set(mine) & set(theirs)
        assert sorted(mine + theirs) == list(range(n))
    # Passes differ (the window keeps shuffling), so the epochs are not repetitions.
    assert a[:per_rank] != a[per_rank:2 * per_rank]


def test_block_sharding_gives_each_rank_contiguous_blocks():
    stream = _reference_stream(10, seed=0, window_size=0.5, count=40)
    rank1, _ = _take(misc.InfiniteSampler(_Sized(10), rank=1, num_replicas=2, seed=0, block_size=3), 9)
    expected = [stream[g] for g in range(40) if (g // 3) % 2 == 1][:9]
    assert rank1 == expected


@pytest.mark.parametrize('k', [0, 1, 5, 11, 12, 37, 100])
def test_restored_sampler_continues_exactly(k: int):
    dataset = _Sized(12)
    original = misc.InfiniteSampler(dataset, rank=1, num_replicas=2, seed=7, block_size=2)
    items, positions = _take(original, k + 40)  # runs ahead of the consumer, like a prefetching DataLoader
    index = positions[k - 1] if k else 0
    state = original.state_dict(index)

    restored = misc.InfiniteSampler(dataset, rank=1, num_replicas=2, seed=7, block_size=2)
    restored.load_state_dict(state)
    assert _take(restored, 40)[0] == items[k:k + 40]

    # The same global position, read by a differently sharded run, continues the same global stream.
    single = misc.InfiniteSampler(dataset, seed=7)
    single.load_state_dict(state)
    stream = _reference_stream(12, seed=7, window_size=0.5, count=index + 10)
    assert _take(single, 10)[0] == stream[index:index + 10]


def test_start_index_without_state_replays_the_history():
    direct = misc.InfiniteSampler(_Sized(9), seed=2, start_index=23)
    assert _take(direct, 15)[0] == _reference_stream(9, 2, 0.5, 38)[23:]


def test_state_must_match_the_dataset():
    state = misc.InfiniteSampler(_Sized(5)).state_dict(0)
    with pytest.raises(ValueError, match='dataset_size'):
        misc.InfiniteSampler(_Sized(6)).load_state_dict(state)


def test_restart_at_gives_a_valid_fresh_order():
    sampler = misc.InfiniteSampler(_Sized(10), seed=0)
    sampler.restart_at(1000, seed=99)
    items, _ = _take(sampler, 10)
    assert sorted(items) == list(range(10))  # index 1000 is a pass start: one full permutation follows
    assert sampler.state_dict()['index'] == 1010


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match='empty'):
        misc.InfiniteSampler(_Sized(0))
    with pytest.raises(ValueError, match='rank'):
        misc.InfiniteSampler(_Sized(3), rank=2, num_replicas=2)
    with pytest.raises(ValueError, match='window_size'):
        misc.InfiniteSampler(_Sized(3), window_size=1.5)


# ----------------------------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self, width: int = 3):
        super().__init__()
        self.a = torch.nn.Linear(2, width)
        self.b = torch.nn.Linear(width, 1)
        self.register_buffer('count', torch.zeros([]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_copy_params_and_buffers_by_name():
    torch.manual_seed(0)
    src, dst = _Net(), _Net()
    src.count.fill_(5)
    misc.copy_params_and_buffers(src, dst, require_all=True)
    for (name, s), (_, d) in zip(misc.named_params_and_buffers(src), misc.named_params_and_buffers(dst)):
        assert torch.equal(s, d), name

    partial = torch.nn.Module()
    partial.a = torch.nn.Linear(2, 3)
    misc.copy_params_and_buffers(partial, dst)  # missing tensors are fine without require_all
    assert torch.equal(dst.a.weight, partial.a.weight)
    with pytest.raises(ValueError, match='lacks b.weight'):
        misc.copy_params_and_buffers(partial, dst, require_all=True)
    with pytest.raises(ValueError, match='a.weight'):
        misc.copy_params_and_buffers(_Net(width=4), dst)


def test_ddp_helpers_are_harmless_without_ddp():
    net = _Net()
    with misc.ddp_sync(net, sync=False):
        net(torch.ones(1, 2)).sum().backward()
    assert net.a.weight.grad is not None
    misc.check_ddp_consistency(net)  # single process: nothing to compare against


def test_print_module_summary(capsys):
    net = _Net()
    out = misc.print_module_summary(net, [torch.zeros(4, 2)])
    assert out.shape == (4, 1)
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines[0].split() == ['_Net', 'Parameters', 'Buffers', 'Output', 'shape', 'Datatype']
    rows = {line.split()[0]: line.split() for line in lines}
    assert rows['a'][1] == '9' and rows['a'][3:5] == ['[4,', '3]']
    assert rows['b'][1] == '4'
    assert rows['Total'][1:3] == [str(sum(p.numel() for p in net.parameters())), '1']


def test_constant_and_assert_shape():
    a = misc.constant([1, 2, 3], dtype=torch.float32)
    assert a is misc.constant([1, 2, 3], dtype=torch.float32)
    assert misc.constant(0.5, shape=[2, 2]).shape == (2, 2)
    misc.assert_shape(torch.zeros(2, 3), [None, 3])
    with pytest.raises(AssertionError, match='dimension 1'):
        misc.assert_shape(torch.zeros(2, 3), [2, 4])


def test_state_at_a_position_the_iterator_has_not_reached():
    # Block sharding: after a step, rank 0 has read only its own block, but the step's end (where the next step
    # starts) lies past the other ranks' blocks, here in the next pass.
    n, block = 10, 3
    rank0 = misc.InfiniteSampler(_Sized(n), rank=0, num_replicas=2, seed=4, block_size=block)
    _take(rank0, 2 * block)  # two steps of rank 0: global indices 0-2 and 6-8
    step_end = 2 * 2 * block  # 12, in the second pass
    assert rank0.next_index < step_end
    state = rank0.state_dict(step_end)
    resumed = misc.InfiniteSampler(_Sized(n), rank=1, num_replicas=2, seed=4, block_size=block)
    resumed.load_state_dict(state)
    fresh = misc.InfiniteSampler(_Sized(n), rank=1, num_replicas=2, seed=4, block_size=block)
    assert _take(resumed, 9)[0] == _take(fresh, 2 * block + 9)[0][2 * block:]
