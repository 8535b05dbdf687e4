"""The demos' charts (matplotlib, Agg) and picture sheets (tiles with gaps, enlarged pixel-exact)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from demo.plots import GAP_COLOUR, captioned_sheet, line_chart, tile_grid


def test_line_chart_writes_png_with_error_bars_and_log_axes(tmp_path):
    path = tmp_path / 'chart.png'
    series = {'D=128': ([1, 10, 100], [30.0, 12.0, 5.0], [2.0, 1.0, 0.5]),
              'D=inf': ([1, 10, 100], [32.0, float('nan'), 6.0], ([1, 1, 1], [2, 2, 2])),
              'plain': ([1, 10, 100], [0.0, 8.0, 4.0])}  # a zero cannot sit on a log axis: left out
    assert line_chart(series, str(path), title='t', xlabel='NFE', ylabel='FD', log_x=True, log_y=True) == str(path)
    with Image.open(path) as image:
        assert image.format == 'PNG' and image.width > 200 and image.height > 100
    assert [p.name for p in tmp_path.iterdir()] == ['chart.png']  # no temporary file left behind


def test_line_chart_rejects_mismatched_series(tmp_path):
    with pytest.raises(ValueError, match='series'):
        line_chart({'bad': ([1, 2, 3], [1, 2])}, str(tmp_path / 'x.png'))
    with pytest.raises(ValueError, match='yerr'):
        line_chart({'bad': ([1, 2, 3], [1, 2, 3], [1, 2])}, str(tmp_path / 'x.png'))
    assert not (tmp_path / 'x.png').exists()


@pytest.mark.parametrize('count,cols,scale,gap', [(100, 10, 4, 4), (7, 3, 2, 1), (5, 5, 1, 0)])
def test_tile_grid_layout(count, cols, scale, gap):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 200, [count, 16, 12], dtype=np.uint8)  # non-square, never the white of the gaps
    grid = np.asarray(tile_grid(images, cols, scale=scale, gap=gap))
    rows = -(-count // cols)
    assert grid.shape == (rows * 16 * scale + (rows + 1) * gap, cols * 12 * scale + (cols + 1) * gap, 3)
    for index in (0, count - 1):
        top, left = gap + (index // cols) * (16 * scale + gap), gap + (index % cols) * (12 * scale + gap)
        tile = grid[top:top + 16 * scale, left:left + 12 * scale, 0]
        np.testing.assert_array_equal(tile, images[index].repeat(scale, 0).repeat(scale, 1))  # nearest-neighbour
    if gap:
        assert (grid[:gap] == GAP_COLOUR).all() and (grid[:, :gap] == GAP_COLOUR).all()
        column_gap = gap + 12 * scale
        assert (grid[:, column_gap:column_gap + gap] == GAP_COLOUR).all()


def test_tile_grid_rejects_bad_input():
    with pytest.raises(ValueError, match='uint8'):
        tile_grid(np.zeros([4, 8, 8], dtype=np.float32), 2)
    with pytest.raises(ValueError, match='cols'):
        tile_grid(np.zeros([4, 8, 8], dtype=np.uint8), 0)


def test_captioned_sheet_stacks_blocks(tmp_path):
    a = tile_grid(np.zeros([10, 16, 16], dtype=np.uint8), 10, scale=4)
    b = tile_grid(np.zeros([100, 16, 16], dtype=np.uint8), 10, scale=4)
    down, across = tmp_path / 'down.png', tmp_path / 'across.png'
    captioned_sheet([('Real', a), ('Samples', b)], str(down))
    captioned_sheet([('Real', a), ('Samples', b)], str(across), across=True)
    with Image.open(down) as image:
        assert image.width > b.width and image.height > a.height + b.height
    with Image.open(across) as image:
        assert image.width > a.width + b.width and b.height < image.height < a.height + b.height
