"""Training losses (training/loss.py): golden losses of the originals, sigma laws, weights, STF, pickling."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import scipy.stats
import torch

import dnnlib
from tests._tolerance import assert_within, network_rounding_steps
from tests.conftest import run_python
from training import loss as loss_module
from training import networks, pfgmpp

LOSS_CLASSES = [loss_module.VPLoss, loss_module.VELoss, loss_module.EDMLoss]
ACCEPT_P = 1e-3
def golden_loss_steps(net) -> int:
    """k of tests/_tolerance.py for a loss of ``net`` (the golden network): the forward pass, then the difference,
    the square and the weight (3 more); squaring doubles the relative rounding of the difference."""
    return 2 * (network_rounding_steps(net, net.img_resolution ** 2) + 3)


@pytest.fixture(scope='module')
def golden_net(golden_dir):
    """Our EDMPrecond with the weights of golden/networks/edm_ddpmpp_aug.pt (the net the loss goldens used)."""
    data = torch.load(golden_dir / 'networks' / 'edm_ddpmpp_aug.pt', weights_only=True)
    net = networks.EDMPrecond(**data['constructor_kwargs'])
    net.load_state_dict(data['state_dict'])
    return net.eval().requires_grad_(False)


def load_golden(golden_dir, name: str) -> dict:
    return torch.load(golden_dir / 'loss' / f'{name}.pt', weights_only=True)




class RecordingNet:
    """Stand-in denoiser: returns ``output(x)`` and remembers what the loss passed in."""

    def __init__(self, output):
        self.output = output

    def __call__(self, x, sigma, class_labels=None, augment_labels=None):
        self.x, self.sigma, self.augment_labels = x, sigma, augment_labels
        return self.output(x)

#----------------------------------------------------------------------------
# Goldens.

@pytest.mark.parametrize('name, cls', [('edm_EDMLoss', loss_module.EDMLoss), ('edm_VPLoss', loss_module.VPLoss),
                                       ('edm_VELoss', loss_module.VELoss)])
def test_diffusion_losses_reproduce_golden(golden_dir, golden_net, name, cls) -> None:
    """A CPU generator seeded like the original's global one replays its draws: sigma first, then the noise."""
    golden = load_golden(golden_dir, name)
    loss_fn = cls()
    sigma = loss_fn.sample_sigma(4, generator=torch.Generator().manual_seed(golden['rng_seed']))
    assert torch.allclose(sigma, golden['net_input_sigma'], rtol=1e-6, atol=0)
    loss = loss_fn(golden_net, golden['images'], golden['labels'],
                   generator=torch.Generator().manual_seed(golden['rng_seed']))
    assert loss.shape == golden['loss'].shape
    assert_within(loss, golden['loss'], golden_loss_steps(golden_net), min_scale=1.0, what=name)


@pytest.mark.parametrize('name, cls', [('pfgmpp_EDMLoss_D128', loss_module.EDMLoss),
                                       ('pfgmpp_VELoss_D128', loss_module.VELoss)])
def test_pfgmpp_losses_match_golden_formulas(golden_dir, golden_net, name, cls) -> None:
    """The reference drew B with numpy; check the sigma stream, the formula given its noise, and the noise norms."""
    golden = load_golden(golden_dir, name)
    D = golden['loss_kwargs']['D']
    loss_fn = cls(D=D)
    sigma = loss_fn.sample_sigma(4, generator=torch.Generator().manual_seed(golden['rng_seed']))
    assert torch.allclose(sigma, golden['net_input_sigma'], rtol=1e-6, atol=0)
    loss = loss_fn.loss_given_noise(golden_net, golden['images'], golden['net_input_sigma'], golden['noise'],
                                    golden['labels'])
    assert_within(loss, golden['loss'], golden_loss_steps(golden_net), min_scale=1.0, what=name)
    # |n| = r sqrt(B / (1 - B)) with r = sigma sqrt(D) and B clipped to [1e-3, 1 - 1e-3].
    N = golden['images'][0].numel()
    radius = pfgmpp.sigma_to_radius(golden['net_input_sigma'].double().flatten(), D)
    odds = (golden['noise'].double().flatten(1).norm(dim=1) / radius).square()
    beta = odds / (1 + odds)
    clip = loss_fn.beta_clip
    float32_slack = 1e-5
    assert ((beta >= clip - float32_slack) & (beta <= 1 - clip + float32_slack)).all()
    quantiles = scipy.stats.beta(N / 2, D / 2).cdf(beta.numpy())
    assert ((quantiles > 1e-4) & (quantiles < 1 - 1e-4)).all()

#----------------------------------------------------------------------------
# Formulas.

@pytest.mark.parametrize('cls', LOSS_CLASSES)
@pytest.mark.parametrize('D', [None, 128])
def test_loss_is_zero_for_a_perfect_denoiser(cls, D) -> None:
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    net = RecordingNet(lambda x: images)
    loss = cls(D=D)(net, images, generator=torch.Generator().manual_seed(1))
    assert loss.shape == images.shape
    assert torch.equal(loss, torch.zeros_like(loss))
    assert not torch.equal(net.x, images)  # the network did see noisy images


WEIGHT_POINTS = {  # sigma -> weight, worked out by hand from the originals' formulas
    loss_module.VPLoss: {0.5: 4.0, 2.0: 0.25},
    loss_module.VELoss: {0.5: 4.0, 2.0: 0.25},
    loss_module.EDMLoss: {0.5: 8.0, 1.0: 5.0, 2.0: 4.25},  # (s^2 + 0.25) / (0.5 s)^2
}


@pytest.mark.parametrize('cls', LOSS_CLASSES)
def test_weights(cls) -> None:
    loss_fn = cls()
    for sigma, weight in WEIGHT_POINTS[cls].items():
        assert loss_fn.weight(torch.tensor(sigma)).item() == pytest.approx(weight, rel=1e-6)
    # The weight multiplies the squared error: a denoiser off by a constant c costs weight(sigma) * c^2.
    images = torch.zeros(16, 1, 4, 4)
    offset = 0.1
    net = RecordingNet(lambda x: torch.full_like(x, offset))
    loss = loss_fn(net, images, generator=torch.Generator().manual_seed(2))
    expected = {loss_module.VPLoss: lambda s: 1 / s ** 2, loss_module.VELoss: lambda s: 1 / s ** 2,
                loss_module.EDMLoss: lambda s: (s ** 2 + 0.25) / (s * 0.5) ** 2}[cls](net.sigma.double()) * offset ** 2
    assert torch.allclose(loss.double(), expected.expand_as(loss), rtol=1e-5)


def vp_time(loss_fn: loss_module.VPLoss, sigma: np.ndarray) -> np.ndarray:
    """Inverse of the VP schedule sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    log_term = np.log1p(sigma ** 2)
    return (np.sqrt(loss_fn.beta_min ** 2 + 2 * loss_fn.beta_d * log_term) - loss_fn.beta_min) / loss_fn.beta_d


def test_sigma_distributions() -> None:
    num_samples = 4000
    gen = torch.Generator().manual_seed(3)

    edm = loss_module.EDMLoss()
    log_sigma = edm.sample_sigma(num_samples, generator=gen).double().log().flatten().numpy()
    assert scipy.stats.kstest(log_sigma, scipy.stats.norm(edm.P_mean, edm.P_std).cdf).pvalue > ACCEPT_P
    assert scipy.stats.kstest(log_sigma, scipy.stats.norm(edm.P_mean + 0.1, edm.P_std).cdf).pvalue < 1e-6

    lsun = loss_module.EDMLoss(sigma_scale=loss_module.LSUN_SIGMA_SCALE)
    log_sigma = lsun.sample_sigma(num_samples, generator=gen).double().log().flatten().numpy()
    shifted = scipy.stats.norm(edm.P_mean + math.log(380 / 80), edm.P_std)
    assert scipy.stats.kstest(log_sigma, shifted.cdf).pvalue > ACCEPT_P

    ve = loss_module.VELoss()
    sigma = ve.sample_sigma(num_samples, generator=gen).double().flatten().numpy()
    position = (np.log(sigma) - math.log(ve.sigma_min)) / (math.log(ve.sigma_max) - math.log(ve.sigma_min))
    assert scipy.stats.kstest(position, scipy.stats.uniform().cdf).pvalue > ACCEPT_P

    vp = loss_module.VPLoss()
    sigma = vp.sample_sigma(num_samples, generator=gen).double().flatten().numpy()
    t = vp_time(vp, sigma)
    uniform_t = scipy.stats.uniform(vp.epsilon_t, 1 - vp.epsilon_t)
    assert scipy.stats.kstest(t, uniform_t.cdf).pvalue > ACCEPT_P
    assert np.allclose(vp.sigma(torch.as_tensor(t)).numpy(), sigma, rtol=1e-4)

#----------------------------------------------------------------------------
# PFGM++ options.

def test_pfgmpp_options() -> None:
    assert loss_module.EDMLoss().D is None
    assert loss_module.EDMLoss(D=math.inf).D is None
    assert loss_module.EDMLoss(D=128).D == 128
    # D is validated by the kernel's one validator (training.pfgmpp.check_D), with its message.
    for bad_D in (0.5, 0, -3, math.nan, 'x', True):
        with pytest.raises(ValueError, match='D >= 1'):
            loss_module.VELoss(D=bad_D)
    built = dnnlib.util.construct_class_by_name(class_name='training.loss.EDMLoss', D=2048, P_mean=-1.0)
    assert isinstance(built, loss_module.EDMLoss) and built.D == 2048 and built.P_mean == -1.0


@pytest.mark.parametrize('beta_clip', [loss_module.DEFAULT_BETA_CLIP, None])
def test_training_noise_uses_the_kernel_and_its_clip(beta_clip) -> None:
    """With D = 3,072,000 on CIFAR-sized images the clip binds for about half the batch, so it is visible."""
    D = 3_072_000
    images = torch.zeros(400, 3, 32, 32)
    net = RecordingNet(lambda x: x)
    loss_module.EDMLoss(D=D, beta_clip=beta_clip)(net, images, generator=torch.Generator().manual_seed(4))
    noise = net.x.double().flatten(1)
    radius = pfgmpp.sigma_to_radius(net.sigma.double().flatten(), D)
    odds = (noise.norm(dim=1) / radius).square()
    lowest = loss_module.DEFAULT_BETA_CLIP / (1 - loss_module.DEFAULT_BETA_CLIP)
    at_bound = (odds / lowest - 1).abs() < 1e-5
    if beta_clip is None:
        assert (odds < lowest * (1 - 1e-4)).any() and not at_bound.any()
    else:
        assert (odds >= lowest * (1 - 1e-5)).all() and 0.3 < at_bound.double().mean() < 0.7

#----------------------------------------------------------------------------
# Stable target field.

@pytest.mark.parametrize('D', [None, 128])
def test_stf_target_in_the_loss(D) -> None:
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(3, 3, 4, 4, generator=gen) * 2 - 1
    reference_images = torch.rand(20, 3, 4, 4, generator=gen) * 2 - 1

    def flip(x):
        return x.flip(3), torch.ones(len(x), 2)

    for augment_pipe, augmented in ((None, lambda x: x), (flip, lambda x: x.flip(3))):
        # Sigma around e^1 = 2.7, where the posterior weights are spread over several reference images.
        loss_fn = loss_module.EDMLoss(P_mean=1.0, P_std=0.1, D=D, stf_chunk_size=7)
        net = RecordingNet(lambda x: torch.zeros_like(x))
        loss = loss_fn(net, images, augment_pipe=augment_pipe, generator=torch.Generator().manual_seed(6),
                       reference_images=reference_images)
        reference = torch.cat([augmented(images), augmented(reference_images)])
        target = pfgmpp.stable_target_field(net.x, net.sigma, reference, D=D)
        assert torch.allclose(loss, loss_fn.weight(net.sigma) * target.square(), rtol=1e-6, atol=0)
        # Not the plain target.
        assert not torch.allclose(target, augmented(images), atol=1e-3)


def test_gradients_reach_the_network_not_the_target() -> None:
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    reference_images = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    loss_fn = loss_module.EDMLoss(D=64)
    loss = loss_fn(lambda x, sigma, labels, augment_labels=None: conv(x), images,
                   generator=torch.Generator().manual_seed(9), reference_images=reference_images)
    loss.sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    assert conv.weight.grad.abs().sum() > 0

#----------------------------------------------------------------------------
# Pickling (snapshots store loss_fn).

@pytest.mark.parametrize('cls', LOSS_CLASSES)
def test_pickle_round_trip(cls) -> None:
    loss_fn = cls(D=256, sigma_scale=loss_module.LSUN_SIGMA_SCALE, beta_clip=None)
    restored = pickle.loads(pickle.dumps(loss_fn))
    assert type(restored).__name__ == cls.__name__
    assert vars(restored) == vars(loss_fn)
    images = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(10))
    net = RecordingNet(lambda x: 0.5 * x)
    expected = loss_fn(net, images, generator=torch.Generator().manual_seed(11))
    assert torch.equal(restored(net, images, generator=torch.Generator().manual_seed(11)), expected)


UNPICKLE_WITHOUT_PFGMPP = '''
import pickle, sys
sys.modules['training.pfgmpp'] = None  # as in the original code bases, which have no training/pfgmpp.py
loss_fn = pickle.load(open(sys.argv[1], 'rb'))
print(type(loss_fn).__name__, loss_fn.D, loss_fn.sigma_data)
'''


def test_snapshot_loss_unpickles_without_training_pfgmpp(tmp_path) -> None:
    """Original code unpickles a whole snapshot to read its 'ema'; our loss_fn must not break that."""
    path = tmp_path / 'loss.pkl'
    path.write_bytes(pickle.dumps(loss_module.EDMLoss(D=128)))
    script = tmp_path / 'load.py'
    script.write_text(UNPICKLE_WITHOUT_PFGMPP)
    assert run_python([str(script), str(path)], timeout=120).stdout.split() == ['EDMLoss', '128', '0.5']
