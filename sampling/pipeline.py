"""Seeds -> latents -> sampler -> uint8: the generation pipeline that ``generate.py`` and ``fid.py gen`` share.

An image depends only on its seed: latents, class labels and in-loop noise come from one generator per seed
(:class:`sampling.schedules.PerSeedRandom`), whatever the batch composition. :func:`sampler_name` picks the sampler
from the options as EDM's CLI does (any ablation axis selects the ablation sampler; ``dpmpp2m|dpmpp3m|ipndm|unipc|
restart`` the fast solvers); a consistency model (``training.consistency``) gets its own 1/2/4-step sampler
(:mod:`sampling.consistency`) whatever the options, which refuses ODE-solver options.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from torch_utils import misc
from training import pfgmpp as pfgmpp_lib
from sampling import consistency
from sampling.schedules import Denoiser, EDM_SIGMA_MAX, PerSeedRandom
from sampling.edm import ablation_sampler, edm_sampler
from sampling.fast_solvers import (ALL_SOLVERS, DEFAULT_SOLVER_ORDER, FAST_SOLVERS, MULTISTEP_ORDER, RESTART_REPEATS,
                                   RESTART_STEPS, check_solver_order, default_spacing, fast_sampler)


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
    """Which sampler the options select: 'edm', 'ablation' or the name of a fast solver (:data:`FAST_SOLVERS`).

    Raises ValueError (one line) for combinations that do not fit: an unknown solver, ablation axes or churn
    with a fast solver, restart options without the restart solver, ``spacing`` with the ablation sampler
    (which spaces its steps by ``discretization``), noise injection with a fast solver, ``solver_order`` with a
    solver that has no choosable order (:func:`sampling.fast_solvers.check_solver_order`).
    """
    kwargs = {k: v for k, v in sampler_kwargs.items() if v is not None}
    solver = kwargs.get('solver')
    if solver is not None and solver not in ALL_SOLVERS:
        raise ValueError(f'unknown solver {solver!r}; expected one of {"|".join(ALL_SOLVERS)}')
    if solver not in FAST_SOLVERS:
        restart = [key for key in RESTART_OPTIONS if key in kwargs]
        if restart:
            raise ValueError(f'{restart[0]} only applies to the restart solver')
        check_solver_order(solver, kwargs.get('solver_order'))
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


def recorded_sampler_kwargs(sampler_kwargs: dict) -> dict:
    """The sampler keywords as a record of what made the pixels (manifests, JSON lines): None values dropped,
    UniPC's predictor order and spacing spelled out even when they are defaults (so that a record names them),
    and iPNDM's order dropped when it is the default (so that the same pixels have one record)."""
    kwargs = {k: v for k, v in sampler_kwargs.items() if v is not None}
    solver = kwargs.get('solver')
    if solver == 'unipc':
        kwargs.setdefault('spacing', default_spacing(solver))
        kwargs.setdefault('solver_order', DEFAULT_SOLVER_ORDER[solver])
    elif solver == 'ipndm' and kwargs.get('solver_order') == DEFAULT_SOLVER_ORDER[solver]:
        del kwargs['solver_order']
    return kwargs


def sampler_nfe(num_steps: int, sampler_kwargs: dict) -> int:
    """Network evaluations per image for ``num_steps`` time steps with these sampler options.

    EDM / ablation Heun: 2 per step except the last; Euler and the multistep solvers (DPM-Solver++, iPNDM, UniPC,
    whose corrector reuses the next step's evaluation): 1 per step; Restart: Heun's
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


class NonFiniteError(ValueError):
    """Samples or network weights that hold NaN or infinity; the message is one line naming the seeds or file."""


#: Seeds named in a non-finite error before "and N more".
SEEDS_LISTED = 4


def _describe_seeds(seeds: Sequence[int]) -> str:
    shown = ', '.join(str(s) for s in seeds[:SEEDS_LISTED])
    more = f' and {len(seeds) - SEEDS_LISTED} more' if len(seeds) > SEEDS_LISTED else ''
    return f'seed{"s" if len(seeds) > 1 else ""} {shown}{more}'


def check_finite_weights(net: Any, source: str) -> None:
    """Raise :class:`NonFiniteError` (one line naming ``source``, e.g. the --network path, and the first tensors)
    when a parameter or buffer of ``net`` holds NaN or infinity: such a network samples NaN everywhere."""
    problem = misc.non_finite_summary(net)
    if problem:
        raise NonFiniteError(f'{source}: {problem}; it cannot make images (a diverged or damaged snapshot: use an '
                             f'earlier one)')


def check_finite_samples(net: Any, seeds: Sequence[int], images: torch.Tensor) -> None:
    """Raise :class:`NonFiniteError` naming the seeds whose float samples ``images`` [N, C, H, W] hold NaN or
    infinity, and the likely cause, before any cast to uint8 would turn them into black pixels."""
    finite = torch.isfinite(images.detach()).reshape(images.shape[0], -1).all(dim=1)
    if bool(finite.all()):
        return
    bad = [int(s) for s, ok in zip(seeds, finite.tolist()) if not ok]
    weights = misc.non_finite_tensors(net)
    if weights:
        cause = f'the network holds non-finite weights (e.g. {weights[0][0]})'
    else:
        cause = ('float16/bfloat16 overflow (try --precision=fp32) or extreme sampler settings '
                 '(--sigma_min, --sigma_max, --guidance)')
    raise NonFiniteError(f'{_describe_seeds(bad)} ({len(bad)} of {len(seeds)} in the batch) sampled NaN or '
                         f'infinity, so no image is written for them; likely cause: {cause}')


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map samples in [-1, 1] to uint8 like the reference: (x * 127.5 + 128) clipped, then truncated.

    Raises :class:`NonFiniteError` for NaN or infinite samples, which the cast would turn into black or white
    pixels (:func:`sample_batch` names the seeds first).
    """
    if not bool(torch.isfinite(images).all()):
        raise NonFiniteError('samples hold NaN or infinity; refusing to turn them into pixels')
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
    solver dpmpp2m|dpmpp3m|ipndm|unipc|restart (Restart's noise comes from the per-seed generators, after the labels).
    None values mean
    "use the default" (as click passes unset options). ``memory_format`` is the layout of the sampler state;
    None follows the network's convolution weights (channels_last after ``net.to(memory_format=...)``).
    Raises :class:`NonFiniteError` naming the seeds whose samples hold NaN or infinity, and the sampler's
    ValueError (naming keywords) for settings the network cannot honour.
    """
    images = _sample(net, seeds, device, class_idx, D, memory_format, sampler_kwargs)
    check_finite_samples(net, seeds, images)
    return images


def _sample(net: Denoiser, seeds: Sequence[int], device: Union[str, torch.device], class_idx: Optional[int],
            D: Optional[float], memory_format: Optional[torch.memory_format], sampler_kwargs: dict) -> torch.Tensor:
    kwargs = {k: v for k, v in sampler_kwargs.items() if v is not None}
    if consistency.is_consistency_model(net):
        return _sample_consistency(net, seeds, device, class_idx, D, memory_format, kwargs)
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
    padded = BatchPadded(net)
    with torch.no_grad():
        if ablation:
            images = ablation_sampler(padded, latents, labels, randn_like=rnd.randn_like, **kwargs)
        elif name in FAST_SOLVERS:
            # Churn settings are inert without churn (sampler_name refused S_churn > 0).
            fast_kwargs = {k: v for k, v in kwargs.items() if k not in ('S_churn', 'S_min', 'S_max', 'S_noise')}

            def renoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
                return rnd.perturbation(x, sigma, D)
            images = fast_sampler(padded, latents, labels, renoise=renoise, D=D, **fast_kwargs)
        else:
            images = edm_sampler(padded, latents, labels, randn_like=rnd.randn_like, D=D, **kwargs)
    return images


def _sample_consistency(net: Denoiser, seeds: Sequence[int], device: Union[str, torch.device],
                        class_idx: Optional[int], D: Optional[float], memory_format: Optional[torch.memory_format],
                        kwargs: dict) -> torch.Tensor:
    """:func:`sampling.consistency.consistency_sampler` for a consistency model: latents, labels and re-noising
    from the per-seed generators, in that order."""
    consistency.check_request(True, kwargs)
    sigma_max = min(kwargs.get('sigma_max', EDM_SIGMA_MAX), net.sigma_max)
    rnd = PerSeedRandom(seeds, device)
    latents = draw_latents(net, seeds, rnd, D=D, sigma_max=sigma_max)
    latents = latents.contiguous(memory_format=memory_format or network_memory_format(net))
    labels = draw_class_labels(net, rnd, class_idx)

    def renoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return rnd.perturbation(x, sigma, D)
    with torch.no_grad():
        return consistency.consistency_sampler(BatchPadded(net), latents, labels, renoise, kwargs['num_steps'],
                                               sigma_max, scale_latents=pfgmpp_lib.is_diffusion(D))


class _NoiseLevelProbe:
    """A stand-in denoiser with ``net``'s interface that returns its input and records every sigma it is given."""

    def __init__(self, net: Denoiser) -> None:
        self.img_resolution, self.img_channels = net.img_resolution, net.img_channels
        self.label_dim, self.sigma_min, self.sigma_max = net.label_dim, net.sigma_min, net.sigma_max
        self.round_sigma = net.round_sigma
        self.consistency = consistency.is_consistency_model(net)
        self.levels: list[float] = []

    def __call__(self, x: torch.Tensor, sigma: Any, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.levels.extend(float(s) for s in torch.as_tensor(sigma).reshape(-1).tolist())
        return x


def evaluated_noise_levels(net: Denoiser, D: Optional[float] = None, class_idx: Optional[int] = None,
                           **sampler_kwargs: Any) -> list[float]:
    """The distinct noise levels (sorted, float) at which the sampler these options select evaluates ``net``.

    A dry run of :func:`sample_batch` for one seed on CPU with a stand-in that returns its input: it costs no
    network evaluation, and raises the sampler's ValueError for settings the network cannot honour before any
    image or record is written. Churn levels depend on the noise drawn, so they are those of seed 0.
    """
    probe = _NoiseLevelProbe(net)
    with torch.no_grad():
        _sample(probe, [0], 'cpu', class_idx, D, torch.contiguous_format, sampler_kwargs)
    return sorted(set(probe.levels))


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
