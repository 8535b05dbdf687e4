"""The paper's robustness study (PFGM++ §5, Figs. 4-6) at small scale, with trained U-Nets, on the demo's digits.

For each D (default 16, 128, 2048 and inf = diffusion) the same small DDPM++ is trained on the 16x16 handwritten
digits with the same budget and seed (``train.py`` under torchrun, the demo's recipe). Each model is then sampled
with ``generate.py`` while one thing is made harder at a time:

- ``alpha``: noise x += alpha * t_i * eps injected before every Heun step (Fig. 4), ``--sweep-alpha``;
- ``steps``: fewer Heun steps, reported as NFE = 2 * steps - 1 (Fig. 5), ``--sweep-steps``;
- ``bits``: conv/linear weights quantized to K bits (Fig. 6), ``--sweep-bits``.

Every setting is scored with FD-digits (the Frechet distance in the features of ``demo/digits-classifier.weights.pt``,
against all 1,797 real digits; not FID) on several disjoint seed ranges of ``--num`` images each, which give the
mean and standard deviation drawn as error bars. The clean setting (``--clean-steps`` Heun steps, alpha = 0, float32
weights) is measured once per model and shared by the three studies.

Everything is resumable: each trained model, each folder of images and each FD value has its settings recorded
beside it, and a rerun reuses exactly those whose settings match (a changed setting redoes that piece only).
Training and generation run the project's command-line tools as a user would; the commands are printed.

Usage: python -m demo.robustness [--quick] [--outdir=robustness-out] [--results=docs/robustness]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any, Optional

import click
import numpy as np
import torch

import dnnlib
from cli import common as cli
from dnnlib.util import file_sha256
from demo import digits
from demo.digits import load_digits_dataset, make_digits_dataset, number_list, run_tool
from demo.plots import line_chart
from demo.run import DIGITS_DETECTOR, TRAIN_FLAGS, latest
from evaluation import features
from evaluation import metrics
from sampling import quantize
from formats.manifest import image_path

STUDIES = ('alpha', 'steps', 'bits')
RECORD_FORMAT = 1   # bump when the meaning of a record changes, so old records are not reused

# Sizes of the two modes; every entry can be overridden by the option of the same name.
FULL = dict(aug_dims='16,128,2048,inf', kimg=20.0, num=150, sets=3, clean_steps=12, alphas='0.1,0.2,0.3,0.6',
            steps='3,5,8', bits='4,5,6', nproc=2)
QUICK = dict(aug_dims='16,128,2048,inf', kimg=0.2, num=16, sets=2, clean_steps=4, alphas='0.3', steps='2',
             bits='4', nproc=1)


# ----------------------------------------------------------------------------
# Records: settings written beside each artefact; work is reused only when they match.


def read_record(path: str) -> Optional[dict]:
    return digits.read_record(path, RECORD_FORMAT)


def write_record(path: str, record: dict) -> None:
    digits.write_record(path, record, RECORD_FORMAT)


def model_name(D: Optional[float]) -> str:
    return 'Dinf' if D is None else f'D{D:g}'


def model_label(D: Optional[float]) -> str:
    return 'D=inf (EDM)' if D is None else f'D={D:g}'


def parse_aug_dims(text: str) -> list[Optional[float]]:
    """'16,128,inf' -> [16.0, 128.0, None] (None = diffusion, D -> inf)."""
    values: list[Optional[float]] = []
    for part in text.split(','):
        part = part.strip().lower()
        if part in ('inf', 'infinity'):
            values.append(None)
            continue
        try:
            value = float(part)
        except ValueError:
            value = -1.0
        if value < 1 or value != int(value):
            raise click.BadParameter(f'expected integers >= 1 or "inf", got "{part}"', param_hint='--aug-dims')
        values.append(value)
    return values


def launcher(nproc: int) -> list[str]:
    """How a tool is started: under torchrun (gloo on the CPU) for several processes, plainly for one."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']


# ----------------------------------------------------------------------------
# Stage 1: one trained model per D.


def train_model(workdir: str, dataset: str, D: Optional[float], kimg: float, nproc: int) -> dict:
    """Train (or reuse, or continue) the model for ``D``; returns its record with the final snapshot and its hash."""
    name = model_name(D)
    runs = os.path.join(workdir, 'runs')
    run_dir = os.path.join(runs, name)
    record_path = os.path.join(runs, f'{name}.json')
    tick = max(kimg / 10, 0.1)
    kernel = ['--pfgmpp=0'] if D is None else ['--pfgmpp=1', f'--aug_dim={D:g}']
    # A state every two ticks, so an interrupted run loses at most a fifth of its training.
    flags = [*TRAIN_FLAGS, *kernel, f'--duration={kimg / 1000:g}', f'--tick={tick:g}', '--snap=10', '--dump=2']
    settings = dict(flags=flags, nproc=nproc, dataset_sha256=file_sha256(dataset))
    record = read_record(record_path)
    if record is not None and record['settings'] == settings and record.get('complete'):
        # The snapshot is recorded relative to the working folder, which may have been moved since.
        snapshot = os.path.join(runs, record['snapshot'])
        if os.path.isfile(snapshot) and file_sha256(snapshot) == record['snapshot_sha256']:
            print(f'{name}: reusing the trained model {snapshot}')
            return dict(record, snapshot=snapshot)
    if record is None or record['settings'] != settings:
        if os.path.isdir(run_dir):
            print(f'{name}: {run_dir} was trained with other settings (or has no record); starting it over')
            shutil.rmtree(run_dir)
        record = dict(settings=settings, complete=False, seconds=0.0)
        write_record(record_path, record)
    started = time.time()
    # One thread per rank: the ranks already fill the cores, and more threads would only contend.
    run_tool([*launcher(nproc), 'train.py', f'--outdir={runs}', f'--name={name}', f'--data={dataset}', *flags,
              '--resume=auto'], env={'OMP_NUM_THREADS': '1'})
    snapshot = latest(os.path.join(run_dir, 'network-snapshot-*.pkl'))
    record = dict(record, complete=True, snapshot=os.path.relpath(snapshot, runs),
                  snapshot_sha256=file_sha256(snapshot), seconds=round(record['seconds'] + time.time() - started, 1))
    write_record(record_path, record)
    return dict(record, snapshot=snapshot)


# ----------------------------------------------------------------------------
# Stage 2: images for every setting of every study.


def study_points(study: str, cfg: dict) -> list[tuple[str, dict]]:
    """(generate.py's sweep folder name, sampling settings) of each point a study generates itself.

    The clean point (alpha = 0 at --clean-steps, float32) belongs to the alpha study; the others borrow it.
    """
    clean = cfg['clean_steps']
    if study == 'alpha':
        return [(f'alpha{a:g}', dict(steps=clean, alpha=a, bits=None)) for a in [0.0, *cfg['alphas']]]
    if study == 'steps':
        return [(f'steps{n:03d}', dict(steps=n, alpha=0.0, bits=None)) for n in cfg['steps'] if n != clean]
    return [(f'bits{b:02d}', dict(steps=clean, alpha=0.0, bits=b)) for b in cfg['bits']]


def sweep_flags(study: str, cfg: dict, points: list[tuple[str, dict]]) -> list[str]:
    if study == 'steps':
        return ['--sweep-steps=' + ','.join(str(p['steps']) for _, p in points)]
    values = ','.join(f'{p[study]:g}' for _, p in points)
    return [f'--steps={cfg["clean_steps"]}', f'--sweep-{study}={values}']


def all_images_present(folder: str, seeds: range) -> bool:
    return all(os.path.isfile(image_path(folder, seed, False)) for seed in seeds)


def generate_study(workdir: str, model: dict, D: Optional[float], study: str, cfg: dict) -> dict[str, dict]:
    """Make sure every point of ``study`` holds the images of all seed sets; returns tag -> point settings.

    A point folder whose recorded settings differ (another model, another sampler setting) is deleted first;
    generate.py then adds whatever seeds are missing, so more sets reuse the images already there.
    """
    points = study_points(study, cfg)
    if not points:
        return {}
    outdir = os.path.join(workdir, 'samples', model_name(D), study)
    record_path = outdir + '.json'
    record = read_record(record_path) or dict(points={}, seconds=0.0)
    planned = {tag: dict(model_sha256=model['snapshot_sha256'], **sampling) for tag, sampling in points}
    for tag, settings in planned.items():
        if record['points'].get(tag) != settings:
            record['points'].pop(tag, None)
            if os.path.isdir(os.path.join(outdir, tag)):
                print(f'{model_name(D)}/{study}/{tag}: made with other settings; deleting it')
                shutil.rmtree(os.path.join(outdir, tag))
    seeds = range(cfg['num'] * cfg['sets'])
    if all(tag in record['points'] and all_images_present(os.path.join(outdir, tag), seeds) for tag in planned):
        print(f'{model_name(D)}/{study}: reusing {len(planned)} finished point(s)')
        return planned
    record['points'] = {tag: s for tag, s in record['points'].items() if tag not in planned}
    write_record(record_path, record)   # the planned points count only once generate.py has finished them
    started = time.time()
    run_tool([*launcher(cfg['nproc']), 'generate.py', f'--network={model["snapshot"]}', f'--outdir={outdir}',
              f'--seeds=0-{len(seeds) - 1}', '--batch=100', '--device=cpu', *sweep_flags(study, cfg, points)],
             env={'OMP_NUM_THREADS': '1'})
    record = dict(record, points={**record['points'], **planned},
                  seconds=round(record['seconds'] + time.time() - started, 1))
    write_record(record_path, record)
    return planned


# ----------------------------------------------------------------------------
# Stage 3: FD-digits of every seed set of every point.


class FDScorer:
    """FD-digits of image sets against the reference statistics of all real digits (``fid.py ref``'s file)."""

    def __init__(self, ref_path: str):
        self.detector = features.load_detector(DIGITS_DETECTOR, device='cpu')
        self.mu_ref, self.sigma_ref = features.load_ref_stats(ref_path)
        self.identity = dict(ref_sha256=file_sha256(ref_path), detector_sha256=file_sha256(DIGITS_DETECTOR))

    def score(self, images: np.ndarray) -> float:
        """FD of uint8 images [N, 1, H, W] (N >= 2): the same features and formula as ``fid.py calc``."""
        feats = features.extract_features(self.detector, torch.from_numpy(images))
        mu, sigma = metrics.feature_moments(feats)
        return metrics.frechet_distance(mu, sigma, self.mu_ref, self.sigma_ref)


def read_seed_range(folder: str, seeds: range) -> np.ndarray:
    from PIL import Image
    return np.stack([np.asarray(Image.open(image_path(folder, s, False)).convert('L'))[None]
                     for s in seeds])


def score_study(workdir: str, scorer: FDScorer, D: Optional[float], study: str, planned: dict[str, dict],
                cfg: dict) -> dict[str, list[float]]:
    """tag -> FD-digits of each seed set (set k: seeds k*num ... (k+1)*num - 1), reusing matching records."""
    folder = os.path.join(workdir, 'samples', model_name(D), study)
    record_path = os.path.join(workdir, 'fd', model_name(D), f'{study}.json')
    record = read_record(record_path) or dict(values={}, seconds=0.0)
    started, computed = time.time(), 0
    values: dict[str, list[float]] = {}
    for tag, settings in planned.items():
        values[tag] = []
        for k in range(cfg['sets']):
            seeds = range(k * cfg['num'], (k + 1) * cfg['num'])
            key = f'{tag}/seeds{seeds.start}-{seeds.stop - 1}'
            entry_settings = dict(settings, **scorer.identity)
            entry = record['values'].get(key)
            if entry is None or entry['settings'] != entry_settings:
                entry = dict(settings=entry_settings, fd=scorer.score(read_seed_range(os.path.join(folder, tag),
                                                                                       seeds)))
                record['values'][key] = entry
                computed += 1
            values[tag].append(entry['fd'])
    if computed:
        record['seconds'] = round(record['seconds'] + time.time() - started, 1)
        write_record(record_path, record)
    print(f'{model_name(D)}/{study}: FD-digits of {computed} image set(s) computed, '
          f'{sum(len(v) for v in values.values()) - computed} reused')
    return values


def real_floor(dataset: str, scorer: FDScorer, cfg: dict) -> list[float]:
    """FD-digits of disjoint sets of --num real digits: the floor that this number of images allows."""
    images, _ = load_digits_dataset(dataset)
    order = np.random.default_rng(0).permutation(images.shape[0])
    sets = min(cfg['sets'], images.shape[0] // cfg['num'])
    return [scorer.score(images[order[k * cfg['num']:(k + 1) * cfg['num']]].numpy()) for k in range(sets)]


# ----------------------------------------------------------------------------
# Results: JSON, Markdown and one figure per study.


def summary(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return dict(mean=float(arr.mean()), std=float(arr.std(ddof=1)) if arr.size > 1 else 0.0, n=int(arr.size),
                values=[float(v) for v in arr])


def study_axis(study: str, cfg: dict) -> list[tuple[float, str, str]]:
    """(x value, axis label, (study, tag) of the point measured) for each x of a study's figure and table."""
    clean = cfg['clean_steps']
    if study == 'alpha':
        return [(a, f'{a:g}', ('alpha', f'alpha{a:g}')) for a in [0.0, *cfg['alphas']]]
    if study == 'steps':
        return [(2 * n - 1, str(2 * n - 1), ('steps', f'steps{n:03d}') if n != clean else ('alpha', 'alpha0'))
                for n in sorted({*cfg['steps'], clean})]
    return [*[(b, f'{b} bits', ('bits', f'bits{b:02d}')) for b in cfg['bits']],
            (32, 'float32', ('alpha', 'alpha0'))]


DODGE = 0.01   # sideways shift between the D values in the figures, as a fraction of the x range
COLUMN_NAMES = dict(alpha='α={}', steps='NFE {}', bits='{}')
AXIS_TITLES = dict(alpha=('alpha (noise injected at every step)', 'FD-digits vs injected noise alpha (Fig. 4)'),
                   steps=('NFE (Heun)', 'FD-digits vs NFE (Fig. 5)'),
                   bits=('weight bits', 'FD-digits vs weight quantization (Fig. 6)'))


def write_results(results_dir: str, aug_dims: list[Optional[float]], fd: dict, floor: list[float], cfg: dict,
                  timing: dict) -> list[str]:
    os.makedirs(results_dir, exist_ok=True)
    table: dict[str, Any] = dict(
        settings=dict(cfg, aug_dims=[None if D is None else D for D in aug_dims],
                      metric='FD-digits (demo/digits-classifier.weights.pt) against all real digits',
                      error_bars=f'{cfg["sets"]} disjoint seed ranges of {cfg["num"]} images; mean and sample '
                                 f'std over them'),
        real_floor=summary(floor), timing=timing, studies={})
    written = []
    lines = ['# Robustness study at small scale: FD-digits (lower is better)', '',
             f'Mean ± std over {cfg["sets"]} disjoint sets of {cfg["num"]} images per point (n = {cfg["sets"]}); '
             f'{cfg["num"]} real digits score {summary(floor)["mean"]:.1f} ± {summary(floor)["std"]:.1f} '
             f'(the floor at this size). Models: {cfg["kimg"]:g} kimg each, same seed; '
             f'clean setting {cfg["clean_steps"]} Heun steps (NFE {2 * cfg["clean_steps"] - 1}).', '']
    for study in STUDIES:
        axis = study_axis(study, cfg)
        xlabel, title = AXIS_TITLES[study]
        rows = {}
        series = {}
        xs = [x for x, _, _ in axis if not (study == 'bits' and x == 32)]
        # Each D's points are moved sideways by a little, so that error bars at the same setting do not hide
        # each other.
        dodge = DODGE * (max(xs) - min(xs) if len(xs) > 1 else 1.0)
        for index, D in enumerate(aug_dims):
            points = [summary(fd[model_name(D)][source][tag]) for _, _, (source, tag) in axis]
            rows[model_name(D)] = [dict(x=x, label=label, **p) for (x, label, _), p in zip(axis, points)]
            shift = dodge * (index - (len(aug_dims) - 1) / 2)
            series[model_label(D)] = ([x + shift for x in xs], [p['mean'] for p in points[:len(xs)]],
                                      [p['std'] for p in points[:len(xs)]])
        floor_stats = summary(floor)
        series[f'{cfg["num"]} real digits'] = (xs, [floor_stats['mean']] * len(xs), [floor_stats['std']] * len(xs))
        table['studies'][study] = rows
        path = line_chart(series, os.path.join(results_dir, f'fd-vs-{study}.png'),
                          title=title + (' (float32 in the table)' if study == 'bits' else ''),
                          xlabel=xlabel, ylabel=f'FD-digits ({cfg["num"]} images, mean ± std over {cfg["sets"]})')
        written.append(path)
        lines += [f'## {title}', '', '| model | ' + ' | '.join(COLUMN_NAMES[study].format(label)
                                                             for _, label, _ in axis) + ' |',
                  '|---|' + '---:|' * len(axis)]
        for D in aug_dims:
            cells = [f'{p["mean"]:.1f} ± {p["std"]:.1f}' for p in rows[model_name(D)]]
            lines.append(f'| {model_label(D)} | ' + ' | '.join(cells) + ' |')
        lines.append('')
    json_path = os.path.join(results_dir, 'robustness.json')
    with dnnlib.util.atomic_write(json_path, 'w') as f:
        json.dump(table, f, indent=2)
    md_path = os.path.join(results_dir, 'robustness.md')
    with dnnlib.util.atomic_write(md_path, 'w') as f:
        f.write('\n'.join(lines))
    return [json_path, md_path, *written]


# ----------------------------------------------------------------------------


@click.command()
@click.option('--outdir', default='robustness-out', show_default=True,
              help='Working folder: dataset, trained models, generated images, records (reused on a rerun)')
@click.option('--results', 'results_dir', default=None, metavar='DIR',
              help='Where the table and figures go  [default: docs/robustness, or OUTDIR/results with --quick]')
@click.option('--quick', is_flag=True, help='Tiny training and few images: checks the pipeline in about 2 minutes')
@click.option('--aug-dims', 'aug_dims', default=None, metavar='LIST', help=f'D values, "inf" = diffusion  '
              f'[default: {FULL["aug_dims"]}]')
@click.option('--kimg', type=cli.float_range(min=0.1), default=None, help=f'Training length of each model  '
              f'[default: {FULL["kimg"]:g}; --quick {QUICK["kimg"]:g}]')
@click.option('--num', type=click.IntRange(min=2), default=None, help=f'Images per set  [default: {FULL["num"]}; '
              f'--quick {QUICK["num"]}]')
@click.option('--sets', type=click.IntRange(min=1), default=None, help=f'Disjoint seed sets per point (error '
              f'bars)  [default: {FULL["sets"]}; --quick {QUICK["sets"]}]')
@click.option('--clean-steps', 'clean_steps', type=click.IntRange(min=1), default=None,
              help=f'Heun steps of the clean setting and of the alpha and bits studies  [default: '
              f'{FULL["clean_steps"]}; --quick {QUICK["clean_steps"]}]')
@click.option('--alphas', default=None, metavar='LIST', help=f'Injected noise levels besides 0  [default: '
              f'{FULL["alphas"]}]')
@click.option('--steps', default=None, metavar='LIST', help=f'Heun step counts besides the clean one  [default: '
              f'{FULL["steps"]}]')
@click.option('--bits', default=None, metavar='LIST', help=f'Weight bit widths  [default: {FULL["bits"]}]')
@click.option('--nproc', type=click.IntRange(min=1), default=None,
              help=f'torchrun processes for training and generation  [default: {FULL["nproc"]}; --quick '
              f'{QUICK["nproc"]}: its runs are too short to repay starting a second process]')
def main(outdir: str, results_dir: Optional[str], quick: bool, **overrides: Any) -> None:
    """Train small U-Nets for several D and measure FD-digits against alpha, NFE and weight bits."""
    start = time.time()
    sizes = dict(QUICK if quick else FULL, **{k: v for k, v in overrides.items() if v is not None})
    aug_dims = parse_aug_dims(sizes['aug_dims'])
    cfg = dict(kimg=float(sizes['kimg']), num=sizes['num'], sets=sizes['sets'], clean_steps=sizes['clean_steps'],
               alphas=number_list(sizes['alphas'], '--alphas', float, 0.0, sort=True),
               steps=number_list(sizes['steps'], '--steps', int, 1, sort=True),
               bits=number_list(sizes['bits'], '--bits', int, quantize.MIN_BITS['symmetric'], quantize.MAX_BITS,
                                sort=True),
               nproc=sizes['nproc'])
    cfg['alphas'] = [a for a in cfg['alphas'] if a > 0]
    outdir = os.path.abspath(outdir)
    results_dir = results_dir or (os.path.join(outdir, 'results') if quick else 'docs/robustness')
    os.makedirs(outdir, exist_ok=True)
    dataset = make_digits_dataset(outdir)

    # The reference statistics of all real digits, as a user makes them.
    ref_path = os.path.join(outdir, 'ref-fd-digits.npz')
    ref_record_path = ref_path + '.json'
    ref_settings = dict(dataset_sha256=file_sha256(dataset), detector_sha256=file_sha256(DIGITS_DETECTOR))
    ref_record = read_record(ref_record_path)
    if not (os.path.isfile(ref_path) and ref_record is not None and ref_record['settings'] == ref_settings):
        run_tool([sys.executable, 'fid.py', 'ref', f'--data={dataset}', f'--dest={ref_path}',
                  f'--detector={DIGITS_DETECTOR}', '--device=cpu', '--workers=0'])
        write_record(ref_record_path, dict(settings=ref_settings))

    models = {model_name(D): train_model(outdir, dataset, D, cfg['kimg'], cfg['nproc']) for D in aug_dims}
    scorer = FDScorer(ref_path)
    fd: dict[str, dict[str, dict[str, list[float]]]] = {}
    for D in aug_dims:
        fd[model_name(D)] = {}
        for study in STUDIES:
            planned = generate_study(outdir, models[model_name(D)], D, study, cfg)
            fd[model_name(D)][study] = score_study(outdir, scorer, D, study, planned, cfg)
    floor = real_floor(dataset, scorer, cfg)

    # Seconds each artefact took when it was made (summed over interrupted attempts), and this run's wall time.
    def recorded_seconds(pattern: str) -> float:
        import glob
        return round(sum((read_record(p) or {}).get('seconds', 0.0) for p in glob.glob(pattern)), 1)
    timing = dict(training_s=recorded_seconds(os.path.join(outdir, 'runs', '*.json')),
                  generation_s=recorded_seconds(os.path.join(outdir, 'samples', '*', '*.json')),
                  fd_s=recorded_seconds(os.path.join(outdir, 'fd', '*', '*.json')),
                  this_invocation_s=round(time.time() - start, 1))
    written = write_results(results_dir, aug_dims, fd, floor, cfg, timing)
    print(f'\nDone in {timing["this_invocation_s"]:.0f} s (recorded work: training {timing["training_s"]:.0f} s, '
          f'generation {timing["generation_s"]:.0f} s, FD {timing["fd_s"]:.0f} s). Results:')
    for path in written:
        print(f'  {path}')
    with open(os.path.join(results_dir, 'robustness.md')) as f:
        print('\n' + f.read())


if __name__ == '__main__':
    main()
