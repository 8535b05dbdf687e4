"""EDM's samplers (Karras et al. 2022): the Heun sampler of Algorithm 2 with optional churn, and the generalised
sampler of the paper's ablations (solver, time-step discretisation, noise schedule, signal scaling).

With a finite ``D`` (PFGM++, Xu et al. 2023) :func:`edm_sampler` integrates the same ODE dx/dsigma = (x - D(x))/sigma
from PFGM++ prior latents. Sampler state is float64 throughout.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from training import pfgmpp as pfgmpp_lib
# The VP schedule and the iDDPM grid are defined once, beside the preconditioners that share them.
from training.networks import iddpm_noise_levels, vp_sigma, vp_sigma_inv
from sampling.schedules import (Denoiser, EDM_DEFAULT_RANGE, EDM_SIGMA_MAX, EDM_SIGMA_MIN, IDDPM_DEFAULT_RANGE, NoiseFn,
                                VE_DEFAULT_RANGE, VP_PAPER_BETA_D, VP_PAPER_BETA_MIN, check_steps, step_fractions,
                                edm_noise_levels, edm_time_steps)


# Churn never inflates the noise level by more than this factor minus one (EDM, Algorithm 2).
MAX_CHURN_GAMMA = math.sqrt(2.0) - 1.0


SOLVERS = ('euler', 'heun')


DISCRETIZATIONS = ('vp', 've', 'iddpm', 'edm')


SCHEDULES = ('vp', 've', 'linear')


SCALINGS = ('vp', 'none')


def heun_step(net: Denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
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
    check_steps(num_steps)
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
        x = heun_step(net, x_hat, sigma_hat, sigma_next, class_labels, second_order=i < num_steps - 1)

        if trajectory is not None:
            trajectory[i] = x

    return (x, trajectory) if trajectory is not None else x


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
    check_steps(num_steps)
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
    fraction = step_fractions(num_steps, device)
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
