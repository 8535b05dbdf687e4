"""Cost of the PFGM++ perturbation kernel against one DDPM++ training step on the same device.

Times, for a CIFAR-shaped batch (default 512 x 3 x 32 x 32):
- one draw of ``training.pfgmpp.sample_perturbation`` with finite D (training clip on) and the Gaussian draw;
- one forward + backward pass of EDM's CIFAR-10 DDPM++ network (EDMPrecond + SongUNet, 56M parameters);
- optionally the stable target field over a reference batch (``--stf-reference``, 0 to skip).
and prints the kernel's cost as a percentage of the forward + backward (target: under 2%). Prints figures; it never
asserts on speed.

    python bench/bench_kernel.py                                   # CUDA when available
    python bench/bench_kernel.py --device=cpu --batch=32 --model-channels=32 --repeats=3   # quick CPU look
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import networks, pfgmpp  # noqa: E402
from training.loss import DEFAULT_BETA_CLIP  # noqa: E402

# EDM's train.py settings for --arch=ddpmpp on CIFAR-10 (with --augment, hence augment_dim=9).
DDPMPP_CIFAR = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                    decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], channel_mult=[2, 2, 2],
                    augment_dim=9, dropout=0.13)


def time_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in milliseconds over ``repeats`` calls, after two warm-up calls."""
    synchronize = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    for _ in range(2):
        fn()
    synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


@click.command()
@click.option('--device', default='cuda' if torch.cuda.is_available() else 'cpu', show_default=True)
@click.option('--batch', default=512, show_default=True, help='Images per batch.')
@click.option('--resolution', default=32, show_default=True)
@click.option('--D', 'D', default=128.0, show_default=True, help='PFGM++ augmented dimensions.')
@click.option('--model-channels', default=128, show_default=True, help='DDPM++ base channels (128 = CIFAR).')
@click.option('--stf-reference', default=4096, show_default=True, help='Reference batch for the STF timing, 0 = skip.')
@click.option('--repeats', default=20, show_default=True)
@click.option('--json', 'json_path', default=None, help='Also write the figures to this JSON file.')
def main(device: str, batch: int, resolution: int, D: float, model_channels: int, stf_reference: int, repeats: int,
         json_path: str | None) -> None:
    device = torch.device(device)
    torch.backends.cudnn.benchmark = True
    shape = (batch, 3, resolution, resolution)
    gen = torch.Generator(device).manual_seed(0)
    sigma = torch.rand([batch, 1, 1, 1], generator=gen, device=device) * 10 + 0.01
    images = torch.rand(shape, generator=gen, device=device) * 2 - 1

    figures = dict(device=str(torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'),
                   batch=batch, resolution=resolution, D=D, model_channels=model_channels)
    figures['kernel_ms'] = time_ms(lambda: pfgmpp.sample_perturbation(
        shape, sigma, D=D, generator=gen, clip_beta=DEFAULT_BETA_CLIP), repeats, device)
    figures['gaussian_ms'] = time_ms(lambda: pfgmpp.sample_perturbation(shape, sigma, generator=gen),
                                     repeats, device)

    net = networks.EDMPrecond(img_resolution=resolution, img_channels=3, model_channels=model_channels,
                              **DDPMPP_CIFAR).to(device).train()
    augment_labels = torch.zeros([batch, DDPMPP_CIFAR['augment_dim']], device=device)

    def forward_backward() -> None:
        noisy = images + pfgmpp.sample_perturbation(shape, sigma, generator=gen)
        net(noisy, sigma, augment_labels=augment_labels).square().mean().backward()

    figures['forward_backward_ms'] = time_ms(forward_backward, repeats, device)
    figures['kernel_percent_of_step'] = 100 * figures['kernel_ms'] / figures['forward_backward_ms']

    if stf_reference:
        reference = torch.rand((stf_reference, *shape[1:]), generator=gen, device=device) * 2 - 1
        noisy = images + pfgmpp.sample_perturbation(shape, sigma, D=D, generator=gen)
        figures['stf_reference'] = stf_reference
        figures['stf_ms'] = time_ms(lambda: pfgmpp.stable_target_field(noisy, sigma, reference, D=D),
                                    max(repeats // 4, 1), device)

    print(f"device {figures['device']}, batch {batch}x3x{resolution}x{resolution}, D={D:g}, "
          f"DDPM++ {model_channels} channels")
    print(f"  PFGM++ kernel draw     {figures['kernel_ms']:9.3f} ms")
    print(f"  Gaussian draw          {figures['gaussian_ms']:9.3f} ms")
    print(f"  DDPM++ fwd + bwd       {figures['forward_backward_ms']:9.3f} ms")
    print(f"  kernel / step          {figures['kernel_percent_of_step']:9.3f} %   (target < 2 %)")
    if stf_reference:
        print(f"  STF target, {stf_reference} refs {figures['stf_ms']:9.3f} ms")
    if json_path:
        import dnnlib
        with dnnlib.util.atomic_write(json_path, 'w') as f:
            json.dump(figures, f, indent=2)


if __name__ == '__main__':
    main()
