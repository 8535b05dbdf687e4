"""Cost of the metrics past the detector pass (evaluation/metrics.py) on synthetic features, and the spread of FD, KID
and precision/recall over repeated draws of n images, set against the bootstrap interval from one draw.

Features are Gaussian with a decaying spectrum (Inception-like dimension 2048 by default), the "generated" set
slightly shifted; nothing here is a claim about real images. Prints figures; never asserts.

    python bench/bench_metrics.py --num=2000 --dim=2048 --device=cpu
    python bench/bench_metrics.py --num=50000 --device=cuda --bootstrap=20 --draws=5
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation import metrics


def _draw(rng: np.random.Generator, num: int, scales: np.ndarray, shift: float) -> np.ndarray:
    return (rng.normal(size=(num, scales.shape[0])) * scales + shift).astype(np.float32)


def _seconds(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, value


@click.command()
@click.option('--num', help='Images per set', type=click.IntRange(min=10), default=2000, show_default=True)
@click.option('--dim', help='Feature dimension', type=click.IntRange(min=2), default=2048, show_default=True)
@click.option('--device', type=click.Choice(['cpu', 'cuda']), default='cpu', show_default=True)
@click.option('--bootstrap', help='Bootstrap resamples', type=click.IntRange(min=0), default=10, show_default=True)
@click.option('--draws', help='Independent generated sets for the spread', type=click.IntRange(min=1), default=3,
              show_default=True)
@click.option('--shift', help='Mean shift of the generated features', type=float, default=0.05, show_default=True)
@click.option('--json', 'json_path', help='Also write the figures here', type=str, default=None)
def main(num: int, dim: int, device: str, bootstrap: int, draws: int, shift: float, json_path: str | None) -> None:
    torch.set_grad_enabled(False)
    rng = np.random.default_rng(0)
    scales = 1.0 / np.sqrt(1 + np.arange(dim))
    real = _draw(rng, num, scales, 0.0)
    mu, sigma = metrics.feature_moments(real)
    ref = dict(mu=mu, sigma=sigma, features=real)
    names = ['fid', 'kid', 'pr']
    figures: dict[str, object] = dict(num=num, dim=dim, device=device, torch=torch.__version__,
                                      threads=torch.get_num_threads())
    values = []
    for draw in range(draws):
        gen = _draw(rng, num, scales, shift)
        g_mu, g_sigma = metrics.feature_moments(gen)
        features = {metrics.INCEPTION: metrics.Features(g_mu, g_sigma, num, gen)}
        seconds = {}
        seconds['fd'], fd = _seconds(lambda: metrics.frechet_distance(g_mu, g_sigma, mu, sigma))
        seconds['kid'], kid = _seconds(lambda: metrics.kernel_inception_distance(gen, real, np.random.default_rng(0),
                                                                                device=device))
        seconds['pr'], pr = _seconds(lambda: metrics.precision_recall(gen, real, device=device))
        values.append(dict(fid=fd, kid=kid, precision=pr[0], recall=pr[1]))
        if draw == 0:
            figures['seconds'] = seconds
            if bootstrap:
                elapsed, intervals = _seconds(lambda: metrics.bootstrap_intervals(names, features, ref, bootstrap,
                                                                                  device=device))
                figures['bootstrap'] = dict(resamples=bootstrap, seconds_per_resample=elapsed / bootstrap,
                                            intervals=intervals)
        print(f'draw {draw}: ' + ', '.join(f'{k} {v:.6g}' for k, v in values[-1].items()), flush=True)
    figures['values'] = values
    if draws > 1:
        figures['spread_over_draws'] = {k: metrics.summarize_repeats([v[k] for v in values]) for k in values[0]}
    print(json.dumps(figures, indent=1))
    if json_path:
        import dnnlib
        with dnnlib.util.atomic_write(json_path, 'w') as f:
            json.dump(figures, f, indent=1)


if __name__ == '__main__':
    main()
