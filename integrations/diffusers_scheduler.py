"""PFGM++ (Xu et al. 2023) as a Hugging Face diffusers scheduler, for any number of augmented dimensions D.

In sigma the PFGM++ probability-flow ODE is EDM's, dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022,
eq. 4 with s(t) = 1); a finite D changes only the starting distribution at sigma_max and the training perturbation
(the heavy-tailed kernel of ``training.pfgmpp``). :class:`PFGMPPScheduler` therefore integrates EDM's ODE with the
arithmetic of ``sampling/edm.py`` and ``sampling/fast_solvers.py`` (float64 state, same operation order, so the
same network gives the same images as ``generate.py``), and draws its prior (:meth:`PFGMPPScheduler.prior_sample`)
and its training noise (:meth:`PFGMPPScheduler.add_noise`) from the project's one kernel implementation.

Needs diffusers (``pip install -r requirements-diffusers.txt``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from integrations import require_diffusers

require_diffusers()

from diffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: E402
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: E402
from diffusers.utils import BaseOutput  # noqa: E402

from training import pfgmpp as pfgmpp_lib  # noqa: E402
from sampling.schedules import noise_levels  # noqa: E402

SOLVERS = ('euler', 'heun', 'dpmpp2m')
PREDICTION_TYPES = ('epsilon', 'sample')
GeneratorArg = Union[torch.Generator, Sequence[torch.Generator], None]


@dataclass
class PFGMPPSchedulerOutput(BaseOutput):
    """Result of :meth:`PFGMPPScheduler.step`.

    prev_sample: the state after this model evaluation, shaped like the input sample (for Heun's first evaluation
        of an interval, the Euler predictor that the model evaluates next).
    pred_original_sample: the denoised estimate D(x; sigma) of this evaluation.
    """

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


class PFGMPPScheduler(SchedulerMixin, ConfigMixin):
    """Sampling and training noise for PFGM++ networks (D finite) and diffusion networks (D None or inf).

    Config: ``D`` augmented dimensions (None for diffusion; inf is stored as None), ``sigma_min`` / ``sigma_max`` /
    ``rho`` EDM's noise levels (eq. 5 of Karras et al. 2022), ``sigma_data`` the data standard deviation of EDM's
    preconditioning, ``solver`` 'euler' (1 evaluation per step), 'heun' (EDM's Algorithm 1: 2 per step, Euler on
    the last step) or 'dpmpp2m' (DPM-Solver++(2M), Lu et al. 2022, Algorithm 2, 1 per step), and
    ``prediction_type``: 'epsilon' when the model is a raw network F with EDM's preconditioning around it (diffusers'
    EDM convention: D = c_skip x + c_out F), 'sample' when it returns the denoised image itself (our networks).

    ``timesteps`` are EDM's noise conditioning c_noise = log(sigma) / 4 of every model evaluation, which is what a
    ``UNet2DModel`` receives; :attr:`sigmas` are the noise levels (float64, ending with 0).
    """

    _compatibles: list = []
    order = 1

    @register_to_config
    def __init__(self, D: Optional[float] = None, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0, sigma_data: float = 0.5, solver: str = 'heun', prediction_type: str = 'epsilon',
                 num_train_timesteps: int = 1000) -> None:
        # JSON has no infinity: diffusion is stored as D = None.
        self.register_to_config(D=pfgmpp_lib.check_D(D))
        if solver not in SOLVERS:
            raise ValueError(f'solver must be one of {"|".join(SOLVERS)}, got {solver!r}')
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f'prediction_type must be one of {"|".join(PREDICTION_TYPES)}, got {prediction_type!r}')
        if not 0 < sigma_min < sigma_max or not math.isfinite(sigma_max):
            raise ValueError(f'need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}')
        self.num_inference_steps: Optional[int] = None
        self.set_timesteps(18)

    # ------------------------------------------------------------------ noise levels

    @property
    def D(self) -> Optional[float]:
        """Augmented dimensions, None for diffusion."""
        return self.config.D

    @property
    def init_noise_sigma(self) -> float:
        """Per-coordinate standard deviation of the prior at sigma_max (inf for D <= 2).

        Only informative: the PFGM++ prior is not ``randn * init_noise_sigma``; draw it with :meth:`prior_sample`.
        """
        return float(pfgmpp_lib.per_dimension_std(float(self.sigmas[0]), self.D))

    @property
    def step_index(self) -> int:
        """Index of the next model evaluation in :attr:`timesteps`."""
        return self._step_index

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device, None] = None,
                      sigmas: Optional[Union[Sequence[float], torch.Tensor]] = None) -> None:
        """Choose the noise levels: ``num_inference_steps`` EDM levels from the config, or explicit ``sigmas``.

        sigmas: non-increasing positive levels (a final 0 is appended when missing), e.g. a network's rounded levels
        (:func:`sampling.schedules.edm_time_steps`). Heun evaluates the model twice per interval except the last,
        so :attr:`timesteps` then lists each inner level twice (2N - 1 evaluations for N levels).
        Raises ValueError for a step count below 1 or levels that do not decrease.
        """
        if sigmas is None:
            if num_inference_steps is None or int(num_inference_steps) != num_inference_steps \
                    or num_inference_steps < 1:
                raise ValueError(f'num_inference_steps must be a positive integer, got {num_inference_steps!r}')
            levels = noise_levels(int(num_inference_steps), self.config.sigma_min, self.config.sigma_max,
                                  self.config.rho, device=device or 'cpu')
        else:
            levels = torch.as_tensor(sigmas, dtype=torch.float64, device=device).reshape(-1)
            if len(levels) and float(levels[-1]) == 0:
                levels = levels[:-1]
        # Non-increasing, not strictly decreasing: a network's grid (iDDPM) may round two levels onto one, and
        # generate.py then takes a step of length 0.
        if len(levels) < 1 or not bool((levels > 0).all()) or not bool((levels[1:] <= levels[:-1]).all()):
            raise ValueError('sigmas must be decreasing positive noise levels (optionally ending with one 0)')
        count = len(levels)
        self.num_inference_steps = count
        self.sigmas = torch.cat([levels, levels.new_zeros(1)])
        # One entry per model evaluation: (interval i from sigmas[i] to sigmas[i+1], Heun corrector or not).
        if self.config.solver == 'heun':
            plan = [(0, False)]
            for i in range(1, count):
                plan += [(i - 1, True), (i, False)]
        else:
            plan = [(i, False) for i in range(count)]
        self._plan = plan
        self.eval_sigmas = torch.stack([self.sigmas[i + 1 if corrector else i] for i, corrector in plan])
        self.timesteps = self.precondition_noise(self.eval_sigmas).to(torch.float32)
        self._step_index = 0
        self._heun_state: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self._history: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def current_sigma(self, device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """Noise level of the next model evaluation, a float64 0-d tensor (what our networks take as sigma)."""
        if self._step_index >= len(self._plan):
            raise ValueError('every time step has been taken; call set_timesteps again')
        return self.eval_sigmas[self._step_index].to(device)

    # ------------------------------------------------------------------ EDM preconditioning (Karras et al., Table 1)

    def precondition_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        """c_noise = log(sigma) / 4, the noise conditioning of EDM's networks (same shape as sigma)."""
        return torch.as_tensor(sigma).log() / 4

    def precondition_inputs(self, sample: torch.Tensor, sigma: Union[float, torch.Tensor]) -> torch.Tensor:
        """c_in * sample with c_in = 1 / sqrt(sigma^2 + sigma_data^2); sigma a number or [B, 1, ..., 1]."""
        return sample / (torch.as_tensor(sigma, device=sample.device) ** 2 + self.config.sigma_data ** 2).sqrt()

    def precondition_outputs(self, sample: torch.Tensor, model_output: torch.Tensor,
                             sigma: Union[float, torch.Tensor]) -> torch.Tensor:
        """Denoised image D = c_skip * sample + c_out * model_output (EDM), or model_output for 'sample'."""
        if self.config.prediction_type == 'sample':
            return model_output
        sigma = torch.as_tensor(sigma, device=sample.device)
        sigma_data = self.config.sigma_data
        c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
        c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
        return c_skip * sample + c_out * model_output

    def scale_model_input(self, sample: torch.Tensor, timestep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The model's input at the current evaluation: c_in * sample ('epsilon'), or sample itself ('sample')."""
        if self.config.prediction_type == 'sample':
            return sample
        return self.precondition_inputs(sample, self.current_sigma(sample.device))

    # ------------------------------------------------------------------ the solvers

    def step(self, model_output: torch.Tensor, timestep: Optional[torch.Tensor], sample: torch.Tensor,
             generator: GeneratorArg = None, return_dict: bool = True) -> Union[PFGMPPSchedulerOutput, tuple]:
        """Advance ``sample`` with one model evaluation, as ``generate.py``'s samplers do.

        model_output: the model's output at :meth:`current_sigma` for ``sample`` (see ``prediction_type``).
        The update runs in float64 (as ``sampling/edm.py``); ``prev_sample`` has the dtype of ``sample``.
        ``timestep`` and ``generator`` are accepted for diffusers' interface; the solvers are deterministic and
        follow the evaluation order of :attr:`timesteps`.
        """
        sigma = self.current_sigma(sample.device)
        interval, corrector = self._plan[self._step_index]
        sigma_next = self.sigmas[interval + 1].to(sample.device)
        x = sample.to(torch.float64)
        denoised = self.precondition_outputs(x, model_output.to(torch.float64), sigma)
        solver = self.config.solver
        if solver == 'dpmpp2m':
            x_next = self._dpmpp2m(x, sigma, sigma_next, denoised)
        elif corrector:
            x_start, slope, step = self._heun_state
            slope_next = (x - denoised) / sigma_next
            x_next = x_start + step * (0.5 * slope + 0.5 * slope_next)
            self._heun_state = None
        else:
            slope = (x - denoised) / sigma
            step = sigma_next - sigma
            x_next = x + step * slope
            if solver == 'heun' and float(sigma_next) > 0:
                self._heun_state = (x, slope, step)
        self._step_index += 1
        prev_sample = x_next.to(sample.dtype)
        denoised = denoised.to(sample.dtype)
        if not return_dict:
            return prev_sample, denoised
        return PFGMPPSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def _dpmpp2m(self, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                 denoised: torch.Tensor) -> torch.Tensor:
        """DPM-Solver++(2M) in lambda = -log sigma (Lu et al. 2022, arXiv:2211.01095, Algorithm 2).

        x_next = (sigma_next / sigma) x + (1 - e^-h) D_eff with D_eff = D_0 + (D_0 - D_1) / (2 r), r = h_1 / h;
        first-order (DDIM) while there is no previous evaluation, and D_0 itself on the step to sigma = 0.
        """
        previous, self._history = self._history, (-sigma.log(), denoised)
        if float(sigma_next) == 0:
            return denoised
        lam, lam_next = -sigma.log(), -sigma_next.log()
        h = lam_next - lam
        j0 = -torch.expm1(-h)
        x_next = (sigma_next / sigma) * x + j0 * denoised
        if previous is None:
            return x_next
        lam_prev, denoised_prev = previous
        r = (lam - lam_prev) / h
        return x_next + j0 / (2 * r) * (denoised - denoised_prev)

    # ------------------------------------------------------------------ randomness: the PFGM++ kernel

    def prior_sample(self, shape: Sequence[int], generator: GeneratorArg = None,
                     device: Union[str, torch.device, None] = None,
                     sigma_max: Optional[float] = None) -> torch.Tensor:
        """Starting points at the first noise level, float64 [B, C, H, W] (``shape`` includes the batch).

        Diffusion: a float32 ``randn`` per sample times sigmas[0], as ``generate.py`` (from each generator of a
        list, or one draw of the whole batch from a single generator). Finite D, with a list of generators: the
        PFGM++ reference's prior for each generator's seed (``generator.initial_seed()``, drawn from a private
        generator so that the given ones are not advanced, exactly as ``generate.py``;
        :func:`training.pfgmpp.prior_latents`, including its radius rule for small images); with a single
        generator or None: the exact kernel at ``sigma_max`` (:func:`training.pfgmpp.sample_perturbation`).
        ``sigma_max`` defaults to the config's. Raises ValueError when a list's length differs from the batch.
        """
        shape = [int(s) for s in shape]
        sample_shape, batch = shape[1:], shape[0]
        generators = list(generator) if isinstance(generator, (list, tuple)) else None
        if generators is not None and len(generators) != batch:
            raise ValueError(f'got {len(generators)} generators for a batch of {batch}')
        gen_device = (generators[0].device if generators else generator.device if generator is not None
                      else torch.device(device or 'cpu'))
        if self.D is None:
            if generators is not None:
                first = pfgmpp_lib.stacked_randn(generators, sample_shape)
            else:
                first = torch.randn(shape, generator=generator, device=gen_device)
            return (first.to(torch.float64) * self.sigmas[0].to(gen_device)).to(device)
        sigma_max = self.config.sigma_max if sigma_max is None else float(sigma_max)
        if generators is not None:
            seeds = [g.initial_seed() for g in generators]
            return pfgmpp_lib.prior_latents(seeds, sample_shape, D=self.D, sigma_max=sigma_max, device=device)
        radius_sigma = pfgmpp_lib.prior_sigma_max(math.prod(sample_shape), sigma_max)
        return pfgmpp_lib.sample_perturbation(shape, radius_sigma, self.D, generator=generator, device=gen_device,
                                              dtype=torch.float64).to(device)

    def sigmas_for_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Noise levels (float64) of evaluation ``timesteps`` taken from :attr:`timesteps` (nearest entry)."""
        timesteps = torch.as_tensor(timesteps, device=self.timesteps.device).reshape(-1)
        index = (self.timesteps[None, :].to(torch.float64) - timesteps[:, None].to(torch.float64)).abs().argmin(1)
        return self.eval_sigmas[index]

    def add_noise(self, original_samples: torch.Tensor, noise: Optional[torch.Tensor] = None,
                  timesteps: Optional[torch.Tensor] = None, generator: GeneratorArg = None,
                  sigmas: Optional[Union[float, torch.Tensor]] = None,
                  clip_beta: Optional[float] = None) -> torch.Tensor:
        """Perturb clean samples [B, ...] at per-sample noise levels, from the PFGM++ kernel (Xu et al. 2023).

        The levels come from ``sigmas`` (a number, [B] or [B, 1, ..., 1]) or from ``timesteps`` (entries of
        :attr:`timesteps`, as diffusers' EDM schedulers take them). Diffusion with ``noise`` given: sample + noise *
        sigma (diffusers' EDMEulerScheduler). Otherwise the noise is drawn here by
        :func:`training.pfgmpp.sample_perturbation` (norm r * sqrt(B / (1 - B)), B ~ Beta(N/2, D/2), r = sigma *
        sqrt(D); Gaussian for diffusion), from ``generator`` (one per sample in a list, or one for the batch);
        ``clip_beta`` clips B as the reference's training does (:data:`training.loss.DEFAULT_BETA_CLIP`).
        Returns the noisy samples in the input's dtype. Raises ValueError for a finite D with ``noise`` given
        (the kernel is not Gaussian noise times sigma) or when neither levels nor timesteps are given.
        """
        if sigmas is None:
            if timesteps is None:
                raise ValueError('add_noise needs sigmas or timesteps')
            sigmas = self.sigmas_for_timesteps(timesteps)
        batch = original_samples.shape[0]
        sigma = torch.as_tensor(sigmas, device=original_samples.device).to(torch.float64).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(batch)
        if sigma.numel() != batch:
            raise ValueError(f'need one noise level or one per sample ({batch}), got {sigma.numel()}')
        view = sigma.reshape(-1, *([1] * (original_samples.ndim - 1)))
        if noise is not None:
            if self.D is not None:
                raise ValueError(f'D={self.D}: the PFGM++ kernel draws its own noise; pass noise=None and a generator')
            return (original_samples + noise * view).to(original_samples.dtype)
        dtype = original_samples.dtype
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch:
                raise ValueError(f'got {len(generator)} generators for a batch of {batch}')
            parts = [pfgmpp_lib.sample_perturbation([1, *original_samples.shape[1:]], sigma[i].to(g.device), self.D,
                                                    generator=g, device=g.device, dtype=dtype, clip_beta=clip_beta)
                     for i, g in enumerate(generator)]
            perturbation = torch.cat(parts).to(original_samples.device)
        else:
            device = generator.device if generator is not None else original_samples.device
            perturbation = pfgmpp_lib.sample_perturbation(original_samples.shape, sigma.to(device), self.D,
                                                          generator=generator, device=device, dtype=dtype,
                                                          clip_beta=clip_beta).to(original_samples.device)
        return original_samples + perturbation

    def __len__(self) -> int:
        return self.config.num_train_timesteps
