"""torch_utils.training_stats: moments per tick, report0, collectors, and the two-rank reduction."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT, run_torchrun
from torch_utils import training_stats


def _fresh(prefix: str) -> str:
    """A statistic name no other test uses (the statistics are process-wide)."""
    return f'{prefix}_{uuid.uuid4().hex[:8]}'


def test_collector_mean_std_num_over_an_interval():
    name = _fresh('Test/loss')
    collector = training_stats.Collector(regex=name.replace('/', '\\/'))
    values = np.random.RandomState(0).randn(50).astype(np.float32) * 3 + 1
    training_stats.report(name, torch.from_numpy(values[:20]).reshape(4, 5))
    training_stats.report(name, values[20:].tolist())
    assert collector.num(name) == 0  # nothing is visible before update()
    collector.update()
    assert collector.num(name) == 50
    assert collector.mean(name) == pytest.approx(values.astype(np.float64).mean(), rel=1e-6)
    assert collector.std(name) == pytest.approx(values.astype(np.float64).std(), rel=1e-5)
    assert collector[name] == collector.mean(name)
    assert set(collector.as_dict()) == {name}
    assert collector.as_dict()[name].num == 50

    # The next interval sees only what was reported after the update.
    training_stats.report(name, 7.0)
    collector.update()
    assert (collector.num(name), collector.mean(name), collector.std(name)) == (1, 7.0, 0.0)


def test_keep_previous_and_empty_statistics():
    name = _fresh('Test/keep')
    keeping = training_stats.Collector(regex=name)
    forgetting = training_stats.Collector(regex=name, keep_previous=False)
    training_stats.report(name, [1.0, 3.0])
    keeping.update()
    forgetting.update()
    keeping.update()
    forgetting.update()
    assert keeping.mean(name) == 2.0
    assert forgetting.num(name) == 0 and np.isnan(forgetting.mean(name)) and np.isnan(forgetting.std(name))

    empty = _fresh('Test/empty')
    training_stats.report(empty, [])  # registers the name without values
    collector = training_stats.Collector(regex=empty)
    collector.update()
    assert empty in collector.names() and collector.num(empty) == 0


def test_report0_and_collectors_are_independent():
    name = _fresh('Test/r0')
    first = training_stats.Collector(regex='Test/r0_.*')
    assert training_stats.report0(name, 4.0) == 4.0  # returns its argument
    first.update()
    second = training_stats.Collector(regex='Test/r0_.*')  # created later: starts empty
    training_stats.report0(name, 6.0)
    first.update()
    second.update()
    assert first.mean(name) == 6.0 and second.mean(name) == 6.0 and second.num(name) == 1


def test_reporting_does_not_leave_the_device_and_keeps_float64_moments():
    name = _fresh('Test/big')
    collector = training_stats.Collector(regex=name)
    big = torch.full([1000], 1e4) + torch.arange(1000) * 1e-3
    training_stats.report(name, big)
    collector.update()
    reference = big.double()
    assert collector.mean(name) == pytest.approx(reference.mean().item(), rel=1e-9)
    assert collector.std(name) == pytest.approx(reference.std(unbiased=False).item(), rel=1e-3)


def test_two_ranks_reduce_to_global_moments(tmp_path):
    out = tmp_path / 'stats.json'
    run_torchrun(REPO_ROOT / 'tests' / '_train_stats_worker.py', [out])
    result = json.loads(out.read_text())
    everything = np.concatenate([np.arange(4.0), 10 + np.arange(6.0)])  # rank 0 and rank 1 values
    assert result['rank0']['loss']['num'] == result['rank1']['loss']['num'] == 10
    for rank in ('rank0', 'rank1'):
        assert result[rank]['loss']['mean'] == pytest.approx(everything.mean())
        assert result[rank]['loss']['std'] == pytest.approx(everything.std())
        assert result[rank]['only0'] == {'num': 1, 'mean': 5.0, 'std': 0.0}
