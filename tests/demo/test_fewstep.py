"""python -m demo.fewstep: consistency tuning and the training-free solvers measured against the teacher's Heun on
the same seeds, on a (tiny) model set; its verdict rule and its reuse of stored work."""

from __future__ import annotations

import json

import click
import numpy as np
import pytest

from demo import fewstep
from demo.model_set import Scorer
from tests.demo.conftest import run_study

OUTCOMES = {'met', 'missed', 'undecided'}


def _study(model_set, outdir, results, *flags: str, check: bool = True):
    return run_study('demo.fewstep', model_set, outdir, results, *flags, check=check)


def test_quick_study_end_to_end_and_reused(quick_model_set, tmp_path) -> None:
    outdir, results = tmp_path / 'work', tmp_path / 'docs'
    first = _study(quick_model_set, outdir, results).stdout
    assert first.count('--consistency=1') == 2          # one tuning run per teacher
    summary = json.loads((results / 'fewstep.json').read_text())
    assert [m['model'] for m in summary['models']] == ['D16-seed0', 'Dinf-seed0']
    cfg = fewstep.QUICK
    for m in summary['models']:
        methods = {(r['method'], r['nfe']) for r in m['rows']}
        assert {('consistency', 1), ('consistency', 2), ('consistency', 4)} <= methods
        assert {(s, 3) for s in cfg['solvers'].split(',')} <= methods and ('heun', 3) in methods
        assert m['teacher']['nfe'] == 2 * cfg['teacher_steps'] - 1 and len(m['teacher']['sets']) == cfg['sets']
        for row in m['rows']:
            assert len(row['sets']) == cfg['sets'] and row['ci'][0] <= row['ci'][1]
            assert row['diff'] == pytest.approx(row['fd'] - row['teacher_fd'], rel=1e-9)
            assert row['teacher_fd'] == pytest.approx(m['teacher']['fd'], rel=1e-9)
        assert [p['kimg'] for p in m['curve']] == sorted(p['kimg'] for p in m['curve']) and m['curve'][0]['kimg'] == 0
        for goal in ('consistency-1', 'consistency-2', 'training-free'):
            assert m['verdicts'][goal]['outcome'] in OUTCOMES
    assert summary['wall_s'] > 0 and summary['cpu_s'] > 0
    for name in ('fewstep.md', 'fewstep-D16.png', 'fewstep-Dinf.png', 'consistency-curve.png'):
        assert (results / name).stat().st_size > 0

    # A rerun tunes nothing and samples nothing: every feature array and the tuned model are reused.
    again = _study(quick_model_set, outdir, tmp_path / 'again').stdout
    assert '--consistency=1' not in again and 'Generating' not in again
    assert json.loads((tmp_path / 'again' / 'fewstep.json').read_text())['models'] == summary['models']


def test_refuses_a_teacher_the_set_does_not_hold_and_bad_options(quick_model_set, tmp_path) -> None:
    result = _study(quick_model_set, tmp_path / 'w', tmp_path / 'r', '--aug-dims=128', check=False)
    assert result.returncode != 0 and 'no D=128 model with training seed 0' in result.stderr
    for flag, name in (('--lr=nan', '--lr'), ('--ema=nan', '--ema'), ('--tune-kimg=inf', '--tune-kimg'),
                       ('--nfe=2', '--nfe'), ('--solvers=unipc:5', '--solvers'), ('--solvers=,', '--solvers'),
                       ('--solvers=unipc,unipc:2:edm', '--solvers')):
        result = _study(quick_model_set, tmp_path / 'w', tmp_path / 'r', flag, check=False)
        assert result.returncode == 2 and name in result.stderr and 'Traceback' not in result.stderr, result.stderr


class _FixedScorer(Scorer):
    def __init__(self, dim: int):
        self.mu_ref, self.sigma_ref = np.zeros(dim), np.eye(dim)


def test_verdict_finds_a_ratio_on_either_side_of_the_margin() -> None:
    rng = np.random.default_rng(1)
    scorer, cfg = _FixedScorer(4), dict(bootstrap=200)
    teacher = rng.standard_normal((2000, 4)) + 1.0         # FD about 4 against N(0, I)
    close = teacher - 0.02                                 # slightly better than the teacher
    far = teacher + 1.0                                    # FD about 16
    assert fewstep.verdict(close, teacher, 1.15, scorer, cfg)['outcome'] == 'met'
    assert fewstep.verdict(far, teacher, 1.5, scorer, cfg)['outcome'] == 'missed'
    tie = fewstep.verdict(teacher, teacher, 1.0, scorer, cfg)
    assert tie['outcome'] == 'undecided' and tie['contrast'] == 0


def test_entries_cover_heun_and_every_solver() -> None:
    cfg = dict(heun_steps=[3, 4], teacher_steps=18, solvers=['ipndm', 'unipc'], nfe=[4, 8])
    rows = fewstep.entries(cfg)
    assert [(m, n) for m, n, _ in rows] == [('heun', 5), ('heun', 7), ('heun', 35), ('ipndm', 4), ('ipndm', 8),
                                            ('unipc', 4), ('unipc', 8)]
    assert rows[3][2] == dict(solver='ipndm', num_steps=4, spacing='edm', solver_order=4)


def test_solver_entries_spell_out_order_and_spacing() -> None:
    assert fewstep.solver_options('dpmpp2m') == dict(solver='dpmpp2m', spacing='edm', solver_order=None)
    assert fewstep.solver_options('unipc') == dict(solver='unipc', spacing='edm', solver_order=2)
    assert fewstep.solver_options('unipc:3') == dict(solver='unipc', spacing='edm', solver_order=3)
    assert fewstep.solver_options('unipc:3:logsnr') == dict(solver='unipc', spacing='logsnr', solver_order=3)
    assert fewstep.solver_options('dpmpp3m::logsnr') == dict(solver='dpmpp3m', spacing='logsnr', solver_order=None)
    for entry, message in (('heun', 'NAME one of'), ('unipc:4', 'from 1 to 3'), ('unipc:x', 'expected an integer'),
                           ('unipc:-1', 'from 1 to 3'), ('unipc:\u00b2', 'expected an integer'),
                           ('dpmpp2m:2', 'name their order'), ('ipndm:2:log', 'spacing "log"'),
                           ('unipc:2:edm:1', 'expected NAME')):
        with pytest.raises(click.BadParameter, match=message) as info:
            fewstep.solver_options(entry)
        assert info.value.param_hint == '--solvers' and '\n' not in info.value.message
