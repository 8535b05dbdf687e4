"""Loading speed and memory of training.dataset.ImageFolderDataset on synthetic ZIPs. Prints figures; never asserts.

Speed, on a CIFAR-sized ZIP (default 50,000 uncompressed 32x32 RGB PNGs, as dataset_tool.py writes them):
images/s for plain indexing, for DataLoader with 0 and 2 workers, each with and without ``cache=True`` (the cached
figures are a second pass, after the first filled the cache), and for ``get_batch`` on a filled cache.

Memory and open time, per rank, on a large ZIP (default ImageNet-64's 1,281,167 members, small 64x64 PNGs named
as dataset_tool.py names them; pixel size does not matter, only the member count): time to open and RSS growth of a
fresh process after opening the dataset (and after reading 1000 random items), its peak while opening, the bytes
of the index arrays kept, the same for ``zipfile.ZipFile`` alone, and the unique and proportional memory (USS, PSS)
of each of two forked DataLoader workers while they load batches. The large ZIP is written once (about 360 MB,
minutes) and kept in ``--cache-dir`` for later runs. Per-image figures are extrapolated linearly to 1,281,167.

    python bench/bench_dataset.py
    python bench/bench_dataset.py --cifar-images=0                       # only the ImageNet-size memory figures
    python bench/bench_dataset.py --cifar-images=10000 --large-images=50000 --json=out/bench_dataset.json
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Optional

import click
import numpy as np
import PIL.Image
import psutil
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from training.dataset import ImageFolderDataset  # noqa: E402

IMAGENET_TRAIN_IMAGES = 1_281_167
MIB = 1 << 20


def _png(pixels: np.ndarray, compress_level: int) -> bytes:
    out = io.BytesIO()
    PIL.Image.fromarray(pixels).save(out, format='png', compress_level=compress_level, optimize=False)
    return out.getvalue()


def write_cifar_like_zip(path: Path, count: int, seed: int = 0) -> None:
    """``count`` distinct random 32x32 RGB images, stored uncompressed like dataset_tool.py's output."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as zf:
        for k in range(count):
            zf.writestr(f'{k // 1000:05d}/img{k:08d}.png', _png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), 0))
        zf.writestr('dataset.json', json.dumps({'labels': [[f'{k // 1000:05d}/img{k:08d}.png', int(k % 10)]
                                                          for k in range(count)]}))


def write_large_zip(path: Path, count: int) -> None:
    """``count`` members named like ImageNet-64 converted by dataset_tool.py; a few small PNGs reused for speed."""
    variants = [_png(np.full((64, 64, 3), v, dtype=np.uint8), 9) for v in range(16)]
    partial = path.with_name(path.name + f'.{os.getpid()}.partial')
    with zipfile.ZipFile(partial, 'w', compression=zipfile.ZIP_STORED) as zf:
        for k in range(count):
            zf.writestr(f'{k // 1000:05d}/img{k:08d}.png', variants[k % len(variants)])
        zf.writestr('dataset.json', json.dumps({'labels': [[f'{k // 1000:05d}/img{k:08d}.png', k % 1000]
                                                          for k in range(count)]}))
    os.replace(partial, path)


def cached_large_zip(cache_dir: Path, count: int) -> Path:
    """The large ZIP of ``count`` members in ``cache_dir``, written on first use."""
    path = cache_dir / f'large-{count}.zip'
    if not path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_large_zip(path, count)
        print(f'  wrote {path} in {time.perf_counter() - start:.1f} s (kept for later runs)', flush=True)
    return path


# ----------------------------------------------------------------------------
# Speed.


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1)


def loader_pass(ds: ImageFolderDataset, workers: int, batch: int, passes: int) -> list[float]:
    """images/s of each pass over the dataset through one DataLoader (workers persist between passes)."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    rates = []
    for _ in range(passes):
        start, seen = time.perf_counter(), 0
        for images, _labels in loader:
            seen += images.shape[0]
        rates.append(_rate(seen, time.perf_counter() - start))
    return rates


def measure_speed(path: Path, batch: int) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for cache in (False, True):
        tag = 'cache' if cache else 'nocache'
        ds = ImageFolderDataset(path, use_labels=True, cache=cache)
        order = np.random.default_rng(0).permutation(len(ds))
        passes = []
        for _ in range(2 if cache else 1):
            start = time.perf_counter()
            for idx in order:
                ds[idx]
            passes.append(_rate(len(ds), time.perf_counter() - start))
        figures[f'getitem_{tag}'] = passes[-1]
        if cache:
            figures['getitem_cache_first_pass'] = passes[0]
            start = time.perf_counter()
            for first in range(0, len(ds), batch):
                ds.get_batch(order[first:first + batch])
            figures['get_batch_cache'] = _rate(len(ds), time.perf_counter() - start)
        for workers in (0, 2):
            # Each worker fills its own cache, so cached figures are the second pass.
            rates = loader_pass(ImageFolderDataset(path, use_labels=True, cache=cache), workers, batch,
                                2 if cache else 1)
            figures[f'dataloader_w{workers}_{tag}'] = rates[-1]
        print(f'  {tag:8s} ' + ', '.join(f'{k}={v}' for k, v in figures.items() if k.split('_')[-1] == tag
                                          or k.endswith('first_pass') and cache), flush=True)
    return figures


# ----------------------------------------------------------------------------
# Memory, each measured in a fresh process.


def _rss() -> int:
    return psutil.Process().memory_info().rss


class PeakRSS:
    """Samples this process's RSS on a background thread; ``peak`` is the largest value seen."""

    def __init__(self, interval_s: float = 0.005):
        self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.peak = max(self.peak, _rss())

    def __enter__(self) -> 'PeakRSS':
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _array_bytes(*objects: Any) -> int:
    """Bytes held by the distinct numpy arrays among the attributes of ``objects``."""
    arrays = {id(v): v for obj in objects for v in vars(obj).values() if isinstance(v, np.ndarray)}
    return sum(a.nbytes for a in arrays.values())


def probe_memory(mode: str, path: str) -> dict[str, Any]:
    """Runs inside the child process: memory of opening ``path`` one way."""
    base = _rss()
    start, start_cpu = time.perf_counter(), time.process_time()
    with PeakRSS() as peak:
        if mode == 'zipfile':
            handle = zipfile.ZipFile(path)
        else:
            ds = ImageFolderDataset(path, use_labels=mode == 'labels')
    # CPU time beside wall time: on a shared machine the wall time also counts other processes' turns.
    result: dict[str, Any] = dict(open_s=round(time.perf_counter() - start, 2),
                                  open_cpu_s=round(time.process_time() - start_cpu, 2),
                                  peak_growth_mib=round((peak.peak - base) / MIB, 1),
                                  open_growth_mib=round((_rss() - base) / MIB, 1))
    if mode == 'zipfile':
        result['members'] = len(handle.namelist())
    else:
        result['members'] = len(ds)
        result['index_arrays_mib'] = round(_array_bytes(ds, ds._zip) / MIB, 1)
        for idx in np.random.default_rng(0).integers(0, len(ds), 1000):
            ds[idx]
        result['growth_after_1000_items_mib'] = round((_rss() - base) / MIB, 1)
    if mode == 'workers':
        # Forked workers share the parent's pages until they write to them; numpy index arrays are only read.
        loader = torch.utils.data.DataLoader(ds, batch_size=256, shuffle=True, num_workers=2, persistent_workers=True,
                                             multiprocessing_context='fork')
        batches = iter(loader)
        for _ in range(20):
            next(batches)
        workers = [w.memory_full_info() for w in psutil.Process().children()]
        result['worker_uss_mib'] = [round(w.uss / MIB, 1) for w in workers]
        result['worker_pss_mib'] = [round(w.pss / MIB, 1) for w in workers]
        result['worker_rss_mib'] = [round(w.rss / MIB, 1) for w in workers]
        result['parent_uss_mib'] = round(psutil.Process().memory_full_info().uss / MIB, 1)
        del batches
    return result


def run_probe(mode: str, path: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, '--probe', mode, '--probe-path', str(path)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    if proc.returncode != 0:
        raise click.ClickException(f'memory probe {mode} failed:\n{proc.stderr[-2000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory(path: Path, count: int) -> dict[str, Any]:
    figures: dict[str, Any] = dict(members=count, zip_mib=round(path.stat().st_size / MIB, 1))
    for mode in ('ours', 'labels', 'zipfile', 'workers'):
        figures[mode] = run_probe(mode, path)
        print(f'  {mode:8s} {figures[mode]}', flush=True)
    per_image = {mode: figures[mode]['open_growth_mib'] * MIB / count for mode in ('ours', 'labels', 'zipfile')}
    figures['bytes_per_image'] = {mode: round(v, 1) for mode, v in per_image.items()}
    figures['extrapolated_imagenet64_mib'] = {mode: round(v * IMAGENET_TRAIN_IMAGES / MIB, 1)
                                              for mode, v in per_image.items()}
    return figures


# ----------------------------------------------------------------------------


@click.command()
@click.option('--cifar-images', default=50_000, show_default=True, help='Images in the speed ZIP (0 skips speed).')
@click.option('--large-images', default=IMAGENET_TRAIN_IMAGES, show_default=True,
              help='Members of the memory ZIP (0 skips memory).')
@click.option('--cache-dir', default=os.path.join(tempfile.gettempdir(), 'pfgmpp-bench'), show_default=True,
              help='Where the large ZIP is kept between runs.')
@click.option('--batch', default=512, show_default=True, help='Batch size for DataLoader and get_batch.')
@click.option('--workdir', default=None, help='Where to write the synthetic ZIPs (default: a temporary folder).')
@click.option('--json', 'json_path', default=None, help='Also write the figures to this JSON file.')
@click.option('--probe', type=click.Choice(['ours', 'labels', 'zipfile', 'workers']), hidden=True)
@click.option('--probe-path', default=None, hidden=True)
def main(cifar_images: int, large_images: int, cache_dir: str, batch: int, workdir: Optional[str],
         json_path: Optional[str], probe: Optional[str], probe_path: Optional[str]) -> None:
    """Benchmark dataset loading speed and memory."""
    if probe is not None:
        print(json.dumps(probe_memory(probe, probe_path)))
        return
    torch.set_num_threads(1)
    figures: dict[str, Any] = dict(cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads())
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        if cifar_images:
            path = Path(tmp) / 'cifar-like.zip'
            start = time.perf_counter()
            write_cifar_like_zip(path, cifar_images)
            print(f'speed: {cifar_images} images of 32x32 ({time.perf_counter() - start:.1f} s to write), images/s:')
            figures['speed_images_per_s'] = dict(images=cifar_images, batch=batch, **measure_speed(path, batch))
        if large_images:
            print(f'memory and open time: {large_images} members:', flush=True)
            path = cached_large_zip(Path(cache_dir), large_images)
            figures['memory'] = measure_memory(path, large_images)
            print(f'  extrapolated to {IMAGENET_TRAIN_IMAGES} images (MiB): '
                  f'{figures["memory"]["extrapolated_imagenet64_mib"]}')
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        import dnnlib
        with dnnlib.util.atomic_write(json_path, 'w') as f:
            json.dump(figures, f, indent=2)


if __name__ == '__main__':
    main()
