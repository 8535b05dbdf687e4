"""training/augment.py: each transform happens with its probability, and the labels say what happened."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from training.augment import AugmentPipe

TRAIN_SETTINGS = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)  # as train.py sets them
RES = 16
CENTRE = (RES - 1) / 2


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _blobs(n: int, dx: float = 2.5, dy: float = -1.5, width: float = 1.2) -> torch.Tensor:
    """One Gaussian blob per image (3 equal channels) at (dx, dy) pixels from the centre, on a zero background."""
    ys, xs = torch.meshgrid(torch.arange(RES, dtype=torch.float64), torch.arange(RES, dtype=torch.float64),
                            indexing='ij')
    blob = torch.exp(-((xs - CENTRE - dx) ** 2 + (ys - CENTRE - dy) ** 2) / (2 * width ** 2))
    return blob.to(torch.float32).expand(n, 3, RES, RES).clone()


def _centroid_near(images: torch.Tensor, where: torch.Tensor, radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre of mass (x, y, relative to the image centre) and mass of channel 0 within ``radius`` of ``where``.

    Looking only near the expected place keeps out the mirror-padded copies of the blob that large motions
    bring into view; the mass check makes sure the blob really is there.
    """
    ys, xs = torch.meshgrid(torch.arange(RES, dtype=torch.float64) - CENTRE,
                            torch.arange(RES, dtype=torch.float64) - CENTRE, indexing='ij')
    near = ((xs - where[:, 0, None, None]) ** 2 + (ys - where[:, 1, None, None]) ** 2) <= radius[:, None, None] ** 2
    w = images[:, 0].clamp(min=0).double() * near
    mass = w.sum(dim=(1, 2))
    centre = torch.stack([(w * xs).sum(dim=(1, 2)), (w * ys).sum(dim=(1, 2))], dim=1) / mass[:, None]
    return centre, mass


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    c, s = angle.cos().double(), angle.sin().double()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def test_train_settings_give_nine_labels_and_zero_labels_mean_identity():
    pipe = AugmentPipe(p=0.12, **TRAIN_SETTINGS)
    assert pipe.label_dim == 9
    images = torch.rand(200, 3, RES, RES, generator=_gen(0)) * 2 - 1
    out, labels = pipe(images, generator=_gen(1))
    assert out.shape == images.shape and labels.shape == (200, 9) and labels.dtype == torch.float32
    untouched = labels[:, 1:].abs().sum(dim=1) == 0
    assert untouched.sum() > 50
    expected = torch.where(labels[:, 0].view(-1, 1, 1, 1) == 1, images.flip(3), images)
    # The 2x filter round trip reconstructs the image up to float rounding.
    assert (out[untouched] - expected[untouched]).abs().max() < 1e-4


def test_each_transform_happens_with_its_probability():
    n, p = 3000, 0.12
    pipe = AugmentPipe(p=p, **TRAIN_SETTINGS)
    _, labels = pipe(torch.zeros(n, 3, 8, 8), generator=_gen(2))
    applied = {
        'xflip': labels[:, 0] != 0, 'yflip': labels[:, 1] != 0, 'scale': labels[:, 2] != 0,
        'rotate_frac': labels[:, 4] != 0, 'aniso': labels[:, 5:7].abs().sum(1) != 0,
        'translate_frac': labels[:, 7:9].abs().sum(1) != 0,
    }
    # xflip's multiplier 1e8 makes every image eligible and the flip itself a fair coin; yflip is eligible with
    # probability p and then also a fair coin; the others are applied with probability p.
    expected = dict(xflip=0.5, yflip=p / 2, scale=p, rotate_frac=p, aniso=p, translate_frac=p)
    for name, q in expected.items():
        rate = applied[name].double().mean().item()
        assert abs(rate - q) < 5 * math.sqrt(q * (1 - q) / n), (name, rate, q)
    # Independent decisions: two transforms together about p^2 of the time.
    both = (applied['scale'] & applied['translate_frac']).double().mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p / n)


def test_label_values_follow_their_distributions():
    n = 4000
    pipe = AugmentPipe(p=1, scale=1, rotate_frac=1, translate_frac=1)
    _, labels = pipe(torch.zeros(n, 1, 8, 8), generator=_gen(3))
    scale_w, cos_m1, sin, tx, ty = labels.double().unbind(1)
    for w in (scale_w, tx, ty):  # standard normal draws
        assert abs(w.mean().item()) < 0.1 and abs(w.std().item() - 1) < 0.06
    angle = torch.atan2(sin, cos_m1 + 1)  # uniform on (-pi, pi)
    assert abs(angle.mean().item()) < 0.1
    assert abs(angle.std().item() - math.pi / math.sqrt(3)) < 0.06
    assert torch.allclose(cos_m1, angle.cos() - 1, atol=1e-6)


def test_flip_labels_match_the_pixels():
    images = torch.rand(64, 3, RES, RES, generator=_gen(4))
    out, labels = AugmentPipe(p=1, xflip=1, yflip=1)(images, generator=_gen(5))
    for k in range(64):
        expected = images[k]
        if labels[k, 0] == 1:
            expected = expected.flip(2)
        if labels[k, 1] == 1:
            expected = expected.flip(1)
        assert torch.equal(out[k], expected)
    assert 0 < labels[:, 0].sum() < 64 and 0 < labels[:, 1].sum() < 64


@pytest.mark.parametrize('kind', ['scale', 'rotate_frac', 'aniso', 'translate_frac'])
def test_geometric_labels_describe_the_applied_motion(kind: str):
    n = 48
    start = torch.tensor([2.5, -1.5], dtype=torch.float64)
    options = {kind: 1}
    if kind == 'aniso':
        options['aniso_rotate_prob'] = 0  # the frame angle is then 0 and the label is (w, 0)
    out, labels = AugmentPipe(p=1, **options)(_blobs(n), generator=_gen(6))
    labels = labels.double()
    if kind == 'scale':
        s = torch.exp2(labels[:, 0] * 0.2)
        predicted, area, stretch = start * s[:, None], s ** 2, s
    elif kind == 'rotate_frac':
        angle = torch.atan2(labels[:, 1], labels[:, 0] + 1)
        predicted = _rotation(-angle) @ start  # the warp maps output to input by R(angle)
        area = stretch = torch.ones(n)
    elif kind == 'aniso':
        assert torch.all(labels[:, 1] == 0)
        s = torch.exp2(labels[:, 0] * 0.2)
        predicted = torch.stack([start[0] * s, start[1] / s], dim=1)
        area, stretch = torch.ones(n), torch.maximum(s, 1 / s)
    else:
        predicted = start + labels * RES * 0.125
        area = stretch = torch.ones(n)
    keep = predicted.abs().max(dim=1).values < CENTRE - 3  # the blob must stay inside the image
    assert keep.sum() > n // 2
    width = 1.2  # of the blob, see _blobs
    centre, mass = _centroid_near(out, predicted, radius=3 * width * stretch)
    blob_mass = 2 * math.pi * width ** 2  # integral of the Gaussian blob
    assert torch.all(mass[keep] > 0.9 * blob_mass * area[keep])
    error = (centre - predicted)[keep].norm(dim=1)
    assert error.max() < 0.2, error.max()
    # And the motion is real: the blobs do move.
    assert (predicted - start).norm(dim=1).max() > 1


def test_colour_transforms_and_their_labels():
    images = torch.rand(32, 3, 8, 8, generator=_gen(7)) * 2 - 1
    out, labels = AugmentPipe(p=1, brightness=1)(images, generator=_gen(8))
    assert torch.allclose(out, images + labels.view(-1, 1, 1, 1) * 0.2, atol=1e-6)
    out, labels = AugmentPipe(p=1, contrast=1)(images, generator=_gen(8))
    assert torch.allclose(out, images * torch.exp2(labels.view(-1, 1, 1, 1) * 0.5), atol=1e-5)
    out, labels = AugmentPipe(p=1, lumaflip=1)(images, generator=_gen(8))
    grey = images.mean(dim=1, keepdim=True)
    flipped = images - 2 * grey  # reflect through the plane orthogonal to the grey axis
    assert torch.allclose(out, torch.where(labels.view(-1, 1, 1, 1) == 1, flipped, images), atol=1e-5)
    # Hue rotation keeps the grey level and the distance from grey.
    out, labels = AugmentPipe(p=1, hue=1)(images, generator=_gen(8))
    assert torch.allclose(out.mean(dim=1), grey[:, 0], atol=1e-5)
    assert torch.allclose((out - out.mean(1, keepdim=True)).norm(dim=1), (images - grey).norm(dim=1), atol=1e-5)
    out, labels = AugmentPipe(p=1, saturation=1)(images, generator=_gen(8))
    assert torch.allclose(out, grey + (images - grey) * torch.exp2(labels.view(-1, 1, 1, 1)), atol=1e-5)
    # Single-channel images take the averaged colour transform.
    out, labels = AugmentPipe(p=1, brightness=1, contrast=1)(images[:, :1], generator=_gen(9))
    assert out.shape == (32, 1, 8, 8) and labels.shape == (32, 2)


def test_integer_blits():
    images = torch.rand(16, 3, 8, 8, generator=_gen(10))
    out, labels = AugmentPipe(p=1, rotate_int=1)(images, generator=_gen(11))
    for k in range(16):
        assert any(torch.equal(out[k], torch.rot90(images[k], r, dims=(1, 2))) for r in range(4))
    out, labels = AugmentPipe(p=1, translate_int=1)(images, generator=_gen(12))
    for k in range(16):
        tx, ty = (labels[k] * 8 * 0.125).round().long().tolist()
        x_src = [abs(x - tx) if x - tx < 8 else 14 - (x - tx) for x in range(8)]
        y_src = [abs(y + ty) if y + ty < 8 else 14 - (y + ty) for y in range(8)]
        assert torch.equal(out[k], images[k][:, y_src][:, :, x_src])


def test_generator_makes_it_reproducible_and_pickle_roundtrip():
    pipe = AugmentPipe(p=0.5, **TRAIN_SETTINGS)
    images = torch.rand(8, 3, 8, 8, generator=_gen(13))
    a = pipe(images, generator=_gen(14))
    b = pipe(images, generator=_gen(14))
    c = pipe(images, generator=_gen(15))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    clone = pickle.loads(pickle.dumps(pipe))
    d = clone(images, generator=_gen(14))
    assert torch.equal(a[0], d[0]) and clone.label_dim == 9


def test_bad_arguments():
    with pytest.raises(ValueError, match='scale'):
        AugmentPipe(scale=-1)
    with pytest.raises(ValueError, match='NCHW'):
        AugmentPipe(xflip=1)(torch.zeros(3, 8, 8))
    assert AugmentPipe()(torch.zeros(2, 3, 4, 4))[1].shape == (2, 0)
