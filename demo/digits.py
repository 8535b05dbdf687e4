"""The demo's data: scikit-learn's handwritten digits prepared as a 16x16 dataset by dataset_tool.py.

scikit-learn ships 1,797 real 8x8 scans (values 0..16, ten classes) inside the package, so no download is needed.
They are written as PNGs with a ``dataset.json`` of labels and converted by ``dataset_tool.py --resolution=16x16``,
exactly as a user would prepare their own folder of images.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from typing import Optional

import click

import numpy as np
import torch
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGIT_LEVELS = 16  # scikit-learn's digits take the values 0..16
RESOLUTION = 16


def run_tool(cmd: list[str], env: Optional[dict] = None, capture: bool = False) -> str:
    """Run one of the project's tools from the repository root, echoing the command like a shell transcript.

    With ``capture`` the tool's stdout is echoed too and returned. Raises ``subprocess.CalledProcessError``.
    """
    print('\n$ ' + ' '.join(shlex.quote(c) for c in cmd), flush=True)
    path = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get('PYTHONPATH')) if p)
    full_env = dict(os.environ, PYTHONPATH=path, **(env or {}))
    if not capture:
        subprocess.run(cmd, cwd=REPO_ROOT, env=full_env, check=True)
        return ''
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=full_env, check=True, stdout=subprocess.PIPE, text=True)
    print(proc.stdout, end='', flush=True)
    return proc.stdout


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


def make_digits_dataset(workdir: str) -> str:
    """Write the 16x16 digits dataset ZIP under ``workdir`` (once) and return its path."""
    dataset = os.path.join(workdir, f'digits-{RESOLUTION}x{RESOLUTION}.zip')
    if not os.path.exists(dataset):
        source = os.path.join(workdir, 'digits-8x8')
        count = write_digits_folder(source)
        print(f'Wrote {count} scikit-learn digits to {source}')
        run_tool([sys.executable, 'dataset_tool.py', f'--source={source}', f'--dest={dataset}',
                  f'--resolution={RESOLUTION}x{RESOLUTION}'])
    return dataset


def load_digits_dataset(dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (uint8 [N, 1, 16, 16]) and integer labels ([N] int64) of a dataset ZIP, in file order."""
    from training.dataset import ImageFolderDataset
    data = ImageFolderDataset(path=dataset, use_labels=True)
    images, onehot = data.get_batch(np.arange(len(data)))
    return images, onehot.argmax(dim=1)


def split_indices(count: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed (train, test) split of ``range(count)``: a seeded permutation, the first part held out."""
    order = np.random.default_rng(seed).permutation(count)
    num_test = int(round(count * test_fraction))
    return np.sort(order[num_test:]), np.sort(order[:num_test])


def number_list(text: str, flag: str, kind: type = float, minimum: float = -math.inf, maximum: float = math.inf,
                sort: bool = False) -> list:
    """``"1,1.5,2"`` as numbers of ``kind`` within [minimum, maximum] (nan and inf never pass unless a bound is
    infinite), in the order given or sorted without repeats; a ``click.BadParameter`` naming ``flag`` otherwise."""
    try:
        values = [kind(part) for part in text.split(',') if part.strip()]
    except ValueError:
        raise click.BadParameter(f'expected comma-separated numbers, got "{text}"', param_hint=flag) from None
    if not values or not all(minimum <= v <= maximum and math.isfinite(v) for v in values):
        bounds = f' in {minimum:g}..{maximum:g}' if math.isfinite(minimum) and math.isfinite(maximum) else \
            f' >= {minimum:g}' if math.isfinite(minimum) else ''
        raise click.BadParameter(f'expected one or more finite numbers{bounds}, got "{text}"', param_hint=flag)
    return sorted(set(values)) if sort else values


def read_record(path: str, record_format: int) -> Optional[dict]:
    """The JSON record a resumable study wrote at ``path``, or None when it is missing, unreadable or of another
    ``record_format`` (then the work it describes is redone)."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get('format') == record_format else None


def write_record(path: str, record: dict, record_format: int) -> None:
    """Write ``record`` with its ``record_format`` at ``path``, atomically, creating the folder. The values are
    written as they are (a record compares equal to the settings it was made from only if nothing rewrote them)."""
    import dnnlib
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with dnnlib.util.atomic_write(path, 'w') as f:
        json.dump(dict(record, format=record_format), f, indent=2)


def model_name(D: Optional[float]) -> str:
    return 'Dinf' if D is None else f'D{D:g}'


def model_label(D: Optional[float]) -> str:
    return 'D=inf (EDM)' if D is None else f'D={D:g}'


def parse_aug_dims(text: str) -> list[Optional[float]]:
    """'16,128,inf' -> [16.0, 128.0, None] (None = diffusion, D -> inf)."""
    values: list[Optional[float]] = []
    for part in text.split(','):
        part = part.strip().lower()
        if part in ('inf', 'infinity'):
            values.append(None)
            continue
        try:
            value = float(part)
        except ValueError:
            value = -1.0
        if value < 1 or value != int(value):
            raise click.BadParameter(f'expected integers >= 1 or "inf", got "{part}"', param_hint='--aug-dims')
        values.append(value)
    return values


def launcher(nproc: int) -> list[str]:
    """How a tool is started: under torchrun (gloo on the CPU) for several processes, plainly for one."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
