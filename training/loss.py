"""Training losses of EDM (VP, VE and EDM formulations), each with PFGM++ as an option.

A loss draws one noise level sigma per image from its formulation's distribution, perturbs the (augmented) images
at that level, asks the preconditioned network for the clean image and returns

    weight(sigma) * (net(y + n, sigma) - target)^2        per element, shape [B, C, H, W],

as the original does; the training loop sums and scales it.

Constructor options shared by the three classes:

- ``D``: None (default) trains a diffusion model with Gaussian noise. A number >= 1 trains PFGM++ with D augmented
  dimensions: the noise comes from the PFGM++ kernel at the same sigma (``training/pfgmpp.py``) and the network
  is still conditioned on sigma, not on the radius. ``math.inf`` means the same as None. Validated by
  :func:`training.pfgmpp.check_D` (ValueError).
- ``beta_clip``: clip of the kernel's Beta draw during training, on by default as in the reference
  (:data:`DEFAULT_BETA_CLIP`); None draws from the exact kernel.
- ``sigma_scale``: factor applied to every drawn sigma, and so to the weights. The PFGM++ code multiplies its EDM
  sigmas by :data:`LSUN_SIGMA_SCALE` = 380/80 for 256x256 LSUN.
- ``stf_chunk_size``: reference images per chunk of the stable-target-field computation.

Call: ``loss_fn(net, images, labels=None, augment_pipe=None, generator=None, reference_images=None)``.

- ``generator``: torch.Generator on the images' device for sigma and noise (sigma first, then the noise). None
  uses torch's default generator, like the original.
- ``reference_images``: turns on the stable target field (STF). Pass the *other* clean images of the reference
  batch (``--rbatch`` minus the training batch). The loss augments them with ``augment_pipe`` when one is given,
  puts the augmented training batch in front, as the reference does, and regresses onto the kernel-weighted
  posterior mean of that set (:func:`training.pfgmpp.stable_target_field`) instead of the clean image.

The pieces (``sample_sigma``, ``weight``, ``perturbation``, ``loss_given_noise``) are public so that tests and
tools can check each one on its own.

Snapshots pickle the loss object together with the source of this file. So that the original EDM/PFGM++ code,
which has no ``training/pfgmpp.py``, can still unpickle our snapshots, this module imports only torch and
torch_utils when it loads and fetches the PFGM++ module on first use.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from torch_utils import persistence

#: Clip of B ~ Beta(N/2, D/2) to [eps, 1 - eps] that the PFGM++ reference applies while training (and not while
#: sampling). It bounds the radius away from 0 and
#: infinity. For very large D it is far from harmless: with N = 3072 and D = 3,072,000, E[B] is about 1e-3, so
#: roughly half of the draws land on the lower bound.
DEFAULT_BETA_CLIP = 1e-3

#: Sigma multiplier that the PFGM++ code applies for LSUN 256x256 (its opts.lsun).
LSUN_SIGMA_SCALE = 380.0 / 80.0


def _pfgmpp_math() -> Any:
    """The PFGM++ module, imported on first use (see the module docstring for why not at load time)."""
    from training import pfgmpp
    return pfgmpp


def _networks() -> Any:
    """The networks module (home of the VP schedule), imported on first use like :func:`_pfgmpp_math`."""
    from training import networks
    return networks

#----------------------------------------------------------------------------
# What the three formulations share.

class _NoiseLevelLoss:
    """Sampling, perturbation and weighting skeleton; subclasses supply ``draw_sigma`` and ``weight``."""

    def __init__(self, D: Optional[float] = None, sigma_scale: float = 1.0,
                 beta_clip: Optional[float] = DEFAULT_BETA_CLIP, stf_chunk_size: int = 512) -> None:
        self.D = _pfgmpp_math().check_D(D)
        self.sigma_scale = sigma_scale
        self.beta_clip = beta_clip
        self.stf_chunk_size = stf_chunk_size

    def draw_sigma(self, shape: list[int], device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
        raise NotImplementedError

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample_sigma(self, batch_size: int, device: Any = None, generator: Optional[torch.Generator] = None,
                     ndim: int = 4) -> torch.Tensor:
        """Per-sample noise levels, float32 [batch_size, 1, ..., 1] with ``ndim`` dimensions."""
        shape = [batch_size] + [1] * (ndim - 1)
        return self.draw_sigma(shape, torch.device(device or 'cpu'), generator) * self.sigma_scale

    def perturbation(self, y: torch.Tensor, sigma: torch.Tensor,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Noise for images ``y`` at levels ``sigma``: Gaussian, or the PFGM++ kernel when D is set."""
        return _pfgmpp_math().sample_perturbation(y.shape, sigma, D=self.D, generator=generator, device=y.device,
                                                  dtype=y.dtype, clip_beta=self.beta_clip)

    def stf_target(self, noisy: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor, reference_images: torch.Tensor,
                   augment_pipe: Optional[Callable] = None) -> torch.Tensor:
        """Stable target field for ``noisy``, over the batch ``y`` followed by the (augmented) reference images."""
        if augment_pipe is not None:
            reference_images, _ = augment_pipe(reference_images)
        reference = torch.cat([y, reference_images.to(device=y.device, dtype=y.dtype)])
        return _pfgmpp_math().stable_target_field(noisy, sigma, reference, D=self.D, chunk_size=self.stf_chunk_size)

    def loss_given_noise(self, net: Callable, y: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                         labels: Optional[torch.Tensor] = None, augment_labels: Optional[torch.Tensor] = None,
                         target: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Weighted per-element squared error of the denoiser on ``y + noise``; the target defaults to ``y``."""
        denoised = net(y + noise, sigma, labels, augment_labels=augment_labels)
        target = y if target is None else target
        return self.weight(sigma) * (denoised - target).square()

    def __call__(self, net: Callable, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 augment_pipe: Optional[Callable] = None, generator: Optional[torch.Generator] = None,
                 reference_images: Optional[torch.Tensor] = None) -> torch.Tensor:
        sigma = self.sample_sigma(images.shape[0], images.device, generator, ndim=images.ndim)
        y, augment_labels = (images, None) if augment_pipe is None else augment_pipe(images)
        noise = self.perturbation(y, sigma, generator)
        target = None
        if reference_images is not None:
            target = self.stf_target(y + noise, sigma, y, reference_images, augment_pipe)
        return self.loss_given_noise(net, y, sigma, noise, labels, augment_labels, target)

#----------------------------------------------------------------------------
# Variance preserving (VP) formulation of Song et al., "Score-Based Generative Modeling through Stochastic
# Differential Equations": t uniform in [epsilon_t, 1], sigma(t) from the linear beta schedule, weight 1/sigma^2.

@persistence.persistent_class
class VPLoss(_NoiseLevelLoss):
    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5, **options: Any) -> None:
        super().__init__(**options)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def sigma(self, t: Any) -> torch.Tensor:
        """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (:func:`training.networks.vp_sigma`)."""
        # The original's exp() - 1 rounding: it decides the sigmas drawn for a given seed.
        return _networks().vp_sigma(torch.as_tensor(t), self.beta_d, self.beta_min, expm1=False)

    def draw_sigma(self, shape: list[int], device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
        uniform = torch.rand(shape, device=device, generator=generator)
        return self.sigma(1 + uniform * (self.epsilon_t - 1))

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / sigma.square()

#----------------------------------------------------------------------------
# Variance exploding (VE) formulation of the same paper: sigma log-uniform in [sigma_min, sigma_max],
# weight 1/sigma^2.

@persistence.persistent_class
class VELoss(_NoiseLevelLoss):
    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100, **options: Any) -> None:
        super().__init__(**options)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def draw_sigma(self, shape: list[int], device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
        uniform = torch.rand(shape, device=device, generator=generator)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** uniform

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / sigma.square()

#----------------------------------------------------------------------------
# EDM formulation (Karras et al., 2022): ln(sigma) ~ N(P_mean, P_std^2), weight (sigma^2 + sigma_data^2) /
# (sigma * sigma_data)^2, which gives the preconditioned network unit-variance targets.

@persistence.persistent_class
class EDMLoss(_NoiseLevelLoss):
    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5, **options: Any) -> None:
        super().__init__(**options)
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def draw_sigma(self, shape: list[int], device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
        log_sigma = torch.randn(shape, device=device, generator=generator) * self.P_std + self.P_mean
        return log_sigma.exp()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma.square() + self.sigma_data ** 2) / (sigma * self.sigma_data).square()

#----------------------------------------------------------------------------
