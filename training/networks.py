"""U-Net architectures and preconditioners for EDM-style diffusion and PFGM++.

Architectures
    ``SongUNet``      DDPM++ (positional embedding, standard encoder) and NCSN++ (Fourier embedding, residual
                      encoder) from Song et al., "Score-Based Generative Modeling through SDEs".
    ``DhariwalUNet``  ADM from Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis".

Preconditioners (wrap an architecture, see ``forward``): ``VPPrecond``, ``VEPrecond``, ``iDDPMPrecond``,
``EDMPrecond``. Each computes ``D(x; sigma) = c_skip * x + c_out * F((c_in * x), c_noise)`` with its own
coefficients (``coefficients(sigma)``), and carries the PFGM++ attributes ``pfgmpp``, ``D`` (augmented dimensions)
and ``N`` (= C*H*W), which the loss and the samplers read.

Compatibility with NVIDIA's EDM code (and the PFGM++ fork of it) is part of the contract:

* Constructor keywords, their defaults, and the names and shapes of every parameter and buffer are the original's,
  so state dicts load with ``strict=True`` in either direction.
* Initial weights are drawn from the global torch generator in the original's order and with the same formulas,
  so ``torch.manual_seed(s)`` followed by construction gives bit-identical parameters.
* Quirks that are kept on purpose:
    - ADM attention uses ``out_channels // 64`` heads, so blocks narrower than 64 channels get no attention even at
      a resolution listed in ``attn_resolutions``.
    - Both U-Nets always put attention in the first block at the lowest resolution of the decoder (``*_in0``);
      SongUNet's decoder otherwise only attends in the last block of a listed resolution.
    - ``iDDPMPrecond.u`` is computed in float32 and includes ``u[M] = 0``; ``round_sigma`` snaps to the nearest
      entry of the whole grid (``torch.cdist`` distances, ties to the lower index), so very small sigmas map to
      index M and ``c_noise = -1``.
    - A 0-dim ``sigma`` becomes shape [1, 1, 1, 1]; the noise embedding then has batch 1 and broadcasts.
    - A conditional network called without ``class_labels`` uses a [1, label_dim] zero vector (SongUNet's
      ``map_label`` still contributes its bias).

Precision: the preconditioning always runs in float32. The U-Net runs in float16 with ``use_fp16`` or in bfloat16
with ``use_bf16``, but (as in the original) only for CUDA inputs, unless ``reduced_precision_on_cpu`` is set as
well. ``force_fp32=True`` in ``forward`` overrides both. Parameters stay float32 and are cast on the fly; the
noise/label mapping network stays float32. ``use_fp16``, ``use_bf16`` and ``reduced_precision_on_cpu`` are plain
attributes and may be changed after construction (for example on a network rebuilt from an old snapshot).

Self-attention goes through ``torch.nn.functional.scaled_dot_product_attention`` (the original used an explicit
softmax with a hand-written backward); both agree to float32 rounding.

This file is the model and nothing else: ``torch_utils.persistence`` embeds its source in every pickle, which must
import in the original code too, so it imports only torch and ``torch_utils.persistence``. Faster ways to compute
the same layers (prepacked oneDNN weights, bfloat16 workarounds, a cheaper dropout mask) are opt-in and installed
from outside by ``training/cpu_speed.py``, which overrides ``Conv2d._convolve``, ``Conv2d._resample``,
``GroupNorm.forward`` and ``UNetBlock._dropout``; those methods keep the meaning they have here.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from torch_utils import persistence

Tensor = torch.Tensor
silu = F.silu


# ----------------------------------------------------------------------------------------------------------------
# Initialisation.

# mode -> (numerator of the variance rule, fan_out counts too, uniform instead of normal)
_INIT_RULES = {
    'xavier_uniform': (6, True, True),
    'xavier_normal': (2, True, False),
    'kaiming_uniform': (3, False, True),
    'kaiming_normal': (1, False, False),
}


def initial_values(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> Tensor:
    """Draw an initial tensor of ``shape`` from the global torch generator.

    Uniform rules draw ``rand * 2 - 1`` and normal rules ``randn``; the draw is multiplied by
    ``sqrt(numerator / fan)`` where ``fan`` is ``fan_in + fan_out`` (Xavier) or ``fan_in`` (Kaiming) and the
    numerator is 6 / 2 (Xavier uniform / normal) or 3 / 1 (Kaiming uniform / normal).
    """
    if mode not in _INIT_RULES:
        raise ValueError(f'unknown init mode {mode!r}; expected one of {", ".join(sorted(_INIT_RULES))}')
    numerator, count_fan_out, uniform = _INIT_RULES[mode]
    fan = fan_in + fan_out if count_fan_out else fan_in
    noise = torch.rand(*shape) * 2 - 1 if uniform else torch.randn(*shape)
    return math.sqrt(numerator / fan) * noise


def _new_param(shape, gain, *, mode, fan_in, fan_out):
    """A freshly drawn parameter, scaled by ``gain`` after the draw (one RNG draw even when ``gain == 0``)."""
    return nn.Parameter(initial_values(shape, mode, fan_in, fan_out) * gain)


# ----------------------------------------------------------------------------------------------------------------
# Layers. Parameters are cast to the dtype of the input, which is how mixed precision works in these networks.


@persistence.persistent_class
class Linear(nn.Module):
    """Fully connected layer ``x @ weight.T + bias``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = 'kaiming_normal',
                 init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = _new_param([out_features, in_features], init_weight, **fans)
        self.bias = _new_param([out_features], init_bias, **fans) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def _separable_filter(taps):
    """Normalised 2-D FIR kernel of shape [1, 1, k, k] built as the outer product of ``taps``."""
    taps = torch.as_tensor(taps, dtype=torch.float32)
    return torch.outer(taps, taps)[None, None] / taps.sum().square()


def _depthwise(kernel, channels):
    return kernel.expand(channels, 1, -1, -1)


@persistence.persistent_class
class Conv2d(nn.Module):
    """2-D convolution with optional FIR up- or down-sampling by a factor of two.

    ``kernel=0`` gives a parameter-free resampling layer. With ``fused_resample`` the resampling and the
    convolution are done as one padded pair of convolutions (the NCSN++ residual encoder uses this for its
    down-sampling path).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False,
                 init_mode: str = 'kaiming_normal', init_weight: float = 1, init_bias: float = 0):
        if up and down:
            raise ValueError('Conv2d: up and down are mutually exclusive')
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        area = kernel * kernel
        fans = dict(mode=init_mode, fan_in=in_channels * area, fan_out=out_channels * area)
        self.weight = _new_param([out_channels, in_channels, kernel, kernel], init_weight, **fans) if kernel else None
        self.bias = _new_param([out_channels], init_bias, **fans) if (kernel and bias) else None
        self.register_buffer('resample_filter', _separable_filter(resample_filter) if (up or down) else None)

    def forward(self, x: Tensor) -> Tensor:
        if self.weight is not None and self.fused_resample and (self.up or self.down):
            return self._fused_resample_convolve(x)
        if self.up or self.down:
            x = self._resample(x)
        if self.weight is not None:
            return self._convolve(x)
        return x

    def _resample(self, x: Tensor) -> Tensor:
        f = self.resample_filter.to(x.dtype)
        pad = (f.shape[-1] - 1) // 2
        if self.down:
            return F.conv2d(x, _depthwise(f, self.in_channels), groups=self.in_channels, stride=2, padding=pad)
        return F.conv_transpose2d(x, _depthwise(f * 4, self.in_channels), groups=self.in_channels, stride=2,
                                  padding=pad)

    def _fused_resample_convolve(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        f = self.resample_filter.to(x.dtype)
        w_half, f_half = w.shape[-1] // 2, (f.shape[-1] - 1) // 2
        if self.up:
            up_kernel = _depthwise(f * 4, self.in_channels)
            x = F.conv_transpose2d(x, up_kernel, groups=self.in_channels, stride=2, padding=max(f_half - w_half, 0))
            return F.conv2d(x, w, b, padding=max(w_half - f_half, 0))
        x = F.conv2d(x, w, padding=w_half + f_half)
        x = F.conv2d(x, _depthwise(f, self.out_channels), groups=self.out_channels, stride=2)
        return x if b is None else x + b.reshape(1, -1, 1, 1)

    def _convolve(self, x: Tensor) -> Tensor:
        """The stride-1 convolution with this layer's weights (padded to keep the size)."""
        w = self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, w, b, padding=w.shape[-1] // 2)


@persistence.persistent_class
class GroupNorm(nn.Module):
    """Group normalisation with at most ``num_groups`` groups and at least ``min_channels_per_group`` channels each."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        most_groups = num_channels // min_channels_per_group
        self.num_groups = min(num_groups, most_groups)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        return F.group_norm(x, self.num_groups, self.weight.to(dtype), self.bias.to(dtype), self.eps)


# ----------------------------------------------------------------------------------------------------------------
# Residual U-Net block (the union of what DDPM++, NCSN++ and ADM need).


@persistence.persistent_class
class UNetBlock(nn.Module):
    """Pre-activation residual block with noise-embedding modulation and optional self-attention.

    ``adaptive_scale=True`` (ADM) modulates with ``norm1(h) * (1 + scale) + shift``; otherwise (DDPM++/NCSN++)
    the embedding is added before ``norm1``. The residual sum and the attention sum are each multiplied by
    ``skip_scale``. Attention heads: ``num_heads`` if given, else ``out_channels // channels_per_head``.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int,
                 up: bool = False, down: bool = False, attention: bool = False, num_heads: Optional[int] = None,
                 channels_per_head: int = 64, dropout: float = 0, skip_scale: float = 1, eps: float = 1e-5,
                 resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False, adaptive_scale: bool = True,
                 init: Optional[dict] = None, init_zero: Optional[dict] = None, init_attn: Optional[dict] = None):
        super().__init__()
        init = {} if init is None else init
        init_zero = dict(init_weight=0) if init_zero is None else init_zero
        init_attn = init if init_attn is None else init_attn
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = out_channels // channels_per_head if num_heads is None else num_heads
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale

        # Construction order fixes the order of the random draws; it is the original's.
        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample, **init)
        affine_width = out_channels * 2 if adaptive_scale else out_channels
        self.affine = Linear(in_features=emb_channels, out_features=affine_width, **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if up or down or in_channels != out_channels:
            projects = resample_proj or in_channels != out_channels
            self.skip = Conv2d(in_channels, out_channels, kernel=1 if projects else 0, **resample, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def _attend(self, x: Tensor) -> Tensor:
        """Multi-head self-attention over pixels; returns the mixed values before ``proj``.

        Channel layout of ``qkv`` (fixed by the original, and so by every trained checkpoint): output channel
        ``(head * channels_per_head + c) * 3 + j`` holds component ``j`` (q, k, v) of channel ``c`` of ``head``.
        """
        n, c, h, w = x.shape
        heads = self.num_heads
        qkv = self.qkv(self.norm2(x)).reshape(n, heads, c // heads, 3, h * w)
        # -> [3, n, heads, pixels, channels_per_head], one copy so that SDPA gets dense inputs.
        q, k, v = qkv.permute(3, 0, 1, 4, 2).contiguous().unbind(0)
        mixed = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(channels_per_head)) v
        # Dense NCHW result: a strided view would make later dropout masks (filled in memory order) differ
        # from the original's for the same seed.
        return mixed.transpose(-1, -2).reshape(n, c, h, w).contiguous()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        shortcut = x if self.skip is None else self.skip(x)
        h = self.conv0(silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = silu(self.norm1(h + params))
        h = self.conv1(self._dropout(h))
        x = self._scaled(h + shortcut)
        if self.num_heads:
            x = self._scaled(self.proj(self._attend(x)) + x)
        return x

    def _dropout(self, x: Tensor) -> Tensor:
        return F.dropout(x, p=self.dropout, training=self.training)

    def _scaled(self, x: Tensor) -> Tensor:
        return x if self.skip_scale == 1 else x * self.skip_scale  # x * 1 would be an exact no-op pass


# ----------------------------------------------------------------------------------------------------------------
# Noise-level embeddings.


@persistence.persistent_class
class PositionalEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding ``[cos(x f), sin(x f)]`` with ``f_i = max_positions^(-i/d)``.

    ``d`` is ``num_channels // 2``, or one less with ``endpoint=True`` (DDPM++), so the last frequency is exactly
    ``1 / max_positions``.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        exponent = torch.arange(half, dtype=torch.float32, device=x.device) / (half - int(bool(self.endpoint)))
        freqs = (1 / self.max_positions) ** exponent
        angles = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


@persistence.persistent_class
class FourierEmbedding(nn.Module):
    """Random Fourier features ``[cos(2 pi x f), sin(2 pi x f)]`` with ``f ~ N(0, scale^2)`` (NCSN++)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        freqs = torch.randn(num_channels // 2) * scale
        self.register_buffer('freqs', freqs)

    def forward(self, x: Tensor) -> Tensor:
        angles = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared by the two U-Nets.


def _swap_halves(emb):
    """[a, b] -> [b, a] along channels (SongUNet orders its noise embedding as sin, cos)."""
    first, second = emb.chunk(2, dim=1)
    return torch.cat([second, first], dim=1)


def _maybe_drop_labels(module, labels, batch, device):
    """Classifier-free guidance training: zero whole label vectors with probability ``module.label_dropout``."""
    if not (module.training and module.label_dropout):
        return labels
    keep = torch.rand([batch, 1], device=device) >= module.label_dropout
    return labels * keep.to(labels.dtype)


def check_unet_depth(img_resolution: int, channel_mult: Sequence[int]) -> None:
    """Raise ValueError unless a U-Net with ``len(channel_mult)`` levels can process ``img_resolution``-sided images.

    Both U-Nets enter every level after the first through a stride-2 down-sampling, which maps a side s to
    floor(s / 2), and leave it through an up-sampling that doubles the side back before the encoder's skip
    connection of that level is concatenated. The two sides agree only if s was even, so the side must stay even
    through all ``len(channel_mult) - 1`` halvings: ``img_resolution`` a multiple of 2**(levels - 1) (any such
    side works, powers of two or not; the lowest level may be 1x1).
    """
    halvings = len(channel_mult) - 1
    multiple = 1 << max(halvings, 0)
    if img_resolution < 1:
        raise ValueError(f'the image side must be a positive integer, got {img_resolution}')
    if img_resolution % multiple == 0:
        return
    sides, side = [str(img_resolution)], img_resolution
    while len(sides) <= halvings and side % 2 == 0 and side > 0:
        side //= 2
        sides.append(str(side))
    raise ValueError(f'{len(channel_mult)} resolution levels halve the image side {halvings} times, so it must be a '
                     f'multiple of {multiple}, but {img_resolution}x{img_resolution} images give sides '
                     f'{" -> ".join(sides)}, which is odd before the next halving')


def _levels(img_resolution, channel_mult):
    """(level, multiplier, 'RxR' name prefix) for every resolution level, finest first."""
    for level in range(len(channel_mult)):
        side = img_resolution >> level
        yield level, channel_mult[level], f'{side}x{side}'


def _side(tag):
    return int(tag.split('x', 1)[0])


def _role(name):
    """'16x16_aux_skip' -> 'aux_skip': the part of a U-Net layer name after its resolution tag."""
    return name.split('_', 1)[1]


def _plus_augment(module, emb, augment_labels):
    """Add the augmentation-label mapping when the network has one and labels were given."""
    if augment_labels is None or module.map_augment is None:
        return emb
    return emb + module.map_augment(augment_labels)


def _as_tensor(value):
    """``torch.as_tensor`` that leaves tensors where they are (even under a default-device context)."""
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


# ----------------------------------------------------------------------------------------------------------------
# DDPM++ / NCSN++.


@persistence.persistent_class
class SongUNet(nn.Module):
    """DDPM++ and NCSN++ U-Nets (a port of score_sde_pytorch's architectures, as in EDM).

    DDPM++: ``embedding_type='positional', channel_mult_noise=1, encoder_type='standard', resample_filter=[1,1]``.
    NCSN++: ``embedding_type='fourier', channel_mult_noise=2, encoder_type='residual', resample_filter=[1,3,3,1]``.
    ``encoder_type='skip'`` / ``decoder_type='skip'`` add the input/output image pyramids of the original paper.
    """

    def __init__(self,
                 img_resolution: int,             # Side of the (square) input and output images.
                 in_channels: int,                # Image channels in.
                 out_channels: int,               # Image channels out.
                 label_dim: int = 0,              # Class-label dimensionality, 0 for unconditional.
                 augment_dim: int = 0,            # Augmentation-label dimensionality, 0 for none.
                 model_channels: int = 128,       # Channel count at multiplier 1.
                 channel_mult: Sequence[int] = (1, 2, 2, 2),  # Channel multiplier of each resolution level.
                 channel_mult_emb: int = 4,       # Embedding width = model_channels * channel_mult_emb.
                 num_blocks: int = 4,             # Residual blocks per level in the encoder (+1 in the decoder).
                 attn_resolutions: Sequence[int] = (16,),  # Resolutions whose blocks attend.
                 dropout: float = 0.10,           # Dropout inside the residual blocks.
                 label_dropout: float = 0,        # Probability of dropping the class label while training.
                 embedding_type: str = 'positional',  # 'positional' (DDPM++) or 'fourier' (NCSN++).
                 channel_mult_noise: int = 1,     # Noise-embedding width = model_channels * channel_mult_noise.
                 encoder_type: str = 'standard',  # 'standard', 'skip' or 'residual'.
                 decoder_type: str = 'standard',  # 'standard' or 'skip'.
                 resample_filter: Sequence[float] = (1, 1),  # FIR taps for up/down-sampling.
                 ):
        for value, allowed, what in ((embedding_type, ('fourier', 'positional'), 'embedding_type'),
                                     (encoder_type, ('standard', 'skip', 'residual'), 'encoder_type'),
                                     (decoder_type, ('standard', 'skip'), 'decoder_type')):
            if value not in allowed:
                raise ValueError(f'SongUNet: {what} must be one of {allowed}, got {value!r}')
        check_unet_depth(img_resolution, channel_mult)
        super().__init__()
        self.label_dropout = float(label_dropout)
        emb_width = model_channels * channel_mult_emb
        noise_width = model_channels * channel_mult_noise
        xavier = dict(init_mode='xavier_uniform')
        near_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        attn_init = dict(init_mode='xavier_uniform', init_weight=math.sqrt(0.2))

        def block(cin, cout, **extra):
            return UNetBlock(in_channels=cin, out_channels=cout, emb_channels=emb_width, num_heads=1,
                             dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6, resample_filter=resample_filter,
                             resample_proj=True, adaptive_scale=False, init=xavier, init_zero=near_zero,
                             init_attn=attn_init, **extra)

        # Mapping network (noise level, class label, augmentation label -> embedding).
        if embedding_type == 'positional':
            self.map_noise = PositionalEmbedding(noise_width, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_width)
        self.map_label = Linear(label_dim, noise_width, **xavier) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_width, bias=False, **xavier) if augment_dim else None
        self.map_layer0 = Linear(noise_width, emb_width, **xavier)
        self.map_layer1 = Linear(emb_width, emb_width, **xavier)

        # Encoder. `width` follows the main path, `aux_width` the input-image path of the skip/residual encoders.
        levels = list(_levels(img_resolution, channel_mult))
        enc = {}
        width = aux_width = in_channels
        for level, mult, tag in levels:
            if level == 0:
                enc[f'{tag}_conv'] = Conv2d(width, model_channels, kernel=3, **xavier)
                width = model_channels
            else:
                enc[f'{tag}_down'] = block(width, width, down=True)
                if encoder_type == 'skip':
                    enc[f'{tag}_aux_down'] = Conv2d(aux_width, aux_width, kernel=0, down=True,
                                                    resample_filter=resample_filter)
                    enc[f'{tag}_aux_skip'] = Conv2d(aux_width, width, kernel=1, **xavier)
                elif encoder_type == 'residual':
                    enc[f'{tag}_aux_residual'] = Conv2d(aux_width, width, kernel=3, down=True,
                                                        resample_filter=resample_filter, fused_resample=True,
                                                        **xavier)
                    aux_width = width
            attend = _side(tag) in attn_resolutions
            for idx in range(num_blocks):
                enc[f'{tag}_block{idx}'] = block(width, model_channels * mult, attention=attend)
                width = model_channels * mult
        self.enc = nn.ModuleDict(list(enc.items()))
        skip_widths = [layer.out_channels for name, layer in enc.items() if 'aux' not in name]

        # Decoder.
        dec = {}
        for level, mult, tag in reversed(levels):
            if level == len(levels) - 1:
                dec[f'{tag}_in0'] = block(width, width, attention=True)
                dec[f'{tag}_in1'] = block(width, width)
            else:
                dec[f'{tag}_up'] = block(width, width, up=True)
            last = num_blocks  # only the last block of a level may attend
            for idx in range(last + 1):
                cin = width + skip_widths.pop()
                width = model_channels * mult
                dec[f'{tag}_block{idx}'] = block(cin, width, attention=idx == last and _side(tag) in attn_resolutions)
            has_output_head = decoder_type == 'skip' or level == 0
            if has_output_head:
                if decoder_type == 'skip' and level < len(levels) - 1:
                    dec[f'{tag}_aux_up'] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                  resample_filter=resample_filter)
                dec[f'{tag}_aux_norm'] = GroupNorm(width, eps=1e-6)
                dec[f'{tag}_aux_conv'] = Conv2d(width, out_channels, kernel=3, **near_zero)
        self.dec = nn.ModuleDict(list(dec.items()))

    def _embedding(self, noise_labels, class_labels, augment_labels, batch, device):
        emb = _swap_halves(self.map_noise(noise_labels))
        if self.map_label is not None:
            labels = _maybe_drop_labels(self, class_labels, batch, device)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        emb = _plus_augment(self, emb, augment_labels)
        return silu(self.map_layer1(silu(self.map_layer0(emb))))

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Optional[Tensor],
                augment_labels: Optional[Tensor] = None) -> Tensor:
        emb = self._embedding(noise_labels, class_labels, augment_labels, x.shape[0], x.device)

        skips = []
        aux = x
        for name, layer in self.enc.items():
            role = _role(name)
            if role == 'aux_down':
                aux = layer(aux)
            elif role == 'aux_skip':
                x = x + layer(aux)
                skips[-1] = x
            elif role == 'aux_residual':
                x = (x + layer(aux)) / math.sqrt(2)
                skips[-1] = aux = x
            else:
                x = layer(x) if role == 'conv' else layer(x, emb)
                skips.append(x)

        out = None
        head = None
        for name, layer in self.dec.items():
            role = _role(name)
            if role == 'aux_up':
                out = layer(out)
            elif role == 'aux_norm':
                head = layer(x)
            elif role == 'aux_conv':
                head = layer(silu(head))
                out = head if out is None else head + out
            else:
                if role.startswith('block'):
                    x = torch.cat((x, skips.pop()), 1)
                x = layer(x, emb)
        return out


# ----------------------------------------------------------------------------------------------------------------
# ADM.


@persistence.persistent_class
class DhariwalUNet(nn.Module):
    """ADM U-Net (a port of openai/guided-diffusion, as in EDM). Attention heads are ``channels // 64``."""

    def __init__(self,
                 img_resolution: int,             # Side of the (square) input and output images.
                 in_channels: int,                # Image channels in.
                 out_channels: int,               # Image channels out.
                 label_dim: int = 0,              # Class-label dimensionality, 0 for unconditional.
                 augment_dim: int = 0,            # Augmentation-label dimensionality, 0 for none.
                 model_channels: int = 192,       # Channel count at multiplier 1.
                 channel_mult: Sequence[int] = (1, 2, 3, 4),  # Channel multiplier of each resolution level.
                 channel_mult_emb: int = 4,       # Embedding width = model_channels * channel_mult_emb.
                 num_blocks: int = 3,             # Residual blocks per level in the encoder (+1 in the decoder).
                 attn_resolutions: Sequence[int] = (32, 16, 8),  # Resolutions whose blocks attend (if wide enough).
                 dropout: float = 0.10,           # Dropout inside the residual blocks.
                 label_dropout: float = 0,        # Probability of dropping the class label while training.
                 ):
        check_unet_depth(img_resolution, channel_mult)
        super().__init__()
        self.label_dropout = float(label_dropout)
        emb_width = model_channels * channel_mult_emb
        gain = math.sqrt(1 / 3)
        uniform = dict(init_mode='kaiming_uniform', init_weight=gain, init_bias=gain)
        zeros = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)

        def block(cin, cout, **extra):
            return UNetBlock(in_channels=cin, out_channels=cout, emb_channels=emb_width, channels_per_head=64,
                             dropout=dropout, init=uniform, init_zero=zeros, **extra)

        # Mapping network.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **zeros) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_width, **uniform)
        self.map_layer1 = Linear(emb_width, emb_width, **uniform)
        self.map_label = None
        if label_dim:
            self.map_label = Linear(label_dim, emb_width, bias=False, init_mode='kaiming_normal',
                                    init_weight=math.sqrt(label_dim))

        # Encoder.
        levels = list(_levels(img_resolution, channel_mult))
        enc = {}
        width = in_channels
        for level, mult, tag in levels:
            if level == 0:
                enc[f'{tag}_conv'] = Conv2d(width, model_channels * mult, kernel=3, **uniform)
                width = model_channels * mult
            else:
                enc[f'{tag}_down'] = block(width, width, down=True)
            attend = _side(tag) in attn_resolutions
            for idx in range(num_blocks):
                enc[f'{tag}_block{idx}'] = block(width, model_channels * mult, attention=attend)
                width = model_channels * mult
        self.enc = nn.ModuleDict(list(enc.items()))
        skip_widths = [layer.out_channels for layer in enc.values()]

        # Decoder.
        dec = {}
        num_blocks_up = num_blocks + 1
        for level, mult, tag in reversed(levels):
            if level == len(levels) - 1:
                dec[f'{tag}_in0'] = block(width, width, attention=True)
                dec[f'{tag}_in1'] = block(width, width)
            else:
                dec[f'{tag}_up'] = block(width, width, up=True)
            attend = _side(tag) in attn_resolutions
            for idx in range(num_blocks_up):
                cin = width + skip_widths.pop()
                width = model_channels * mult
                dec[f'{tag}_block{idx}'] = block(cin, width, attention=attend)
        self.dec = nn.ModuleDict(list(dec.items()))
        self.out_norm = GroupNorm(width)
        self.out_conv = Conv2d(width, out_channels, kernel=3, **zeros)

    def _embedding(self, noise_labels, class_labels, augment_labels, batch, device):
        emb = _plus_augment(self, self.map_noise(noise_labels), augment_labels)
        emb = self.map_layer1(silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(_maybe_drop_labels(self, class_labels, batch, device))
        return silu(emb)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Optional[Tensor],
                augment_labels: Optional[Tensor] = None) -> Tensor:
        emb = self._embedding(noise_labels, class_labels, augment_labels, x.shape[0], x.device)
        skips = []
        for name, layer in self.enc.items():
            x = layer(x) if _role(name) == 'conv' else layer(x, emb)
            skips.append(x)
        for name, layer in self.dec.items():
            if _role(name).startswith('block'):
                x = torch.cat((x, skips.pop()), 1)
            x = layer(x, emb)
        return self.out_conv(silu(self.out_norm(x)))


ARCHITECTURES = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet}

# ----------------------------------------------------------------------------------------------------------------
# Preconditioning.


class _Preconditioner(nn.Module):
    """What the four preconditioners share: attributes, dtype policy, label handling and the forward pass.

    Subclasses define ``coefficients(sigma) -> (c_skip, c_out, c_in, c_noise)`` for ``sigma`` of shape
    [B, 1, 1, 1] (float32), and may override ``_denoiser_output`` to pick channels of the raw network output.
    """

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, use_bf16, reduced_precision_on_cpu,
                 pfgmpp, D):
        super().__init__()
        if use_fp16 and use_bf16:
            raise ValueError(f'{type(self).__name__}: use_fp16 and use_bf16 cannot both be set')
        # The kernel is validated where it is defined; imported here, not at load time, so that the pickled source
        # of this module still loads where training/pfgmpp.py does not exist (the original code).
        from training.pfgmpp import flags_D
        try:
            flags_D(pfgmpp, D)
        except ValueError as err:
            raise ValueError(f'{type(self).__name__}: {err}') from None
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.use_bf16 = use_fp16, use_bf16
        self.reduced_precision_on_cpu = reduced_precision_on_cpu
        self.pfgmpp, self.D = pfgmpp, D
        self.N = img_channels * img_resolution ** 2

    def _make_model(self, model_type, out_channels, model_kwargs):
        if model_type not in ARCHITECTURES:
            raise ValueError(f'{type(self).__name__}: unknown model_type {model_type!r}; '
                             f'expected one of {", ".join(ARCHITECTURES)}')
        return ARCHITECTURES[model_type](img_resolution=self.img_resolution, in_channels=self.img_channels,
                                         out_channels=out_channels, label_dim=self.label_dim, **model_kwargs)

    def unet_dtype(self, device: Union[str, torch.device], force_fp32: bool = False) -> torch.dtype:
        """The dtype the U-Net runs in for inputs on ``device`` (see the module docstring)."""
        device = torch.device(device)
        if force_fp32 or not (device.type == 'cuda' or self.reduced_precision_on_cpu):
            return torch.float32
        if self.use_bf16:
            return torch.bfloat16
        if self.use_fp16:
            return torch.float16
        return torch.float32

    def _labels(self, class_labels, device):
        if not self.label_dim:
            return None
        if class_labels is None:
            return torch.zeros([1, self.label_dim], device=device)
        return class_labels.to(torch.float32).reshape(-1, self.label_dim)

    def _denoiser_output(self, raw):
        return raw

    def forward(self, x: Tensor, sigma: Union[Tensor, float], class_labels: Optional[Tensor] = None,
                force_fp32: bool = False, **model_kwargs: Any) -> Tensor:
        """Denoised estimate D(x; sigma) in float32.

        ``sigma`` may be a tensor of shape [B] (or anything with B elements) or a scalar; extra keyword arguments
        (``augment_labels``) go to the U-Net.
        """
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        labels = self._labels(class_labels, x.device)
        dtype = self.unet_dtype(x.device, force_fp32)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        raw = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=labels, **model_kwargs)
        if raw.dtype != dtype:
            raise RuntimeError(f'{type(self).__name__}: the U-Net returned {raw.dtype}, expected {dtype}')
        return c_skip * x + c_out * self._denoiser_output(raw).to(torch.float32)

    def round_sigma(self, sigma: Union[Tensor, float]) -> Tensor:
        """Noise levels the network supports; continuous preconditioners return ``sigma`` unchanged."""
        return torch.as_tensor(sigma)


def vp_sigma(t: Union[torch.Tensor, float], beta_d: float, beta_min: float,
             expm1: bool = True) -> Union[torch.Tensor, float]:
    """Noise level sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) of the VP schedule (EDM paper, Table 1).

    ``t``: a tensor (computed in its dtype and on its device) or a Python number (computed in float64 with ``math``,
    returns a float). ``beta_d``, ``beta_min``: the schedule's extent and initial slope.
    ``expm1=False`` evaluates exp() - 1 as the original EDM code does: in float32 its rounding fixes
    ``VPPrecond.sigma_min`` and the sigmas ``VPLoss`` draws, so those two keep it; the samplers use the accurate expm1.
    """
    exponent = 0.5 * beta_d * t ** 2 + beta_min * t
    if isinstance(exponent, torch.Tensor):
        return (exponent.expm1() if expm1 else exponent.exp() - 1).sqrt()
    return math.sqrt(math.expm1(exponent) if expm1 else math.exp(exponent) - 1)


def vp_sigma_inv(sigma: torch.Tensor, beta_d: float, beta_min: float) -> torch.Tensor:
    """Inverse of :func:`vp_sigma`: t = (sqrt(beta_min^2 + 2 beta_d log(sigma^2 + 1)) - beta_min) / beta_d."""
    root = (beta_min ** 2 + 2 * beta_d * (sigma ** 2 + 1).log()).sqrt()
    return (root - beta_min) / beta_d


def iddpm_alpha_bar(j: torch.Tensor, M: int, C_2: float) -> torch.Tensor:
    """alpha_bar(j) = sin^2(pi/2 * j / M / (C_2 + 1)) of improved DDPM's cosine schedule (Nichol & Dhariwal 2021)."""
    return (0.5 * math.pi * j / M / (C_2 + 1)).sin() ** 2


def iddpm_noise_levels(M: int, C_1: float, C_2: float, device: Union[str, torch.device] = 'cpu',
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The M + 1 noise levels u[0] > ... > u[M] = 0 of improved DDPM (EDM paper, Table 1), shape [M + 1].

    Backward recursion u[j-1] = sqrt((u[j]^2 + 1) / max(alpha_bar(j-1) / alpha_bar(j), C_1) - 1) from u[M] = 0,
    one scalar at a time in ``dtype`` on the CPU, then moved to ``device``. ``iDDPMPrecond`` keeps its buffer in
    float32 (the original's arithmetic), the ablation sampler works in float64.
    """
    grid = torch.zeros(M + 1, dtype=dtype, device='cpu')
    for j in range(M, 0, -1):
        steps = torch.as_tensor([j - 1, j], dtype=dtype, device='cpu')
        ratio = (iddpm_alpha_bar(steps[0], M, C_2) / iddpm_alpha_bar(steps[1], M, C_2)).clip(min=C_1)
        grid[j - 1] = ((grid[j] ** 2 + 1) / ratio - 1).sqrt()
    return grid.to(device)


@persistence.persistent_class
class VPPrecond(_Preconditioner):
    """Variance-preserving (VP) preconditioning of Song et al.: ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``.

    c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = (M - 1) * sigma^-1(sigma).
    """

    def __init__(self,
                 img_resolution: int,             # Image side.
                 img_channels: int,               # Image channels.
                 label_dim: int = 0,              # Class-label dimensionality, 0 for unconditional.
                 use_fp16: bool = False,          # Run the U-Net in float16 (CUDA inputs only, see module doc).
                 beta_d: float = 19.9,            # Extent of the noise schedule.
                 beta_min: float = 0.1,           # Initial slope of the noise schedule.
                 M: int = 1000,                   # Number of DDPM time steps.
                 epsilon_t: float = 1e-5,         # Smallest t seen in training.
                 model_type: str = 'SongUNet',    # Architecture class name.
                 pfgmpp=False,                    # PFGM++ training/sampling (sets the meaning of D).
                 D=128,                           # PFGM++ augmented dimensions.
                 use_bf16: bool = False,          # Run the U-Net in bfloat16 (CUDA inputs only, see module doc).
                 reduced_precision_on_cpu: bool = False,  # Also apply use_fp16/use_bf16 to CPU inputs.
                 **model_kwargs: Any,             # Passed to the architecture.
                 ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, use_bf16, reduced_precision_on_cpu,
                         pfgmpp, D)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        # Schedule constants on the CPU, so construction also works under a `torch.device('meta')` context.
        self.sigma_min = float(self.sigma(torch.as_tensor(epsilon_t, device='cpu')))
        self.sigma_max = float(self.sigma(torch.as_tensor(1, device='cpu')))
        self.model = self._make_model(model_type, img_channels, model_kwargs)

    def coefficients(self, sigma: Tensor) -> tuple:
        c_in = 1 / (sigma.square() + 1).sqrt()
        c_noise = self.sigma_inv(sigma) * (self.M - 1)
        return 1, -sigma, c_in, c_noise

    def sigma(self, t):
        return vp_sigma(_as_tensor(t), self.beta_d, self.beta_min, expm1=False)

    def sigma_inv(self, sigma):
        return vp_sigma_inv(_as_tensor(sigma), self.beta_d, self.beta_min)


@persistence.persistent_class
class VEPrecond(_Preconditioner):
    """Variance-exploding (VE) preconditioning: c_skip = 1, c_out = sigma, c_in = 1, c_noise = log(sigma / 2)."""

    def __init__(self,
                 img_resolution: int,             # Image side.
                 img_channels: int,               # Image channels.
                 label_dim: int = 0,              # Class-label dimensionality, 0 for unconditional.
                 use_fp16: bool = False,          # Run the U-Net in float16 (CUDA inputs only, see module doc).
                 sigma_min: float = 0.02,         # Smallest supported noise level.
                 sigma_max: float = 100,          # Largest supported noise level.
                 model_type: str = 'SongUNet',    # Architecture class name.
                 pfgmpp=False,                    # PFGM++ training/sampling (sets the meaning of D).
                 D=128,                           # PFGM++ augmented dimensions.
                 use_bf16: bool = False,          # Run the U-Net in bfloat16 (CUDA inputs only, see module doc).
                 reduced_precision_on_cpu: bool = False,  # Also apply use_fp16/use_bf16 to CPU inputs.
                 **model_kwargs: Any,             # Passed to the architecture.
                 ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, use_bf16, reduced_precision_on_cpu,
                         pfgmpp, D)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.model = self._make_model(model_type, img_channels, model_kwargs)

    def coefficients(self, sigma: Tensor) -> tuple:
        return 1, sigma, 1, (0.5 * sigma).log()


@persistence.persistent_class
class iDDPMPrecond(_Preconditioner):
    """Improved-DDPM preconditioning on the discrete noise levels ``u[0] > ... > u[M-1] > u[M] = 0``.

    c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = M - 1 - j where ``u[j]`` is the grid
    point nearest to sigma. The U-Net has 2 * img_channels outputs (mean and variance in the original model);
    only the first img_channels are used.
    """

    def __init__(self,
                 img_resolution: int,             # Image side.
                 img_channels: int,               # Image channels.
                 label_dim: int = 0,              # Class-label dimensionality, 0 for unconditional.
                 use_fp16: bool = False,          # Run the U-Net in float16 (CUDA inputs only, see module doc).
                 C_1: float = 0.001,              # Time-step adjustment at low noise levels.
                 C_2: float = 0.008,              # Time-step adjustment at high noise levels.
                 M: int = 1000,                   # Number of DDPM time steps.
                 model_type: str = 'DhariwalUNet',  # Architecture class name.
                 pfgmpp=False,                    # PFGM++ training/sampling (sets the meaning of D).
                 D=128,                           # PFGM++ augmented dimensions.
                 use_bf16: bool = False,          # Run the U-Net in bfloat16 (CUDA inputs only, see module doc).
                 reduced_precision_on_cpu: bool = False,  # Also apply use_fp16/use_bf16 to CPU inputs.
                 **model_kwargs: Any,             # Passed to the architecture.
                 ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, use_bf16, reduced_precision_on_cpu,
                         pfgmpp, D)
        self.C_1, self.C_2, self.M = C_1, C_2, M
        self.model = self._make_model(model_type, img_channels * 2, model_kwargs)
        self.register_buffer('u', self._noise_grid())
        self.sigma_min = float(self.u[M - 1])
        self.sigma_max = float(self.u[0])

    def _noise_grid(self):
        # float32 on the CPU: the grid is a buffer of every checkpoint, so it must equal the original's bit for bit.
        return iddpm_noise_levels(self.M, self.C_1, self.C_2, dtype=torch.float32)

    def alpha_bar(self, j):
        return iddpm_alpha_bar(_as_tensor(j), self.M, self.C_2)

    def coefficients(self, sigma: Tensor) -> tuple:
        c_in = 1 / (sigma.square() + 1).sqrt()
        index = self.round_sigma(sigma, return_index=True).to(torch.float32)
        return 1, -sigma, c_in, (self.M - 1) - index

    def _denoiser_output(self, raw):
        return raw[:, :self.img_channels]

    def round_sigma(self, sigma: Union[Tensor, float], return_index: bool = False) -> Tensor:
        """Nearest grid value (or its index with ``return_index``), same shape and device as ``sigma``."""
        sigma = torch.as_tensor(sigma)
        query = sigma.to(device=self.u.device, dtype=torch.float32).reshape(1, -1, 1)
        index = torch.cdist(query, self.u.reshape(1, -1, 1)).argmin(2)
        picked = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return picked.reshape(sigma.shape).to(sigma.device)


@persistence.persistent_class
class EDMPrecond(_Preconditioner):
    """EDM preconditioning (Karras et al. 2022), also used by PFGM++ (which conditions on sigma, not r).

    c_skip = s^2 / (sigma^2 + s^2), c_out = sigma s / sqrt(sigma^2 + s^2), c_in = 1 / sqrt(sigma^2 + s^2),
    c_noise = log(sigma) / 4, with s = sigma_data.
    """

    def __init__(self,
                 img_resolution: int,             # Image side.
                 img_channels: int,               # Image channels.
                 label_dim: int = 0,              # Class-label dimensionality, 0 for unconditional.
                 use_fp16: bool = False,          # Run the U-Net in float16 (CUDA inputs only, see module doc).
                 sigma_min: float = 0,            # Smallest supported noise level.
                 sigma_max: float = float('inf'),  # Largest supported noise level.
                 sigma_data: float = 0.5,         # Standard deviation of the training data.
                 model_type: str = 'DhariwalUNet',  # Architecture class name.
                 pfgmpp=False,                    # PFGM++ training/sampling (sets the meaning of D).
                 D=128,                           # PFGM++ augmented dimensions.
                 use_bf16: bool = False,          # Run the U-Net in bfloat16 (CUDA inputs only, see module doc).
                 reduced_precision_on_cpu: bool = False,  # Also apply use_fp16/use_bf16 to CPU inputs.
                 **model_kwargs: Any,             # Passed to the architecture.
                 ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, use_bf16, reduced_precision_on_cpu,
                         pfgmpp, D)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.model = self._make_model(model_type, img_channels, model_kwargs)

    def coefficients(self, sigma: Tensor) -> tuple:
        s2 = self.sigma_data ** 2
        total = sigma.square() + s2
        c_skip = s2 / total
        c_out = sigma * self.sigma_data / total.sqrt()
        c_in = 1 / total.sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4
