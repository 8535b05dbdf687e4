"""fid.py --metrics: reference files for each metric, one detector pass, printed and JSON results, bootstrap and
repeat summaries, sharding of kept features, and the DINOv2 detector through torch.hub on a local stand-in
repository (no network: a tiny randomly initialised ViT behind the official entry point's name)."""

from __future__ import annotations

import json
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT, run_python
from tests.scripts.test_fid import (_assert_cli_error, _invoke, _last_line, generated_dir,  # noqa: F401
                            narrow_detector, narrow_ref)
from evaluation import features, metrics, runs

FID_SCRIPT = str(REPO_ROOT / 'fid.py')

#: A stand-in for github.com/facebookresearch/dinov2: the same entry point, a tiny ViT (14x14 patches, a class
#: token, one transformer layer, final LayerNorm) returning its class token, and a log of the images it saw.
HUBCONF = '''
import os
import torch

dependencies = ['torch']


class TinyViT(torch.nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.patch_embed = torch.nn.Conv2d(3, dim, 14, stride=14)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.block = torch.nn.TransformerEncoderLayer(dim, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.norm = torch.nn.LayerNorm(dim)
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        with open(os.path.join(os.path.dirname(__file__), 'calls.txt'), 'a') as f:
            f.write(f'{x.shape[0]}\\n')
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.norm(self.block(tokens))[:, 0]


def dinov2_vitl14(*, pretrained=True, **kwargs):
    if pretrained:
        raise OSError('<urlopen error [Errno -3] Temporary failure in name resolution>')
    return TinyViT()
'''


@pytest.fixture()
def hub_repo(tmp_path) -> Path:
    """A local 'dinov2' repository with weights (a seeded random TinyViT) beside its hubconf.py."""
    repo = tmp_path / 'dinov2'
    repo.mkdir()
    (repo / 'hubconf.py').write_text(HUBCONF)
    model = torch.hub.load(str(repo), metrics.DINOV2_ENTRY, source='local', pretrained=False)
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) * 0.3 for k, v in model.state_dict().items()}
    torch.save(state, repo / metrics.DINOV2_WEIGHTS_FILE)
    return repo


def _calls(repo: Path) -> list[int]:
    path = repo / 'calls.txt'
    return [int(line) for line in path.read_text().split()] if path.exists() else []


# ----------------------------------------------------------------------------
# The DINOv2 detector.


def test_dinov2_local_copy_loads_weights_and_preprocesses_like_edm2(hub_repo):
    detector = metrics.load_dinov2(str(hub_repo))
    saved = torch.load(hub_repo / metrics.DINOV2_WEIGHTS_FILE)
    assert torch.equal(detector.model.cls_token, saved['cls_token'])
    assert not detector.training and not any(p.requires_grad for p in detector.parameters())

    values = torch.tensor([10, 128, 250], dtype=torch.uint8)
    images = values.reshape(1, 3, 1, 1).expand(2, 3, 16, 16).contiguous()
    features = detector(images, return_features=True)
    assert features.shape == (2, 8) and features.dtype == torch.float32
    (seen,) = detector.model.inputs
    assert seen.shape == (2, 3, metrics.DINOV2_RESOLUTION, metrics.DINOV2_RESOLUTION)
    # A constant image stays constant under the bicubic resize; then [0, 1] and ImageNet's mean and std.
    expected = (values.double() / 255 - torch.tensor(metrics.IMAGENET_MEAN)) / torch.tensor(metrics.IMAGENET_STD)
    scale = expected.abs().max().item()
    assert (seen.double() - expected.reshape(1, 3, 1, 1)).abs().max() <= 64 * torch.finfo(torch.float32).eps * scale


def test_dinov2_offline_messages(hub_repo, tmp_path, monkeypatch):
    (hub_repo / metrics.DINOV2_WEIGHTS_FILE).unlink()
    with pytest.raises(metrics.DetectorUnavailable) as info:
        metrics.load_dinov2(str(hub_repo))
    assert metrics.DINOV2_WEIGHTS_URL in str(info.value) and str(hub_repo) in str(info.value)

    with pytest.raises(metrics.MetricError, match='a directory with hubconf.py'):
        metrics.load_dinov2(str(tmp_path / 'nothing'))

    def offline(*args, **kwargs):
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    monkeypatch.setattr(torch.hub, 'load', offline)
    hub_dir = torch.hub.get_dir()
    with pytest.raises(metrics.DetectorUnavailable) as info:
        metrics.load_dinov2(None)
    message = str(info.value)
    assert 'github.com/facebookresearch/dinov2' in message and '--dinov2=DIR' in message
    assert metrics.DINOV2_WEIGHTS_URL in message and '\n' not in message
    assert torch.hub.get_dir() == hub_dir  # restored


# ----------------------------------------------------------------------------
# Reference files and results through the command line.


def test_all_metrics_in_one_pass_of_identical_sets(generated_dir, narrow_detector, hub_repo, tmp_path):
    """ref and calc on the same 64 images: FD and FD-DINOv2 ~ 0, KID ~ 0, precision = recall = 1; each detector
    sees each image once per command."""
    ref_path, jsonl = tmp_path / 'ref.npz', tmp_path / 'out.jsonl'
    common = [f'--detector={narrow_detector}', f'--dinov2={hub_repo}', '--workers=0', '--device=cpu', '--batch=20']
    result = _invoke(['ref', f'--data={generated_dir}', f'--dest={ref_path}', '--metrics=fid,fd_dinov2,kid,pr',
                      *common])
    assert result.exit_code == 0, result.output
    assert _calls(hub_repo) == [16, 16, 16, 16]  # near-equal batches of at most 20
    ref = np.load(ref_path)
    assert sorted(ref.files) == ['fd_dinov2_mu', 'fd_dinov2_sigma', 'features', 'mu', 'sigma']
    assert ref['features'].shape == (64, 32) and ref['features'].dtype == np.float32
    assert ref['fd_dinov2_mu'].shape == (8,) and ref['fd_dinov2_sigma'].dtype == np.float64

    result = _invoke(['calc', f'--images={generated_dir}', f'--ref={ref_path}', '--num=64',
                      '--metrics=fid,fd_dinov2,kid,pr', f'--jsonl={jsonl}', *common])
    assert result.exit_code == 0, result.output
    assert len(_calls(hub_repo)) == 8
    (record,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    for key in ('fid', 'fd_dinov2'):
        assert abs(record[key]) < 1e-6
    assert abs(record['kid']) < 1e-2 and record['precision'] == record['recall'] == 1.0
    assert record['num_images'] == 64 and record['num_ref_features'] == 64 and record['kid_subset_size'] == 64
    assert record['dinov2'] == str(hub_repo) and record['metrics'] == ['fid', 'fd_dinov2', 'kid', 'pr']
    lines = result.stdout.strip().splitlines()
    printed = {m.group(1): float(m.group(2)) for m in
               (re.match(r'^(\w+) (\S+)  \((.*)\)$', line) for line in lines) if m}
    assert list(printed) == ['fid', 'fd_dinov2', 'kid', 'precision', 'recall']
    for key, value in printed.items():
        assert value == pytest.approx(record[key], rel=1e-5, abs=1e-12)
    assert '64 images vs 64 reference; 100 subsets of 64' in result.stdout
    assert _last_line(result.stdout) == f'{record["fid"]:g}'


def test_reference_lacking_a_metric_fails_before_any_feature(generated_dir, narrow_ref, tmp_path):
    """The check comes first: the detectors named here do not even exist."""
    missing = tmp_path / 'missing'
    common = [f'--images={generated_dir}', f'--ref={narrow_ref}', '--num=64', f'--detector={missing}.pkl',
              f'--dinov2={missing}', '--device=cpu', '--workers=0']
    error = _assert_cli_error(_invoke(['calc', '--metrics=fid,kid', *common]), str(narrow_ref), 'features',
                              'fid.py ref --metrics=kid')
    assert 'fd_dinov2' not in error
    _assert_cli_error(_invoke(['calc', '--metrics=fd_dinov2,pr', *common]), 'fd_dinov2_mu, fd_dinov2_sigma',
                      'features', '--metrics=fd_dinov2,pr')


def test_metric_flag_errors(generated_dir, narrow_ref):
    result = _invoke(['calc', f'--images={generated_dir}', f'--ref={narrow_ref}', '--metrics=fid,is'])
    assert result.exit_code == 2 and "unknown metric 'is'" in result.stderr and 'fd_dinov2' in result.stderr
    result = _invoke(['calc', f'--images={generated_dir}', f'--ref={narrow_ref}', '--bootstrap=1'])
    assert result.exit_code == 2 and '--bootstrap' in result.stderr
    result = _invoke(['calc', f'--images={generated_dir}', '--save-stats=x.npz', '--bootstrap=10'])
    assert result.exit_code == 2 and '--bootstrap needs --ref' in result.stderr


def test_ref_features_subset_is_seeded(generated_dir, narrow_detector, tmp_path):
    full, part = tmp_path / 'full.npz', tmp_path / 'part.npz'
    common = [f'--data={generated_dir}', '--metrics=kid', f'--detector={narrow_detector}', '--workers=0',
              '--device=cpu']
    assert _invoke(['ref', f'--dest={full}', *common]).exit_code == 0
    assert _invoke(['ref', f'--dest={part}', '--ref-features=10', *common]).exit_code == 0
    chosen = np.sort(np.random.default_rng(runs.METRICS_SEED).permutation(64)[:10])
    np.testing.assert_array_equal(np.load(part)['features'], np.load(full)['features'][chosen])
    assert sorted(np.load(part).files) == ['features']


def test_bootstrap_and_repeat_report_intervals_min_mean_spread(generated_dir, narrow_detector, tmp_path):
    ref_path, jsonl = tmp_path / 'ref.npz', tmp_path / 'out.jsonl'
    common = [f'--detector={narrow_detector}', '--workers=0', '--device=cpu']
    assert _invoke(['ref', f'--data={generated_dir}', f'--dest={ref_path}', '--metrics=fid,kid,pr',
                    *common]).exit_code == 0
    result = _invoke(['calc', f'--images={generated_dir}', f'--ref={ref_path}', '--num=40', '--repeat=2',
                      '--bootstrap=8', '--metrics=kid,fid', f'--jsonl={jsonl}', *common])
    assert result.exit_code == 0, result.output
    runs, summary = [json.loads(line) for line in jsonl.read_text().splitlines()][:2], \
        json.loads(jsonl.read_text().splitlines()[2])
    for record in runs:
        for key in ('kid', 'fid'):
            low, high = record[f'{key}_ci']
            assert low <= high
        assert record['bootstrap'] == 8 and record['confidence'] == 0.95
    kids = [r['kid'] for r in runs]
    assert summary['kid_min'] == min(kids) and summary['kid_values'] == kids
    assert summary['kid_mean'] == pytest.approx(np.mean(kids)) and summary['kid_std'] == pytest.approx(
        np.std(kids, ddof=1))
    assert summary['fids'] == [r['fid'] for r in runs] and summary['repeats'] == 2
    assert 'kid_ci' not in summary
    assert f'kid {min(kids):g}  (40 images each; mean' in result.stdout
    assert _last_line(result.stdout) == f'{min(kids):g}'  # the first metric named
    assert re.search(r'KID \S+  \(seed 0; 40 images vs 64 reference; 100 subsets of 40; 95% CI \[', result.stdout)


def test_two_processes_keep_the_same_features(generated_dir, narrow_detector, tmp_path):
    """Kept features are gathered on rank 0 in image order: the saved arrays equal a single process's."""
    common = ['calc', f'--images={generated_dir}', '--num-images=50', '--seed=3', '--batch=8', '--workers=0',
              '--device=cpu', f'--detector={narrow_detector}', '--metrics=fid,pr']
    single, sharded = tmp_path / 'single.npz', tmp_path / 'sharded.npz'
    run_python([FID_SCRIPT, *common, f'--save-stats={single}'], env=dict(OMP_NUM_THREADS='1'))
    run_python(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', FID_SCRIPT, *common,
                f'--save-stats={sharded}'], env=dict(OMP_NUM_THREADS='1'))
    a, b = np.load(single), np.load(sharded)
    assert a['features'].shape == (50, 32)
    np.testing.assert_array_equal(a['features'], b['features'])
    np.testing.assert_allclose(a['mu'], b['mu'], rtol=0, atol=1e-10 * np.abs(a['mu']).max())


def test_gen_reports_every_metric(golden_dir, narrow_detector, tmp_path, monkeypatch):
    ref_path, jsonl = tmp_path / 'ref.npz', tmp_path / 'gen.jsonl'
    network = str(golden_dir / 'snapshots/network-snapshot-000000.pkl')
    common = [f'--detector={narrow_detector}', '--device=cpu']
    assert _invoke(['ref', f'--data={golden_dir / "fid" / "ref_dataset.zip"}', f'--dest={ref_path}',
                    '--metrics=fid,kid,pr', '--workers=0', *common]).exit_code == 0
    monkeypatch.chdir(tmp_path)
    result = _invoke(['gen', f'--network={network}', '--seeds=0-5', '--steps=2', f'--ref={ref_path}',
                      '--metrics=pr,kid,fid', '--bootstrap=4', f'--jsonl={jsonl}', *common])
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert {'precision', 'recall', 'kid', 'fid', 'precision_ci', 'fid_ci'} <= set(record)
    assert record['num_images'] == 6 and record['kid_subset_size'] == 6
    assert _last_line(result.stdout) == f'{record["precision"]:g}'


@pytest.mark.parametrize('case', ['nan-features', 'flat-features', 'dinov2-shape'])
def test_malformed_metric_arrays_in_ref(tmp_path, case):
    path = tmp_path / 'ref.npz'
    arrays = dict(mu=np.zeros(4), sigma=np.eye(4), features=np.ones((5, 4), np.float32), fd_dinov2_mu=np.zeros(3),
                  fd_dinov2_sigma=np.eye(3))
    if case == 'nan-features':
        arrays['features'][2, 1] = np.nan
        wanted, pattern = ['kid'], 'features holds 1 NaN/inf'
    elif case == 'flat-features':
        arrays['features'] = np.ones(8, np.float32)
        wanted, pattern = ['pr'], r'features has shape \[8\]; expected \[n, D\]'
    else:
        arrays['fd_dinov2_sigma'] = np.eye(2)
        wanted, pattern = ['fd_dinov2'], r'fd_dinov2_mu has shape \[3\] and fd_dinov2_sigma \[2, 2\]'
    np.savez(path, **arrays)
    with pytest.raises(features.FeatureError, match=pattern) as info:
        features.load_reference(str(path), wanted)
    assert str(path) in str(info.value)
    assert sorted(features.load_reference(str(path), ['fid'])) == ['mu', 'sigma']  # other metrics' arrays are not read
