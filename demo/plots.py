"""Charts and picture sheets for the demos and studies.

Charts go through matplotlib's Agg backend (no display needed): line charts with optional error bars and log axes,
the shapes studies report (metric against D, NFE, noise, with confidence intervals). Picture sheets are drawn
pixel-exact with Pillow: image tiles enlarged by nearest-neighbour with a gap between them, in captioned blocks, so
small images such as the 16x16 digits read as separate images.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import dnnlib

# A colour-blind-friendly palette (Okabe & Ito).
PALETTE = ['#0072B2', '#D55E00', '#009E73', '#CC79A7', '#E69F00', '#56B4E9', '#000000', '#F0E442']
CHART_SIZE_INCHES = (7.2, 4.4)
CHART_DPI = 100
GAP_COLOUR = 255        # white gaps between tiles: the digits are white on black
CAPTION_FONT_SIZE = 14  # pixels

#: A series is (xs, ys) or (xs, ys, yerr); yerr is one half-width per point or a (lower, upper) pair of arrays,
#: as matplotlib's errorbar takes them (e.g. the two sides of a bootstrap confidence interval).
Series = Union[tuple[Sequence[float], Sequence[float]],
               tuple[Sequence[float], Sequence[float], Union[Sequence[float], Sequence[Sequence[float]]]]]


def _pyplot():
    """matplotlib's pyplot on the Agg backend; one clear line when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError('plots need matplotlib: pip install -r requirements.txt (or pip install matplotlib)') \
            from None
    matplotlib.use('Agg', force=True)
    import matplotlib.pyplot as plt
    return plt


def line_chart(series: Mapping[str, Series], path: str, title: str = '', xlabel: str = '', ylabel: str = '',
               log_x: bool = False, log_y: bool = False, markers: Optional[bool] = None) -> str:
    """Write a PNG line chart: ``series`` maps a legend name to (xs, ys) or (xs, ys, yerr). Returns ``path``.

    Non-finite points are left out (and non-positive ones on a log axis), so a diverged run does not hide the
    others. ``markers`` defaults to on for series of at most 40 points. The file is written under a temporary
    name and renamed. Raises ValueError for series whose lengths disagree.
    """
    plt = _pyplot()
    from matplotlib import ticker
    fig, ax = plt.subplots(figsize=CHART_SIZE_INCHES, dpi=CHART_DPI)
    try:
        for index, (name, entry) in enumerate(series.items()):
            xs, ys = np.asarray(entry[0], dtype=np.float64), np.asarray(entry[1], dtype=np.float64)
            if xs.shape != ys.shape or xs.ndim != 1:
                raise ValueError(f'series {name!r}: {xs.shape[0] if xs.ndim else 0} x values and '
                                 f'{ys.shape[0] if ys.ndim else 0} y values; expected equal 1-D lists')
            keep = np.isfinite(xs) & np.isfinite(ys)
            if log_x:
                keep &= xs > 0
            if log_y:
                keep &= ys > 0
            yerr = None
            if len(entry) > 2 and entry[2] is not None:
                yerr = np.asarray(entry[2], dtype=np.float64)
                if yerr.shape[-1] != xs.shape[0] or yerr.ndim not in (1, 2):
                    raise ValueError(f'series {name!r}: yerr has shape {list(yerr.shape)}; expected [{xs.shape[0]}] '
                                     f'or [2, {xs.shape[0]}]')
                yerr = yerr[..., keep]
            show_markers = keep.sum() <= 40 if markers is None else markers
            ax.errorbar(xs[keep], ys[keep], yerr=yerr, label=name, color=PALETTE[index % len(PALETTE)],
                        marker='o' if show_markers else None, markersize=4, capsize=3 if yerr is not None else 0,
                        linewidth=1.6)
        for used, axis, set_scale in ((log_x, ax.xaxis, ax.set_xscale), (log_y, ax.yaxis, ax.set_yscale)):
            if used:
                set_scale('log')
                # Plain numbers (0.2, 0.5, 1) rather than powers of ten; minor ticks labelled on short ranges only.
                axis.set_major_formatter(ticker.LogFormatter(labelOnlyBase=False))
                axis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which='major', color='#e6e6e6')
        if series:
            ax.legend(frameon=False)
        fig.tight_layout()
        with dnnlib.util.atomic_write(path, 'wb') as f:
            fig.savefig(f, format='png')
    finally:
        plt.close(fig)
    return path


# ----------------------------------------------------------------------------
# Picture sheets.


def tile_grid(images: np.ndarray, cols: int, scale: int = 4, gap: int = 4) -> Image.Image:
    """Images uint8 [N, H, W] (gray) or [N, H, W, 3] as a grid of ``cols`` columns, each enlarged ``scale`` times
    by nearest-neighbour, with ``gap`` pixels of white around and between tiles.

    Size: width ``cols * W * scale + (cols + 1) * gap``, height likewise with ``ceil(N / cols)`` rows.
    Raises ValueError for an empty batch or non-positive sizes.
    """
    images = np.asarray(images)
    if images.ndim not in (3, 4) or images.shape[0] == 0 or images.dtype != np.uint8:
        raise ValueError(f'expected uint8 images [N, H, W] or [N, H, W, 3], got {images.dtype} {list(images.shape)}')
    if cols < 1 or scale < 1 or gap < 0:
        raise ValueError(f'cols={cols}, scale={scale}, gap={gap}: expected cols, scale >= 1 and gap >= 0')
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w = images.shape[:3]
    rows = math.ceil(n / cols)
    canvas = np.full([rows * h + (rows + 1) * gap, cols * w + (cols + 1) * gap, 3], GAP_COLOUR, dtype=np.uint8)
    for index, image in enumerate(images):
        top, left = gap + (index // cols) * (h + gap), gap + (index % cols) * (w + gap)
        canvas[top:top + h, left:left + w] = image
    return Image.fromarray(canvas, 'RGB')


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=CAPTION_FONT_SIZE)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def captioned_sheet(blocks: Sequence[tuple[str, Image.Image]], path: str, across: bool = False,
                    margin: int = 12) -> str:
    """Write ``blocks`` (caption, picture) stacked top to bottom (or left to right with ``across``), each caption
    above its picture. Written under a temporary name and renamed; returns ``path``."""
    font = _font()
    caption_height = CAPTION_FONT_SIZE + 8
    sizes = [(image.width, image.height + caption_height) for _, image in blocks]
    if across:
        width = sum(w for w, _ in sizes) + margin * (len(blocks) + 1)
        height = max(h for _, h in sizes) + 2 * margin
    else:
        width = max(w for w, _ in sizes) + 2 * margin
        height = sum(h for _, h in sizes) + margin * (len(blocks) + 1)
    sheet = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(sheet)
    x = y = margin
    for (caption, image), (w, h) in zip(blocks, sizes):
        draw.text((x, y), caption, fill='black', font=font)
        sheet.paste(image, (x, y + caption_height))
        if across:
            x += w + margin
        else:
            y += h + margin
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with dnnlib.util.atomic_write(path, 'wb') as f:
        sheet.save(f, format='png')
    return path
