"""PFGM++ mathematics: the perturbation kernel, the generation prior and the stable target field.

PFGM++ (Xu et al., 2023) embeds an image of N = C*H*W values in N + D dimensions. Training perturbs a clean
image y with noise n whose direction is uniform on the sphere and whose norm is

    |n| = r * sqrt(B / (1 - B)),   B ~ Beta(N/2, D/2),   r = sigma * sqrt(D),

so |n|^2 / r^2 follows a beta-prime(N/2, D/2) law and E|n|^2 = sigma^2 * N * D / (D - 2). As D grows the kernel
tends to the Gaussian N(0, sigma^2 I) of diffusion models, and ``D=None`` (or ``math.inf``) selects that Gaussian
directly: the same functions serve both families, so the losses, the sampler and the tools have one code path.

Everything random here takes a caller-supplied ``torch.Generator`` and draws on the tensors' device; nothing reads
or changes torch's global generator. The radius arithmetic runs in float64 as in the reference implementation.

This module is the only place that knows these formulas; ``training/loss.py`` and the sampler import it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Optional, Sequence, Union

import torch

# The training clip of the Beta draw is defined beside the loss that applies it by default: training/loss.py must
# load without this module (see its docstring), so it cannot import the value from here.

#: Rule of the reference generator for the PFGM++ prior: images with fewer than 256*256*3 values always start from
#: radius 80 * sqrt(D), whatever sigma_max the caller asked for (the reference raises for larger images; we then
#: use the caller's sigma_max).
REFERENCE_PRIOR_SIGMA_MAX = 80.0
REFERENCE_PRIOR_MAX_DIMENSIONS = 256 * 256 * 3

#: Default number of reference images processed at once by :func:`stable_target_field`. A chunk costs
#: chunk_size * N float64 values (about 12 MiB for 512 CIFAR images).
STF_CHUNK_SIZE = 512

SigmaLike = Union[float, torch.Tensor]
DeviceLike = Union[str, torch.device, None]

#----------------------------------------------------------------------------
# The kernel's one representation: D, with None or infinity meaning diffusion. The original
# code's ``pfgmpp`` flag next to a ``D`` exists only where its files and flags are read: network attributes and
# constructor keywords (:func:`network_D`, :func:`network_kwargs`) and the ``--pfgmpp --aug_dim`` flags
# (:func:`flags_D`, :func:`resolve_D`). Every other module takes D and validates it here, nowhere else.

class KernelError(ValueError):
    """PFGM++ settings that contradict each other or a network; ``option`` names the setting at fault
    ('pfgmpp' or 'aug_dim', the original's flag names) so that a script can point at the right flag."""

    def __init__(self, message: str, option: str) -> None:
        super().__init__(message)
        self.option = option


def check_D(D: Optional[float]) -> Optional[float]:
    """Validate a number of augmented dimensions: None for diffusion (D None or +inf), else D itself.

    D may be any real number >= 1 (int or float, kept as given). Raises ValueError, with one line saying what was
    expected, for anything else: 0, negatives, values in (0, 1), nan, -inf, booleans (a ``pfgmpp`` flag passed
    where D belongs) and non-numbers.
    """
    if D is None:
        return None
    if isinstance(D, bool) or not isinstance(D, numbers.Real) or math.isnan(D) or D < 1:
        raise ValueError(f'PFGM++ needs D >= 1 augmented dimensions (or None/inf for diffusion), got D={D!r}')
    return None if math.isinf(D) else D


def is_diffusion(D: Optional[float]) -> bool:
    """True when D selects the Gaussian (diffusion) limit; raises ValueError for an invalid D (:func:`check_D`)."""
    return check_D(D) is None


def flags_D(pfgmpp: Any, D: Optional[float]) -> Optional[float]:
    """D of the original's pair (``pfgmpp`` flag, ``D``), as its networks, training loop and CLI carry it.

    A false flag means diffusion and D is ignored (the original keeps a default D=128 on diffusion networks);
    a true flag needs a finite D (ValueError otherwise, :func:`check_D`).
    """
    if not pfgmpp:
        return None
    if check_D(D) is None:
        raise ValueError(f'pfgmpp=True needs a finite number of augmented dimensions D, got D={D!r}')
    return D


def network_kwargs(D: Optional[float]) -> dict[str, Any]:
    """The preconditioners' constructor keywords (the original's ``pfgmpp``, ``D``) that select kernel D.

    Diffusion leaves D at the constructor's default, as the original's training loop does with ``--pfgmpp=0``.
    """
    D = check_D(D)
    return dict(pfgmpp=False) if D is None else dict(pfgmpp=True, D=D)


def declares_kernel(net: Any) -> bool:
    """True when a network records its kernel: a ``pfgmpp`` or ``D`` attribute (ours, the PFGM++ code's, and
    user-written denoisers); NVIDIA's EDM networks record neither."""
    return hasattr(net, 'pfgmpp') or hasattr(net, 'D')


def network_D(net: Any, undeclared: Optional[float] = None) -> Optional[float]:
    """The kernel D a network records through the original's attributes (the pickle boundary).

    The ``pfgmpp`` flag decides, as in the original: false or absent is diffusion (None) whatever ``D`` holds; true
    needs a finite ``D`` >= 1 (ValueError otherwise). A network with neither attribute (NVIDIA's EDM networks)
    returns ``undeclared`` (validated, None = diffusion).
    """
    if not declares_kernel(net):
        return check_D(undeclared)
    return flags_D(getattr(net, 'pfgmpp', False), getattr(net, 'D', None))


def resolve_D(net: Any, pfgmpp: Optional[bool] = None, aug_dim: Optional[float] = None) -> Optional[float]:
    """D for sampling ``net`` given the original's ``--pfgmpp`` / ``--aug_dim`` flags (None = not given).

    A network that records its kernel (:func:`declares_kernel`) decides: the flags may restate it but never
    contradict it. A network that records nothing (NVIDIA's EDM) is diffusion unless ``pfgmpp`` is true, which then
    needs ``aug_dim``. Raises :class:`KernelError` (a ValueError naming the flag at fault) for contradictions and
    missing values, and ValueError for an invalid D.
    """
    if aug_dim is not None:
        try:
            flags_D(True, aug_dim)
        except ValueError as err:
            raise KernelError(str(err), 'aug_dim') from None
    declared = getattr(net, 'pfgmpp', None)
    if declared is not None:
        declared = bool(declared)
        net_D = getattr(net, 'D', None)
        if pfgmpp is not None and bool(pfgmpp) != declared:
            raise KernelError(f'pfgmpp={pfgmpp} contradicts the network, which was trained with pfgmpp={declared}; '
                              f'drop the flag', 'pfgmpp')
        if aug_dim is not None and not declared:
            raise KernelError(f'aug_dim={aug_dim} given, but the network is a diffusion model (pfgmpp=False); '
                              f'drop the flag', 'aug_dim')
        if aug_dim is not None and net_D is not None and aug_dim != net_D:
            raise KernelError(f'aug_dim={aug_dim} contradicts the network, which was trained with D={net_D}; '
                              f'drop the flag', 'aug_dim')
        if declared and net_D is None and aug_dim is None:
            raise KernelError('the network is a PFGM++ model but does not record D; give aug_dim', 'aug_dim')
        return flags_D(declared, net_D if net_D is not None else aug_dim)
    # Networks from the original EDM code record neither: the flags decide.
    if pfgmpp:
        if aug_dim is None:
            raise KernelError('pfgmpp=True needs aug_dim: this network does not record its D', 'aug_dim')
        return flags_D(True, aug_dim)
    if aug_dim is not None:
        raise KernelError(f'aug_dim={aug_dim} only applies to PFGM++ sampling; add pfgmpp=True', 'aug_dim')
    return None

#----------------------------------------------------------------------------
# Hyperparameter alignment: how a finite D relates to diffusion at the same sigma.

def sigma_to_radius(sigma: SigmaLike, D: Optional[float]) -> SigmaLike:
    """PFGM++ radius r = sigma * sqrt(D) of noise level sigma (infinite in the diffusion limit)."""
    D = check_D(D)
    return sigma * (math.inf if D is None else math.sqrt(D))


def radius_to_sigma(r: SigmaLike, D: Optional[float]) -> SigmaLike:
    """Noise level sigma = r / sqrt(D) of PFGM++ radius r (finite D only: the radius diverges as D grows)."""
    D = check_D(D)
    if D is None:
        raise ValueError('radius_to_sigma needs a finite D: in the diffusion limit every sigma has infinite radius')
    return r / math.sqrt(D)


def per_dimension_std(sigma: SigmaLike, D: Optional[float]) -> SigmaLike:
    """Per-coordinate standard deviation sigma * sqrt(D / (D - 2)) of the kernel at noise level sigma.

    Equals sigma in the diffusion limit and is infinite for D <= 2, where the kernel has no finite variance.
    Use it to compare a finite D with diffusion at the same sigma.
    """
    D = check_D(D)
    if D is None:
        return sigma
    if D <= 2:
        return sigma * math.inf
    return sigma * math.sqrt(D / (D - 2))

#----------------------------------------------------------------------------
# Perturbation kernel.

def _per_sample_sigma(sigma: SigmaLike, batch_size: int, device: torch.device) -> torch.Tensor:
    """Bring a scalar or per-sample sigma (shape [], [B] or [B, 1, ...]) to shape [B]."""
    sigma = torch.as_tensor(sigma, device=device)
    if sigma.numel() not in (1, batch_size):
        raise ValueError(f'sigma must hold one value or one per sample ({batch_size}), got shape {tuple(sigma.shape)}')
    return sigma.reshape(-1).expand(batch_size)


def _broadcast_to_batch(per_sample: torch.Tensor, ndim: int) -> torch.Tensor:
    """View a [B] tensor as [B, 1, ..., 1] with ``ndim`` dimensions."""
    return per_sample.reshape(-1, *([1] * (ndim - 1)))


def sample_radius_ratio(batch_size: int, N: int, D: float, generator: Optional[torch.Generator] = None,
                        device: DeviceLike = None, clip_beta: Optional[float] = None) -> torch.Tensor:
    """Draw sqrt(B / (1 - B)) with B ~ Beta(N/2, D/2), float64 [batch_size]: the noise norm in units of r.

    B / (1 - B) is computed as the ratio G1 / G2 of the two Gamma variables that define B, which avoids the
    cancellation in 1 - B when B is close to 1 (large N, small D) and stays finite for N and D in the millions.
    ``clip_beta=eps`` restricts B to [eps, 1 - eps] as the reference does during training. (The reference also
    adds 1e-8 inside the ratio and inside the square root; with the clip on, that moves the radius by less than
    1e-5 relative, and it is left out here so that the law stays exact.)
    """
    concentration = torch.empty([batch_size, 2], dtype=torch.float64, device=device)
    concentration[:, 0] = N / 2
    concentration[:, 1] = D / 2
    gammas = torch._standard_gamma(concentration, generator=generator)
    odds = gammas[:, 0] / gammas[:, 1]
    if clip_beta is not None:
        if not 0 < clip_beta < 0.5:
            raise ValueError(f'clip_beta must lie in (0, 0.5), got {clip_beta}')
        odds = odds.clamp(clip_beta / (1 - clip_beta), (1 - clip_beta) / clip_beta)
    return odds.sqrt()


def sample_perturbation(shape: Sequence[int], sigma: SigmaLike, D: Optional[float] = None,
                        generator: Optional[torch.Generator] = None, device: DeviceLike = None,
                        dtype: torch.dtype = torch.float32, clip_beta: Optional[float] = None) -> torch.Tensor:
    """Draw PFGM++ perturbations of ``shape`` = [B, ...] at per-sample noise level ``sigma``.

    sigma: a number or a tensor with one value per sample ([B] or [B, 1, ..., 1]).
    D: augmented dimensions; None or ``math.inf`` gives Gaussian noise sigma * randn (diffusion).
    generator: source of randomness; must live on ``device``. None falls back to torch's default generator of
        that device, exactly like ``torch.randn``.
    device: where to draw; defaults to sigma's device when sigma is a tensor, else the generator's, else CPU.
    clip_beta: None for the exact kernel, or eps to clip B to [eps, 1 - eps] (the reference's training setting,
        :data:`training.loss.DEFAULT_BETA_CLIP`).

    For finite D the Beta draw comes first, then the direction, both from ``generator``. The radius and the norm
    of the direction are float64; the float32 direction is scaled in float64 and rounded to ``dtype`` at the end.
    """
    shape = tuple(int(size) for size in shape)
    if device is None:
        if isinstance(sigma, torch.Tensor):
            device = sigma.device
        elif generator is not None:
            device = generator.device
    device = torch.device('cpu' if device is None else device)
    D = check_D(D)
    batch_size = shape[0]
    sigma = _per_sample_sigma(sigma, batch_size, device)

    if D is None:
        gaussian = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return gaussian * _broadcast_to_batch(sigma.to(dtype), len(shape))

    N = math.prod(shape[1:])
    norm_in_radii = sample_radius_ratio(batch_size, N, D, generator=generator, device=device, clip_beta=clip_beta)
    noise_norm = sigma.to(torch.float64) * math.sqrt(D) * norm_in_radii
    # Half precision would spoil the direction's normalisation; draw it in at least float32.
    direction_dtype = torch.promote_types(dtype, torch.float32)
    direction = torch.randn(shape, generator=generator, device=device, dtype=direction_dtype)
    direction_norm = torch.linalg.vector_norm(direction.reshape(batch_size, -1), dim=1, dtype=torch.float64)
    scale = _broadcast_to_batch(noise_norm / direction_norm, len(shape))
    return (direction * scale).to(dtype)

#----------------------------------------------------------------------------
# Generation prior.

def seed_generators(seeds: Iterable[int], device: DeviceLike = 'cpu') -> list[torch.Generator]:
    """One generator per seed, seeded with ``seed % 2**32`` as EDM's generate.py does.

    An image then depends on its seed alone, not on batch size, position in the batch or number of GPUs. The
    sampler draws diffusion latents, class labels and stochastic noise from these generators, in that order.
    """
    return [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]


def stacked_randn(generators: Sequence[torch.Generator], shape: Sequence[int], dtype: torch.dtype = torch.float32,
                  device: DeviceLike = None) -> torch.Tensor:
    """Stack one ``randn(shape)`` per generator into [len(generators), *shape], advancing each generator."""
    return torch.stack([torch.randn(tuple(shape), generator=gen, dtype=dtype, device=device or gen.device)
                        for gen in generators])


def prior_sigma_max(N: int, sigma_max: float) -> float:
    """sigma_max the PFGM++ prior really uses for images of N values (see :data:`REFERENCE_PRIOR_SIGMA_MAX`)."""
    return REFERENCE_PRIOR_SIGMA_MAX if N < REFERENCE_PRIOR_MAX_DIMENSIONS else float(sigma_max)


def pfgmpp_prior_latents(seeds: Iterable[int], shape: Sequence[int], D: float, sigma_max: float = 80.0,
                         device: DeviceLike = None) -> torch.Tensor:
    """PFGM++ starting points for generation, float64 [len(seeds), *shape], bit-identical to the reference.

    Per seed, the reference re-seeds torch's *global* CPU generator with the seed, draws one Beta(N/2, D/2) value
    with float32 parameters through torch.distributions, then ``randn(N)`` from the same generator, and places the
    normalised direction at radius sqrt(B / (1 - B)) * sigma_max * sqrt(D) in float64. Here a private CPU generator
    per seed replays the same stream (torch's Beta sampler is a two-component Dirichlet draw, whose sampler takes a
    generator), so the caller's global RNG state is left alone. Not clipped: only training clips B.
    """
    D = check_D(D)
    if D is None:
        raise ValueError('pfgmpp_prior_latents needs a finite D; use prior_latents for diffusion')
    shape = tuple(int(size) for size in shape)
    N = math.prod(shape)
    sigma_max = prior_sigma_max(N, sigma_max)
    beta_parameters = torch.tensor([[N / 2, D / 2]], dtype=torch.float32)
    latents = []
    for seed in seeds:
        gen = torch.Generator('cpu').manual_seed(int(seed))
        beta = torch._sample_dirichlet(beta_parameters, generator=gen)[:, 0].to(torch.float64)
        # Two separate products, in the reference's order, to keep its float64 rounding.
        radius = (beta / (1 - beta)).sqrt() * sigma_max * math.sqrt(D)
        direction = torch.randn(N, generator=gen)
        # float32 unit vector times the float64 radius: the product is float64, as in the reference.
        latents.append((direction / direction.norm()) * radius)
    return torch.stack(latents).reshape(-1, *shape).to(device)


def prior_latents(seeds: Iterable[int], shape: Sequence[int], D: Optional[float] = None, sigma_max: float = 80.0,
                  device: DeviceLike = None, generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
    """Starting points x_0 of generation for each seed, float64 [len(seeds), *shape].

    Finite D: :func:`pfgmpp_prior_latents`. Its draws use private generators seeded with the bare seed, so the
    per-seed generators that the sampler keeps for labels and stochastic noise are *not* advanced, which is how
    the reference behaves (its latents come from the re-seeded global generator).

    Diffusion (D None or inf): a float32 ``randn(shape)`` from each per-seed generator, in float64 times
    ``sigma_max``. Pass the sampler's ``generators`` (see :func:`seed_generators`) so that its later draws continue
    the same streams; without them fresh generators are made and discarded. The EDM sampler scales by its first
    time step t_0 (the network's rounding of sigma_max), so it should pass sigma_max=t_0.
    """
    seeds = list(seeds)
    if not is_diffusion(D):
        return pfgmpp_prior_latents(seeds, shape, D, sigma_max=sigma_max, device=device)
    if generators is None:
        generators = seed_generators(seeds, device or 'cpu')
    if len(generators) != len(seeds):
        raise ValueError(f'got {len(generators)} generators for {len(seeds)} seeds')
    return stacked_randn(generators, shape).to(device=device, dtype=torch.float64) * sigma_max

#----------------------------------------------------------------------------
# Stable target field.

def kernel_log_weight(squared_distance: torch.Tensor, sigma: torch.Tensor, N: int, D: Optional[float]) -> torch.Tensor:
    """log p(x | y) up to a constant, from |x - y|^2, for the kernel at noise level sigma.

    Gaussian: -|x - y|^2 / (2 sigma^2). PFGM++: the kernel density is proportional to (|x - y|^2 + r^2)^(-(N+D)/2)
    with r = sigma * sqrt(D), i.e. the N+D-dimensional distance between (x, r) and (y, 0).
    """
    D = check_D(D)
    if D is None:
        return squared_distance / (-2 * sigma.square())
    return torch.log(squared_distance + sigma.square() * D) * (-(N + D) / 2)


def stable_target_field(noisy: torch.Tensor, sigma: SigmaLike, reference: torch.Tensor, D: Optional[float] = None,
                        chunk_size: int = STF_CHUNK_SIZE) -> torch.Tensor:
    """Stable target field (Xu et al., 2023): the posterior mean of the clean image over a reference batch.

    For each noisy image x_i, returns sum_j w_ij y_j with w_ij = softmax_j log p(x_i | y_j) under the perturbation
    kernel (Gaussian for D None/inf, PFGM++ otherwise). The reference batch should contain the clean images that
    produced ``noisy``. Computed in float64 with a streaming softmax over chunks of ``chunk_size`` reference images,
    so memory grows with the batch and one chunk, never with batch x reference x pixels (a reference batch of 4096
    CIFAR images is fine). Returns a tensor shaped and typed like ``noisy``; no gradient flows through it.
    """
    with torch.no_grad():
        batch_size = noisy.shape[0]
        N = noisy[0].numel()
        if reference.ndim < 1 or reference[0].numel() != N:
            raise ValueError(f'reference images must match the noisy images ({tuple(noisy.shape[1:])}), '
                             f'got {tuple(reference.shape)}')
        x = noisy.reshape(batch_size, N).to(torch.float64)
        x_squared = x.square().sum(dim=1, keepdim=True)
        sigma = _per_sample_sigma(sigma, batch_size, noisy.device).to(torch.float64).reshape(batch_size, 1)
        running_max = torch.full([batch_size, 1], -math.inf, dtype=torch.float64, device=noisy.device)
        running_total = torch.zeros([batch_size, 1], dtype=torch.float64, device=noisy.device)
        weighted_sum = torch.zeros([batch_size, N], dtype=torch.float64, device=noisy.device)
        for chunk in reference.reshape(-1, N).split(chunk_size):
            y = chunk.to(device=noisy.device, dtype=torch.float64)
            # |x - y|^2 expanded into a matrix product; clamp the tiny negative values rounding can produce.
            squared_distance = (x_squared - 2 * (x @ y.T) + y.square().sum(dim=1)).clamp_min(0)
            log_weight = kernel_log_weight(squared_distance, sigma, N, D)
            new_max = torch.maximum(running_max, log_weight.amax(dim=1, keepdim=True))
            rescale = torch.exp(running_max - new_max)
            weight = torch.exp(log_weight - new_max)
            running_total = running_total * rescale + weight.sum(dim=1, keepdim=True)
            weighted_sum = weighted_sum * rescale + weight @ y
            running_max = new_max
        return (weighted_sum / running_total).reshape(noisy.shape).to(noisy.dtype)

#----------------------------------------------------------------------------
