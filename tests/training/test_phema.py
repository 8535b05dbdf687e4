"""Post-hoc EMA (training/phema.py, train.py --phema, reconstruct_phema.py).

The math against independent computations (numerical integration, the beta recursion), the reconstruction of a
tracked profile (exact up to the solve's rounding) and of an untracked one (within the Cauchy-Schwarz bound of its
profile error), and end to end: --phema runs resume bit-exactly and their snapshots load in generate.py / fid.py.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.integrate import quad

from tests._train_data import make_dataset_zip, tiny_train_args
from tests.conftest import run_python
from training import phema

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(torch.finfo(torch.float32).eps)
SINGLE_THREAD = {'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}


# ----------------------------------------------------------------------------
# The math.


def test_gamma_sigma_rel_round_trip_and_published_values():
    gammas = np.array([0, 0.25, 1, 3, 6.94, 16.97, 100, 1e3, 1e4, 1e5])
    sigma_rel = phema.gamma_to_sigma_rel(gammas)
    back = phema.sigma_rel_to_gamma(sigma_rel)
    # sigma_rel carries a few roundings (relative error ~ 3 eps); d(ln gamma)/d(ln sigma_rel) is about -1 for large
    # gamma and gamma is absolute near 0, so the root is good to a few eps of (1 + gamma). 16 eps leaves room.
    assert np.all(np.abs(back - gammas) <= 16 * EPS64 * (1 + gammas))
    np.testing.assert_allclose(phema.gamma_to_sigma_rel(back), sigma_rel, rtol=16 * EPS64, atol=0)
    # EDM2 (section 3.1): sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
    np.testing.assert_allclose(phema.sigma_rel_to_gamma([0.05, 0.10]), [16.97, 6.94], atol=0.005)
    assert phema.sigma_rel_to_gamma(phema.MAX_SIGMA_REL) == pytest.approx(0, abs=1e-12)  # the uniform average


@pytest.mark.parametrize('sigma_rel', [0.01, 0.05, 0.2])
def test_sigma_rel_is_the_relative_std_of_the_profile(sigma_rel):
    gamma = float(phema.sigma_rel_to_gamma(sigma_rel))
    density = lambda t: (gamma + 1) * t ** gamma  # noqa: E731  (T = 1)
    mean = quad(lambda t: t * density(t), 0, 1, epsrel=1e-13)[0]
    second = quad(lambda t: t * t * density(t), 0, 1, epsrel=1e-13)[0]
    assert np.sqrt(second - mean ** 2) == pytest.approx(sigma_rel, rel=1e-9)


@pytest.mark.parametrize('bad', [0, -0.1, 0.3, float('nan')])
def test_sigma_rel_out_of_range_is_refused(bad):
    with pytest.raises(phema.PhemaError, match='out of range'):
        phema.sigma_rel_to_gamma(bad)


@pytest.mark.parametrize('t_a,s_a,t_b,s_b', [(100, 0.05, 300, 0.1), (300, 0.1, 100, 0.05), (7, 0.2, 7, 0.01),
                                             (2e9, 0.05, 1e9, 0.15)])
def test_inner_product_matches_numerical_integration(t_a, s_a, t_b, s_b):
    g_a, g_b = (float(g) for g in phema.sigma_rel_to_gamma([s_a, s_b]))
    profile = lambda t, end, g: (g + 1) * (t / end) ** g / end  # noqa: E731
    numeric = quad(lambda t: profile(t, t_a, g_a) * profile(t, t_b, g_b), 0, min(t_a, t_b), epsrel=1e-12,
                   epsabs=0)[0]
    assert phema.profile_inner_product(t_a, s_a, t_b, s_b) == pytest.approx(numeric, rel=1e-9)
    assert phema.profile_inner_product(t_a, s_a, t_b, s_b) == phema.profile_inner_product(t_b, s_b, t_a, s_a)


def test_profile_error_matches_numerical_integration():
    t_in, s_in = np.array([40.0, 80.0, 100.0, 100.0]), np.array([0.05, 0.1, 0.05, 0.1])
    out_t, out_s = 100.0, np.array([0.03, 0.07, 0.25])
    c = phema.solve_coefficients(t_in, s_in, out_t, out_s)
    profile = lambda t, end, std: np.where(  # noqa: E731
        t <= end, (phema.sigma_rel_to_gamma(std) + 1) * (t / end) ** phema.sigma_rel_to_gamma(std) / end, 0)
    for j, std in enumerate(out_s):
        residual = lambda t: (sum(c[i, j] * profile(t, t_in[i], s_in[i]) for i in range(4))  # noqa: E731
                              - profile(t, out_t, std)) ** 2
        numeric = sum(quad(residual, a, b, epsrel=1e-12, epsabs=0)[0] for a, b in ((0, 40), (40, 80), (80, 100)))
        norm = quad(lambda t: profile(t, out_t, std) ** 2, 0, out_t, epsrel=1e-12, epsabs=0)[0]
        assert phema.profile_error(t_in, s_in, c[:, j:j + 1], out_t, std)[0] == pytest.approx(
            np.sqrt(numeric / norm), rel=1e-6, abs=1e-7)
    errors = phema.profile_error(t_in, s_in, c, out_t, out_s)
    assert errors.shape == (3,) and errors[0] > errors[1] and errors[2] > errors[1]  # worst outside the tracked range
    tracked = phema.solve_coefficients(t_in, s_in, 100.0, 0.1)
    # A tracked profile: only rounding remains (its square root, as the error is a norm of a difference).
    assert phema.profile_error(t_in, s_in, tracked, 100.0, 0.1)[0] < 1e-4


def test_beta_recursion_gives_the_integrated_profile():
    """The tracked average after n steps is the profile's mass on each step's interval (float64 scalars)."""
    batch, steps, sigma_rel = 8, 300, 0.07
    values = np.random.default_rng(0).standard_normal(steps)
    average = 0.0
    for k in range(1, steps + 1):
        beta = phema.ema_beta(sigma_rel, k * batch, batch)
        average = beta * average + (1 - beta) * values[k - 1]
    weights = phema.step_weights(steps * batch, sigma_rel, batch)
    assert weights.sum() == pytest.approx(1, abs=steps * EPS64)
    # Each of the n updates rounds at most a few times: n * 8 eps of the values' scale.
    assert abs(average - weights @ values) <= steps * 8 * EPS64 * np.abs(values).max()


# ----------------------------------------------------------------------------
# Reconstruction from tracked snapshots (a synthetic run: a random walk of weights, tracked by PowerFunctionEMA).

BATCH, STEPS, SNAP_EVERY, TRACKED = 500, 48, 8, (0.05, 0.10)


def _synthetic_run(folder: Path, extra_std: float) -> tuple[list[np.ndarray], torch.nn.Module]:
    """Write tracked snapshots every SNAP_EVERY steps (2 kimg apart); returns the weights of every step and the
    directly tracked average of ``extra_std`` at the end."""
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 5)
    tracker = phema.PowerFunctionEMA(net, TRACKED)
    direct = phema.PowerFunctionEMA(net, [extra_std])
    params = [p.detach() for p in net.parameters()]
    generator = torch.Generator().manual_seed(1)
    history = []
    for step in range(1, STEPS + 1):
        with torch.no_grad():
            for p in params:  # drift plus noise, like weights in training
                p.add_(0.05 + 0.3 * torch.randn(p.shape, generator=generator))
        history.append(torch.cat([p.flatten() for p in params]).double().numpy().copy())
        tracker.update(params, step * BATCH, BATCH)
        direct.update(params, step * BATCH, BATCH)
        if step % SNAP_EVERY == 0:
            for std, averaged in tracker.networks(net):
                data = dict(ema=averaged, loss_fn=None, augment_pipe=None, dataset_kwargs={},
                            phema=phema.snapshot_record(step * BATCH, std))
                with open(folder / phema.snapshot_name(phema.TRACKED_PREFIX, step * BATCH, std), 'wb') as f:
                    pickle.dump(data, f)
    return history, direct.emas[0]


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_reconstruction_of_a_tracked_profile_reproduces_it(tmp_path):
    _synthetic_run(tmp_path, 0.07)
    snapshots = phema.list_tracked_snapshots(str(tmp_path))
    assert len(snapshots) == 2 * STEPS // SNAP_EVERY and snapshots[-1].nimg == STEPS * BATCH
    (std, result), = phema.reconstruct(snapshots, [0.05])
    with open(tmp_path / phema.snapshot_name(phema.TRACKED_PREFIX, STEPS * BATCH, 0.05), 'rb') as f:
        tracked = pickle.load(f)['ema']
    coefficients = np.array(result['phema']['coefficients'])
    t_in, s_in = np.array([s.nimg for s in snapshots]), np.array([s.std for s in snapshots])
    gram = phema.profile_inner_product(t_in[:, None], s_in[:, None], t_in[None], s_in[None])
    condition = np.linalg.cond(gram)
    # The solve is backward stable: coefficient errors of about cond(A) * eps64 around the unit vector.
    unit = np.array([1.0 if (s.nimg, s.std) == (STEPS * BATCH, 0.05) else 0.0 for s in snapshots])
    coefficient_tol = len(snapshots) * condition * EPS64
    assert np.abs(coefficients - unit).max() <= coefficient_tol, (condition, coefficients)
    # Weights: those coefficient errors times the largest weight of any input, plus one float32 rounding.
    scale = max(_flat(pickle.load(open(s.path, 'rb'))['ema']).abs().max().item() for s in snapshots)
    tol = scale * (EPS32 + len(snapshots) * coefficient_tol)
    assert (_flat(result['ema']) - _flat(tracked)).abs().max().item() <= tol
    assert std == 0.05 and result['phema']['nimg'] == STEPS * BATCH


def test_reconstruction_of_an_untracked_profile_is_within_its_profile_error(tmp_path):
    target = 0.07
    history, direct = _synthetic_run(tmp_path, target)
    snapshots = phema.list_tracked_snapshots(str(tmp_path))
    (_, result), = phema.reconstruct(snapshots, [target])
    c = np.array(result['phema']['coefficients'])
    t_in, s_in = np.array([s.nimg for s in snapshots]), np.array([s.std for s in snapshots])
    end = STEPS * BATCH
    target_norm = np.sqrt(phema.profile_inner_product(end, target, end, target))
    profile_error, = phema.profile_error(t_in, s_in, c[:, None], end, target) * target_norm
    # Both averages integrate the step-wise constant weights against a profile of mass 1, so their difference is
    # <p_rec - p_target, theta - mean> <= |p_rec - p_target| * |theta - mean| (Cauchy-Schwarz, per weight).
    history = np.stack(history)
    centred = history - history.mean(axis=0)
    theta_norm = np.sqrt((centred ** 2).sum(axis=0) * BATCH)
    difference = (_flat(result['ema']).double() - _flat(direct).double()).numpy()
    rounding = 8 * EPS32 * np.abs(history).max()
    assert np.all(np.abs(difference) <= profile_error * theta_norm + rounding)
    assert profile_error < 0.1 * target_norm  # a close profile
    assert np.abs(difference).max() > 0  # the comparison is not vacuous


def test_solver_refuses_duplicates_and_bad_requests(tmp_path):
    with pytest.raises(phema.PhemaError, match='repeat a profile'):
        phema.solve_coefficients([10, 10], [0.05, 0.05], 10, 0.05)
    _synthetic_run(tmp_path, 0.07)
    snapshots = phema.list_tracked_snapshots(str(tmp_path))
    with pytest.raises(phema.PhemaError, match='no tracked snapshot at 123 images'):
        list(phema.reconstruct(snapshots, [0.05], out_nimg=123))
    with pytest.raises(phema.PhemaError, match='no such directory'):
        phema.list_tracked_snapshots(str(tmp_path / 'missing'))


def test_reconstruct_script_writes_loadable_snapshots_and_one_line_errors(tmp_path):
    import reconstruct_phema
    from formats.network_io import load_network

    (tmp_path / 'run').mkdir()
    _synthetic_run(tmp_path / 'run', 0.07)
    runner = CliRunner()
    out = tmp_path / 'out'
    result = runner.invoke(reconstruct_phema.main, [f'--indir={tmp_path / "run"}', f'--outdir={out}',
                                                    '--outstd=0.06,0.12', '--outkimg=12'])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ['phema-0000012-0.060.pkl', 'phema-0000012-0.120.pkl']
    net = load_network(str(out / 'phema-0000012-0.060.pkl'))
    assert isinstance(net, torch.nn.Linear)
    with open(out / 'phema-0000012-0.060.pkl', 'rb') as f:
        record = pickle.load(f)['phema']
    assert record['nimg'] == 12000 and len(record['sources']) == 2 * 3  # snapshots at 4, 8 and 12 kimg
    for args, fragment in ((['--outstd=0.5'], 'out of range'), (['--outstd=0.1', '--outkimg=13'], '--outkimg'),
                           (['--outstd=x'], 'comma-separated')):
        result = runner.invoke(reconstruct_phema.main, [f'--indir={tmp_path / "run"}', f'--outdir={out}', *args])
        errors = [line for line in result.output.splitlines() if line.startswith('Error')]
        assert result.exit_code != 0 and len(errors) == 1 and fragment in result.output, result.output
    result = runner.invoke(reconstruct_phema.main, [f'--indir={tmp_path}', f'--outdir={out}', '--outstd=0.1'])
    assert result.exit_code == 1 and 'train with --phema' in result.output


# ----------------------------------------------------------------------------
# train.py --phema end to end.

STEP_IMAGES = 4
# Class-conditional with label dropout, so that exact resume also covers the dropped labels (drawn from the
# generator the loop seeds per micro-batch) and the result serves classifier-free guidance.
PHEMA_ARGS = dict(tick=4 * STEP_IMAGES / 1e3, snap=1, dump=1, lr_rampup=0, nosubdir=True, phema='0.05,0.1', cond=1,
                  label_dropout=0.5)
FULL_STEPS = 8


@pytest.fixture(scope='module')
def data_zip(tmp_path_factory) -> Path:
    return make_dataset_zip(tmp_path_factory.mktemp('data') / 'tiny.zip', count=16, resolution=8, num_classes=3)


def _train(args: list[str], check: bool = True):
    return run_python(['train.py', *args], env=SINGLE_THREAD, check=check, timeout=300)


def _state(folder: Path) -> dict:
    states = sorted(folder.glob('training-state-*.pt'))
    return torch.load(states[-1], map_location='cpu', weights_only=False)


def test_phema_training_resumes_bit_exactly_and_its_snapshots_load(data_zip, tmp_path):
    full, split = tmp_path / 'full', tmp_path / 'split'
    _train(tiny_train_args(data_zip, full, duration=FULL_STEPS * STEP_IMAGES / 1e6, **PHEMA_ARGS))
    _train(tiny_train_args(data_zip, split, duration=FULL_STEPS // 2 * STEP_IMAGES / 1e6, **PHEMA_ARGS))
    half = _state(split)
    assert half['net'].label_dim == 3 and half['net'].model.label_dropout == 0.5
    assert half['step'] == FULL_STEPS // 2 * STEP_IMAGES and half['phema']['stds'] == [0.05, 0.1]
    resumed = _train(tiny_train_args(data_zip, split, duration=FULL_STEPS * STEP_IMAGES / 1e6,
                                     resume=sorted(split.glob('training-state-*.pt'))[-1], **PHEMA_ARGS))
    assert 'Resuming from the training state' in resumed.stdout
    a, b = _state(full), _state(split)
    assert a['step'] == b['step'] == FULL_STEPS * STEP_IMAGES
    for key in ('net', 'ema'):
        for (name, x), y in zip(a[key].state_dict().items(), b[key].state_dict().values()):
            assert torch.equal(x, y), (key, name)
    for x_ema, y_ema in zip(a['phema']['emas'], b['phema']['emas']):
        for name in x_ema:
            assert torch.equal(x_ema[name], y_ema[name]), name
    for std in ('0.050', '0.100'):
        name = f'network-snapshot-0000000-{std}.pkl'
        with open(full / name, 'rb') as f:
            x = pickle.load(f)
        with open(split / name, 'rb') as f:
            y = pickle.load(f)
        assert x['phema'] == y['phema'] == dict(nimg=FULL_STEPS * STEP_IMAGES, std=float(std), batch_size=4)
        assert all(torch.equal(p, q) for p, q in zip(x['ema'].parameters(), y['ema'].parameters()))
    # The tracked averages differ from each other and from the half-life EMA (they are really tracked).
    first, second = (torch.cat([v.flatten() for v in e.values()]) for e in a['phema']['emas'])
    assert not torch.equal(first, second)

    # Resuming with other --phema values, or adding --phema to a run without it, is one clear line.
    state = sorted(split.glob('training-state-*.pt'))[-1]
    other = _train(tiny_train_args(data_zip, tmp_path / 'other', duration=1, resume=state,
                                   **dict(PHEMA_ARGS, phema='0.05')), check=False)
    assert other.returncode == 1 and 'differs from the values 0.05,0.1' in other.stderr, other.stderr

    # The reconstruction of a tracked profile from one snapshot time, then generate.py and fid.py gen on it.
    import fid
    import generate
    import reconstruct_phema
    out = tmp_path / 'phema'
    result = CliRunner().invoke(reconstruct_phema.main, [f'--indir={full}', f'--outdir={out}', '--outstd=0.05,0.08'])
    assert result.exit_code == 0, result.output
    with open(out / 'phema-0000000-0.050.pkl', 'rb') as f:
        rebuilt = pickle.load(f)['ema']
    with open(full / 'network-snapshot-0000000-0.050.pkl', 'rb') as f:
        tracked = pickle.load(f)['ema']
    scale = max(p.abs().max().item() for p in tracked.parameters())
    for p, q in zip(rebuilt.parameters(), tracked.parameters()):
        assert (p - q).abs().max().item() <= 4 * EPS32 * scale  # two inputs, conditioning ~1: float32 rounding
    for network in (out / 'phema-0000000-0.080.pkl', full / 'network-snapshot-0000000-0.100.pkl'):
        result = CliRunner().invoke(generate.main, [f'--network={network}', f'--outdir={tmp_path / "png"}',
                                                    '--seeds=0-1', '--steps=2', '--device=cpu', '--force'])
        assert result.exit_code == 0, result.output
        assert len(list((tmp_path / 'png').glob('*.png'))) == 2
    result = CliRunner().invoke(generate.main, [f'--network={out / "phema-0000000-0.080.pkl"}', '--gnet=uncond',
                                                '--guidance=2', f'--outdir={tmp_path / "cfg"}', '--seeds=0-1',
                                                '--steps=2', '--device=cpu'])
    assert result.exit_code == 0, result.output
    from tests.scripts.test_fid import STANDIN
    from tests.conftest import GOLDEN_DIR
    result = CliRunner().invoke(fid.main, ['gen', f'--network={out / "phema-0000000-0.080.pkl"}', '--seeds=0-2',
                                           '--steps=2', '--device=cpu', f'--detector={GOLDEN_DIR / STANDIN}',
                                           f'--save-stats={tmp_path / "stats.npz"}'])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize('flags,fragment', [(dict(phema='0.5'), 'out of range'), (dict(phema='a,b'), '--phema'),
                                            (dict(phema='0.0501,0.0502'), 'share a file name'),
                                            (dict(label_dropout=0.1, cond=0), '--cond=1')])
def test_bad_phema_and_label_dropout_flags(data_zip, tmp_path, flags, fragment):
    import train
    result = CliRunner().invoke(train.main, [str(a) for a in tiny_train_args(data_zip, tmp_path / 'runs', **flags)])
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert result.exit_code != 0 and len(errors) == 1 and fragment in errors[0], result.output
    assert not (tmp_path / 'runs').exists()
