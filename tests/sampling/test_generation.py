"""sampling/generation.py and the generation faults of the field (issues 29 and 34): non-finite samples and weights,
float32 noise ranges, runs that stop before their first image, iDDPM grids under the fast solvers, guidance that
would do nothing, folders continued after export.py, and a failing torchrun rank."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import generate
from evaluation import features
from formats import manifest as manifest_lib
from formats import network_io
from sampling import generation, pipeline
from tests._sampler_nets import make_tiny_net, save_snapshot
from tests.conftest import REPO_ROOT, run_python


@pytest.fixture(autouse=True)
def _single_intra_op_thread(one_intra_op_thread):
    """Tiny networks on one thread (see conftest.one_intra_op_thread)."""


def cli(*args, expect_ok: bool = True):
    result = CliRunner().invoke(generate.main, [str(a) for a in args], catch_exceptions=True)
    if expect_ok:
        assert result.exit_code == 0, f'exit {result.exit_code}: {result.output}\n{result.exception!r}'
    return result


def error_line(result) -> str:
    """The one 'Error:' line of a failed command without traceback."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert 'Traceback' not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(lines) == 1, result.output
    return lines[0]


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob('*.png'))}


def tiny_iddpm(seed: int = 0) -> torch.nn.Module:
    from tests.conftest import randomize_parameters_
    from training.networks import iDDPMPrecond
    torch.manual_seed(seed)
    net = iDDPMPrecond(img_resolution=8, img_channels=3, label_dim=0, model_type='DhariwalUNet', model_channels=16,
                       channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    return randomize_parameters_(net, seed + 1000).eval().requires_grad_(False)


@pytest.fixture(scope='module')
def nets(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp('nets')
    nan_net = make_tiny_net(seed=3)
    with torch.no_grad():
        nan_net.model.dec['8x8_aux_conv'].weight[0, 0, 0, 0] = float('nan')
    # Finite weights whose outputs overflow float32: the samples, not the weights, are non-finite.
    overflow = make_tiny_net(seed=4)
    with torch.no_grad():
        overflow.model.dec['8x8_aux_conv'].weight.mul_(1e38)
    unrecorded = make_tiny_net(label_dim=4, seed=6)
    del unrecorded.model.label_dropout  # as EDM's networks, which do not record it
    return dict(
        uncond=save_snapshot(make_tiny_net(), folder / 'uncond.pkl'),
        weak=save_snapshot(make_tiny_net(seed=2), folder / 'weak.pkl'),
        nan=save_snapshot(nan_net, folder / 'nan.pkl'),
        overflow=save_snapshot(overflow, folder / 'overflow.pkl'),
        cond=save_snapshot(make_tiny_net(label_dim=4, seed=5), folder / 'cond.pkl'),
        cond_dropout=save_snapshot(make_tiny_net(label_dim=4, seed=5, label_dropout=0.1), folder / 'cfg.pkl'),
        cond_unrecorded=save_snapshot(unrecorded, folder / 'unrecorded.pkl'),
        iddpm=save_snapshot(tiny_iddpm(), folder / 'iddpm.pkl'),
    )


# ----------------------------------------------------------------------------
# Non-finite samples and weights (issue 29 item 3).


def test_non_finite_weights_are_named_at_load_and_nothing_is_written(nets, tmp_path):
    line = error_line(cli('--network', nets['nan'], '--outdir', tmp_path / 'out', '--seeds=0-3', '--steps=2',
                          expect_ok=False))
    assert '--network' in line and str(nets['nan']) in line and 'non-finite weights' in line
    assert 'model.dec.8x8_aux_conv.weight (1)' in line
    assert not (tmp_path / 'out').exists()  # a refused run leaves no folder behind, not even an empty one
    guided = error_line(cli('--network', nets['uncond'], '--gnet', nets['nan'], '--guidance=2', '--outdir',
                            tmp_path / 'g', '--seeds=0', '--steps=2', expect_ok=False))
    assert '--gnet' in guided and 'non-finite weights' in guided
    assert not (tmp_path / 'g').exists()
    (tmp_path / 'kept').mkdir()  # a folder the user made stays, even when the run is refused
    error_line(cli('--network', nets['nan'], '--outdir', tmp_path / 'kept', '--seeds=0', '--steps=2',
                   expect_ok=False))
    assert (tmp_path / 'kept').is_dir()


def test_sigma_min_above_the_networks_sigma_max_is_refused(nets, tmp_path):
    line = error_line(cli('--network', nets['uncond'], '--outdir', tmp_path / 'out', '--seeds=0', '--steps=2',
                          '--sigma_min=100', expect_ok=False))
    assert '--sigma_min' in line and 'below' in line
    assert not (tmp_path / 'out').exists()


def test_non_finite_samples_name_the_seeds_and_write_no_image(nets, tmp_path):
    net = network_io.load_network(nets['overflow'])
    pipeline.check_finite_weights(net, 'overflow.pkl')  # the weights are finite; the samples are not
    out = tmp_path / 'out'
    line = error_line(cli('--network', nets['overflow'], '--outdir', out, '--seeds=0-5', '--steps=2', '--batch=6',
                          expect_ok=False))
    assert 'seeds 0, 1, 2, 3 and 2 more (6 of 6 in the batch) sampled NaN or infinity' in line
    assert '--precision=fp32' in line
    assert pngs(out) == {}
    manifest = json.loads((out / 'manifest.json').read_text())
    assert manifest['complete'] is False


def test_non_finite_samples_stop_feature_extraction_before_any_metric(nets):
    """fid.py gen extracts features of images made in memory (evaluation.features): refused before the cast."""
    net = network_io.load_network(nets['overflow'])
    detector = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    detector.feature_dim = 4
    with pytest.raises(pipeline.NonFiniteError, match=r'seeds 0, 1 \(2 of 2 in the batch\) sampled NaN'):
        features.calculate_features_for_network(net, [0, 1], dict(fid=detector), device='cpu', num_steps=2)


def test_check_finite_samples_names_only_the_bad_seeds():
    images = torch.zeros([5, 3, 2, 2], dtype=torch.float64)
    pipeline.check_finite_samples(None, [10, 11, 12, 13, 14], images)
    images[1, 0, 0, 0] = float('nan')
    images[3, 2, 1, 1] = float('-inf')
    with pytest.raises(pipeline.NonFiniteError, match=r'^seeds 11, 13 \(2 of 5 in the batch\)') as info:
        pipeline.check_finite_samples(None, [10, 11, 12, 13, 14], images)
    assert '\n' not in str(info.value)
    with pytest.raises(pipeline.NonFiniteError):
        pipeline.to_uint8(images)


@pytest.mark.parametrize('flag,value', [('--sigma_min', '1e-50'), ('--sigma_max', '1e39'), ('--sigma_max', 'inf')])
def test_noise_levels_must_be_normal_float32(nets, tmp_path, flag, value):
    line = error_line(cli('--network', nets['uncond'], '--outdir', tmp_path, '--seeds=0', f'{flag}={value}',
                          expect_ok=False))
    assert flag in line and ('normal float32' in line or 'not a finite number' in line)
    assert not any(tmp_path.iterdir())
    tiny = torch.finfo(torch.float32).tiny
    cli('--network', nets['uncond'], '--outdir', tmp_path / 'ok', '--seeds=0', '--steps=2', f'--sigma_min={tiny}')


# ----------------------------------------------------------------------------
# A run that fails before its first image; iDDPM grids (issue 29 item 5).


def test_fast_solver_on_iddpm_grid_names_steps_and_the_rerun_works(nets, tmp_path):
    out = tmp_path / 'out'
    line = error_line(cli('--network', nets['iddpm'], '--outdir', out, '--seeds=0-1', '--solver=dpmpp2m',
                          '--steps=64', expect_ok=False))
    match = re.search(r'--steps=64: .* use --steps <= (\d+)', line)
    assert match, line
    fits = int(match.group(1))
    assert not (out / 'manifest.json').exists()
    # The largest count it names works, and gives the images of the library with those settings.
    cli('--network', nets['iddpm'], '--outdir', out, '--seeds=0-1', '--solver=dpmpp2m', f'--steps={fits}')
    net = network_io.load_network(nets['iddpm'])
    levels = pipeline.evaluated_noise_levels(net, solver='dpmpp2m', num_steps=fits)
    assert len(levels) == fits and len(set(levels)) == fits
    with pytest.raises(ValueError, match=f'num_steps <= {fits}'):
        pipeline.evaluated_noise_levels(net, solver='dpmpp2m', num_steps=fits + 1)
    images = pipeline.sample_batch(net, [0, 1], solver='dpmpp2m', num_steps=fits)
    expected = pipeline.to_uint8(images).permute(0, 2, 3, 1).numpy()
    for seed in (0, 1):
        assert np.array_equal(np.asarray(generation.to_pil(expected[seed])), np.asarray(
            __import__('PIL.Image').Image.open(out / f'{seed:06d}.png')))
    # The EDM sampler tolerates repeated levels, as in EDM.
    cli('--network', nets['iddpm'], '--outdir', tmp_path / 'edm', '--seeds=0', '--steps=64')


def test_a_folder_without_images_is_reused_with_other_settings(nets, tmp_path):
    out = tmp_path / 'out'
    cli('--network', nets['uncond'], '--outdir', out, '--seeds=0-1', '--steps=2')
    for path in out.glob('*.png'):
        path.unlink()  # as a run that stopped before its first image leaves it
    cli('--network', nets['uncond'], '--outdir', out, '--seeds=0-2', '--steps=3')
    manifest = json.loads((out / 'manifest.json').read_text())
    assert manifest['complete'] and manifest['seeds'] == '0-2' and manifest['sampler_kwargs']['num_steps'] == 3
    fresh = tmp_path / 'fresh'
    cli('--network', nets['uncond'], '--outdir', fresh, '--seeds=0-2', '--steps=3')
    assert pngs(out) == pngs(fresh)


# ----------------------------------------------------------------------------
# Guidance that would do nothing (issue 29 item 6).


def test_cfg_needs_a_network_trained_with_label_dropout(nets, tmp_path):
    common = ['--seeds=0-1', '--steps=2', '--gnet=uncond', '--guidance=2']
    line = error_line(cli('--network', nets['cond'], '--outdir', tmp_path / 'a', *common, expect_ok=False))
    assert 'for --gnet' in line.replace("'", '') and 'without label dropout' in line and '--label-dropout' in line
    result = cli('--network', nets['cond_unrecorded'], '--outdir', tmp_path / 'b', *common)
    assert result.output.count('does not record whether it was trained with label dropout') == 1
    result = cli('--network', nets['cond_dropout'], '--outdir', tmp_path / 'c', *common)
    assert 'label dropout' not in result.output
    assert pngs(tmp_path / 'c') != pngs(tmp_path / 'b')


def test_guidance_interval_outside_the_sampled_levels_is_refused(nets, tmp_path):
    common = ['--network', nets['uncond'], '--gnet', nets['weak'], '--seeds=0', '--steps=4', '--guidance=2']
    net = network_io.load_network(nets['uncond'])
    levels = pipeline.evaluated_noise_levels(net, num_steps=4)
    line = error_line(cli(*common, '--outdir', tmp_path / 'a', '--guidance-interval=100,200', expect_ok=False))
    assert 'for --guidance-interval' in line.replace("'", '') and 'none of the 4 noise levels' in line
    # Between two levels of a 4-step schedule: inside the range, yet no evaluation is guided.
    gap = (levels[1] * 1.01, levels[2] * 0.99)
    line = error_line(cli(*common, '--outdir', tmp_path / 'b', f'--guidance-interval={gap[0]},{gap[1]}',
                          expect_ok=False))
    assert 'guidance would change nothing' in line
    assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()  # refused runs leave no folder
    cli(*common, '--outdir', tmp_path / 'c', f'--guidance-interval={levels[1]},{levels[2]}')


def test_infinite_guidance_weight_names_guidance(nets, tmp_path):
    line = error_line(cli('--network', nets['uncond'], '--gnet', nets['weak'], '--guidance=inf', '--outdir',
                          tmp_path, '--seeds=0', expect_ok=False))
    assert 'for --guidance:' in line.replace("'", '') and '--gnet' not in line and 'finite' in line


# ----------------------------------------------------------------------------
# Folders continued after export.py (issue 29 item 7).


def test_folder_of_a_pickle_continues_after_export_and_old_manifests_still_resume(nets, tmp_path):
    network = tmp_path / 'x.pkl'
    shutil.copy(nets['uncond'], network)
    out = tmp_path / 'out'
    cli('--network', network, '--outdir', out, '--seeds=0-1', '--steps=2')
    recorded = json.loads((out / 'manifest.json').read_text())
    # As earlier versions recorded it: the SHA-256 of the pickle's bytes.
    legacy = dict(recorded, settings=dict(recorded['settings'],
                                          network_sha256=network_io.network_file_sha256(network)))
    run_python(['export.py', '--input', str(network)])
    assert (tmp_path / 'x.weights.pt').is_file()
    result = cli('--network', network, '--outdir', out, '--seeds=0-3', '--steps=2')
    assert '2 already there' in result.output
    assert json.loads((out / 'manifest.json').read_text())['settings'] == recorded['settings']
    manifest_lib.write_manifest(out, {k: v for k, v in legacy.items() if k != 'format'})
    result = cli('--network', network, '--outdir', out, '--seeds=0-5', '--steps=2')
    assert '4 already there' in result.output
    fresh = tmp_path / 'fresh'
    cli('--network', nets['uncond'], '--outdir', fresh, '--seeds=0-5', '--steps=2')
    assert pngs(out) == pngs(fresh)
    # Another network is still refused, whichever way its folder was recorded.
    other = save_snapshot(make_tiny_net(seed=11), tmp_path / 'other.pkl')
    line = error_line(cli('--network', other, '--outdir', out, '--seeds=0', '--steps=2', expect_ok=False))
    assert 'network_sha256' in line and '--force' in line


# ----------------------------------------------------------------------------
# torchrun (issue 34 item 2).


def test_a_failing_rank_fails_the_job_and_nothing_is_marked_complete(nets, tmp_path):
    """Rank 1 cannot write seed 3 (a folder stands in its place); rank 0 finishes its own images. The job fails
    with rank 1's one line, printed once, and the manifest says incomplete; the rerun completes the folder."""
    out = tmp_path / 'out'
    (out / '000003.png').mkdir(parents=True)
    flags = ['--network', str(nets['uncond']), '--outdir', str(out), '--steps=2', '--device=cpu', '--seeds=0-3',
             '--batch=1']
    torchrun = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'generate.py']
    proc = run_python([*torchrun, *flags], env=dict(OMP_NUM_THREADS='1'), check=False)
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith('Error:')]
    assert len(errors) == 1 and 'rank 1: cannot write' in errors[0] and '000003.png' in errors[0], \
        proc.stdout[-2000:] + proc.stderr[-2000:]
    assert 'Done.' not in proc.stdout
    own_frames = re.findall(rf'File "{re.escape(str(REPO_ROOT))}/(?!\.venv/)[^"]*"', proc.stderr)
    assert not own_frames
    assert json.loads((out / 'manifest.json').read_text())['complete'] is False
    assert sorted(p.name for p in out.glob('*.png') if p.is_file()) == ['000000.png', '000001.png', '000002.png']
    (out / '000003.png').rmdir()
    cli(*flags)
    assert json.loads((out / 'manifest.json').read_text())['complete'] is True


def test_on_main_rank_keeps_the_flag_of_a_generation_error():
    def fails() -> None:
        raise generation.GenerationError('5 is out of range', flag='--class')
    with pytest.raises(generation.GenerationError) as info:
        generation.on_main_rank(fails)
    assert info.value.flag == '--class' and str(info.value) == '5 is out of range'
    assert generation.on_main_rank(lambda: 7) == 7


def test_network_content_hash_ignores_memory_layout():
    """A 1x1 convolution weight in channels-last layout keeps a stride of C_in on its size-1 last dimension: the
    hash must read its values, not refuse the layout, and equal the hash of the same values laid out plainly."""
    plain = torch.randn(32, 96, 1, 1, generator=torch.Generator().manual_seed(0))
    strided = torch.as_strided(plain.permute(0, 2, 3, 1).contiguous().view(-1), (32, 96, 1, 1), (96, 1, 96, 96))
    assert strided.stride()[-1] == 96 and torch.equal(strided, plain)
    assert manifest_lib.tensor_sha256({'w': strided}) == manifest_lib.tensor_sha256({'w': plain})
    assert manifest_lib.tensor_sha256({'w': plain}) != manifest_lib.tensor_sha256({'w': plain + 1})
