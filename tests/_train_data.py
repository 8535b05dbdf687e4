"""Helpers for the training tests: tiny datasets in the dataset_tool layout and the train.py command line."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import PIL.Image


def make_dataset_zip(path: Path, count: int = 16, resolution: int = 8, channels: int = 3,
                     num_classes: Optional[int] = None, seed: int = 0) -> Path:
    """A ZIP with ``count`` random PNGs named like dataset_tool's output, labelled when ``num_classes`` is set."""
    rnd = np.random.RandomState(seed)
    labels = []
    with zipfile.ZipFile(path, 'w') as archive:
        for i in range(count):
            name = f'{i // 1000:05d}/img{i:08d}.png'
            # Smooth images (a few random blobs) rather than white noise, so the loss can actually decrease.
            yy, xx = np.mgrid[0:resolution, 0:resolution] / resolution
            image = np.zeros([resolution, resolution, channels])
            for _ in range(3):
                cy, cx, width = rnd.rand(3)
                blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.05 + 0.2 * width))
                image += blob[..., None] * rnd.rand(channels)
            pixels = np.clip(image / image.max() * 255, 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            PIL.Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(buffer, format='png')
            archive.writestr(name, buffer.getvalue())
            if num_classes:
                labels.append([name, int(rnd.randint(num_classes))])
        archive.writestr('dataset.json', json.dumps({'labels': labels if num_classes else None}))
    return path


def tiny_train_args(data: Path, outdir: Path, **overrides: object) -> list[str]:
    """train.py flags for a seconds-long CPU run on 8x8 images (8-channel DDPM++, batch 4, 2 steps per tick)."""
    flags: dict[str, object] = {
        'outdir': outdir, 'data': data, 'arch': 'ddpmpp', 'precond': 'edm', 'cbase': 8, 'cres': '1,2',
        'nblock': 1, 'batch': 4, 'duration': 0.000016, 'tick': 0.008, 'snap': 1, 'dump': 1, 'seed': 1,
        'lr': 0.01, 'ema': 0.00001, 'workers': 0, 'device': 'cpu', 'augment': 0.12, 'dropout': 0.13,
        'pfgmpp': 1, 'aug_dim': 128,
    }
    flags.update(overrides)
    args = []
    for key, value in flags.items():
        if value is None:
            continue
        flag = '--' + key.replace('_', '-') if key not in ('aug_dim',) else '--' + key
        if value is True:
            args.append(flag)
        else:
            args.append(f'{flag}={value}')
    return args


def start_ranks(script_args: list[str], world: int = 2, extra_env: Optional[dict] = None) -> list:
    """``python SCRIPT_ARGS`` once per rank with torchrun's environment but without its agent, so each rank's exit
    code and output are its own (the agent would stop the others when one ends). One thread per rank."""
    import os
    import socket
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    procs = []
    for rank in range(world):
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), **(extra_env or {}))
        procs.append(subprocess.Popen([sys.executable, *script_args], cwd=REPO_ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True))
    return procs
