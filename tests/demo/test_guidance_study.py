"""The guidance / post-hoc EMA study's own logic: reuse of runs and points by settings, result parsing, tables."""

from __future__ import annotations

import json
import math
import pickle

import click
import numpy as np
import pytest
import torch
from PIL import Image

from demo import guidance_study as study
from training import phema
from tests._sampler_nets import make_tiny_net, save_snapshot

FLAGS = ['--cond=1', '--cbase=16', '--duration=0.001']


def fake_trainer(calls: list):
    """A stand-in for run_tool that records train.py commands and writes what train.py would leave behind."""
    def run(cmd, env=None, capture=False):
        calls.append(cmd)
        outdir = next(c.split('=', 1)[1] for c in cmd if c.startswith('--outdir='))
        name = next(c.split('=', 1)[1] for c in cmd if c.startswith('--name='))
        run_dir = f'{outdir}/{name}'
        for kimg in (0, 1):
            open(f'{run_dir}/network-snapshot-{kimg:06d}.pkl', 'wb').close()
            open(f'{run_dir}/training-state-{kimg:06d}.pt', 'wb').close()
            open(f'{run_dir}/network-snapshot-{kimg:07d}-0.050.pkl', 'wb').close()
        return ''
    return run


def test_train_reuses_a_finished_run_and_refuses_other_settings(tmp_path):
    calls = []
    runs = str(tmp_path / 'runs')
    snapshot = study.train(runs, 'main', 'data.zip', FLAGS, nproc=1, runner=fake_trainer(calls))
    assert snapshot.endswith('main/network-snapshot-000001.pkl')  # the last classic-EMA one, not a tracked one
    assert len(calls) == 1 and 'train.py' in calls[0] and '--resume=auto' not in calls[0]
    assert all(flag in calls[0] for flag in FLAGS)
    assert study.train(runs, 'main', 'data.zip', FLAGS, nproc=1, runner=fake_trainer(calls)) == snapshot
    assert len(calls) == 1  # reused
    with pytest.raises(click.ClickException, match='other settings'):
        study.train(runs, 'main', 'data.zip', [*FLAGS, '--seed=1'], nproc=1, runner=fake_trainer(calls))
    assert len(calls) == 1


def test_interrupted_run_resumes_and_foreign_folder_is_refused(tmp_path):
    run_dir = tmp_path / 'main'
    run_dir.mkdir()
    with pytest.raises(click.ClickException, match='not made by this study'):
        study.run_state(str(run_dir), FLAGS)
    (run_dir / study.RUN_MARKER).write_text(json.dumps(dict(flags=FLAGS, finished=False)))
    assert study.run_state(str(run_dir), FLAGS) == 'new'  # nothing to continue from
    (run_dir / 'training-state-000004.pt').touch()
    assert study.run_state(str(run_dir), FLAGS) == 'resume'
    calls = []
    study.train(str(tmp_path), 'main', 'data.zip', FLAGS, nproc=1, runner=fake_trainer(calls))
    assert calls[0][-1] == '--resume=auto'
    assert study.run_state(str(run_dir), FLAGS) == 'done'


def fake_fid(calls: list, fds: list[float]):
    """A stand-in for run_tool that writes fid.py gen's --jsonl lines (one per seed range, then the summary)."""
    def run(cmd, env=None, capture=False):
        calls.append(cmd)
        jsonl = next(c.split('=', 1)[1] for c in cmd if c.startswith('--jsonl='))
        with open(jsonl, 'a') as f:
            for index, fd in enumerate(fds):
                f.write(json.dumps(dict(fid=fd, repeat=index, seeds=f'{index}')) + '\n')
            f.write(json.dumps(dict(fid_min=min(fds), fids=fds, repeats=len(fds), seeds=['0', '1'])) + '\n')
        return ''
    return run


def test_point_is_reused_only_for_identical_settings_and_network_bytes(tmp_path):
    net, ref = tmp_path / 'net.pkl', tmp_path / 'ref.npz'
    net.write_bytes(b'one')
    ref.write_bytes(b'ref')
    calls = []
    args = dict(points_dir=str(tmp_path / 'points'), key='D128-cfg-W2', network=str(net), gnet='uncond',
                weight=2.0, num=10, repeat=2, sampler=['--steps=4'], ref=str(ref), nproc=1)
    first = study.measure_point(**args, runner=fake_fid(calls, [30.0, 34.0]))
    assert first['fd'] == [30.0, 34.0] and first['mean'] == 32.0 and math.isclose(first['std'], math.sqrt(8))
    assert '--gnet=uncond' in calls[0] and '--guidance=2' in calls[0] and '--repeat=2' in calls[0]
    assert study.measure_point(**args, runner=fake_fid(calls, [0.0, 0.0]))['fd'] == [30.0, 34.0]
    assert len(calls) == 1
    net.write_bytes(b'two')  # retrained network, same name
    assert study.measure_point(**args, runner=fake_fid(calls, [1.0, 3.0]))['mean'] == 2.0
    assert study.measure_point(**dict(args, num=12), runner=fake_fid(calls, [5.0, 5.0]))['mean'] == 5.0
    assert len(calls) == 3
    assert sorted(p.name for p in (tmp_path / 'points').iterdir()) == ['fd-D128-cfg-W2.json']


def test_unguided_point_runs_without_guidance_flags(tmp_path):
    net, ref = tmp_path / 'net.pkl', tmp_path / 'ref.npz'
    net.write_bytes(b'one')
    ref.write_bytes(b'ref')
    calls = []
    point = study.measure_point(str(tmp_path), 'x', str(net), None, 1.0, 10, 1, [], str(ref), 1,
                                runner=fake_fid(calls, [7.0]))
    assert point['std'] == 0.0 and not any(c.startswith(('--gnet', '--guidance')) for c in calls[0])
    assert point['settings']['gnet'] is None and point['settings']['guidance'] == 1.0


def test_fd_values_need_one_line_per_seed_range(tmp_path):
    path = tmp_path / 'fd.jsonl'
    path.write_text(json.dumps(dict(fid=3.0, repeat=0)) + '\n')
    assert study.fd_values_from_jsonl(str(path), 1) == [3.0]
    with pytest.raises(click.ClickException, match='expected 2 FD lines'):
        study.fd_values_from_jsonl(str(path), 2)


def test_real_fid_gen_lines_are_parsed(tmp_path):
    """The study reads what fid.py gen really writes (a tiny random network, the demo's digits detector)."""
    network = save_snapshot(make_tiny_net(), tmp_path / 'net.pkl')
    ref = tmp_path / 'ref.npz'
    features = 64  # the digits classifier's penultimate layer
    np.savez(ref, mu=np.zeros(features), sigma=np.eye(features))
    point = study.measure_point(str(tmp_path / 'points'), 'tiny', str(network), None, 1.0, 4, 2,
                                ['--solver=dpmpp2m', '--steps=3', '--batch=4'], str(ref), nproc=1)
    assert len(point['fd']) == 2 and all(math.isfinite(v) and v > 0 for v in point['fd'])
    assert point['fd'][0] != point['fd'][1]  # disjoint seed ranges, different images


def synthetic_results() -> dict:
    def row(xs, offset, scale=1.0):
        means = {x: offset + scale * x for x in xs}
        return {f'{x:g}': dict(mean=means[x], std=0.5, fd=[means[x] - 0.5, means[x] + 0.5]) for x in xs}
    weights, stds = [1.0, 1.5, 2.0], [0.05, 0.1]
    return dict(weights=weights, phema_grid=stds, num=250, repeat=2, kernels=['128', 'inf'], tracked=[0.05, 0.1],
                phema_profile_error={k: {'0.05': 0.0, '0.1': 0.0} for k in ('128', 'inf')},
                guidance={k: dict(cfg=row(weights, 10), autoguidance=row(weights, 20)) for k in ('128', 'inf')},
                phema={k: row(stds, 30, scale=100) for k in ('128', 'inf')},
                classic_ema={'128': dict(mean=10.0, std=0.5, fd=[9.5, 10.5]), 'inf': dict(mean=41.0, std=1.25,
                                                                                   fd=[40.0, 42.0])})


def test_tables_and_charts(tmp_path):
    table = study.markdown_tables(synthetic_results())
    # W = 1 plain; the others with the difference to the classic-EMA network paired by seed range
    assert ('| CFG | 128 | 11.0 ± 0.5 | 11.5 (Δ +1.5, 95% CI +1.5 to +1.5, worse) | '
            '12.0 (Δ +2.0, 95% CI +2.0 to +2.0, worse) |') in table
    assert ('| autoguidance | ∞ | 21.0 ± 0.5 | 21.5 (Δ −19.5, 95% CI −25.9 to −13.1, better) | '
            '22.0 (Δ −19.0, 95% CI −25.4 to −12.6, better) |') in table
    assert ('| ∞ | 35.0 (Δ −6.0, 95% CI −12.4 to +0.4, undecided) | 40.0 (Δ −1.0, 95% CI −7.4 to +5.4, undecided) | '
            '41.0 ± 1.2 |') in table
    assert 'over 2 disjoint sets of 250 images' in table
    assert '| profile error | 0.00 | 0.00 | |' in table
    missing = synthetic_results()
    del missing['guidance']['inf']['cfg']['2']
    assert ('| CFG | ∞ | 11.0 ± 0.5 | 11.5 (Δ −29.5, 95% CI −35.9 to −23.1, better) | – |'
            in study.markdown_tables(missing))
    for path in study.charts(synthetic_results(), str(tmp_path)):
        with Image.open(path) as image:
            assert image.format == 'PNG' and image.width > 200


def test_plan_measures_unguided_first_then_alternates_and_collect_fills_tables():
    nets = {label: dict(main=f'{label}/main.pkl', guide=f'{label}/guide.pkl',
                        phema={0.05: f'{label}/p05.pkl', 0.1: f'{label}/p10.pkl', 0.2: f'{label}/p20.pkl'})
            for label in ('128', 'inf')}
    plan = study.measurement_plan(nets, [1.0, 3.0, 2.0], [0.1, 0.05, 0.2])
    keys = [key for key, *_ in plan]
    assert keys == ['D128-unguided', 'Dinf-unguided',
                    'D128-cfg-W3', 'D128-autoguidance-W3', 'Dinf-cfg-W3', 'Dinf-autoguidance-W3',
                    'D128-phema-0.100', 'Dinf-phema-0.100',
                    'D128-cfg-W2', 'D128-autoguidance-W2', 'Dinf-cfg-W2', 'Dinf-autoguidance-W2',
                    'D128-phema-0.050', 'Dinf-phema-0.050', 'D128-phema-0.200', 'Dinf-phema-0.200']
    by_key = {key: (label, network, gnet, weight) for key, label, network, gnet, weight in plan}
    assert by_key['Dinf-autoguidance-W2'] == ('inf', 'inf/main.pkl', 'inf/guide.pkl', 2.0)
    assert by_key['D128-cfg-W3'] == ('128', '128/main.pkl', 'uncond', 3.0)
    assert by_key['D128-phema-0.200'] == ('128', '128/p20.pkl', None, 1.0)

    results = dict(kernels=['128', 'inf'], guidance={}, phema={}, classic_ema={}, train_wall_s={'a': 10.0})
    points = {key: dict(mean=float(i), std=0.0, fd=[float(i)], wall_s=1.0) for i, key in enumerate(keys[:7])}
    study.collect(results, points, [1.0, 2.0, 3.0], [0.05, 0.1, 0.2])
    assert results['guidance']['128']['cfg'] == {'1': points['D128-unguided'], '3': points['D128-cfg-W3']}
    assert results['guidance']['inf']['autoguidance']['1'] == points['Dinf-unguided']
    assert results['phema'] == {'128': {'0.1': points['D128-phema-0.100']}, 'inf': {}}
    assert results['classic_ema']['inf'] == points['Dinf-unguided']
    assert results['steps_wall_s'] == 17.0  # training plus every point once (W = 1 is one measurement)


def test_reconstruction_errors_of_a_run(tmp_path):
    """Tracked sigma_rel are reproduced exactly; one outside the tracked range is not (EDM2's least squares)."""
    for kimg in (4, 8):
        for std in (0.05, 0.1):
            record = phema.snapshot_record(kimg * 1000, std)
            with open(tmp_path / phema.snapshot_name(phema.TRACKED_PREFIX, kimg * 1000, std), 'wb') as f:
                pickle.dump(dict(ema=torch.nn.Linear(1, 1), phema=record), f)
    errors = study.reconstruction_errors(str(tmp_path), [0.05, 0.25])
    assert set(errors) == {'0.05', '0.25'} and errors['0.05'] < 1e-4 and errors['0.25'] > 0.1


def test_parse_floats_names_the_flag():
    assert study.parse_floats('1, 1.5,2', '--weights') == [1.0, 1.5, 2.0]
    for bad in ('1,x', '', 'nan'):
        with pytest.raises(click.BadParameter) as excinfo:
            study.parse_floats(bad, '--weights')
        assert '--weights' in excinfo.value.format_message()
