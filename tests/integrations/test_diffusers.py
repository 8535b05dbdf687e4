"""PFGM++ in Hugging Face diffusers (integrations/): the scheduler, the pipeline and export.py --format=diffusers.

The goals of the integration, as tests: the pipeline reproduces generate.py's images for the same seeds and network
(Euler, Heun, DPM-Solver++(2M); D = 128, 2048 and diffusion), add_noise draws from the PFGM++ kernel (KS test of the
radius) and equals diffusers' EDM scheduler for diffusion, and an exported folder samples like the snapshot.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._sampler_nets import TINY_KWARGS, make_tiny_net, save_snapshot
from tests.conftest import REPO_ROOT, randomize_parameters_, run_python

diffusers = pytest.importorskip('diffusers', reason='pip install -r requirements-diffusers.txt')

from integrations.diffusers_export import DiffusersExportError, build_pipeline, export_diffusers  # noqa: E402
from integrations.diffusers_pipeline import PFGMPPNetwork, PFGMPPPipeline  # noqa: E402
from integrations.diffusers_scheduler import PFGMPPScheduler  # noqa: E402
from sampling.fast_solvers import solve_ode  # noqa: E402
from sampling.pipeline import PerSeedRandom, draw_latents, generate_images, sample_batch, to_uint8  # noqa: E402
from sampling.schedules import edm_time_steps  # noqa: E402
from training import networks  # noqa: E402

SEEDS = [0, 7, 123]
STEPS = 4
KERNELS = [128, 2048, None]


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def pipeline_for(net, solver):
    pipe = build_pipeline(net, solver=solver)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope='module', params=KERNELS, ids=lambda D: f'D={D}')
def kernel_net(request):
    D = request.param
    return D, make_tiny_net(pfgmpp=D is not None, D=D or 128, seed=3)


# ----------------------------------------------------------------------------
# Same seeds, same network: the images of generate.py.

@pytest.mark.parametrize('solver', ['heun', 'dpmpp2m'])
def test_pipeline_equals_generate_images(kernel_net, solver):
    D, net = kernel_net
    pipe = pipeline_for(net, solver)
    samples = pipe(generator=generators(SEEDS), num_inference_steps=STEPS, output_type='pt').images
    options = dict(solver='dpmpp2m') if solver == 'dpmpp2m' else {}
    reference = sample_batch(net, SEEDS, D=D, num_steps=STEPS, **options)
    assert samples.dtype == torch.float64
    assert torch.equal(samples, reference)
    images = pipe(generator=generators(SEEDS), num_inference_steps=STEPS).images
    (seeds, uint8), = generate_images(net, SEEDS, D=D, num_steps=STEPS, **options)
    assert seeds == SEEDS
    assert np.array_equal(np.stack([np.asarray(im) for im in images]), uint8.permute(0, 2, 3, 1).numpy())


def test_pipeline_euler_equals_library_euler(kernel_net):
    """generate.py's Euler is the ablation sampler, which refuses PFGM++; the library's Euler integrator of the same
    ODE, from generate.py's latents and time steps, is the reference."""
    D, net = kernel_net
    samples = pipeline_for(net, 'euler')(generator=generators(SEEDS), num_inference_steps=STEPS,
                                          output_type='pt').images
    latents = draw_latents(net, SEEDS, PerSeedRandom(SEEDS), D=D).to(torch.float64)
    t_steps = edm_time_steps(net, STEPS)
    if D is None:
        latents = latents * t_steps[0]
    with torch.no_grad():
        reference = solve_ode(net, latents, t_steps, solver='euler')
    assert torch.equal(samples, reference)


def test_pipeline_euler_matches_generate_ablation_euler_for_diffusion():
    """Diffusion: generate.py --solver=euler (ablation sampler, EDM discretisation, linear schedule, no scaling)
    integrates the same steps in t = sigma with other float64 arithmetic: equal within float32 rounding."""
    net = make_tiny_net(seed=4)
    samples = pipeline_for(net, 'euler')(generator=generators(SEEDS), num_inference_steps=STEPS,
                                          output_type='pt').images
    reference = sample_batch(net, SEEDS, num_steps=STEPS, solver='euler', discretization='edm', schedule='linear',
                             scaling='none')
    scale = float(reference.abs().max())
    assert not torch.equal(samples, torch.zeros_like(samples))
    # The network sees float32 inputs: a float32 rounding, amplified by at most a few per step.
    tolerance = 16 * STEPS * torch.finfo(torch.float32).eps * scale
    assert float((samples - reference).abs().max()) <= tolerance


@pytest.mark.slow
def test_pipeline_equals_generate_py_pngs(tmp_path):
    """generate.py itself, as a subprocess: the pipeline's PIL images hold the PNGs' exact pixels."""
    D = 2048
    net = make_tiny_net(pfgmpp=True, D=D, seed=5)
    snapshot = save_snapshot(net, tmp_path / 'network-snapshot.pkl')
    outdir = tmp_path / 'out'
    run_python(['generate.py', f'--network={snapshot}', f'--outdir={outdir}', '--seeds=0,7,123', f'--steps={STEPS}',
                '--solver=dpmpp2m', '--device=cpu', '--batch=2'])
    pipe = pipeline_for(net, 'dpmpp2m')
    images = pipe(generator=generators(SEEDS), num_inference_steps=STEPS).images
    from PIL import Image
    for seed, image in zip(SEEDS, images):
        png = np.asarray(Image.open(outdir / f'{seed:06d}.png'))
        assert np.array_equal(np.asarray(image), png)


def test_pipeline_conditional_labels_follow_generate():
    net = make_tiny_net(label_dim=4, pfgmpp=True, D=128, seed=6)
    pipe = pipeline_for(net, 'heun')
    for class_idx in (None, 2):
        samples = pipe(generator=generators(SEEDS), num_inference_steps=3, class_labels=class_idx,
                       output_type='pt').images
        reference = sample_batch(net, SEEDS, D=128, num_steps=3, class_idx=class_idx)
        assert torch.equal(samples, reference)


def test_pipeline_single_seed_uses_generate_batching():
    """A batch of one goes through the same padded network call as generate.py."""
    net = make_tiny_net(pfgmpp=True, D=128, seed=8)
    samples = pipeline_for(net, 'heun')(generator=generators([11]), num_inference_steps=3, output_type='pt').images
    assert torch.equal(samples, sample_batch(net, [11], D=128, num_steps=3))


def test_pipeline_refuses_mismatched_settings():
    net = make_tiny_net(pfgmpp=True, D=128)
    pipe = pipeline_for(net, 'heun')
    with pytest.raises(ValueError, match='2 generators for batch_size=3'):
        pipe(batch_size=3, generator=generators([0, 1]))
    with pytest.raises(ValueError, match='output_type'):
        pipe(generator=generators([0]), output_type='latent')
    wrong_D = PFGMPPPipeline(unet=pipe.unet, scheduler=PFGMPPScheduler(D=2048, prediction_type='sample'))
    with pytest.raises(ValueError, match='D=128'):
        wrong_D(generator=generators([0]))
    wrong_type = PFGMPPPipeline(unet=pipe.unet, scheduler=PFGMPPScheduler(D=128))
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        wrong_type(generator=generators([0]))
    with pytest.raises(ValueError, match='unconditional'):
        pipe(generator=generators([0]), class_labels=1)


# ----------------------------------------------------------------------------
# The scheduler alone.

def test_scheduler_config_round_trip(tmp_path):
    scheduler = PFGMPPScheduler(D=math.inf, sigma_min=0.01, sigma_max=50.0, rho=5.0, sigma_data=0.6,
                                solver='dpmpp2m')
    assert scheduler.D is None
    scheduler.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / 'scheduler_config.json').read_text())
    assert stored['D'] is None and stored['solver'] == 'dpmpp2m' and stored['_class_name'] == 'PFGMPPScheduler'
    loaded = PFGMPPScheduler.from_pretrained(tmp_path)
    settings = {k: v for k, v in scheduler.config.items() if not k.startswith('_')}
    assert {k: v for k, v in loaded.config.items() if not k.startswith('_')} == settings
    finite = PFGMPPScheduler(D=128)
    finite.save_pretrained(tmp_path / 'finite')
    assert PFGMPPScheduler.from_pretrained(tmp_path / 'finite').D == 128
    for bad in (dict(solver='rk4'), dict(D=0), dict(prediction_type='v_prediction'), dict(sigma_min=-1.0)):
        with pytest.raises(ValueError):
            PFGMPPScheduler(**bad)


def test_scheduler_heun_timesteps_layout():
    scheduler = PFGMPPScheduler(solver='heun')
    scheduler.set_timesteps(5)
    sigmas = scheduler.sigmas
    assert len(sigmas) == 6 and float(sigmas[-1]) == 0 and float(sigmas[0]) == 80.0
    assert len(scheduler.timesteps) == 2 * 5 - 1
    expected = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2)])
    assert torch.equal(scheduler.eval_sigmas, expected)
    assert torch.allclose(scheduler.timesteps.double(), expected.log() / 4, rtol=0, atol=1e-6)
    euler = PFGMPPScheduler(solver='euler')
    euler.set_timesteps(5)
    assert len(euler.timesteps) == 5
    with pytest.raises(ValueError, match='decreasing'):
        euler.set_timesteps(sigmas=[1.0, 2.0])


def kernel_radius_cdf(radius, sigma, N, D):
    """CDF of |n| for the PFGM++ kernel: |n| = sigma sqrt(D) sqrt(B / (1 - B)), B ~ Beta(N/2, D/2)."""
    from scipy import stats
    odds = (np.asarray(radius) / (sigma * math.sqrt(D))) ** 2
    return stats.beta(N / 2, D / 2).cdf(odds / (1 + odds))


@pytest.mark.parametrize('D', [8, 128, 2048])
def test_add_noise_radius_follows_kernel(D):
    from scipy import stats
    shape, sigma, count = [3, 4, 4], 1.7, 2000
    N = math.prod(shape)
    scheduler = PFGMPPScheduler(D=D)
    clean = torch.full([count, *shape], 0.25)
    noisy = scheduler.add_noise(clean, sigmas=sigma, generator=torch.Generator().manual_seed(D))
    radius = (noisy - clean).reshape(count, -1).norm(dim=1).double().numpy()
    assert stats.kstest(radius, lambda r: kernel_radius_cdf(r, sigma, N, D)).pvalue > 1e-3
    # Per-sample generators (diffusers' list form) draw from the same law.
    few = 400
    noisy = scheduler.add_noise(clean[:few], sigmas=torch.full([few], sigma),
                                generator=generators(range(1000, 1000 + few)))
    radius = (noisy - clean[:few]).reshape(few, -1).norm(dim=1).double().numpy()
    assert stats.kstest(radius, lambda r: kernel_radius_cdf(r, sigma, N, D)).pvalue > 1e-3
    # The test tells kernels apart: Gaussian noise of the same sigma fails it for small D.
    if D == 8:
        gaussian = PFGMPPScheduler(D=None).add_noise(clean, sigmas=sigma, generator=torch.Generator().manual_seed(1))
        radius = (gaussian - clean).reshape(count, -1).norm(dim=1).double().numpy()
        assert stats.kstest(radius, lambda r: kernel_radius_cdf(r, sigma, N, D)).pvalue < 1e-6


def test_add_noise_diffusion_equals_diffusers_edm_euler():
    from diffusers import EDMEulerScheduler
    ours = PFGMPPScheduler(D=None, solver='euler')
    theirs = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    clean = torch.rand([4, 3, 8, 8], generator=g) * 2 - 1
    noise = torch.randn([4, 3, 8, 8], generator=g)
    timesteps = theirs.timesteps[[0, 3, 6, 9]]
    expected = theirs.add_noise(clean, noise, timesteps)
    got = ours.add_noise(clean, noise, timesteps)
    assert got.dtype == expected.dtype
    # diffusers keeps its sigmas in float32, ours in float64: one float32 rounding of noise * sigma, plus the sum.
    tolerance = 4 * torch.finfo(torch.float32).eps * float(expected.abs().max())
    assert float((got - expected).abs().max()) <= tolerance
    assert not torch.equal(got, clean)
    with pytest.raises(ValueError, match='draws its own noise'):
        PFGMPPScheduler(D=128).add_noise(clean, noise, sigmas=1.0)


def test_prior_sample_single_generator_follows_kernel():
    """With one generator (not a list) a finite-D prior comes from the exact kernel at sigma_max."""
    from scipy import stats
    D, shape, count = 64, [3, 4, 4], 1000
    scheduler = PFGMPPScheduler(D=D)
    prior = scheduler.prior_sample([count, *shape], torch.Generator().manual_seed(2))
    assert prior.dtype == torch.float64 and prior.shape == (count, *shape)
    radius = prior.reshape(count, -1).norm(dim=1).numpy()
    # Images this small start at sigma 80 (the reference's prior rule).
    assert stats.kstest(radius, lambda r: kernel_radius_cdf(r, 80.0, math.prod(shape), D)).pvalue > 1e-3


# ----------------------------------------------------------------------------
# A diffusers UNet2DModel: sampling and training with the PFGM++ loss.

def tiny_unet(seed=0):
    from diffusers import UNet2DModel
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=('DownBlock2D', 'DownBlock2D'), up_block_types=('UpBlock2D', 'UpBlock2D'),
                       norm_num_groups=8).eval()


class EDMWrapped:
    """A UNet2DModel inside EDM's preconditioning, written out independently of the scheduler (Karras et al.,
    Table 1): D(x; sigma) = c_skip x + c_out F(c_in x, log(sigma) / 4)."""

    def __init__(self, unet, sigma_data=0.5):
        self.unet, self.sigma_data = unet, sigma_data

    def __call__(self, x, sigma, class_labels=None):
        sd = self.sigma_data
        total = (sigma ** 2 + sd ** 2).sqrt()
        out = self.unet((x / total).float(), (sigma.log() / 4).float().reshape(1)).sample.double()
        return sd ** 2 / total ** 2 * x + sigma * sd / total * out


@pytest.mark.parametrize('solver', ['euler', 'heun', 'dpmpp2m'])
def test_pipeline_with_unet2d_integrates_the_ode(solver):
    unet = tiny_unet()
    scheduler = PFGMPPScheduler(D=128, solver=solver)
    pipe = PFGMPPPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    samples = pipe(generator=generators(SEEDS), num_inference_steps=STEPS, output_type='pt').images
    latents = scheduler.prior_sample([len(SEEDS), 3, 8, 8], generators(SEEDS))
    sigmas = PFGMPPScheduler(D=128, solver=solver)
    sigmas.set_timesteps(STEPS)
    with torch.no_grad():
        reference = solve_ode(EDMWrapped(unet), latents, sigmas.sigmas, solver=solver)
    scale = float(reference.abs().max())
    tolerance = 16 * STEPS * torch.finfo(torch.float32).eps * scale
    assert float((samples - reference).abs().max()) <= tolerance
    arrays = pipe(generator=generators(SEEDS), num_inference_steps=STEPS, output_type='np').images
    assert arrays.shape == (3, 8, 8, 3) and arrays.dtype == np.float32 and 0 <= arrays.min() <= arrays.max() <= 1
    images = pipe(generator=generators(SEEDS), num_inference_steps=STEPS).images
    assert np.array_equal(np.stack([np.asarray(i) for i in images]), to_uint8(samples).permute(0, 2, 3, 1).numpy())


def test_train_unet2d_with_pfgmpp_loss():
    """The documented training example (docs/diffusers.md): EDM's loss with the PFGM++ kernel through add_noise."""
    from training.loss import DEFAULT_BETA_CLIP, EDMLoss
    unet = tiny_unet(1).train()
    scheduler = PFGMPPScheduler(D=128)
    loss_fn = EDMLoss(D=128)
    g = torch.Generator().manual_seed(0)
    images = (torch.rand([8, 3, 8, 8], generator=g) * 2 - 1).round() * 0.8  # a tiny data set of two-level images
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-3)

    def loss_of(batch, generator):
        sigma = loss_fn.sample_sigma(batch.shape[0], generator=generator)              # [B, 1, 1, 1]
        noisy = scheduler.add_noise(batch, sigmas=sigma, generator=generator, clip_beta=DEFAULT_BETA_CLIP)
        model_out = unet(scheduler.precondition_inputs(noisy, sigma), scheduler.precondition_noise(sigma).flatten())
        denoised = scheduler.precondition_outputs(noisy, model_out.sample, sigma)
        return (loss_fn.weight(sigma) * (denoised - batch).square()).mean()

    def held_out_loss():
        with torch.no_grad():
            return float(loss_of(images, torch.Generator().manual_seed(99)))

    before = held_out_loss()
    for step in range(25):
        optimizer.zero_grad()
        loss = loss_of(images, g)
        loss.backward()
        grads = [p.grad for p in unet.parameters() if p.grad is not None]
        assert math.isfinite(loss.item())
        assert len(grads) == len(list(unet.parameters())) and all(bool(gr.isfinite().all()) for gr in grads)
        assert sum(float(gr.abs().sum()) for gr in grads) > 0
        optimizer.step()
    after = held_out_loss()
    assert after < before


# ----------------------------------------------------------------------------
# Export -> from_pretrained -> sample.

def tiny_precond(name):
    extra = dict(M=50) if name == 'iDDPMPrecond' else {}
    torch.manual_seed(0)
    net = getattr(networks, name)(label_dim=0, **TINY_KWARGS, **extra)
    return randomize_parameters_(net, 9).eval().requires_grad_(False)


@pytest.mark.parametrize('name', ['VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond', 'EDMPrecond-D128'])
def test_export_from_pretrained_samples_like_the_network(tmp_path, name):
    net = make_tiny_net(pfgmpp=True, D=128, seed=2) if name.endswith('D128') else tiny_precond(name)
    folder = Path(export_diffusers(net, tmp_path / 'pipe'))
    for part in ('model_index.json', 'unet/config.json', 'unet/diffusion_pytorch_model.safetensors',
                 'scheduler/scheduler_config.json'):
        assert (folder / part).is_file(), part
    assert not list(tmp_path.glob('.pipe.*'))
    pipe = PFGMPPPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.unet, PFGMPPNetwork) and isinstance(pipe.scheduler, PFGMPPScheduler)
    D = 128 if name.endswith('D128') else None
    assert pipe.scheduler.D == D
    samples = pipe(generator=generators([1, 2]), num_inference_steps=3, output_type='pt').images
    assert torch.equal(samples, sample_batch(net, [1, 2], D=D, num_steps=3))
    with pytest.raises(DiffusersExportError, match='already exists'):
        export_diffusers(net, folder)
    (folder / 'stale.txt').write_text('left by an earlier export')
    assert export_diffusers(net, folder, force=True) == str(folder)
    assert not (folder / 'stale.txt').exists() and (folder / 'model_index.json').is_file()


@pytest.mark.slow
def test_export_cli_original_snapshot(tmp_path, golden_dir):
    """The original EDM code's snapshot (unpickled through its own classes) exports and samples like generate.py."""
    from formats.network_io import load_network
    snapshot = golden_dir / 'snapshots' / 'network-snapshot-000000.pkl'
    folder = tmp_path / 'edm-pipeline'
    result = run_python(['export.py', '--format=diffusers', f'--input={snapshot}', f'--output={folder}'])
    assert 'Wrote' in result.stdout
    pipe = PFGMPPPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    original = load_network(str(snapshot), prefer_weights=False)
    steps = 3
    samples = pipe(generator=generators([5, 6]), num_inference_steps=steps, output_type='pt').images
    # The folder holds the network in our class: generate.py with our class of the same weights, bit for bit.
    assert type(pipe.unet.net) is networks.EDMPrecond and type(original) is not networks.EDMPrecond
    assert torch.equal(samples, sample_batch(PFGMPPNetwork.from_network(original).net, [5, 6], num_steps=steps))
    # generate.py with the original's own unpickled classes: their float32 arithmetic rounds otherwise, a few
    # float32 roundings of the output's scale per network evaluation (Heun: 2 * steps - 1 of them).
    reference = sample_batch(original, [5, 6], num_steps=steps)
    tolerance = 32 * (2 * steps - 1) * torch.finfo(torch.float32).eps * float(reference.abs().max())
    assert float((samples - reference).abs().max()) <= tolerance
    again = run_python(['export.py', '--format=diffusers', f'--input={snapshot}', f'--output={folder}'], check=False)
    assert again.returncode == 1 and 'already exists' in again.stderr and len(again.stderr.strip().splitlines()) == 1
    check = run_python(['export.py', '--format=diffusers', '--check', f'--input={snapshot}'], check=False)
    assert check.returncode == 2 and 'drop --format' in check.stderr


@pytest.mark.slow
def test_export_without_diffusers_says_what_to_install(tmp_path):
    """Without diffusers the rest works, and --format=diffusers fails with one line naming the requirements file."""
    blocked = tmp_path / 'blocked'
    (blocked / 'diffusers').mkdir(parents=True)
    (blocked / 'diffusers' / '__init__.py').write_text("raise ImportError('diffusers blocked by the test')\n")
    net = make_tiny_net()
    snapshot = save_snapshot(net, tmp_path / 'net.pkl')
    env = dict(PYTHONPATH=f'{blocked}:{REPO_ROOT}')
    result = run_python(['export.py', '--format=diffusers', f'--input={snapshot}'], env=env, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install -r requirements-diffusers.txt' in lines[0]
    assert not (tmp_path / 'net.diffusers').exists()
    plain = run_python(['export.py', f'--input={snapshot}'], env=env)
    assert 'Wrote' in plain.stdout and (tmp_path / 'net.weights.pt').is_file()
    probe = run_python(['-c', 'import sys, export, generate, fid, train; assert "diffusers" not in sys.modules'])
    assert probe.returncode == 0
    assert sys.modules.get('diffusers') is diffusers


@pytest.mark.parametrize('umask', [0o022, 0o002])
def test_exported_folder_has_the_permissions_of_a_plain_create(tmp_path, umask):
    """diffusers and safetensors may write owner-only files; the exported folder must be readable as the umask
    allows, like every other file the project writes."""
    net = make_tiny_net(seed=3)
    old = os.umask(umask)
    try:
        folder = Path(export_diffusers(net, tmp_path / 'pipe'))
    finally:
        os.umask(old)
    modes = {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob('*')]}
    assert modes['unet/diffusion_pytorch_model.safetensors'] == 0o666 & ~umask
    assert {m for name, m in modes.items() if (folder / name).is_file()} == {0o666 & ~umask}
    assert {m for name, m in modes.items() if (folder / name).is_dir()} == {0o777 & ~umask}


def test_export_refuses_a_consistency_model(tmp_path):
    from training import consistency
    teacher = make_tiny_net(seed=4)
    name, init_kwargs, _ = consistency.teacher_description(teacher)
    model = consistency.ConsistencyModel(denoiser_class=name, denoiser_kwargs=init_kwargs)
    consistency.copy_teacher_weights(teacher, model)
    with pytest.raises(DiffusersExportError, match='consistency model'):
        export_diffusers(model, tmp_path / 'pipe')
    assert list(tmp_path.iterdir()) == []
