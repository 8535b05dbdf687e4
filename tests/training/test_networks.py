"""training/networks.py: golden compatibility with the original EDM / PFGM++ networks, preconditioning formulas,
precision options, attention through SDPA, channels_last, torch.compile and persistence."""

from __future__ import annotations

import hashlib
import math
import pickle
import shutil

import pytest
import torch

from tests._tolerance import NORMAL_DRAW_STEPS, assert_within, network_rounding_steps, randn_bits_match_golden
from tests.conftest import GOLDEN_DIR, randomize_parameters_
from training import networks

GOLDEN_NETWORKS = sorted((GOLDEN_DIR / 'networks').glob('*.pt'))
PRECONDS = ['VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond']

# Tiny architectures used by the behavioural tests (fast on two CPU cores).
TINY_SONG = dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                 embedding_type='fourier', encoder_type='residual', channel_mult_noise=2, resample_filter=[1, 3, 3, 1])
TINY_ADM = dict(model_type='DhariwalUNet', model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])


def sha256_f32(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()).hexdigest()


def build(cls='EDMPrecond', arch=TINY_SONG, seed=0, res=8, channels=3, randomize=True, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = getattr(networks, cls)(img_resolution=res, img_channels=channels, **arch, **kw).eval()
    if randomize:
        randomize_parameters_(net, seed + 100)
    return net


def inputs(batch=4, res=8, channels=3, label_dim=0, seed=1, sigmas=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn([batch, channels, res, res], generator=g)
    sigma = torch.as_tensor(sigmas if sigmas is not None else [0.002, 0.3, 5.0, 80.0][:batch], dtype=torch.float32)
    labels = torch.eye(label_dim)[torch.randint(label_dim, [batch], generator=g)] if label_dim else None
    return x, sigma, labels


def assert_close(actual, expected, k, what='', dtype=torch.float32):
    """Within ``k * eps(dtype) * max(1, max |expected|)``, the rule of tests/_tolerance.py."""
    assert_within(actual, expected, k, dtype, min_scale=1.0, what=what)


def steps(net, res=8):
    """k of tests/_tolerance.py for one forward pass of ``net`` on res x res images."""
    return network_rounding_steps(net, res * res)


# Preconditioning alone: c_in, c_skip, c_out (a square, a sum, a square root, a division) and their products with
# x or F(x), or log(sigma) / 4 for c_noise.
PRECOND_STEPS = 8


class ModelIO:
    """Forward hook on ``net.model`` recording what the preconditioner feeds the U-Net and what it returns."""

    def __init__(self, net):
        self.calls = []
        self.handle = net.model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        self.calls.append(dict(x_in=args[0].detach(), noise_labels=args[1].detach(),
                               class_labels=kwargs.get('class_labels'), output=output.detach()))

    def remove(self):
        self.handle.remove()


# ----------------------------------------------------------------------------------------------------------------
# Golden files produced by the original implementation.


def test_golden_networks_present():
    assert GOLDEN_NETWORKS, f'no golden network cases under {GOLDEN_DIR / "networks"}'


def _golden_net(case):
    torch.manual_seed(case['init_seed'])
    return getattr(networks, case['precond_class'])(**case['constructor_kwargs']).eval()


def _golden_trained_net(path):
    """(case, network built as the case says and loaded with its randomised weights)."""
    case = torch.load(path, weights_only=True)
    net = _golden_net(case)
    net.load_state_dict(case['state_dict'], strict=True)
    return case, net


def _golden_forward(net, case):
    inp = case['inputs']
    extra = {} if inp.get('augment_labels') is None else dict(augment_labels=inp['augment_labels'])
    with torch.no_grad():
        return net(inp['x'], inp['sigma'], inp.get('class_labels'), **extra)


@pytest.mark.parametrize('path', GOLDEN_NETWORKS, ids=lambda p: p.stem)
def test_golden_init_matches_original(path):
    case = torch.load(path, weights_only=True)
    net = _golden_net(case)
    state = net.state_dict()
    assert sorted(state) == sorted(case['init_checksums']), 'parameter/buffer names differ from the original'
    for name, ref in case['init_checksums'].items():
        t = state[name]
        assert list(t.shape) == list(ref['shape']), name
        first = t.flatten()[:len(ref['first'])]
        if randn_bits_match_golden():
            assert first.tolist() == ref['first'], f'{name}: first values differ'
            assert sha256_f32(t) == ref['sha256'], f'{name}: initial values differ from the original'
        else:  # another randn kernel: same draws in the same order, rounded differently; output_at_init checks the rest
            assert_within(first, torch.tensor(ref['first']), NORMAL_DRAW_STEPS, what=f'{name}: first values')
    assert sum(p.numel() for p in net.parameters()) == case['num_params']
    assert_close(_golden_forward(net, case), case['output_at_init'], steps(net, net.img_resolution), 'output_at_init')


@pytest.mark.parametrize('path', GOLDEN_NETWORKS, ids=lambda p: p.stem)
def test_golden_forward_matches_original(path):
    case, net = _golden_trained_net(path)
    for key, expected in case['attributes'].items():
        assert getattr(net, key) == expected, key
    io = ModelIO(net)
    out = _golden_forward(net, case)
    io.remove()
    assert out.dtype == torch.float32 and out.shape == case['output'].shape
    assert_close(out, case['output'], steps(net, net.img_resolution), 'output')
    (call,) = io.calls
    mids = case['intermediates']
    assert_close(call['x_in'], mids['model_x_in'], PRECOND_STEPS, 'model_x_in')
    assert_close(call['noise_labels'], mids['model_noise_labels'], PRECOND_STEPS, 'model_noise_labels')
    assert_close(call['output'], mids['model_output'], steps(net.model, net.img_resolution), 'model_output')


# ----------------------------------------------------------------------------------------------------------------
# Parameter counts of the standard configurations (as train.py builds them), counted on the meta device.

DDPMPP = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
              channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2], dropout=0.13)
NCSNPP = dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
              channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2],
              dropout=0.13)
ADM = dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.10)

# Counts equal the original code's (checked by counting with the original source).
STANDARD_COUNTS = [
    ('EDMPrecond', 32, 0, 9, DDPMPP, 55_733_891),
    ('EDMPrecond', 32, 10, 9, DDPMPP, 55_735_299),
    ('VPPrecond', 32, 0, 9, DDPMPP, 55_733_891),
    ('EDMPrecond', 32, 0, 9, NCSNPP, 56_397_827),
    ('EDMPrecond', 32, 10, 9, NCSNPP, 56_400_643),
    ('VEPrecond', 32, 0, 9, NCSNPP, 56_397_827),
    ('EDMPrecond', 64, 1000, 0, ADM, 295_899_267),
    ('EDMPrecond', 64, 0, 9, ADM, 295_132_995),
    ('iDDPMPrecond', 64, 1000, 0, ADM, 295_904_454),
]


@pytest.mark.parametrize('cls,res,label_dim,augment_dim,arch,expected', STANDARD_COUNTS,
                         ids=[f'{c[0]}-{c[4]["model_type"]}-{c[4].get("embedding_type", "adm")}-{c[1]}-l{c[2]}-a{c[3]}'
                              for c in STANDARD_COUNTS])
def test_standard_parameter_counts(cls, res, label_dim, augment_dim, arch, expected):
    kwargs = dict(arch, augment_dim=augment_dim) if augment_dim else dict(arch)
    with torch.device('meta'):
        net = getattr(networks, cls)(img_resolution=res, img_channels=3, label_dim=label_dim, **kwargs)
    assert sum(p.numel() for p in net.parameters()) == expected


# ----------------------------------------------------------------------------------------------------------------
# Preconditioning.


def reference_coefficients(net, sigma):
    """Hand-written c_skip, c_out, c_in, c_noise in float64."""
    s = sigma.to(torch.float64)
    one = torch.ones_like(s)
    name = type(net).__name__
    if name == 'VPPrecond':
        t = ((net.beta_min ** 2 + 2 * net.beta_d * torch.log1p(s ** 2)).sqrt() - net.beta_min) / net.beta_d
        return one, -s, 1 / (1 + s ** 2).sqrt(), (net.M - 1) * t
    if name == 'VEPrecond':
        return one, s, one, torch.log(s / 2)
    if name == 'iDDPMPrecond':
        j = (s.reshape(-1, 1) - net.u.to(torch.float64).reshape(1, -1)).abs().argmin(dim=1).reshape(s.shape)
        return one, -s, 1 / (1 + s ** 2).sqrt(), (net.M - 1 - j).to(torch.float64)
    sd = net.sigma_data
    return sd ** 2 / (s ** 2 + sd ** 2), s * sd / (s ** 2 + sd ** 2).sqrt(), 1 / (s ** 2 + sd ** 2).sqrt(), s.log() / 4


class AffineStub(torch.nn.Module):
    """Stands in for the U-Net: F(x_in, c_noise) = 2 x_in + c_noise (plus junk channels when twice as wide)."""

    def __init__(self, channels_out, channels_in):
        super().__init__()
        self.extra = channels_out - channels_in

    def forward(self, x, noise_labels, class_labels=None, **kwargs):
        y = 2 * x + noise_labels.reshape(-1, 1, 1, 1)
        return torch.cat([y, torch.full_like(y[:, :self.extra], 1e6)], dim=1) if self.extra else y


@pytest.mark.parametrize('cls', PRECONDS)
def test_preconditioning_formulas(cls):
    arch = TINY_ADM if cls == 'iDDPMPrecond' else TINY_SONG
    net = build(cls, arch, randomize=False)
    sigma = torch.tensor([0.002, 0.01, 0.05, 0.3, 1.0, 2.5, 7.0, 20.0, 80.0])
    got = net.coefficients(sigma.reshape(-1, 1, 1, 1))
    want = reference_coefficients(net, sigma.reshape(-1, 1, 1, 1))
    for label, g, w in zip(('c_skip', 'c_out', 'c_in', 'c_noise'), got, want):
        g = torch.as_tensor(g, dtype=torch.float64).expand_as(w)
        if cls == 'VPPrecond' and label == 'c_noise':
            # float32 log(1 + sigma^2) (the original's formula) cancels for small sigma: loose there, tight above.
            assert torch.allclose(g, w, rtol=2e-2), label
            g, w = g[sigma >= 0.05], w[sigma >= 0.05]
            assert torch.allclose(g, w, rtol=5e-5), label
            continue
        assert torch.allclose(g, w, rtol=2e-6, atol=1e-6), label

    # The forward pass combines them as c_skip * x + c_out * F(c_in * x, c_noise).
    out_channels = 6 if cls == 'iDDPMPrecond' else 3
    net.model = AffineStub(out_channels, 3)
    x = torch.randn(len(sigma), 3, 8, 8)
    c_skip, c_out, c_in, c_noise = (w.reshape(-1, 1, 1, 1) for w in want)
    expected = c_skip * x.double() + c_out * (2 * c_in * x.double() + c_noise)
    assert_close(net(x, sigma).double(), expected, 4 * PRECOND_STEPS, cls)  # coefficients, then 4 operations


def test_vp_schedule():
    net = build('VPPrecond', TINY_SONG, randomize=False)
    assert net.sigma_min == pytest.approx(0.0009765625, rel=1e-6)  # sigma(epsilon_t=1e-5), as the original
    assert net.sigma_max == pytest.approx(152.16697692871094, rel=1e-6)
    t = torch.tensor([1e-3, 0.01, 0.3, 0.7, 1.0])  # float32 (as the original): round trip good to ~1e-3 at small t
    assert torch.allclose(net.sigma_inv(net.sigma(t)), t, rtol=1e-3)
    s = torch.tensor([0.01, 0.5, 80.0])
    assert torch.equal(net.round_sigma(s), s)


@pytest.mark.parametrize('cls', ['VEPrecond', 'EDMPrecond'])
def test_continuous_round_sigma_is_identity(cls):
    net = build(cls, TINY_SONG, randomize=False)
    s = torch.tensor([0.002, 0.5, 80.0])
    assert torch.equal(net.round_sigma(s), s)
    assert float(net.round_sigma(0.25)) == 0.25


def test_iddpm_grid_and_round_sigma():
    net = build('iDDPMPrecond', TINY_ADM, randomize=False)
    u, M = net.u, net.M
    assert u.shape == (M + 1,) and u.dtype == torch.float32
    assert u[M] == 0 and bool((u[:-1] > u[1:]).all())
    assert net.sigma_min == float(u[M - 1]) and net.sigma_max == float(u[0])
    assert net.sigma_min == pytest.approx(0.006422337144613266, rel=1e-6)
    assert net.sigma_max == pytest.approx(20291.171875, rel=1e-6)

    picks = torch.tensor([0, 1, 10, 500, 998, 999])
    assert torch.equal(net.round_sigma(u[picks]), u[picks])
    assert torch.equal(net.round_sigma(u[picks], return_index=True), picks)
    # Slightly off-grid values snap to the nearest level; shape and dtype follow the input.
    off = (u[picks] * 1.0001).reshape(2, 3).double()
    snapped = net.round_sigma(off)
    assert snapped.shape == (2, 3) and snapped.dtype == torch.float64
    assert torch.equal(snapped.float().flatten(), u[picks])
    # The grid includes u[M] = 0: tiny sigmas land on index M, i.e. c_noise = -1 (original quirk).
    tiny = torch.tensor([1e-4, 1e-3])
    assert torch.equal(net.round_sigma(tiny, return_index=True), torch.tensor([M, M]))
    assert torch.equal(net.coefficients(tiny.reshape(-1, 1, 1, 1))[3].flatten(), torch.tensor([-1.0, -1.0]))


@pytest.mark.parametrize('cls', PRECONDS)
def test_pfgmpp_attributes_on_every_preconditioner(cls):
    arch = TINY_ADM if cls == 'iDDPMPrecond' else TINY_SONG
    net = build(cls, arch, randomize=False, pfgmpp=True, D=2048)
    assert net.pfgmpp is True and net.D == 2048 and net.N == 3 * 8 * 8
    default = build(cls, arch, randomize=False)
    assert default.pfgmpp is False and default.D == 128 and default.N == 192
    with pytest.raises(ValueError, match='D >= 1'):
        build(cls, arch, randomize=False, pfgmpp=True, D=0)


def test_constructor_errors():
    with pytest.raises(ValueError, match='model_type'):
        build('EDMPrecond', dict(model_type='NoSuchUNet'), randomize=False)
    with pytest.raises(ValueError, match='use_fp16 and use_bf16'):
        build('EDMPrecond', TINY_SONG, randomize=False, use_fp16=True, use_bf16=True)
    with pytest.raises(ValueError, match='encoder_type'):
        build('EDMPrecond', dict(TINY_SONG, encoder_type='fancy'), randomize=False)


# ----------------------------------------------------------------------------------------------------------------
# Inputs: scalar sigma, missing labels, label dropout, augmentation labels.


@pytest.mark.parametrize('arch', [TINY_SONG, TINY_ADM], ids=['song', 'adm'])
def test_scalar_sigma_broadcasts(arch):
    net = build('EDMPrecond', arch, label_dim=5)
    x, _, labels = inputs(label_dim=5)
    io = ModelIO(net)
    with torch.no_grad():
        out_scalar = net(x, torch.tensor(0.7), labels)
        out_float = net(x, 0.7, labels)
        out_batch = net(x, torch.full([4], 0.7), labels)
    io.remove()
    assert io.calls[0]['noise_labels'].shape == (1,)  # batch-1 embedding that broadcasts
    assert_close(out_scalar, out_batch, steps(net), 'scalar sigma')  # batch 1 and 4 take other kernels
    assert torch.equal(out_scalar, out_float)


@pytest.mark.parametrize('arch', [TINY_SONG, TINY_ADM], ids=['song', 'adm'])
def test_missing_class_labels_mean_zeros(arch):
    net = build('EDMPrecond', arch, label_dim=5)
    x, sigma, labels = inputs(label_dim=5)
    with torch.no_grad():
        none = net(x, sigma)
        zeros = net(x, sigma, torch.zeros_like(labels))
        given = net(x, sigma, labels)
    assert_close(none, zeros, steps(net), 'None vs zeros')
    assert (given - zeros).abs().max() > 1e-3  # the labels do matter with these weights


@pytest.mark.parametrize('arch', [TINY_SONG, TINY_ADM], ids=['song', 'adm'])
def test_label_dropout(arch):
    arch = dict(arch, dropout=0)  # isolate the label dropout from ordinary dropout
    x, sigma, labels = inputs(batch=16, label_dim=5, sigmas=[1.0] * 16)
    net = build('EDMPrecond', arch, label_dim=5, label_dropout=0.5)
    with torch.no_grad():
        with_labels = net(x, sigma, labels)
        without = net(x, sigma, torch.zeros_like(labels))
        assert torch.equal(net(x, sigma, labels), with_labels)  # no dropout in eval mode
        net.train()
        torch.manual_seed(3)
        dropped = net(x, sigma, labels)
    per_sample_with = (dropped - with_labels).flatten(1).abs().amax(1) < 1e-5
    per_sample_without = (dropped - without).flatten(1).abs().amax(1) < 1e-5
    assert bool((per_sample_with ^ per_sample_without).all()), 'each sample keeps or drops its whole label'
    assert 0 < int(per_sample_without.sum()) < 16

    always = build('EDMPrecond', arch, label_dim=5, label_dropout=1.0).train()
    with torch.no_grad():
        assert_close(always(x, sigma, labels), without, steps(always), 'label_dropout=1')


def test_augment_labels_are_used():
    net = build('EDMPrecond', dict(TINY_SONG, augment_dim=9))
    x, sigma, _ = inputs()
    aug = torch.randn(4, 9)
    with torch.no_grad():
        a = net(x, sigma, augment_labels=aug)
        b = net(x, sigma, augment_labels=torch.zeros_like(aug))
        c = net(x, sigma)
    assert (a - b).abs().max() > 1e-3
    assert_close(b, c, steps(net), 'zero augment labels == none')


# ----------------------------------------------------------------------------------------------------------------
# Quirks of the original architecture.


def test_adm_heads_follow_channel_width():
    net = build('EDMPrecond', dict(model_type='DhariwalUNet', model_channels=32, channel_mult=[1, 2], num_blocks=1,
                                   attn_resolutions=[16, 8]), res=16, randomize=False)
    heads = {name: b.num_heads for name, b in net.model.named_modules() if isinstance(b, networks.UNetBlock)}
    # 16x16 is listed in attn_resolutions, but its 32-channel blocks get 32 // 64 = 0 heads.
    assert heads == {'enc.16x16_block0': 0, 'enc.8x8_down': 0, 'enc.8x8_block0': 1,
                     'dec.8x8_in0': 1, 'dec.8x8_in1': 0, 'dec.8x8_block0': 1, 'dec.8x8_block1': 1,
                     'dec.16x16_up': 0, 'dec.16x16_block0': 0, 'dec.16x16_block1': 0}
    assert not hasattr(net.model.enc['16x16_block0'], 'qkv')


def test_song_decoder_attends_in_last_block_only():
    net = build('EDMPrecond', dict(TINY_SONG, num_blocks=2, attn_resolutions=[8]), randomize=False)
    heads = {name: m.num_heads for name, m in net.model.named_modules() if isinstance(m, networks.UNetBlock)}
    assert heads['dec.4x4_in0'] == 1  # always
    assert heads['enc.8x8_block0'] == heads['enc.8x8_block1'] == 1
    assert heads['dec.8x8_block0'] == heads['dec.8x8_block1'] == 0 and heads['dec.8x8_block2'] == 1


# ----------------------------------------------------------------------------------------------------------------
# Attention through scaled_dot_product_attention == the original's explicit softmax.


def explicit_softmax_attention(block, x):
    """The original formulation: qkv reshaped to [N*heads, C/heads, 3, HW], weights = softmax_k(q.k / sqrt(C/heads))."""
    n, c, h, w = x.shape
    per_head = c // block.num_heads
    q, k, v = block.qkv(block.norm2(x)).reshape(n * block.num_heads, per_head, 3, h * w).unbind(2)
    weights = torch.einsum('bcq,bck->bqk', q, k / math.sqrt(per_head)).softmax(dim=2)
    return torch.einsum('bqk,bck->bcq', weights, v).reshape(n, c, h, w)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('heads_kw', [dict(num_heads=1), dict(channels_per_head=32)], ids=['1head', '4heads'])
def test_sdpa_matches_explicit_softmax(dtype, heads_kw):
    torch.manual_seed(0)
    block = networks.UNetBlock(64, 128, 32, attention=True, **heads_kw).to(dtype)
    randomize_parameters_(block, 5)
    block = block.to(dtype)
    x = torch.randn(3, 128, 6, 5, dtype=dtype)
    probe = torch.randn(3, 128, 6, 5, dtype=dtype)
    results = []
    for attend in (block._attend, lambda t: explicit_softmax_attention(block, t)):
        block.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = attend(xi)
        (out * probe).sum().backward()
        grads = [xi.grad] + [p.grad.clone() for p in (block.qkv.weight, block.qkv.bias, block.norm2.weight)]
        results.append((out.detach(), grads))
    (out_sdpa, g_sdpa), (out_ref, g_ref) = results
    k = network_rounding_steps(block, 6 * 5)  # the whole block: an upper bound for its attention half
    assert_close(out_sdpa, out_ref, k, 'attention output', dtype)
    for i, (a, b) in enumerate(zip(g_sdpa, g_ref)):
        assert_close(a, b, 2 * k, f'gradient {i}', dtype)  # the backward pass retraces the chain once more


# ----------------------------------------------------------------------------------------------------------------
# Precision, memory format, compilation.


def test_precision_policy():
    net = build('EDMPrecond', TINY_SONG, randomize=False, use_fp16=True)
    assert net.unet_dtype('cpu') == torch.float32  # like the original: fp16 only for CUDA inputs
    assert net.unet_dtype('cuda') == torch.float16
    assert net.unet_dtype('cuda', force_fp32=True) == torch.float32
    net.use_fp16, net.use_bf16 = False, True  # plain attributes, switchable after construction
    assert net.unet_dtype('cuda') == torch.bfloat16 and net.unet_dtype('cpu') == torch.float32
    net.reduced_precision_on_cpu = True
    assert net.unet_dtype('cpu') == torch.bfloat16


# k of tests/_tolerance.py for a U-Net run in bfloat16/float16 against float32: the sums accumulate in float32 and only
# stored activations round to the low dtype; GroupNorm renormalises each block, so about one block's roundings (norm,
# activation, convolution, residual sum, in each of its two layers) reach the output.
REDUCED_PRECISION_STEPS = 8


@pytest.mark.parametrize('flag,dtype', [('use_bf16', torch.bfloat16), ('use_fp16', torch.float16)])
def test_reduced_precision_runs_and_stays_close(flag, dtype):
    reference = build('EDMPrecond', TINY_ADM, label_dim=5)
    net = build('EDMPrecond', TINY_ADM, label_dim=5, reduced_precision_on_cpu=True, **{flag: True})
    x, sigma, labels = inputs(label_dim=5)
    io = ModelIO(net)
    with torch.no_grad():
        low = net(x, sigma, labels)
        forced = net(x, sigma, labels, force_fp32=True)
        full = reference(x, sigma, labels)
    io.remove()
    assert io.calls[0]['x_in'].dtype == dtype and io.calls[0]['output'].dtype == dtype
    assert io.calls[1]['x_in'].dtype == torch.float32
    assert low.dtype == torch.float32
    assert torch.equal(forced, full)
    assert_close(low, full, REDUCED_PRECISION_STEPS, flag, dtype)


@pytest.mark.parametrize('arch', [TINY_SONG, TINY_ADM], ids=['song', 'adm'])
def test_channels_last_matches(arch):
    net = build('EDMPrecond', arch, label_dim=5)
    x, sigma, labels = inputs(label_dim=5)
    with torch.no_grad():
        expected = net(x, sigma, labels)
        net = net.to(memory_format=torch.channels_last)
        got = net(x.to(memory_format=torch.channels_last), sigma, labels)
    assert_close(got, expected, steps(net), 'channels_last')


def _have_cxx_compiler():
    return any(shutil.which(c) for c in ('g++', 'c++', 'clang++'))


@pytest.mark.slow
@pytest.mark.skipif(not _have_cxx_compiler(), reason='torch.compile (inductor) on CPU needs a C++ compiler; none found')
def test_torch_compile_matches_eager():
    import torch._inductor.config as inductor_config
    arch = dict(model_type='SongUNet', model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    net = build('EDMPrecond', arch, label_dim=3)
    x, sigma, labels = inputs(label_dim=3)
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True)  # fullgraph: no graph breaks (no .item(), no data-dependent flow)
    with inductor_config.patch(compile_threads=1), torch.no_grad():
        got = compiled(x, sigma, labels)
    with torch.no_grad():
        expected = net(x, sigma, labels)
    torch._dynamo.reset()
    assert_close(got, expected, steps(net), 'compiled vs eager')


# ----------------------------------------------------------------------------------------------------------------
# Persistence: pickles carry the source and the constructor arguments.


def test_pickle_roundtrip_keeps_source_and_kwargs():
    net = build('EDMPrecond', TINY_SONG, label_dim=5, pfgmpp=True, D=64, use_bf16=True)
    data = pickle.dumps(net)
    assert b'_reconstruct_persistent_obj' in data and b'class SongUNet' in data
    loaded = pickle.loads(data)
    assert type(loaded).__name__ == 'EDMPrecond'
    assert dict(loaded.init_kwargs) == dict(net.init_kwargs)
    assert (loaded.pfgmpp, loaded.D, loaded.N, loaded.use_bf16) == (True, 64, 192, True)
    x, sigma, labels = inputs(label_dim=5)
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, labels), net(x, sigma, labels))
    # The recorded kwargs rebuild an identical network.
    torch.manual_seed(0)
    rebuilt = networks.EDMPrecond(**net.init_kwargs)
    rebuilt.load_state_dict(net.state_dict(), strict=True)


# ----------------------------------------------------------------------------------------------------------------
# CUDA-only checks (skipped on CPU-only machines).

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


@cuda
@pytest.mark.parametrize('flag,dtype', [('use_fp16', torch.float16), ('use_bf16', torch.bfloat16)])
def test_cuda_reduced_precision(flag, dtype):
    net = build('EDMPrecond', TINY_ADM, label_dim=5, **{flag: True}).cuda()
    x, sigma, labels = (t.cuda() for t in inputs(label_dim=5))
    io = ModelIO(net)
    with torch.no_grad():
        low = net(x, sigma, labels)
        full = net(x, sigma, labels, force_fp32=True)
    io.remove()
    assert io.calls[0]['x_in'].dtype == dtype
    assert_close(low, full, REDUCED_PRECISION_STEPS, flag, dtype)


@cuda
@pytest.mark.parametrize('path', GOLDEN_NETWORKS, ids=lambda p: p.stem)
def test_cuda_golden_forward_matches_original(path):
    case, net = _golden_trained_net(path)
    net.cuda()
    case['inputs'] = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case['inputs'].items()}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        out = _golden_forward(net, case).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert_close(out, case['output'], steps(net, net.img_resolution), 'CUDA output')


@cuda
@pytest.mark.parametrize('cls', PRECONDS)
def test_cuda_forward_backward_without_host_sync(cls):
    arch = TINY_ADM if cls == 'iDDPMPrecond' else TINY_SONG
    net = build(cls, arch, label_dim=5, label_dropout=0.2).cuda().train()
    x, sigma, labels = (t.cuda() for t in inputs(label_dim=5))
    net(x, sigma, labels).sum().backward()  # warm-up (lazy CUDA/cuDNN initialisation may synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        net(x, sigma, labels).square().mean().backward()
        net(x, sigma[1], None)
    finally:
        torch.cuda.set_sync_debug_mode(0)
