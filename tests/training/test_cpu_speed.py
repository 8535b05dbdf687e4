"""training/cpu_speed.py: the accelerated layers compute what the plain layers of training/networks.py compute.

* ``dropout``: inverted dropout with a cheaper mask than F.dropout, same distribution and scaling.
* nearest-neighbour upsampling for the 2-tap box filter: bit-identical to the transposed convolution.
* prepacked convolutions: inference on weights reordered once for oneDNN, within float32 rounding of F.conv2d,
  golden cases included.
* bfloat16 channels-last GroupNorm with small groups computed in float32; fast mode close to exact mode.
* the interface: opt-in, removable, invisible to pickles and copies; networks.py's source stays self-contained.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests._tolerance import assert_within, sum_steps
from tests.training.test_networks import GOLDEN_NETWORKS, REDUCED_PRECISION_STEPS, TINY_ADM, TINY_SONG, _golden_forward, \
    _golden_trained_net, assert_close, build, inputs, steps
from torch_utils import cpu_support
from training import cpu_speed, networks

needs_onednn = pytest.mark.skipif(not cpu_speed.packed_convolutions_available(),
                                  reason='this torch build has no oneDNN')


def _packs(conv):
    return cpu_speed._PACKS.get(conv)

# ----------------------------------------------------------------------------------------------------------------
# Dropout.


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_dropout_rate_scale_and_layout(dtype):
    torch.manual_seed(0)
    x = (torch.rand(16, 32, 32, 32) + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    y = cpu_speed.dropout(x, 0.13)
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
    drops = sum((cpu_speed.dropout(torch.ones(4, 8, 8, 8), 0.5) == 0).double() for _ in range(400)) / 400
    assert drops.mean().item() == pytest.approx(0.5, abs=0.01)
    assert drops.min().item() > 0.35 and drops.max().item() < 0.65  # no position is always kept or always dropped


def test_dropout_gradient_is_the_same_mask():
    torch.manual_seed(2)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    y = cpu_speed.dropout(x, 0.3)
    y.sum().backward()
    mask = (y != 0).float()
    assert torch.allclose(x.grad, mask / 0.7)


def test_dropout_off_cases():
    x = torch.randn(2, 3, 4, 4)
    assert cpu_speed.dropout(x, 0.0) is x
    assert torch.equal(cpu_speed.dropout(x, 1.0), torch.zeros_like(x))


def test_dropout_follows_the_global_seed():
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(5)
    a = cpu_speed.dropout(x, 0.2)
    torch.manual_seed(5)
    b = cpu_speed.dropout(x, 0.2)
    torch.manual_seed(6)
    c = cpu_speed.dropout(x, 0.2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_accelerated_blocks_drop_with_the_cheap_mask_in_training_only():
    torch.manual_seed(10)
    block = networks.UNetBlock(8, 8, emb_channels=16, dropout=0.4).train()
    x, emb, h = torch.randn(2, 8, 6, 6), torch.randn(2, 16), torch.randn(2, 8, 6, 6)

    def seeded(fn):
        torch.manual_seed(11)
        return fn()
    assert torch.equal(seeded(lambda: block._dropout(h)), seeded(lambda: F.dropout(h, 0.4, training=True)))
    with cpu_speed.accelerate(block, prepack=False):
        cheap = seeded(lambda: block._dropout(h))
        assert torch.equal(cheap, seeded(lambda: cpu_speed.dropout(h, 0.4)))
        assert not torch.equal(cheap, seeded(lambda: F.dropout(h, 0.4, training=True)))  # other random numbers
        block.eval()
        assert block._dropout(h) is h
        with torch.no_grad():
            accelerated = block(x, emb)
    with torch.no_grad():
        assert torch.equal(accelerated, block(x, emb))


# ----------------------------------------------------------------------------------------------------------------
# Box-filter upsampling through F.interpolate.


def _upsampler(filter_taps=(1, 1), **kwargs):
    return networks.Conv2d(8, 8, kernel=0, up=True, resample_filter=list(filter_taps), **kwargs)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_box_upsampling_is_bit_identical_to_the_transposed_convolution(dtype, layout):
    torch.manual_seed(3)
    conv = _upsampler()
    x = torch.randn(2, 8, 5, 5, dtype=dtype).contiguous(memory_format=layout)
    kernel = conv.resample_filter.to(dtype).mul(4).expand(8, 1, -1, -1)
    expected = F.conv_transpose2d(x, kernel, groups=8, stride=2)
    assert torch.equal(conv(x), expected)
    with cpu_speed.accelerate(conv) as handle:
        assert len(handle) == 1 and cpu_speed.is_accelerated(conv)
        assert torch.equal(conv(x), expected)


def test_other_filters_keep_the_transposed_convolution():
    others = [networks.Conv2d(4, 4, kernel=0, up=True, resample_filter=[1, 3, 3, 1]),
              networks.Conv2d(4, 4, kernel=3, up=True, resample_filter=[1, 1], fused_resample=True),
              networks.Conv2d(4, 4, kernel=0, down=True, resample_filter=[1, 1])]
    for conv in others:
        with cpu_speed.accelerate(conv, prepack=False) as handle:
            assert len(handle) == 0 and not cpu_speed.is_accelerated(conv)


def test_box_upsampling_gradients_match():
    torch.manual_seed(4)
    conv = networks.Conv2d(4, 6, kernel=3, up=True, resample_filter=[1, 1])
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    with cpu_speed.accelerate(conv):
        conv(x).square().sum().backward()
    fast_grad, fast_wgrad = x.grad.clone(), conv.weight.grad.clone()
    x.grad = None
    conv.weight.grad = None
    conv(x).square().sum().backward()  # the transposed-convolution path
    assert torch.allclose(fast_grad, x.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(fast_wgrad, conv.weight.grad, rtol=1e-5, atol=1e-5)


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
    with torch.no_grad():
        exact = F.group_norm(x.float(), norm.num_groups, norm.weight, norm.bias, norm.eps)
        plain = F.group_norm(x, norm.num_groups, norm.weight.bfloat16(), norm.bias.bfloat16(), norm.eps)
        assert torch.equal(norm(x), plain)  # not accelerated: PyTorch's bfloat16 kernel
    with cpu_speed.accelerate(norm):
        y = norm(x)
        y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    upcast = channels // norm.num_groups < cpu_speed.BF16_GROUP_NORM_MIN_CHANNELS_PER_GROUP
    # Small groups: the float32 result rounded once to bfloat16; 16 or more: PyTorch's bfloat16 kernel, untouched.
    assert torch.equal(y, exact.to(torch.bfloat16) if upcast else plain)
    assert torch.allclose(y.float(), exact, rtol=2e-2, atol=2e-2)
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
        with cpu_speed.accelerate(conv):
            got = conv(x)
            # Without oneDNN bfloat16 kernels (AVX2-only CPUs) bfloat16 keeps F.conv2d rather than crash in the reorder.
            assert bool(_packs(conv)) == packable, 'packed path taken or skipped wrongly'
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
    assert _packs(conv) is None and not cpu_speed.is_accelerated(conv)  # removed on exit


@needs_onednn
@pytest.mark.parametrize('path', GOLDEN_NETWORKS, ids=lambda p: p.stem)
def test_golden_forward_with_prepacked_weights(path):
    case, net = _golden_trained_net(path)
    net.to(memory_format=torch.channels_last)
    case['inputs']['x'] = case['inputs']['x'].contiguous(memory_format=torch.channels_last)
    with cpu_speed.accelerate(net):
        out = _golden_forward(net, case)
        assert any(_packs(m) for m in net.modules()), 'the packed path was not taken'
    assert_close(out, case['output'], steps(net, net.img_resolution), 'output with prepacked weights')


@needs_onednn
@pytest.mark.parametrize('arch', [TINY_SONG, TINY_ADM], ids=['song', 'adm'])
def test_prepacked_network_matches_plain(arch):
    net = build('EDMPrecond', arch, label_dim=5).to(memory_format=torch.channels_last)
    x, sigma, labels = inputs(label_dim=5)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = net(x, sigma, labels)
        with cpu_speed.accelerate(net):
            got = net(x, sigma, labels)
            got_other_batch = net(x[:2], sigma[:2], labels[:2])  # a second input shape gets its own packing
    assert_close(got, expected, steps(net), 'prepacked')
    assert_close(got_other_batch, expected[:2], steps(net), 'prepacked, batch 2')


@needs_onednn
def test_nchw_inputs_keep_the_plain_path():
    conv = networks.Conv2d(8, 8, kernel=3)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad(), cpu_speed.accelerate(conv):
        y = conv(x)
        assert not _packs(conv)
    assert y.is_contiguous()


@needs_onednn
def test_in_place_weight_changes_are_repacked():
    torch.manual_seed(6)
    conv = networks.Conv2d(8, 8, kernel=3)
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), cpu_speed.accelerate(conv):
        before = conv(x)
        conv.weight.mul_(2)
        after = conv(x)
    assert torch.allclose(after - conv.bias.reshape(1, -1, 1, 1), 2 * (before - conv.bias.reshape(1, -1, 1, 1)),
                          rtol=1e-5, atol=1e-5)


@needs_onednn
def test_autograd_and_nested_calls_take_the_plain_path():
    torch.manual_seed(7)
    conv = networks.Conv2d(4, 4, kernel=3)
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    with cpu_speed.accelerate(conv):
        y = conv(x)  # gradients enabled: ordinary convolution, differentiable
        assert y.requires_grad and not _packs(conv)
        with cpu_speed.accelerate(conv) as inner, torch.no_grad():
            assert len(inner) == 0  # already accelerated by the outer call
            conv(x)
        assert _packs(conv), 'the inner call must not drop the outer call\'s packs'
    assert _packs(conv) is None


def test_acceleration_ignores_what_is_not_a_module():
    with cpu_speed.accelerate(lambda x: x) as handle:
        assert len(handle) == 0


# ----------------------------------------------------------------------------------------------------------------
# The interface: opt-in, removable, and invisible to pickles, copies and the embedded source.


def test_networks_are_plain_until_accelerated_and_plain_again_after_remove():
    net = build('EDMPrecond', TINY_SONG, label_dim=5)
    plain_classes = [type(m) for m in net.modules()]
    assert not any(cpu_speed.is_accelerated(m) for m in net.modules())
    handle = cpu_speed.accelerate(net)
    assert len(handle) > 0 and any(cpu_speed.is_accelerated(m) for m in net.modules())
    assert [type(m).__name__ for m in net.modules()] == [c.__name__ for c in plain_classes]
    handle.remove()
    handle.remove()
    assert [type(m) for m in net.modules()] == plain_classes


def test_pickles_and_copies_of_an_accelerated_network_are_plain():
    import copy
    import io
    import pickle
    net = build('EDMPrecond', TINY_SONG, label_dim=5)
    plain_bytes = pickle.dumps(net)
    x, sigma, labels = inputs(label_dim=5)
    with cpu_speed.accelerate(net):
        assert pickle.dumps(net) == plain_bytes
        copied = copy.deepcopy(net)
        accelerated_save, plain_save = io.BytesIO(), io.BytesIO()
        torch.save(net, accelerated_save)
    torch.save(net, plain_save)
    assert accelerated_save.getvalue() == plain_save.getvalue()
    assert not any(cpu_speed.is_accelerated(m) for m in copied.modules())
    assert b'training.cpu_speed' not in plain_bytes
    loaded = pickle.loads(plain_bytes)
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, labels), net(x, sigma, labels))


def test_embedded_network_source_imports_only_what_the_original_provides():
    """Pickles carry networks.py's source; it must import in the original code, which has no cpu_support/cpu_speed.

    Unpickling runs the module's top level, never a constructor, so only imports outside functions count (the
    constructors validate D with training.pfgmpp, which exists wherever networks are built anew).
    """
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(networks))
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):  # project packages by module, others by package
            package_level = node.module in ('torch_utils', 'dnnlib')
            imported.update(f'{node.module}.{a.name}' if package_level else node.module for a in node.names)
    original = {'__future__', 'math', 'typing', 'numpy', 'torch', 'torch.nn', 'torch.nn.functional',
                'torch_utils.persistence', 'torch_utils.misc', 'dnnlib.util'}
    assert imported <= original, f'networks.py imports {sorted(imported - original)}'
    source = inspect.getsource(networks)
    assert 'torch._C' not in source and 'torch.ops' not in source


def test_pickle_of_an_accelerated_network_loads_with_only_the_original_helper_modules(tmp_path):
    """A fresh process that has dnnlib and torch_utils.persistence but none of this project's other modules (as the
    original code) unpickles the network from its embedded source and computes the same output."""
    import pickle
    import shutil
    from tests.conftest import REPO_ROOT, run_python
    root = tmp_path / 'original_like'
    shutil.copytree(REPO_ROOT / 'dnnlib', root / 'dnnlib')
    (root / 'torch_utils').mkdir()
    (root / 'torch_utils' / '__init__.py').write_text('')
    shutil.copy(REPO_ROOT / 'torch_utils' / 'persistence.py', root / 'torch_utils' / 'persistence.py')
    net = build('EDMPrecond', TINY_SONG, label_dim=5)
    x, sigma, labels = inputs(label_dim=5)
    with cpu_speed.accelerate(net):
        (tmp_path / 'net.pkl').write_bytes(pickle.dumps(dict(ema=net)))
    with torch.no_grad():
        torch.save(dict(x=x, sigma=sigma, labels=labels, out=net(x, sigma, labels)), tmp_path / 'expected.pt')
    code = ('import pickle, sys, torch\n'
            'net = pickle.load(open("net.pkl", "rb"))["ema"]\n'
            'e = torch.load("expected.pt")\n'
            'assert not any(m.startswith(("training", "tests")) for m in sys.modules), sorted(sys.modules)\n'
            'with torch.no_grad():\n'
            '    assert torch.equal(net(e["x"], e["sigma"], e["labels"]), e["out"])\n')
    run_python(['-c', code], cwd=tmp_path, env={'PYTHONPATH': str(root)})


@pytest.mark.parametrize('arch', [TINY_SONG, TINY_ADM], ids=['song', 'adm'])
def test_exact_mode_is_bit_identical_when_accelerated(arch):
    """fp32 in the default layout: apply_speed_options (as generate.py and fid.py call it) changes no bit of the
    denoiser or of the Heun sampler's images (a padded batch of one included)."""
    from formats import network_io
    from sampling import pipeline
    plain = build('EDMPrecond', arch, label_dim=5)
    x, sigma, labels = inputs(label_dim=5)
    with torch.no_grad():
        want = plain(x, sigma, labels)
    images = pipeline.sample_batch(plain, [3, 4], num_steps=3)
    single = pipeline.sample_batch(plain, [4], num_steps=3)
    network_io.apply_speed_options(plain)
    assert any(cpu_speed.is_accelerated(m) for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(plain(x, sigma, labels), want)
    assert torch.equal(pipeline.sample_batch(plain, [3, 4], num_steps=3), images)
    assert torch.equal(pipeline.sample_batch(plain, [4], num_steps=3), single)


# ----------------------------------------------------------------------------------------------------------------
# Fast mode as generate.py runs it on CPU: bf16 U-Net, channels_last, accelerated layers.

@pytest.mark.parametrize('arch', [TINY_SONG, TINY_ADM], ids=['song', 'adm'])
def test_fast_mode_stays_close_to_exact_mode(arch):
    from formats import network_io
    exact = build('EDMPrecond', arch, label_dim=5)
    fast = build('EDMPrecond', arch, label_dim=5)
    network_io.apply_speed_options(fast, 'bf16', channels_last=True)
    assert any(cpu_speed.is_accelerated(m) for m in fast.modules())
    x, sigma, labels = inputs(label_dim=5)
    with torch.no_grad():
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
    with torch.no_grad(), cpu_speed.accelerate(conv):
        got = conv(x.bfloat16())
        assert not _packs(conv)  # bf16 keeps F.conv2d
        conv(x)
        assert list(_packs(conv)) == [(torch.float32, tuple(x.shape))]  # float32 still packs
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
    """What generate.py and fid.py gen apply after loading a network (formats.network_io.precision_for_device)."""
    from formats import network_io
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
