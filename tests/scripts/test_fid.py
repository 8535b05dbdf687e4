"""fid.py and evaluation/features.py, evaluation/runs.py: golden statistics and FID, sharding, subset selection, the
in-memory network path, and bad input (the library's plain errors, the command line's one line).

Most tests use the golden stand-in detector. Where only the pipeline matters, a copy narrowed to its 32 non-zero
features keeps sqrtm cheap (a 2048x2048 sqrtm takes seconds on these CPUs).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import click
from click.testing import CliRunner
import numpy as np
import PIL.Image
import pytest
import torch

import fid
from evaluation import features, metrics, runs

from tests._tolerance import assert_within, eps, sum_steps
from tests.conftest import REPO_ROOT, run_python
from tests._cli_inputs import assert_one_error, invoke, unchanged, under_a_file

STANDIN = 'fid/detector-standin.pkl'
FID_SCRIPT = str(REPO_ROOT / 'fid.py')


# k of tests/_tolerance.py for one float32 feature of the stand-in detector (golden MANIFEST): x/127.5-1 (2),
# bilinear resize (2 lerps of 2 operations), 5x5x3 convolution plus bias, tanh (2), 4x4 average pool of 8x8 blocks,
# linear layer over 256 inputs plus bias.
STANDIN_STEPS = 2 + 4 + (sum_steps(75) + 1) + 2 + (sum_steps(64) + 1) + (sum_steps(256) + 1)


def _assert_stats_close(mu: np.ndarray, sigma: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray,
                        k: float = STANDIN_STEPS) -> None:
    """Statistics of float32 features that another CPU may round differently (tests/_tolerance.py).

    Each feature is within k * eps32 * s of the reference, s = the largest feature's RMS; the float64 mean keeps that
    bound, a covariance entry (a mean of products of two centred features) doubles it relative to s^2.
    """
    scale = float(np.sqrt(np.max(np.diag(sigma_ref) + mu_ref ** 2)))
    assert_within(mu, mu_ref, k, np.float32, min_scale=scale, what='mu')
    assert_within(sigma, sigma_ref, 2 * k, np.float32, min_scale=scale ** 2, what='sigma')


def _fid_tolerance(fid_value: float, k: float = STANDIN_STEPS) -> float:
    """FID is quadratic in the features: its relative rounding is twice theirs."""
    return 2 * k * eps(np.float32) * fid_value


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def _assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The command failed with a single 'Error: ...' line naming what was wrong, and no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert 'Traceback' not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _invoke(args: list[str]) -> click.testing.Result:
    """Run fid.py's command line in this process (no interpreter start-up: most CLI tests are this cheap)."""
    return CliRunner().invoke(fid.main, args, catch_exceptions=False)


def _assert_cli_error(result: click.testing.Result, *fragments: str) -> str:
    """In-process twin of _assert_one_line_error."""
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope='module')
def generated_dir(golden_dir, tmp_path_factory) -> Path:
    """The golden generated PNGs (000000.png ... 000063.png, 16x16 RGB) extracted to a folder."""
    out = tmp_path_factory.mktemp('generated')
    with zipfile.ZipFile(golden_dir / 'fid' / 'generated_images.zip') as z:
        z.extractall(out)
    return out


@pytest.fixture(scope='module')
def narrow_detector(golden_dir, tmp_path_factory) -> Path:
    """The stand-in detector returning only its 32 active features (same values, same persistence pickle path)."""
    with open(golden_dir / STANDIN, 'rb') as f:
        detector = pickle.load(f)
    detector.feature_dim = detector.num_active
    path = tmp_path_factory.mktemp('detector') / 'narrow.pkl'
    with open(path, 'wb') as f:
        pickle.dump(detector, f)
    return path


@pytest.fixture(scope='module')
def narrow_ref(golden_dir, tmp_path_factory) -> Path:
    """Golden reference statistics restricted to the 32 active features, matching ``narrow_detector``."""
    ref = np.load(golden_dir / 'fid' / 'ref_stats.npz')
    path = tmp_path_factory.mktemp('ref') / 'narrow-ref.npz'
    np.savez(path, mu=ref['mu'][:32], sigma=ref['sigma'][:32, :32])
    return path


# ----------------------------------------------------------------------------
# Golden reproduction through the command line.


def test_golden_ref_and_calc(golden_dir, generated_dir, tmp_path):
    expected = json.loads((golden_dir / 'fid' / 'expected.json').read_text())
    detector = str(golden_dir / STANDIN)

    ref_path = tmp_path / 'ref.npz'
    result = _invoke(['ref', f'--data={golden_dir / "fid" / "ref_dataset.zip"}', f'--dest={ref_path}',
                      f'--detector={detector}', '--workers=0', '--device=cpu'])
    assert result.exit_code == 0, result.output
    golden_ref = np.load(golden_dir / 'fid' / 'ref_stats.npz')
    ours = np.load(ref_path)
    assert sorted(ours.files) == ['mu', 'sigma']
    assert ours['mu'].dtype == np.float64 and ours['sigma'].shape == (2048, 2048)
    _assert_stats_close(ours['mu'], ours['sigma'], golden_ref['mu'], golden_ref['sigma'])
    # Written like the original: uncompressed np.savez, hence the same size (the zip timestamps differ).
    assert ref_path.stat().st_size == expected['ref_npz_exact_size_bytes']

    stats_path, jsonl = tmp_path / 'gen.npz', tmp_path / 'results.jsonl'
    proc = run_python([FID_SCRIPT, 'calc', f'--images={generated_dir}', f'--ref={ref_path}', '--num=64', '--seed=0',
                       f'--detector={detector}', '--workers=2', '--device=cpu', f'--save-stats={stats_path}',
                       f'--jsonl={jsonl}'])
    printed = _last_line(proc.stdout)
    assert len(printed) == len(expected['fid_printed_by_calc'])  # same format (6 significant digits)
    last_digit = 10.0 ** (-len(printed.split('.')[1]))
    assert abs(float(printed) - expected['fid']) <= _fid_tolerance(expected['fid']) + last_digit / 2
    golden_gen = np.load(golden_dir / 'fid' / 'gen_stats.npz')
    gen = np.load(stats_path)
    _assert_stats_close(gen['mu'], gen['sigma'], golden_gen['mu'], golden_gen['sigma'])
    (record,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert record['fid'] == pytest.approx(expected['fid'], abs=_fid_tolerance(expected['fid']))
    assert printed == f'{record["fid"]:g}'
    assert record['num_images'] == 64 and record['ref'] == str(ref_path) and record['detector'] == detector
    assert record['seed'] == 0 and record['elapsed_s'] > 0


def test_fid_formula_on_golden_block(golden_dir):
    """The FID restricted to the non-zero 32x32 block equals the golden block-only value."""
    expected = json.loads((golden_dir / 'fid' / 'expected.json').read_text())
    ref, gen = np.load(golden_dir / 'fid' / 'ref_stats.npz'), np.load(golden_dir / 'fid' / 'gen_stats.npz')
    value = features.calculate_fid_from_inception_stats(gen['mu'][:32], gen['sigma'][:32, :32], ref['mu'][:32],
                                                        ref['sigma'][:32, :32])
    assert value == pytest.approx(expected['fid_block_only'], rel=1e-6)


def test_fid_formula_closed_form():
    """For commuting (diagonal) covariances sqrtm is elementwise: FID = |dmu|^2 + sum (sqrt a - sqrt b)^2."""
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    mu, mu_ref = rng.normal(size=6), rng.normal(size=6)
    expected = np.square(mu - mu_ref).sum() + np.square(np.sqrt(a) - np.sqrt(b)).sum()
    value = features.calculate_fid_from_inception_stats(mu, np.diag(a), mu_ref, np.diag(b))
    assert value == pytest.approx(expected, rel=1e-12)
    assert features.calculate_fid_from_inception_stats(mu, np.diag(a), mu, np.diag(a)) == pytest.approx(0, abs=1e-12)


def test_sqrtm_imaginary_part_warns_with_magnitude():
    sigma = np.diag([1.0, -4.0])  # not a covariance: sqrtm of the product is diag(1, 2i)
    with pytest.warns(RuntimeWarning, match=r'imaginary parts up to 2 '):
        value = features.calculate_fid_from_inception_stats(np.zeros(2), sigma, np.zeros(2), np.eye(2))
    assert value == pytest.approx(1 - 4 + 2 - 2 * 1)


def test_fid_rejects_mismatched_dimensions():
    with pytest.raises(metrics.MetricError, match='same detector'):
        features.calculate_fid_from_inception_stats(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# ----------------------------------------------------------------------------
# Statistics: formula, subset selection, sharding.


def test_feature_stats_match_numpy():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(37, 5)) * [1, 2, 3, 4, 5] + 10
    stats = features.FeatureStats('cpu')
    for chunk in np.array_split(values, [3, 4, 20]):
        stats.add(torch.from_numpy(chunk))
    mu, sigma = stats.compute()
    np.testing.assert_allclose(mu, values.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(values, rowvar=False), rtol=1e-10)


def test_batches_do_not_depend_on_world_size(monkeypatch):
    """Ranks deal out the single-process batches round-robin; no batch is re-cut for another world size."""
    single = features.batches_of_this_rank(range(10), 4)
    assert single == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    monkeypatch.setattr(features.dist, 'get_world_size', lambda: 2)
    dealt = []
    for rank in (0, 1):
        monkeypatch.setattr(features.dist, 'get_rank', lambda: rank)
        dealt.append(features.batches_of_this_rank(range(10), 4))
    assert dealt == [[single[0], single[2]], [single[1]]]


def test_subset_selection_and_formula_independently(golden_dir, generated_dir):
    """--num-images/--seed keep a RandomState(seed)-shuffled subset, sorted; stats equal numpy mean/cov of its
    features."""
    with open(golden_dir / STANDIN, 'rb') as f:
        detector = pickle.load(f)
    mu, sigma = features.calculate_inception_stats(str(generated_dir), num_expected=50, seed=3, max_batch_size=16,
                                                   num_workers=0, device='cpu', detector=detector)
    order = np.arange(64)
    np.random.RandomState(3).shuffle(order)
    chosen = np.sort(order[:50])
    images = np.stack([np.asarray(PIL.Image.open(generated_dir / f'{i:06d}.png')) for i in chosen])
    with torch.no_grad():
        rows = detector(torch.from_numpy(images).permute(0, 3, 1, 2), return_features=True).double().numpy()
    # The batches of 16 above and the batch of 50 here may take other kernels (tests/_tolerance.py).
    _assert_stats_close(mu, sigma, rows.mean(0), np.cov(rows, rowvar=False))


def test_two_process_stats_equal_single_process(golden_dir, generated_dir, tmp_path):
    """torchrun with 2 gloo ranks: 7 batches of <= 10 images split 4/3; stats equal single-process within 1e-10."""
    common = ['calc', f'--images={generated_dir}', '--num=64', '--batch=10', '--workers=0', '--device=cpu',
              f'--detector={golden_dir / STANDIN}']
    single, sharded = tmp_path / 'single.npz', tmp_path / 'sharded.npz'
    run_python([FID_SCRIPT, *common, f'--save-stats={single}'], env=dict(OMP_NUM_THREADS='1'))  # same kernels as ranks
    # torchrun's parser would take '--num' for an abbreviation of its --numa-binding: the long spelling passes.
    sharded_args = [arg.replace('--num=', '--num-images=') for arg in common]
    proc = run_python(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', FID_SCRIPT,
                       *sharded_args, f'--save-stats={sharded}'], env=dict(OMP_NUM_THREADS='1'))
    assert proc.stdout.count('Saved statistics') == 1  # rank 0 alone writes
    a, b = np.load(single), np.load(sharded)
    for key in ('mu', 'sigma'):
        scale = np.abs(a[key]).max()
        assert np.abs(a[key] - b[key]).max() <= 1e-10 * scale, key
    golden_gen = np.load(golden_dir / 'fid' / 'gen_stats.npz')
    _assert_stats_close(b['mu'], b['sigma'], golden_gen['mu'], golden_gen['sigma'])


def test_grayscale_is_repeated_to_rgb(golden_dir, tmp_path):
    """A 1-channel folder gives the statistics of the same images stored as RGB."""
    rng = np.random.default_rng(5)
    gray_dir, rgb_dir = tmp_path / 'gray', tmp_path / 'rgb'
    gray_dir.mkdir(), rgb_dir.mkdir()
    for i in range(6):
        pixels = rng.integers(0, 256, size=(16, 16), dtype=np.uint8)
        PIL.Image.fromarray(pixels, 'L').save(gray_dir / f'{i:06d}.png')
        PIL.Image.fromarray(np.repeat(pixels[:, :, None], 3, axis=2), 'RGB').save(rgb_dir / f'{i:06d}.png')
    with open(golden_dir / STANDIN, 'rb') as f:
        detector = pickle.load(f)
    kwargs = dict(num_expected=6, num_workers=0, device='cpu', detector=detector)
    gray = features.calculate_inception_stats(str(gray_dir), **kwargs)
    rgb = features.calculate_inception_stats(str(rgb_dir), **kwargs)
    np.testing.assert_array_equal(gray[0], rgb[0])
    np.testing.assert_array_equal(gray[1], rgb[1])


# ----------------------------------------------------------------------------
# Reporting: --repeat, JSON lines.


def test_repeat_reports_each_and_minimum(generated_dir, narrow_detector, narrow_ref, tmp_path):
    jsonl, stats = tmp_path / 'out' / 'fid.jsonl', tmp_path / 'stats.npz'
    jsonl.parent.mkdir()
    jsonl.write_text('{"earlier": true}\n')  # appended to, not replaced
    proc = _invoke(['calc', f'--images={generated_dir}', f'--ref={narrow_ref}', '--num=40', '--seed=7', '--repeat=3',
                    f'--detector={narrow_detector}', '--workers=0', '--device=cpu', f'--jsonl={jsonl}',
                    f'--save-stats={stats}'])
    assert proc.exit_code == 0, proc.output
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert lines[0] == {'earlier': True}
    runs, summary = lines[1:4], lines[4]
    assert [r['seed'] for r in runs] == [7, 8, 9] and [r['repeat'] for r in runs] == [0, 1, 2]
    ref_mu, ref_sigma = features.load_ref_stats(str(narrow_ref))
    for index, record in enumerate(runs):
        saved = np.load(tmp_path / f'stats-{index}.npz')
        assert record['fid'] == pytest.approx(
            features.calculate_fid_from_inception_stats(saved['mu'], saved['sigma'], ref_mu, ref_sigma), rel=1e-12)
    fids = [r['fid'] for r in runs]
    assert len(set(fids)) == 3  # three different subsets
    assert summary['fid_min'] == min(fids) and summary['fids'] == fids and summary['seed'] == [7, 8, 9]
    assert _last_line(proc.stdout) == f'{min(fids):g}'
    for value in fids:
        assert f'FID {value:g}' in proc.stdout


# ----------------------------------------------------------------------------
# Detector loading.


def test_detector_comes_from_the_download_cache(golden_dir, monkeypatch, tmp_path):
    """Without --detector the Inception URL is looked up in dnnlib's cache; a cached copy needs no network."""
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path))
    downloads = tmp_path / 'downloads'
    downloads.mkdir()
    name = hashlib.md5(features.DETECTOR_URL.encode()).hexdigest() + '_inception-2015-12-05.pkl'
    shutil.copy(golden_dir / STANDIN, downloads / name)
    detector = features.load_detector(None, device='cpu', verbose=False)
    assert type(detector).__name__ == 'StandinDetector'


def test_offline_without_detector_copy_is_one_clear_error(generated_dir, monkeypatch, tmp_path):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    monkeypatch.setenv('PFGMPP_DOWNLOAD_ATTEMPTS', '1')
    monkeypatch.setenv('PFGMPP_DOWNLOAD_TIMEOUT', '2')
    url = 'http://127.0.0.1:9/inception.pkl'
    stats = tmp_path / 'unused.npz'
    result = _invoke(['calc', f'--images={generated_dir}', f'--save-stats={stats}', '--num=64', f'--detector={url}',
                      '--workers=0', '--device=cpu'])
    _assert_cli_error(result, url, '--detector=PATH')
    assert not stats.exists()


def test_default_detector_offline_names_url_and_option(monkeypatch, tmp_path):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path))
    monkeypatch.setattr(features, 'DETECTOR_URL', 'http://127.0.0.1:9/metrics/inception-2015-12-05.pkl')
    monkeypatch.setenv('PFGMPP_DOWNLOAD_ATTEMPTS', '1')
    with pytest.raises(features.FeatureError) as info:
        features.load_detector(None, verbose=False)
    assert features.DETECTOR_URL in str(info.value) and '--detector=PATH' in str(info.value)


def test_detector_file_errors(tmp_path):
    with pytest.raises(features.FeatureError, match='no such file'):
        features.load_detector(str(tmp_path / 'missing.pkl'))
    junk = tmp_path / 'junk.pkl'
    junk.write_bytes(b'not a pickle')
    with pytest.raises(features.FeatureError, match='not a loadable detector pickle'):
        features.load_detector(str(junk))
    plain = tmp_path / 'dict.pkl'
    plain.write_bytes(pickle.dumps({'a': 1}))
    with pytest.raises(features.FeatureError, match='expected a pickled torch.nn.Module'):
        features.load_detector(str(plain))


class _BadDetector(torch.nn.Module):
    """Returns pooled maps [N, 8, 1, 1] instead of flat features."""

    def forward(self, x, return_features=False):
        return torch.zeros([x.shape[0], 8, 1, 1])


class _Float32Probe(torch.nn.Module):
    """Records whether TF32 was allowed while it ran."""

    def forward(self, x, return_features=False):
        self.seen = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        return torch.zeros([x.shape[0], 4])


def test_detector_runs_without_tf32_and_restores_settings():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        probe = _Float32Probe()
        features.extract_features(probe, torch.zeros([2, 1, 8, 8], dtype=torch.uint8))
        assert probe.seen == (False, False)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_detector_output_of_wrong_shape(generated_dir):
    with pytest.raises(features.FeatureError, match=r'returned \[16, 8, 1, 1\] for 16 images; expected \[16'):
        features.calculate_inception_stats(str(generated_dir), num_expected=16, max_batch_size=16, num_workers=0,
                                           device='cpu', detector=_BadDetector())


# ----------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize('case', ['missing-key', 'mu-shape', 'sigma-shape', 'nan', 'not-npz', 'npy', 'text-dtype'])
def test_malformed_ref(tmp_path, case):
    path = tmp_path / 'ref.npz'
    good = dict(mu=np.zeros(4), sigma=np.eye(4))
    if case == 'missing-key':
        np.savez(path, mu=good['mu'], cov=good['sigma'])
        pattern = r'missing sigma; found keys \[.cov., .mu.\]'
    elif case == 'mu-shape':
        np.savez(path, mu=np.zeros((4, 1)), sigma=good['sigma'])
        pattern = r'mu has shape \[4, 1\] and sigma \[4, 4\]; expected \[D\] and \[D, D\]'
    elif case == 'sigma-shape':
        np.savez(path, mu=good['mu'], sigma=np.eye(3))
        pattern = 'expected \\[D\\] and \\[D, D\\]'
    elif case == 'nan':
        sigma = np.eye(4)
        sigma[1, 2] = np.nan
        np.savez(path, mu=good['mu'], sigma=sigma)
        pattern = 'sigma holds 1 NaN/inf'
    elif case == 'not-npz':
        path.write_text('hello')
        pattern = 'expected an .npz'
    elif case == 'npy':
        with open(path, 'wb') as f:
            np.save(f, np.zeros(4))
        pattern = 'bare .npy'
    else:
        np.savez(path, mu=np.array(['a', 'b']), sigma=good['sigma'])
        pattern = 'mu has dtype'
    with pytest.raises(features.FeatureError, match=pattern) as info:
        features.load_ref_stats(str(path))
    assert str(path) in str(info.value)


def test_missing_ref_on_the_command_line(generated_dir, tmp_path):
    result = _invoke(['calc', f'--images={generated_dir}', f'--ref={tmp_path / "nope.npz"}', '--device=cpu'])
    _assert_cli_error(result, '--ref', 'nope.npz')


def test_fewer_images_than_num(golden_dir, generated_dir, tmp_path):
    result = _invoke(['calc', f'--images={generated_dir}', f'--save-stats={tmp_path / "x.npz"}', '--num=65',
                      f'--detector={golden_dir / STANDIN}', '--workers=0', '--device=cpu'])
    _assert_cli_error(result, str(generated_dir), 'found 64 images', '--num-images asks for 65')


def _write_pngs(folder: Path, sizes: list[int]) -> None:
    folder.mkdir()
    for i, size in enumerate(sizes):
        PIL.Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8), 'RGB').save(folder / f'{i:06d}.png')


@pytest.mark.parametrize('workers', [0, 2])
def test_mixed_sizes_and_broken_files(golden_dir, tmp_path, workers):
    """The error names the offending file, also when a DataLoader worker process met it."""
    with open(golden_dir / STANDIN, 'rb') as f:
        detector = pickle.load(f)
    kwargs = dict(num_expected=4, max_batch_size=2, num_workers=workers, device='cpu', detector=detector)
    mixed = tmp_path / 'mixed'
    _write_pngs(mixed, [16, 16, 8, 16])
    with pytest.raises(features.FeatureError, match=r'000002.png: image is 8x8 but .*000000.png is 16x16') as info:
        features.calculate_inception_stats(str(mixed), **kwargs)
    assert '\n' not in str(info.value) and 'Traceback' not in str(info.value)

    broken = tmp_path / 'broken'
    _write_pngs(broken, [16, 16, 16])
    (broken / '000003.png').write_text('this is not a PNG')
    with pytest.raises(features.FeatureError, match='000003.png: cannot read image') as info:
        features.calculate_inception_stats(str(broken), **kwargs)
    assert '\n' not in str(info.value) and 'Traceback' not in str(info.value)


def test_calc_needs_ref_or_save_stats(generated_dir):
    result = _invoke(['calc', f'--images={generated_dir}'])
    assert result.exit_code == 2 and '--ref' in result.stderr


# ----------------------------------------------------------------------------
# FID straight from a network.

SNAPSHOT = 'snapshots/network-snapshot-000000.pkl'  # 16x16 EDM network


def test_gen_in_memory_equals_generate_then_calc(golden_dir, narrow_detector, narrow_ref, tmp_path, monkeypatch):
    """gen --repeat=2 over seeds 0-2 (then 3-5) gives exactly the stats of generate.py's PNGs read back by calc."""
    network = str(golden_dir / SNAPSHOT)
    sampler_flags = ['--steps=2', '--batch=4', '--S_churn=5', '--S_max=100']  # churn: the per-seed noise path too
    png_dir = tmp_path / 'png'
    run_python([str(REPO_ROOT / 'generate.py'), f'--network={network}', '--seeds=0-5', f'--outdir={png_dir}',
                '--device=cpu', *sampler_flags])
    jsonl, stats = tmp_path / 'gen.jsonl', tmp_path / 'gen.npz'
    workdir = tmp_path / 'workdir'
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    proc = _invoke(['gen', f'--network={network}', '--seeds=0-2', '--repeat=2', f'--ref={narrow_ref}',
                    f'--detector={narrow_detector}', '--device=cpu', f'--save-stats={stats}', f'--jsonl={jsonl}',
                    *sampler_flags])
    assert proc.exit_code == 0, proc.output
    assert not os.listdir(workdir), 'gen writes no images'

    with open(narrow_detector, 'rb') as f:
        detector = pickle.load(f)
    for index, seeds in enumerate([range(0, 3), range(3, 6)]):
        folder = tmp_path / f'calc-{index}'
        folder.mkdir()
        for seed in seeds:
            shutil.copy(png_dir / f'{seed:06d}.png', folder)
        mu, sigma = features.calculate_inception_stats(str(folder), num_expected=3, max_batch_size=4, num_workers=0,
                                                       device='cpu', detector=detector)
        in_memory = np.load(tmp_path / f'gen-{index}.npz')
        np.testing.assert_array_equal(in_memory['mu'], mu)
        np.testing.assert_array_equal(in_memory['sigma'], sigma)

    runs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r['seeds'] for r in runs[:2]] == ['0-2', '3-5'] and runs[2]['seeds'] == ['0-2', '3-5']
    assert runs[0]['num_images'] == 3 and runs[0]['network'] == network and runs[0]['sampler_kwargs']['num_steps'] == 2
    assert runs[2]['fid_min'] == min(runs[0]['fid'], runs[1]['fid'])
    assert _last_line(proc.stdout) == f'{runs[2]["fid_min"]:g}'


def test_gen_bad_network_is_one_clear_error(golden_dir, tmp_path):
    missing = tmp_path / 'missing.pkl'
    proc = run_python([FID_SCRIPT, 'gen', f'--network={missing}', '--seeds=0-3', '--save-stats=x.npz',
                       f'--detector={golden_dir / STANDIN}', '--device=cpu'], cwd=tmp_path, check=False)
    _assert_one_line_error(proc, '--network', str(missing))


def test_repeated_seed_ranges(tiny_networks, narrow_detector):
    assert runs.repeated_seed_ranges([0, 1, 2, 5], 3, limit=100) == [[0, 1, 2, 5], [6, 7, 8, 11], [12, 13, 14, 17]]
    with pytest.raises(features.FeatureError, match='seeds up to 109'):
        runs.repeated_seed_ranges([90, 99], 2, limit=100)
    result = _invoke(['gen', f'--network={tiny_networks[0]}', f'--seeds={(1 << 32) - 2}-{(1 << 32) - 1}', '--repeat=2',
                      '--save-stats=x.npz', f'--detector={narrow_detector}', '--device=cpu'])
    assert result.exit_code == 2 and "Invalid value for --repeat: --repeat=2 would need seeds up to" in result.stderr


# ----------------------------------------------------------------------------
# Folders that pool images of several origins; the reference checked before any statistics.


def _generate(outdir: Path, network: Path, *flags: str) -> None:
    import generate
    result = CliRunner().invoke(generate.main, ['--network', str(network), '--outdir', str(outdir), '--steps=2',
                                                '--device=cpu', *flags])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope='module')
def tiny_networks(tmp_path_factory) -> tuple[Path, Path]:
    from tests._sampler_nets import make_tiny_net, save_snapshot
    folder = tmp_path_factory.mktemp('tiny-nets')
    return (save_snapshot(make_tiny_net(seed=0), folder / 'a.pkl'),
            save_snapshot(make_tiny_net(seed=1), folder / 'b.pkl'))


def _calc_stats(images: Path, detector: Path, tmp_path: Path, *extra: str) -> click.testing.Result:
    return _invoke(['calc', f'--images={images}', f'--save-stats={tmp_path / "stats.npz"}', '--num=4',
                    f'--detector={detector}', '--workers=0', '--device=cpu', *extra])


def test_calc_refuses_folders_made_with_different_settings(tiny_networks, narrow_detector, tmp_path):
    net_a, net_b = tiny_networks
    root = tmp_path / 'fid-tmp'
    _generate(root / 'ckpt_a', net_a, '--seeds=0-1')
    _generate(root / 'ckpt_b', net_b, '--seeds=2-3')
    _assert_cli_error(_calc_stats(root, narrow_detector, tmp_path), str(root), 'ckpt_a and ckpt_b',
                      'network_sha256', '--allow-mixed')
    assert not (tmp_path / 'stats.npz').exists()
    result = _calc_stats(root, narrow_detector, tmp_path, '--allow-mixed')
    assert result.exit_code == 0, result.output
    assert (tmp_path / 'stats.npz').is_file()


def test_calc_refuses_images_of_unrecorded_origins(generated_dir, narrow_detector, tmp_path):
    """The PFGM++ fork's layout: one ckpt_* folder (with --subdirs-style thousands) per checkpoint, no manifest."""
    root = tmp_path / 'exp'
    for ckpt in ('ckpt_000100', 'ckpt_000200'):
        (root / ckpt / '000000').mkdir(parents=True)
        for i in range(2):
            shutil.copy(generated_dir / f'{i:06d}.png', root / ckpt / '000000' / f'{i:06d}.png')
    _assert_cli_error(_calc_stats(root, narrow_detector, tmp_path), 'ckpt_000100', 'ckpt_000200',
                      'without a manifest.json', f'--images={root / "ckpt_000100"}', '--allow-mixed')
    # One checkpoint's folder is one origin, its numbered subfolders included.
    result = _invoke(['calc', f'--images={root / "ckpt_000100"}', f'--save-stats={tmp_path / "one.npz"}',
                      '--num=2', f'--detector={narrow_detector}', '--workers=0', '--device=cpu'])
    assert result.exit_code == 0, result.output
    # A ZIP of the same layout is refused the same way.
    archive = tmp_path / 'exp.zip'
    with zipfile.ZipFile(archive, 'w') as z:
        for path in sorted(root.rglob('*.png')):
            z.write(path, path.relative_to(root).as_posix())
    _assert_cli_error(_calc_stats(archive, narrow_detector, tmp_path), 'ckpt_000100', '--allow-mixed')


def test_calc_accepts_one_setting_split_over_folders(tiny_networks, narrow_detector, tmp_path):
    """One run's images split over folders (two generate.py calls, or --subdirs) are accepted, and give the
    statistics of the same seeds generated into one flat folder."""
    net_a, _ = tiny_networks
    root = tmp_path / 'split'
    _generate(root / 'part1', net_a, '--seeds=0-1')
    _generate(root / 'part2', net_a, '--seeds=2-3')
    _generate(tmp_path / 'flat', net_a, '--seeds=0-3')
    _generate(tmp_path / 'subdirs', net_a, '--seeds=998-1001', '--subdirs')
    _generate(tmp_path / 'flat-998', net_a, '--seeds=998-1001')
    assert len(list((tmp_path / 'subdirs').rglob('*.png'))) == 4 and not list((tmp_path / 'subdirs').glob('*.png'))
    for split, flat in ((root, tmp_path / 'flat'), (tmp_path / 'subdirs', tmp_path / 'flat-998')):
        stats = {}
        for name, images in (('split', split), ('flat', flat)):
            result = _invoke(['calc', f'--images={images}', f'--save-stats={tmp_path / name}.npz', '--num-images=4',
                              f'--detector={narrow_detector}', '--workers=0', '--device=cpu'])
            assert result.exit_code == 0, result.output
            stats[name] = np.load(tmp_path / f'{name}.npz')
        # Same images in the same order and batch: the float64 moments may differ only by summation order,
        # a few float64 roundings of the largest second moment.
        scale = float(np.max(np.diag(stats['flat']['sigma']) + stats['flat']['mu'] ** 2))
        assert_within(stats['split']['mu'], stats['flat']['mu'], sum_steps(4), np.float64, min_scale=np.sqrt(scale),
                      what='mu')
        assert_within(stats['split']['sigma'], stats['flat']['sigma'], 2 * sum_steps(4), np.float64,
                      min_scale=scale, what='sigma')
        assert np.abs(stats['flat']['sigma']).max() > 0  # the comparison is of real spread, not of zeros


def test_ref_feature_size_is_checked_before_statistics(generated_dir, narrow_detector, tmp_path, monkeypatch,
                                                       tiny_networks):
    ref = tmp_path / 'ref.npz'
    np.savez(ref, mu=np.zeros(16), sigma=np.eye(16))

    def must_not_run(*args, **kwargs):
        raise AssertionError('statistics computed before the reference was checked')
    monkeypatch.setattr(features, 'calculate_features', must_not_run)
    monkeypatch.setattr(features, 'calculate_features_for_network', must_not_run)
    result = _invoke(['calc', f'--images={generated_dir}', f'--ref={ref}', '--num=4', f'--detector={narrow_detector}',
                      '--workers=0', '--device=cpu'])
    _assert_cli_error(result, f'--ref {ref}', 'has 16 features', 'detector returns 32')
    result = _invoke(['gen', f'--network={tiny_networks[0]}', '--seeds=0-3', f'--ref={ref}', '--steps=2',
                      f'--detector={narrow_detector}', '--device=cpu'])
    _assert_cli_error(result, f'--ref {ref}', 'has 16 features', 'detector returns 32')


@pytest.mark.parametrize('case', ['pickle', 'object-array', 'empty', 'png', 'truncated-zip'])
def test_ref_that_is_not_an_npz_is_one_line_of_ours(generated_dir, tmp_path, case):
    ref = tmp_path / 'ref.npz'
    if case == 'pickle':
        ref.write_bytes(pickle.dumps(dict(mu=np.zeros(4), sigma=np.eye(4))))
        fragment = 'holds a pickle, not an .npz archive'
    elif case == 'object-array':
        np.savez(ref, mu=np.array([None, 1], dtype=object), sigma=np.eye(2))
        fragment = 'object (pickled) arrays'
    elif case == 'empty':
        ref.write_bytes(b'')
        fragment = 'holds an empty file'
    elif case == 'png':
        shutil.copy(generated_dir / '000000.png', ref)
        fragment = 'holds a PNG image'
    else:
        np.savez(ref, mu=np.zeros(4), sigma=np.eye(4))
        ref.write_bytes(ref.read_bytes()[:-40])
        fragment = 'holds a truncated or damaged ZIP archive'
    result = _invoke(['calc', f'--images={generated_dir}', f'--ref={ref}', '--num=4', '--device=cpu'])
    error = _assert_cli_error(result, f'--ref {ref}', fragment, 'mu [D] and sigma [D, D]')
    assert 'allow_pickle' not in error and 'Traceback' not in result.output


# ----------------------------------------------------------------------------
# One spelling of --num-images; DataLoader workers; a network that samples NaN.


def test_num_images_is_the_one_spelling_and_num_an_alias(generated_dir, narrow_detector, tmp_path):
    help_text = _invoke(['calc', '--help']).output
    assert '--num-images INT' in help_text and '--num,' not in help_text and ', --num ' not in help_text
    for spelling in ('--num-images', '--num'):
        result = _invoke(['calc', f'--images={generated_dir}', f'--save-stats={tmp_path / "x.npz"}', f'{spelling}=65',
                          f'--detector={narrow_detector}', '--workers=0', '--device=cpu'])
        _assert_cli_error(result, 'found 64 images', '--num-images asks for 65')
        result = _invoke(['calc', f'--images={generated_dir}', '--save-stats=x.npz', f'{spelling}=1'])
        assert result.exit_code == 2 and "Invalid value for '--num-images': 1" in result.stderr, result.stderr
    result = _invoke(['calc', f'--images={generated_dir}', f'--save-stats={tmp_path / "x.npz"}', '--num=64',
                      '--repeat=2', f'--detector={narrow_detector}', '--workers=0', '--device=cpu'])
    _assert_cli_error(result, '--repeat=2 draws different subsets of --num-images=64 images, but there are only 64')


@pytest.mark.parametrize('cores,local_ranks,expected', [(16, 1, 3), (2, 1, 2), (2, 2, 1), (1, 1, 1), (3, 4, 1)])
def test_default_workers_fit_the_usable_cores(monkeypatch, cores, local_ranks, expected):
    monkeypatch.setattr(features.dist, 'usable_cpu_count', lambda: cores)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', str(local_ranks))
    assert features.default_workers() == expected


def test_feature_loader_workers_are_spawned_and_default_to_the_cores(golden_dir, generated_dir, monkeypatch):
    """Every feature loader starts its workers by spawn (forking after CUDA/NCCL start is unsafe), by default as many
    as the cores allow; the statistics equal those read without workers."""
    seen: list[dict] = []

    class RecordingLoader(torch.utils.data.DataLoader):
        def __init__(self, dataset, **options):
            seen.append(options)
            super().__init__(dataset, **options)
    monkeypatch.setattr(torch.utils.data, 'DataLoader', RecordingLoader)
    monkeypatch.setattr(features.dist, 'usable_cpu_count', lambda: 2)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    with open(golden_dir / STANDIN, 'rb') as f:
        detector = pickle.load(f)
    kwargs = dict(num_expected=16, max_batch_size=8, device='cpu', detector=detector)
    spawned = features.calculate_inception_stats(str(generated_dir), **kwargs)
    assert seen[-1]['num_workers'] == 1 and seen[-1]['multiprocessing_context'] == 'spawn'
    assert seen[-1]['pin_memory'] is False  # pinning only helps copies to a CUDA device
    inline = features.calculate_inception_stats(str(generated_dir), num_workers=0, **kwargs)
    assert seen[-1]['num_workers'] == 0 and 'multiprocessing_context' not in seen[-1]
    np.testing.assert_array_equal(spawned[0], inline[0])
    np.testing.assert_array_equal(spawned[1], inline[1])


def test_gen_of_a_network_that_samples_nan_is_one_line_and_no_metric(narrow_detector, narrow_ref, tmp_path,
                                                                    monkeypatch):
    """A NaN in the weights makes every sample NaN: gen stops with one line before any uint8 image reaches the
    detector, and prints, saves and appends no metric."""
    from tests._sampler_nets import make_tiny_net, save_snapshot
    net = make_tiny_net(seed=0)
    with torch.no_grad():
        next(p for p in net.parameters() if p.ndim == 4).view(-1)[0] = float('nan')
    network = save_snapshot(net, tmp_path / 'nan.pkl')
    jsonl, stats = tmp_path / 'gen.jsonl', tmp_path / 'gen.npz'
    monkeypatch.chdir(tmp_path)
    result = _invoke(['gen', f'--network={network}', '--seeds=0-3', '--steps=2', f'--ref={narrow_ref}',
                      f'--detector={narrow_detector}', '--device=cpu', f'--jsonl={jsonl}', f'--save-stats={stats}'])
    error = _assert_cli_error(result)
    assert re.search(r'nan|non-finite|not finite', error, re.IGNORECASE), error
    assert not jsonl.exists() and not stats.exists()
    assert not [line for line in result.stdout.splitlines() if line.split()[:1] in (['fid'], ['FID'])]
    assert 'Saved statistics' not in result.stdout


# ----------------------------------------------------------------------------
# Hostile and broken input: one ``Error:`` line naming the file or flag, no traceback, no partial output.


def run_fid(*args: Any) -> Any:
    import fid
    return invoke(fid.main, list(args))


FID_REFS = {
    'nan': ('ref_nan', 'NaN'),
    'wrong-shape': ('ref_shape', 'shape'),
    'missing-keys': ('ref_keys', 'missing'),
    'truncated': ('ref_truncated', 'ref-truncated.npz'),
    'empty': ('empty', 'empty.pkl'),
    'missing-file': (None, 'missing.npz'),
}


@pytest.mark.parametrize('case', list(FID_REFS))
def test_fid_calc_bad_ref(case, inputs, detector, tmp_path):
    key, fragment = FID_REFS[case]
    ref = inputs[key] if key else tmp_path / 'missing.npz'
    stats = tmp_path / 'stats.npz'
    assert_one_error(run_fid('calc', '--images', inputs['dataset'], '--ref', ref, '--num=8', '--detector', detector,
                             '--device=cpu', '--workers=0', '--save-stats', stats), fragment)
    assert not stats.exists()


@pytest.mark.parametrize('key, fragments', [('truncated_zip', ('--images', 'truncated.zip')),
                                            ('truncated_png_zip', ('--images', 'img00000000.png')),
                                            ('empty', ('--images', 'empty.pkl'))])
def test_fid_calc_broken_images(key, fragments, inputs, detector, tmp_path):
    stats = tmp_path / 'stats.npz'
    assert_one_error(run_fid('calc', '--images', inputs[key], '--num=8', '--detector', detector, '--device=cpu',
                             '--workers=0', '--save-stats', stats), *fragments)
    assert list(tmp_path.iterdir()) == []


def test_fid_ref_broken_dataset(inputs, detector, tmp_path):
    dest = tmp_path / 'ref.npz'
    assert_one_error(run_fid('ref', '--data', inputs['truncated_zip'], '--dest', dest, '--detector', detector,
                             '--device=cpu', '--workers=0'), '--data')
    assert list(tmp_path.iterdir()) == []


def test_fid_ref_unwritable_dest(inputs, detector, tmp_path):
    dest = under_a_file(tmp_path, 'ref.npz')
    assert_one_error(run_fid('ref', '--data', inputs['dataset'], '--dest', dest, '--detector', detector,
                             '--device=cpu', '--workers=0'), '--dest')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['blocker.txt']


def test_fid_ref_full_disk(inputs, detector, tmp_path, full_disk):
    dest = tmp_path / 'ref.npz'
    assert_one_error(run_fid('ref', '--data', inputs['dataset'], '--dest', dest, '--detector', detector,
                             '--device=cpu', '--workers=0'), '--dest', 'No space left on device')
    assert list(tmp_path.iterdir()) == []


def test_fid_calc_full_tmpfs(inputs, detector, tiny_tmpfs):
    with unchanged(tiny_tmpfs):
        assert_one_error(run_fid('calc', '--images', inputs['dataset'], '--num=8', '--detector', detector,
                                 '--device=cpu', '--workers=0', '--save-stats', tiny_tmpfs / 'stats.npz'),
                         '--save-stats', 'No space left on device')


def fid_gen(network: Path, tmp_path: Path, detector: Path, *extra: Any) -> Any:
    return run_fid('gen', '--network', network, '--seeds=0-1', '--steps=2', '--detector', detector, '--device=cpu',
                   '--save-stats', tmp_path / 'stats.npz', *extra)


@pytest.mark.parametrize('key, fragment', [('empty', '0 bytes'), ('dataset', 'dataset.zip'),
                                           ('weights_foreign_class', 'is not allowed')])
def test_fid_gen_bad_network(key, fragment, inputs, detector, tmp_path):
    assert_one_error(fid_gen(inputs[key], tmp_path, detector), '--network', fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('seeds', ['5-2', 'a-b'])
def test_fid_gen_bad_seeds(seeds, inputs, detector, tmp_path):
    assert_one_error(run_fid('gen', '--network', inputs['uncond'], f'--seeds={seeds}', '--detector', detector,
                             '--save-stats', tmp_path / 's.npz'), '--seeds')
    assert list(tmp_path.iterdir()) == []


def test_fid_gen_class_out_of_range(inputs, detector, tmp_path):
    assert_one_error(fid_gen(inputs['cond'], tmp_path, detector, '--class=7'), '--class')
    assert list(tmp_path.iterdir()) == []


def test_fid_gen_unwritable_save_stats(inputs, detector, tmp_path):
    stats = under_a_file(tmp_path, 'stats.npz')
    assert_one_error(run_fid('gen', '--network', inputs['uncond'], '--seeds=0-1', '--steps=2', '--detector', detector,
                             '--device=cpu', '--save-stats', stats), '--save-stats')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['blocker.txt']
