"""The main job end to end on an embedded dataset, offline, on a CPU in a few minutes.

1. dataset_tool.py turns scikit-learn's handwritten digits (real 8x8 scans, 10 classes) into a 16x16 dataset ZIP;
2. train.py trains a small DDPM++ with PFGM++ (D=128) under ``torchrun --nproc_per_node=2`` (gloo);
3. the same recipe trains the EDM baseline (D=inf);
4. generate.py samples ``--num`` images from the last snapshot of each;
5. sample sheets (enlarged tiles with real digits beside them) and the loss curves go to ``--outdir``;
6. fid.py measures each model's Frechet distance in the feature space of the digits classifier shipped with the
   demo (``demo/digits-classifier.weights.pt``, no download): "FD-digits", comparable between these runs only,
   never with published FIDs. With NVIDIA's Inception detector at hand (``--detector`` or dnnlib's download cache)
   the FID is computed too.

Every step runs the project's command-line tools exactly as a user would, and prints the command first.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import time
from typing import Optional

import click
import numpy as np
from PIL import Image

import dnnlib
from cli import common as cli

from demo.digits import REPO_ROOT, load_digits_dataset, make_digits_dataset, run_tool
from demo.plots import captioned_sheet, line_chart, tile_grid

INCEPTION_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'
DIGITS_DETECTOR = os.path.join(REPO_ROOT, 'demo', 'digits-classifier.weights.pt')

# A small DDPM++ that learns digits in a few CPU minutes. Only the size, the schedule and the run length differ
# from the paper's CIFAR-10 recipe (no self-attention: at 16x16 it would sit at full resolution, the costliest
# layer); preconditioning, loss, EMA and sampler are the standard ones. channels_last is the exact fp32 mode.
TRAIN_FLAGS = ['--cond=0', '--arch=ddpmpp', '--precond=edm', '--cbase=32', '--cres=1,2', '--nblock=1', '--attn=none',
               '--batch=64', '--lr=2e-3', '--lr-rampup=10', '--ema=0.01', '--dropout=0', '--augment=0',
               '--xflip=0', '--workers=0', '--device=cpu', '--channels-last=1', '--seed=0']
SHOWN = 100          # samples drawn on each sheet (10 x 10)
COLS = 10
SCALE = 4            # nearest-neighbour enlargement of the 16x16 tiles on the per-model sheets
SIDE_BY_SIDE_SCALE = 3
REAL_SEED = 0        # which real digits are shown


def latest(pattern: str) -> str:
    matches = sorted(glob.glob(pattern))
    if not matches:
        raise click.ClickException(f'expected a file matching {pattern}, found none')
    return matches[-1]


def loss_curve(run_dir: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        for line in f:
            entry = json.loads(line)
            loss = entry.get('Loss/loss', {})
            kimg = entry.get('Progress/kimg', {})
            if 'mean' in loss and 'mean' in kimg:
                xs.append(kimg['mean'])
                ys.append(loss['mean'])
    return xs, ys


def find_detector(detector: Optional[str]) -> Optional[str]:
    if detector:
        return detector
    from dnnlib.util import make_cache_dir_path
    cached = glob.glob(os.path.join(make_cache_dir_path('downloads'), '*inception-2015-12-05.pkl'))
    return cached[0] if cached else None


def read_pngs(folder: str, count: int) -> np.ndarray:
    """The first ``count`` PNGs of ``folder`` in name (= seed) order, as uint8 [N, H, W] gray."""
    paths = sorted(glob.glob(os.path.join(folder, '*.png')))[:count]
    if not paths:
        raise click.ClickException(f'expected PNGs in {folder}, found none')
    return np.stack([np.asarray(Image.open(p).convert('L')) for p in paths])


def reported_value(stdout: str) -> float:
    """The figure fid.py prints on its last line (the first number there)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    match = re.search(r'[-+]?\d+(\.\d*)?([eE][-+]?\d+)?', lines[-1]) if lines else None
    if match is None:
        raise click.ClickException(f'fid.py printed no figure on its last line: {lines[-1] if lines else "(nothing)"}')
    return float(match.group(0))


@click.command()
@click.option('--outdir', default='demo-out', show_default=True, help='Where everything is written')
@click.option('--kimg', default=40.0, show_default=True, type=cli.float_range(min=0.1),
              help='Training length of each model, in thousands of images')
@click.option('--nproc', default=2, show_default=True, type=click.IntRange(min=1), help='torchrun processes')
@click.option('--aug-dim', default=128, show_default=True, type=click.IntRange(min=1), help='PFGM++ D')
@click.option('--num', default=500, show_default=True, type=click.IntRange(min=SHOWN),
              help='Images generated per model (all enter the FD; the first 100 are drawn)')
@click.option('--detector', default=None, metavar='PATH|URL', help='Inception pickle for FID (optional)')
def main(outdir: str, kimg: float, nproc: int, aug_dim: int, num: int, detector: Optional[str]) -> None:
    """Run the whole PFGM++ workflow on handwritten digits; leave pictures and FD-digits in --outdir."""
    start = time.time()
    outdir = os.path.abspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    py = sys.executable

    # 1. Dataset.
    dataset = make_digits_dataset(outdir)

    # 2-4. Train PFGM++ (finite D) and the EDM baseline (D = inf) the same way, then sample from each.
    tick_kimg = max(kimg / 10, 0.1)
    schedule = [f'--duration={kimg / 1000:g}', f'--tick={tick_kimg:g}', '--snap=5', '--dump=10']
    runs = {f'PFGM++ D={aug_dim}': ('pfgmpp', [f'--pfgmpp=1', f'--aug_dim={aug_dim}']),
            'EDM (D=inf)': ('edm', ['--pfgmpp=0'])}
    samples, curves = {}, {}
    for caption, (name, extra) in runs.items():
        run_dir = os.path.join(outdir, 'runs', name)
        launcher = [py, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
        resume = ['--resume=auto'] if glob.glob(os.path.join(run_dir, 'training-state-*.pt')) else []
        # One thread per rank: the ranks already fill the cores, and more threads would only contend.
        run_tool([*launcher, 'train.py', f'--outdir={os.path.join(outdir, "runs")}', f'--name={name}',
                  f'--data={dataset}', *TRAIN_FLAGS, *extra, *schedule, *resume], env={'OMP_NUM_THREADS': '1'})
        snapshot = latest(os.path.join(run_dir, 'network-snapshot-*.pkl'))
        samples[caption] = os.path.join(outdir, 'samples', name)
        run_tool([py, 'generate.py', f'--network={snapshot}', f'--outdir={samples[caption]}', f'--seeds=0-{num - 1}',
                  '--steps=18', '--batch=100', '--device=cpu', '--force'])
        curves[caption] = loss_curve(run_dir)

    # 5. FD-digits: reference statistics of all real digits, then each model's samples (and, as the floor this
    # number of images allows, as many real digits).
    refs = os.path.join(outdir, 'digits-ref-fd-digits.npz')
    fd_flags = [f'--detector={DIGITS_DETECTOR}', '--device=cpu', '--workers=0']
    run_tool([py, 'fid.py', 'ref', f'--data={dataset}', f'--dest={refs}', *fd_flags])
    jsonl = os.path.join(outdir, 'fd-digits.jsonl')
    fd = {}
    for caption, folder in [('real digits', dataset), *samples.items()]:
        stdout = run_tool([py, 'fid.py', 'calc', f'--images={folder}', f'--ref={refs}', f'--num={num}', *fd_flags,
                           f'--jsonl={jsonl}'], capture=True)
        fd[caption] = reported_value(stdout)

    # 6. Pictures.
    real_images, _ = load_digits_dataset(dataset)
    shown_real = np.random.default_rng(REAL_SEED).permutation(real_images.shape[0])[:SHOWN]
    real = real_images[shown_real, 0].numpy()
    sheets = []
    for caption, (name, _) in runs.items():
        path = os.path.join(outdir, f'samples-{name}.png')
        captioned_sheet([('Real digits (training data)', tile_grid(real[:COLS], COLS, scale=SCALE)),
                         (f'{caption}: {SHOWN} samples, 18 Heun steps; FD-digits {fd[caption]:.1f} over {num}',
                          tile_grid(read_pngs(samples[caption], SHOWN), COLS, scale=SCALE))], path)
        sheets.append(path)
    comparison = os.path.join(outdir, 'samples-side-by-side.png')
    captioned_sheet([('Real digits', tile_grid(real, COLS, scale=SIDE_BY_SIDE_SCALE)),
                     *[(f'{caption} (FD-digits {fd[caption]:.1f})',
                        tile_grid(read_pngs(folder, SHOWN), COLS, scale=SIDE_BY_SIDE_SCALE))
                       for caption, folder in samples.items()]], comparison, across=True)
    curve_path = line_chart(curves, os.path.join(outdir, 'loss-curves.png'), title='Training loss (mean per tick)',
                            xlabel='kimg', ylabel='loss', log_y=True)

    # Optional: FID, when NVIDIA's detector is at hand.
    detector_path = find_detector(detector)
    if detector_path is None:
        print('\nFID skipped: NVIDIA\'s Inception detector is not available offline. To enable it, download '
              f'{INCEPTION_URL} and pass --detector=PATH (or run once with network access to fill the cache).')
    else:
        inception_refs = os.path.join(outdir, 'digits-ref.npz')
        run_tool([py, 'fid.py', 'ref', f'--data={dataset}', f'--dest={inception_refs}',
                  f'--detector={detector_path}', '--device=cpu'])
        for folder in samples.values():
            run_tool([py, 'fid.py', 'calc', f'--images={folder}', f'--ref={inception_refs}', f'--num={num}',
                      f'--detector={detector_path}', '--device=cpu', f'--jsonl={os.path.join(outdir, "fid.jsonl")}'])

    print(f'\nDone in {time.time() - start:.0f}s. Pictures in {outdir}:')
    for path in [comparison, *sheets, curve_path]:
        print(f'  {path}')
    print(f'\nFD-digits (Frechet distance in the features of demo/digits-classifier.weights.pt, not FID; lower is '
          f'better), {num} images each against all {real_images.shape[0]} real digits:')
    for caption, value in fd.items():
        print(f'  {caption:<16} {value:8.2f}')


if __name__ == '__main__':
    main()
