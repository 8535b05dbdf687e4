"""Samplers for EDM-style denoisers and PFGM++ networks.

Every sampler takes any callable ``net(x, sigma, class_labels)`` that returns the
denoised estimate D(x; sigma) and exposes the network interface (:class:`Denoiser`):
``img_resolution``, ``img_channels``, ``label_dim``, ``sigma_min``, ``sigma_max``
and ``round_sigma(sigma)``. The preconditioned networks of ``training.networks``
qualify, and so does any user-written denoiser with those attributes.

* :func:`edm_sampler` -- the EDM sampler (Karras et al. 2022, Algorithm 2):
  rho-spaced noise levels, Heun's method except on the final step, optional churn.
  With a finite ``D`` (PFGM++) it integrates the same ODE from PFGM++ prior latents.
* :func:`ablation_sampler` -- the generalised sampler of the EDM paper's
  ablations (solver, discretisation, noise schedule and signal scaling).
* :class:`PerSeedRandom` and :func:`generate_images` -- per-seed randomness and the
  seeds -> latents -> sampler -> uint8 pipeline shared by ``generate.py`` and ``fid.py``.

Sampler state is float64 throughout; the network is evaluated in whatever dtype it
casts its input to. All randomness comes from per-sample generators, so an image
depends only on its seed.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence, Union

import torch

from training import pfgmpp as pfgmpp_lib
# The VP schedule and the iDDPM grid are defined once, beside the preconditioners that share them.
from training.networks import iddpm_noise_levels, vp_sigma, vp_sigma_inv

# ----------------------------------------------------------------------------
# Interfaces and constants.


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

# Churn never inflates the noise level by more than this factor minus one (EDM, Algorithm 2).
MAX_CHURN_GAMMA = math.sqrt(2.0) - 1.0

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

SOLVERS = ('euler', 'heun')
DISCRETIZATIONS = ('vp', 've', 'iddpm', 'edm')
SCHEDULES = ('vp', 've', 'linear')
SCALINGS = ('vp', 'none')

# Steps of the EDM sampler when none are given (EDM's CIFAR-10 setting, 35 NFE with Heun).
DEFAULT_STEPS = 18
# Solvers beyond the ablation sampler's, valid for every network (PFGM++ or diffusion); see fast_sampler.
FAST_SOLVERS = ('dpmpp2m', 'dpmpp3m', 'restart')
ALL_SOLVERS = SOLVERS + FAST_SOLVERS
# Order of the DPM-Solver++ multistep methods, and the fewest --steps at which each reaches it: order - 1
# warm-up steps, one step at full order, and the final step to sigma = 0.
MULTISTEP_ORDER = {'dpmpp2m': 2, 'dpmpp3m': 3}
MIN_STEPS = {'dpmpp2m': 3, 'dpmpp3m': 4, 'restart': 3}
# How the noise levels are spaced (EDM sampler and fast solvers).
SPACINGS = ('edm', 'logsnr')
# Restart sampling defaults: the restart interval [t_min, t_max], the number of restarts K and the Heun
# steps per restart (N_restart - 1), as in the Restart paper's released PFGM++ CIFAR-10 setting (Xu et al. 2023,
# "Restart Sampling for Improving Generative Processes": 18 main steps, [0.14, 0.30], K = 2, N_restart = 3).
RESTART_INTERVAL = (0.14, 0.30)
RESTART_REPEATS = 2
RESTART_STEPS = 2


# ----------------------------------------------------------------------------
# Per-seed randomness.


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


# ----------------------------------------------------------------------------
# EDM sampler.


def _step_fractions(num_steps: int, device: Union[str, torch.device]) -> torch.Tensor:
    """i / (num_steps - 1) for i = 0 .. num_steps - 1 (float64); all zeros for a single step."""
    index = torch.arange(num_steps, dtype=torch.float64, device=device)
    return index / (num_steps - 1) if num_steps > 1 else torch.zeros_like(index)


def edm_noise_levels(num_steps: int, sigma_min: float, sigma_max: float, rho: float,
                     device: Union[str, torch.device] = 'cpu') -> torch.Tensor:
    """``num_steps`` noise levels from sigma_max down to sigma_min, evenly spaced in sigma**(1/rho).

    float64. A single step starts at sigma_max (the reference formula divides 0 by 0 there).
    """
    fraction = _step_fractions(num_steps, device)
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
    fraction = _step_fractions(num_steps, device)
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
    levels = net.round_sigma(noise_levels(num_steps, lo, hi, rho, spacing, device))
    levels = torch.as_tensor(levels, dtype=torch.float64, device=device)
    return torch.cat([levels, levels.new_zeros(1)])


def _check_steps(num_steps: int) -> None:
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f'num_steps must be a positive integer, got {num_steps!r}')


def _heun_step(net: Denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
               class_labels: Optional[torch.Tensor], second_order: bool) -> torch.Tensor:
    """One step of the ODE dx/dsigma = (x - D(x; sigma))/sigma from sigma to sigma_next (float64 state).

    Euler's method, plus Heun's trapezoidal correction when ``second_order`` (EDM, Algorithm 1); 1 or 2 NFE.
    """
    slope = (x - net(x, sigma, class_labels).to(torch.float64)) / sigma
    step = sigma_next - sigma
    x_next = x + step * slope
    if second_order:
        slope_next = (x_next - net(x_next, sigma_next, class_labels).to(torch.float64)) / sigma_next
        x_next = x + step * (0.5 * slope + 0.5 * slope_next)
    return x_next


def edm_sampler(
    net: Denoiser,
    latents: torch.Tensor,
    class_labels: Optional[torch.Tensor] = None,
    randn_like: NoiseFn = torch.randn_like,
    num_steps: int = 18,
    sigma_min: float = EDM_SIGMA_MIN,
    sigma_max: float = EDM_SIGMA_MAX,
    rho: float = 7.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float('inf'),
    S_noise: float = 1.0,
    D: Optional[float] = None,
    noise_injection: float = 0.0,
    return_trajectory: bool = False,
    spacing: str = 'edm',
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """EDM sampler (Algorithm 2 of Karras et al. 2022); returns float64 samples.

    ``latents`` are unit-variance Gaussian draws for diffusion networks (``D`` None or inf; scaled
    here by the first noise level) or, for a finite ``D``, PFGM++ prior samples
    that already carry their radius and are used as the starting point unchanged.

    ``randn_like`` supplies the churn noise and the injected noise; pass
    :meth:`PerSeedRandom.randn_like` for seed-determined results. Churn noise is
    drawn at every step whenever any step churns (as the reference does, so the
    stochastic sequence matches it) and not at all otherwise.

    ``noise_injection`` (alpha of the PFGM++ robustness study) adds
    ``alpha * t_i * randn`` to the state at the start of every step i, drawn just
    before that step's churn noise.

    With ``return_trajectory`` also returns the state after each step, ``[num_steps, *latents.shape]``.
    ``spacing`` 'logsnr' replaces the rho-spaced noise levels (:func:`noise_levels`).
    """
    _check_steps(num_steps)
    t_steps = edm_time_steps(net, num_steps, sigma_min, sigma_max, rho, device=latents.device, spacing=spacing)
    churn = min(S_churn / num_steps, MAX_CHURN_GAMMA)
    gammas = [churn if S_min <= t <= S_max else 0.0 for t in t_steps[:-1].tolist()]
    draw_churn_noise = any(g > 0 for g in gammas)

    x = latents.to(torch.float64)
    if pfgmpp_lib.is_diffusion(D):
        x = x * t_steps[0]
    trajectory = x.new_zeros((num_steps, *x.shape)) if return_trajectory else None

    for i, (sigma_cur, sigma_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        if noise_injection:
            x = x + noise_injection * sigma_cur * randn_like(x)

        # Churn: raise the noise level to sigma_hat by adding fresh noise.
        sigma_hat = torch.as_tensor(net.round_sigma(sigma_cur + gammas[i] * sigma_cur), dtype=torch.float64,
                                    device=x.device)
        x_hat = x
        if draw_churn_noise:
            extra_std = (sigma_hat ** 2 - sigma_cur ** 2).sqrt() * S_noise
            x_hat = x + extra_std * randn_like(x)

        # Heun step from sigma_hat to sigma_next; Euler on the last step, where sigma_next = 0.
        x = _heun_step(net, x_hat, sigma_hat, sigma_next, class_labels, second_order=i < num_steps - 1)

        if trajectory is not None:
            trajectory[i] = x

    return (x, trajectory) if trajectory is not None else x


# ----------------------------------------------------------------------------
# Generalised ablation sampler.


class _Schedule:
    """A noise schedule sigma(t) with its derivative and inverse, and a signal scaling s(t)."""

    def __init__(self, schedule: str, scaling: str, vp_beta_d: float, vp_beta_min: float):
        self.schedule, self.scaling = schedule, scaling
        self.beta_d, self.beta_min = vp_beta_d, vp_beta_min

    # sigma(t), sigma'(t), sigma^-1(sigma) ----------------------------------
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        if self.schedule == 'vp':
            return vp_sigma(t, self.beta_d, self.beta_min)
        if self.schedule == 've':
            return t.sqrt()
        return t

    def sigma_deriv(self, t: torch.Tensor) -> torch.Tensor:
        if self.schedule == 'vp':
            sig = self.sigma(t)
            return 0.5 * (self.beta_min + self.beta_d * t) * (sig + 1.0 / sig)
        if self.schedule == 've':
            return 0.5 / t.sqrt()
        return torch.ones_like(t)

    def sigma_inv(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.schedule == 'vp':
            return vp_sigma_inv(sigma, self.beta_d, self.beta_min)
        if self.schedule == 've':
            return sigma ** 2
        return sigma

    # s(t), s'(t) -------------------------------------------------------------
    def scale(self, t: torch.Tensor) -> torch.Tensor:
        if self.scaling == 'vp':
            return 1.0 / (1.0 + self.sigma(t) ** 2).sqrt()
        return torch.ones_like(t)

    def scale_deriv(self, t: torch.Tensor) -> torch.Tensor:
        if self.scaling == 'vp':
            return -self.sigma(t) * self.sigma_deriv(t) * self.scale(t) ** 3
        return torch.zeros_like(t)

    def ode_slope(self, x: torch.Tensor, t: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        """dx/dt of the probability-flow ODE (EDM paper, eq. 4) given D(x/s; sigma)."""
        sig, dsig = self.sigma(t), self.sigma_deriv(t)
        s, ds = self.scale(t), self.scale_deriv(t)
        return (dsig / sig + ds / s) * x - dsig * s / sig * denoised


def ablation_sampler(
    net: Denoiser,
    latents: torch.Tensor,
    class_labels: Optional[torch.Tensor] = None,
    randn_like: NoiseFn = torch.randn_like,
    num_steps: int = 18,
    sigma_min: Optional[float] = None,
    sigma_max: Optional[float] = None,
    rho: float = 7.0,
    solver: str = 'heun',
    discretization: str = 'edm',
    schedule: str = 'linear',
    scaling: str = 'none',
    epsilon_s: float = 1e-3,
    C_1: float = 0.001,
    C_2: float = 0.008,
    M: int = 1000,
    alpha: float = 1.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float('inf'),
    S_noise: float = 1.0,
    noise_injection: float = 0.0,
) -> torch.Tensor:
    """The EDM paper's generalised sampler (its Algorithm 1 and the ablations of its section 3).

    ``solver`` euler|heun (``alpha`` places Heun's intermediate point, 1 = classic
    Heun), ``discretization`` vp|ve|iddpm|edm picks the noise levels, ``schedule``
    vp|ve|linear the function sigma(t) and ``scaling`` vp|none the signal scale
    s(t). Default noise ranges and constants are the EDM paper's (VP:
    beta_d = 19.9, beta_min = 0.1). Returns float64 samples.

    As in :func:`edm_sampler`, churn noise is drawn at every step whenever any
    step churns, and ``noise_injection`` adds ``alpha_inj * sigma(t_i) * s(t_i) * randn``
    before each step.
    """
    for name, value, allowed in (('solver', solver, SOLVERS), ('discretization', discretization, DISCRETIZATIONS),
                                 ('schedule', schedule, SCHEDULES), ('scaling', scaling, SCALINGS)):
        if value not in allowed:
            raise ValueError(f'{name} must be one of {"|".join(allowed)}, got {value!r}')
    _check_steps(num_steps)
    if not alpha > 0:
        raise ValueError(f'alpha must be positive, got {alpha!r}')
    device = latents.device

    # Default range per discretisation, then the network's own limits.
    if sigma_min is None:
        sigma_min = {'vp': vp_sigma(epsilon_s, VP_PAPER_BETA_D, VP_PAPER_BETA_MIN), 've': VE_DEFAULT_RANGE[0],
                     'iddpm': IDDPM_DEFAULT_RANGE[0], 'edm': EDM_DEFAULT_RANGE[0]}[discretization]
    if sigma_max is None:
        sigma_max = {'vp': vp_sigma(1.0, VP_PAPER_BETA_D, VP_PAPER_BETA_MIN), 've': VE_DEFAULT_RANGE[1],
                     'iddpm': IDDPM_DEFAULT_RANGE[1], 'edm': EDM_DEFAULT_RANGE[1]}[discretization]
    sigma_min, sigma_max = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)

    # VP constants that make sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max.
    log_top = math.log(sigma_max ** 2 + 1)
    vp_beta_d = 2 * (math.log(sigma_min ** 2 + 1) / epsilon_s - log_top) / (epsilon_s - 1)
    vp_beta_min = log_top - 0.5 * vp_beta_d

    # Noise levels of the chosen discretisation.
    fraction = _step_fractions(num_steps, device)
    if discretization == 'vp':
        sigma_steps = vp_sigma(1 + fraction * (epsilon_s - 1), vp_beta_d, vp_beta_min)
    elif discretization == 've':
        sigma_steps = (sigma_max ** 2 * (sigma_min ** 2 / sigma_max ** 2) ** fraction).sqrt()
    elif discretization == 'iddpm':
        u = iddpm_noise_levels(M, C_1, C_2, device)
        in_range = u[(u >= sigma_min) & (u <= sigma_max)]
        sigma_steps = in_range[((len(in_range) - 1) * fraction).round().to(torch.int64)]
    else:
        sigma_steps = edm_noise_levels(num_steps, sigma_min, sigma_max, rho, device)

    sched = _Schedule(schedule, scaling, vp_beta_d, vp_beta_min)
    rounded = torch.as_tensor(net.round_sigma(sigma_steps), dtype=torch.float64, device=device)
    t_steps = torch.cat([sched.sigma_inv(rounded), rounded.new_zeros(1)])

    churn = min(S_churn / num_steps, MAX_CHURN_GAMMA)
    sigma_at = [sched.sigma(t) for t in t_steps[:-1]]
    gammas = [churn if S_min <= float(sig) <= S_max else 0.0 for sig in sigma_at]
    draw_churn_noise = any(g > 0 for g in gammas)

    x = latents.to(torch.float64) * (sched.sigma(t_steps[0]) * sched.scale(t_steps[0]))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        sig_cur, s_cur = sigma_at[i], sched.scale(t_cur)
        if noise_injection:
            x = x + noise_injection * sig_cur * s_cur * randn_like(x)

        # Churn in sigma space, mapped back to time.
        sig_hat = torch.as_tensor(net.round_sigma(sig_cur + gammas[i] * sig_cur), dtype=torch.float64, device=device)
        t_hat = sched.sigma_inv(sig_hat)
        s_hat = sched.scale(t_hat)
        x_hat = s_hat / s_cur * x
        if draw_churn_noise:
            extra_std = (sched.sigma(t_hat) ** 2 - sig_cur ** 2).clip(min=0).sqrt() * s_hat * S_noise
            x_hat = x_hat + extra_std * randn_like(x)

        # Euler step (to an intermediate point when alpha != 1).
        h = t_next - t_hat
        denoised = net(x_hat / s_hat, sched.sigma(t_hat), class_labels).to(torch.float64)
        slope = sched.ode_slope(x_hat, t_hat, denoised)
        last_step = i == num_steps - 1
        if last_step or solver == 'euler':
            x = x_hat + h * slope
            continue

        # Heun: evaluate at x_hat + alpha h slope, then blend the two slopes.
        t_mid = t_hat + alpha * h
        x_mid = x_hat + alpha * h * slope
        s_mid = sched.scale(t_mid)
        denoised_mid = net(x_mid / s_mid, sched.sigma(t_mid), class_labels).to(torch.float64)
        slope_mid = sched.ode_slope(x_mid, t_mid, denoised_mid)
        weight_mid = 1.0 / (2.0 * alpha)
        x = x_hat + h * ((1.0 - weight_mid) * slope + weight_mid * slope_mid)

    return x


# ----------------------------------------------------------------------------
# Fast solvers: DPM-Solver++ multistep and Restart, for any D.
#
# In sigma, the probability-flow ODE of PFGM++ is EDM's, dx/dsigma = (x - D(x; sigma))/sigma, for every D
# (Xu et al. 2023, PFGM++, section 4): only the prior differs. So the solvers below serve every network.

RenoiseFn = Callable[[torch.Tensor, float], torch.Tensor]


def _log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """lambda = -log sigma, the log signal-to-noise ratio of the EDM parametrisation (alpha = 1)."""
    return -sigma.log()


def _dpmpp_step(x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, denoised: torch.Tensor,
                history: Sequence[tuple[torch.Tensor, torch.Tensor]], order: int) -> torch.Tensor:
    """One DPM-Solver++ multistep update (data prediction, Lu et al. 2022, arXiv:2211.01095).

    The exact solution in lambda = -log sigma is x(l + h) = e^-h x(l) + integral_0^h e^(u-h) D(l + u) du
    (variation of constants). D is replaced by the polynomial through ``denoised`` at lambda(sigma) and the
    ``history`` (pairs (lambda_j, D_j), newest first), of degree ``order - 1`` at most:

    * order 1 (DDIM; equal to an Euler step in sigma): D constant.
    * order 2, DPM-Solver++(2M), the paper's Algorithm 2: D_eff = (1 + 1/(2r)) D_0 - 1/(2r) D_1 with
      r = h_1 / h, integrated as a constant.
    * order 3: the quadratic through D_0, D_1, D_2 integrated exactly,
      D_0 J_0 + D'(0) J_1 + (D''(0)/2) J_2 with J_k = integral_0^h e^(u-h) u^k du, i.e. J_0 = 1 - e^-h,
      J_1 = h - J_0, J_2 = h^2 - 2 J_1. (The third-order multistep update of the DPM-Solver code base weights
      its second difference D2 = h^2 D''/2 by -phi_3 = J_2 / (2 h^2), half of the exact J_2 / h^2; that
      leaves a local error of order h^3 and makes it a second-order method. ``python -m bench.solver_lab``
      measures the order of this implementation.)

    A step to sigma_next = 0 returns ``denoised`` (the limit of every order: e^-h = 0, J_0 = 1).
    """
    if float(sigma_next) == 0:
        return denoised
    lam, lam_next = _log_snr(sigma), _log_snr(sigma_next)
    h = lam_next - lam
    j0 = -torch.expm1(-h)
    x_next = (sigma_next / sigma) * x + j0 * denoised
    if order < 2 or not history:
        return x_next
    lam_1, denoised_1 = history[0]
    h_1 = lam - lam_1
    if order == 2 or len(history) < 2:
        r = h_1 / h
        return x_next + j0 / (2 * r) * (denoised - denoised_1)
    lam_2, denoised_2 = history[1]
    h_2 = lam_1 - lam_2
    # Newton divided differences of D in lambda; the quadratic's derivatives at the current point follow.
    first_01 = (denoised - denoised_1) / h_1
    first_12 = (denoised_1 - denoised_2) / h_2
    second = (first_01 - first_12) / (h_1 + h_2)
    slope = first_01 + second * h_1
    j1 = h - j0
    j2 = h * h - 2 * j1
    return x_next + j1 * slope + j2 * second


def _rk4_step(net: Denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
              class_labels: Optional[torch.Tensor]) -> torch.Tensor:
    """Classical 4th-order Runge-Kutta step in s = log sigma, where dx/ds = x - D(x; e^s); 4 NFE.

    For reference solutions (``solve_ode(..., solver='rk4')``): independent of the solvers under test.
    """
    s, s_next = sigma.log(), sigma_next.log()
    h = s_next - s
    sigma_mid = (0.5 * (s + s_next)).exp()

    def slope(point: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return point - net(point, level, class_labels).to(torch.float64)
    k1 = slope(x, sigma)
    k2 = slope(x + 0.5 * h * k1, sigma_mid)
    k3 = slope(x + 0.5 * h * k2, sigma_mid)
    k4 = slope(x + h * k3, sigma_next)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


ODE_SOLVERS = ('euler', 'heun', 'dpmpp2m', 'dpmpp3m', 'rk4')


def solve_ode(net: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
              solver: str = 'heun') -> torch.Tensor:
    """Integrate dx/dsigma = (x - D(x; sigma))/sigma along the noise levels ``sigmas``; returns x at sigmas[-1].

    x: float64 [B, ...] at sigmas[0]. sigmas: decreasing float64 levels > 0, optionally ending with one 0.
    solver: 'euler' (1 NFE per step), 'heun' (2, EDM's Algorithm 1), 'dpmpp2m' / 'dpmpp3m' (1,
    :func:`_dpmpp_step`, lower orders while the history fills) or 'rk4' (4, for reference solutions).
    A step to sigma = 0 is an Euler step, i.e. it returns D(x; sigma) (every solver: the ODE's slope has no
    limit there). Raises ValueError for an unknown solver or a grid that is not decreasing.
    """
    if solver not in ODE_SOLVERS:
        raise ValueError(f'solver must be one of {"|".join(ODE_SOLVERS)}, got {solver!r}')
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64, device=x.device)
    if sigmas.ndim != 1 or not bool((sigmas[1:] < sigmas[:-1]).all()) or float(sigmas.min()) < 0:
        raise ValueError('sigmas must be a decreasing 1-D sequence of noise levels >= 0')
    x = x.to(torch.float64)
    history: list[tuple[torch.Tensor, torch.Tensor]] = []
    order = MULTISTEP_ORDER.get(solver, 1)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        final = float(sigma_next) == 0
        if solver in MULTISTEP_ORDER:
            denoised = net(x, sigma, class_labels).to(torch.float64)
            x = _dpmpp_step(x, sigma, sigma_next, denoised, history, order)
            history = [(_log_snr(sigma), denoised)] + history[:order - 2]
        elif solver == 'rk4' and not final:
            x = _rk4_step(net, x, sigma, sigma_next, class_labels)
        else:
            x = _heun_step(net, x, sigma, sigma_next, class_labels, second_order=solver != 'euler' and not final)
    return x


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


def restart_ode(net: Denoiser, x: torch.Tensor, t_steps: torch.Tensor, class_labels: Optional[torch.Tensor],
                renoise: RenoiseFn, restart_interval: tuple[float, float] = RESTART_INTERVAL,
                restart_repeats: int = RESTART_REPEATS, restart_steps: int = RESTART_STEPS, rho: float = 7.0,
                spacing: str = 'edm', solver: str = 'heun',
                round_sigma: Callable[[Any], Any] = torch.as_tensor) -> torch.Tensor:
    """Restart sampling (Xu et al. 2023, Algorithm 1) along the main time steps ``t_steps``.

    Solves the ODE with ``solver`` from t_steps[0] down to t_min = restart_interval[0] (a main time step is
    moved onto it, :func:`place_level`), then ``restart_repeats`` times: jumps forward to t_max by adding
    ``renoise(x, sqrt(t_max^2 - t_min^2))`` and solves back to t_min in ``restart_steps`` steps spaced like the
    main ones; then finishes the main steps. ``renoise`` returns noise shaped like x: Gaussian with that
    standard deviation for diffusion, the PFGM++ perturbation kernel at that sigma for finite D (see
    :func:`fast_sampler`). Returns float64 x at t_steps[-1].
    """
    t_min, t_max = (float(v) for v in restart_interval)
    placed, index = place_level(t_steps, float(round_sigma(t_min)))
    low = placed[index]
    x = solve_ode(net, x, placed[:index + 1], class_labels, solver)
    inner = torch.as_tensor(round_sigma(noise_levels(restart_steps + 1, float(low), t_max, rho, spacing,
                                                     x.device)), dtype=torch.float64, device=x.device).clone()
    inner[-1] = low
    jump = math.sqrt(float(inner[0]) ** 2 - float(low) ** 2)
    for _ in range(restart_repeats):
        x = x + renoise(x, jump)
        x = solve_ode(net, x, inner, class_labels, solver)
    return solve_ode(net, x, placed[index:], class_labels, solver)


def check_fast_options(solver: str, num_steps: int = 18, restart_interval: Optional[Sequence[float]] = None,
                       restart_repeats: Optional[int] = None, restart_steps: Optional[int] = None,
                       sigma_min: float = EDM_SIGMA_MIN, sigma_max: float = EDM_SIGMA_MAX) -> None:
    """Raise ValueError (one line) when ``solver`` and its options do not fit together.

    sigma_min / sigma_max: the range the main time steps really span (after clamping to the network's).
    """
    if solver not in FAST_SOLVERS:
        raise ValueError(f'solver must be one of {"|".join(ALL_SOLVERS)}, got {solver!r}')
    _check_steps(num_steps)
    if num_steps < MIN_STEPS[solver]:
        kind = (f'a multistep method of order {MULTISTEP_ORDER[solver]}' if solver in MULTISTEP_ORDER
                else 'it restarts at a time step between the first and the last one')
        raise ValueError(f'{solver} needs at least {MIN_STEPS[solver]} steps ({kind}), got {num_steps}')
    restart_given = [name for name, value in (('restart_interval', restart_interval),
                                              ('restart_repeats', restart_repeats),
                                              ('restart_steps', restart_steps)) if value is not None]
    if solver != 'restart':
        if restart_given:
            raise ValueError(f'{restart_given[0]} only applies to the restart solver, not {solver}')
        return
    if restart_interval is not None:
        if len(restart_interval) != 2:
            raise ValueError(f'restart_interval needs two noise levels t_min,t_max, got {list(restart_interval)}')
        t_min, t_max = (float(v) for v in restart_interval)
        if not (math.isfinite(t_min) and math.isfinite(t_max) and 0 < t_min < t_max):
            raise ValueError(f'restart_interval t_min,t_max must satisfy 0 < t_min < t_max, got {t_min:g},{t_max:g}')
        if not (sigma_min < t_min and t_max <= sigma_max):
            raise ValueError(f'restart_interval {t_min:g},{t_max:g} must lie within the sampled noise range '
                             f'({sigma_min:g}, {sigma_max:g}]')
    for name, value in (('restart_repeats', restart_repeats), ('restart_steps', restart_steps)):
        if value is not None and (int(value) != value or value < 1):
            raise ValueError(f'{name} must be a positive integer, got {value!r}')


def fast_sampler(
    net: Denoiser,
    latents: torch.Tensor,
    class_labels: Optional[torch.Tensor] = None,
    renoise: Optional[RenoiseFn] = None,
    solver: str = 'dpmpp2m',
    num_steps: int = 18,
    sigma_min: float = EDM_SIGMA_MIN,
    sigma_max: float = EDM_SIGMA_MAX,
    rho: float = 7.0,
    spacing: str = 'edm',
    D: Optional[float] = None,
    restart_interval: Optional[Sequence[float]] = None,
    restart_repeats: Optional[int] = None,
    restart_steps: Optional[int] = None,
) -> torch.Tensor:
    """DPM-Solver++ multistep ('dpmpp2m', 'dpmpp3m') or Restart ('restart') sampling; float64 samples.

    Same time steps and starting point as :func:`edm_sampler` (latents scaled by the first level for diffusion,
    PFGM++ prior latents used as they are for a finite ``D``); ``num_steps`` counts time steps, so the NFE
    is ``num_steps`` for DPM-Solver++ and 2*num_steps - 1 + 2*K*restart_steps for Restart
    (:func:`sampler_nfe`). Restart needs ``renoise(x, sigma)``: noise shaped like x at noise level sigma
    drawn from the network's perturbation kernel (:meth:`PerSeedRandom.perturbation`). Restart options left
    None take the paper's defaults (:data:`RESTART_INTERVAL`, :data:`RESTART_REPEATS`, :data:`RESTART_STEPS`).
    Raises ValueError for options out of range (:func:`check_fast_options`).
    """
    lo, hi = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    check_fast_options(solver, num_steps, restart_interval, restart_repeats, restart_steps, lo, hi)
    t_steps = edm_time_steps(net, num_steps, sigma_min, sigma_max, rho, device=latents.device, spacing=spacing)
    x = latents.to(torch.float64)
    if pfgmpp_lib.is_diffusion(D):
        x = x * t_steps[0]
    if solver != 'restart':
        return solve_ode(net, x, t_steps, class_labels, solver)
    if renoise is None:
        raise ValueError('the restart solver needs a renoise function')
    return restart_ode(net, x, t_steps, class_labels, renoise,
                       restart_interval=tuple(restart_interval or RESTART_INTERVAL),
                       restart_repeats=int(restart_repeats or RESTART_REPEATS),
                       restart_steps=int(restart_steps or RESTART_STEPS), rho=rho, spacing=spacing,
                       round_sigma=net.round_sigma)


ABLATION_OPTIONS = ('solver', 'discretization', 'schedule', 'scaling')
RESTART_OPTIONS = ('restart_interval', 'restart_repeats', 'restart_steps')


def uses_ablation_sampler(sampler_kwargs: dict) -> bool:
    """True when the options name any ablation axis (then :func:`ablation_sampler` is used, as in EDM's CLI).

    ``solver`` counts only as euler|heun; the fast solvers (:data:`FAST_SOLVERS`) select :func:`fast_sampler`.
    """
    if sampler_kwargs.get('solver') in FAST_SOLVERS:
        return False
    return any(sampler_kwargs.get(key) is not None for key in ABLATION_OPTIONS)


def sampler_name(sampler_kwargs: dict) -> str:
    """Which sampler the options select: 'edm', 'ablation', 'dpmpp2m', 'dpmpp3m' or 'restart'.

    Raises ValueError (one line) for combinations that do not fit: an unknown solver, ablation axes or churn
    with a fast solver, restart options without the restart solver, ``spacing`` with the ablation sampler
    (which spaces its steps by ``discretization``), noise injection with a fast solver.
    """
    kwargs = {k: v for k, v in sampler_kwargs.items() if v is not None}
    solver = kwargs.get('solver')
    if solver is not None and solver not in ALL_SOLVERS:
        raise ValueError(f'unknown solver {solver!r}; expected one of {"|".join(ALL_SOLVERS)}')
    if solver not in FAST_SOLVERS:
        restart = [key for key in RESTART_OPTIONS if key in kwargs]
        if restart:
            raise ValueError(f'{restart[0]} only applies to the restart solver')
        if uses_ablation_sampler(kwargs):
            if 'spacing' in kwargs:
                raise ValueError('spacing applies to the EDM sampler and the fast solvers; the ablation sampler '
                                 '(solver euler|heun, discretization, schedule, scaling) spaces its steps by '
                                 'discretization')
            return 'ablation'
        return 'edm'
    ablation = [key for key in ABLATION_OPTIONS[1:] if key in kwargs]
    if ablation:
        raise ValueError(f'{ablation[0]} belongs to the ablation sampler (solver euler|heun), not to {solver}')
    if kwargs.get('S_churn', 0) > 0:
        raise ValueError(f'churn (S_churn > 0) belongs to the EDM sampler, not to {solver}')
    if kwargs.get('noise_injection', 0) > 0:
        raise ValueError(f'noise_injection is implemented for the EDM and ablation samplers, not for {solver}')
    return solver


def sampler_nfe(num_steps: int, sampler_kwargs: dict) -> int:
    """Network evaluations per image for ``num_steps`` time steps with these sampler options.

    EDM / ablation Heun: 2 per step except the last; Euler and DPM-Solver++: 1 per step; Restart: Heun's
    count plus 2 * restart_steps per restart.
    """
    name = sampler_name(sampler_kwargs)
    solver = sampler_kwargs.get('solver')
    if name in MULTISTEP_ORDER or (name == 'ablation' and solver == 'euler'):
        return num_steps
    heun = 2 * num_steps - 1
    if name == 'restart':
        repeats = sampler_kwargs.get('restart_repeats') or RESTART_REPEATS
        steps = sampler_kwargs.get('restart_steps') or RESTART_STEPS
        return heun + 2 * repeats * steps
    return heun


# ----------------------------------------------------------------------------
# Seeds -> images.


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map samples in [-1, 1] to uint8 like the reference: (x * 127.5 + 128) clipped, then truncated."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


def draw_latents(net: Denoiser, seeds: Sequence[int], rnd: PerSeedRandom, D: Optional[float] = None,
                 sigma_max: float = EDM_SIGMA_MAX) -> torch.Tensor:
    """The starting latents for ``seeds``: unit Gaussians from ``rnd`` (D None/inf), or the PFGM++ prior.

    The PFGM++ prior comes from ``training.pfgmpp`` (radius rule and bit-exact draws
    of the reference), whose private generators leave ``rnd`` untouched for the
    labels and in-loop noise that follow.
    """
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    if pfgmpp_lib.is_diffusion(D):
        return rnd.randn(shape)
    prior_sigma = min(sigma_max, net.sigma_max)
    return pfgmpp_lib.prior_latents(list(seeds), shape, D=D, sigma_max=prior_sigma, device=rnd.device)


def draw_class_labels(net: Denoiser, rnd: PerSeedRandom, class_idx: Optional[int] = None) -> Optional[torch.Tensor]:
    """One-hot labels drawn from the per-seed generators (conditional networks only).

    The random draw happens even when ``class_idx`` fixes the label, as in the
    reference, so the generators advance identically either way.
    """
    if not net.label_dim:
        if class_idx is not None:
            raise ValueError(f'class_idx={class_idx} given, but the network is unconditional (label_dim = 0)')
        return None
    if class_idx is not None and not 0 <= class_idx < net.label_dim:
        raise ValueError(f'class_idx={class_idx} is out of range; the network has {net.label_dim} classes')
    eye = torch.eye(net.label_dim, device=rnd.device)
    labels = eye[rnd.randint(net.label_dim)]
    if class_idx is not None:
        labels = eye[torch.full([len(rnd)], class_idx, device=rnd.device)]
    return labels


# CPU kernels (oneDNN convolutions, GEMV instead of GEMM) take another code path for a single
# sample, whose float32 results differ in the last bits from any batched call; an image made in a
# batch of one could then differ from the same seed made in a larger batch. Padding such calls to
# this size keeps every image on the batched kernels.
MIN_NETWORK_BATCH = 2


class BatchPadded:
    """The denoiser ``net`` evaluated on at least MIN_NETWORK_BATCH samples per call.

    Calls with fewer samples are padded by repeating the last sample (and its sigma and label, where those are per
    sample), and the padding is cut from the result, so each image comes from the batched kernels whatever the batch
    size. It is a :class:`Denoiser` with ``net``'s attributes and nothing more; the network itself is ``self.net``.
    """

    def __init__(self, net: Denoiser) -> None:
        self.net = net
        self.img_resolution, self.img_channels = net.img_resolution, net.img_channels
        self.label_dim, self.sigma_min, self.sigma_max = net.label_dim, net.sigma_min, net.sigma_max

    def round_sigma(self, sigma: Any) -> torch.Tensor:
        return self.net.round_sigma(sigma)

    def __call__(self, x: torch.Tensor, sigma: Any, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        count = x.shape[0]
        if count >= MIN_NETWORK_BATCH:
            return self.net(x, sigma, class_labels)
        pad = MIN_NETWORK_BATCH - count

        def padded(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t[-1:].expand(pad, *t.shape[1:])])
        labels = padded(class_labels) if class_labels is not None and class_labels.shape[0] == count else class_labels
        sigma_t = torch.as_tensor(sigma)
        if sigma_t.ndim > 0 and sigma_t.shape[0] == count and count > 1:
            sigma = padded(sigma_t)
        return self.net(padded(x), sigma, labels)[:count]


def network_memory_format(net: Any) -> torch.memory_format:
    """channels_last when the network's first 4-D weight is stored that way, else the default layout."""
    if isinstance(net, torch.nn.Module):
        for p in net.parameters():
            if p.ndim == 4:
                channels_last = p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                return torch.channels_last if channels_last else torch.contiguous_format
    return torch.contiguous_format


def sample_batch(net: Denoiser, seeds: Sequence[int], device: Union[str, torch.device] = 'cpu',
                 class_idx: Optional[int] = None, D: Optional[float] = None,
                 memory_format: Optional[torch.memory_format] = None, **sampler_kwargs: Any) -> torch.Tensor:
    """Float64 samples for one batch of seeds, exactly as ``generate.py`` makes them.

    ``D``: the network's kernel, None (or inf) for diffusion, the PFGM++ augmented dimensions otherwise
    (:func:`training.pfgmpp.resolve_D` derives it from a network and the original's flags).

    ``sampler_kwargs`` go to :func:`edm_sampler`, to :func:`ablation_sampler`
    when any of solver (euler|heun)/discretization/schedule/scaling is given, or to :func:`fast_sampler` for
    solver dpmpp2m|dpmpp3m|restart (Restart's noise comes from the per-seed generators, after the labels).
    None values mean
    "use the default" (as click passes unset options). ``memory_format`` is the layout of the sampler state;
    None follows the network's convolution weights (channels_last after ``net.to(memory_format=...)``).
    """
    kwargs = {k: v for k, v in sampler_kwargs.items() if v is not None}
    name = sampler_name(kwargs)
    ablation = name == 'ablation'
    if ablation and not pfgmpp_lib.is_diffusion(D):
        raise ValueError('the ablation sampler (solver/discretization/schedule/scaling) does not support PFGM++ '
                         'networks; use the EDM sampler')
    rnd = PerSeedRandom(seeds, device)
    latents = draw_latents(net, seeds, rnd, D=D, sigma_max=kwargs.get('sigma_max', EDM_SIGMA_MAX))
    # The layout carries through the sampler's elementwise updates into every network call (channels_last nets).
    latents = latents.contiguous(memory_format=memory_format or network_memory_format(net))
    labels = draw_class_labels(net, rnd, class_idx)
    net = BatchPadded(net)
    with torch.no_grad():
        if ablation:
            return ablation_sampler(net, latents, labels, randn_like=rnd.randn_like, **kwargs)
        if name in FAST_SOLVERS:
            # Churn settings are inert without churn (sampler_name refused S_churn > 0).
            fast_kwargs = {k: v for k, v in kwargs.items() if k not in ('S_churn', 'S_min', 'S_max', 'S_noise')}

            def renoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
                return rnd.perturbation(x, sigma, D)
            return fast_sampler(net, latents, labels, renoise=renoise, D=D, **fast_kwargs)
        return edm_sampler(net, latents, labels, randn_like=rnd.randn_like, D=D, **kwargs)


def split_batches(seeds: Sequence[int], max_batch_size: int, num_shards: int = 1) -> list[list[int]]:
    """Split ``seeds`` into batches of at most ``max_batch_size``, with a multiple of ``num_shards`` batches.

    Batch sizes differ by at most one, and every shard (rank) gets the same number of
    batches (some possibly empty), so ranks stay in step.
    """
    if max_batch_size < 1 or num_shards < 1:
        raise ValueError('max_batch_size and num_shards must be at least 1')
    seeds = list(seeds)
    rounds = max(1, math.ceil(len(seeds) / (max_batch_size * num_shards)))
    count = rounds * num_shards
    base, extra = divmod(len(seeds), count)
    batches, start = [], 0
    for b in range(count):
        size = base + (1 if b < extra else 0)
        batches.append(seeds[start:start + size])
        start += size
    return batches


def generate_images(net: Denoiser, seeds: Sequence[int], batch_size: int = 64,
                    device: Union[str, torch.device] = 'cpu', class_idx: Optional[int] = None,
                    D: Optional[float] = None,
                    **sampler_kwargs: Any) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(batch_seeds, images)`` with uint8 NCHW images on ``device``, batch by batch.

    Each image depends only on its seed (not on the batch size or the order), and
    the float -> uint8 conversion is the one ``generate.py`` writes to PNG. The
    caller shards seeds across processes if it wants to.
    """
    for batch_seeds in split_batches(seeds, batch_size):
        if not batch_seeds:
            continue
        images = sample_batch(net, batch_seeds, device=device, class_idx=class_idx, D=D, **sampler_kwargs)
        yield batch_seeds, to_uint8(images)
