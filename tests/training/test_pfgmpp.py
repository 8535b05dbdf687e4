"""PFGM++ kernel, prior, alignment helpers and stable target field (training/pfgmpp.py).

The kernel is random, so it is checked statistically against exact laws (scipy), always with fixed seeds. Each
statistical check comes with a negative control showing that the same check rejects a wrong D or a Gaussian in
place of the kernel, so a passing test is evidence rather than a formality.
"""

from __future__ import annotations

import functools
import math
import pickle

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from training.loss import DEFAULT_BETA_CLIP

from tests._tolerance import NORMAL_DRAW_STEPS, assert_within, randn_bits_match_golden, sum_steps
from training import pfgmpp

# Significance used to accept a true hypothesis, and the p-value below which a false one counts as rejected.
ACCEPT_P = 1e-3
REJECT_P = 1e-8

CIFAR_N = 3 * 32 * 32
HIGH_RES_N = 3 * 256 * 256
HUGE_D = 3_072_000


def image_shape(N: int) -> tuple[int, ...]:
    side = math.isqrt(N // 3)
    assert 3 * side * side == N
    return (3, side, side)


@functools.lru_cache(maxsize=None)
def draw(N: int, D: float | None, num_samples: int = 4000, seed: int = 0, clip_beta: float | None = None):
    """Kernel draws with log-uniform per-sample sigma; returns (noise float32 [M, N], sigma float64 [M])."""
    gen = torch.Generator().manual_seed(seed)
    sigma = torch.exp(torch.empty(num_samples, dtype=torch.float64).uniform_(-3, 4, generator=gen))
    noise = pfgmpp.sample_perturbation((num_samples, *image_shape(N)), sigma, D=D, generator=gen,
                                       clip_beta=clip_beta)
    assert noise.dtype == torch.float32
    return noise.reshape(num_samples, N), sigma


def squared_norms(noise: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(noise, dim=1, dtype=torch.float64).square()


def squared_norm_in_radii(noise: torch.Tensor, sigma: torch.Tensor, D: float) -> np.ndarray:
    """|n|^2 / r^2 with r = sigma sqrt(D): beta-prime(N/2, D/2) distributed under the kernel."""
    return (squared_norms(noise) / (sigma.square() * D)).numpy()


def norm_ks_pvalue(noise: torch.Tensor, sigma: torch.Tensor, D: float) -> float:
    N = noise.shape[1]
    return scipy.stats.kstest(squared_norm_in_radii(noise, sigma, D), scipy.stats.betaprime(N / 2, D / 2).cdf).pvalue


def gaussian_like(N: int, num_samples: int = 4000, seed: int = 0):
    """Gaussian noise with the same per-sample sigmas as :func:`draw` (the wrong hypothesis for finite D)."""
    _, sigma = draw(N, 128, num_samples, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(num_samples, N, generator=gen) * sigma[:, None].float(), sigma

#----------------------------------------------------------------------------
# Norm distribution.

KS_CASES = [(CIFAR_N, 128), (CIFAR_N, 2048), (3 * 64 * 64, 128), (3 * 16 * 16, 3)]


@pytest.mark.parametrize('N, D', KS_CASES)
def test_norm_follows_scaled_beta_prime(N: int, D: float) -> None:
    noise, sigma = draw(N, D)
    assert norm_ks_pvalue(noise, sigma, D) > ACCEPT_P


@pytest.mark.parametrize('N, D', KS_CASES[:3])
def test_norm_test_rejects_wrong_D_and_gaussian(N: int, D: float) -> None:
    noise, sigma = draw(N, D)
    # Twice or half the true D. (The norm law depends on D mainly through its spread, sqrt(2/D + 2/N) relative,
    # so much smaller errors in D need many more samples; at D = 2048 this is about the smallest error these
    # 4000 samples detect.)
    for wrong_D in (D * 2, D / 2):
        assert norm_ks_pvalue(noise, sigma, wrong_D) < REJECT_P, wrong_D
    gaussian, sigma = gaussian_like(N)
    assert norm_ks_pvalue(gaussian, sigma, D) < REJECT_P


@pytest.mark.parametrize('N, D', [(CIFAR_N, 128), (CIFAR_N, 2048), (3 * 64 * 64, 128), (CIFAR_N, HUGE_D),
                                  (CIFAR_N, None)])
def test_mean_squared_norm(N: int, D: float | None) -> None:
    """E|n|^2 = sigma^2 N D / (D - 2), i.e. per-dimension variance per_dimension_std(sigma, D)^2 -> sigma^2."""
    noise, sigma = draw(N, D)
    per_dim_var = (squared_norms(noise) / N / sigma.square()).numpy()
    expected = pfgmpp.per_dimension_std(1.0, D) ** 2
    standard_error = per_dim_var.std(ddof=1) / math.sqrt(len(per_dim_var))
    assert abs(per_dim_var.mean() - expected) < 4 * standard_error
    # Power: the Gaussian's 1 is distinguishable from D/(D-2) at D = 128 with these samples.
    if D == 128:
        assert abs(per_dim_var.mean() - 1) > 4 * standard_error

#----------------------------------------------------------------------------
# Direction.

def projection_ks_pvalue(noise: torch.Tensor, axis: torch.Tensor) -> float:
    """KS p-value of <u, axis> for u = n/|n|: uniform on the sphere means (t + 1)/2 ~ Beta((N-1)/2, (N-1)/2)."""
    N = noise.shape[1]
    t = (noise.double() @ axis) / squared_norms(noise).sqrt()
    half = (N - 1) / 2
    return scipy.stats.kstest(((t + 1) / 2).numpy(), scipy.stats.beta(half, half).cdf).pvalue


@pytest.mark.parametrize('N, D', [(CIFAR_N, 128), (3 * 16 * 16, 3)])
def test_direction_is_uniform_and_independent_of_norm(N: int, D: float) -> None:
    noise, _ = draw(N, D)
    gen = torch.Generator().manual_seed(123)
    random_axis = torch.randn(N, generator=gen, dtype=torch.float64)
    axes = [random_axis / random_axis.norm(), torch.eye(N, dtype=torch.float64)[0],
            torch.eye(N, dtype=torch.float64)[N - 1]]
    for axis in axes:
        assert projection_ks_pvalue(noise, axis) > ACCEPT_P
    # The direction must not depend on the radius.
    cosine = (noise.double() @ axes[0]) / squared_norms(noise).sqrt()
    assert scipy.stats.spearmanr(squared_norms(noise), cosine.abs()).pvalue > ACCEPT_P
    # Power: a direction stretched by 50% along one axis is rejected by the same check.
    stretched = noise.clone()
    stretched[:, 0] *= 1.5
    assert projection_ks_pvalue(stretched, axes[1]) < REJECT_P

#----------------------------------------------------------------------------
# Diffusion limit.

def chi_square_ks_pvalue(noise: torch.Tensor, sigma: torch.Tensor) -> float:
    """KS p-value of |n|^2 / sigma^2 against chi^2(N), the law of Gaussian noise."""
    N = noise.shape[1]
    return scipy.stats.kstest((squared_norms(noise) / sigma.square()).numpy(), scipy.stats.chi2(N).cdf).pvalue


def test_huge_D_is_indistinguishable_from_gaussian() -> None:
    noise, sigma = draw(CIFAR_N, HUGE_D)
    assert chi_square_ks_pvalue(noise, sigma) > ACCEPT_P
    # Coordinates pooled over all samples: N(0, 1) after dividing by sigma.
    coordinates = (noise[:100].double() / sigma[:100, None]).reshape(-1)[:200_000].numpy()
    assert scipy.stats.kstest(coordinates, scipy.stats.norm.cdf).pvalue > ACCEPT_P
    # Power: at D = 2048 the same norm check already tells the kernel from a Gaussian.
    noise_2048, sigma_2048 = draw(CIFAR_N, 2048)
    assert chi_square_ks_pvalue(noise_2048, sigma_2048) < REJECT_P


def test_gaussian_path_is_sigma_times_randn() -> None:
    shape = (5, 3, 4, 4)
    sigma = torch.linspace(0.1, 3.0, 5)
    expected = torch.randn(shape, generator=torch.Generator().manual_seed(7)) * sigma.view(-1, 1, 1, 1)
    for D in (None, math.inf):
        noise = pfgmpp.sample_perturbation(shape, sigma.view(-1, 1, 1, 1), D=D,
                                           generator=torch.Generator().manual_seed(7))
        assert torch.equal(noise, expected)
    scalar = pfgmpp.sample_perturbation(shape, 2.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(scalar, torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 2.0)

#----------------------------------------------------------------------------
# Extreme N and D, clipping.

@pytest.mark.parametrize('D', [1, 128, HUGE_D])
def test_high_resolution_and_extreme_D_stay_finite(D: float) -> None:
    sigma = torch.tensor([0.002, 1.0, 80.0, 380.0])
    noise = pfgmpp.sample_perturbation((4, *image_shape(HIGH_RES_N)), sigma, D=D,
                                       generator=torch.Generator().manual_seed(1))
    norms = noise.double().flatten(1).norm(dim=1)
    assert torch.isfinite(noise).all() and (norms > 0).all()
    if D > 2:  # typical norm is sigma sqrt(N D / (D - 2)) up to the kernel's spread
        typical = sigma.double() * math.sqrt(HIGH_RES_N) * pfgmpp.per_dimension_std(1.0, D)
        assert ((norms / typical - 1).abs() < 0.5).all()


@pytest.mark.parametrize('N, D', [(HIGH_RES_N, 128), (HIGH_RES_N, HUGE_D), (CIFAR_N, HUGE_D)])
def test_radius_law_for_large_parameters(N: int, D: float) -> None:
    """The Beta(N/2, D/2) part alone, with many draws, where B is extremely close to 0 or 1."""
    ratio = pfgmpp.sample_radius_ratio(20_000, N, D, generator=torch.Generator().manual_seed(2))
    assert ratio.dtype == torch.float64 and torch.isfinite(ratio).all()
    law = scipy.stats.betaprime(N / 2, D / 2)
    assert scipy.stats.kstest(ratio.square().numpy(), law.cdf).pvalue > ACCEPT_P
    assert scipy.stats.kstest((ratio * 1.01).square().numpy(), law.cdf).pvalue < REJECT_P


def test_beta_clip_bounds_the_draw() -> None:
    eps = DEFAULT_BETA_CLIP
    low, high = math.sqrt(eps / (1 - eps)), math.sqrt((1 - eps) / eps)
    # With D = 3,072,000 and N = 3072, E[B] is about 1e-3: roughly half the draws fall below the clip.
    exact = pfgmpp.sample_radius_ratio(4000, CIFAR_N, HUGE_D, generator=torch.Generator().manual_seed(3))
    clipped = pfgmpp.sample_radius_ratio(4000, CIFAR_N, HUGE_D, generator=torch.Generator().manual_seed(3),
                                         clip_beta=eps)
    assert exact.min() < low
    assert torch.equal(clipped, exact.clamp(low, high))
    assert 0.3 < (clipped == low).double().mean() < 0.7
    # Through sample_perturbation: the norms respect the bound too.
    noise, sigma = draw(CIFAR_N, HUGE_D, 1000, 4, clip_beta=eps)
    in_radii = np.sqrt(squared_norm_in_radii(noise, sigma, HUGE_D))
    assert in_radii.min() >= low * (1 - 1e-6)
    # For D = 128 the clip almost never binds, so the clipped kernel still passes the exact law.
    noise, sigma = draw(CIFAR_N, 128, clip_beta=eps)
    assert norm_ks_pvalue(noise, sigma, 128) > ACCEPT_P
    with pytest.raises(ValueError):
        pfgmpp.sample_radius_ratio(2, CIFAR_N, 128, clip_beta=0.7)

#----------------------------------------------------------------------------
# Randomness: generators, devices, global state.

def test_same_seed_same_noise_and_no_global_rng_use() -> None:
    shape, sigma = (6, 3, 8, 8), torch.full([6, 1, 1, 1], 1.5)
    global_state = torch.get_rng_state()
    first = pfgmpp.sample_perturbation(shape, sigma, D=64, generator=torch.Generator().manual_seed(11))
    again = pfgmpp.sample_perturbation(shape, sigma, D=64, generator=torch.Generator().manual_seed(11))
    other = pfgmpp.sample_perturbation(shape, sigma, D=64, generator=torch.Generator().manual_seed(12))
    assert torch.equal(global_state, torch.get_rng_state())
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    gen = torch.Generator().manual_seed(11)
    pfgmpp.sample_perturbation(shape, sigma, D=64, generator=gen)
    assert not torch.equal(first, pfgmpp.sample_perturbation(shape, sigma, D=64, generator=gen))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('D', [128, None])
def test_devices_agree_in_distribution(D: float | None) -> None:
    shape = (4000, 3, 16, 16)
    sigma = torch.full([4000], 2.0, dtype=torch.float64)
    on_cpu = pfgmpp.sample_perturbation(shape, sigma, D=D, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator('cuda').manual_seed(5)
    on_gpu = pfgmpp.sample_perturbation(shape, sigma.cuda(), D=D, generator=gen)
    assert on_gpu.device.type == 'cuda' and torch.isfinite(on_gpu).all()
    cpu, gpu = on_cpu.flatten(1).double(), on_gpu.cpu().flatten(1).double()
    assert scipy.stats.ks_2samp(cpu.norm(dim=1), gpu.norm(dim=1)).pvalue > ACCEPT_P
    assert scipy.stats.ks_2samp(cpu[:, 0], gpu[:, 0]).pvalue > ACCEPT_P
    again = pfgmpp.sample_perturbation(shape, sigma.cuda(), D=D, generator=torch.Generator('cuda').manual_seed(5))
    assert torch.equal(on_gpu, again)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_no_host_synchronisation_on_cuda() -> None:
    gen = torch.Generator('cuda').manual_seed(0)
    sigma = torch.rand([64, 1, 1, 1], device='cuda') + 0.1
    reference = torch.rand([300, 3, 16, 16], device='cuda')
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        noise = pfgmpp.sample_perturbation((64, 3, 16, 16), sigma, D=128, generator=gen,
                                           clip_beta=DEFAULT_BETA_CLIP)
        pfgmpp.stable_target_field(reference[:64] + noise, sigma, reference, D=128, chunk_size=128)
    finally:
        torch.cuda.set_sync_debug_mode('default')


def test_bad_arguments() -> None:
    for bad_D in (0, 0.5, -3, math.nan):
        with pytest.raises(ValueError):
            pfgmpp.sample_perturbation((2, 4), 1.0, D=bad_D)
    with pytest.raises(ValueError):
        pfgmpp.sample_perturbation((3, 4), torch.ones(2), D=8)

#----------------------------------------------------------------------------
# The kernel's one representation (D) and its mapping from the original's pfgmpp/D attributes and flags.

@pytest.mark.parametrize('bad_D', [0, 0.0, 0.5, -3, -math.inf, math.nan, '128', True, [128], object()])
def test_check_D_refuses_everything_but_a_number_at_least_one(bad_D) -> None:
    with pytest.raises(ValueError, match=r'^PFGM\+\+ needs D >= 1 augmented dimensions \(or None/inf for diffusion\), '
                                         r'got D=') as info:
        pfgmpp.check_D(bad_D)
    assert '\n' not in str(info.value)


def test_check_D_diffusion_and_finite_values() -> None:
    assert pfgmpp.check_D(None) is None and pfgmpp.check_D(math.inf) is None and pfgmpp.check_D(float('inf')) is None
    assert pfgmpp.is_diffusion(None) and pfgmpp.is_diffusion(math.inf) and not pfgmpp.is_diffusion(1)
    for D in (1, 2.5, 128, 3_072_000, np.int64(64), np.float64(8.0)):
        assert pfgmpp.check_D(D) == D and type(pfgmpp.check_D(D)) is type(D)  # kept as given (manifests, attributes)


class _Attrs:
    def __init__(self, **attrs) -> None:
        self.__dict__.update(attrs)


def test_original_attributes_map_to_D() -> None:
    # Pickles of the original PFGM++ code carry pfgmpp and D (D=128 by default even on diffusion networks).
    assert pfgmpp.network_D(_Attrs(pfgmpp=True, D=128)) == 128
    assert pfgmpp.network_D(_Attrs(pfgmpp=False, D=128)) is None
    assert pfgmpp.network_D(_Attrs(pfgmpp=False, D=0)) is None  # D is meaningless without the flag
    assert pfgmpp.network_D(_Attrs(pfgmpp=1, D=2048.0)) == 2048.0
    # NVIDIA's EDM networks record neither: diffusion, or what the caller resolved for them.
    assert pfgmpp.network_D(_Attrs()) is None and pfgmpp.network_D(_Attrs(), undeclared=64) == 64
    assert pfgmpp.declares_kernel(_Attrs(D=8)) and not pfgmpp.declares_kernel(_Attrs())
    for bad in (_Attrs(pfgmpp=True), _Attrs(pfgmpp=True, D=None), _Attrs(pfgmpp=True, D=math.inf),
                _Attrs(pfgmpp=True, D=0)):
        with pytest.raises(ValueError, match='D'):
            pfgmpp.network_D(bad)
    # ... and back: the preconditioners' constructor keywords for a kernel.
    assert pfgmpp.network_kwargs(None) == pfgmpp.network_kwargs(math.inf) == dict(pfgmpp=False)
    assert pfgmpp.network_kwargs(64) == dict(pfgmpp=True, D=64)
    assert pfgmpp.flags_D(False, 128) is None and pfgmpp.flags_D(True, 128) == 128
    with pytest.raises(ValueError, match='finite'):
        pfgmpp.flags_D(True, None)


def test_original_pfgmpp_pickle_maps_to_its_D(golden_dir) -> None:
    """The original PFGM++ code's training state (its classes, from the embedded source) carries pfgmpp=True, D=128."""
    state = torch.load(golden_dir / 'snapshots' / 'training-state-000000.pt', map_location='cpu', weights_only=False)
    ema = state['ema']
    assert not type(ema).__module__.startswith('training')
    assert pfgmpp.network_D(ema) == 128 and pfgmpp.resolve_D(ema) == 128 and pfgmpp.resolve_D(ema, True, 128) == 128
    with pytest.raises(pfgmpp.KernelError, match='contradicts'):
        pfgmpp.resolve_D(ema, False, None)


def test_our_pickled_networks_keep_the_original_attributes() -> None:
    from training import networks
    kwargs = dict(img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1], num_blocks=1,
                  attn_resolutions=[])
    for D in (None, 64):
        net = networks.EDMPrecond(**kwargs, **pfgmpp.network_kwargs(D))
        loaded = pickle.loads(pickle.dumps(net))
        assert (loaded.pfgmpp, loaded.D, loaded.N) == ((False, 128, 192) if D is None else (True, 64, 192))
        assert pfgmpp.network_D(loaded) == D and pfgmpp.resolve_D(loaded) == D
    with pytest.raises(ValueError, match='EDMPrecond: PFGM'):
        networks.EDMPrecond(**kwargs, pfgmpp=True, D=0)


@pytest.mark.parametrize('attrs, flags, expected', [
    (dict(pfgmpp=True, D=64), (None, None), 64),
    (dict(pfgmpp=True, D=64), (True, 64), 64),
    (dict(pfgmpp=False, D=128), (None, None), None),
    (dict(pfgmpp=False, D=128), (False, None), None),
    (dict(pfgmpp=True, D=None), (None, 32), 32),
    (dict(), (None, None), None),
    (dict(), (False, None), None),
    (dict(), (True, 16), 16),
])
def test_flags_resolve_to_D(attrs, flags, expected) -> None:
    assert pfgmpp.resolve_D(_Attrs(**attrs), *flags) == expected


@pytest.mark.parametrize('attrs, flags, option, fragment', [
    (dict(pfgmpp=True, D=64), (False, None), 'pfgmpp', 'contradicts'),
    (dict(pfgmpp=False, D=128), (True, None), 'pfgmpp', 'contradicts'),
    (dict(pfgmpp=True, D=64), (None, 128), 'aug_dim', 'D=64'),
    (dict(pfgmpp=False, D=128), (None, 64), 'aug_dim', 'diffusion'),
    (dict(pfgmpp=True, D=None), (None, None), 'aug_dim', 'does not record D'),
    (dict(), (True, None), 'aug_dim', 'needs aug_dim'),
    (dict(), (None, 64), 'aug_dim', 'only applies'),
    (dict(), (True, 0), 'aug_dim', 'D >= 1'),
    (dict(), (True, math.inf), 'aug_dim', 'finite'),
])
def test_contradicting_flags_name_the_flag(attrs, flags, option, fragment) -> None:
    with pytest.raises(pfgmpp.KernelError, match=fragment) as info:
        pfgmpp.resolve_D(_Attrs(**attrs), *flags)
    assert info.value.option == option and isinstance(info.value, ValueError)

#----------------------------------------------------------------------------
# Alignment helpers.

def test_alignment_helpers() -> None:
    assert pfgmpp.sigma_to_radius(2.0, 128) == pytest.approx(2.0 * math.sqrt(128))
    assert pfgmpp.radius_to_sigma(pfgmpp.sigma_to_radius(0.37, 2048), 2048) == pytest.approx(0.37)
    assert pfgmpp.sigma_to_radius(1.0, None) == math.inf
    with pytest.raises(ValueError):
        pfgmpp.radius_to_sigma(5.0, math.inf)
    assert pfgmpp.per_dimension_std(3.0, None) == 3.0
    assert pfgmpp.per_dimension_std(3.0, math.inf) == 3.0
    assert pfgmpp.per_dimension_std(1.0, 10) == pytest.approx(math.sqrt(10 / 8))
    assert pfgmpp.per_dimension_std(1.0, 2) == math.inf
    sigma = torch.tensor([0.5, 2.0])
    assert torch.allclose(pfgmpp.per_dimension_std(sigma, 128), sigma * math.sqrt(128 / 126))
    assert torch.allclose(pfgmpp.radius_to_sigma(pfgmpp.sigma_to_radius(sigma, 64), 64), sigma)

#----------------------------------------------------------------------------
# Generation prior.

def test_prior_reproduces_golden_latents(golden_dir) -> None:
    golden = torch.load(golden_dir / 'sampler' / 'pfgmpp_D128.pt', weights_only=True)
    shape = golden['latents'].shape[1:]
    global_state = torch.get_rng_state()
    latents = pfgmpp.prior_latents(golden['seeds'], shape, D=golden['D'])
    assert torch.equal(global_state, torch.get_rng_state())
    assert latents.dtype == torch.float64
    if randn_bits_match_golden():
        assert torch.equal(latents, golden['latents'])
        assert torch.equal(latents.flatten(1).norm(dim=1), golden['latent_norms'])
    else:  # float32 normal draws, normalised (a sum over N) and scaled by the radius (tests/_tolerance.py)
        k = NORMAL_DRAW_STEPS + sum_steps(latents[0].numel()) + 2
        assert_within(latents, golden['latents'], k, torch.float32, what='latents')
        assert_within(latents.flatten(1).norm(dim=1), golden['latent_norms'], k, torch.float32, what='norms')


def test_prior_leaves_sampler_generators_alone_for_pfgmpp() -> None:
    generators = pfgmpp.seed_generators([3, 4])
    pfgmpp.prior_latents([3, 4], (3, 8, 8), D=128, generators=generators)
    untouched = pfgmpp.stacked_randn(pfgmpp.seed_generators([3, 4]), (5,))
    assert torch.equal(pfgmpp.stacked_randn(generators, (5,)), untouched)


def test_prior_sigma_max_rule() -> None:
    # Below 256*256*3 values the reference always uses sigma_max = 80 ...
    small = (3, 8, 8)
    assert torch.equal(pfgmpp.prior_latents([0, 1], small, D=128, sigma_max=10.0),
                       pfgmpp.prior_latents([0, 1], small, D=128, sigma_max=80.0))
    # ... above it the caller's sigma_max sets the radius (the reference stops there).
    large = image_shape(HIGH_RES_N)
    at_10 = pfgmpp.prior_latents([0], large, D=128, sigma_max=10.0)
    at_80 = pfgmpp.prior_latents([0], large, D=128, sigma_max=80.0)
    assert torch.allclose(at_10 * 8, at_80, rtol=1e-12, atol=0)


def test_diffusion_prior_continues_the_per_seed_streams() -> None:
    seeds, shape = [0, 1, 2**32 + 5], (3, 4, 4)
    generators = pfgmpp.seed_generators(seeds)
    latents = pfgmpp.prior_latents(seeds, shape, D=None, sigma_max=80.0, generators=generators)
    assert latents.dtype == torch.float64
    # Seed 2**32 + 5 behaves like seed 5 (EDM's seed % 2**32).
    expected = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in (0, 1, 5)])
    assert torch.equal(latents, expected.double() * 80.0)
    # The sampler's next draw continues each stream right after the latents.
    fresh = [torch.Generator().manual_seed(s) for s in (0, 1, 5)]
    for gen, fresh_gen in zip(generators, fresh):
        torch.randn(shape, generator=fresh_gen)
        assert torch.equal(torch.randn(2, generator=gen), torch.randn(2, generator=fresh_gen))
    # Without generators the same latents come from fresh ones.
    assert torch.equal(pfgmpp.prior_latents(seeds, shape, sigma_max=80.0), latents)

#----------------------------------------------------------------------------
# Stable target field.

def brute_force_target(noisy: np.ndarray, sigma: np.ndarray, reference: np.ndarray, D: float | None) -> np.ndarray:
    """Posterior mean written directly: kernel densities of every (noisy, reference) pair, normalised."""
    N = noisy[0].size
    diff = noisy.reshape(len(noisy), 1, N) - reference.reshape(1, len(reference), N)
    squared_distance = (diff ** 2).sum(axis=2)
    if D is None:
        density = np.exp(-squared_distance / (2 * sigma[:, None] ** 2))
    else:
        density = (squared_distance + D * sigma[:, None] ** 2) ** (-(N + D) / 2)
    posterior = density / density.sum(axis=1, keepdims=True)
    return (posterior @ reference.reshape(len(reference), N)).reshape(noisy.shape)


@pytest.mark.parametrize('D', [None, 8, 128])
def test_stf_matches_brute_force(D: float | None) -> None:
    gen = torch.Generator().manual_seed(9)
    reference = torch.rand(7, 3, 2, 2, generator=gen, dtype=torch.float64) * 2 - 1
    sigma = torch.tensor([0.05, 0.3, 0.8, 5.0], dtype=torch.float64)
    noisy = reference[:4] + pfgmpp.sample_perturbation((4, 3, 2, 2), sigma, D=D, generator=gen, dtype=torch.float64)
    expected = brute_force_target(noisy.numpy(), sigma.numpy(), reference.numpy(), D)
    for chunk_size in (1, 3, 512):
        target = pfgmpp.stable_target_field(noisy, sigma, reference, D=D, chunk_size=chunk_size)
        assert target.dtype == torch.float64
        np.testing.assert_allclose(target.numpy(), expected, rtol=1e-9, atol=1e-12)
    # At sigma = 0.8 the target is a genuine average: neither the clean image nor the reference mean.
    assert not np.allclose(expected[2], reference[2].numpy(), atol=1e-2)
    assert not np.allclose(expected[2], reference.mean(dim=0).numpy(), atol=1e-2)


def test_stf_limits() -> None:
    gen = torch.Generator().manual_seed(10)
    reference = torch.rand(50, 3, 4, 4, generator=gen) * 2 - 1
    noisy = reference[:5] + 1e-3 * torch.randn(5, 3, 4, 4, generator=gen)
    # Tiny sigma: the image the noisy one came from; huge sigma: the reference mean.
    for D in (None, 128):
        near = pfgmpp.stable_target_field(noisy, 1e-2, reference, D=D)
        assert torch.allclose(near, reference[:5], atol=1e-4)
        far = pfgmpp.stable_target_field(noisy, 1e4, reference, D=D)
        assert torch.allclose(far, reference.mean(dim=0, keepdim=True).expand(5, -1, -1, -1), atol=1e-4)
    # D -> infinity: the PFGM++ target tends to the diffusion one (at a sigma where the weights are spread out).
    diffusion = pfgmpp.stable_target_field(noisy, 3.0, reference)
    assert torch.allclose(pfgmpp.stable_target_field(noisy, 3.0, reference, D=1e9), diffusion, atol=1e-4)
    assert not torch.allclose(pfgmpp.stable_target_field(noisy, 3.0, reference, D=8), diffusion, atol=1e-2)


def test_stf_with_a_cifar_sized_reference_batch() -> None:
    """A reference batch of 4096 CIFAR images goes through in chunks; the result does not depend on the chunking."""
    gen = torch.Generator().manual_seed(11)
    reference = torch.rand(4096, 3, 32, 32, generator=gen) * 2 - 1
    sigma = torch.tensor([0.5, 2.0, 10.0, 40.0])
    noisy = reference[:4] + pfgmpp.sample_perturbation((4, 3, 32, 32), sigma, D=128, generator=gen)
    target = pfgmpp.stable_target_field(noisy, sigma, reference, D=128)
    assert target.shape == noisy.shape and target.dtype == torch.float32 and torch.isfinite(target).all()
    other_chunking = pfgmpp.stable_target_field(noisy, sigma, reference, D=128, chunk_size=1500)
    assert torch.allclose(target, other_chunking, atol=1e-6)
