"""The exact-answer laboratory: the ideal denoiser of a finite data set, for any D.

For data {y_i} (equal weights), the perturbation kernel p_sigma(x | y) of PFGM++ (or the Gaussian of diffusion)
gives the minimum-MSE denoiser in closed form (Xu et al. 2023, PFGM++, eq. 4 and its stable target field):

    D(x; sigma) = E[y | x, sigma] = sum_i w_i y_i,   w = softmax_i log p_sigma(x | y_i),

with log p = -(N + D)/2 * log(|x - y_i|^2 + sigma^2 D) for finite D and -|x - y_i|^2 / (2 sigma^2) for D = inf.
It is computed by :func:`training.pfgmpp.stable_target_field` (which uses
:func:`training.pfgmpp.kernel_log_weight`), the same code as the ``--stf`` training target, so the
laboratory and the loss share one implementation of the kernel weights.

:class:`ExactDenoiser` wraps it in the network interface of :class:`sampling.schedules.Denoiser` (``img_resolution``,
``img_channels``, ``label_dim``, ``sigma_min``, ``sigma_max``, ``round_sigma``, ``pfgmpp``, ``D``, ``N``), so
``generate.py``, ``fid.py gen`` and every sampler use it like a trained network; pickled inside a snapshot dict's
``ema`` entry (:func:`save_snapshot`) it loads like any snapshot. Because its probability-flow ODE has no model
error, a many-step solution of it is the exact answer a fast solver should reproduce
(``python -m bench.solver_lab``).
"""

from __future__ import annotations

import math
import os
import pickle
from typing import Any, Optional

import torch

import dnnlib
from torch_utils import persistence
from training import pfgmpp as pfgmpp_lib
from sampling import fast_solvers, schedules

# Noise range of the laboratory network when none is given: the EDM/PFGM++ sampling range.
DEFAULT_SIGMA_MIN = schedules.EDM_SIGMA_MIN
DEFAULT_SIGMA_MAX = schedules.EDM_SIGMA_MAX


@persistence.persistent_class
class ExactDenoiser(torch.nn.Module):
    """Ideal denoiser E[y | x, sigma] of the data set ``data`` under the PFGM++ kernel (or the Gaussian).

    data: [M, C, H, W] images (any float dtype; kept as a float64 buffer), H = W.
    D: augmented dimensions; None or ``math.inf`` is diffusion.
    sigma_min, sigma_max: the noise range the samplers are told (the denoiser itself is exact at every sigma > 0).

    ``forward(x, sigma)`` takes x of shape [B, C, H, W] and sigma as a number or one value per sample; it computes
    in float64 and returns the dtype of ``x`` (float64 in, float64 out: exact to float64 rounding). Unconditional:
    ``class_labels`` must be None. Raises ValueError for images of another shape.
    """

    def __init__(self, data: torch.Tensor, D: Optional[float] = None, sigma_min: float = DEFAULT_SIGMA_MIN,
                 sigma_max: float = DEFAULT_SIGMA_MAX) -> None:
        super().__init__()
        if data.ndim != 4 or data.shape[2] != data.shape[3] or data.shape[0] < 1:
            raise ValueError(f'data must have shape [M, C, H, H] with M >= 1, got {tuple(data.shape)}')
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f'need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}')
        D = pfgmpp_lib.check_D(D)
        self.register_buffer('data', data.detach().to(torch.float64).clone())
        self.img_channels = int(data.shape[1])
        self.img_resolution = int(data.shape[2])
        self.label_dim = 0
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.N = self.img_channels * self.img_resolution ** 2
        # The original's pfgmpp flag exists at the interface only; D None is diffusion (training.pfgmpp.check_D).
        self.pfgmpp = D is not None
        self.D = D
        self.evaluations = 0  # forward calls so far (the laboratory counts NFE with it)

    def round_sigma(self, sigma: Any) -> torch.Tensor:
        """Every noise level is supported: returns ``sigma`` as a tensor."""
        return torch.as_tensor(sigma)

    def forward(self, x: torch.Tensor, sigma: Any, class_labels: Optional[torch.Tensor] = None,
                force_fp32: bool = False, **unused_kwargs: Any) -> torch.Tensor:
        if class_labels is not None and class_labels.numel():
            raise ValueError('ExactDenoiser is unconditional; class_labels must be None')
        if tuple(x.shape[1:]) != tuple(self.data.shape[1:]):
            raise ValueError(f'expected images of shape {tuple(self.data.shape[1:])}, got {tuple(x.shape[1:])}')
        sigma = torch.as_tensor(sigma, device=x.device)
        self.evaluations += 1
        return pfgmpp_lib.stable_target_field(x, sigma, self.data, D=self.D)

    def extra_repr(self) -> str:
        return f'M={self.data.shape[0]}, N={self.N}, D={self.D}'


def gaussian_mixture_data(num_points: int, img_channels: int, img_resolution: int, spread: float = 0.5,
                          seed: int = 0) -> torch.Tensor:
    """A small synthetic data set: ``num_points`` images with independent N(0, spread^2) pixels, clipped to [-1, 1].

    float64 [num_points, C, H, H], drawn from a private generator seeded with ``seed``.
    """
    gen = torch.Generator('cpu').manual_seed(int(seed))
    shape = [num_points, img_channels, img_resolution, img_resolution]
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * spread).clamp(-1, 1)


def save_snapshot(net: ExactDenoiser, path: str) -> None:
    """Write ``net`` as a network snapshot ({'ema': net}) that ``generate.py --network`` reads.

    Written under a temporary name and renamed, so a failure leaves no partial file.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with dnnlib.util.atomic_write(path, 'wb') as f:
        pickle.dump(dict(ema=net), f)


def kernel_name(D: Optional[float]) -> str:
    """'inf' for diffusion, else D as an integer string (for tables and file names)."""
    D = pfgmpp_lib.check_D(D)
    return 'inf' if D is None else (str(int(D)) if float(D).is_integer() else f'{D:g}')


def parse_D(text: str) -> Optional[float]:
    """'inf' (or 'none') -> None; a number >= 1 -> float. Raises ValueError otherwise."""
    if text.strip().lower() in ('inf', 'none', 'infinity'):
        return None
    value = float(text)
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f'D must be a number >= 1 or inf, got {text!r}')
    return value


# ----------------------------------------------------------------------------
# Convergence measurements on the laboratory (shared by bench/solver_lab.py and the tests).

LAB_SOLVERS = ('euler', 'heun', 'dpmpp2m', 'dpmpp3m', 'ipndm', 'unipc', 'restart')
# The order each solver is stated to converge at (Euler 1; Heun 2; DPM-Solver++(2M) 2; the 3rd-order multistep
# 3; iPNDM 4, Adams-Bashforth with four slopes; UniPC p + 1, its predictor's order p raised by the corrector;
# Restart's ODE segments are Heun's, 2, pathwise for fixed restart noise).
STATED_ORDER = {'euler': 1, 'heun': 2, 'dpmpp2m': 2, 'dpmpp3m': 3, **{name: fast_solvers.MULTISTEP_ORDER[name]
                                                                      for name in ('ipndm', 'unipc')}, 'restart': 2}
# Restart's steps inside its interval, as a fraction of the main steps, so both refine together.
RESTART_STEP_FRACTION = 4


def lab_latents(seeds: list[int], net: ExactDenoiser) -> torch.Tensor:
    """Starting points at ``net.sigma_max`` as generation draws them (PFGM++ prior for finite D), float64."""
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    return pfgmpp_lib.prior_latents(seeds, shape, net.D, sigma_max=net.sigma_max)


def lab_solution(net: ExactDenoiser, latents: torch.Tensor, seeds: list[int], solver: str, num_steps: int,
                 spacing: str = 'edm', rho: float = 7.0, restart_interval: Optional[tuple[float, float]] = None,
                 restart_repeats: Optional[int] = None, solver_order: Optional[int] = None) -> torch.Tensor:
    """Solve from ``latents`` at sigma_max to sigma_min (no final denoising step) in ``num_steps`` steps.

    solver: one of :data:`LAB_SOLVERS` or 'rk4' (reference); 'restart' solves its ODE segments with Heun and
    uses ``num_steps // RESTART_STEP_FRACTION`` (at least 1) steps per restart; 'restart-rk4' is its reference,
    with RK4 segments. Restart noise comes from per-seed generators, so every step count sees the same draws.
    ``solver_order``: the order of 'ipndm' / 'unipc' (None: their default). Returns float64 x at sigma_min.
    """
    sigmas = schedules.noise_levels(num_steps + 1, net.sigma_min, net.sigma_max, rho, spacing, latents.device)
    if not solver.startswith('restart'):
        return fast_solvers.solve_ode(net, latents, sigmas, solver=solver, order=solver_order)
    rnd = schedules.PerSeedRandom(seeds, latents.device)

    def renoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return rnd.perturbation(x, sigma, net.D)
    return fast_solvers.restart_ode(net, latents, sigmas, None, renoise,
                                restart_interval=restart_interval or fast_solvers.RESTART_INTERVAL,
                                restart_repeats=restart_repeats or fast_solvers.RESTART_REPEATS,
                                restart_steps=max(1, num_steps // RESTART_STEP_FRACTION), rho=rho, spacing=spacing,
                                solver='rk4' if solver == 'restart-rk4' else 'heun')


def rms_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Root mean square of x - reference over all samples and pixels (the lab's error norm)."""
    return float((x.to(torch.float64) - reference.to(torch.float64)).square().mean().sqrt())


def fitted_order(steps: list[int], errors: list[float]) -> float:
    """Convergence order: minus the least-squares slope of log(error) against log(steps). NaN if undefined."""
    points = [(math.log(n), math.log(e)) for n, e in zip(steps, errors) if e > 0]
    if len(points) < 2:
        return math.nan
    mean_x = sum(p[0] for p in points) / len(points)
    mean_y = sum(p[1] for p in points) / len(points)
    covariance = sum((p[0] - mean_x) * (p[1] - mean_y) for p in points)
    variance = sum((p[0] - mean_x) ** 2 for p in points)
    return -covariance / variance
