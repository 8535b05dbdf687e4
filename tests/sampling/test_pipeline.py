"""sampling/ and sampling/quantize.py: goldens, invariances, ablation math, robustness options."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import GOLDEN_DIR
from tests._sampler_nets import golden_network, make_tiny_net
from sampling import quantize
from sampling import edm, pipeline, schedules
from training.networks import iddpm_noise_levels

@pytest.fixture(autouse=True)
def _single_intra_op_thread(one_intra_op_thread):
    """Every test here runs tiny networks on one thread (see conftest.one_intra_op_thread)."""


# ----------------------------------------------------------------------------
# Goldens produced by the original EDM / PFGM++ generate.py.

GOLDEN_SAMPLER_FILES = sorted((GOLDEN_DIR / 'sampler').glob('*.pt'))


def _golden_cases(golden_dir: Path) -> list[Path]:
    return sorted((golden_dir / 'sampler').glob('*.pt'))


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """MANIFEST tolerance for float64 sampler outputs: 1e-3 * max(1, max|expected|)."""
    expected = expected.to(torch.float64)
    tol = 1e-3 * max(1.0, expected.abs().max().item())
    assert actual.shape == expected.shape, f'{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}'
    err = (actual.to(torch.float64) - expected).abs().max().item()
    assert err <= tol, f'{what}: max error {err:.3g} > {tol:.3g}'


def _assert_uint8_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """uint8 images: +-1 on at most a few values (MANIFEST)."""
    diff = (actual.to(torch.int16) - expected.to(torch.int16)).abs()
    assert diff.max().item() <= 1, f'{what}: a pixel differs by {diff.max().item()}'
    assert (diff > 0).sum().item() <= max(8, expected.numel() // 500), f'{what}: {(diff > 0).sum()} pixels differ'


class _Recorder:
    """Wraps a network and records the sigma and x of every call."""

    def __init__(self, net):
        self.net, self.sigmas, self.inputs = net, [], []

    def __getattr__(self, name):
        return getattr(self.net, name)

    def __call__(self, x, sigma, class_labels=None):
        self.sigmas.append(float(torch.as_tensor(sigma)))
        self.inputs.append(x.clone())
        self.labels = class_labels
        return self.net(x, sigma, class_labels)


@pytest.fixture(scope='module')
def golden_nets(golden_dir):
    cache = {}

    def get(network_file: str, extra: dict | None):
        key = (network_file, json.dumps(extra, sort_keys=True))
        if key not in cache:
            cache[key] = golden_network(golden_dir, network_file, extra)
        return cache[key]
    return get


def test_golden_sampler_cases_exist(golden_dir):
    assert _golden_cases(golden_dir), 'no golden/sampler/*.pt files found'


@pytest.mark.parametrize('case', [p.name for p in GOLDEN_SAMPLER_FILES] or ['<none>'])
def test_sampler_matches_golden(case, golden_dir, golden_manifest, golden_nets, monkeypatch):
    path = golden_dir / 'sampler' / case
    if not path.is_file():
        pytest.skip(f'{case} not present')
    gold = torch.load(path, weights_only=True)
    entry = golden_manifest['files'].get(f'sampler/{case}', {})
    sampler_kwargs = dict(gold.get('sampler_kwargs', entry.get('sampler_kwargs', {})))
    seeds = list(gold.get('seeds', entry.get('seeds')))
    class_idx = gold.get('class_idx', entry.get('class_idx'))
    D = gold.get('D', entry.get('D'))
    net = golden_nets(gold.get('network_file', 'networks/edm_ddpmpp_aug.pt'), gold.get('network_extra_kwargs'))
    recorder = _Recorder(net)

    # Record what the public path draws from the per-seed generators.
    draws, label_draws, made = [], [], []

    class RecordingRandom(schedules.PerSeedRandom):
        def __init__(self, seeds, device='cpu'):
            super().__init__(seeds, device)
            made.append(self)

        def randn_like(self, x):
            out = super().randn_like(x)
            draws.append(out)
            return out

        def randint(self, high):
            out = super().randint(high)
            label_draws.append(out)
            return out

    monkeypatch.setattr(pipeline, 'PerSeedRandom', RecordingRandom)
    latents_seen = []
    real_draw_latents = pipeline.draw_latents

    def spy_latents(*args, **kwargs):
        out = real_draw_latents(*args, **kwargs)
        latents_seen.append(out)
        return out
    monkeypatch.setattr(pipeline, 'draw_latents', spy_latents)

    images = pipeline.sample_batch(recorder, seeds, device='cpu', class_idx=class_idx, D=D,
                                   **sampler_kwargs)

    assert len(made) == 1 and made[0].seeds == seeds
    _assert_close(latents_seen[0], gold['latents'], 'latents')
    assert latents_seen[0].dtype == gold['latents'].dtype
    if gold.get('class_label_indices_drawn') is not None:
        assert torch.equal(label_draws[0].cpu(), gold['class_label_indices_drawn'].to(torch.int64))
    if gold.get('class_labels') is not None:
        _assert_close(recorder.labels, gold['class_labels'], 'class labels')
    else:
        assert recorder.labels is None
    expected_sigmas = gold['net_call_sigmas'].to(torch.float64)
    assert len(recorder.sigmas) == len(expected_sigmas)
    _assert_close(torch.tensor(recorder.sigmas, dtype=torch.float64), expected_sigmas, 'net call sigmas')
    if 'x_first_call_per_step' in gold:
        calls_per_step = [2 * i for i in range(len(gold['x_first_call_per_step']))]  # Heun: two calls per step
        firsts = torch.stack([recorder.inputs[i] for i in calls_per_step])
        _assert_close(firsts, gold['x_first_call_per_step'], 'x at the first call of every step')
    if 'randn_like_draws' in gold:
        assert len(draws) == len(gold['randn_like_draws'])
        _assert_close(torch.stack(draws), gold['randn_like_draws'], 'randn_like draws')
    expected_images = gold.get('output', gold.get('images'))
    _assert_close(images, expected_images, 'images')
    _assert_uint8_close(pipeline.to_uint8(images).permute(0, 2, 3, 1), gold['images_uint8_nhwc'], 'uint8 images')

    if 'trajectory' in gold:
        if not draws:
            # Without churn each step starts where the previous one ended: the trajectory is the
            # input of every step's first call, then the result.
            trajectory = torch.stack([recorder.inputs[2 * i] for i in range(1, len(gold['trajectory']))] + [images])
        else:
            rnd = schedules.PerSeedRandom(seeds)
            with torch.no_grad():
                _, trajectory = edm.edm_sampler(net, latents_seen[0], recorder.labels, randn_like=rnd.randn_like,
                                                     D=D, return_trajectory=True, **sampler_kwargs)
        _assert_close(trajectory, gold['trajectory'], 'trajectory')


def test_trajectory_is_the_state_after_each_step(tiny_net):
    seeds = [1, 2]
    rnd = schedules.PerSeedRandom(seeds)
    latents = pipeline.draw_latents(tiny_net, seeds, rnd)
    kwargs = dict(num_steps=3, S_churn=5)
    final, trajectory = edm.edm_sampler(tiny_net, latents, randn_like=rnd.randn_like, return_trajectory=True,
                                             **kwargs)
    assert trajectory.shape == (3, *latents.shape) and torch.equal(trajectory[-1], final)
    rnd = schedules.PerSeedRandom(seeds)
    again = edm.edm_sampler(tiny_net, pipeline.draw_latents(tiny_net, seeds, rnd), randn_like=rnd.randn_like,
                                 **kwargs)
    assert torch.equal(again, final)


# ----------------------------------------------------------------------------
# Per-seed randomness and invariances.


def test_per_seed_random_matches_plain_generators():
    rnd = schedules.PerSeedRandom([3, 7, (1 << 32) + 3])
    x = rnd.randn([2, 5])
    for row, seed in zip(x, [3, 7, 3]):
        assert torch.equal(row, torch.randn([2, 5], generator=torch.Generator().manual_seed(seed)))
    # randn_like draws directly in float64 (not a cast of float32 draws).
    y = rnd.randn_like(torch.zeros([3, 4], dtype=torch.float64))
    g = torch.Generator().manual_seed(7)
    torch.randn([2, 5], generator=g)
    assert torch.equal(y[1], torch.randn([4], generator=g, dtype=torch.float64))


def test_split_batches_covers_seeds_evenly():
    seeds = list(range(10, 33))
    for batch, shards in [(4, 1), (4, 2), (5, 3), (64, 2), (1, 1)]:
        batches = pipeline.split_batches(seeds, batch, shards)
        assert len(batches) % shards == 0
        assert [s for b in batches for s in b] == seeds
        assert max(map(len, batches)) <= batch
        assert max(map(len, batches)) - min(map(len, batches)) <= 1
    assert pipeline.split_batches([], 4, 2) == [[], []]


@pytest.fixture(scope='module')
def tiny_net():
    return make_tiny_net()


@pytest.fixture(scope='module')
def tiny_cond_net():
    return make_tiny_net(label_dim=4, seed=5)


def _images(net, seeds, batch, **kwargs):
    out = {}
    for batch_seeds, images in pipeline.generate_images(net, seeds, batch_size=batch, **kwargs):
        assert images.dtype == torch.uint8 and images.shape[1:] == (net.img_channels, net.img_resolution,
                                                                      net.img_resolution)
        out.update(zip(batch_seeds, images))
    return out


@pytest.mark.parametrize('options', [dict(num_steps=3),
                                     dict(num_steps=3, S_churn=10, S_min=0.01, S_max=50, S_noise=1.007),
                                     dict(num_steps=3, noise_injection=0.3)])
def test_images_depend_only_on_seed(tiny_net, options):
    seeds = [5, 0, 9, 2, 7]
    a = _images(tiny_net, seeds, 5, **options)
    b = _images(tiny_net, seeds, 2, **options)
    c = _images(tiny_net, list(reversed(seeds)), 3, **options)
    for s in seeds:
        assert torch.equal(a[s], b[s]) and torch.equal(a[s], c[s]), f'seed {s} depends on batching'
    assert not torch.equal(a[5], a[0])
    # Bit-identical float64 samples, batches of one included (those are padded to keep the batched kernels).
    together = pipeline.sample_batch(tiny_net, seeds, **options)
    for i, s in enumerate(seeds):
        assert torch.equal(pipeline.sample_batch(tiny_net, [s], **options)[0], together[i])


def test_class_labels_random_and_fixed(tiny_cond_net):
    seeds = [0, 1, 2, 3, 4, 5]
    rec = _Recorder(tiny_cond_net)
    pipeline.sample_batch(rec, seeds, num_steps=1)
    expected_idx = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        torch.randn([3, 8, 8], generator=g)  # the latents come first
        expected_idx.append(int(torch.randint(4, [], generator=g)))
    assert torch.equal(rec.labels, torch.eye(4)[expected_idx])

    # --class: every label is that class, and the random draw still advances the generators,
    # so the in-loop noise equals the noise of the unfixed run.
    noise = {}
    for class_idx in (None, 2):
        draws = []
        rnd = schedules.PerSeedRandom(seeds)
        latents = pipeline.draw_latents(tiny_cond_net, seeds, rnd)
        labels = pipeline.draw_class_labels(tiny_cond_net, rnd, class_idx)
        draws.append(rnd.randn_like(latents.double()))
        noise[class_idx] = draws[0]
        if class_idx is not None:
            assert torch.equal(labels, torch.eye(4)[[class_idx] * len(seeds)])
    assert torch.equal(noise[None], noise[2])

    fixed = _images(tiny_cond_net, seeds, 3, num_steps=3, class_idx=2)
    free = _images(tiny_cond_net, seeds, 3, num_steps=3)
    assert any(not torch.equal(fixed[s], free[s]) for s in seeds)
    with pytest.raises(ValueError, match='out of range'):
        pipeline.sample_batch(tiny_cond_net, [0], class_idx=4, num_steps=1)
    with pytest.raises(ValueError, match='unconditional'):
        pipeline.sample_batch(make_tiny_net(), [0], class_idx=0, num_steps=1)


def test_pfgmpp_prior_uses_its_own_generators(tiny_net):
    """The PFGM++ latents do not advance the per-seed generators (labels/noise follow the reference)."""
    seeds = [4, 11]
    rnd = schedules.PerSeedRandom(seeds)
    latents = pipeline.draw_latents(tiny_net, seeds, rnd, D=64)
    assert latents.dtype == torch.float64 and latents.shape == (2, 3, 8, 8)
    fresh = schedules.PerSeedRandom(seeds)
    assert torch.equal(rnd.randn([3]), fresh.randn([3]))
    # Radius: |x| / (80 sqrt(D)) = sqrt(B / (1 - B)) with B ~ Beta(N/2, D/2), around sqrt(N / D).
    ratio = latents.flatten(1).norm(dim=1) / (80 * math.sqrt(64))
    assert ((ratio > 0.5 * math.sqrt(192 / 64)) & (ratio < 2 * math.sqrt(192 / 64))).all()


# ----------------------------------------------------------------------------
# The EDM sampler's options, on an analytic denoiser.


class GaussianDenoiser:
    """Exact denoiser for data ~ N(0, s^2 I): D(x; sigma) = x s^2 / (s^2 + sigma^2).

    Its probability-flow ODE has the closed form x(sigma) = x(sigma_0) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_0^2),
    which every sampler must approach as the step count grows.
    """

    img_resolution, img_channels, label_dim = 4, 1, 0
    sigma_min, sigma_max = 0.0, float('inf')

    def __init__(self, data_std: float = 0.5):
        self.data_std = data_std
        self.calls = 0

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        s2 = self.data_std ** 2
        return (x * s2 / (s2 + torch.as_tensor(sigma, dtype=torch.float64) ** 2)).to(torch.float32)


def _exact_endpoint(latents: torch.Tensor, sigma_0: float, data_std: float = 0.5) -> torch.Tensor:
    return latents.double() * sigma_0 * data_std / math.sqrt(data_std ** 2 + sigma_0 ** 2)


def test_edm_sampler_solves_the_ode_and_counts_evaluations():
    net = GaussianDenoiser()
    latents = torch.randn([2, 1, 4, 4], generator=torch.Generator().manual_seed(0))
    out = edm.edm_sampler(net, latents, num_steps=200)
    assert net.calls == 2 * 200 - 1
    expected = _exact_endpoint(latents, 80.0)
    assert (out - expected).abs().max() < 1e-3 * expected.abs().max()
    net1 = GaussianDenoiser()
    one = edm.edm_sampler(net1, latents, num_steps=1)  # a single Euler step is still well defined
    assert net1.calls == 1 and torch.isfinite(one).all()


def test_edm_time_steps():
    steps = schedules.edm_time_steps(GaussianDenoiser(), num_steps=18)
    assert steps.dtype == torch.float64 and len(steps) == 19 and steps[-1] == 0
    assert math.isclose(steps[0].item(), 80.0) and math.isclose(steps[-2].item(), 0.002)
    ramp = steps[:-1] ** (1 / 7)
    assert torch.allclose(ramp[1:] - ramp[:-1], (ramp[1] - ramp[0]).expand(17))


def test_noise_injection_formula():
    """x_i += alpha * t_i * randn at the start of every step, noise from the given source."""
    class Zero(GaussianDenoiser):
        def __call__(self, x, sigma, class_labels=None):
            return torch.zeros_like(x, dtype=torch.float32)

    latents = torch.randn([2, 1, 4, 4], generator=torch.Generator().manual_seed(1))
    rnd = schedules.PerSeedRandom([0, 1])
    draws = []

    def noise(x):
        draws.append(rnd.randn_like(x))
        return draws[-1]
    t = schedules.edm_time_steps(Zero(), num_steps=3)
    _, trajectory = edm.edm_sampler(Zero(), latents, randn_like=noise, num_steps=3, noise_injection=0.25,
                                         return_trajectory=True)
    assert len(draws) == 3  # one injection per step, no churn draws
    # With D = 0 each step rescales x by t_{i+1} / t_i.
    x0 = latents.double() * t[0] + 0.25 * t[0] * draws[0]
    assert torch.allclose(trajectory[0], x0 * t[1] / t[0])
    x1 = trajectory[0] + 0.25 * t[1] * draws[1]
    assert torch.allclose(trajectory[1], x1 * t[2] / t[1])


def test_churn_draws_every_step_only_when_stochastic():
    net = GaussianDenoiser()
    latents = torch.zeros([1, 1, 4, 4])
    counter = []

    def noise(x):
        counter.append(1)
        return torch.zeros_like(x)
    edm.edm_sampler(net, latents, randn_like=noise, num_steps=5)
    assert counter == []
    edm.edm_sampler(net, latents, randn_like=noise, num_steps=5, S_churn=5, S_min=1, S_max=10)
    assert len(counter) == 5  # also on the steps outside [S_min, S_max], as the reference does


# ----------------------------------------------------------------------------
# Ablation sampler.


@pytest.mark.parametrize('solver', ['euler', 'heun'])
@pytest.mark.parametrize('discretization,schedule,scaling', [
    ('edm', 'linear', 'none'), ('vp', 'vp', 'vp'), ('ve', 've', 'none'), ('iddpm', 'linear', 'none'),
    ('edm', 'vp', 'vp'), ('vp', 'linear', 'vp'), ('ve', 'linear', 'none'),
])
def test_ablation_sampler_converges_to_the_ode_solution(solver, discretization, schedule, scaling):
    """Every combination approaches the exact answer at its solver's order (Euler 1, Heun 2)."""
    latents = torch.randn([2, 1, 4, 4], generator=torch.Generator().manual_seed(2))
    # The starting level of each discretisation with its default range.
    sigma_0 = {'edm': 80.0, 've': 100.0, 'iddpm': None, 'vp': math.sqrt(math.expm1(0.5 * 19.9 + 0.1))}[discretization]
    if sigma_0 is None:
        levels = iddpm_noise_levels(1000, 0.001, 0.008)
        sigma_0 = levels[levels <= 81.0].max().item()
    expected = _exact_endpoint(latents, sigma_0)
    tiny_sigma = None if discretization == 'iddpm' else 1e-4  # iDDPM's grid already ends near 0.002
    errors = []
    for num_steps in ((128, 256) if solver == 'euler' else (64, 128)):
        net = GaussianDenoiser()
        # A tiny sigma_min: the final Euler step to sigma = 0 costs O(sigma_min^2), whatever the step count.
        out = edm.ablation_sampler(net, latents, num_steps=num_steps, solver=solver, sigma_min=tiny_sigma,
                                        discretization=discretization, schedule=schedule, scaling=scaling)
        assert net.calls == (num_steps if solver == 'euler' else 2 * num_steps - 1)
        errors.append(((out - expected).abs().max() / expected.abs().max()).item())
    assert errors[1] < 0.2
    assert errors[1] < errors[0] / (1.7 if solver == 'euler' else 3.2), errors


def test_ablation_edm_settings_equal_edm_sampler(tiny_net):
    latents = torch.randn([2, 3, 8, 8], generator=torch.Generator().manual_seed(3))
    kwargs = dict(num_steps=4, S_churn=5, S_min=0.05, S_max=50, S_noise=1.003)
    a = edm.edm_sampler(tiny_net, latents, randn_like=schedules.PerSeedRandom([1, 2]).randn_like, **kwargs)
    b = edm.ablation_sampler(tiny_net, latents, randn_like=schedules.PerSeedRandom([1, 2]).randn_like,
                                  solver='heun', discretization='edm', schedule='linear', scaling='none', **kwargs)
    assert torch.allclose(a, b, rtol=0, atol=1e-9)


def test_ablation_defaults_follow_the_edm_paper():
    """VP range from beta_d = 19.9 (the PFGM++ fork used 19.1), VE 0.02..100, iDDPM up to 81."""
    for disc, top in [('vp', math.sqrt(math.expm1(0.5 * 19.9 + 0.1))), ('ve', 100.0), ('edm', 80.0)]:
        net = _Recorder(GaussianDenoiser())
        edm.ablation_sampler(net, torch.zeros([1, 1, 4, 4]), num_steps=3, discretization=disc,
                                  schedule='linear', solver='euler')
        assert math.isclose(net.sigmas[0], top, rel_tol=1e-9), disc
    net = _Recorder(GaussianDenoiser())
    edm.ablation_sampler(net, torch.zeros([1, 1, 4, 4]), num_steps=2, discretization='vp', solver='euler')
    assert math.isclose(net.sigmas[-1], math.sqrt(math.expm1(0.5 * 19.9 * 1e-6 + 0.1 * 1e-3)), rel_tol=1e-9)
    u = iddpm_noise_levels(1000, 0.001, 0.008)
    assert u[-1] == 0 and (u[:-1] > u[1:]).all()
    with pytest.raises(ValueError, match='solver'):
        edm.ablation_sampler(GaussianDenoiser(), torch.zeros([1, 1, 4, 4]), solver='rk4')


# ----------------------------------------------------------------------------
# Weight quantization.


@pytest.mark.parametrize('scheme', quantize.SCHEMES)
@pytest.mark.parametrize('bits', [2, 4, 8])
def test_quantize_tensor(scheme, bits):
    w = torch.randn([64, 32], generator=torch.Generator().manual_seed(bits))
    q = quantize.quantize_tensor(w, bits, scheme)
    assert q.dtype == w.dtype and q.shape == w.shape
    if scheme == 'symmetric':
        levels = 2 ** (bits - 1) - 1
        step = w.abs().max() / levels
        assert q.unique().numel() <= 2 * levels + 1
        assert torch.allclose(q.abs().max(), w.abs().max())
        assert torch.allclose(-quantize.quantize_tensor(-w, bits, scheme), q)  # symmetric about zero
    else:
        step = (w.max() - w.min()) / (2 ** bits - 1)
        assert q.unique().numel() <= 2 ** bits
    assert (q - w).abs().max() <= step * 0.5001 + (step if scheme == 'minmax' else 0)
    assert torch.equal(quantize.quantize_tensor(torch.zeros(5, 5), bits, scheme), torch.zeros(5, 5))


def test_quantize_network_selects_layers_like_the_paper(tiny_net):
    names = quantize.quantized_weight_names(tiny_net)
    assert names, 'nothing selected'
    params = dict(tiny_net.named_parameters())
    for name in names:
        assert name.endswith('.weight') and params[name].ndim >= 2
        assert 'affine' not in name and 'map' not in name and '8x8_' not in name and 'norm' not in name
    assert 'model.enc.4x4_block0.conv0.weight' in names and 'model.dec.4x4_in0.qkv.weight' in names
    for kept in ('model.enc.8x8_conv.weight', 'model.map_layer0.weight', 'model.enc.4x4_block0.affine.weight',
                 'model.dec.8x8_aux_conv.weight', 'model.enc.4x4_block0.conv0.bias'):
        assert kept in params and kept not in names

    quantized = quantize.quantize_network(tiny_net, 3)
    assert quantized is not tiny_net
    new = dict(quantized.named_parameters())
    for name, p in params.items():
        if name in names:
            assert new[name].unique().numel() <= 7 and not torch.equal(new[name], p)
        else:
            assert torch.equal(new[name], p)
    assert all(torch.equal(p, q) for p, q in zip(tiny_net.parameters(), make_tiny_net().parameters()))
    with pytest.raises(ValueError, match='bits'):
        quantize.quantize_network(tiny_net, 1)
    with pytest.raises(ValueError, match='scheme'):
        quantize.quantize_network(tiny_net, 4, scheme='log')


def test_quantized_network_changes_images_gracefully(tiny_net):
    seeds = [0, 1]
    base = pipeline.sample_batch(tiny_net, seeds, num_steps=3)
    err = {bits: (pipeline.sample_batch(quantize.quantize_network(tiny_net, bits), seeds, num_steps=3) - base)
           .abs().mean().item() for bits in (3, 8, 14)}
    assert err[3] > err[8] > err[14] and err[3] > 0


def test_batch_padding_is_a_denoiser_without_look_through(tiny_net):
    padded = pipeline.BatchPadded(tiny_net)
    for name in ('img_resolution', 'img_channels', 'label_dim', 'sigma_min', 'sigma_max'):
        assert getattr(padded, name) == getattr(tiny_net, name)
    assert torch.equal(padded.round_sigma(torch.tensor([0.5])), tiny_net.round_sigma(torch.tensor([0.5])))
    assert padded.net is tiny_net and not hasattr(padded, 'model')  # the network's other attributes stay its own
    x = torch.randn(1, tiny_net.img_channels, tiny_net.img_resolution, tiny_net.img_resolution,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(padded(x, torch.tensor([2.0])), tiny_net(x.expand(2, -1, -1, -1), torch.tensor(2.0))[:1])
