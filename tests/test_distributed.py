"""torch_utils.distributed: single-process fallback and a real two-process gloo group."""

import json
import os

import torch

from tests.conftest import REPO_ROOT, run_torchrun
from torch_utils import distributed as dist_utils


def test_single_process_collectives_are_noops():
    assert not dist_utils.launched_by_torchrun() or os.environ.get('WORLD_SIZE') == '1'
    t = torch.tensor([3.0])
    assert dist_utils.all_reduce(t).item() == 3.0
    assert dist_utils.get_rank() == 0 and dist_utils.get_world_size() == 1
    assert dist_utils.shard(range(5)) == [0, 1, 2, 3, 4]
    assert dist_utils.broadcast_object('x') == 'x'


def test_two_process_gloo_all_reduce(tmp_path):
    out = tmp_path / 'result.json'
    run_torchrun(REPO_ROOT / 'tests' / '_dist_allreduce.py', [out])
    result = json.loads(out.read_text())
    assert result['world'] == 2
    assert result['total'] == 3.0  # ranks contribute 1 and 2
    assert result['gathered'] == {'from': 0}
    assert result['shard0'] == [0, 2, 4, 6, 8]
