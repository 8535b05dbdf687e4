"""The main job end to end on an embedded dataset, offline, on a CPU in about ten minutes.

1. dataset_tool.py turns scikit-learn's handwritten digits (real 8x8 scans, 10 classes) into a 16x16 dataset ZIP;
2. train.py trains a small DDPM++ with PFGM++ (D=128) under ``torchrun --nproc_per_node=2`` (gloo);
3. the same recipe trains the EDM baseline (D=inf);
4. generate.py samples a grid from the last snapshot of each; the grids, a side-by-side comparison and the loss
   curves (from stats.jsonl) are written to ``--outdir``;
5. FID is computed when NVIDIA's detector is available locally (``--detector`` or dnnlib's download cache), else
   one line says how to enable it.

Every step runs the project's command-line tools exactly as a user would, and prints the command first.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Optional

import click
import numpy as np
from PIL import Image

from demo.plots import line_chart, side_by_side

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGIT_LEVELS = 16  # scikit-learn's digits take the values 0..16
RESOLUTION = 16
INCEPTION_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'

# A small DDPM++ that learns digits in a few CPU minutes. Only the size, the schedule and the run length differ
# from the paper's CIFAR-10 recipe; preconditioning, loss, EMA and sampler are the standard ones.
TRAIN_FLAGS = ['--cond=0', '--arch=ddpmpp', '--precond=edm', '--cbase=32', '--cres=1,2', '--nblock=1',
               '--batch=64', '--lr=2e-3', '--lr-rampup=10', '--ema=0.01', '--dropout=0', '--augment=0',
               '--xflip=0', '--workers=0', '--device=cpu', '--seed=0']


def run(cmd: list[str], env: Optional[dict] = None) -> None:
    """Run one of the project's tools, echoing the command like a shell transcript."""
    print('\n$ ' + ' '.join(shlex.quote(c) for c in cmd), flush=True)
    full_env = dict(os.environ, PYTHONPATH=REPO_ROOT, **(env or {}))
    subprocess.run(cmd, cwd=REPO_ROOT, env=full_env, check=True)


def write_digits_folder(folder: str) -> int:
    """Write scikit-learn's digits as PNGs with a dataset.json of labels (dataset_tool's folder input)."""
    from sklearn.datasets import load_digits  # ships the images inside the package: no download
    digits = load_digits()
    os.makedirs(folder, exist_ok=True)
    labels = []
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        name = f'digit{i:05d}.png'
        pixels = np.round(image * (255 / DIGIT_LEVELS)).astype(np.uint8)
        Image.fromarray(pixels, 'L').save(os.path.join(folder, name))
        labels.append([name, int(label)])
    with open(os.path.join(folder, 'dataset.json'), 'w') as f:
        json.dump({'labels': labels}, f)
    return len(labels)


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


@click.command()
@click.option('--outdir', default='demo-out', show_default=True, help='Where everything is written')
@click.option('--kimg', default=80.0, show_default=True, type=click.FloatRange(min=0.1),
              help='Training length of each model, in thousands of images')
@click.option('--nproc', default=2, show_default=True, type=click.IntRange(min=1), help='torchrun processes')
@click.option('--aug-dim', default=128, show_default=True, type=click.IntRange(min=1), help='PFGM++ D')
@click.option('--detector', default=None, metavar='PATH|URL', help='Inception pickle for FID (optional)')
def main(outdir: str, kimg: float, nproc: int, aug_dim: int, detector: Optional[str]) -> None:
    """Run the whole PFGM++ workflow on handwritten digits and leave pictures in --outdir."""
    start = time.time()
    outdir = os.path.abspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    py = sys.executable

    # 1. Dataset.
    source = os.path.join(outdir, 'digits-8x8')
    dataset = os.path.join(outdir, f'digits-{RESOLUTION}x{RESOLUTION}.zip')
    if not os.path.exists(dataset):
        count = write_digits_folder(source)
        print(f'Wrote {count} scikit-learn digits to {source}')
        run([py, 'dataset_tool.py', f'--source={source}', f'--dest={dataset}',
             f'--resolution={RESOLUTION}x{RESOLUTION}'])

    # 2-3. Train PFGM++ (finite D) and the EDM baseline (D = inf) the same way.
    tick_kimg = max(kimg / 15, 0.1)
    schedule = [f'--duration={kimg / 1000:g}', f'--tick={tick_kimg:g}', '--snap=5', '--dump=15']
    runs = {f'PFGM++ D={aug_dim}': ('pfgmpp', [f'--pfgmpp=1', f'--aug_dim={aug_dim}']),
            'EDM (D=inf)': ('edm', ['--pfgmpp=0'])}
    grids, curves = [], {}
    for caption, (name, extra) in runs.items():
        run_dir = os.path.join(outdir, 'runs', name)
        launcher = [py, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
        resume = ['--resume=auto'] if glob.glob(os.path.join(run_dir, 'training-state-*.pt')) else []
        run([*launcher, 'train.py', f'--outdir={os.path.join(outdir, "runs")}', f'--name={name}',
             f'--data={dataset}', *TRAIN_FLAGS, *extra, *schedule, *resume], env={'OMP_NUM_THREADS': '1'})
        snapshot = latest(os.path.join(run_dir, 'network-snapshot-*.pkl'))
        grid = os.path.join(outdir, f'samples-{name}.png')
        run([py, 'generate.py', f'--network={snapshot}', f'--outdir={os.path.join(outdir, "samples", name)}',
             '--seeds=0-99', '--steps=18', '--batch=100', '--device=cpu', f'--grid={grid}', '--force'])
        grids.append((grid, caption))
        curves[caption] = loss_curve(run_dir)

    # 4. Pictures.
    comparison = os.path.join(outdir, 'samples-side-by-side.png')
    side_by_side([g for g, _ in grids], [c for _, c in grids], comparison, scale=3)
    curve_path = os.path.join(outdir, 'loss-curves.png')
    line_chart(curves, curve_path, title='Training loss (mean per tick)', xlabel='kimg', ylabel='loss', log_y=True)

    # 5. FID, when the detector is at hand.
    detector_path = find_detector(detector)
    if detector_path is None:
        print('\nFID skipped: NVIDIA\'s Inception detector is not available offline. To enable it, download '
              f'{INCEPTION_URL} and pass --detector=PATH (or run once with network access to fill the cache).')
    else:
        refs = os.path.join(outdir, 'digits-ref.npz')
        run([py, 'fid.py', 'ref', f'--data={dataset}', f'--dest={refs}', f'--detector={detector_path}',
             '--device=cpu'])
        for name in ('pfgmpp', 'edm'):
            run([py, 'fid.py', 'calc', f'--images={os.path.join(outdir, "samples", name)}', f'--ref={refs}',
                 '--num=100', f'--detector={detector_path}', '--device=cpu',
                 f'--jsonl={os.path.join(outdir, "fid.jsonl")}'])

    print(f'\nDone in {time.time() - start:.0f}s. Pictures in {outdir}:')
    for path in [comparison, *[g for g, _ in grids], curve_path]:
        print(f'  {path}')


if __name__ == '__main__':
    main()
