"""Noise levels, the network interface and per-seed randomness: what every sampler of this package shares.

* :class:`Denoiser` -- the network interface the samplers rely on (any preconditioner of ``training.networks`` has it).
* :class:`PerSeedRandom` -- one ``torch.Generator`` per sample, so an image depends on its seed alone.
* :func:`noise_levels` -- EDM's rho-spaced levels (Karras et al. 2022, eq. 5) or levels evenly spaced in log-SNR
  (Lu et al. 2022, DPM-Solver++), float64, ending at sigma = 0.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import torch

from training import pfgmpp as pfgmpp_lib


class Denoiser(Protocol):
    """What a sampler needs from a network: the interface every preconditioner of ``training.networks`` has, which
    also lets a state dict or a pickle move between this code and the original."""

    img_resolution: int
    img_channels: int
    label_dim: int
    sigma_min: float
    sigma_max: float

    def round_sigma(self, sigma: Any) -> torch.Tensor: ...

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor,
                 class_labels: Optional[torch.Tensor] = None) -> torch.Tensor: ...


NoiseFn = Callable[[torch.Tensor], torch.Tensor]


# Noise range of the EDM sampler when the caller does not restate it.
EDM_SIGMA_MIN = 0.002


EDM_SIGMA_MAX = 80.0


# Ablation sampler: default noise range for each time step discretisation. The VP
# defaults evaluate the VP schedule with the DDPM++ constants of the EDM paper
# (beta_d = 19.9, beta_min = 0.1) at t = epsilon_s and t = 1.
VP_PAPER_BETA_D = 19.9


VP_PAPER_BETA_MIN = 0.1


VE_DEFAULT_RANGE = (0.02, 100.0)


IDDPM_DEFAULT_RANGE = (0.002, 81.0)


EDM_DEFAULT_RANGE = (EDM_SIGMA_MIN, EDM_SIGMA_MAX)


# Steps of the EDM sampler when none are given (EDM's CIFAR-10 setting, 35 NFE with Heun).
DEFAULT_STEPS = 18


# How the noise levels are spaced (EDM sampler and fast solvers).
SPACINGS = ('edm', 'logsnr')


class PerSeedRandom:
    """One ``torch.Generator`` per sample, so each sample's draws depend on its seed alone.

    Every draw asks each generator for that sample's slice in turn and stacks the
    slices; the result is therefore the same whatever the batch composition.
    Generators live on the sampling device (a CUDA generator yields other numbers
    than a CPU one, as in the reference).
    """

    def __init__(self, seeds: Sequence[int], device: Union[str, torch.device] = 'cpu'):
        self.device = torch.device(device)
        self.seeds = [int(s) for s in seeds]
        self.generators = pfgmpp_lib.seed_generators(self.seeds, self.device)

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, sample_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal draws of shape ``[len(seeds), *sample_shape]`` (:func:`training.pfgmpp.stacked_randn`)."""
        return pfgmpp_lib.stacked_randn(self.generators, sample_shape, dtype=dtype, device=self.device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Like ``torch.randn_like`` (drawn directly in ``x``'s dtype), one slice per generator."""
        if x.shape[0] != len(self.generators):
            raise ValueError(f'batch of {x.shape[0]} samples but {len(self.generators)} generators')
        return self.randn(x.shape[1:], dtype=x.dtype).to(x.device)

    def perturbation(self, x: torch.Tensor, sigma: float, D: Optional[float] = None) -> torch.Tensor:
        """Noise shaped like ``x`` (float64) from the perturbation kernel at noise level ``sigma``.

        One slice per generator, so each sample's noise depends on its seed alone.

        PFGM++ kernel for finite ``D``, Gaussian ``sigma * randn`` for D None/inf
        (:func:`training.pfgmpp.sample_perturbation`, exact: no clipping).
        """
        if x.shape[0] != len(self.generators):
            raise ValueError(f'batch of {x.shape[0]} samples but {len(self.generators)} generators')
        slices = [pfgmpp_lib.sample_perturbation([1, *x.shape[1:]], sigma, D, generator=g, device=self.device,
                                                 dtype=torch.float64) for g in self.generators]
        return torch.cat(slices).to(x.device)

    def randint(self, high: int) -> torch.Tensor:
        """One integer in ``[0, high)`` per sample (int64, shape ``[len(seeds)]``)."""
        draws = [torch.randint(high, size=[], generator=g, device=self.device) for g in self.generators]
        return torch.stack(draws)


def step_fractions(num_steps: int, device: Union[str, torch.device]) -> torch.Tensor:
    """i / (num_steps - 1) for i = 0 .. num_steps - 1 (float64); all zeros for a single step."""
    index = torch.arange(num_steps, dtype=torch.float64, device=device)
    return index / (num_steps - 1) if num_steps > 1 else torch.zeros_like(index)


def edm_noise_levels(num_steps: int, sigma_min: float, sigma_max: float, rho: float,
                     device: Union[str, torch.device] = 'cpu') -> torch.Tensor:
    """``num_steps`` noise levels from sigma_max down to sigma_min, evenly spaced in sigma**(1/rho).

    float64. A single step starts at sigma_max (the reference formula divides 0 by 0 there).
    """
    fraction = step_fractions(num_steps, device)
    top = sigma_max ** (1.0 / rho)
    bottom = sigma_min ** (1.0 / rho)
    return (top + fraction * (bottom - top)) ** rho


def log_snr_noise_levels(num_steps: int, sigma_min: float, sigma_max: float,
                         device: Union[str, torch.device] = 'cpu') -> torch.Tensor:
    """``num_steps`` noise levels from sigma_max down to sigma_min, evenly spaced in log sigma (float64).

    For the ODE dx/dsigma = (x - D)/sigma the log-SNR is lambda = -log sigma, so these are the "logSNR"
    time steps that DPM-Solver (Lu et al. 2022, section 3.3) recommends for few-step sampling: every step
    has the same size h in lambda. A single step starts at sigma_max.
    """
    fraction = step_fractions(num_steps, device)
    top, bottom = math.log(sigma_max), math.log(sigma_min)
    return (top + fraction * (bottom - top)).exp()


def noise_levels(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0, spacing: str = 'edm',
                 device: Union[str, torch.device] = 'cpu') -> torch.Tensor:
    """Decreasing noise levels sigma_max .. sigma_min (float64 [num_steps]) with the given ``spacing``.

    'edm': :func:`edm_noise_levels` (Karras et al. 2022, eq. 5, exponent ``rho``); 'logsnr':
    :func:`log_snr_noise_levels` (uniform in log sigma, ``rho`` unused). Raises ValueError for other names.
    """
    if spacing == 'edm':
        return edm_noise_levels(num_steps, sigma_min, sigma_max, rho, device)
    if spacing == 'logsnr':
        return log_snr_noise_levels(num_steps, sigma_min, sigma_max, device)
    raise ValueError(f'spacing must be one of {"|".join(SPACINGS)}, got {spacing!r}')


def edm_time_steps(net: Denoiser, num_steps: int = 18, sigma_min: float = EDM_SIGMA_MIN,
                   sigma_max: float = EDM_SIGMA_MAX, rho: float = 7.0,
                   device: Union[str, torch.device] = 'cpu', spacing: str = 'edm') -> torch.Tensor:
    """The EDM sampler's noise levels: clamped to the network's range, rounded by it, then a final 0.

    ``spacing`` picks how the levels are spaced (:func:`noise_levels`); 'edm' is the EDM sampler's rule.
    """
    lo = max(sigma_min, net.sigma_min)
    hi = min(sigma_max, net.sigma_max)
    if not lo < hi:  # the levels would rise: every image would come out of a reversed ODE
        raise ValueError(f'sigma_min={sigma_min:g} must be below sigma_max={hi:g} (the network samples sigma in '
                         f'[{float(net.sigma_min):g}, {float(net.sigma_max):g}])')
    levels = net.round_sigma(noise_levels(num_steps, lo, hi, rho, spacing, device))
    levels = torch.as_tensor(levels, dtype=torch.float64, device=device)
    return torch.cat([levels, levels.new_zeros(1)])


def check_steps(num_steps: int) -> None:
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f'num_steps must be a positive integer, got {num_steps!r}')


def place_level(t_steps: torch.Tensor, level: float) -> tuple[torch.Tensor, int]:
    """Move the interior time step nearest to ``level`` (in log sigma) onto it; returns (new steps, its index).

    Interior: neither the first level nor the last positive one (sigma_min stays where it is) nor a final 0.
    The Restart paper instead moves t_min to the nearest time step; moving the step keeps the restart interval
    exactly where the user put it, so the sampler's output converges as the steps grow. The nearest step is one
    whose neighbours enclose ``level``, so the levels stay decreasing. Raises ValueError when there is no
    interior level or ``level`` is out of range.
    """
    positive = int((t_steps > 0).sum())
    if positive < 3:
        raise ValueError('need at least 3 noise levels to place one between the first and the last')
    if not float(t_steps[positive - 1]) < level < float(t_steps[0]):
        raise ValueError(f'level {level:g} lies outside ({float(t_steps[positive - 1]):g}, {float(t_steps[0]):g})')
    distance = (t_steps[1:positive - 1].log() - math.log(level)).abs()
    index = int(distance.argmin()) + 1
    placed = t_steps.clone()
    placed[index] = level
    return placed, index
