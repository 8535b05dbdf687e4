"""Non-leaking data augmentation (EDM), with augmentation labels for the network.

Every transform is drawn independently per image and applied with probability ``p * <transform multiplier>``.
Alongside the augmented batch the pipe returns, per image, a vector that describes what was applied (zero
means "not applied"); the network is conditioned on it (``augment_dim``), so it learns the clean
distribution and augmentation does not leak into the samples, which are generated with labels all zero.

With the settings of ``train.py`` (``xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1``)
the label vector has 9 entries, in this order:

====  =========================================================
0     x-flip applied (0/1); ``xflip=1e8`` makes the flip a fair coin for every image
1     y-flip applied (0/1)
2     isotropic scale: the normal draw ``w``; scale = 2**(w * scale_std)
3, 4  rotation angle ``a``: ``cos(a) - 1``, ``sin(a)``
5, 6  anisotropic scale ``w`` along angle ``r``: ``w cos(r)``, ``w sin(r)``; scales 2**(±w * aniso_std)
7, 8  translation in units of ``translate_frac_std`` × image size: ``tx``, ``ty``
====  =========================================================

Enabling ``rotate_int``/``translate_int`` inserts two entries each after the flips, and the colour transforms
(``brightness``, ``contrast``, ``lumaflip``, ``hue``, ``saturation``) append 1, 1, 1, 2, 1 entries at the end.

Geometric transforms are resampled without aliasing: the image is mirror-padded as far as the transform can
reach, upsampled 2x with the ``sym6`` wavelet low-pass filter, warped with bilinear sampling and filtered back
down. All random numbers come from the ``generator`` passed to :meth:`AugmentPipe.__call__` (the global torch
generator when it is None), which is what makes training resumable bit for bit.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from torch_utils import persistence

Scalar = Union[float, torch.Tensor]

#: Low-pass filter used for the 2x up/down-sampling around the warp (Daubechies symlet with 6 vanishing moments).
SYM6_LOWPASS = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057,
    -0.048311742585633, 0.4910559419267466, 0.787641141030194,
    0.3379294217276218, -0.07263752278646252, -0.021060292512300564,
    0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)
#: Extra border (in pixels of the input) that the filter needs on each side.
FILTER_BORDER = len(SYM6_LOWPASS) // 4
#: Unit vector of the luma axis in homogeneous RGB coordinates.
_LUMA = (1 / math.sqrt(3),) * 3 + (0.0,)

# ----------------------------------------------------------------------------
# Batched homogeneous matrices. Entries may be Python numbers or [N] tensors.


def _stack_matrix(rows: list[list[Scalar]], n: int, device: torch.device) -> torch.Tensor:
    """An [n, R, C] tensor from a nested list of scalars and [n] tensors."""
    flat = [e if isinstance(e, torch.Tensor) else torch.full([n], float(e), device=device)
            for row in rows for e in row]
    return torch.stack(flat, dim=-1).reshape(n, len(rows), len(rows[0]))


def shift2d(tx: Scalar, ty: Scalar, n: int, device: torch.device) -> torch.Tensor:
    return _stack_matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], n, device)


def scale2d(sx: Scalar, sy: Scalar, n: int, device: torch.device) -> torch.Tensor:
    return _stack_matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], n, device)


def rotation2d(angle: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    c, s = angle.cos(), angle.sin()
    return _stack_matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], n, device)


def shift3d(t: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    return _stack_matrix([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], n, device)


def scale3d(s: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    return _stack_matrix([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], n, device)


def rotation3d_about_luma(angle: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """Rotation by ``angle`` around the grey axis (Rodrigues' formula), homogeneous 4x4."""
    v = torch.tensor(_LUMA[:3], device=device)
    c, s = angle.cos()[:, None, None], angle.sin()[:, None, None]
    # Cross-product matrix of v; all components of v are equal, so it is v_x times a fixed pattern.
    cross = _LUMA[0] * torch.tensor([[0.0, -1, 1], [1, 0, -1], [-1, 1, 0]], device=device)
    rot = c * torch.eye(3, device=device) + s * cross + (1 - c) * torch.outer(v, v)
    out = torch.eye(4, device=device).repeat(n, 1, 1)
    out[:, :3, :3] = rot
    return out


# ----------------------------------------------------------------------------


@persistence.persistent_class
class AugmentPipe:
    """Per-image random augmentation returning ``(images, augment_labels)``; see the module docstring.

    ``p`` scales every probability; each ``<name>`` argument is that transform's probability multiplier
    (0 disables it and removes its label entries). The remaining arguments set the transform magnitudes
    (standard deviations in log2 units for scales, fractions of a full turn for rotations, fractions of the
    image size for translations).
    """

    def __init__(self, p: float = 1,
                 xflip: float = 0, yflip: float = 0, rotate_int: float = 0, translate_int: float = 0,
                 translate_int_max: float = 0.125,
                 scale: float = 0, rotate_frac: float = 0, aniso: float = 0, translate_frac: float = 0,
                 scale_std: float = 0.2, rotate_frac_max: float = 1, aniso_std: float = 0.2,
                 aniso_rotate_prob: float = 0.5, translate_frac_std: float = 0.125,
                 brightness: float = 0, contrast: float = 0, lumaflip: float = 0, hue: float = 0,
                 saturation: float = 0, brightness_std: float = 0.2, contrast_std: float = 0.5, hue_max: float = 1,
                 saturation_std: float = 1):
        super().__init__()
        settings = dict(locals())
        for key in ('self', '__class__'):
            settings.pop(key, None)
        for key, value in settings.items():
            value = float(value)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f'AugmentPipe: {key} must be a finite number >= 0, got {value}')
            setattr(self, key, value)

    @property
    def label_dim(self) -> int:
        """Length of the augmentation label vector this configuration produces."""
        sizes = dict(xflip=1, yflip=1, rotate_int=2, translate_int=2, scale=1, rotate_frac=2, aniso=2,
                     translate_frac=2, brightness=1, contrast=1, lumaflip=1, hue=2, saturation=1)
        return sum(size for name, size in sizes.items() if getattr(self, name) > 0)

    # -- random draws ---------------------------------------------------------

    def _chosen(self, multiplier: float, shape: list[int], ref: torch.Tensor,
                generator: Optional[torch.Generator]) -> torch.Tensor:
        """Boolean mask: which images get this transform (probability ``multiplier * p``)."""
        return torch.rand(shape, device=ref.device, generator=generator) < multiplier * self.p

    @staticmethod
    def _uniform(shape: list[int], ref: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Uniform on [-1, 1)."""
        return torch.rand(shape, device=ref.device, generator=generator) * 2 - 1

    @staticmethod
    def _normal(shape: list[int], ref: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        return torch.randn(shape, device=ref.device, generator=generator)

    # -- main entry -------------------------------------------------------------

    def __call__(self, images: torch.Tensor, generator: Optional[torch.Generator] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 4:
            raise ValueError(f'AugmentPipe expects NCHW images, got shape {list(images.shape)}')
        n, channels, height, width = images.shape
        dev = images.device
        labels: list[torch.Tensor] = []
        zero = torch.zeros([], device=dev)

        # Pixel blitting: exact, no resampling.
        for flag, dim in (('xflip', 3), ('yflip', 2)):
            multiplier = getattr(self, flag)
            if multiplier > 0:
                coin = torch.randint(2, [n, 1, 1, 1], device=dev, generator=generator)
                coin = torch.where(self._chosen(multiplier, [n, 1, 1, 1], images, generator), coin, 0)
                images = torch.where(coin == 1, images.flip(dim), images)
                labels.append(coin)

        if self.rotate_int > 0:
            quarter = torch.randint(4, [n, 1, 1, 1], device=dev, generator=generator)
            quarter = torch.where(self._chosen(self.rotate_int, [n, 1, 1, 1], images, generator), quarter, 0)
            flip_x = (quarter == 1) | (quarter == 2)
            flip_y = (quarter == 2) | (quarter == 3)
            images = torch.where(flip_x, images.flip(3), images)
            images = torch.where(flip_y, images.flip(2), images)
            images = torch.where((quarter == 1) | (quarter == 3), images.transpose(2, 3), images)
            labels += [flip_x, flip_y]

        if self.translate_int > 0:
            offset = self._uniform([2, n, 1, 1, 1], images, generator)
            offset = torch.where(self._chosen(self.translate_int, [1, n, 1, 1, 1], images, generator), offset, 0)
            tx = (offset[0] * (width * self.translate_int_max)).round().to(torch.int64)
            ty = (offset[1] * (height * self.translate_int_max)).round().to(torch.int64)
            images = self._roll_mirrored(images, tx, ty)
            labels += [tx / (width * self.translate_int_max), ty / (height * self.translate_int_max)]

        # Geometric transforms: build the inverse map output -> input, in pixels about the image centre.
        inverse = None

        def then(step: torch.Tensor) -> None:
            nonlocal inverse
            inverse = step if inverse is None else inverse @ step

        if self.scale > 0:
            w = self._normal([n], images, generator)
            w = torch.where(self._chosen(self.scale, [n], images, generator), w, zero)
            factor = torch.exp2(w * self.scale_std)
            then(scale2d(1 / factor, 1 / factor, n, dev))
            labels.append(w)

        if self.rotate_frac > 0:
            angle = self._uniform([n], images, generator) * (math.pi * self.rotate_frac_max)
            angle = torch.where(self._chosen(self.rotate_frac, [n], images, generator), angle, zero)
            then(rotation2d(angle, n, dev))
            labels += [angle.cos() - 1, angle.sin()]

        if self.aniso > 0:
            w = self._normal([n], images, generator)
            frame = self._uniform([n], images, generator) * math.pi
            w = torch.where(self._chosen(self.aniso, [n], images, generator), w, zero)
            frame = torch.where(torch.rand([n], device=dev, generator=generator) < self.aniso_rotate_prob,
                                frame, zero)
            factor = torch.exp2(w * self.aniso_std)
            then(rotation2d(-frame, n, dev) @ scale2d(1 / factor, factor, n, dev) @ rotation2d(frame, n, dev))
            labels += [w * frame.cos(), w * frame.sin()]

        if self.translate_frac > 0:
            w = self._normal([2, n], images, generator)
            w = torch.where(self._chosen(self.translate_frac, [1, n], images, generator), w, zero)
            then(shift2d(-w[0] * (width * self.translate_frac_std), -w[1] * (height * self.translate_frac_std), n,
                         dev))
            labels += [w[0], w[1]]

        if inverse is not None:
            images = self._warp(images, inverse)

        # Colour transforms: a 4x4 matrix on homogeneous RGB.
        color = None

        def then_color(step: torch.Tensor) -> None:
            nonlocal color
            color = step if color is None else step @ color

        if self.brightness > 0:
            w = self._normal([n], images, generator)
            w = torch.where(self._chosen(self.brightness, [n], images, generator), w, zero)
            then_color(shift3d(w * self.brightness_std, n, dev))
            labels.append(w)

        if self.contrast > 0:
            w = self._normal([n], images, generator)
            w = torch.where(self._chosen(self.contrast, [n], images, generator), w, zero)
            then_color(scale3d(torch.exp2(w * self.contrast_std), n, dev))
            labels.append(w)

        luma = torch.tensor(_LUMA, device=dev)
        luma_proj = torch.outer(luma, luma)
        eye4 = torch.eye(4, device=dev)
        if self.lumaflip > 0:
            coin = torch.randint(2, [n, 1, 1], device=dev, generator=generator)
            coin = torch.where(self._chosen(self.lumaflip, [n, 1, 1], images, generator), coin, 0)
            then_color(eye4 - 2 * luma_proj * coin)
            labels.append(coin)

        if self.hue > 0:
            angle = self._uniform([n], images, generator) * (math.pi * self.hue_max)
            angle = torch.where(self._chosen(self.hue, [n], images, generator), angle, zero)
            then_color(rotation3d_about_luma(angle, n, dev))
            labels += [angle.cos() - 1, angle.sin()]

        if self.saturation > 0:
            w = self._normal([n, 1, 1], images, generator)
            w = torch.where(self._chosen(self.saturation, [n, 1, 1], images, generator), w, zero)
            then_color(luma_proj + (eye4 - luma_proj) * torch.exp2(w * self.saturation_std))
            labels.append(w)

        if color is not None:
            images = self._apply_color(images, color)

        if not labels:
            return images, torch.zeros([n, 0], device=dev)
        return images, torch.cat([t.to(torch.float32).reshape(n, -1) for t in labels], dim=1)

    # -- execution helpers ----------------------------------------------------

    @staticmethod
    def _roll_mirrored(images: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
        """Integer translation by (tx, ty) per image, filling with the mirror image (no edge repeat)."""
        n, channels, height, width = images.shape
        dev = images.device
        xs = torch.arange(width, device=dev).view(1, 1, 1, width) - tx
        ys = torch.arange(height, device=dev).view(1, 1, height, 1) + ty
        # Reflect into [0, size-1] with period 2*(size-1).
        xs = (width - 1) - ((width - 1) - xs % (2 * width - 2)).abs()
        ys = (height - 1) - ((height - 1) - ys % (2 * height - 2)).abs()
        xs = xs.expand(n, channels, height, width)
        ys = ys.expand(n, channels, height, width)
        return _gather_xy(images, xs, ys)

    @staticmethod
    def _warp(images: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        """Resample ``images`` with the per-image inverse map (pixels about the centre), without aliasing."""
        n, channels, height, width = images.shape
        dev, dtype = images.device, images.dtype
        cx, cy = (width - 1) / 2, (height - 1) / 2

        # How far outside the image the transformed corners reach decides the mirror padding.
        corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], device=dev)
        reach = (inverse @ corners.t())[:, :2, :]                       # [n, xy, corner]
        reach = reach.permute(1, 0, 2).flatten(1)                       # [xy, n * corner]
        reach = torch.cat([-reach, reach]).amax(dim=1)                  # [left, top, right, bottom]
        reach = reach + torch.tensor([2 * FILTER_BORDER - cx, 2 * FILTER_BORDER - cy] * 2, device=dev)
        limit = torch.tensor([width - 1, height - 1] * 2, device=dev, dtype=reach.dtype)
        reach = torch.minimum(reach.clamp(min=0), limit)
        left, top, right, bottom = (int(v) for v in reach.ceil().to(torch.int64).tolist())

        images = F.pad(images, [left, right, top, bottom], mode='reflect')
        inverse = shift2d((left - right) / 2, (top - bottom) / 2, n, dev) @ inverse

        # 2x upsampling: zero insertion, then the low-pass filter along each axis.
        taps = torch.tensor(SYM6_LOWPASS, dtype=dtype, device=dev)
        images = _upsample_axis(images, taps.flip(0), axis=3)
        images = _upsample_axis(images, taps.flip(0), axis=2)
        # Same map in the coordinates of the 2x grid (pixel centres sit half a pixel off the old ones).
        inverse = scale2d(2, 2, n, dev) @ inverse @ scale2d(0.5, 0.5, n, dev)
        inverse = shift2d(-0.5, -0.5, n, dev) @ inverse @ shift2d(0.5, 0.5, n, dev)

        # Warp into a canvas with FILTER_BORDER spare pixels per side (at 2x), in affine_grid's [-1, 1] units.
        out_h, out_w = (height + 2 * FILTER_BORDER) * 2, (width + 2 * FILTER_BORDER) * 2
        to_unit = scale2d(2 / images.shape[3], 2 / images.shape[2], n, dev)
        from_unit = scale2d(out_w / 2, out_h / 2, n, dev)
        theta = (to_unit @ inverse @ from_unit)[:, :2, :]
        grid = F.affine_grid(theta, [n, channels, out_h, out_w], align_corners=False)
        images = F.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)

        # Filter and decimate back to the input size, dropping the spare border.
        images = _downsample_axis(images, taps, axis=3)[:, :, :, FILTER_BORDER:-FILTER_BORDER]
        images = _downsample_axis(images, taps, axis=2)[:, :, FILTER_BORDER:-FILTER_BORDER, :]
        return images

    @staticmethod
    def _apply_color(images: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
        n, channels, height, width = images.shape
        flat = images.reshape(n, channels, height * width)
        if channels == 3:
            flat = color[:, :3, :3] @ flat + color[:, :3, 3:]
        elif channels == 1:
            rows = color[:, :3, :].mean(dim=1, keepdim=True)            # grey in, grey out
            flat = flat * rows[:, :, :3].sum(dim=2, keepdim=True) + rows[:, :, 3:]
        else:
            raise ValueError(f'colour augmentation needs 1 or 3 channels, got {channels}')
        return flat.reshape(n, channels, height, width)


def _gather_xy(images: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """``out[b, c, y, x] = images[b, c, ys[b, c, y, x], xs[b, c, y, x]]``."""
    n, channels, height, width = images.shape
    flat_index = ys * width + xs
    return images.reshape(n, channels, height * width).gather(2, flat_index.reshape(n, channels, -1)).reshape(
        n, channels, height, width)


def _upsample_axis(images: torch.Tensor, taps: torch.Tensor, axis: int) -> torch.Tensor:
    """Insert a zero after every sample along ``axis`` (dropping the last), then filter along that axis."""
    channels = images.shape[1]
    interleaved = torch.stack([images, torch.zeros_like(images)], dim=axis + 1).flatten(axis, axis + 1)
    interleaved = interleaved.narrow(axis, 0, interleaved.shape[axis] - 1)
    pad = (len(taps) + 1) // 2
    if axis == 3:
        weight, padding = taps.view(1, 1, 1, -1), [0, pad]
    else:
        weight, padding = taps.view(1, 1, -1, 1), [pad, 0]
    return F.conv2d(interleaved, weight.repeat(channels, 1, 1, 1), groups=channels, padding=padding)


def _downsample_axis(images: torch.Tensor, taps: torch.Tensor, axis: int) -> torch.Tensor:
    """Filter along ``axis`` and keep every second sample."""
    channels = images.shape[1]
    pad = (len(taps) - 1) // 2
    if axis == 3:
        weight, padding, stride = taps.view(1, 1, 1, -1), [0, pad], [1, 2]
    else:
        weight, padding, stride = taps.view(1, 1, -1, 1), [pad, 0], [2, 1]
    return F.conv2d(images, weight.repeat(channels, 1, 1, 1), groups=channels, stride=stride, padding=padding)
