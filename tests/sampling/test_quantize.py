"""sampling/quantize.py per output channel, and generate.py --quantize-granularity.

The per-tensor quantizer itself, and the layer selection, are tested in tests/sampling/test_pipeline.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import generate
from formats.network_io import load_network
from sampling import generation, pipeline, quantize
from tests._sampler_nets import make_tiny_net, save_snapshot


@pytest.fixture(autouse=True)
def _single_intra_op_thread(one_intra_op_thread):
    """Tiny tensors and networks on one thread (see conftest.one_intra_op_thread)."""


def _rows_of_different_scales(seed: int = 0) -> torch.Tensor:
    """[6, 4, 3, 3] weights whose output channels span six orders of magnitude, one of them all zeros."""
    scales = torch.tensor([1e-4, 1e-2, 0.0, 1.0, 30.0, 1e-3]).view(6, 1, 1, 1)
    return torch.randn([6, 4, 3, 3], generator=torch.Generator().manual_seed(seed)) * scales


@pytest.mark.parametrize('scheme', quantize.SCHEMES)
@pytest.mark.parametrize('bits', [2, 3, 8, 16])
def test_per_channel_is_per_tensor_on_each_channel_alone(scheme, bits):
    if bits < quantize.MIN_BITS[scheme]:
        pytest.skip('too few bits for the scheme')
    w = _rows_of_different_scales(bits)
    w[5] = 0.25   # constant: minmax leaves it alone, symmetric quantizes it
    q = quantize.quantize_tensor(w, bits, scheme, 'channel')
    assert q.dtype == w.dtype and q.shape == w.shape
    for i in range(w.shape[0]):
        assert torch.equal(q[i], quantize.quantize_tensor(w[i], bits, scheme)), i
    assert torch.equal(q[2], w[2])   # the all-zero channel stays as it is
    # The default is per tensor, as before.
    assert torch.equal(quantize.quantize_tensor(w, bits, scheme), quantize.quantize_tensor(w, bits, scheme, 'tensor'))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.float16])
def test_per_channel_keeps_dtype_and_degenerate_channels_bit_for_bit(dtype):
    w = _rows_of_different_scales().to(dtype)
    w[1] = 0.1   # constant channel: untouched by minmax, to the bit, in any dtype
    for scheme in quantize.SCHEMES:
        q = quantize.quantize_tensor(w, 4, scheme, 'channel')
        assert q.dtype == dtype and torch.equal(q[2], w[2])
        if scheme == 'minmax':
            assert torch.equal(q[1], w[1])


def test_each_channel_reaches_its_own_maximum_level():
    """Symmetric: a channel's largest magnitude is its top level, so it maps to itself; a channel already on its own
    grid (integer multiples of a power of two) comes back exactly, whatever the scale of the other channels."""
    bits = 4
    levels = 2 ** (bits - 1) - 1
    codes = torch.randint(-levels, levels + 1, [4, 20], generator=torch.Generator().manual_seed(1)).float()
    codes[:, 0] = levels   # every channel uses its top level
    w = codes * torch.tensor([2.0 ** -12, 2.0 ** -3, 1.0, 2.0 ** 5]).view(4, 1)
    q = quantize.quantize_tensor(w, bits, 'symmetric', 'channel')
    assert torch.equal(q, w)
    assert torch.equal(q.abs().amax(dim=1), w.abs().amax(dim=1))
    # Per tensor, the small channels fall below half a step of the large one's grid and vanish.
    assert torch.equal(quantize.quantize_tensor(w, bits, 'symmetric')[:2], torch.zeros(2, 20))
    # Random channels: the top level is the channel's own max|w|, up to the float32 rounding of step * levels.
    w = _rows_of_different_scales(2)
    q = quantize.quantize_tensor(w, 6, 'symmetric', 'channel')
    peak = w.flatten(1).abs().amax(dim=1)
    assert torch.allclose(q.flatten(1).abs().amax(dim=1), peak, rtol=4 * torch.finfo(torch.float32).eps, atol=0)


@pytest.mark.parametrize('bits', [2, 4, 8])
def test_per_channel_uses_at_most_two_to_the_bits_minus_one_values_per_channel(bits):
    w = _rows_of_different_scales(bits)
    q = quantize.quantize_tensor(w, bits, 'symmetric', 'channel')
    for i in range(w.shape[0]):
        assert q[i].unique().numel() <= 2 ** bits - 1, i
        peak = w[i].abs().max()
        if peak > 0:   # within half of the channel's own step
            assert (q[i] - w[i]).abs().max() <= peak / (2 ** (bits - 1) - 1) * 0.5001


@pytest.mark.parametrize('scheme', quantize.SCHEMES)
def test_per_channel_error_is_below_per_tensor_at_16_bits(scheme):
    w = _rows_of_different_scales(3)
    per_tensor = (quantize.quantize_tensor(w, 16, scheme) - w).abs()
    per_channel = (quantize.quantize_tensor(w, 16, scheme, 'channel') - w).abs()
    assert per_channel.pow(2).mean() < per_tensor.pow(2).mean()
    # Channel by channel: the largest channel sets the per-tensor scale, so it is quantized alike (for symmetric);
    # every smaller nonzero channel gets a finer grid of its own.
    largest = int(w.flatten(1).abs().amax(dim=1).argmax())
    for i in range(w.shape[0]):
        if i == largest or not w[i].any():
            continue
        assert per_channel[i].max() < per_tensor[i].max(), i
    if scheme == 'symmetric':
        assert torch.equal(per_channel[largest], per_tensor[largest])
    # Relative to each channel's own scale the per-tensor error of the small channels is large, the per-channel not.
    small = w[0].abs().max()
    assert per_channel[0].max() < 1e-4 * small < per_tensor[0].max()


def test_bad_granularity_is_one_line():
    w = torch.ones(3, 3)
    for call in (lambda: quantize.quantize_tensor(w, 4, 'symmetric', 'row'),
                 lambda: quantize.quantize_network(make_tiny_net(), 4, granularity='layer'),
                 lambda: quantize.check_granularity('Channel')):
        with pytest.raises(ValueError, match='tensor.channel') as info:
            call()
        assert '\n' not in str(info.value)
    with pytest.raises(generation.GenerationError, match='granularity'):
        generation.plan_runs('out', None, None, 4, None, None, None, 'symmetric', 'row')
    assert quantize.GRANULARITIES == ('tensor', 'channel')


def test_quantize_network_per_channel():
    net = make_tiny_net()
    names = set(quantize.quantized_weight_names(net))
    quantized = quantize.quantize_network(net, 3, granularity='channel')
    original, changed = dict(net.named_parameters()), dict(quantized.named_parameters())
    for name, weight in original.items():
        expected = quantize.quantize_tensor(weight, 3, 'symmetric', 'channel') if name in names else weight
        assert torch.equal(changed[name], expected), name
    assert torch.equal(quantize.quantize_network(net, 3, granularity='tensor').state_dict()[sorted(names)[0]],
                       quantize.quantize_network(net, 3).state_dict()[sorted(names)[0]])


def test_generate_quantize_granularity_flag(tmp_path):
    """--quantize-granularity=channel samples the per-channel network, records it, and a folder made per tensor is
    not resumed with it (nor the other way round)."""
    network = save_snapshot(make_tiny_net(), tmp_path / 'net.pkl')
    runner = CliRunner()

    def cli(*args):
        return runner.invoke(generate.main, ['--network', str(network), '--seeds=0-1', '--steps=2',
                                             '--quantize-bits=3', *map(str, args)], catch_exceptions=True)

    result = cli('--outdir', tmp_path / 'channel', '--quantize-granularity=channel')
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / 'channel' / 'manifest.json').read_text())
    assert manifest['quantize_granularity'] == 'channel' and manifest['settings']['quantize_granularity'] == 'channel'
    net = quantize.quantize_network(load_network(str(network)), 3, granularity='channel')
    (seeds, images), = list(pipeline.generate_images(net, [0, 1], batch_size=2, num_steps=2))
    for seed, image in zip(seeds, images):
        pixels = np.asarray(Image.open(tmp_path / 'channel' / f'{seed:06d}.png'))
        assert np.array_equal(pixels.reshape(image.permute(1, 2, 0).shape), image.permute(1, 2, 0).numpy())

    result = cli('--outdir', tmp_path / 'tensor')   # the default, as before: no granularity among the settings
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / 'tensor' / 'manifest.json').read_text())
    assert manifest['quantize_granularity'] == 'tensor' and 'quantize_granularity' not in manifest['settings']

    refused = cli('--outdir', tmp_path / 'tensor', '--quantize-granularity=channel')
    assert refused.exit_code != 0 and 'quantize_granularity' in refused.output, refused.output
    bad = cli('--outdir', tmp_path / 'bad', '--quantize-granularity=row')
    assert bad.exit_code != 0 and "'tensor', 'channel'" in bad.output, bad.output
    unquantized = runner.invoke(generate.main, ['--network', str(network), '--seeds=0', '--steps=2', '--outdir',
                                                str(tmp_path / 'none'), '--quantize-granularity=channel'])
    assert unquantized.exit_code == 2 and 'without --quantize-bits or --sweep-bits' in unquantized.output
    assert not (tmp_path / 'none').exists()
