"""python -m demo.robustness --quick: the robustness study's pipeline end to end, its records and its resume rules.

One module-scoped run (two D values, tiny training, 2 sets of 16 images) is rerun three ways: unchanged (everything
reused, no tool started), with another alpha list (only the new point is generated and scored) and with another
training length for one D (that model is retrained and all its images remade).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import run_python

STUDY = ['-m', 'demo.robustness', '--quick', '--nproc=1']
ENV = {'OMP_NUM_THREADS': '1'}


def run_study(work: Path, results: Path, *extra: str) -> str:
    return run_python([*STUDY, f'--outdir={work}', f'--results={results}', *extra], env=ENV, timeout=900).stdout


def snapshot_record(work: Path, name: str) -> dict:
    return json.loads((work / 'runs' / f'{name}.json').read_text())


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('robustness')
    work, results = root / 'work', root / 'results'
    stdout = run_study(work, results, '--aug-dims=16,inf', '--alphas=0.3')
    return work, results, stdout


def test_quick_study_writes_table_figures_and_settings(first_run):
    work, results, stdout = first_run
    for name in ('robustness.json', 'robustness.md', 'fd-vs-alpha.png', 'fd-vs-steps.png', 'fd-vs-bits.png'):
        assert (results / name).stat().st_size > 0, name
    table = json.loads((results / 'robustness.json').read_text())
    settings = table['settings']
    assert settings['aug_dims'] == [16.0, None] and settings['alphas'] == [0.3] and settings['num'] == 16
    assert settings['sets'] == 2 and settings['clean_steps'] == 4 and settings['steps'] == [2]
    studies = table['studies']
    assert set(studies) == {'alpha', 'steps', 'bits'} and set(studies['alpha']) == {'D16', 'Dinf'}
    for rows in studies.values():
        for points in rows.values():
            for point in points:
                assert point['n'] == 2 and len(point['values']) == 2
                assert all(math.isfinite(v) and v > 0 for v in point['values'])
                assert math.isclose(point['mean'], sum(point['values']) / 2)
    for name in ('D16', 'Dinf'):
        # The clean setting is measured once and shared: alpha 0 = NFE 7 (4 Heun steps) = float32 weights.
        clean = studies['alpha'][name][0]
        assert clean['x'] == 0 and [p['x'] for p in studies['steps'][name]] == [3, 7]
        assert studies['steps'][name][1]['values'] == clean['values'] == studies['bits'][name][-1]['values']
        assert [p['x'] for p in studies['bits'][name]] == [4, 32]
    # The tools ran as a user runs them, and each model's settings are recorded beside it.
    assert 'train.py' in stdout and 'generate.py' in stdout and '--sweep-alpha=0,0.3' in stdout
    record = snapshot_record(work, 'D16')
    assert record['complete'] and '--aug_dim=16' in record['settings']['flags']
    assert '--pfgmpp=0' in snapshot_record(work, 'Dinf')['settings']['flags']
    manifest = json.loads((work / 'samples' / 'D16' / 'alpha' / 'alpha0.3' / 'manifest.json').read_text())
    assert manifest['noise_injection_alpha'] == 0.3 and manifest['num_images'] == 32
    assert table['real_floor']['n'] == 2 and table['timing']['training_s'] > 0
    assert '| D=16 |' in (results / 'robustness.md').read_text()


def test_quick_study_resumes_reusing_matching_work_and_redoing_changed_work(first_run, tmp_path):
    work, _, _ = first_run
    before = mtimes(work)
    first_table = json.loads((first_run[1] / 'robustness.json').read_text())

    # Unchanged: nothing is trained, generated or scored again, and the numbers are the same.
    stdout = run_study(work, tmp_path / 'again', '--aug-dims=16,inf', '--alphas=0.3')
    assert 'train.py' not in stdout and 'generate.py' not in stdout and 'fid.py' not in stdout
    assert stdout.count('reusing the trained model') == 2
    assert mtimes(work) == before
    assert json.loads((tmp_path / 'again' / 'robustness.json').read_text())['studies'] == first_table['studies']

    # Another alpha list: the alpha-0 images and their FD are kept, the new point is made and scored.
    alpha_dir = work / 'samples' / 'Dinf' / 'alpha'
    stdout = run_study(work, tmp_path / 'alpha', '--aug-dims=inf', '--alphas=0.2')
    assert 'train.py' not in stdout and '--sweep-alpha=0,0.2' in stdout
    pngs = {k: v for k, v in mtimes(alpha_dir / 'alpha0').items() if k.endswith('.png')}
    assert len(pngs) == 32 and pngs == {k[len('samples/Dinf/alpha/alpha0/'):]: v for k, v in before.items()
                                        if k.startswith('samples/Dinf/alpha/alpha0/') and k.endswith('.png')}
    assert 'Dinf/alpha: FD-digits of 2 image set(s) computed, 2 reused' in stdout
    assert (alpha_dir / 'alpha0.2' / '000031.png').is_file()
    table = json.loads((tmp_path / 'alpha' / 'robustness.json').read_text())
    assert [p['x'] for p in table['studies']['alpha']['Dinf']] == [0, 0.2]
    assert table['studies']['alpha']['Dinf'][0] == first_table['studies']['alpha']['Dinf'][0]

    # Another training length for D=16: that model is retrained and every one of its images is made again.
    old = snapshot_record(work, 'D16')
    old_png = (work / 'samples' / 'D16' / 'bits' / 'bits04' / '000000.png').stat().st_mtime_ns
    stdout = run_study(work, tmp_path / 'kimg', '--aug-dims=16', '--alphas=0.3', '--kimg=0.3')
    new = snapshot_record(work, 'D16')
    assert 'train.py' in stdout and '--duration=0.0003' in new['settings']['flags']
    assert new['snapshot_sha256'] != old['snapshot_sha256']
    assert 'made with other settings; deleting it' in stdout
    assert (work / 'samples' / 'D16' / 'bits' / 'bits04' / '000000.png').stat().st_mtime_ns != old_png
    assert mtimes(work / 'runs' / 'Dinf') == {k[len('runs/Dinf/'):]: v for k, v in before.items()
                                              if k.startswith('runs/Dinf/')}


@pytest.mark.parametrize('args, message', [(['--aug-dims=0,inf'], '--aug-dims'), (['--alphas=x'], '--alphas'),
                                           (['--bits=1'], '--bits')])
def test_bad_lists_are_one_line_errors(tmp_path, args, message):
    from demo.robustness import main
    result = CliRunner().invoke(main, ['--quick', f'--outdir={tmp_path}', *args])
    assert result.exit_code == 2 and message in result.output
    assert not os.listdir(tmp_path)
