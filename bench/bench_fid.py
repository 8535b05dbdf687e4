"""Throughput of the FID feature pipeline: detector alone, and folder -> DataLoader -> detector -> float64 stats.

Prints figures (images/s); never asserts on speed. By default it uses the golden stand-in detector so that it runs
offline; pass --detector to measure the real Inception network (PATH or URL).

    python bench/bench_fid.py --num=2048 --workers=0,2 --json=bench-fid.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dnnlib  # noqa: E402
from evaluation import features as feature_lib

DEFAULT_DETECTOR = Path(__file__).resolve().parent.parent / 'tests' / 'golden' / 'fid' / 'detector-standin.pkl'


def _write_random_pngs(folder: Path, count: int, resolution: int, seed: int) -> None:
    """Smooth-ish random RGB images (upsampled noise), so the PNG decoder does realistic work."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        coarse = rng.integers(0, 256, size=(resolution // 4, resolution // 4, 3), dtype=np.uint8)
        image = PIL.Image.fromarray(coarse, 'RGB').resize((resolution, resolution), PIL.Image.BILINEAR)
        image.save(folder / f'{index:06d}.png')


def _time(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls (the first call is a warm-up and not counted when repeats > 1)."""
    if repeats > 1:
        fn()
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@click.command()
@click.option('--detector', 'detector_path', help='Detector pickle', metavar='PATH|URL', default=str(DEFAULT_DETECTOR),
              show_default=True)
@click.option('--num', help='Images in the synthetic folder', type=click.IntRange(min=2), default=2048,
              show_default=True)
@click.option('--resolution', help='Image side', type=click.IntRange(min=4), default=32, show_default=True)
@click.option('--batch', help='Detector batch size', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--workers', help='DataLoader worker counts to try', metavar='LIST', default='0,2', show_default=True)
@click.option('--repeats', help='Timed repetitions (best is reported)', type=click.IntRange(min=1), default=2,
              show_default=True)
@click.option('--device', type=click.Choice(['cpu', 'cuda']), default=None, help='[default: cuda when available]')
@click.option('--sqrtm-dim', help='Also time the FID sqrtm at this dimension (0: skip)', type=click.IntRange(min=0),
              default=2048, show_default=True)
@click.option('--json', 'json_path', help='Write the figures to this JSON file', metavar='PATH', default=None)
def main(detector_path: str, num: int, resolution: int, batch: int, workers: str, repeats: int, device: str | None,
         sqrtm_dim: int, json_path: str | None) -> None:
    """Measure FID feature throughput."""
    device_obj = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    detector = feature_lib.load_detector(detector_path, device=device_obj)
    results: dict = dict(detector=detector_path, device=str(device_obj), num_images=num, resolution=resolution,
                         batch=batch, torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count())
    print(f'device {device_obj}, {torch.get_num_threads()} torch threads, {num} images of {resolution}x{resolution}, '
          f'batch {batch}')

    # Detector alone on in-memory uint8 batches: the ceiling for the whole pipeline.
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, size=(num, 3, resolution, resolution), dtype=np.uint8))
    images = images.to(device_obj)

    def in_memory(accumulate: bool) -> None:
        stats = feature_lib.FeatureStats(device_obj)
        for start in range(0, num, batch):
            features = feature_lib.extract_features(detector, images[start:start + batch])
            if accumulate:
                stats.add(features)
        if device_obj.type == 'cuda':
            torch.cuda.synchronize()

    seconds = _time(lambda: in_memory(False), repeats)
    results['detector_images_per_s'] = num / seconds
    print(f'detector forward, in memory:                {num / seconds:10.1f} images/s')
    seconds = _time(lambda: in_memory(True), repeats)
    results['detector_and_stats_images_per_s'] = num / seconds
    print(f'detector + float64 accumulation, in memory: {num / seconds:10.1f} images/s')

    # Whole pipeline from PNG files.
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / 'images'
        folder.mkdir()
        _write_random_pngs(folder, num, resolution, seed=1)
        results['pipeline_images_per_s'] = {}
        for count in dnnlib.util.parse_int_list(workers, name='--workers'):
            def pipeline() -> None:
                feature_lib.calculate_inception_stats(str(folder), num_expected=num, max_batch_size=batch,
                                              num_workers=count, device=device_obj, detector=detector)
            with open(os.devnull, 'w') as quiet:  # keep the figures readable: silence the library's progress lines
                stdout, sys.stdout = sys.stdout, quiet
                try:
                    seconds = _time(pipeline, repeats)
                finally:
                    sys.stdout = stdout
            results['pipeline_images_per_s'][str(count)] = num / seconds
            print(f'PNG folder -> stats, {count} DataLoader workers: {num / seconds:10.1f} images/s')

    if sqrtm_dim:
        a = rng.normal(size=(sqrtm_dim, sqrtm_dim + 8))
        b = rng.normal(size=(sqrtm_dim, sqrtm_dim + 8))
        sigma, sigma_ref = a @ a.T / sqrtm_dim, b @ b.T / sqrtm_dim
        mu = np.zeros(sqrtm_dim)
        seconds = _time(lambda: feature_lib.calculate_fid_from_inception_stats(mu, sigma, mu, sigma_ref), 1)
        results['fid_from_stats_seconds'] = seconds
        results['sqrtm_dim'] = sqrtm_dim
        print(f'FID from stats at D={sqrtm_dim} (scipy sqrtm): {seconds:.2f} s')

    if json_path:
        with dnnlib.util.atomic_write(json_path, 'w') as f:
            json.dump(results, f, indent=1)
        print(f'Wrote {json_path}')


if __name__ == '__main__':
    main()
