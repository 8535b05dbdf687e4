"""``python -m demo.model_set --quick`` end to end: every model trained and scored per stage, the curves written, and
a rerun that continues the recorded stages (train.py --resume=auto) instead of training them again."""

from __future__ import annotations

import json
import os
import re
import shutil

import click
import numpy as np
import pytest

from demo import model_set
from tests.conftest import run_python


def _run(outdir, results, *flags: str) -> str:
    return run_python(['-m', 'demo.model_set', '--quick', f'--outdir={outdir}', f'--results={results}', *flags],
                      env={'OMP_NUM_THREADS': '1'}, timeout=900).stdout


def _record(outdir, name: str) -> dict:
    with open(os.path.join(outdir, 'runs', f'{name}.json')) as f:
        return json.load(f)


def test_quick_model_set_end_to_end_and_resumed(tmp_path) -> None:
    outdir, results = tmp_path / 'work', tmp_path / 'docs'
    first = _run(outdir, results, '--aug-dims=16,inf', '--train-seeds=0,1', '--max-stages=1')
    assert first.count('train.py --outdir=') == 4
    with open(results / 'model-set.json') as f:
        summary = json.load(f)
    assert sorted(m['name'] for m in summary['models']) == ['D16-seed0', 'D16-seed1', 'Dinf-seed0', 'Dinf-seed1']
    for model in summary['models']:
        (stage,) = model['stages']
        assert stage['kimg'] == pytest.approx(model_set.QUICK['first_kimg'])
        assert np.isfinite(stage['fd']) and stage['fd'] > 0 and model['stopped'] == 'max_stages'
    # Two training seeds of D=16 against two of D=inf: the two-level paired comparison.
    versus = summary['versus_inf']['D16']
    assert versus['num_models'] == 2 and versus['num_images'] == model_set.QUICK['num']
    assert versus['ci_low'] <= versus['diff_mean'] <= versus['ci_high']
    assert summary['wall_s'] > 0 and summary['cpu_s'] > 0 and summary['machine']['cpus'] >= 1
    assert summary['stage_seconds_total'] == pytest.approx(sum(m['stages'][0]['seconds'] for m in summary['models']),
                                                       abs=0.11)
    assert (results / 'model-set.png').stat().st_size > 0
    before = _record(outdir, 'D16-seed0')

    # One more doubling for one model: its first stage is reused, its run continues from the saved state.
    second = _run(outdir, results, '--aug-dims=16', '--train-seeds=0', '--max-stages=2')
    assert 'D16-seed0: reusing 1 recorded stage(s)' in second
    assert second.count('train.py --outdir=') == 1
    assert 'Resuming from the training state' in second
    after = _record(outdir, 'D16-seed0')
    assert after['stages'][0] == before['stages'][0]
    stage = after['stages'][1]
    assert stage['kimg'] == pytest.approx(2 * model_set.QUICK['first_kimg'])
    assert stage['snapshot_sha256'] != before['stages'][0]['snapshot_sha256']
    # The gain is the paired difference of the two stages' FD on the same seeds, with its bootstrap interval.
    assert stage['gain'] == pytest.approx(before['stages'][0]['fd'] - stage['fd'], rel=1e-9, abs=1e-9)
    assert stage['gain_ci'][0] <= stage['gain'] + 4 * stage['gain_se'] and stage['gain_se'] > 0
    with open(outdir / 'runs' / 'D16-seed0' / 'stats.jsonl') as f:
        kimgs = [json.loads(line)['Progress/kimg']['mean'] for line in f if line.strip()]
    assert kimgs[-1] == pytest.approx(2 * model_set.QUICK['first_kimg'])   # continued, not retrained from 0

    # Nothing left to do: a rerun with the same settings trains nothing and changes no record.
    third = _run(outdir, results, '--aug-dims=16', '--train-seeds=0', '--max-stages=2')
    assert 'train.py --outdir=' not in third
    assert _record(outdir, 'D16-seed0') == after


def test_train_flags_replace_the_demo_seed() -> None:
    flags = model_set.train_flags(16.0, 3, model_set.QUICK)
    assert '--seed=3' in flags and '--seed=0' not in flags
    assert '--pfgmpp=1' in flags and '--aug_dim=16' in flags
    assert '--pfgmpp=0' in model_set.train_flags(None, 0, model_set.QUICK)


def test_quick_model_set_picks_the_best_post_hoc_ema(tmp_path) -> None:
    outdir, results = tmp_path / 'work', tmp_path / 'docs'
    stdout = _run(outdir, results, '--aug-dims=inf', '--train-seeds=0', '--max-stages=1', '--phema=0.05,0.15')
    assert 'reconstruct_phema.py' in stdout
    record = _record(outdir, 'Dinf-seed0')
    assert '--phema=' + model_set.PHEMA_TRACKED in record['settings']['flags']
    # The stage itself is scored on the run's own EMA snapshot, not on a tracked power-function EMA.
    assert re.fullmatch(r'Dinf-seed0/network-snapshot-\d+\.pkl', record['stages'][0]['snapshot'])
    phema = record['phema']
    assert phema['stage'] == 0 and phema['sigma_rel'] == [0.05, 0.15] and sorted(phema['fd']) == ['0.05', '0.15']
    assert phema['best_fd'] == min(phema['fd'].values()) and phema['fd'][f'{phema["best_sigma_rel"]:g}'] == \
        phema['best_fd']
    with open(results / 'model-set.json') as f:
        assert json.load(f)['models'][0]['phema'] == phema
    # A rerun finds the reconstruction recorded for this stage and does not redo it.
    assert 'reconstruct_phema.py' not in _run(outdir, results, '--aug-dims=inf', '--train-seeds=0', '--max-stages=1',
                                              '--phema=0.05,0.15')


def test_trained_models_refuses_a_file_and_an_unfinished_set(quick_model_set, tmp_path) -> None:
    assert [m['name'] for m in model_set.trained_models(str(quick_model_set))] == [
        'D16-seed0', 'D16-seed1', 'Dinf-seed0', 'Dinf-seed1']
    not_a_folder = tmp_path / 'set.json'
    not_a_folder.write_text('{}')
    with pytest.raises(click.ClickException, match='is a file; expected the --outdir folder'):
        model_set.trained_models(str(not_a_folder))
    # An interrupted continuation: one model a stage behind the others and not converged.
    unfinished = tmp_path / 'unfinished'
    shutil.copytree(quick_model_set / 'runs', unfinished / 'runs')
    path = unfinished / 'runs' / 'D16-seed1.json'
    record = json.loads(path.read_text())
    record['stages'][-1]['kimg'] /= 2
    record['stopped'] = 'max_stages'
    path.write_text(json.dumps(record))
    with pytest.raises(click.ClickException, match='D16-seed1 not converged and short of') as info:
        model_set.trained_models(str(unfinished))
    assert '\n' not in info.value.message
    record['stopped'] = 'converged'   # a model that converged earlier is where it should be
    path.write_text(json.dumps(record))
    assert len(model_set.trained_models(str(unfinished))) == 4
