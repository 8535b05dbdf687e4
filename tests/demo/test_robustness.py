"""python -m demo.robustness: the paper's robustness claims tested on a (tiny) model set with paired comparisons,
its verdict rules, its reuse of stored features and its one-line refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from demo import robustness
from demo.model_set import Scorer
from tests.demo.conftest import run_study

VERDICTS = {'reproduced', 'reversed', 'mixed', 'undecided at this power'}


def _study(model_set, outdir, results, *flags: str, check: bool = True):
    return run_study('demo.robustness', model_set, outdir, results, *flags, check=check)


def test_quick_study_end_to_end_and_reused(quick_model_set, tmp_path) -> None:
    outdir, results = tmp_path / 'work', tmp_path / 'docs'
    first = _study(quick_model_set, outdir, results).stdout
    summary = json.loads((results / 'robustness.json').read_text())
    tags = list(summary['points'])
    assert tags == ['clean', 'alpha0.3', 'steps002', 'bits03-tensor', 'bits03-channel']
    assert sorted(summary['table']) == ['D16', 'Dinf']
    for tag in tags:
        d16, dinf = summary['table']['D16'][tag], summary['table']['Dinf'][tag]
        assert len(d16['fd_per_seed']) == 2 and np.isfinite(d16['fd']) and np.isfinite(dinf['fd'])
        assert 'gap' not in dinf and 'contrast' not in dinf
        gap = d16['gap']
        assert gap['ci'][0] <= gap['ci'][1] and gap['sign'] in (-1, 0, 1)
        assert gap['value'] == pytest.approx(d16['fd'] - dinf['fd'], rel=1e-9)
        assert ('contrast' in d16) == (tag != 'clean')
        for entry in (gap, d16.get('contrast')):   # powered: decided from n images (a prefix size), or not at all
            if entry is not None:
                assert entry['images'] == 24
                assert (entry['images_needed'] is None) == (entry['sign'] == 0)
                assert entry['images_needed'] in (None, 24)   # 24 images make a single prefix
    # The clean setting is the model set's own scoring: same seeds, same sampler, same FD.
    set_fds = {m['name']: m['stages'][-1]['fd']
               for m in json.loads((quick_model_set / 'results' / 'model-set.json').read_text())['models']}
    assert summary['table']['D16']['clean']['fd_per_seed'] == pytest.approx([set_fds['D16-seed0'],
                                                                             set_fds['D16-seed1']])
    for study in robustness.STUDIES:
        assert summary['verdicts'][study]['by_D']['D16'] in VERDICTS
    assert summary['verdicts']['sweet_spot']['verdict'] == 'not applicable (needs two finite D)'   # one finite D
    assert summary['wall_s'] > 0 and summary['cpu_s'] > 0 and summary['machine']['cpus'] >= 1
    assert '| clean |' in (results / 'robustness.md').read_text()
    for study in robustness.STUDIES:
        assert (results / f'fd-vs-{study}.png').stat().st_size > 0
    assert first.count('Generating') == 2 * 2 * (len(tags) - 1)

    # A rerun reuses every stored feature array; a new alpha adds only its own.
    again = _study(quick_model_set, outdir, tmp_path / 'again').stdout
    assert 'Generating' not in again
    assert json.loads((tmp_path / 'again' / 'robustness.json').read_text())['table'] == summary['table']
    more = _study(quick_model_set, outdir, tmp_path / 'more', '--alphas=0.3,0.6').stdout
    assert more.count('Generating') == 2 * 2


def test_refuses_a_model_set_without_diffusion_or_with_other_seeds(quick_model_set, tmp_path) -> None:
    partial = tmp_path / 'partial'
    shutil.copytree(quick_model_set / 'runs', partial / 'runs')
    for path in (partial / 'runs').glob('D16-seed1*'):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = _study(partial, tmp_path / 'w', tmp_path / 'r', check=False)
    assert result.returncode != 0
    assert 'D=16 has training seeds [0] but D = inf has [0, 1]' in result.stderr
    for path in (partial / 'runs').glob('Dinf*'):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = _study(partial, tmp_path / 'w', tmp_path / 'r', check=False)
    assert 'needs D = inf and at least one finite D' in result.stderr
    result = _study(tmp_path / 'nothing', tmp_path / 'w', tmp_path / 'r', check=False)
    assert 'no trained model recorded; run python -m demo.model_set' in result.stderr


def test_cells_say_how_many_images_decided() -> None:
    entry = dict(value=-12.34, ci=[-20.0, -4.5], sign=-1, images=500, images_needed=256)
    assert robustness.cell(entry) == '-12.3 (-20.0, -4.5) n=256'
    assert robustness.cell(dict(entry, ci=[-20.0, 3.0], sign=0, images_needed=None)) == '-12.3 (-20.0, +3.0) n>500'
    assert robustness.cell(dict(value=1.0, ci=[0.5, 1.5], sign=1)) == '+1.0 (+0.5, +1.5)'
    assert robustness.cell(None) == ''


def test_verdict_rules() -> None:
    assert robustness.claim_verdict([]) == 'not tested (no setting)'
    assert robustness.claim_verdict([0, 0]) == 'undecided at this power'
    assert robustness.claim_verdict([0, -1]) == 'reproduced'
    assert robustness.claim_verdict([1, 0]) == 'reversed'
    assert robustness.claim_verdict([1, -1]) == 'mixed'
    points = robustness.settings_of(dict(alphas=[0.2], steps=[4, 18], bits=[3]), clean_steps=18)
    assert list(points) == ['clean', 'alpha0.2', 'steps004', 'bits03-tensor', 'bits03-channel']
    assert points['steps004']['x'] == 7 and points['bits03-channel']['granularity'] == 'channel'


class _FixedScorer(Scorer):
    def __init__(self, dim: int):   # the reference moments of a standard normal, no detector
        self.mu_ref, self.sigma_ref = np.zeros(dim), np.eye(dim)


def test_a_model_that_degrades_less_than_diffusion_is_found_more_robust() -> None:
    # Synthetic features: the clean sets are the same for both D (so their gap is exactly 0); the perturbed setting
    # shifts D = inf's features by 1.0 and D's by 0.2 along every axis, so D loses less FD, which the contrast must
    # find at this size.
    rng = np.random.default_rng(0)
    dim, num = 4, 400
    scorer = _FixedScorer(dim)

    cleans = [rng.standard_normal((num, dim)) for _ in range(2)]   # one per training seed, shared by both D
    feats = {16.0: [dict(clean=c, alpha0=c + 0.2) for c in cleans], None: [dict(clean=c, alpha0=c + 1.0)
                                                                          for c in cleans]}
    points = {'clean': dict(study='clean'), 'alpha0': dict(study='alpha')}
    table = robustness.compare_all(feats, points, scorer, bootstrap=200)
    assert table['D16']['alpha0']['contrast']['sign'] == -1
    assert table['D16']['clean']['gap']['sign'] == 0
