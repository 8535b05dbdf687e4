"""A tiny reference model set (``python -m demo.model_set --quick``, one stage) shared by the studies built on it,
and how those studies are run on it."""

from __future__ import annotations

import pytest

from tests.conftest import run_python


@pytest.fixture(scope='session')
def quick_model_set(tmp_path_factory):
    """The folder of a quick model set: D = 16 and D = inf, training seeds 0 and 1, one stage each."""
    outdir = tmp_path_factory.mktemp('model-set')
    run_python(['-m', 'demo.model_set', '--quick', f'--outdir={outdir}', f'--results={outdir / "results"}',
                '--aug-dims=16,inf', '--train-seeds=0,1', '--max-stages=1'], env={'OMP_NUM_THREADS': '1'},
               timeout=900)
    return outdir


def run_study(module: str, model_set, outdir, results, *flags: str, check: bool = True):
    """``python -m MODULE --quick`` on ``model_set`` with these folders and extra flags, one thread."""
    return run_python(['-m', module, '--quick', f'--model-set={model_set}', f'--outdir={outdir}',
                       f'--results={results}', *flags], env={'OMP_NUM_THREADS': '1'}, timeout=900, check=check)
