"""The paper's robustness claim at toy scale, in a couple of minutes on a CPU.

Data lie on a 2-D manifold (a ring of eight Gaussian blobs) embedded by a random
orthonormal map in a 64-D ambient space. For several D (and D = inf, the diffusion
limit) a small MLP denoiser is trained with the project's EDMLoss and PFGM++ kernel,
then sampled with the project's Heun sampler while noise of strength alpha is injected
at every step (the paper's robustness experiment), and with few steps. Quality is the
MMD between generated and held-out points plus the mean distance of samples from the
data plane. The table and plots go to ``--outdir``.

Usage: python -m demo.toy_study --outdir=demo-out/toy [--quick]
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

import click
import torch

from demo.plots import line_chart
from training.loss import EDMLoss
from sampling.edm import edm_sampler
from training import pfgmpp as pfgmpp_lib
from training.pfgmpp import sample_perturbation

AMBIENT_DIM = 64
MANIFOLD_DIM = 2
NUM_BLOBS = 8
BLOB_STD = 0.05
RING_RADIUS = 1.0
SIGMA_DATA = 0.5
PRIOR_SIGMA_MAX = 80.0


class ToyData:
    """Points on a ring of Gaussian blobs in a random 2-D plane of R^64."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(AMBIENT_DIM, MANIFOLD_DIM, generator=g, dtype=torch.float64))
        self.basis = basis.float()  # [64, 2], orthonormal columns
        self.scale = SIGMA_DATA / math.sqrt(RING_RADIUS ** 2 / MANIFOLD_DIM + BLOB_STD ** 2)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        angle = torch.randint(NUM_BLOBS, [n], generator=generator).float() * (2 * math.pi / NUM_BLOBS)
        plane = torch.stack([angle.cos(), angle.sin()], dim=1) * RING_RADIUS
        plane = plane + BLOB_STD * torch.randn(n, MANIFOLD_DIM, generator=generator)
        return (plane @ self.basis.T) * self.scale  # [n, 64]

    def off_manifold_distance(self, x: torch.Tensor) -> torch.Tensor:
        """Distance of each point from the data plane."""
        x = x.float()
        return (x - (x @ self.basis) @ self.basis.T).norm(dim=1)


class ToyDenoiser(torch.nn.Module):
    """An MLP with EDM's preconditioning, shaped like an image network ([B, 64, 1, 1]).

    It exposes the attributes the project's sampler and loss expect, so the toy runs the
    same code paths as the image models.
    """

    def __init__(self, D: Optional[float], hidden: int = 256, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.img_channels, self.img_resolution, self.label_dim = AMBIENT_DIM, 1, 0
        self.sigma_min, self.sigma_max, self.sigma_data = 0.0, float('inf'), sigma_data
        self.N = AMBIENT_DIM
        self.D = pfgmpp_lib.check_D(D)
        self.pfgmpp = self.D is not None  # the original's flag, part of the network interface the tools read
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(AMBIENT_DIM + 16, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, AMBIENT_DIM))
        self.register_buffer('freqs', torch.arange(8, dtype=torch.float32))

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(sigma)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None, **unused) -> torch.Tensor:
        dtype = x.dtype
        x = x.float().reshape(x.shape[0], -1)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        angles = c_noise * (2.0 ** self.freqs)
        embedding = torch.cat([angles.sin(), angles.cos()], dim=1)
        F_x = self.layers(torch.cat([c_in * x, embedding], dim=1))
        out = c_skip * x + c_out * F_x
        return out.reshape(-1, AMBIENT_DIM, 1, 1).to(dtype)


def train_denoiser(data: ToyData, D: Optional[float], steps: int, batch: int, seed: int) -> ToyDenoiser:
    torch.manual_seed(seed)  # weight init only; every random draw below uses explicit generators
    net = ToyDenoiser(D)
    loss_fn = EDMLoss(D=D)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    g_data = torch.Generator().manual_seed(seed + 1)
    g_noise = torch.Generator().manual_seed(seed + 2)
    for _ in range(steps):
        images = data.sample(batch, g_data).reshape(batch, AMBIENT_DIM, 1, 1)
        loss = loss_fn(net, images, generator=g_noise).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return net.eval().requires_grad_(False)


def mmd(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased squared MMD with a sum of RBF kernels at several bandwidths."""
    x, y = x.double(), y.double()
    xy = torch.cat([x, y])
    d2 = torch.cdist(xy, xy).square()
    kernel = sum(torch.exp(-d2 / (2 * bw ** 2)) for bw in (0.1, 0.2, 0.5, 1.0))
    n = x.shape[0]
    kxx, kyy, kxy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    off = 1 - torch.eye(n, dtype=kernel.dtype)
    value = (kxx * off).sum() / (n * (n - 1)) + (kyy * off).sum() / (n * (n - 1)) - 2 * kxy.mean()
    return float(value)


def generate(net: ToyDenoiser, num: int, seed: int, num_steps: int, alpha: float) -> torch.Tensor:
    """Sample with the project's EDM/Heun sampler from the PFGM++ prior (or the Gaussian one for D = inf)."""
    g = torch.Generator().manual_seed(seed)
    shape = [num, AMBIENT_DIM, 1, 1]
    if net.D is not None:
        # The prior is the perturbation kernel at sigma_max; such latents are used unscaled.
        latents = sample_perturbation(shape, PRIOR_SIGMA_MAX, D=net.D, generator=g, dtype=torch.float64)
    else:
        latents = torch.randn(shape, generator=g, dtype=torch.float64)
    out = edm_sampler(net, latents, num_steps=num_steps, sigma_max=PRIOR_SIGMA_MAX, D=net.D,
                      noise_injection=alpha, randn_like=lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype))
    return out.reshape(num, AMBIENT_DIM)


@click.command()
@click.option('--outdir', default='demo-out/toy', show_default=True, help='Where to write the table and plots')
@click.option('--dims', default='8,64,512,inf', show_default=True, help='Comma-separated D values (inf = diffusion)')
@click.option('--alphas', default='0,0.05,0.1,0.2,0.3', show_default=True, help='Injected-noise strengths')
@click.option('--steps-list', default='4,8,18', show_default=True, help='Heun step counts for the few-step sweep')
@click.option('--train-steps', default=3000, show_default=True, type=click.IntRange(min=1))
@click.option('--num', default=1000, show_default=True, type=click.IntRange(min=10), help='Samples per setting')
@click.option('--seed', default=0, show_default=True, type=int)
@click.option('--quick', is_flag=True, help='Fewer training steps and samples (CI-sized)')
def main(outdir: str, dims: str, alphas: str, steps_list: str, train_steps: int, num: int, seed: int,
         quick: bool) -> None:
    """Train toy PFGM++ denoisers for several D and measure robustness to injected noise and few steps."""
    if quick:
        train_steps, num = min(train_steps, 400), min(num, 300)
    dim_values = [float(v) for v in dims.split(',')]
    alpha_values = [float(v) for v in alphas.split(',')]
    step_values = [int(v) for v in steps_list.split(',')]
    if any(d < 1 for d in dim_values):
        raise click.BadParameter('every D must be >= 1 (or inf)', param_hint='--dims')
    os.makedirs(outdir, exist_ok=True)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    data = ToyData(seed)
    held_out = data.sample(num, torch.Generator().manual_seed(seed + 1000))
    baseline = mmd(data.sample(num, torch.Generator().manual_seed(seed + 2000)), held_out)
    results = []
    start = time.time()
    for D in dim_values:
        label = 'inf' if math.isinf(D) else f'{D:g}'
        net = train_denoiser(data, D, train_steps, batch=512, seed=seed)
        for alpha in alpha_values:
            x = generate(net, num, seed + 3000, num_steps=18, alpha=alpha)
            results.append(dict(D=label, alpha=alpha, steps=18, mmd=mmd(x.float(), held_out),
                                off_manifold=float(data.off_manifold_distance(x).mean())))
        for steps in step_values:
            if steps == 18 and 0.0 in alpha_values:
                continue  # already measured in the alpha sweep
            x = generate(net, num, seed + 3000, num_steps=steps, alpha=0.0)
            results.append(dict(D=label, alpha=0.0, steps=steps, mmd=mmd(x.float(), held_out),
                                off_manifold=float(data.off_manifold_distance(x).mean())))
        print(f'D={label:>4}: trained and sampled ({time.time() - start:.0f}s so far)', flush=True)

    labels = ['inf' if math.isinf(D) else f'{D:g}' for D in dim_values]
    print(f'\nMMD^2 to held-out data (lower is better; data-vs-data baseline {baseline:.4f}), 18 Heun steps:')
    print('alpha   ' + ''.join(f'{"D=" + lab:>12}' for lab in labels))
    for alpha in alpha_values:
        row = [r['mmd'] for lab in labels for r in results if r['D'] == lab and r['alpha'] == alpha and r['steps'] == 18]
        print(f'{alpha:<8g}' + ''.join(f'{v:>12.4f}' for v in row))
    print('\nMean distance from the data plane (lower is better):')
    for alpha in alpha_values:
        row = [r['off_manifold'] for lab in labels for r in results
               if r['D'] == lab and r['alpha'] == alpha and r['steps'] == 18]
        print(f'{alpha:<8g}' + ''.join(f'{v:>12.4f}' for v in row))
    print('\nMMD^2 without injected noise, by number of Heun steps:')
    print('steps   ' + ''.join(f'{"D=" + lab:>12}' for lab in labels))
    for steps in step_values:
        row = [r['mmd'] for lab in labels for r in results if r['D'] == lab and r['alpha'] == 0 and r['steps'] == steps]
        print(f'{steps:<8d}' + ''.join(f'{v:>12.4f}' for v in row))

    def curve(lab: str, key: str) -> tuple[list[float], list[float]]:
        rows = [r for r in results if r['D'] == lab and r['steps'] == 18]
        return [r['alpha'] for r in rows], [r[key] for r in rows]

    line_chart({f'D={lab}': curve(lab, 'mmd') for lab in labels}, os.path.join(outdir, 'toy-mmd-vs-alpha.png'),
               title='Toy study: MMD^2 vs injected noise alpha (18 Heun steps)', xlabel='alpha', ylabel='MMD^2',
               log_y=True)
    line_chart({f'D={lab}': curve(lab, 'off_manifold') for lab in labels},
               os.path.join(outdir, 'toy-offplane-vs-alpha.png'),
               title='Toy study: distance from the data plane vs alpha', xlabel='alpha', ylabel='mean distance')
    with open(os.path.join(outdir, 'toy-results.json'), 'w') as f:
        json.dump(dict(baseline_mmd=baseline, train_steps=train_steps, num=num, results=results), f, indent=2)
    print(f'\nWrote {outdir}/toy-results.json, toy-mmd-vs-alpha.png and toy-offplane-vs-alpha.png')


if __name__ == '__main__':
    main()
