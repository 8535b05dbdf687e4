"""Consistency tuning (training/consistency.py) and its few-step sampler (sampling/consistency.py).

The pair construction of the loss (exact for finite D, ECT's at D = inf), the boundary condition of the
parameterisation, the sampler's per-seed determinism and refusals, and the command line end to end: train.py tunes
a snapshot (the original EDM golden snapshot and one of our PFGM++ networks), resumes bit-exactly, and generate.py
samples the result in 1, 2 and 4 steps, also from the weights-only file export.py writes.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import scipy.stats
import torch

from sampling import consistency as sampling_cm
from sampling import pipeline
from tests._sampler_nets import TINY_KWARGS, make_tiny_net, save_snapshot
from tests._train_data import make_dataset_zip
from tests.conftest import run_python
from training import consistency

SINGLE_THREAD = {'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
GOLDEN_EDM = 'tests/golden/snapshots/network-snapshot-000000.pkl'  # original EDM code, 16x16, augment_dim=9
ACCEPT_P = 1e-3


def _wrap(teacher: torch.nn.Module, **kwargs) -> consistency.ConsistencyModel:
    name, init_kwargs, _ = consistency.teacher_description(teacher)
    model = consistency.ConsistencyModel(denoiser_class=name, denoiser_kwargs=init_kwargs, **kwargs)
    consistency.copy_teacher_weights(teacher, model)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------
# Pairs (t, r) of the loss.


@pytest.mark.parametrize('D', [1, 8, 128, 4096])
def test_pair_shares_one_perturbation_exactly_for_finite_D(D: int):
    loss = consistency.ConsistencyLoss(D=D, beta_clip=None)
    gen = torch.Generator().manual_seed(D)
    y = torch.rand([64, 3, 4, 4], generator=gen) * 2 - 1
    t = loss.sample_t(64, generator=gen)
    r = loss.r_for(t, stage=1)
    assert bool((r < t).any()) and bool((r >= loss.sigma_min).all()) and bool((r <= t).all())
    x_t, x_r = loss.pair(y, t, r, gen)
    # x_r - y must be (r / t) (x_t - y): the only error is float32 rounding of the additions, relative to |y| + |n|.
    scale = (x_t - y).abs() + y.abs() + 1
    eps = torch.finfo(torch.float32).eps
    assert bool(((x_r - y) - (r / t) * (x_t - y)).abs().le(4 * eps * scale).all())


@pytest.mark.parametrize('D', [4, 64])
def test_pair_point_r_follows_the_kernel_at_r(D: int):
    """|x_r - y|^2 / (r^2 D) of the shared draw follows the kernel's beta-prime(N/2, D/2) law at sigma = r."""
    loss = consistency.ConsistencyLoss(D=D, beta_clip=None)
    gen = torch.Generator().manual_seed(7)
    count, shape = 4000, [1, 2, 2]
    N = math.prod(shape)
    y = torch.zeros([count, *shape], dtype=torch.float64)
    t = torch.full([count, 1, 1, 1], 3.0, dtype=torch.float64)
    r = torch.full_like(t, 0.7)
    _, x_r = loss.pair(y, t, r, gen)
    ratio = x_r.flatten(1).square().sum(1) / (0.7 ** 2 * D)
    assert scipy.stats.kstest(ratio.numpy(), scipy.stats.betaprime(N / 2, D / 2).cdf).pvalue > ACCEPT_P
    # The test can fail: the same statistic at the wrong level (t) is rejected.
    _, x_t = loss.pair(y, t, t, torch.Generator().manual_seed(7))
    wrong = x_t.flatten(1).square().sum(1) / (0.7 ** 2 * D)
    assert scipy.stats.kstest(wrong.numpy(), scipy.stats.betaprime(N / 2, D / 2).cdf).pvalue < ACCEPT_P


def test_pair_at_D_infinity_is_ects_shared_gaussian_noise():
    loss = consistency.ConsistencyLoss(D=math.inf)
    assert loss.D is None
    y = torch.rand([8, 3, 4, 4], generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0.01, 50, 8).reshape(-1, 1, 1, 1)
    r = loss.r_for(t, stage=0)
    x_t, x_r = loss.pair(y, t, r, torch.Generator().manual_seed(5))
    eps = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    tol = 4 * torch.finfo(torch.float32).eps * (t * eps.abs() + y.abs() + 1)
    assert bool(((x_t - (y + t * eps)).abs() <= tol).all())
    assert bool(((x_r - (y + r * eps)).abs() <= tol).all())


def test_gap_shrinks_by_q_per_stage_and_follows_ects_mapping():
    loss = consistency.ConsistencyLoss(q=2, k=8, b=1, stage_kimg=1)
    t = torch.tensor([0.5, 2.0, 10.0, 60.0]).reshape(-1, 1, 1, 1)
    gaps = [(t - loss.r_for(t, stage)).flatten() for stage in (3, 4, 5)]
    torch.testing.assert_close(gaps[1] / gaps[0], torch.full([4], 0.5), rtol=1e-5, atol=0)
    torch.testing.assert_close(gaps[2] / gaps[1], torch.full([4], 0.5), rtol=1e-5, atol=0)
    expected = t.flatten() * (1 + 8 * torch.sigmoid(-t.flatten())) / 2 ** 4
    torch.testing.assert_close(gaps[0], expected, rtol=1e-5, atol=0)
    loss.set_progress(2999)
    assert loss.stage == 2
    loss.set_progress(3000)
    assert loss.stage == 3


# ----------------------------------------------------------------------------
# The parameterisation.


def _teachers() -> dict[str, torch.nn.Module]:
    from training.networks import VEPrecond, VPPrecond
    torch.manual_seed(0)
    kwargs = {k: v for k, v in TINY_KWARGS.items()}
    return {'edm-pfgmpp': make_tiny_net(pfgmpp=True, D=128), 'edm': make_tiny_net(),
            'vp': VPPrecond(**kwargs).eval(), 've': VEPrecond(**kwargs).eval()}


@pytest.mark.parametrize('kind', ['edm-pfgmpp', 'edm', 'vp', 've'])
def test_consistency_step_at_sigma_min_is_the_identity(kind: str):
    model = _wrap(_teachers()[kind])
    x = torch.randn([3, 3, 8, 8], generator=torch.Generator().manual_seed(2)) * 3
    assert torch.equal(model(x, model.sigma_min), x)
    assert torch.equal(model(x, torch.full([3], model.sigma_min)), x)
    assert torch.equal(model(x, model.sigma_min / 2), x)
    # Above sigma_min it is the Euler step of the ODE to sigma_min, built on the teacher's denoiser.
    sigma = 1.7
    denoised = model.denoiser(x, sigma)
    torch.testing.assert_close(model(x, sigma), denoised + model.sigma_min / sigma * (x - denoised),
                               rtol=0, atol=8 * torch.finfo(torch.float32).eps * float(x.abs().max()))
    assert not torch.equal(model(x, sigma), x)
    assert model.sigma_min == max(consistency.DEFAULT_SIGMA_MIN, float(getattr(model.denoiser, 'sigma_min', 0)))


def test_model_records_consistency_and_kernel_and_survives_pickle_and_export():
    from formats import export
    model = _wrap(make_tiny_net(pfgmpp=True, D=128))
    assert model.consistency and model.pfgmpp and model.D == 128
    clone = pickle.loads(pickle.dumps(model))
    assert consistency.is_consistency_model(clone) and clone.D == 128
    rebuilt = export.network_from_record(export.network_record(model), 'test').eval()
    assert type(rebuilt).__name__ == 'ConsistencyModel' and rebuilt.D == 128
    x = torch.randn([2, 3, 8, 8])
    assert torch.equal(rebuilt(x, 2.0), model(x, 2.0))


def test_weights_only_file_refuses_a_denoiser_class_outside_the_preconditioners():
    from formats import export
    record = export.network_record(_wrap(make_tiny_net()))
    record['init_kwargs'] = record['init_kwargs'].replace('training.networks.EDMPrecond', 'os.system')
    with pytest.raises(export.WeightsFormatError, match='preconditioners'):
        export.network_from_record(record, 'evil.weights.pt')


# ----------------------------------------------------------------------------
# Sampling.


@pytest.mark.parametrize('D', [None, 128])
def test_sampling_depends_on_the_seed_alone(D):
    model = _wrap(make_tiny_net(pfgmpp=D is not None, D=D or 128))
    for steps in (1, 2, 4):
        together = pipeline.sample_batch(model, [3, 5, 8], D=D, num_steps=steps)
        alone = torch.cat([pipeline.sample_batch(model, [s], D=D, num_steps=steps) for s in (3, 5, 8)])
        assert torch.equal(together, alone)
        assert together.dtype == torch.float64 and together.shape == (3, 3, 8, 8)
    # More steps re-noise with fresh per-seed noise, so they change the image.
    assert not torch.equal(pipeline.sample_batch(model, [3], D=D, num_steps=1),
                           pipeline.sample_batch(model, [3], D=D, num_steps=2))


def test_sampler_evaluates_the_documented_noise_levels():
    model = _wrap(make_tiny_net())
    assert pipeline.evaluated_noise_levels(model, num_steps=1) == [80.0]
    assert pipeline.evaluated_noise_levels(model, num_steps=2) == pytest.approx([0.821, 80.0])
    assert pipeline.evaluated_noise_levels(model, num_steps=4) == pytest.approx([0.169, 0.821, 2.51, 80.0])


def test_one_step_sample_is_f_of_the_prior_latents():
    model = _wrap(make_tiny_net())
    seeds = [1, 2]
    latents = pipeline.draw_latents(model, seeds, pipeline.PerSeedRandom(seeds))
    expected = model(latents.to(torch.float64) * 80, torch.tensor(80.0)).to(torch.float64)
    assert torch.equal(pipeline.sample_batch(model, seeds, num_steps=1), expected)


@pytest.mark.parametrize('consistent, kwargs, flag', [
    (True, dict(num_steps=3), '--steps=3'),
    (True, dict(num_steps=2, solver='heun'), '--solver'),
    (True, dict(num_steps=2, S_churn=10), '--S_churn'),
    (True, dict(num_steps=2, rho=3), '--rho'),
    (True, dict(num_steps=None), '--steps'),
    (False, dict(num_steps=1), '--steps=1'),
])
def test_bad_combinations_are_refused_in_one_line(consistent, kwargs, flag):
    with pytest.raises(ValueError) as info:
        sampling_cm.check_request(consistent, kwargs)
    assert flag in str(info.value) and '\n' not in str(info.value)
    if not consistent:
        assert 'consistency' in str(info.value)


def test_ordinary_and_consistency_requests_that_fit_pass():
    sampling_cm.check_request(False, dict(num_steps=2, solver='heun'))
    for steps in (1, 2, 4):
        sampling_cm.check_request(True, dict(num_steps=steps, sigma_max=80.0, solver=None, rho=7, S_churn=0,
                                             S_min=0, S_max=math.inf, S_noise=1))


# ----------------------------------------------------------------------------
# The loss.


def test_loss_target_branch_has_no_gradient_and_rewinds_dropout():
    model = _wrap(make_tiny_net(dropout=0.5)).train().requires_grad_(True)
    loss = consistency.ConsistencyLoss(stage_kimg=1)
    images = torch.rand([4, 3, 8, 8]) * 2 - 1
    torch.manual_seed(3)
    calls = []
    model.register_forward_hook(lambda _m, _i, out: calls.append((torch.is_grad_enabled(), out.requires_grad)))
    values = loss(model, images, generator=torch.Generator().manual_seed(1))
    assert calls == [(False, False), (True, True)]
    values.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


class _RecordingLoss(consistency.ConsistencyLoss):
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.seen = (a.detach(), b.detach())
        return super().distance(a, b)


def test_both_branches_draw_the_same_dropout_masks():
    """With r = t (a stage so late that the gap is below float32 resolution) both branches see the same input;
    they agree exactly only if the target pass reuses the online pass's dropout masks, as ECT does."""
    model = _wrap(make_tiny_net(dropout=0.5)).train()
    loss = _RecordingLoss()
    loss.set_progress(10 ** 12)
    images = torch.rand([4, 3, 8, 8]) * 2 - 1
    torch.manual_seed(3)
    with torch.no_grad():
        loss(model, images, generator=torch.Generator().manual_seed(1))
    online, target = loss.seen
    assert torch.equal(online, target)
    # The masks matter: two passes that do not share them disagree.
    x, sigma = images + 0.5, torch.full([4], 1.0)
    with torch.no_grad():
        assert not torch.equal(model(x, sigma), model(x, sigma))


def test_tuning_on_a_toy_problem_lowers_the_loss():
    torch.manual_seed(0)
    model = _wrap(make_tiny_net(dropout=0.0)).train().requires_grad_(True)
    loss = consistency.ConsistencyLoss(stage_kimg=1e9)
    images = torch.rand([8, 3, 8, 8], generator=torch.Generator().manual_seed(4)) * 0.2 - 0.1
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)

    def value() -> float:
        with torch.no_grad():
            return float(loss(model, images, generator=torch.Generator().manual_seed(99)).mean())
    before = value()
    for step in range(30):
        optimizer.zero_grad()
        loss(model, images, generator=torch.Generator().manual_seed(step)).mean().backward()
        optimizer.step()
    assert value() < 0.5 * before


# ----------------------------------------------------------------------------
# The command line.

TUNE_ARGS = ['--batch=4', '--tick=0.008', '--snap=1', '--dump=1', '--seed=1', '--lr=0.0001', '--ema=0.00001',
             '--workers=0', '--device=cpu', '--cm-stage=0.004', '--lr-rampup=0']


def _train(args: list[str], check: bool = True):
    return run_python(['train.py', *args], env=SINGLE_THREAD, check=check, timeout=300)


def _generate(network: Path, outdir: Path, *flags: str, check: bool = True):
    return run_python(['generate.py', f'--network={network}', f'--outdir={outdir}', '--seeds=0-2', '--device=cpu',
                       *flags], env=SINGLE_THREAD, check=check, timeout=300)


@pytest.fixture(scope='module')
def pfgmpp_teacher(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp('teacher')
    net = make_tiny_net(pfgmpp=True, D=128, dropout=0.1)
    return save_snapshot(net, root / 'teacher.pkl'), make_dataset_zip(root / 'data8.zip', count=16, resolution=8)


def test_tuning_from_a_pfgmpp_snapshot_resumes_bit_exactly(pfgmpp_teacher, tmp_path: Path):
    teacher, data = pfgmpp_teacher
    common = [f'--data={data}', '--consistency=1', f'--init={teacher}', *TUNE_ARGS, '--resume=auto', '--phema=0.05',
              '--snap-format=both']
    _train([f'--outdir={tmp_path / "a"}', '--nosubdir', '--duration=0.000016', *common])
    _train([f'--outdir={tmp_path / "b"}', '--nosubdir', '--duration=0.000008', *common])
    resumed = _train([f'--outdir={tmp_path / "b"}', '--nosubdir', '--duration=0.000016', *common])
    assert 'Resuming from the training state' in resumed.stdout
    a = torch.load(tmp_path / 'a' / 'training-state-000000.pt', map_location='cpu', weights_only=False)
    b = torch.load(tmp_path / 'b' / 'training-state-000000.pt', map_location='cpu', weights_only=False)
    assert a['step'] == b['step'] == 16
    for key in ('net', 'ema'):
        sa, sb = a[key].state_dict(), b[key].state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa), key
    assert consistency.is_consistency_model(a['ema']) and a['ema'].D == 128
    # The post-hoc EMA and the weights-only twin of the snapshot continue exactly too, and hold the model.
    from formats import export
    for name in ('network-snapshot-0000000-0.050.pkl', 'network-snapshot-000000.pkl'):
        with open(tmp_path / 'a' / name, 'rb') as f:
            ema_a = pickle.load(f)['ema']
        with open(tmp_path / 'b' / name, 'rb') as f:
            ema_b = pickle.load(f)['ema']
        assert all(torch.equal(x, y) for x, y in zip(ema_a.state_dict().values(), ema_b.state_dict().values()))
    weights = export.load_weights(tmp_path / 'b' / 'network-snapshot-000000.weights.pt')
    assert consistency.is_consistency_model(weights) and weights.D == 128
    assert all(torch.equal(x, y) for x, y in zip(weights.state_dict().values(), ema_b.state_dict().values()))
    # It trained: the weights moved away from the teacher's.
    teacher_state = make_tiny_net(pfgmpp=True, D=128, dropout=0.1).state_dict()
    assert any(not torch.equal(v, teacher_state[n.removeprefix('denoiser.')])
               for n, v in a['net'].state_dict().items())


def test_tuned_golden_edm_snapshot_samples_in_1_2_4_steps_and_exports(tmp_path: Path):
    data = make_dataset_zip(tmp_path / 'data16.zip', count=8, resolution=16)
    _train([f'--outdir={tmp_path / "run"}', '--nosubdir', f'--data={data}', '--consistency=1', f'--init={GOLDEN_EDM}',
            '--duration=0.000008', *TUNE_ARGS])
    snapshot = tmp_path / 'run' / 'network-snapshot-000000.pkl'
    with open(snapshot, 'rb') as f:
        ema = pickle.load(f)['ema']
    assert ema.consistency and not ema.pfgmpp and ema.sigma_min == consistency.DEFAULT_SIGMA_MIN
    for steps in (1, 2, 4):
        _generate(snapshot, tmp_path / f'steps{steps}', f'--steps={steps}')
        assert len(list((tmp_path / f'steps{steps}').glob('*.png'))) == 3
    one = np.asarray(PIL.Image.open(tmp_path / 'steps1' / '000000.png'))
    assert not np.array_equal(one, np.asarray(PIL.Image.open(tmp_path / 'steps2' / '000000.png')))
    # generate.py's pixels are the library's for the same seed.
    expected = pipeline.to_uint8(pipeline.sample_batch(ema, [0], num_steps=1))[0].permute(1, 2, 0).numpy()
    assert np.array_equal(one, expected)

    weights = tmp_path / 'cm.weights.pt'
    run_python(['export.py', f'--input={snapshot}', f'--output={weights}'], env=SINGLE_THREAD)
    _generate(weights, tmp_path / 'from-weights', '--steps=1')
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / 'from-weights' / '000000.png')), one)

    for flags, expected_text in ((['--steps=3'], '1, 2 or 4 steps'), (['--steps=2', '--solver=heun'], '--solver'),
                                 ([], '--steps=18')):
        proc = _generate(snapshot, tmp_path / 'refused', *flags, check=False)
        assert proc.returncode != 0 and expected_text in proc.stderr, proc.stderr
        assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr
    proc = _generate(Path(GOLDEN_EDM), tmp_path / 'refused', '--steps=1', check=False)
    assert proc.returncode != 0 and 'consistency' in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr
    assert not (tmp_path / 'refused').exists() or not list((tmp_path / 'refused').glob('*.png'))


@pytest.mark.parametrize('case', ['no-init', 'init-alone', 'with-transfer', 'arch-flag', 'wrong-D', 'wrong-size'])
def test_bad_tuning_flags_fail_with_one_line(case: str, pfgmpp_teacher, tmp_path: Path):
    teacher, data = pfgmpp_teacher
    flags = {
        'no-init': ['--consistency=1'],
        'init-alone': [f'--init={teacher}'],
        'with-transfer': ['--consistency=1', f'--init={teacher}', f'--transfer={teacher}'],
        'arch-flag': ['--consistency=1', f'--init={teacher}', '--cbase=8'],
        'wrong-D': ['--consistency=1', f'--init={teacher}', '--pfgmpp=1', '--aug_dim=64'],
        'wrong-size': ['--consistency=1', f'--init={GOLDEN_EDM}'],
    }[case]
    expected = {'no-init': '--init', 'init-alone': '--transfer', 'with-transfer': '--transfer',
                'arch-flag': '--cbase', 'wrong-D': '--aug_dim', 'wrong-size': 'img_resolution'}[case]
    proc = _train([f'--outdir={tmp_path}', f'--data={data}', *TUNE_ARGS, '--duration=0.000004', *flags], check=False)
    assert proc.returncode in (1, 2) and expected in proc.stderr, proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip().startswith(('Error', 'Usage', 'Try'))]) \
        >= 1
    assert 'Traceback' not in proc.stderr
    assert not list(tmp_path.glob('**/training-state-*.pt'))


def test_fid_gen_samples_a_consistency_model_and_refuses_what_generate_refuses(golden_dir: Path, tmp_path: Path):
    from click.testing import CliRunner

    import fid
    model_path = tmp_path / 'cm.pkl'
    with open(model_path, 'wb') as f:
        pickle.dump(dict(ema=_wrap(make_tiny_net(pfgmpp=True, D=128))), f)
    ordinary = save_snapshot(make_tiny_net(), tmp_path / 'ordinary.pkl')
    detector = golden_dir / 'fid' / 'detector-standin.pkl'

    def gen(network: Path, steps: int, stats: str):
        args = ['gen', f'--network={network}', '--seeds=0-2', f'--steps={steps}', '--device=cpu',
                f'--detector={detector}', f'--save-stats={tmp_path / stats}.npz']
        return CliRunner().invoke(fid.main, args, catch_exceptions=False)
    mus = []
    for steps in (1, 2):
        result = gen(model_path, steps, f'cm{steps}')
        assert result.exit_code == 0, result.output
        mus.append(np.load(tmp_path / f'cm{steps}.npz')['mu'])
    assert not np.array_equal(mus[0], mus[1])
    for network, steps, text, extra in ((model_path, 3, '1, 2 or 4 steps', []), (ordinary, 1, 'consistency', []),
                                        (model_path, 2, 'consistency model; guidance',
                                         [f'--gnet={ordinary}', '--guidance=2'])):
        result = CliRunner().invoke(fid.main, ['gen', f'--network={network}', '--seeds=0-2', f'--steps={steps}',
                                               '--device=cpu', f'--detector={detector}',
                                               f'--save-stats={tmp_path / "refused"}.npz', *extra],
                                    catch_exceptions=False)
        assert result.exit_code != 0 and text in result.output, result.output
        assert not (tmp_path / 'refused.npz').exists()
