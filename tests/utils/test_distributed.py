"""torch_utils.distributed: single-process fallback and a real two-process gloo group."""

import json
import os
from pathlib import Path

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


def test_intra_op_thread_limit_divides_usable_cores_among_local_ranks(monkeypatch):
    assert dist_utils.intra_op_thread_limit(usable_cores=16, local_ranks=4) == 4
    assert dist_utils.intra_op_thread_limit(usable_cores=2, local_ranks=2) == 1
    assert dist_utils.intra_op_thread_limit(usable_cores=2, local_ranks=3) == 1  # never 0
    assert dist_utils.intra_op_thread_limit(usable_cores=7, local_ranks=2) == 3
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    assert dist_utils.intra_op_thread_limit(usable_cores=8) == 4
    monkeypatch.delenv('LOCAL_WORLD_SIZE')
    assert dist_utils.intra_op_thread_limit(usable_cores=8) == 8
    assert dist_utils.usable_cpu_count() == len(os.sched_getaffinity(0))


def test_limit_intra_op_threads_lowers_with_one_line_and_only_on_cpu(monkeypatch):
    previous = torch.get_num_threads()
    monkeypatch.setattr(dist_utils, 'usable_cpu_count', lambda: 2)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    try:
        torch.set_num_threads(2)
        assert dist_utils.limit_intra_op_threads(torch.device('cuda', 0)) is None  # CUDA ranks are left alone
        assert torch.get_num_threads() == 2
        note = dist_utils.limit_intra_op_threads(torch.device('cpu'))
        assert torch.get_num_threads() == 1
        assert note is not None and '\n' not in note
        assert '2 intra-op threads' in note and 'lowered to 1' in note and '2 usable cores / 2 local processes' in note
        assert dist_utils.limit_intra_op_threads(torch.device('cpu')) is None  # already within the limit: silent
    finally:
        torch.set_num_threads(previous)


def test_two_ranks_asked_for_too_many_threads_get_one_each(tmp_path):
    """torchrun, 2 ranks, OMP_NUM_THREADS=2 on (at most) 2 usable cores: each rank ends with cores // 2 threads."""
    out = tmp_path / 'threads.json'
    script = ('import json, os, sys, torch\n'
              'from torch_utils import distributed as d\n'
              'd.init("cpu")\n'
              'note = d.limit_intra_op_threads(torch.device("cpu"))\n'
              'd.print0(note)\n'
              'json.dump(dict(threads=torch.get_num_threads(), limit=d.intra_op_thread_limit()),'
              ' open(sys.argv[1] + str(d.get_rank()), "w"))\n'
              'd.shutdown()\n')
    worker = tmp_path / 'worker.py'
    worker.write_text(script)
    proc = run_torchrun(worker, [out], env={'OMP_NUM_THREADS': '64'})
    for rank in (0, 1):
        result = json.loads(Path(f'{out}{rank}').read_text())
        assert result['threads'] == result['limit'] == max(1, dist_utils.usable_cpu_count() // 2)
    assert proc.stdout.count('lowered to') == 1  # rank 0 alone prints


def test_a_process_group_that_cannot_form_names_where_why_and_the_remedy(monkeypatch):
    for key, value in dict(RANK='0', WORLD_SIZE='4', MASTER_ADDR='node7', MASTER_PORT='1234').items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv('TORCHELASTIC_RESTART_COUNT', raising=False)
    line = dist_utils.process_group_failure(RuntimeError('Socket Timeout\nsecond line'))
    assert '\n' not in line and 'rank 0 of 4 at node7:1234' in line and 'Socket Timeout' in line
    assert 'max-restarts' not in line and '--resume=auto' in line
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '2')
    restarted = dist_utils.process_group_failure(RuntimeError('Connection closed by peer'))
    assert 'restart 2 of --max-restarts' in restarted and 'without --max-restarts' in restarted


def test_peer_failures_are_told_from_other_runtime_errors():
    gloo = RuntimeError('[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1: '
                        'Connection reset by peer. This is typically caused by a remote worker hanging')
    assert dist_utils.is_peer_failure(gloo)
    assert dist_utils.is_peer_failure(torch.distributed.DistBackendError('NCCL error'))
    assert not dist_utils.is_peer_failure(RuntimeError('mat1 and mat2 shapes cannot be multiplied'))
    assert not dist_utils.is_peer_failure(ValueError('Connection reset by peer'))
    line = str(dist_utils.peer_lost(gloo))
    assert line.startswith('rank 0: another process of the job ended (Read error [127.0.0.1]:1: Connection reset '
                           'by peer); relaunch the job with --resume=auto')
