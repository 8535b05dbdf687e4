"""Multistep solvers for few network evaluations: iPNDM (Zhang & Chen 2023) and UniPC (Zhao et al. 2023).

Both integrate EDM's probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma, which is also the PFGM++ ODE in
sigma for every D, at one network evaluation (NFE) per time step, and both share the project's convention for the
last step: a step to sigma = 0 returns D(x; sigma) (the ODE's slope has no limit there).

* iPNDM ("improved PNDM", Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator",
  arXiv:2204.13902, section 4 / appendix): Adams-Bashforth on the noise prediction eps = (x - D) / sigma, which for
  EDM's parametrisation (alpha = 1) is dx/dsigma itself, so the DDIM transfer is x + (sigma' - sigma) * eps. The
  first steps use the lower orders that the history allows (no Runge-Kutta warm-up). The published coefficients
  (55, -59, 37, -9)/24 assume equal steps; :func:`adams_bashforth_weights` gives the Adams-Bashforth weights for the
  actual steps in sigma, which are those coefficients when the steps are equal and keep the fourth order on the
  rho- and log-SNR-spaced levels (``python -m bench.solver_lab`` measures it).
* UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models",
  arXiv:2302.04867, Algorithms 2 and 3, B(h) = e^h - 1, the "bh2" variant) with data prediction in
  lambda = -log sigma: the predictor UniP-p extrapolates D from the last p evaluations; the corrector UniC re-does
  the step with the evaluation at the predicted point, which the next step then uses, so it costs no extra NFE.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# iPNDM's order once the history is full (Adams-Bashforth with four evaluations).
IPNDM_ORDER = 4

# The predictor order p of UniPC (UniP-p uses the last p evaluations; the corrector raises the order to p + 1).
# p = 2 by default: on trained networks (the 16x16 digits models, D = 128 and inf, 1,500 paired seeds; docs/sampling.md)
# p = 3 amplifies the network's error over the large few-step intervals (FD-digits not monotone in NFE, worse than
# p = 2 at 8-10 NFE on either spacing, catastrophic on rho-spaced levels), while p = 2 on rho-spaced levels matches
# DPM-Solver++(2M). The exact denoiser of the laboratory, which has no such error, favours p = 3 on log-SNR levels.
UNIPC_ORDER = 2


def adams_bashforth_weights(nodes: Sequence[float], start: float, end: float) -> list[float]:
    """Weights w_j such that sum_j w_j f(nodes[j]) = integral from ``start`` to ``end`` of the polynomial through
    the points (nodes[j], f(nodes[j])) (degree len(nodes) - 1): the explicit Adams-Bashforth step for any spacing.

    nodes: distinct abscissae (floats), usually ``start`` and earlier points. Returns floats (float64 arithmetic).
    For equal steps h = end - start and nodes start, start - h, ... they are h times the classical coefficients,
    e.g. (55, -59, 37, -9) h / 24 for four nodes (Hairer, Norsett & Wanner, "Solving ODEs I", III.1).
    Raises ValueError for repeated nodes or an empty step.
    """
    h = float(end) - float(start)
    if h == 0 or len(set(float(t) for t in nodes)) != len(nodes):
        raise ValueError(f'need distinct nodes and a non-empty step, got nodes {list(nodes)} over [{start}, {end}]')
    # In units of the step, integrating over [0, 1]: sum_j w_j s_j^k = 1 / (k + 1) for k < len(nodes).
    s = torch.tensor([(float(t) - float(start)) / h for t in nodes], dtype=torch.float64)
    powers = torch.arange(len(nodes), dtype=torch.float64)
    vandermonde = s.unsqueeze(0) ** powers.unsqueeze(1)
    moments = 1 / (powers + 1)
    return [h * float(w) for w in torch.linalg.solve(vandermonde, moments)]


def ipndm_solve(denoise: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor,
                max_order: int = IPNDM_ORDER) -> torch.Tensor:
    """iPNDM along the decreasing float64 levels ``sigmas`` (ending at sigma_min > 0 or with one 0); float64 x.

    denoise(x, sigma) -> D(x; sigma) as float64 [B, ...]; called once per step. Step i uses the Adams-Bashforth
    polynomial through the last min(i + 1, max_order) slopes eps_j = (x_j - D_j) / sigma_j, in sigma.
    """
    slopes: list[tuple[float, torch.Tensor]] = []  # (sigma_j, eps_j), newest first
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoise(x, sigma)
        if float(sigma_next) == 0:
            return denoised
        slopes = [(float(sigma), (x - denoised) / sigma)] + slopes[:max_order - 1]
        weights = adams_bashforth_weights([t for t, _ in slopes], float(sigma), float(sigma_next))
        x = x + sum(w * eps for w, (_, eps) in zip(weights, slopes))
    return x


def _unipc_coefficients(ratios: Sequence[float], h: float, order: int) -> torch.Tensor:
    """The solution a of sum_k a_k r_k^(i-1) = phi_i-term / B(h), i = 1 .. order, of UniPC's Algorithm 2/3 (bh2).

    ratios: r_k = (lambda_k - lambda_0) / h for the points used (the corrector's last one is 1). With
    g_1 = e^-h - 1 and g_{i+1} = g_i / (-h) - 1 / (i+1)!, the right side is g_{i+1} i! / B(h), B(h) = e^-h - 1
    in the data-prediction form (variable -h). Returns float64 [order].
    """
    hh = -h
    phi = math.expm1(hh)
    b_h = phi
    g = phi / hh - 1
    factorial, rhs = 1.0, []
    for i in range(1, order + 1):
        rhs.append(g * factorial / b_h)
        factorial *= i + 1
        g = g / hh - 1 / factorial
    r = torch.tensor(list(ratios), dtype=torch.float64)
    matrix = torch.stack([r ** (i - 1) for i in range(1, order + 1)])
    return torch.linalg.solve(matrix, torch.tensor(rhs, dtype=torch.float64))


def unipc_solve(denoise: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, order: int = UNIPC_ORDER) -> torch.Tensor:
    """UniPC-bh2 (data prediction) along the decreasing float64 levels ``sigmas``; float64 x.

    denoise(x, sigma) -> D(x; sigma) as float64 [B, ...], called once per step. With lambda = -log sigma and
    h = lambda_next - lambda, each step is the DDIM update x' = (sigma'/sigma) x + (1 - e^-h) D_0 plus
    -B(h) sum_k a_k (D_k - D_0) / r_k over the history (predictor: the last ``order`` evaluations, the first steps
    fewer; order 2 uses a = 1/2 as the paper does; ``order`` 1 is DDIM with the corrector). At the next level the network is evaluated at the predicted
    point and the corrector re-does the step with that evaluation as one more point (r = 1); the corrected x
    continues, the evaluation is reused. No correction follows the last step; a step to sigma = 0 returns
    D(x; sigma).
    """
    history: list[tuple[float, torch.Tensor]] = []  # (lambda_j, D_j) before the current point, newest first
    previous = None  # (x, lambda, h, D) of the step that produced x, for the corrector
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoise(x, sigma)
        lam = -float(torch.log(sigma))
        if previous is not None:
            x = _unipc_update(*previous, history[1:], order, corrector=(lam, denoised))
        if float(sigma_next) == 0:
            return denoised
        h = -float(torch.log(sigma_next)) - lam
        previous = (x, lam, h, denoised)
        x_next = _unipc_update(x, lam, h, denoised, history, order)
        history = [(lam, denoised)] + history[:order - 1]
        x = x_next
    return x


def _unipc_update(x: torch.Tensor, lam: float, h: float, denoised: torch.Tensor,
                  history: Sequence[tuple[float, torch.Tensor]], order: int,
                  corrector: Optional[tuple[float, torch.Tensor]] = None) -> torch.Tensor:
    """One UniP step from (x, lambda, D_0 = ``denoised``) over h, or the UniC step when ``corrector`` = (lambda',
    D') gives the evaluation at the predicted point. ``history``: earlier (lambda_k, D_k), newest first."""
    points = list(history[:order - 1])
    ratios = [(lam_k - lam) / h for lam_k, _ in points]
    differences = [(d_k - denoised) / r for r, (_, d_k) in zip(ratios, points)]
    if corrector is not None:
        ratios.append(1.0)
        differences.append(corrector[1] - denoised)
    phi = math.expm1(-h)
    # Data prediction with alpha = 1: sigma'/sigma = e^-h and the DDIM term is -(e^-h - 1) D_0.
    x_next = (phi + 1) * x - phi * denoised
    if not differences:
        return x_next
    if len(differences) == 1:
        # The paper's choice for UniP-2 and UniC-1 (a_1 = 1/2; the linear system would give a_1 = b_1).
        weights = [0.5]
    else:
        weights = [float(a) for a in _unipc_coefficients(ratios, h, len(differences))]
    return x_next - phi * sum(a * d for a, d in zip(weights, differences))
