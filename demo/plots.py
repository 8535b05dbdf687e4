"""Dependency-free charts for the demos: line plots drawn with Pillow.

matplotlib would be the usual choice, but the demo must run on a bare CPU machine with
only the project's requirements, so a small hand-rolled chart is the cheaper dependency.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

# A colour-blind-friendly palette (Okabe & Ito).
PALETTE = ['#0072B2', '#D55E00', '#009E73', '#CC79A7', '#E69F00', '#56B4E9', '#000000', '#F0E442']


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw), default=raw)
    first = math.ceil(lo / step) * step
    ticks = []
    value = first
    while value <= hi + 1e-9 * step:
        ticks.append(round(value, 12))
        value += step
    return ticks


def line_chart(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str, title: str = '',
               xlabel: str = '', ylabel: str = '', log_y: bool = False, size: tuple[int, int] = (720, 440)) -> None:
    """Write a PNG line chart: ``series`` maps a legend name to (xs, ys)."""
    width, height = size
    left, right, top, bottom = 70, 160, 40, 50
    image = Image.new('RGB', size, 'white')
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()

    def transform_y(v: float) -> float:
        return math.log10(v) if log_y else v

    points = [(x, transform_y(y)) for xs, ys in series.values() for x, y in zip(xs, ys)
              if math.isfinite(y) and (not log_y or y > 0)]
    if not points:
        points = [(0.0, 0.0), (1.0, 1.0)]
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    if y_hi == y_lo:
        y_hi = y_lo + 1
    pad = 0.05 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)
        py = height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)
        return px, py

    # Axes, ticks and grid.
    draw.rectangle([left, top, width - right, height - bottom], outline='black')
    for tick in _nice_ticks(x_lo, x_hi):
        px, _ = to_px(tick, y_lo)
        draw.line([px, top, px, height - bottom], fill='#e6e6e6')
        draw.text((px - 10, height - bottom + 5), f'{tick:g}', fill='black', font=font)
    for tick in _nice_ticks(y_lo, y_hi):
        _, py = to_px(x_lo, tick)
        draw.line([left, py, width - right, py], fill='#e6e6e6')
        label = f'{10 ** tick:.3g}' if log_y else f'{tick:.3g}'
        draw.text((5, py - 6), label, fill='black', font=font)

    for index, (name, (xs, ys)) in enumerate(series.items()):
        colour = PALETTE[index % len(PALETTE)]
        pixels = [to_px(x, transform_y(y)) for x, y in zip(xs, ys) if math.isfinite(y) and (not log_y or y > 0)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels if len(pixels) <= 40 else []:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        ly = top + 10 + 18 * index
        draw.line([width - right + 10, ly + 6, width - right + 30, ly + 6], fill=colour, width=3)
        draw.text((width - right + 35, ly), name, fill='black', font=font)

    draw.text((left, 12), title, fill='black', font=font)
    draw.text(((left + width - right) // 2 - 3 * len(xlabel), height - 22), xlabel, fill='black', font=font)
    draw.text((5, top - 18), ylabel, fill='black', font=font)
    image.save(path)


def side_by_side(paths: Sequence[str], captions: Sequence[str], out_path: str, gap: int = 16, scale: int = 1) -> None:
    """Place images next to each other with a caption above each one, enlarged ``scale`` times (pixel-exact)."""
    images = [Image.open(p).convert('RGB') for p in paths]
    images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    caption_height = 20
    width = sum(im.width for im in images) + gap * (len(images) + 1)
    height = max(im.height for im in images) + caption_height + 2 * gap
    canvas = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(canvas)
    x = gap
    for im, caption in zip(images, captions):
        draw.text((x, gap // 2), caption, fill='black', font=ImageFont.load_default())
        canvas.paste(im, (x, gap + caption_height))
        x += im.width + gap
    canvas.save(out_path)
