"""Few-step sampling of a consistency model (``training.consistency.ConsistencyModel``), and the refusals.

Multistep consistency sampling (Song et al. 2023, Algorithm 1): start from the prior at sigma_max, map to data with
f, and for each further step re-noise the estimate to a smaller sigma with the network's own perturbation kernel
(PFGM++ for finite D, Gaussian for diffusion) and map again. The noise levels (data units, EDM's scale):

    1 step:  sigma_max
    2 steps: sigma_max, 0.821                      the two-step mid point of iCT / ECT on CIFAR-10
    4 steps: sigma_max, 2.51, 0.821, 0.169         0.821 with the interior points 2.51 and 0.169 of EDM's
                                                   rho = 7 schedule of three levels from 80 to 0.002

They are chosen, not tuned per model. Every random draw comes from the per-seed generators (``PerSeedRandom``), so
an image depends on its seed alone. Step counts other than 1, 2 and 4, ODE-solver options, and an ordinary
(non-consistency) network asked for one step are refused with one line (ValueError naming the flag).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

#: Supported step counts and the noise levels after sigma_max (module docstring).
STEP_SIGMAS: dict[int, tuple[float, ...]] = {1: (), 2: (0.821,), 4: (2.51, 0.821, 0.169)}
#: Sampler options (generate.py flags) that mean something to a consistency model: the step count and the start.
CONSISTENCY_OPTIONS = ('num_steps', 'sigma_max')
#: ODE-sampler options whose default values change nothing (generate.py always passes them): not refused at these.
INERT_DEFAULTS = {'rho': 7.0, 'S_churn': 0.0, 'S_min': 0.0, 'S_max': float('inf'), 'S_noise': 1.0,
                  'noise_injection': 0.0}
#: How the refusals name the sampler keywords.
OPTION_FLAGS = {'solver': '--solver', 'discretization': '--disc', 'schedule': '--schedule', 'scaling': '--scaling',
                'spacing': '--spacing', 'S_churn': '--S_churn', 'S_min': '--S_min', 'S_max': '--S_max',
                'S_noise': '--S_noise', 'sigma_min': '--sigma_min', 'rho': '--rho',
                'noise_injection': '--alpha', 'restart_interval': '--restart-interval',
                'restart_repeats': '--restart-repeats', 'restart_steps': '--restart-steps',
                'solver_order': '--solver-order'}


def is_consistency_model(net: Any) -> bool:
    """True for a consistency model (:func:`training.consistency.is_consistency_model`)."""
    from training.consistency import is_consistency_model as check
    return check(net)


def noise_levels(num_steps: int, sigma_max: float) -> list[float]:
    """The sigma of each network evaluation for ``num_steps`` in {1, 2, 4}, starting at ``sigma_max``.

    Raises:
        ValueError: another step count, or a sigma_max not above the first intermediate level.
    """
    if num_steps not in STEP_SIGMAS:
        raise ValueError(f'--steps={num_steps}: a consistency model samples in 1, 2 or 4 steps')
    levels = [float(sigma_max), *STEP_SIGMAS[num_steps]]
    if len(levels) > 1 and not levels[0] > levels[1]:
        raise ValueError(f'--sigma_max={sigma_max:g} must exceed the first re-noising level {levels[1]:g}')
    return levels


def check_request(consistency: bool, sampler_kwargs: dict) -> None:
    """Refuse sampler options that do not fit the network, in one line naming the flag.

    ``consistency``: whether the network is a consistency model. ``sampler_kwargs``: the sampler keywords in
    force (None = not given). A consistency model takes only ``num_steps`` in {1, 2, 4} and ``sigma_max`` (the
    ODE options at their inert defaults, :data:`INERT_DEFAULTS`, pass too); an
    ordinary network is refused ``num_steps`` = 1 (one Euler step from pure noise is the mean of the data, not a
    sample).

    Raises:
        ValueError: the first option that does not fit.
    """
    given = {k: v for k, v in sampler_kwargs.items() if v is not None}
    steps = given.get('num_steps')
    if not consistency:
        if steps == 1:
            raise ValueError('--steps=1: one step of an ODE sampler gives a blur, not a sample; use a '
                             'consistency-tuned snapshot (train.py --consistency=1 --init=...) for 1-step sampling')
        return
    for key, value in given.items():
        if key not in CONSISTENCY_OPTIONS and not (key in INERT_DEFAULTS and value == INERT_DEFAULTS[key]):
            flag = OPTION_FLAGS.get(key, key)
            raise ValueError(f'{flag}: the network is a consistency model, which samples with its own 1, 2 or '
                             f'4 steps (--steps), not with an ODE sampler or its options; drop {flag}')
    if steps is None:
        raise ValueError('--steps: a consistency model samples in 1, 2 or 4 steps; give --steps=1, 2 or 4')
    noise_levels(steps, given.get('sigma_max', 80.0))


def consistency_sampler(net: Callable, latents: torch.Tensor, class_labels: Optional[torch.Tensor],
                        renoise: Callable[[torch.Tensor, float], torch.Tensor], num_steps: int,
                        sigma_max: float, scale_latents: bool) -> torch.Tensor:
    """Float64 samples [B, C, H, W] in [-1, 1] (up to the model's range) after ``num_steps`` evaluations.

    ``latents``: unit Gaussians (``scale_latents``: multiplied by ``sigma_max``, diffusion) or PFGM++ prior draws
    already at the prior's radius. ``renoise(x, sigma)``: the kernel's perturbation at ``sigma`` for each sample
    (float64, from the per-seed generators). ``net(x, sigma, class_labels)``: the consistency function.
    """
    levels = noise_levels(num_steps, sigma_max)
    x = latents.to(torch.float64)
    if scale_latents:
        x = x * levels[0]
    sample = None
    for index, sigma in enumerate(levels):
        if index > 0:
            x = sample + renoise(sample, sigma)
        # One sigma for the whole batch, as the ODE samplers pass it: the network then takes the same code path
        # whatever the batch size, and each image stays a function of its seed alone.
        sample = net(x.to(torch.float32), torch.as_tensor(sigma, dtype=torch.float64, device=x.device),
                     class_labels).to(torch.float64)
    return sample
