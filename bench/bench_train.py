"""Training throughput of the standard CIFAR-10 configuration: DDPM++ with PFGM++ (D=128).

Runs the real training loop (``training.training_loop``) with the configuration ``train.py`` builds for

    --arch=ddpmpp --precond=edm --pfgmpp=1 --aug_dim=128 --augment=0.12 --dropout=0.13
    (cbase 128, cres 2,2,2, 4 blocks, attention at 16x16, augment_dim 9)

on a temporary dataset of random 32x32 RGB images, and reports sec/kimg and images/s of the steps after the first
(the first tick absorbs start-up and warm-up), peak host memory (max RSS) and, on CUDA, peak GPU memory. No
snapshots or training states are written. Prints figures; never asserts on speed.

    python bench/bench_train.py --quick                   # CPU, a few steps of batch 8
    python bench/bench_train.py --device=cuda --batch=128 --steps=20 --json=bench-train.json
"""

from __future__ import annotations

import io
import json
import os
import resource
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Optional

import click
import numpy as np
import PIL.Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dnnlib  # noqa: E402

#: Training images in the temporary dataset (CIFAR-10 shaped).
DATASET_IMAGES = 256
RESOLUTION = 32


def write_random_dataset(path: str, count: int = DATASET_IMAGES, seed: int = 0) -> None:
    """A dataset_tool-style ZIP of ``count`` random RGB images; content does not matter for speed."""
    rnd = np.random.RandomState(seed)
    with zipfile.ZipFile(path, 'w') as archive:
        for i in range(count):
            pixels = rnd.randint(0, 256, size=[RESOLUTION, RESOLUTION, 3], dtype=np.uint8)
            buffer = io.BytesIO()
            PIL.Image.fromarray(pixels).save(buffer, format='png', compress_level=0)
            archive.writestr(f'{i // 1000:05d}/img{i:08d}.png', buffer.getvalue())
        archive.writestr('dataset.json', json.dumps({'labels': None}))


def train_cli_options(data: str, outdir: str, batch: int, steps: int, device: str, precision: str,
                      channels_last: bool, compile_net: bool) -> dnnlib.EasyDict:
    """train.py's parsed options for the benchmark configuration (parsed by train.py's own click command)."""
    import train
    args = [f'--outdir={outdir}', f'--data={data}', '--arch=ddpmpp', '--precond=edm', '--pfgmpp=1', '--aug_dim=128',
            '--augment=0.12', '--dropout=0.13', f'--batch={batch}', f'--duration={steps * batch / 1e6}',
            f'--tick={(steps - 1) * batch / 1e3}', '--seed=0', '--workers=0', f'--device={device}',
            f'--precision={precision}', f'--channels-last={int(channels_last)}', f'--compile={int(compile_net)}',
            '--cache=1', '--nosubdir']
    with train.main.make_context('train.py', args) as ctx:
        return dnnlib.EasyDict(ctx.params)


@click.command()
@click.option('--device', type=click.Choice(['cpu', 'cuda']), default=None, help='[default: cuda if available]')
@click.option('--batch', type=click.IntRange(min=1), default=8, show_default=True, help='Images per step.')
@click.option('--steps', type=click.IntRange(min=2), default=6, show_default=True,
              help='Optimizer steps; the first one is warm-up and not timed.')
@click.option('--precision', type=click.Choice(['fp32', 'fp16', 'bf16']), default='fp32', show_default=True)
@click.option('--channels-last', is_flag=True, help='Channels-last memory layout.')
@click.option('--compile', 'compile_net', is_flag=True, help='torch.compile the network.')
@click.option('--quick', is_flag=True, help='Three steps (about a minute on a small CPU).')
@click.option('--json', 'json_path', type=str, default=None, help='Also write the figures to this JSON file.')
def main(device: Optional[str], batch: int, steps: int, precision: str, channels_last: bool, compile_net: bool,
         quick: bool, json_path: Optional[str]) -> None:
    """Time the training loop on the CIFAR-10 DDPM++ / PFGM++ (D=128) configuration."""
    import torch

    from torch_utils import distributed as dist
    from training import config as train_config
    from training import training_loop

    if quick:
        steps = 3
    device_name = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    torch_device = dist.init(device_name)
    with tempfile.TemporaryDirectory(prefix='bench-train-') as tmp:
        data = os.path.join(tmp, 'cifar-like.zip')
        write_random_dataset(data)
        opts = train_cli_options(data, tmp, batch, steps, device_name, precision, channels_last, compile_net)
        config, _desc = train_config.build_config(opts, world=dist.get_world_size())
        config.update(run_dir=tmp, seed=0, snapshot_ticks=None, state_dump_ticks=None)

        start = time.perf_counter()
        training_loop.training_loop(**config, device=torch_device)
        wall = time.perf_counter() - start
        ticks = [json.loads(line) for line in Path(tmp, 'stats.jsonl').read_text().splitlines()]

    timed = ticks[-1]  # the tick holding steps 2..N
    sec_per_kimg = timed['Timing/sec_per_kimg']['mean']
    figures = dict(
        config='CIFAR-10 DDPM++ (cbase 128, cres 2,2,2, 4 blocks, attn 16, augment_dim 9, dropout 0.13), '
               'EDM precond, PFGM++ D=128',
        device=torch.cuda.get_device_name(torch_device) if torch_device.type == 'cuda' else f'cpu '
               f'({torch.get_num_threads()} threads)',
        torch=torch.__version__, precision=precision, channels_last=channels_last, compile=compile_net,
        batch=batch, timed_steps=steps - 1,
        sec_per_kimg=round(sec_per_kimg, 3),
        images_per_sec=round(1000 / sec_per_kimg, 3),
        sec_per_step=round(sec_per_kimg * batch / 1000, 4),
        first_tick_sec=round(ticks[0]['Timing/sec_per_tick']['mean'], 3),
        total_wall_sec=round(wall, 2),
        peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        peak_gpu_mem_gb=round(max(t['Resources/peak_gpu_mem_gb']['mean'] for t in ticks), 3),
        final_loss=round(timed['Loss/loss']['mean'], 4),
    )
    dist.shutdown()
    print(json.dumps(figures, indent=2))
    if json_path:
        with dnnlib.util.atomic_write(json_path, 'w') as f:
            json.dump(figures, f, indent=2)


if __name__ == '__main__':
    main()
