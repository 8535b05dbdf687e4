"""Training-free solvers for few network evaluations, valid for every network (PFGM++ or diffusion): DPM-Solver++
(2M, 3M; Lu et al. 2022) in sigma form, iPNDM and UniPC (:mod:`sampling.multistep`), RK4 for reference
trajectories, and Restart sampling (Xu et al. 2023).

In sigma the PFGM++ probability-flow ODE is EDM's, so each solver serves every D; only the re-noising of Restart
draws from the network's kernel (passed in as ``renoise``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch

from training import pfgmpp as pfgmpp_lib
from sampling.schedules import (Denoiser, EDM_SIGMA_MAX, EDM_SIGMA_MIN, check_steps, edm_time_steps, noise_levels,
                                place_level)
from sampling.edm import SOLVERS, heun_step
from sampling.multistep import IPNDM_ORDER, UNIPC_ORDER, ipndm_solve, unipc_solve


# Solvers beyond the ablation sampler's, valid for every network (PFGM++ or diffusion); see fast_sampler.
FAST_SOLVERS = ('dpmpp2m', 'dpmpp3m', 'ipndm', 'unipc', 'restart')


ALL_SOLVERS = SOLVERS + FAST_SOLVERS


# Order of the multistep methods (one network evaluation per step). DPM-Solver++ needs order - 1 warm-up steps,
# one step at full order and the final step to sigma = 0, hence its MIN_STEPS; iPNDM and UniPC raise their order
# as the history fills and need one step that uses history (3 steps: one before it, the final one after it).
DPMPP_ORDER = {'dpmpp2m': 2, 'dpmpp3m': 3}


MULTISTEP_ORDER = {**DPMPP_ORDER, 'ipndm': IPNDM_ORDER, 'unipc': UNIPC_ORDER + 1}


# The multistep solvers whose order is a choice (``solver_order``, like diffusers' ``solver_order``): the range of
# orders each accepts (iPNDM: Adams-Bashforth slopes; UniPC: predictor order p, as in diffusers' 1-3) and its
# default. DPM-Solver++ names its order (2M, 3M).
SOLVER_ORDERS = {'ipndm': (1, IPNDM_ORDER), 'unipc': (1, 3)}
DEFAULT_SOLVER_ORDER = {'ipndm': IPNDM_ORDER, 'unipc': UNIPC_ORDER}


MIN_STEPS = {'dpmpp2m': 3, 'dpmpp3m': 4, 'ipndm': 3, 'unipc': 3, 'restart': 3}


# The spacing each fast solver gets when --spacing is not given. The older solvers keep 'edm' so that their images
# do not change (spacing_hint points to the better one where they overshoot). iPNDM gets the spacing with the
# smaller error at 4-12 steps on the exact-denoiser laboratory (1024 images of 8x8, 64 seeds, D = 128 and inf,
# against RK4 in 512 steps): rho-spaced. UniPC (p = 2) gets the rho-spaced levels too: on the trained digits models
# they beat the log-SNR ones at 6-10 NFE (docs/sampling.md), and on the laboratory p = 2 does not overshoot on them.
DEFAULT_SPACING = {'dpmpp2m': 'edm', 'dpmpp3m': 'edm', 'ipndm': 'edm', 'unipc': 'edm', 'restart': 'edm'}


# Step counts at which a solver of an order (None: its default) on a spacing is known to overshoot on the
# laboratory: (solver, order, spacing) -> (fewest, most) steps, and the spacing that does not.
OVERSHOOT = {('dpmpp3m', None, 'edm'): ((4, 8), 'logsnr'), ('unipc', 3, 'edm'): ((4, 8), 'logsnr')}


# Restart sampling defaults: the restart interval [t_min, t_max], the number of restarts K and the Heun
# steps per restart (N_restart - 1), as in the Restart paper's released PFGM++ CIFAR-10 setting (Xu et al. 2023,
# "Restart Sampling for Improving Generative Processes": 18 main steps, [0.14, 0.30], K = 2, N_restart = 3).
RESTART_INTERVAL = (0.14, 0.30)


RESTART_REPEATS = 2


RESTART_STEPS = 2


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


ODE_SOLVERS = ('euler', 'heun', 'dpmpp2m', 'dpmpp3m', 'ipndm', 'unipc', 'rk4')


def solve_ode(net: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
              solver: str = 'heun', order: Optional[int] = None) -> torch.Tensor:
    """Integrate dx/dsigma = (x - D(x; sigma))/sigma along the noise levels ``sigmas``; returns x at sigmas[-1].

    x: float64 [B, ...] at sigmas[0]. sigmas: decreasing float64 levels > 0, optionally ending with one 0.
    solver: 'euler' (1 NFE per step), 'heun' (2, EDM's Algorithm 1), 'dpmpp2m' / 'dpmpp3m' (1,
    :func:`_dpmpp_step`, lower orders while the history fills), 'ipndm' / 'unipc' (1,
    :func:`sampling.multistep.ipndm_solve` / :func:`sampling.multistep.unipc_solve`) or 'rk4' (4, for reference
    solutions). ``order``: the predictor order of 'ipndm' / 'unipc' (:data:`SOLVER_ORDERS`; None: their default).
    A step to sigma = 0 is an Euler step, i.e. it returns D(x; sigma) (every solver: the ODE's slope has no
    limit there). Raises ValueError for an unknown solver, an order it does not take or a grid that is not
    decreasing.
    """
    if solver not in ODE_SOLVERS:
        raise ValueError(f'solver must be one of {"|".join(ODE_SOLVERS)}, got {solver!r}')
    check_solver_order(solver, order)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64, device=x.device)
    if sigmas.ndim != 1 or not bool((sigmas[1:] < sigmas[:-1]).all()) or float(sigmas.min()) < 0:
        raise ValueError('sigmas must be a decreasing 1-D sequence of noise levels >= 0')
    x = x.to(torch.float64)
    if solver in ('ipndm', 'unipc'):
        def denoise(point: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return net(point, sigma, class_labels).to(torch.float64)
        order = DEFAULT_SOLVER_ORDER[solver] if order is None else int(order)
        if solver == 'ipndm':
            return ipndm_solve(denoise, x, sigmas, max_order=order)
        return unipc_solve(denoise, x, sigmas, order=order)
    history: list[tuple[torch.Tensor, torch.Tensor]] = []
    order = DPMPP_ORDER.get(solver, 1)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        final = float(sigma_next) == 0
        if solver in DPMPP_ORDER:
            denoised = net(x, sigma, class_labels).to(torch.float64)
            x = _dpmpp_step(x, sigma, sigma_next, denoised, history, order)
            history = [(_log_snr(sigma), denoised)] + history[:order - 2]
        elif solver == 'rk4' and not final:
            x = _rk4_step(net, x, sigma, sigma_next, class_labels)
        else:
            x = heun_step(net, x, sigma, sigma_next, class_labels, second_order=solver != 'euler' and not final)
    return x


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


def check_solver_order(solver: Optional[str], order: Optional[int]) -> None:
    """Raise ValueError (one line) when ``order`` is given for a solver without a choosable order or lies outside
    its :data:`SOLVER_ORDERS`."""
    if order is None:
        return
    if solver not in SOLVER_ORDERS:
        raise ValueError(f'solver_order applies to the {" and ".join(SOLVER_ORDERS)} solvers, not to '
                         f'{solver or "the EDM sampler"} (dpmpp2m/dpmpp3m name their order)')
    lo, hi = SOLVER_ORDERS[solver]
    if int(order) != order or not lo <= order <= hi:
        raise ValueError(f'solver_order {order!r} for {solver}: expected an integer from {lo} to {hi}')


def check_fast_options(solver: str, num_steps: int = 18, restart_interval: Optional[Sequence[float]] = None,
                       restart_repeats: Optional[int] = None, restart_steps: Optional[int] = None,
                       sigma_min: float = EDM_SIGMA_MIN, sigma_max: float = EDM_SIGMA_MAX,
                       solver_order: Optional[int] = None) -> None:
    """Raise ValueError (one line) when ``solver`` and its options do not fit together.

    sigma_min / sigma_max: the range the main time steps really span (after clamping to the network's).
    ``solver_order``: see :func:`check_solver_order`.
    """
    if solver not in FAST_SOLVERS:
        raise ValueError(f'solver must be one of {"|".join(ALL_SOLVERS)}, got {solver!r}')
    check_solver_order(solver, solver_order)
    check_steps(num_steps)
    if num_steps < MIN_STEPS[solver]:
        if solver in DPMPP_ORDER:
            kind = f'a multistep method of order {MULTISTEP_ORDER[solver]}'
        elif solver in MULTISTEP_ORDER:
            kind = 'a multistep method: one step that uses the history, then the final one'
        else:
            kind = 'it restarts at a time step between the first and the last one'
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


def default_spacing(solver: Optional[str]) -> str:
    """The spacing of the noise levels when none is given: :data:`DEFAULT_SPACING` for a fast solver, else 'edm'
    (the EDM sampler's rule)."""
    return DEFAULT_SPACING.get(solver or '', 'edm')


def spacing_hint(solver: Optional[str], num_steps: int, spacing: Optional[str],
                 solver_order: Optional[int] = None) -> Optional[str]:
    """A one-line hint when ``solver`` (of ``solver_order``, None: its default) on ``spacing`` (None: its default)
    at ``num_steps`` steps is a combination that overshoots on the exact-denoiser laboratory (:data:`OVERSHOOT`);
    None otherwise. It never changes the sampler."""
    spacing = spacing or default_spacing(solver)
    if solver_order is not None and solver_order == DEFAULT_SOLVER_ORDER.get(solver or ''):
        solver_order = None
    known = OVERSHOOT.get((solver or '', solver_order, spacing))
    if known is None:
        return None
    (fewest, most), better = known
    if not fewest <= num_steps <= most:
        return None
    name = solver if solver_order is None else f'{solver} of order {solver_order}'
    return (f'hint: {name} on the {spacing} spacing overshoots at {fewest}-{most} steps (measured against the '
            f'exact ODE solution, bench/solver_lab.py); --spacing={better} is more accurate there')


def check_distinct_levels(net: Denoiser, t_steps: torch.Tensor, num_steps: int, sigma_min: float,
                          sigma_max: float, rho: float, spacing: str) -> None:
    """Raise ValueError (one line naming num_steps and the largest step count that fits) when the network's
    ``round_sigma`` snapped neighbouring levels of ``t_steps`` (float64, decreasing, final 0) onto one value.

    The fast solvers step in log sigma and need every step to lower it. iDDPM networks support only their grid of
    levels (Nichol & Dhariwal 2021), so many steps over a short range repeat levels.
    """
    def distinct(levels: torch.Tensor) -> bool:
        positive = levels[levels > 0]
        return int(torch.unique(positive).numel()) == positive.numel()
    if distinct(t_steps):
        return
    fits = int(torch.unique(t_steps[t_steps > 0]).numel())
    while fits > 1 and not distinct(edm_time_steps(net, fits, sigma_min, sigma_max, rho, spacing=spacing)):
        fits -= 1
    raise ValueError(f'num_steps={num_steps}: the network rounds noise levels to its own grid, which repeats levels '
                     f'in this range; the fast solvers need decreasing levels, so use num_steps <= {fits} or the '
                     f'EDM sampler (no --solver)')


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
    spacing: Optional[str] = None,
    D: Optional[float] = None,
    restart_interval: Optional[Sequence[float]] = None,
    restart_repeats: Optional[int] = None,
    restart_steps: Optional[int] = None,
    solver_order: Optional[int] = None,
) -> torch.Tensor:
    """Multistep ('dpmpp2m', 'dpmpp3m', 'ipndm', 'unipc') or Restart ('restart') sampling; float64 samples.

    Same time steps and starting point as :func:`edm_sampler` (latents scaled by the first level for diffusion,
    PFGM++ prior latents used as they are for a finite ``D``), spaced by ``spacing`` (None: the solver's
    :data:`DEFAULT_SPACING`); ``num_steps`` counts time steps, so the NFE
    is ``num_steps`` for the multistep solvers and 2*num_steps - 1 + 2*K*restart_steps for Restart
    (:func:`sampler_nfe`). Restart needs ``renoise(x, sigma)``: noise shaped like x at noise level sigma
    drawn from the network's perturbation kernel (:meth:`PerSeedRandom.perturbation`). Restart options left
    None take the paper's defaults (:data:`RESTART_INTERVAL`, :data:`RESTART_REPEATS`, :data:`RESTART_STEPS`).
    ``solver_order``: the order of 'ipndm' / 'unipc' (:data:`SOLVER_ORDERS`; None: :data:`DEFAULT_SOLVER_ORDER`).
    Raises ValueError for options out of range (:func:`check_fast_options`).
    """
    lo, hi = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    check_fast_options(solver, num_steps, restart_interval, restart_repeats, restart_steps, lo, hi, solver_order)
    spacing = spacing or DEFAULT_SPACING[solver]
    t_steps = edm_time_steps(net, num_steps, sigma_min, sigma_max, rho, device=latents.device, spacing=spacing)
    check_distinct_levels(net, t_steps, num_steps, sigma_min, sigma_max, rho, spacing)
    x = latents.to(torch.float64)
    if pfgmpp_lib.is_diffusion(D):
        x = x * t_steps[0]
    if solver != 'restart':
        return solve_ode(net, x, t_steps, class_labels, solver, solver_order)
    if renoise is None:
        raise ValueError('the restart solver needs a renoise function')
    return restart_ode(net, x, t_steps, class_labels, renoise,
                       restart_interval=tuple(restart_interval or RESTART_INTERVAL),
                       restart_repeats=int(restart_repeats or RESTART_REPEATS),
                       restart_steps=int(restart_steps or RESTART_STEPS), rho=rho, spacing=spacing,
                       round_sigma=net.round_sigma)
