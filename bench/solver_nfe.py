"""NFE each solver needs on trained networks to match EDM's Heun sampler at 35 NFE.

For every network (PFGM++ or diffusion) and every solver configuration, sweeps the step count and measures the
images of a fixed set of seeds (the same per-seed latents as generate.py, ``training.sampler.sample_batch``):

* ``rms``: RMS over images and pixels (image values in [-1, 1], before the uint8 conversion) of the distance to
  the converged probability-flow ODE solution of the same seed (DPM-Solver++(3M), ``--ref-steps`` steps; its
  self-check against half as many steps is printed). This is the solver error that the ODE solvers approximate
  and needs no detector. Restart is stochastic: its images are other samples, not approximations of the ODE
  solution, so its ``rms`` is not a quality measure (only FD is).
* ``fd`` (with ``--detector`` and ``--data``): Frechet distance between the detector features of the generated
  images and of the data set (``fid.py``'s feature code; few images make it biased, so compare columns, not
  absolute values).

The reference level is Heun with 18 steps (35 NFE, EDM's default); for each configuration the table reports the
smallest swept NFE whose metric is at or below that level. Output: a JSON file, a Markdown table and one chart per
network and metric (``demo.plots``, matplotlib).

    python -m bench.solver_nfe --network=D128=runs/pfgmpp/network-snapshot-000080.pkl \\
        --network=inf=runs/edm/network-snapshot-000080.pkl --seeds=0-15 --outdir=solver-nfe

Prints figures; it never asserts.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dnnlib  # noqa: E402
from training import pfgmpp as pfgmpp_lib  # noqa: E402
from sampling import pipeline  # noqa: E402
from formats.network_io import NetworkLoadError, load_network  # noqa: E402

# Solver configurations: name -> (sampler options, swept step counts). Heun is EDM's sampler (the default).
CONFIGS: dict[str, tuple[dict[str, Any], list[int]]] = {
    'heun': (dict(), [4, 6, 9, 13]),
    'dpmpp2m': (dict(solver='dpmpp2m'), [6, 9, 12, 18]),
    'dpmpp2m-logsnr': (dict(solver='dpmpp2m', spacing='logsnr'), [6, 9, 12, 18]),
    'dpmpp3m': (dict(solver='dpmpp3m'), [6, 9, 12, 18]),
    'dpmpp3m-logsnr': (dict(solver='dpmpp3m', spacing='logsnr'), [6, 9, 12, 15, 18]),
    'ipndm': (dict(solver='ipndm'), [4, 6, 9, 12]),
    'unipc': (dict(solver='unipc'), [4, 6, 9, 12]),
    'restart': (dict(solver='restart'), [4, 6, 9]),
}
LEVEL_STEPS = 18  # Heun's 35-NFE setting of EDM and PFGM++ (CIFAR-10)


def sample(net: torch.nn.Module, seeds: list[int], batch: int, **options: Any) -> torch.Tensor:
    """Float64 images [len(seeds), C, H, W] in [-1, 1] scale, as generate.py makes them."""
    D = pfgmpp_lib.network_D(net)
    parts = [pipeline.sample_batch(net, chunk, D=D, **options)
             for chunk in pipeline.split_batches(seeds, batch) if chunk]
    return torch.cat(parts)


class FrechetMetric:
    """FD of generated uint8 images to a data set's detector features (fid.py's library), or None without
    detector."""

    def __init__(self, detector_path: str, data_path: str):
        from evaluation import features
        self.features = features
        self.detector = features.load_detector(detector_path, device='cpu', verbose=False)
        self.ref = features.calculate_inception_stats(data_path, device='cpu', detector=self.detector,
                                                      num_workers=0)

    def __call__(self, images: torch.Tensor) -> float:
        stats = self.features.FeatureStats('cpu')
        stats.add(self.features.extract_features(self.detector, pipeline.to_uint8(images)))
        mu, sigma = stats.compute()
        return float(self.features.calculate_fid_from_inception_stats(mu, sigma, *self.ref))


def measure(label: str, net: torch.nn.Module, seeds: list[int], batch: int, ref_steps: int,
            configs: dict[str, tuple[dict[str, Any], list[int]]], frechet: Optional[FrechetMetric]) -> dict[str, Any]:
    started = time.time()
    reference = sample(net, seeds, batch, solver='dpmpp3m', num_steps=ref_steps)
    half = sample(net, seeds, batch, solver='dpmpp3m', num_steps=ref_steps // 2)

    def rms(x: torch.Tensor) -> float:
        return float((x - reference).square().mean().sqrt())

    def metrics(x: torch.Tensor) -> dict[str, float]:
        row = dict(rms=rms(x))
        if frechet is not None:
            row['fd'] = frechet(x)
        return row
    result: dict[str, Any] = dict(network=label, reference=f'dpmpp3m, {ref_steps} steps',
                                  reference_self_rms=rms(half), configs={})
    level_images = sample(net, seeds, batch, num_steps=LEVEL_STEPS)
    result['level'] = dict(config='heun', steps=LEVEL_STEPS, nfe=pipeline.sampler_nfe(LEVEL_STEPS, {}),
                           **metrics(level_images))
    print(f'{label}: reference self-check RMS {result["reference_self_rms"]:.2e}; Heun 35 NFE: '
          + ', '.join(f'{k} {v:.4g}' for k, v in metrics(level_images).items()), flush=True)
    for name, (options, steps_list) in configs.items():
        rows = []
        for steps in steps_list:
            nfe = pipeline.sampler_nfe(steps, options)
            row = dict(steps=steps, nfe=nfe, **metrics(sample(net, seeds, batch, num_steps=steps, **options)))
            rows.append(row)
            print(f'{label} {name:15s} steps {steps:3d} NFE {nfe:3d} '
                  + ' '.join(f'{k} {v:.4g}' for k, v in row.items() if k not in ('steps', 'nfe')), flush=True)
        result['configs'][name] = dict(options=options, rows=rows, nfe_to_match=nfe_to_match(rows, result['level']))
    result['seconds'] = round(time.time() - started, 1)
    return result


def nfe_to_match(rows: list[dict[str, Any]], level: dict[str, Any]) -> dict[str, Optional[int]]:
    """Per metric: the smallest swept NFE whose value is at or below the Heun-35 level (None: none is)."""
    out = {}
    for metric in ('rms', 'fd'):
        if metric in level:
            hits = [row['nfe'] for row in rows if row[metric] <= level[metric]]
            out[metric] = min(hits) if hits else None
    return out


def markdown(results: list[dict[str, Any]]) -> str:
    metric_names = [m for m in ('rms', 'fd') if m in results[0]['level']]
    lines = ['| network | solver | ' + ' | '.join(f'NFE → {m}' for m in metric_names) + ' | NFE to match Heun-35 |',
             '|---|---|' + '---|' * (len(metric_names) + 1)]
    for result in results:
        level = result['level']
        cells = ' | '.join(f'35 → {level[m]:.3g}' for m in metric_names)
        lines.append(f'| {result["network"]} | heun (level) | {cells} | 35 |')
        for name, config in result['configs'].items():
            cells = ' | '.join(', '.join(f'{row["nfe"]} → {row[m]:.3g}' for row in config['rows'])
                               for m in metric_names)
            match = ', '.join(f'{m}: {v if v is not None else "> " + str(config["rows"][-1]["nfe"])}'
                              for m, v in config['nfe_to_match'].items())
            lines.append(f'| {result["network"]} | {name} | {cells} | {match} |')
    return '\n'.join(lines)


def plot(result: dict[str, Any], path: str, metric: str = 'rms') -> None:
    """Metric against NFE per configuration, with the Heun-35 level as a flat line (demo.plots)."""
    from demo.plots import line_chart
    # Restart's images are other samples, not approximations of the ODE solution: no RMS curve for it.
    series = {name: ([r['nfe'] for r in c['rows']], [r[metric] for r in c['rows']])
              for name, c in result['configs'].items() if metric != 'rms' or c['options'].get('solver') != 'restart'}
    nfes = [n for xs, _ in series.values() for n in xs]
    series['Heun 35 NFE (level)'] = ([min(nfes), max(nfes)], [result['level'][metric]] * 2)
    ylabel = 'RMS to converged ODE solution' if metric == 'rms' else 'FD (detector features)'
    line_chart(series, path, title=f'{result["network"]}: {ylabel} vs NFE', xlabel='NFE', ylabel=ylabel,
               log_y=True)


@click.command(context_settings=dict(max_content_width=120))
@click.option('--network', 'networks', multiple=True, required=True, metavar='LABEL=PATH',
              help='A trained network and its label in the table (repeatable)')
@click.option('--seeds', 'seeds_text', default='0-15', show_default=True, metavar='LIST')
@click.option('--batch', default=16, show_default=True, type=click.IntRange(min=1))
@click.option('--ref-steps', default=64, show_default=True, type=click.IntRange(min=8),
              help='Steps of the DPM-Solver++(3M) reference solution')
@click.option('--configs', 'config_names', default=','.join(CONFIGS), show_default=True, metavar='LIST')
@click.option('--detector', 'detector_path', default=None, metavar='PATH', help='Feature detector for an FD column')
@click.option('--data', 'data_path', default=None, metavar='ZIP|DIR', help='Data set the FD compares with')
@click.option('--outdir', required=True, metavar='DIR', help='Receives solver-nfe.json, .md and .png')
def main(networks: tuple[str, ...], seeds_text: str, batch: int, ref_steps: int, config_names: str,
         detector_path: Optional[str], data_path: Optional[str], outdir: str) -> None:
    """Sweep the NFE of each solver on trained networks and find where each matches Heun at 35 NFE."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    seeds = dnnlib.util.parse_int_list(seeds_text, name='--seeds')
    unknown = [n for n in config_names.split(',') if n and n not in CONFIGS]
    if unknown:
        raise click.BadParameter(f'unknown configuration {unknown[0]!r}; expected some of {",".join(CONFIGS)}',
                                 param_hint='--configs')
    configs = {n: CONFIGS[n] for n in config_names.split(',') if n}
    if (detector_path is None) != (data_path is None):
        raise click.UsageError('--detector and --data go together (the FD compares with the data set)')
    loaded = []
    for item in networks:
        label, sep, path = item.partition('=')
        if not sep or not label or not path:
            raise click.BadParameter(f'{item!r}: expected LABEL=PATH', param_hint='--network')
        try:
            loaded.append((label, load_network(path, 'cpu')))
        except NetworkLoadError as err:
            raise click.BadParameter(str(err), param_hint='--network') from None
    os.makedirs(outdir, exist_ok=True)
    frechet = FrechetMetric(detector_path, data_path) if detector_path else None
    results = [measure(label, net, seeds, batch, ref_steps, configs, frechet) for label, net in loaded]
    table = markdown(results)
    print('\n' + table)
    settings = dict(seeds=seeds_text, num_images=len(seeds), ref_steps=ref_steps, level_steps=LEVEL_STEPS,
                    detector=detector_path, data=data_path, torch=torch.__version__, threads=torch.get_num_threads())
    with dnnlib.util.atomic_write(os.path.join(outdir, 'solver-nfe.json'), 'w') as f:
        json.dump(dict(settings=settings, results=results), f, indent=1)
    with dnnlib.util.atomic_write(os.path.join(outdir, 'solver-nfe.md'), 'w') as f:
        f.write(table + '\n')
    for result in results:
        for metric in [m for m in ('rms', 'fd') if m in result['level']]:
            plot(result, os.path.join(outdir, f'solver-nfe-{result["network"]}-{metric}.png'), metric)
    print(f'Wrote {outdir}/solver-nfe.json, solver-nfe.md and the charts solver-nfe-*.png')


if __name__ == '__main__':
    main()
