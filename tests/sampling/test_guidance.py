"""Guidance (sampling/guidance.py, generate.py / fid.py gen --gnet --guidance --guidance-interval).

W = 1 is bit-identical to unguided sampling; the combination is EDM2's; the interval is inclusive at both edges and
skips the guide outside; guides that do not fit (resolution, channels, label space, kernel D) fail with one line;
classifier-free guidance from one --label-dropout network; and, on exact denoisers, a deliberately degraded guide
moves samples towards the data as W grows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fid
import generate
from tests._sampler_nets import make_tiny_net, save_snapshot
from tests.conftest import GOLDEN_DIR
from sampling import guidance as guidance_lib
from sampling.exact_denoiser import ExactDenoiser
from sampling import pipeline

STANDIN = GOLDEN_DIR / 'fid/detector-standin.pkl'


@pytest.fixture(autouse=True)
def _single_intra_op_thread(one_intra_op_thread):
    """Tiny networks on one thread (see conftest.one_intra_op_thread)."""


@pytest.fixture(scope='module')
def nets(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp('nets')
    made = dict(
        uncond=make_tiny_net(seed=1), weak=make_tiny_net(seed=2),
        cond=make_tiny_net(label_dim=4, seed=3, label_dropout=0.1),  # --gnet=uncond needs label dropout
        cond_weak=make_tiny_net(label_dim=4, seed=4), cond3=make_tiny_net(label_dim=3, seed=5),
        pfgmpp=make_tiny_net(pfgmpp=True, D=64, seed=6), pfgmpp_weak=make_tiny_net(pfgmpp=True, D=64, seed=7),
        pfgmpp128=make_tiny_net(pfgmpp=True, D=128, seed=8), res16=make_tiny_net(seed=9, img_resolution=16),
        gray=make_tiny_net(seed=10, img_channels=1),
    )
    return {name: save_snapshot(net, folder / f'{name}.pkl') for name, net in made.items()}


def _cli(*args, expect_ok: bool = True):
    result = CliRunner().invoke(generate.main, [str(a) for a in args], catch_exceptions=True)
    if expect_ok:
        assert result.exit_code == 0, f'exit {result.exit_code}: {result.output}\n{result.exception!r}'
    return result


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob('*.png'))}


def _load(path: Path) -> torch.nn.Module:
    from formats.network_io import load_network
    return load_network(str(path))


# ----------------------------------------------------------------------------
# The combination.


def test_weight_one_is_the_network_itself_and_bit_identical(nets, tmp_path):
    net, gnet = _load(nets['uncond']), _load(nets['weak'])
    assert guidance_lib.guided_denoiser(net, gnet, 1.0, (0.5, 2.0)) is net
    common = ['--seeds=0-3', '--steps=3', '--device=cpu', '--S_churn=5']
    _cli(f'--network={nets["uncond"]}', f'--outdir={tmp_path / "plain"}', *common)
    _cli(f'--network={nets["uncond"]}', f'--outdir={tmp_path / "w1"}', f'--gnet={nets["weak"]}', '--guidance=1',
         *common)
    _cli(f'--network={nets["uncond"]}', f'--outdir={tmp_path / "w2"}', f'--gnet={nets["weak"]}', '--guidance=2',
         *common)
    plain = _pngs(tmp_path / 'plain')
    assert len(plain) == 4 and _pngs(tmp_path / 'w1') == plain
    assert _pngs(tmp_path / 'w2') != plain  # guidance really changes the images


@pytest.mark.parametrize('weight', [0.0, 2.5, -1.0])
def test_combination_is_gnet_plus_weight_times_difference(nets, weight):
    net, gnet = _load(nets['uncond']), _load(nets['weak'])
    guided = guidance_lib.guided_denoiser(net, gnet, weight)
    x, sigma = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(1.3)
    with torch.no_grad():
        d_net, d_gnet = net(x, sigma).double(), gnet(x, sigma).double()
        expected = d_gnet + weight * (d_net - d_gnet)
        assert torch.equal(guided(x, sigma), expected)
    assert guided.img_resolution == 8 and guided.label_dim == 0 and guided.sigma_max == net.sigma_max


class _CountingNet(torch.nn.Module):
    """A network stand-in returning sigma * ones * scale, counting its calls."""

    def __init__(self, scale: float, label_dim: int = 0) -> None:
        super().__init__()
        self.scale, self.calls = scale, 0
        self.img_resolution, self.img_channels, self.label_dim = 2, 1, label_dim
        self.sigma_min, self.sigma_max = 0.002, 80.0
        self.labels_seen = []

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        self.calls += 1
        self.labels_seen.append(class_labels)
        return torch.ones_like(x) * self.scale * torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)


def test_interval_edges_are_inclusive_and_the_guide_is_skipped_outside():
    lo, hi = 0.5, 2.0
    net, gnet = _CountingNet(1.0), _CountingNet(3.0)
    guided = guidance_lib.guided_denoiser(net, gnet, 2.0, (lo, hi))
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)  # the stand-ins then return sigma exactly

    def value(sigma):
        return guided(x, torch.tensor(sigma, dtype=torch.float64))[0, 0, 0, 0].item()
    for sigma in (lo, hi, 1.0):  # inside, edges included: 3 s + 2 (s - 3 s) = -s
        assert value(sigma) == pytest.approx(-sigma, rel=1e-15)
    calls = gnet.calls
    for sigma in (math.nextafter(lo, 0), math.nextafter(hi, math.inf), 0.0, 80.0):  # outside: the network's output
        assert value(sigma) == sigma
    assert gnet.calls == calls  # and the guide is not evaluated
    # Per-sample noise levels: each sample on its own side of the edge.
    sigma = torch.tensor([math.nextafter(lo, 0), lo], dtype=torch.float64)
    out = guided(x, sigma)
    assert out[0, 0, 0, 0].item() == sigma[0].item() and out[1, 0, 0, 0].item() == pytest.approx(-lo, rel=1e-15)


def test_interval_and_weight_flags_are_checked():
    with pytest.raises(guidance_lib.GuidanceError, match='SIGMA_LO <= SIGMA_HI'):
        guidance_lib.check_interval((2.0, 1.0))
    with pytest.raises(guidance_lib.GuidanceError, match='finite'):
        guidance_lib.guided_denoiser(_CountingNet(1.0), _CountingNet(2.0), math.inf)
    assert guidance_lib.check_interval((0.3, 0.3)) == (0.3, 0.3)


def test_dropped_label_guide_is_the_same_network_with_zero_labels(nets, tmp_path):
    net = _load(nets['cond'])
    guided = guidance_lib.guided_denoiser(net, None, 3.0, drop_labels=True)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.eye(4)[[1, 3]]
    with torch.no_grad():
        d_cond, d_uncond = net(x, 0.7, labels).double(), net(x, 0.7, torch.zeros_like(labels)).double()
        assert torch.equal(guided(x, 0.7, labels), d_uncond + 3.0 * (d_cond - d_uncond))
    # A counting stand-in shows the guide call really gets zero labels (and the main call the labels).
    cond_net = _CountingNet(1.0, label_dim=4)
    guidance_lib.guided_denoiser(cond_net, None, 2.0, drop_labels=True)(torch.zeros(2, 1, 2, 2), 1.0, labels)
    assert torch.equal(cond_net.labels_seen[0], labels) and not cond_net.labels_seen[1].any()
    # Through the command line, with a fixed class.
    _cli(f'--network={nets["cond"]}', f'--outdir={tmp_path / "cfg"}', '--gnet=uncond', '--guidance=2', '--class=1',
         '--seeds=0-1', '--steps=2', '--device=cpu')
    assert len(_pngs(tmp_path / 'cfg')) == 2


def test_unconditional_guide_gets_no_labels(nets):
    net = _load(nets['cond'])
    gnet = _CountingNet(1.0)
    gnet.img_resolution, gnet.img_channels = 8, 3
    guidance_lib.check_guide(net, gnet, None)
    labels = torch.eye(4)[[0, 2]]
    guidance_lib.GuidedDenoiser(net, gnet, 2.0)(torch.zeros(2, 3, 8, 8), 1.0, labels)
    assert gnet.labels_seen == [None]


# ----------------------------------------------------------------------------
# Every solver, PFGM++, fid.py gen.


SOLVER_OPTIONS = [dict(solver='euler'), dict(discretization='vp', schedule='vp', scaling='vp'), dict(S_churn=10.0),
                  dict(solver='dpmpp2m'), dict(solver='dpmpp3m'), dict(solver='restart', restart_steps=1)]


# The ablation sampler takes no PFGM++ networks; every other sampler is tried with both kinds.
@pytest.mark.parametrize('kind,options', [(kind, options) for kind in ('uncond', 'pfgmpp') for options in SOLVER_OPTIONS
                                          if kind == 'uncond' or not pipeline.uses_ablation_sampler(options)])
def test_guidance_works_with_every_solver(nets, kind, options):
    net, gnet = _load(nets[kind]), _load(nets[f'{kind}_weak' if kind == 'pfgmpp' else 'weak'])
    if kind == 'pfgmpp':
        options = dict(options, D=64)
    seeds = [0, 1, 2]
    kwargs = dict(num_steps=4, **options)  # dpmpp3m needs 4
    D = options.get('D')
    plain = pipeline.sample_batch(net, seeds, **kwargs)
    same = pipeline.sample_batch(guidance_lib.guided_denoiser(net, gnet, 1.0, D=D), seeds, **kwargs)
    guided = pipeline.sample_batch(guidance_lib.guided_denoiser(net, gnet, 2.0, D=D), seeds, **kwargs)
    assert torch.equal(plain, same) and not torch.equal(plain, guided) and torch.isfinite(guided).all()


def test_guidance_with_a_pfgmpp_network(nets, tmp_path):
    common = ['--seeds=0-2', '--steps=3', '--device=cpu']
    _cli(f'--network={nets["pfgmpp"]}', f'--outdir={tmp_path / "plain"}', *common)
    _cli(f'--network={nets["pfgmpp"]}', f'--outdir={tmp_path / "w1"}', f'--gnet={nets["pfgmpp_weak"]}',
         '--guidance=1', *common)
    _cli(f'--network={nets["pfgmpp"]}', f'--outdir={tmp_path / "w3"}', f'--gnet={nets["pfgmpp_weak"]}',
         '--guidance=3', '--guidance-interval=0.1,10', *common)
    assert _pngs(tmp_path / 'w1') == _pngs(tmp_path / 'plain') != _pngs(tmp_path / 'w3')


def test_sweep_manifest_records_guidance(nets, tmp_path):
    _cli(f'--network={nets["uncond"]}', f'--outdir={tmp_path}', f'--gnet={nets["weak"]}', '--guidance=1.5',
         '--guidance-interval=0.2,5', '--seeds=0-1', '--sweep-steps=3,4', '--device=cpu')
    manifest = json.loads((tmp_path / 'steps003' / 'manifest.json').read_text())
    assert manifest['guidance'] == dict(gnet=str(nets['weak']), weight=1.5, interval=[0.2, 5.0])
    # Resuming the sweep folder with another weight is refused.
    result = _cli(f'--network={nets["uncond"]}', f'--outdir={tmp_path}', f'--gnet={nets["weak"]}', '--guidance=2',
                  '--seeds=0-1', '--sweep-steps=3,4', '--device=cpu', expect_ok=False)
    assert result.exit_code != 0 and 'guidance' in result.output


def test_fid_gen_takes_the_guidance_flags(nets, tmp_path):
    def stats(name, *flags):
        path = tmp_path / f'{name}.npz'
        result = CliRunner().invoke(fid.main, ['gen', f'--network={nets["uncond"]}', '--seeds=0-3', '--steps=2',
                                               '--device=cpu', f'--detector={STANDIN}', f'--save-stats={path}',
                                               f'--jsonl={tmp_path / "results.jsonl"}', *flags])
        assert result.exit_code == 0, result.output
        return np.load(path)['mu']
    plain = stats('plain')
    assert np.array_equal(stats('w1', f'--gnet={nets["weak"]}', '--guidance=1'), plain)
    assert not np.array_equal(stats('w2', f'--gnet={nets["weak"]}', '--guidance=2'), plain)
    bad = CliRunner().invoke(fid.main, ['gen', f'--network={nets["uncond"]}', '--seeds=0-3', '--device=cpu',
                                        f'--detector={STANDIN}', f'--save-stats={tmp_path / "x.npz"}',
                                        f'--gnet={nets["res16"]}', '--guidance=2'])
    assert bad.exit_code != 0 and 'img_resolution=16' in bad.output


# ----------------------------------------------------------------------------
# Guides that do not fit: one line each.


@pytest.mark.parametrize('network,flags,fragment', [
    ('uncond', ['--gnet=res16'], 'img_resolution=16'),
    ('uncond', ['--gnet=gray'], 'img_channels=1'),
    ('cond', ['--gnet=cond3'], '3 classes'),
    ('pfgmpp', ['--gnet=uncond_net'], 'a diffusion model'),
    ('pfgmpp', ['--gnet=pfgmpp128'], 'D=128'),
    ('uncond', ['--gnet=pfgmpp'], 'PFGM++ with D=64'),
    ('uncond', ['--gnet=uncond'], 'unconditional'),
    ('uncond', ['--guidance=2'], '--gnet'),
    ('uncond', ['--gnet=weak', '--guidance-interval=3,1'], 'SIGMA_LO <= SIGMA_HI'),
    ('uncond', ['--gnet=weak', '--guidance-interval=a'], 'SIGMA_LO,SIGMA_HI'),
    ('uncond', ['--gnet=missing'], 'no such file'),
])
def test_guides_that_do_not_fit_fail_with_one_line(nets, tmp_path, network, flags, fragment):
    resolved = []
    for flag in flags:
        name = flag.split('=', 1)[1] if flag.startswith('--gnet=') else None
        if name in nets and name != 'uncond':
            flag = f'--gnet={nets[name]}'
        elif name == 'uncond_net':
            flag = f'--gnet={nets["uncond"]}'
        elif name == 'missing':
            flag = f'--gnet={tmp_path / "missing.pkl"}'
        resolved.append(flag)
    result = _cli(f'--network={nets[network]}', f'--outdir={tmp_path / "out"}', '--seeds=0', '--steps=2',
                  '--device=cpu', *resolved, expect_ok=False)
    assert result.exit_code != 0 and 'Traceback' not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and fragment in result.output, result.output
    assert not list((tmp_path / 'out').glob('*.png'))


# ----------------------------------------------------------------------------
# Exact-denoiser laboratory: a degraded guide moves samples towards the data.


class _BlurredExactDenoiser(torch.nn.Module):
    """The ideal denoiser of ``data`` blurred by an isotropic Gaussian of std ``blur``: a deliberately degraded model.

    With z = y + blur * n the blurred data, E[z | x] = (sigma^2 E[y | x; sigma_t] + blur^2 x) / sigma_t^2 with
    sigma_t^2 = sigma^2 + blur^2, where E[y | x; sigma_t] is the laboratory's exact denoiser
    (:class:`sampling.exact_denoiser.ExactDenoiser`). Exact for diffusion; for PFGM++ the same construction, a
    denoiser that is too blurry by ``blur``.
    """

    def __init__(self, data: torch.Tensor, D, blur: float) -> None:
        super().__init__()
        self.exact, self.blur = ExactDenoiser(data, D), blur
        for name in ('img_resolution', 'img_channels', 'label_dim', 'sigma_min', 'sigma_max', 'pfgmpp', 'D', 'N'):
            setattr(self, name, getattr(self.exact, name))

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        x, sigma = x.to(torch.float64), torch.as_tensor(sigma, dtype=torch.float64)
        total = sigma ** 2 + self.blur ** 2
        return (sigma ** 2 * self.exact(x, total.sqrt()) + self.blur ** 2 * x) / total


LAB_BLUR, LAB_GUIDE_BLUR, LAB_SAMPLES, LAB_STEPS = 0.1, 0.3, 200, 12


@pytest.mark.parametrize('D', [None, 128])
def test_degraded_guide_moves_samples_towards_the_data(D):
    data = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    net, gnet = _BlurredExactDenoiser(data, D, LAB_BLUR), _BlurredExactDenoiser(data, D, LAB_GUIDE_BLUR)

    def distances_to_data(weight: float) -> tuple[float, torch.Tensor]:
        guided = guidance_lib.guided_denoiser(net, gnet, weight, D=D)
        x = pipeline.sample_batch(guided, list(range(LAB_SAMPLES)), D=D, num_steps=LAB_STEPS)
        distance = (x[:, None] - data[None]).flatten(2).norm(dim=2)
        return distance.min(dim=1).values.mean().item(), distance.argmin(dim=1)
    (d1, nearest1), (d15, _), (d2, nearest2) = (distances_to_data(w) for w in (1.0, 1.5, 2.0))
    # Mean distance to the nearest data point: about 0.49, 0.33, 0.25 (the blur alone gives 0.1 * sqrt(16) = 0.4).
    assert d1 > 1.3 * d15 > 1.3 * 1.1 * d2, (d1, d15, d2)
    # Sharper, not collapsed: samples stay with the data point they had without guidance (a few near the boundary
    # between two points may switch), and every data point keeps its samples.
    assert (nearest1 == nearest2).double().mean().item() >= 0.95, (nearest1 != nearest2).sum()
    assert len(set(nearest2.tolist())) == len(data)


def test_networks_that_record_no_kernel_follow_the_flags(nets):
    # EDM's networks record neither pfgmpp nor D: with both undeclared, the kernel the flags chose holds for both.
    guidance_lib.check_guide(_CountingNet(1.0), _CountingNet(2.0), 128.0)
    # A network that declares PFGM++ is not guided by one that declares nothing (an EDM diffusion network).
    pfgmpp_net = _load(nets['pfgmpp'])
    undeclared = _CountingNet(2.0)
    undeclared.img_resolution, undeclared.img_channels = 8, 3
    with pytest.raises(guidance_lib.GuidanceError, match='a diffusion model'):
        guidance_lib.check_guide(pfgmpp_net, undeclared, 64.0)
