"""generate.py and formats/network_io.py: goldens through the CLI, invariances, resumption, sweeps, errors."""

from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
from torch_utils import cpu_support
from sampling import quantize, pipeline
from formats import manifest as manifest_lib
from formats.network_io import NetworkLoadError, load_network

from tests._sampler_nets import make_tiny_net, save_snapshot, save_training_state
from tests.conftest import REPO_ROOT, run_python
from tests._cli_inputs import copy_file, assert_one_error, invoke, tree, truncated, unchanged, under_a_file

GOLDEN_SNAPSHOT = 'snapshots/network-snapshot-000000.pkl'  # same weights as networks/edm_ddpmpp_aug.pt


@pytest.fixture(autouse=True)
def _single_intra_op_thread(one_intra_op_thread):
    """Every test here runs tiny networks on one thread (see conftest.one_intra_op_thread)."""


def cli(*args: str, expect_ok: bool = True):
    """Run generate.py's command in this process (much faster than a subprocess)."""
    result = CliRunner().invoke(generate.main, [str(a) for a in args], catch_exceptions=True)
    if expect_ok:
        assert result.exit_code == 0, f'exit {result.exit_code}: {result.output}\n{result.exception!r}'
    return result


def assert_clean_error(result, *fragments: str) -> None:
    """Non-zero exit, one 'Error:' line naming what was wrong, and no traceback."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert 'Traceback' not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(error_lines) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, f'{fragment!r} not in: {result.output}'


def read_png(path: Path) -> np.ndarray:
    image = np.asarray(PIL.Image.open(path))
    return image[:, :, None] if image.ndim == 2 else image


def png_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob('*.png'))}


@pytest.fixture(scope='module')
def nets(tmp_path_factory) -> dict[str, Path]:
    """Tiny network files: unconditional, conditional (4 classes), PFGM++ (D=64), and a training state."""
    folder = tmp_path_factory.mktemp('nets')
    uncond = make_tiny_net()
    return dict(
        uncond=save_snapshot(uncond, folder / 'uncond.pkl'),
        cond=save_snapshot(make_tiny_net(label_dim=4, seed=5), folder / 'cond.pkl'),
        pfgmpp=save_snapshot(make_tiny_net(pfgmpp=True, D=64, seed=7), folder / 'pfgmpp.pkl'),
        state=save_training_state(uncond, folder / 'training-state-000000.pt'),
    )


# ----------------------------------------------------------------------------
# Goldens through the command line.


@pytest.mark.parametrize('case,flags', [
    ('edm_heun5_det', []),
    ('edm_stochastic', ['--S_churn=40', '--S_min=0.05', '--S_max=50', '--S_noise=1.003']),
    ('pfgmpp_D128', ['--pfgmpp=True', '--aug_dim=128', '--S_max=0', '--S_noise=0']),
])
def test_cli_reproduces_golden_pngs(case, flags, golden_dir, tmp_path):
    gold = torch.load(golden_dir / 'sampler' / f'{case}.pt', weights_only=True)
    seeds = ','.join(map(str, gold['seeds']))
    cli('--network', golden_dir / GOLDEN_SNAPSHOT, '--outdir', tmp_path, '--seeds', seeds, '--batch=4',
        f'--steps={gold["sampler_kwargs"]["num_steps"]}', *flags)
    for seed, expected in zip(gold['seeds'], gold['images_uint8_nhwc']):
        got = torch.from_numpy(read_png(tmp_path / f'{seed:06d}.png').copy())
        diff = (got.to(torch.int16) - expected.to(torch.int16)).abs()
        assert diff.max() <= 1 and (diff > 0).sum() <= 8, f'seed {seed}: {int((diff > 0).sum())} pixels differ'


# ----------------------------------------------------------------------------
# Invariances.


def test_world_size_and_batch_invariance(nets, tmp_path):
    """2 processes (gloo) with --batch=2 write the same PNG bytes as 1 process with --batch=3."""
    flags = ['--network', str(nets['uncond']), '--seeds=0-6', '--steps=3', '--S_churn=10', '--S_min=0.01',
             '--S_max=50', '--device=cpu', '--alpha=0.1']
    single = tmp_path / 'single'
    # Same intra-op thread count in both runs: float32 reductions split over threads round differently.
    run_python(['generate.py', '--outdir', str(single), '--batch=3', *flags], env=dict(OMP_NUM_THREADS='1'))
    double = tmp_path / 'double'
    proc = run_python(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'generate.py',
                       '--outdir', str(double), '--batch=2', *flags], env=dict(OMP_NUM_THREADS='1'))
    assert proc.stdout.count('Done.') == 1  # only rank 0 prints
    a, b = png_bytes(single), png_bytes(double)
    assert sorted(a) == [f'{s:06d}.png' for s in range(7)]
    assert a == b


def test_subdirs_and_library_agree(nets, tmp_path):
    cli('--network', nets['uncond'], '--outdir', tmp_path, '--seeds=998-1001', '--steps=2', '--subdirs', '--batch=4')
    assert sorted(png_bytes(tmp_path)) == ['000000/000998.png', '000000/000999.png', '001000/001000.png',
                                           '001000/001001.png']
    net = load_network(nets['uncond'])
    for batch_seeds, images in pipeline.generate_images(net, [998, 1001], batch_size=1, num_steps=2):
        folder = '000000' if batch_seeds[0] < 1000 else '001000'
        png = read_png(tmp_path / folder / f'{batch_seeds[0]:06d}.png')
        assert np.array_equal(png, images[0].permute(1, 2, 0).numpy())


def test_class_conditional(nets, tmp_path):
    cli('--network', nets['cond'], '--outdir', tmp_path / 'fixed', '--seeds=0-3', '--steps=2', '--class=3')
    cli('--network', nets['cond'], '--outdir', tmp_path / 'free', '--seeds=0-3', '--steps=2')
    net = load_network(nets['cond'])
    (batch_seeds, images), = list(pipeline.generate_images(net, [0, 1, 2, 3], batch_size=4, num_steps=2,
                                                           class_idx=3))
    for seed, image in zip(batch_seeds, images):
        assert np.array_equal(read_png(tmp_path / 'fixed' / f'{seed:06d}.png'), image.permute(1, 2, 0).numpy())
    assert png_bytes(tmp_path / 'fixed') != png_bytes(tmp_path / 'free')


def test_single_channel_images_are_grayscale_pngs(tmp_path):
    net_file = save_snapshot(make_tiny_net(img_channels=1, seed=3), tmp_path / 'gray.pkl')
    cli('--network', net_file, '--outdir', tmp_path / 'out', '--seeds=0-1', '--steps=2', '--grid', tmp_path / 'g.png')
    assert PIL.Image.open(tmp_path / 'out' / '000000.png').mode == 'L'
    assert PIL.Image.open(tmp_path / 'g.png').mode == 'L'


# ----------------------------------------------------------------------------
# Resumption, grid, network formats.


def test_skips_existing_images_unless_forced(nets, tmp_path):
    args = ['--network', nets['uncond'], '--outdir', tmp_path, '--seeds=0-3', '--steps=2']
    cli(*args)
    original = png_bytes(tmp_path)
    (tmp_path / '000001.png').unlink()
    (tmp_path / '000002.png').write_bytes(b'sentinel')
    result = cli(*args)
    assert 'Generating 1 images' in result.output and '3 already there' in result.output
    assert (tmp_path / '000001.png').read_bytes() == original['000001.png']
    assert (tmp_path / '000002.png').read_bytes() == b'sentinel'
    cli(*args, '--force')
    assert png_bytes(tmp_path) == original
    assert not [p for p in tmp_path.iterdir() if p.name.endswith('.tmp')]


def test_grid(nets, tmp_path):
    grid = tmp_path / 'grid.png'
    cli('--network', nets['uncond'], '--outdir', tmp_path / 'out', '--seeds=0-4', '--steps=2', '--grid', grid)
    image = read_png(grid)
    assert image.shape == (2 * 8, 3 * 8, 3)  # 5 images in a 3-wide grid
    assert np.array_equal(image[8:16, 0:8], read_png(tmp_path / 'out' / '000003.png'))
    assert not image[8:16, 16:24].any()  # the unused cell stays black


def test_network_formats_give_identical_images(nets, tmp_path):
    cli('--network', nets['uncond'], '--outdir', tmp_path / 'pkl', '--seeds=0-1', '--steps=2')
    cli('--network', nets['state'], '--outdir', tmp_path / 'pt', '--seeds=0-1', '--steps=2')
    cli('--network', nets['uncond'].as_uri(), '--outdir', tmp_path / 'uri', '--seeds=0-1', '--steps=2')
    assert png_bytes(tmp_path / 'pkl') == png_bytes(tmp_path / 'pt') == png_bytes(tmp_path / 'uri')


def test_network_url_is_downloaded_once_and_cached(nets, tmp_path, monkeypatch):
    served = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            served.append(self.path)

    handler = functools.partial(Handler, directory=str(nets['uncond'].parent))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
        url = f'http://127.0.0.1:{server.server_address[1]}/{nets["uncond"].name}'
        cli('--network', url, '--outdir', tmp_path / 'a', '--seeds=0', '--steps=2')
        cli('--network', url, '--outdir', tmp_path / 'b', '--seeds=0', '--steps=2')
        assert len([p for p in served if p.endswith('.pkl')]) == 1
        assert png_bytes(tmp_path / 'a') == png_bytes(tmp_path / 'b')
    finally:
        server.shutdown()
        server.server_close()


def test_load_network_errors(tmp_path):
    empty = tmp_path / 'empty.pkl'
    empty.write_bytes(b'')
    text = tmp_path / 'notes.pkl'
    text.write_text('hello')
    no_ema = tmp_path / 'dict.pt'
    torch.save({'net_weights': torch.zeros(2)}, no_ema)
    npz = tmp_path / 'stats.npz'
    np.savez(npz, mu=np.zeros(3))
    folder = tmp_path / 'runs'
    folder.mkdir()
    for path, message in [(tmp_path / 'missing.pkl', 'no such file'), (folder, 'is a directory'), (empty, 'empty'),
                          (text, 'not a pickle'),
                          (no_ema, 'without an "ema" network'), (npz, 'torch.load cannot read')]:
        with pytest.raises(NetworkLoadError, match=message) as info:
            load_network(path)
        assert str(path) in str(info.value)


# ----------------------------------------------------------------------------
# Sweeps and robustness options.


def test_sweeps_write_folders_and_manifests(nets, tmp_path):
    base = ['--network', nets['uncond'], '--seeds=0-2', '--batch=2']
    cli(*base, '--outdir', tmp_path / 'plain', '--steps=3')
    cli(*base, '--outdir', tmp_path / 'sweep', '--sweep-steps=2,3')
    for steps in (2, 3):
        folder = tmp_path / 'sweep' / f'steps{steps:03d}'
        manifest = json.loads((folder / 'manifest.json').read_text())
        assert manifest['complete'] and manifest['sweep'] == {'steps': steps}
        assert manifest['nfe_per_image'] == 2 * steps - 1 and manifest['seeds'] == '0-2'
        assert manifest['sampler_kwargs']['num_steps'] == steps
    assert png_bytes(tmp_path / 'sweep' / 'steps003') == png_bytes(tmp_path / 'plain')
    assert png_bytes(tmp_path / 'sweep' / 'steps002') != png_bytes(tmp_path / 'plain')

    cli(*base, '--outdir', tmp_path / 'alpha', '--steps=3', '--sweep-alpha=0,0.5')
    assert png_bytes(tmp_path / 'alpha' / 'alpha0') == png_bytes(tmp_path / 'plain')
    assert png_bytes(tmp_path / 'alpha' / 'alpha0.5') != png_bytes(tmp_path / 'plain')
    assert json.loads((tmp_path / 'alpha' / 'alpha0.5' / 'manifest.json').read_text())['noise_injection_alpha'] == 0.5

    cli(*base, '--outdir', tmp_path / 'bits', '--steps=3', '--sweep-bits=4,12')
    manifest = json.loads((tmp_path / 'bits' / 'bits04' / 'manifest.json').read_text())
    assert manifest['quantize_bits'] == 4 and manifest['quantized_weights'] > 0
    # The CLI's quantized images equal the library's.
    net = quantize.quantize_network(load_network(nets['uncond']), 4)
    (seeds, images), = list(pipeline.generate_images(net, [0, 1, 2], batch_size=3, num_steps=3))
    for seed, image in zip(seeds, images):
        assert np.array_equal(read_png(tmp_path / 'bits' / 'bits04' / f'{seed:06d}.png'),
                              image.permute(1, 2, 0).numpy())

    # Resuming a sweep folder with other settings is refused.
    result = cli(*base, '--outdir', tmp_path / 'sweep', '--sweep-steps=2', '--S_churn=5', expect_ok=False)
    assert_clean_error(result, 'S_churn', '--force')


@pytest.mark.parametrize('bits', [3, 6])
def test_quantize_bits_flag_samples_the_quantized_network(nets, tmp_path, bits):
    """--quantize-bits=K writes the images of the network whose selected weights sampling/quantize put on a K-bit
    grid: every selected weight within half a step of its original, on at most 2**K - 1 levels, every other tensor
    untouched; and the PNGs are those of sampling that network."""
    seeds = [0, 1, 2]
    cli('--network', nets['uncond'], '--seeds=0-2', '--steps=2', '--outdir', tmp_path / 'q', f'--quantize-bits={bits}')
    cli('--network', nets['uncond'], '--seeds=0-2', '--steps=2', '--outdir', tmp_path / 'f')
    net = load_network(nets['uncond'])
    quantized = quantize.quantize_network(net, bits)
    selected = set(quantize.quantized_weight_names(net))
    assert selected and not any(name.startswith('model.enc.8x8_') for name in selected)  # full resolution kept
    original, changed = net.state_dict(), quantized.state_dict()
    for name, weight in original.items():
        if name not in selected:
            assert torch.equal(changed[name], weight), name
            continue
        levels = 2 ** (bits - 1) - 1
        step = float(weight.abs().max()) / levels
        error = (changed[name].double() - weight.double()).abs().max().item()
        # Half a step, plus the float32 rounding of the dequantized value (its magnitude is at most max|w|).
        assert error <= step / 2 + levels * step * torch.finfo(torch.float32).eps, name
        codes = changed[name].double() / step
        assert (codes - codes.round()).abs().max() < 1e-4 and codes.abs().max() <= levels + 1e-4, name
        assert changed[name].unique().numel() <= 2 * levels + 1
    images = pipeline.to_uint8(pipeline.sample_batch(quantized, seeds, num_steps=2)).permute(0, 2, 3, 1).numpy()
    for seed, expected in zip(seeds, images):
        assert np.array_equal(read_png(tmp_path / 'q' / f'{seed:06d}.png'), expected), seed
    assert png_bytes(tmp_path / 'q') != png_bytes(tmp_path / 'f')
    manifest = json.loads((tmp_path / 'q' / 'manifest.json').read_text())
    assert manifest['quantize_bits'] == bits and manifest['quantized_weights'] == len(selected)


def test_pfgmpp_settings_come_from_the_network(nets, tmp_path):
    cli('--network', nets['pfgmpp'], '--outdir', tmp_path / 'a', '--seeds=0-1', '--steps=2')
    cli('--network', nets['pfgmpp'], '--outdir', tmp_path / 'b', '--seeds=0-1', '--steps=2', '--pfgmpp=True',
        '--aug_dim=64')
    assert png_bytes(tmp_path / 'a') == png_bytes(tmp_path / 'b')
    net = load_network(nets['pfgmpp'])
    (seeds, images), = list(pipeline.generate_images(net, [0, 1], batch_size=2, num_steps=2, D=64))
    assert np.array_equal(read_png(tmp_path / 'a' / '000001.png'), images[1].permute(1, 2, 0).numpy())


# ----------------------------------------------------------------------------
# Errors: one clear line naming the flag.


@pytest.mark.parametrize('flags,fragments', [
    (['--seeds=-1'], ['--seeds', 'out of range']),
    (['--seeds=4294967296'], ['--seeds', 'out of range']),
    (['--seeds=a-b'], ['--seeds', 'cannot parse']),
    (['--steps=0'], ['--steps']),
    (['--batch=0'], ['--batch']),
    (['--sweep-steps=0,2'], ['--sweep-steps', '>= 1']),
    (['--steps=4', '--sweep-steps=2,3'], ['--steps', '--sweep-steps']),
    (['--alpha=0.1', '--sweep-alpha=0,0.2'], ['--alpha', '--sweep-alpha']),
    (['--sweep-alpha=0,x'], ['--sweep-alpha']),
    (['--quantize-bits=1'], ['--quantize-bits', 'bits']),
    (['--sweep-bits=4,40'], ['--sweep-bits', 'bits']),
    (['--sigma_min=5', '--sigma_max=1'], ['--sigma_min', '--sigma_max']),
    (['--device=tpu'], ['--device']),
    (['--alpha=nan'], ['--alpha', 'not a number']),
    (['--S_churn=nan'], ['--S_churn', 'not a number']),
    (['--class=0'], ['--class', 'unconditional']),
    (['--aug_dim=64'], ['--aug_dim', 'diffusion']),
    (['--pfgmpp=True'], ['--pfgmpp', 'contradicts']),
])
def test_bad_flags_give_clear_errors(nets, tmp_path, flags, fragments):
    result = cli('--network', nets['uncond'], '--outdir', tmp_path, '--steps=2' if not any(
        f.startswith(('--steps', '--sweep-steps')) for f in flags) else '--batch=1', *flags, expect_ok=False)
    assert_clean_error(result, *fragments)
    assert not list(tmp_path.glob('*.png'))


@pytest.mark.parametrize('which,flags,fragments', [
    ('cond', ['--class=4'], ['--class', '0..3']),
    ('pfgmpp', ['--pfgmpp=False'], ['--pfgmpp', 'contradicts']),
    ('pfgmpp', ['--aug_dim=128'], ['--aug_dim', 'D=64']),
    ('pfgmpp', ['--solver=euler'], ['ablation sampler', 'PFGM++']),
])
def test_contradictions_give_clear_errors(nets, tmp_path, which, flags, fragments):
    result = cli('--network', nets[which], '--outdir', tmp_path, '--steps=2', *flags, expect_ok=False)
    assert_clean_error(result, *fragments)


def test_missing_or_broken_network_gives_clear_error(tmp_path, golden_dir):
    result = cli('--outdir', tmp_path, expect_ok=False)
    assert_clean_error(result, '--network')
    result = cli('--network', tmp_path / 'nope.pkl', '--outdir', tmp_path, expect_ok=False)
    assert_clean_error(result, '--network', 'nope.pkl', 'no such file')
    (tmp_path / 'zero.pkl').write_bytes(b'')
    result = cli('--network', tmp_path / 'zero.pkl', '--outdir', tmp_path, expect_ok=False)
    assert_clean_error(result, '--network', 'zero.pkl', 'empty')
    result = cli('--network', golden_dir / 'fid' / 'ref_stats.npz', '--outdir', tmp_path, expect_ok=False)
    assert_clean_error(result, '--network', 'ref_stats.npz')
    # An original EDM snapshot records no PFGM++ settings: --pfgmpp=True then needs --aug_dim.
    result = cli('--network', golden_dir / GOLDEN_SNAPSHOT, '--outdir', tmp_path, '--pfgmpp=True', expect_ok=False)
    assert_clean_error(result, '--aug_dim')


def test_cli_error_in_a_subprocess_has_no_traceback(tmp_path):
    proc = run_python(['generate.py', '--network', str(tmp_path / 'missing.pkl'), '--outdir', str(tmp_path)],
                      check=False)
    assert proc.returncode != 0
    assert 'Traceback' not in proc.stderr and '--network' in proc.stderr and 'no such file' in proc.stderr


def test_speed_options_keep_images_close(nets, tmp_path):
    """--channels-last stays within float32 rounding of the default; --precision=bf16 runs and stays near it."""
    base = ['--network', nets['pfgmpp'], '--seeds=0-3', '--steps=4', '--device=cpu']
    cli(*base, '--outdir', tmp_path / 'default')
    cli(*base, '--outdir', tmp_path / 'nhwc', '--channels-last')
    cli(*base, '--outdir', tmp_path / 'bf16', '--precision=bf16')
    default, nhwc, bf16 = (np.stack([read_png(p) for p in sorted((tmp_path / d).glob('*.png'))]).astype(int)
                           for d in ('default', 'nhwc', 'bf16'))
    assert np.abs(nhwc - default).max() <= 1
    if cpu_support.bf16_supported():
        assert 0 < np.abs(bf16 - default).mean() < 8  # reduced precision really ran, and stayed close
    else:  # fell back to fp32 (see the next test)
        assert np.array_equal(bf16, default)

    net = load_network(nets['uncond'])
    assert pipeline.network_memory_format(net) == torch.contiguous_format
    net.to(memory_format=torch.channels_last)
    assert pipeline.network_memory_format(net) == torch.channels_last


def test_bf16_without_cpu_bf16_kernels_runs_fp32_with_one_line(nets, tmp_path, monkeypatch):
    """--precision=bf16 --channels-last on a CPU without oneDNN bfloat16 kernels (forced here): fp32, one line."""
    monkeypatch.setattr(cpu_support, 'bf16_supported', lambda: False)
    base = ['--network', nets['pfgmpp'], '--seeds=0-3', '--steps=4', '--device=cpu', '--channels-last']
    fallback = cli(*base, '--outdir', tmp_path / 'bf16', '--precision=bf16')
    notes = [line for line in fallback.output.splitlines() if 'no oneDNN bfloat16 kernels' in line]
    assert len(notes) == 1 and 'running fp32 instead' in notes[0], fallback.output
    fp32 = cli(*base, '--outdir', tmp_path / 'fp32', '--precision=fp32')
    assert 'bfloat16' not in fp32.output
    assert png_bytes(tmp_path / 'bf16') == png_bytes(tmp_path / 'fp32')  # the fp32 route, bit for bit


@pytest.mark.slow
def test_compile_flag_matches_eager(nets, tmp_path):
    """--compile runs the sampler through torch.compile; images stay within float32 rounding of eager ones."""
    if shutil.which('c++') is None and shutil.which('g++') is None:
        pytest.skip('torch.compile on CPU needs a C++ compiler')
    base = ['--network', nets['uncond'], '--seeds=0-2', '--steps=3', '--device=cpu', '--batch=3']
    cli(*base, '--outdir', tmp_path / 'eager')
    cli(*base, '--outdir', tmp_path / 'compiled', '--compile')
    eager, compiled = (np.stack([read_png(p) for p in sorted((tmp_path / d).glob('*.png'))]).astype(int)
                       for d in ('eager', 'compiled'))
    assert np.abs(compiled - eager).max() <= 1


# ----------------------------------------------------------------------------
# Reused output folders: resume only what the same network and settings made.


def folder_state(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def made_folder(nets, tmp_path_factory) -> Path:
    """Seeds 0-1 of the unconditional net, 2 steps, as a reference folder to copy."""
    folder = tmp_path_factory.mktemp('made') / 'out'
    cli('--network', nets['uncond'], '--outdir', folder, '--seeds=0-1', '--steps=2')
    return folder


# Each changes the pixels; each must be named when a folder made without it is reused.
PIXEL_OPTIONS = [
    (['--steps=3'], 'num_steps'),
    (['--sigma_max=40'], 'sigma_max'),
    (['--sigma_min=0.01'], 'sigma_min'),
    (['--rho=5'], 'rho'),
    (['--S_churn=3'], 'S_churn'),
    (['--S_noise=1.01'], 'S_noise'),
    (['--solver=euler'], 'solver'),
    (['--alpha=0.1'], 'noise_injection'),
    (['--quantize-bits=6'], 'quantize_bits'),
    # Without oneDNN bf16 kernels --precision=bf16 runs fp32 (one printed line): the pixels, and so the recorded
    # settings, stay those of the folder, and resuming it is right.
    pytest.param(['--precision=bf16'], 'use_bf16', marks=pytest.mark.skipif(
        not cpu_support.bf16_supported(), reason='bf16 falls back to fp32 on this CPU: same pixels, same settings')),
    (['--channels-last'], 'channels_last'),
    (['--subdirs'], 'subdirs'),
]


@pytest.mark.parametrize('flags,named', PIXEL_OPTIONS,
                         ids=[(f.values if hasattr(f, 'values') else f)[0][0] for f in PIXEL_OPTIONS])
def test_reused_outdir_with_other_settings_is_refused(nets, made_folder, tmp_path, flags, named):
    folder = tmp_path / 'out'
    shutil.copytree(made_folder, folder)
    before = folder_state(folder)
    result = cli('--network', nets['uncond'], '--outdir', folder, '--seeds=0-3', '--steps=2', *flags,
                 expect_ok=False)
    assert_clean_error(result, str(folder), named, '--force')
    assert folder_state(folder) == before  # nothing added, nothing overwritten


def test_reused_outdir_with_another_network_is_refused_and_force_starts_over(nets, made_folder, tmp_path):
    folder = tmp_path / 'out'
    shutil.copytree(made_folder, folder)
    before = folder_state(folder)
    other = save_snapshot(make_tiny_net(seed=11), tmp_path / 'other.pkl')
    result = cli('--network', other, '--outdir', folder, '--seeds=0-1', '--steps=2', expect_ok=False)
    assert_clean_error(result, 'network_sha256', '--force')
    assert folder_state(folder) == before

    # --force deletes what the other network made, including seeds this command does not list.
    shutil.copy(folder / '000001.png', folder / '000007.png')
    result = cli('--network', other, '--outdir', folder, '--seeds=0', '--steps=2', '--force')
    assert 'deleted 3 PNG(s)' in result.output
    fresh = tmp_path / 'fresh'
    cli('--network', other, '--outdir', fresh, '--seeds=0', '--steps=2')
    assert png_bytes(folder) == png_bytes(fresh) == {'000000.png': png_bytes(fresh)['000000.png']}


def test_resume_needs_the_same_content_not_the_same_path(nets, made_folder, tmp_path):
    folder = tmp_path / 'out'
    shutil.copytree(made_folder, folder)
    copy = tmp_path / 'renamed-copy.pkl'
    shutil.copy(nets['uncond'], copy)
    result = cli('--network', copy, '--outdir', folder, '--seeds=0-3', '--steps=2')
    assert 'Generating 2 images' in result.output and '2 already there' in result.output
    manifest = json.loads((folder / 'manifest.json').read_text())
    assert manifest['complete'] and manifest['seeds'] == '0-3' and manifest['num_images'] == 4
    fresh = tmp_path / 'fresh'
    cli('--network', nets['uncond'], '--outdir', fresh, '--seeds=0-3', '--steps=2')
    assert png_bytes(folder) == png_bytes(fresh)
    assert json.loads((fresh / 'manifest.json').read_text())['settings'] == manifest['settings']


def test_folder_with_pngs_but_no_manifest_is_refused(nets, made_folder, tmp_path):
    folder = tmp_path / 'out'
    shutil.copytree(made_folder, folder)
    (folder / 'manifest.json').unlink()
    before = folder_state(folder)
    result = cli('--network', nets['uncond'], '--outdir', folder, '--seeds=0-1', '--steps=2', expect_ok=False)
    assert_clean_error(result, 'no manifest.json', '--force')
    assert folder_state(folder) == before
    (folder / 'manifest.json').write_text('{not json')
    result = cli('--network', nets['uncond'], '--outdir', folder, '--seeds=0-1', '--steps=2', expect_ok=False)
    assert_clean_error(result, 'manifest.json', 'cannot read it', '--force')
    cli('--network', nets['uncond'], '--outdir', folder, '--seeds=0-1', '--steps=2', '--force')
    assert png_bytes(folder) == png_bytes(made_folder)


def test_manifest_records_what_the_sampler_received(nets, tmp_path, monkeypatch):
    """A keyword the sampler gets is recorded even when no manifest code knows it (later options are covered)."""
    received = []
    original = pipeline.sample_batch

    def spy(net, seeds, **kwargs):
        received.append(kwargs)
        return original(net, seeds, **kwargs)
    monkeypatch.setattr(pipeline, 'sample_batch', spy)
    cli('--network', nets['cond'], '--outdir', tmp_path, '--seeds=0', '--steps=2', '--class=1', '--S_churn=2')
    settings = json.loads((tmp_path / 'manifest.json').read_text())['settings']
    (call,) = received
    call.pop('device')
    # Plus the original's pfgmpp flag, derived from D, as folders written before D became the one kernel value hold it.
    recorded = dict(call, pfgmpp=call['D'] is not None)
    assert settings['sampler'] == json.loads(json.dumps(manifest_lib.fingerprint(recorded)))
    assert settings['sampler']['class_idx'] == 1 and settings['sampler']['S_churn'] == 2

    from formats import manifest
    extra = dict(call, gnet=make_tiny_net(seed=1), guidance=1.5)
    other = dict(call, gnet=make_tiny_net(seed=2), guidance=1.5)
    base = manifest.describe_settings('0' * 64, load_network(nets['cond']), extra)
    differences = manifest.settings_differences(base, manifest.describe_settings('0' * 64,
                                                                                 load_network(nets['cond']), other))
    assert [d.split(':')[0] for d in differences] == ['gnet']


def test_two_processes_resume_and_refuse_like_one(nets, tmp_path):
    """Under torchrun rank 0 checks the folder and writes the manifest; a refusal is printed once, no traceback
    from our processes."""
    folder = tmp_path / 'out'
    flags = ['--network', str(nets['uncond']), '--outdir', str(folder), '--steps=2', '--device=cpu']
    torchrun = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'generate.py']
    cli(*flags, '--seeds=0-3')  # test_world_size_and_batch_invariance covers a two-process run that writes
    manifest = json.loads((folder / 'manifest.json').read_text())
    assert manifest['complete'] and manifest['seeds'] == '0-3'
    before = folder_state(folder)
    proc = run_python([*torchrun, *flags, '--seeds=0-5', '--steps=3'], env=dict(OMP_NUM_THREADS='1'), check=False)
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith('Error:')]
    assert len(errors) == 1 and 'num_steps' in errors[0] and '--force' in errors[0], proc.stderr[-2000:]
    # No traceback through the project's code; torchrun's own report (from the venv, which may sit in the
    # repository, as in CI) may follow any failed rank.
    own_frames = re.findall(rf'File "{re.escape(str(REPO_ROOT))}/(?!\.venv/)[^"]*"', proc.stderr)
    assert not own_frames and 'generate.py", line' not in proc.stderr
    assert folder_state(folder) == before


def test_another_process_continues_a_folder_of_a_pickled_network(nets, tmp_path):
    """Classes unpickled from embedded source get a module named at random per process; the manifest must not
    record that name, or no folder could be continued by a later run."""
    folder = tmp_path / 'out'
    flags = ['--network', str(nets['pfgmpp']), '--outdir', str(folder), '--steps=2', '--device=cpu']
    cli(*flags, '--seeds=0-1')
    before = folder_state(folder)
    proc = run_python(['generate.py', *flags, '--seeds=0-3'], env=dict(OMP_NUM_THREADS='1'), check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    after = folder_state(folder)
    assert {name: data for name, data in after.items() if name in before and name != 'manifest.json'} == \
        {name: data for name, data in before.items() if name != 'manifest.json'}
    assert sorted(p.name for p in folder.glob('*.png')) == [f'{s:06d}.png' for s in range(4)]
    assert json.loads((folder / 'manifest.json').read_text())['seeds'] == '0-3'


# ----------------------------------------------------------------------------
# Hostile and broken input: one ``Error:`` line naming the file or flag, no traceback, no partial output.


def run_generate(network: Path, outdir: Path, *extra: Any) -> Any:
    import generate
    return invoke(generate.main, ['--network', network, '--outdir', outdir, '--seeds=0-1', '--steps=2',
                                  '--device=cpu', *extra])


GENERATE_NETWORKS = {
    'empty': ('empty', ('--network', 'empty.pkl', '0 bytes')),
    'truncated-pickle': ('truncated_pkl', ('--network', 'truncated.pkl')),
    'dataset-zip': ('dataset', ('--network', 'dataset.zip')),
    'dict-without-ema': ('no_ema_pkl', ('--network', '"ema"')),
    'optimizer-state': ('optimizer_pt', ('--network', '"ema"')),
    'weights-foreign-class': ('weights_foreign_class', ('--network', "'builtins.eval' is not allowed")),
    'weights-bad-shape': ('weights_bad_shape', ('--network', 'model.map_layer0.weight is [2, 2]')),
    'ref-npz-as-network': ('ref_nan', ('--network', 'ref-nan.npz')),
}


@pytest.mark.parametrize('case', list(GENERATE_NETWORKS))
def test_generate_bad_network(case, inputs, tmp_path):
    key, fragments = GENERATE_NETWORKS[case]
    outdir = tmp_path / 'out'
    assert_one_error(run_generate(inputs[key], outdir), *fragments)
    assert tree(outdir) == {}


def test_generate_broken_weights_sibling_is_named(inputs, tmp_path):
    snapshot = copy_file(inputs['uncond'], tmp_path / 'net.pkl')
    (tmp_path / 'net.weights.pt').write_bytes(truncated(inputs['weights'].read_bytes()))
    assert_one_error(run_generate(snapshot, tmp_path / 'out'), '--network', 'net.weights.pt')
    assert tree(tmp_path / 'out') == {}


SEED_CASES = {'5-2': 'empty', 'a-b': "'a-b'", '1,,x': "'x'", '-3': 'seed -3 is out of range', '4294967296': 'out of range',
              ',': 'no integers'}


@pytest.mark.parametrize('seeds', list(SEED_CASES))
def test_generate_bad_seeds(seeds, inputs, tmp_path):
    import generate
    result = invoke(generate.main, ['--network', inputs['uncond'], '--outdir', tmp_path / 'out', f'--seeds={seeds}'])
    assert_one_error(result, '--seeds', SEED_CASES[seeds])
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('network, class_idx, fragment', [('cond', 3, 'out of range; expected 0..2'),
                                                          ('uncond', 0, 'unconditional')])
def test_generate_class_label_out_of_range(network, class_idx, fragment, inputs, tmp_path):
    assert_one_error(run_generate(inputs[network], tmp_path / 'out', f'--class={class_idx}'), '--class', fragment)
    assert tree(tmp_path / 'out') == {}


def test_generate_unwritable_outdir(inputs, tmp_path):
    outdir = under_a_file(tmp_path, 'images')
    assert_one_error(run_generate(inputs['uncond'], outdir), '--outdir', 'not writable')


def test_generate_unwritable_grid(inputs, tmp_path):
    grid = under_a_file(tmp_path, 'grid.png')
    assert_one_error(run_generate(inputs['uncond'], tmp_path / 'out', '--grid', grid), '--grid')
    assert tree(tmp_path / 'out') == {}


def test_generate_full_disk(inputs, tmp_path, full_disk):
    outdir = tmp_path / 'out'
    # The manifest is the first file written (before any image, so that an interrupted run is described).
    assert_one_error(run_generate(inputs['uncond'], outdir), f'--outdir {outdir}', 'manifest.json',
                     'No space left on device')
    assert tree(outdir) == {}


def test_generate_full_tmpfs(inputs, tiny_tmpfs):
    with unchanged(tiny_tmpfs):
        assert_one_error(run_generate(inputs['uncond'], tiny_tmpfs / 'out'), f'--outdir {tiny_tmpfs / "out"}',
                         'No space left on device')
