"""train.py --tensorboard: the stats.jsonl scalars as TensorBoard events, and one clear line without the package."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests._train_data import make_dataset_zip, tiny_train_args
from tests.conftest import REPO_ROOT, run_python


@pytest.fixture(scope='module')
def data_zip(tmp_path_factory) -> Path:
    return make_dataset_zip(tmp_path_factory.mktemp('data') / 'tiny.zip', count=16, resolution=8)


def test_missing_package_is_one_line_before_anything_is_written(data_zip, tmp_path, monkeypatch):
    import train
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: None if name == 'tensorboard' else real_find_spec(name, *a))
    outdir = tmp_path / 'runs'
    result = CliRunner().invoke(train.main, tiny_train_args(data_zip, outdir, tensorboard=True))
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1 and '--tensorboard' in errors[0] and 'pip install tensorboard' in errors[0], result.output
    assert 'Traceback' not in result.output and not outdir.exists()


def test_open_tensorboard_names_the_package_when_missing(monkeypatch, tmp_path):
    import builtins
    from training import training_loop
    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name.startswith('torch.utils.tensorboard'):
            raise ImportError('TensorBoard logging requires TensorBoard')
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, '__import__', refuse)
    with pytest.raises(ImportError, match='pip install tensorboard'):
        training_loop.open_tensorboard(str(tmp_path))


def test_scalars_match_stats_jsonl(data_zip, tmp_path):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get('PYTHONPATH')) if p)
    run_python(['train.py', *tiny_train_args(data_zip, tmp_path, tensorboard=True, nosubdir=True, snap=2, dump=2)],
               env={'OMP_NUM_THREADS': '1', 'PYTHONPATH': path}, timeout=300)
    ticks = [json.loads(line) for line in (tmp_path / 'stats.jsonl').read_text().splitlines()]
    events = EventAccumulator(str(tmp_path)).Reload()
    loss = events.Scalars('Loss/loss')
    assert len(loss) == len(ticks) >= 2 and len({event.step for event in loss}) == len(loss)
    for event, tick in zip(loss, ticks):
        assert event.step == round(tick['Progress/kimg']['mean'] * 1000)
        assert event.value == pytest.approx(tick['Loss/loss']['mean'], rel=1e-6)  # stored as float32
    assert 'Progress/kimg' in events.Tags()['scalars']
