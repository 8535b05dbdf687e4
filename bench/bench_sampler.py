"""Sampling speed: images/s of 18-step (35 NFE) generation with EDM's CIFAR-10 DDPM++ network.

Runs the same path as generate.py and fid.py (``training.sampler.sample_batch``: per-seed latents,
Heun sampler in float64, uint8 conversion) on a 56M-parameter EDMPrecond + SongUNet with random
weights, and reports

* images/s of plain runs, and
* the share of wall time spent outside the network calls (sampler arithmetic, random draws,
  dtype conversions), measured in separate runs that time every network call (on CUDA each call
  is synchronised, which those runs pay for). Target: under 5%.

Prints figures and never asserts on speed.

    python bench/bench_sampler.py                      # CUDA when available, else CPU
    python bench/bench_sampler.py --quick              # one small CPU-friendly batch
    python bench/bench_sampler.py --device=cuda --batch=256 --json=bench-sampler.json

On a CPU shared with other work, --threads=1 avoids OpenMP threads spin-waiting for each other
(on a busy 2-core machine that alone made 2 threads ~10x slower than 1).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import networks  # noqa: E402
from sampling import pipeline  # noqa: E402

# EDM's train.py network for --arch=ddpmpp on CIFAR-10 (32x32, 128 channels, 4 blocks per resolution).
DDPMPP_CIFAR = dict(img_resolution=32, img_channels=3, label_dim=0, model_type='SongUNet',
                    embedding_type='positional', encoder_type='standard', decoder_type='standard',
                    channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2],
                    num_blocks=4, attn_resolutions=[16], augment_dim=9, dropout=0.13)


REFERENCE_STEPS = 18                # EDM's CIFAR-10 setting: 35 network evaluations per image
REFERENCE_NFE = 2 * REFERENCE_STEPS - 1
QUICK_STEPS = 3


def build_network(device: torch.device, use_fp16: bool, seed: int = 0) -> torch.nn.Module:
    """The CIFAR-10 DDPM++ preconditioned network with seeded random weights (output layers included)."""
    torch.manual_seed(seed)
    net = networks.EDMPrecond(use_fp16=use_fp16, **DDPMPP_CIFAR)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            # Fresh U-Nets start with (near) zero output layers; random weights keep every layer busy and
            # avoid denormal-number slow paths that zeros followed by tiny updates can hit on CPUs.
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel() if p.ndim > 1 else 1) * 0.5)
    return net.eval().requires_grad_(False).to(device)


class TimedNetwork:
    """Forwards to ``net`` and accumulates the wall time spent inside its calls."""

    def __init__(self, net: Any, device: torch.device):
        self.net, self.device = net, device
        self.seconds, self.calls = 0.0, 0

    def __getattr__(self, attribute: str) -> Any:
        if attribute == 'net':  # not set yet (e.g. during copying): avoid endless recursion
            raise AttributeError(attribute)
        return getattr(self.net, attribute)

    def _sync(self) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def __call__(self, x: torch.Tensor, sigma: Any, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._sync()
        start = time.perf_counter()
        out = self.net(x, sigma, class_labels)
        self._sync()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def generate_once(net: Any, seeds: list[int], device: torch.device, num_steps: int) -> float:
    """Seconds for one batch through the full generation path (including the uint8 conversion)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    images = pipeline.to_uint8(pipeline.sample_batch(net, seeds, device=device, num_steps=num_steps))
    images.cpu()
    return time.perf_counter() - start


@click.command()
@click.option('--device', default=None, help='cpu or cuda  [default: cuda when available]')
@click.option('--batch', type=click.IntRange(min=2), default=None,
              help='Images per batch  [default: 128 on CUDA, 4 on CPU]')
@click.option('--steps', 'num_steps', type=click.IntRange(min=1), default=None,
              help='Sampling steps, NFE = 2*steps-1  [default: 18; 3 with --quick]')
@click.option('--repeats', type=click.IntRange(min=1), default=None,
              help='Timed batches per measurement  [default: 5 on CUDA, 1 on CPU]')
@click.option('--fp16', is_flag=True, help='Run the U-Net in float16 (CUDA only, as EDM --fp16)')
@click.option('--threads', type=click.IntRange(min=1), default=None, help='torch intra-op threads on CPU')
@click.option('--quick', is_flag=True,
              help='Small, fast settings: batch 2, 3 steps, one measurement (35-NFE figures extrapolated)')
@click.option('--json', 'json_path', default=None, metavar='PATH', help='Also write the figures to this JSON file')
def main(device: Optional[str], batch: Optional[int], num_steps: Optional[int], repeats: Optional[int], fp16: bool,
         threads: Optional[int], quick: bool, json_path: Optional[str]) -> None:
    dev = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if threads:
        torch.set_num_threads(threads)
    on_cuda = dev.type == 'cuda'
    batch = batch or (2 if quick else (128 if on_cuda else 4))
    repeats = repeats or (1 if quick or not on_cuda else 5)
    num_steps = num_steps or (QUICK_STEPS if quick else REFERENCE_STEPS)
    torch.backends.cudnn.benchmark = True

    net = build_network(dev, use_fp16=fp16)
    seeds = list(range(batch))
    nfe = 2 * num_steps - 1
    print(f'DDPM++ CIFAR-10 network, {sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters, '
          f'device {torch.cuda.get_device_name(dev) if on_cuda else "cpu"}, batch {batch}, {num_steps} steps '
          f'({nfe} NFE), {"fp16" if fp16 else "fp32"} network', flush=True)

    generate_once(net, seeds[:2], dev, num_steps=2)  # warm-up: kernel selection, allocator, lazy init

    plain = [generate_once(net, seeds, dev, num_steps) for _ in range(repeats)]
    timed_net = TimedNetwork(net, dev)
    instrumented = []
    for _ in range(repeats):
        timed_net.seconds = 0.0
        total = generate_once(timed_net, seeds, dev, num_steps)
        instrumented.append((total, timed_net.seconds))
    total_s = sum(t for t, _ in instrumented)
    network_s = sum(n for _, n in instrumented)

    figures = dict(
        device=torch.cuda.get_device_name(dev) if on_cuda else 'cpu',
        threads=torch.get_num_threads(), batch=batch, num_steps=num_steps, nfe=nfe, fp16=fp16,
        params_millions=round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
        seconds_per_batch=round(statistics.median(plain), 4),
        images_per_second=round(batch / statistics.median(plain), 3),
        network_evaluations_per_second=round(batch * nfe / statistics.median(plain), 2),
        outside_network_fraction=round((total_s - network_s) / total_s, 5),
        outside_network_ms_per_batch=round((total_s - network_s) / repeats * 1e3, 3),
        network_calls_per_batch=timed_net.calls // repeats,
    )
    # Both the network time and the sampler's own work grow linearly with the number of evaluations,
    # so a shorter run predicts the 35-NFE rate (flagged as an estimate).
    figures['images_per_second_at_35_nfe'] = round(figures['images_per_second'] * nfe / REFERENCE_NFE, 4)
    figures['at_35_nfe_is_estimate'] = nfe != REFERENCE_NFE
    print(f'{figures["images_per_second"]:.3f} images/s at {nfe} NFE ({figures["seconds_per_batch"]:.3f} s per batch '
          f'of {batch}); time outside the network: {100 * figures["outside_network_fraction"]:.2f}% '
          f'({figures["outside_network_ms_per_batch"]:.1f} ms per batch; target < 5%)')
    if nfe != REFERENCE_NFE:
        print(f'estimated {figures["images_per_second_at_35_nfe"]:.4f} images/s at {REFERENCE_NFE} NFE')
    print(json.dumps(figures))
    if json_path:
        import dnnlib
        with dnnlib.util.atomic_write(json_path, 'w') as f:
            f.write(json.dumps(figures, indent=2) + '\n')


if __name__ == '__main__':
    main()
