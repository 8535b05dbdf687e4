"""training/networks.py speed paths: they must compute what the plain paths compute.

* ``dropout``: inverted dropout with a cheaper mask than F.dropout, same distribution and scaling.
* nearest-neighbour upsampling for the 2-tap box filter: bit-identical to the transposed convolution.
* ``prepacked_convolutions``: inference on weights reordered once for oneDNN, within float32 rounding of F.conv2d,
  golden cases included.
* bfloat16 channels-last GroupNorm with small groups computed in float32; fast mode close to exact mode.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests._tolerance import assert_within, sum_steps
from tests.test_networks import GOLDEN_NETWORKS, REDUCED_PRECISION_STEPS, TINY_ADM, TINY_SONG, _golden_forward, \
    _golden_trained_net, assert_close, build, inputs, steps
from torch_utils import cpu_support
from training import networks

needs_onednn = pytest.mark.skipif(not networks._packed_ops_available(), reason='this torch build has no oneDNN')

# ----------------------------------------------------------------------------------------------------------------
# Dropout.


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_dropout_rate_scale_and_layout(dtype):
    torch.manual_seed(0)
    x = (torch.rand(16, 32, 32, 32) + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    y = networks.dropout(x, 0.13, True)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    dropped = (y == 0).double().mean().item()
    count = y.numel()
    assert abs(dropped - 0.13) < 5 * (0.13 * 0.87 / count) ** 0.5  # 5 standard errors of a binomial proportion
    kept = y != 0
    expected = x.float()[kept] * (torch.tensor(1, dtype=dtype) / torch.tensor(0.87, dtype=dtype)).float()
    assert torch.allclose(y.float()[kept], (x * (torch.ones((), dtype=dtype) / (1 - 0.13))).float()[kept],
                          rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert torch.allclose(y.float()[kept], expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_dropout_mask_is_uniform_over_positions():
    torch.manual_seed(1)
    drops = sum((networks.dropout(torch.ones(4, 8, 8, 8), 0.5, True) == 0).double() for _ in range(400)) / 400
    assert drops.mean().item() == pytest.approx(0.5, abs=0.01)
    assert drops.min().item() > 0.35 and drops.max().item() < 0.65  # no position is always kept or always dropped


def test_dropout_gradient_is_the_same_mask():
    torch.manual_seed(2)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    y = networks.dropout(x, 0.3, True)
    y.sum().backward()
    mask = (y != 0).float()
    assert torch.allclose(x.grad, mask / 0.7)


def test_dropout_off_cases():
    x = torch.randn(2, 3, 4, 4)
    assert networks.dropout(x, 0.5, False) is x
    assert networks.dropout(x, 0.0, True) is x
    assert torch.equal(networks.dropout(x, 1.0, True), torch.zeros_like(x))


def test_dropout_follows_the_global_seed():
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(5)
    a = networks.dropout(x, 0.2, True)
    torch.manual_seed(5)
    b = networks.dropout(x, 0.2, True)
    torch.manual_seed(6)
    c = networks.dropout(x, 0.2, True)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------------------------------------------
# Box-filter upsampling through F.interpolate.


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_box_upsampling_is_bit_identical_to_the_transposed_convolution(dtype, layout):
    torch.manual_seed(3)
    conv = networks.Conv2d(8, 8, kernel=0, up=True, resample_filter=[1, 1])
    assert conv.nearest_up
    x = torch.randn(2, 8, 5, 5, dtype=dtype).contiguous(memory_format=layout)
    kernel = conv.resample_filter.to(dtype).mul(4).expand(8, 1, -1, -1)
    expected = F.conv_transpose2d(x, kernel, groups=8, stride=2)
    assert torch.equal(conv(x), expected)


def test_other_filters_keep_the_transposed_convolution():
    assert not networks.Conv2d(4, 4, kernel=3, up=True, resample_filter=[1, 3, 3, 1]).nearest_up
    assert not networks.Conv2d(4, 4, kernel=3, up=True, resample_filter=[1, 1], fused_resample=True).nearest_up
    assert not networks.Conv2d(4, 4, kernel=3, down=True, resample_filter=[1, 1]).nearest_up


def test_box_upsampling_gradients_match():
    torch.manual_seed(4)
    conv = networks.Conv2d(4, 6, kernel=3, up=True, resample_filter=[1, 1])
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    conv(x).square().sum().backward()
    fast_grad, fast_wgrad = x.grad.clone(), conv.weight.grad.clone()
    x.grad = None
    conv.weight.grad = None
    conv.nearest_up = False  # the transposed-convolution path
    conv(x).square().sum().backward()
    assert torch.allclose(fast_grad, x.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(fast_wgrad, conv.weight.grad, rtol=1e-5, atol=1e-5)


def test_instances_without_the_attribute_keep_working():
    # A Conv2d unpickled from a version of this file that predates ``nearest_up``.
    conv = networks.Conv2d(4, 4, kernel=3, up=True, resample_filter=[1, 1])
    x = torch.randn(1, 4, 3, 3)
    expected = conv(x)
    del conv.nearest_up
    assert torch.allclose(conv(x), expected)


# ----------------------------------------------------------------------------------------------------------------
# GroupNorm: bfloat16 channels-last groups of fewer than 16 channels are normalised in float32.


@pytest.mark.parametrize('channels', [64, 256, 512])  # 2, 8 and 16 channels per group
def test_bf16_group_norm_matches_float32_rounded(channels):
    torch.manual_seed(8)
    norm = networks.GroupNorm(channels)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = (torch.randn(2, channels, 6, 6) * 3 + 1).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = norm(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    upcast = channels // norm.num_groups < networks.BF16_GROUP_NORM_MIN_CHANNELS_PER_GROUP
    assert networks._slow_bf16_group_norm(x, norm.num_groups) == upcast
    with torch.no_grad():
        exact = F.group_norm(x.float(), norm.num_groups, norm.weight, norm.bias, norm.eps)
        plain = F.group_norm(x, norm.num_groups, norm.weight.bfloat16(), norm.bias.bfloat16(), norm.eps)
    # Small groups: the float32 result rounded once to bfloat16; 16 or more: PyTorch's bfloat16 kernel, untouched.
    assert torch.equal(y, exact.to(torch.bfloat16) if upcast else plain)
    assert torch.allclose(y.float(), exact, rtol=2e-2, atol=2e-2)
    y.float().square().sum().backward()
    assert x.grad is not None and norm.weight.grad.dtype == torch.float32 and torch.isfinite(norm.weight.grad).all()


# ----------------------------------------------------------------------------------------------------------------
# Prepacked convolution weights.


@needs_onednn
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('kernel', [1, 3])
def test_prepacked_convolution_matches_conv2d(dtype, kernel):
    torch.manual_seed(5)
    conv = networks.Conv2d(16, 24, kernel=kernel, init_bias=0.5)
    torch.nn.init.normal_(conv.bias)
    layout = torch.channels_last
    x = torch.randn(3, 16, 7, 7).to(dtype).contiguous(memory_format=layout)
    packable = dtype == torch.float32 or cpu_support.bf16_supported()
    with torch.no_grad():
        expected = F.conv2d(x, conv.weight.to(dtype), conv.bias.to(dtype), padding=kernel // 2)
        with networks.prepacked_convolutions(conv):
            got = conv(x)
            # Without oneDNN bfloat16 kernels (AVX2-only CPUs) bfloat16 keeps F.conv2d rather than crash in the reorder.
            assert bool(conv.__dict__['_inference_packs']) == packable, 'packed path taken or skipped wrongly'
            again = conv(x)
    assert got.dtype == dtype and got.shape == expected.shape
    assert got.is_contiguous(memory_format=layout)
    # float32: one sum over the fan-in plus the bias; bfloat16 sums in float32 and rounds its output once, so the two
    # results may differ by that rounding in each.
    k = sum_steps(16 * kernel * kernel) + 1 if dtype == torch.float32 else 2
    assert_within(got, expected, k, dtype, what=f'prepacked {dtype}')
    assert torch.equal(got, again)
    if not packable:
        assert torch.equal(got, expected)
    assert '_inference_packs' not in conv.__dict__  # dropped on exit


@needs_onednn
@pytest.mark.parametrize('path', GOLDEN_NETWORKS, ids=lambda p: p.stem)
def test_golden_forward_with_prepacked_weights(path):
    case, net = _golden_trained_net(path)
    net.to(memory_format=torch.channels_last)
    case['inputs']['x'] = case['inputs']['x'].contiguous(memory_format=torch.channels_last)
    with networks.prepacked_convolutions(net):
        out = _golden_forward(net, case)
        assert any(m.__dict__.get('_inference_packs') for m in net.modules()), 'the packed path was not taken'
    assert_close(out, case['output'], steps(net, net.img_resolution), 'output with prepacked weights')


@needs_onednn
@pytest.mark.parametrize('arch', [TINY_SONG, TINY_ADM], ids=['song', 'adm'])
def test_prepacked_network_matches_plain(arch):
    net = build('EDMPrecond', arch, label_dim=5).to(memory_format=torch.channels_last)
    x, sigma, labels = inputs(label_dim=5)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = net(x, sigma, labels)
        with networks.prepacked_convolutions(net):
            got = net(x, sigma, labels)
            got_other_batch = net(x[:2], sigma[:2], labels[:2])  # a second input shape gets its own packing
    assert_close(got, expected, steps(net), 'prepacked')
    assert_close(got_other_batch, expected[:2], steps(net), 'prepacked, batch 2')


@needs_onednn
def test_nchw_inputs_keep_the_plain_path():
    conv = networks.Conv2d(8, 8, kernel=3)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad(), networks.prepacked_convolutions(conv):
        y = conv(x)
        assert not conv.__dict__['_inference_packs']
    assert y.is_contiguous()


@needs_onednn
def test_in_place_weight_changes_are_repacked():
    torch.manual_seed(6)
    conv = networks.Conv2d(8, 8, kernel=3)
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), networks.prepacked_convolutions(conv):
        before = conv(x)
        conv.weight.mul_(2)
        after = conv(x)
    assert torch.allclose(after - conv.bias.reshape(1, -1, 1, 1), 2 * (before - conv.bias.reshape(1, -1, 1, 1)),
                          rtol=1e-5, atol=1e-5)


@needs_onednn
def test_autograd_and_nested_blocks_take_the_plain_path():
    torch.manual_seed(7)
    conv = networks.Conv2d(4, 4, kernel=3)
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    with networks.prepacked_convolutions(conv):
        y = conv(x)  # gradients enabled: ordinary convolution, differentiable
        assert y.requires_grad and not conv.__dict__['_inference_packs']
        with networks.prepacked_convolutions(conv), torch.no_grad():
            conv(x)
        assert conv.__dict__['_inference_packs'], 'the inner block must not drop the outer block\'s packs'
    assert '_inference_packs' not in conv.__dict__


def test_prepacking_ignores_what_is_not_a_module():
    with networks.prepacked_convolutions(lambda x: x) as fn:
        assert fn(3) == 3


# ----------------------------------------------------------------------------------------------------------------
# Fast mode as generate.py runs it on CPU: bf16 U-Net, channels_last, prepacked weights.

@pytest.mark.parametrize('arch', [TINY_SONG, TINY_ADM], ids=['song', 'adm'])
def test_fast_mode_stays_close_to_exact_mode(arch):
    exact = build('EDMPrecond', arch, label_dim=5)
    fast = build('EDMPrecond', arch, label_dim=5, use_bf16=True, reduced_precision_on_cpu=True)
    fast.to(memory_format=torch.channels_last)
    x, sigma, labels = inputs(label_dim=5)
    with torch.no_grad(), networks.prepacked_convolutions(fast):
        want = exact(x, sigma, labels)
        got = fast(x.contiguous(memory_format=torch.channels_last), sigma, labels)
    assert got.dtype == torch.float32
    assert_close(got, want, REDUCED_PRECISION_STEPS, 'fast mode', torch.bfloat16)
    assert not torch.equal(got, want)  # bf16 did run


# ----------------------------------------------------------------------------------------------------------------
# A CPU without oneDNN bfloat16 kernels (AVX2-only x86), forced here by answering the capability query with False.


@pytest.fixture()
def no_bf16_kernels(monkeypatch):
    monkeypatch.setattr(cpu_support, 'bf16_supported', lambda: False)


@needs_onednn
def test_without_bf16_kernels_bf16_convolutions_are_not_packed(no_bf16_kernels):
    torch.manual_seed(9)
    conv = networks.Conv2d(8, 8, kernel=3)
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), networks.prepacked_convolutions(conv):
        got = conv(x.bfloat16())
        assert not conv.__dict__['_inference_packs']  # bf16 keeps F.conv2d
        conv(x)
        assert list(conv.__dict__['_inference_packs']) == [(torch.float32, tuple(x.shape))]  # float32 still packs
        expected = F.conv2d(x.bfloat16(), conv.weight.bfloat16(), conv.bias.bfloat16(), padding=1)
    assert torch.equal(got, expected)


def test_without_bf16_kernels_bf16_requests_fall_back_to_fp32(no_bf16_kernels):
    used, reason = cpu_support.supported_precision('bf16', 'cpu')
    assert used == 'fp32' and 'no oneDNN bfloat16 kernels' in reason and 'running fp32 instead' in reason
    assert '\n' not in reason
    for precision in (None, 'fp32', 'fp16'):
        assert cpu_support.supported_precision(precision, 'cpu') == (precision, None)
    assert cpu_support.supported_precision('bf16', 'cuda') == ('bf16', None)


def test_with_bf16_kernels_bf16_runs_as_asked(monkeypatch):
    monkeypatch.setattr(cpu_support, 'bf16_supported', lambda: True)
    assert cpu_support.supported_precision('bf16', 'cpu') == ('bf16', None)


def test_bf16_support_is_the_onednn_query():
    expected = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert cpu_support.bf16_supported() == bool(expected)
    assert cpu_support.capability_summary().startswith(torch.backends.cpu.get_cpu_capability())


def test_without_bf16_kernels_a_network_built_for_cpu_bf16_loads_as_fp32(no_bf16_kernels):
    """What generate.py and fid.py gen apply after loading a network (training.network_io.precision_for_device)."""
    from training import network_io
    built_bf16 = build('EDMPrecond', TINY_SONG, randomize=False, use_bf16=True, reduced_precision_on_cpu=True)
    precision, reason = network_io.precision_for_device(built_bf16, None, 'cpu')
    assert precision == 'fp32' and 'no oneDNN bfloat16 kernels' in reason
    network_io.apply_speed_options(built_bf16, precision)
    assert built_bf16.unet_dtype('cpu') == torch.float32
    assert network_io.precision_for_device(built_bf16, None, 'cuda') == (None, None)
    plain = build('EDMPrecond', TINY_SONG, randomize=False)
    assert network_io.precision_for_device(plain, None, 'cpu') == (None, None)
    assert network_io.precision_for_device(plain, 'bf16', 'cpu')[0] == 'fp32'
    assert network_io.precision_for_device(plain, 'fp16', 'cpu') == ('fp16', None)
