"""The paper's robustness claims (PFGM++ §5, Figs. 4-6) tested on the reference model set with paired differences.

Every model of the set (``python -m demo.model_set``: the demo's DDPM++ on the 16x16 digits for each D and training
seed, at its last stage) is sampled from the same seeds 0..num-1 while one thing is made harder at a time:

- ``alpha``: noise x += alpha * t_i * eps injected before every Heun step (Fig. 4);
- ``steps``: fewer Heun steps, reported as NFE = 2 * steps - 1 (Fig. 5);
- ``bits``: conv/linear weights quantized to K bits (:mod:`sampling.quantize`, symmetric), per tensor and per output
  channel (Fig. 6).

The clean setting is the model set's own sampler (Heun at its steps, float32 weights, alpha = 0). Each finite D is
compared with D = inf on the same image seeds, training seed k with training seed k, by the two-level paired
bootstrap (:mod:`evaluation.paired`; training seeds, then image seeds):

- the gap FD(D, s) - FD(inf, s) at every setting s (what the paper's figures show);
- the degradation contrast [FD(D, s) - FD(D, clean)] - [FD(inf, s) - FD(inf, clean)]: below zero means D lost less
  than diffusion did, whatever their clean FDs (:func:`evaluation.paired.paired_fd_contrast`).

Verdicts, per claim and D, from the contrast's 95% intervals over the settings of the study: "reproduced" when some
interval lies below 0 and none above, "reversed" when the other way round, "mixed" when both occur, "undecided at
this power" when every interval contains 0. The steps study uses only the step counts at which every D (the mean
over its training seeds) stays within 2x of its clean FD (the usable range). The sweet-spot claim (an intermediate D
beats both D = inf and the smallest D at the clean setting) is judged from the clean gaps.

FD-digits throughout (the Frechet distance in the features of ``demo/digits-classifier.weights.pt`` against all
1,797 real digits; not FID). Features are stored per model and setting with their settings beside them, so a rerun
redoes only what changed. Results: ``robustness.json`` (with the machine, wall and CPU time), ``robustness.md`` and
one figure per study in ``--results``.

Usage: python -m demo.robustness [--quick] [--model-set=model-set-out] [--outdir=robustness-out]
                                 [--results=docs/robustness]
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Optional

import click
import numpy as np

from dnnlib.util import file_sha256
from demo.digits import make_digits_dataset, model_label, model_name, number_list
from demo.model_set import (METRICS_SEED, FeatureStore, Scorer, machine_record, trained_models, write_json)
from demo.plots import line_chart
from evaluation import paired
from formats import network_io
from sampling import quantize

STUDIES = ('alpha', 'steps', 'bits')
GRANULARITIES = ('tensor', 'channel')
USABLE_RATIO = 2.0     # a step count is usable when every D's FD (mean over seeds) is within this factor of clean

FULL = dict(alphas='0.3,0.6', steps='3,4,6,8,10,12', bits='2,3', num=500, bootstrap=500)
QUICK = dict(alphas='0.3', steps='2', bits='3', num=24, bootstrap=20)   # num: the quick model set's


# ----------------------------------------------------------------------------
# Features of every setting of every model.


def settings_of(cfg: dict, clean_steps: int) -> dict[str, dict]:
    """Setting tag -> dict(study, x, steps, alpha, bits, granularity); 'clean' first."""
    points = {'clean': dict(study='clean', x=None, steps=clean_steps, alpha=0.0, bits=None, granularity=None)}
    for a in cfg['alphas']:
        points[f'alpha{a:g}'] = dict(study='alpha', x=a, steps=clean_steps, alpha=a, bits=None, granularity=None)
    for n in cfg['steps']:
        if n != clean_steps:
            points[f'steps{n:03d}'] = dict(study='steps', x=2 * n - 1, steps=n, alpha=0.0, bits=None,
                                           granularity=None)
    for b in cfg['bits']:
        for g in GRANULARITIES:
            points[f'bits{b:02d}-{g}'] = dict(study='bits', x=b, steps=clean_steps, alpha=0.0, bits=b, granularity=g)
    return points


def model_features(store: FeatureStore, scorer: Scorer, model: dict, points: dict[str, dict],
                   num: int) -> dict[str, np.ndarray]:
    """float64 [num, F] features of every setting of one model, seeds 0..num-1 (the clean one is the model set's
    own when it has those seeds)."""
    net = network_io.load_network(model['snapshot'], scorer.device)
    sha = file_sha256(model['snapshot'])
    seeds = list(range(num))
    found = {}
    for tag, point in points.items():
        if tag == 'clean' and model['features'].shape[0] >= num and model['settings']['steps'] == point['steps']:
            found[tag] = model['features'][:num]
            continue

        def make(point: dict = point) -> np.ndarray:
            sampled = net if point['bits'] is None else quantize.quantize_network(
                net, point['bits'], granularity=point['granularity'])
            kwargs = dict(num_steps=point['steps'])
            if point['alpha']:
                kwargs['noise_injection'] = point['alpha']
            return scorer.features(sampled, model['D'], seeds, **kwargs)

        settings = dict(scorer.identity, snapshot_sha256=sha, seeds=num, **point)
        found[tag] = store.get(f'{model["name"]}/{tag}', settings, make)
    return found


# ----------------------------------------------------------------------------
# Paired comparisons and verdicts.


def interval(result: paired.PairedResult) -> dict:
    """A comparison's record: value, bootstrap se, interval and its sign (0: the interval includes zero)."""
    return dict(value=result.diff, se=result.diff_se, ci=[result.ci_low, result.ci_high],
                sign=int(result.ci_low > 0) - int(result.ci_high < 0))


def powered(sets: list, weights: list[float], scorer: Scorer, rng: np.random.Generator, bootstrap: int) -> dict:
    """The record of :func:`interval` for the contrast sum_k weights[k] FD(sets[k]) on all seeds, with ``images``
    (the seeds per set) and ``images_needed`` (:func:`evaluation.paired.contrast_images_needed`; None: not even
    all of them decide it)."""
    power = paired.contrast_images_needed(sets, weights, scorer.mu_ref, scorer.sigma_ref, rng, bootstrap)
    return dict(interval(power.full), images=power.full.num_images, images_needed=power.n_needed)


def compare_all(feats: dict[Optional[float], list[dict[str, np.ndarray]]], points: dict[str, dict],
                scorer: Scorer, bootstrap: int) -> dict[str, dict[str, dict]]:
    """D name -> tag -> dict(fd, gap, contrast) for every finite D against D = inf (training seeds paired)."""
    base = feats[None]
    rng = np.random.default_rng(METRICS_SEED)
    table: dict[str, dict[str, dict]] = {}
    for D, models in feats.items():
        rows = {}
        for tag in points:
            fds = [paired.frechet_of(m[tag], scorer.mu_ref, scorer.sigma_ref) for m in models]
            row = dict(fd=float(np.mean(fds)), fd_per_seed=fds)
            if D is not None:
                ours, theirs = [m[tag] for m in models], [m[tag] for m in base]
                row['gap'] = powered([ours, theirs], [1.0, -1.0], scorer, rng, bootstrap)
                if tag != 'clean':
                    sets = [ours, [m['clean'] for m in models], theirs, [m['clean'] for m in base]]
                    row['contrast'] = powered(sets, [1.0, -1.0, -1.0, 1.0], scorer, rng, bootstrap)
            rows[tag] = row
        table[model_name(D)] = rows
    return table


def usable(table: dict, tag: str) -> bool:
    """Every model (mean over training seeds) within USABLE_RATIO of its clean FD at this setting."""
    return all(rows[tag]['fd'] <= USABLE_RATIO * rows['clean']['fd'] for rows in table.values())


def claim_verdict(signs: list[int]) -> str:
    if not signs:
        return 'not tested (no setting)'
    if all(s == 0 for s in signs):
        return 'undecided at this power'
    if -1 in signs and 1 in signs:
        return 'mixed'
    return 'reproduced' if -1 in signs else 'reversed'


def verdicts(table: dict, points: dict[str, dict], aug_dims: list[Optional[float]],
             feats: dict[Optional[float], list[dict[str, np.ndarray]]], scorer: Scorer, bootstrap: int) -> dict:
    """Per claim: the verdict of every finite D, the settings it rests on, and the sweet-spot verdict."""
    finite = [D for D in aug_dims if D is not None]
    result: dict[str, Any] = {}
    for study in STUDIES:
        tags = [t for t, p in points.items() if p['study'] == study and (study != 'steps' or usable(table, t))]
        result[study] = dict(settings=tags, by_D={
            model_name(D): claim_verdict([table[model_name(D)][t]['contrast']['sign'] for t in tags])
            for D in finite})
    # Sweet spot at the clean setting: an intermediate D better than diffusion and than the smallest D.
    middle = finite[1:]
    sweet: dict[str, Any] = dict(verdict='not applicable (needs two finite D)', best=None)
    if finite and middle:
        best = min(middle, key=lambda D: table[model_name(D)]['clean']['fd'])
        smallest = finite[0]
        versus_small = powered([[m['clean'] for m in feats[best]], [m['clean'] for m in feats[smallest]]],
                               [1.0, -1.0], scorer, np.random.default_rng(METRICS_SEED), bootstrap)
        signs = [table[model_name(best)]['clean']['gap']['sign'], versus_small['sign']]
        all_worse = all(table[model_name(D)]['clean']['gap']['sign'] == 1 for D in finite)
        sweet = dict(best=model_name(best), versus_inf=table[model_name(best)]['clean']['gap'],
                     versus_smallest=versus_small, smallest=model_name(smallest),
                     verdict='reproduced' if signs == [-1, -1] else 'reversed' if all_worse or 1 in signs
                     else 'undecided at this power')
    result['sweet_spot'] = sweet
    return result


# ----------------------------------------------------------------------------
# Results.


AXIS = dict(alpha=('alpha (noise injected at every step)', 'FD-digits vs injected noise alpha (Fig. 4)'),
            steps=('NFE (Heun)', 'FD-digits vs NFE (Fig. 5)'),
            bits=('weight bits (32 = float)', 'FD-digits vs weight quantization (Fig. 6)'))


def cell(entry: Optional[dict]) -> str:
    """``+d (low, high)``, then for a powered comparison ``n=K`` (the images that decided it) or ``n>N``."""
    if entry is None:
        return ''
    text = f'{entry["value"]:+.1f} ({entry["ci"][0]:+.1f}, {entry["ci"][1]:+.1f})'
    if 'images_needed' not in entry:
        return text
    needed = entry['images_needed']
    return text + (f' n={needed}' if needed is not None else f' n>{entry["images"]}')


def write_results(results: str, table: dict, claims: dict, points: dict[str, dict], aug_dims: list, floor: list,
                  cfg: dict, models: list[dict], started: float, load: tuple) -> None:
    os.makedirs(results, exist_ok=True)
    summary = dict(config=cfg, models=[dict(name=m['name'], D=m['D'], seed=m['seed'], kimg=m['kimg'],
                                            stopped=m['stopped']) for m in models],
                   points=points, table=table, verdicts=claims, real_floor=floor, **machine_record(started, load))
    write_json(os.path.join(results, 'robustness.json'), summary)
    seeds = sorted({m['seed'] for m in models})
    lines = [f'FD-digits of {cfg["num"]} images per model (mean over training seeds {seeds}); gap = FD(D) - FD(inf) '
             f'and degradation contrast = [FD(D, s) - FD(D, clean)] - [FD(inf, s) - FD(inf, clean)], paired over '
             f'seeds and training seeds, with 95% intervals; n = the images from which the interval excludes zero '
             f'(doubling prefixes of the seeds; n>{cfg["num"]}: not even all). {cfg["num"]} real digits score '
             f'{np.mean(floor):.1f} against all of them.', '',
             '| setting | ' + ' | '.join(f'FD {model_label(D)}' for D in aug_dims) + ' | ' +
             ' | '.join(f'gap {model_name(D)} | contrast {model_name(D)}' for D in aug_dims if D is not None) + ' |',
             '|---|' + '---:|' * (len(aug_dims) + 2 * sum(D is not None for D in aug_dims))]
    for tag in points:
        row = [f'{table[model_name(D)][tag]["fd"]:.1f}' for D in aug_dims]
        row += [x for D in aug_dims if D is not None
                for x in (cell(table[model_name(D)][tag].get('gap')), cell(table[model_name(D)][tag].get('contrast')))]
        lines.append(f'| {tag} | ' + ' | '.join(row) + ' |')
    lines += ['', '| claim | ' + ' | '.join(model_name(D) for D in aug_dims if D is not None) + ' | settings |',
              '|---|' + '---|' * (sum(D is not None for D in aug_dims) + 1)]
    for study in STUDIES:
        lines.append(f'| {study} | ' + ' | '.join(claims[study]['by_D'][model_name(D)] for D in aug_dims
                                                 if D is not None) + f' | {", ".join(claims[study]["settings"])} |')
    sweet = claims['sweet_spot']
    lines += ['', f'Sweet spot at the clean setting: {sweet["verdict"]}'
              + (f' (best intermediate {sweet["best"]}: versus inf {cell(sweet["versus_inf"])}, versus '
                 f'{sweet["smallest"]} {cell(sweet["versus_smallest"])})' if sweet.get('best') else '')]
    with open(os.path.join(results, 'robustness.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    for study in STUDIES:
        series = {}
        for D in aug_dims:
            for g in (GRANULARITIES if study == 'bits' else (None,)):
                tags = [t for t, p in points.items() if p['study'] == study and p['granularity'] == g]
                xs = [points[t]['x'] for t in tags]
                clean_x = dict(alpha=0.0, steps=2 * points['clean']['steps'] - 1, bits=32)[study]
                pairs = sorted([(clean_x, 'clean'), *zip(xs, tags)])
                name = model_label(D) + (f', per {g}' if g else '')
                series[name] = ([x for x, _ in pairs], [table[model_name(D)][t]['fd'] for _, t in pairs])
        xlabel, title = AXIS[study]
        line_chart(series, os.path.join(results, f'fd-vs-{study}.png'), title=title, xlabel=xlabel,
                   ylabel=f'FD-digits ({cfg["num"]} images, mean over training seeds)', log_x=study == 'steps',
                   log_y=True)
    print(f'Wrote {results}/robustness.json, robustness.md and the figures')


def real_floor(scorer: Scorer, num: int) -> list[float]:
    """FD-digits of disjoint sets of ``num`` real digits: what this number of images allows at best."""
    feats = scorer.real_features
    order = np.random.default_rng(0).permutation(feats.shape[0])
    return [scorer.fd(feats[order[k * num:(k + 1) * num]]) for k in range(max(1, feats.shape[0] // num))]


@click.command()
@click.option('--quick', is_flag=True, help='Few settings and images (a test of the pipeline, not a result)')
@click.option('--model-set', 'model_set', metavar='DIR', default='model-set-out', show_default=True,
              help='The trained model set (python -m demo.model_set --outdir)')
@click.option('--outdir', metavar='DIR', default='robustness-out', show_default=True,
              help='Working folder (features and their settings, reused on a rerun)')
@click.option('--results', metavar='DIR', default='docs/robustness', show_default=True, help='Tables and figures')
@click.option('--alphas', metavar='LIST', default=None, help=f'Injected noise levels  [default: {FULL["alphas"]}]')
@click.option('--steps', metavar='LIST', default=None, help=f'Heun step counts  [default: {FULL["steps"]}]')
@click.option('--bits', metavar='LIST', default=None, help=f'Weight bit widths  [default: {FULL["bits"]}]')
@click.option('--num', type=click.IntRange(min=2), default=None, help=f'Images per model  [default: {FULL["num"]}]')
@click.option('--bootstrap', type=click.IntRange(min=2), default=None,
              help=f'Bootstrap resamples  [default: {FULL["bootstrap"]}]')
def main(quick: bool, model_set: str, outdir: str, results: str, **overrides: Any) -> None:
    """Test the paper's robustness claims on the model set: every D against D = inf, paired."""
    started, load = time.time(), os.getloadavg()
    cfg = dict(QUICK if quick else FULL, **{k: v for k, v in overrides.items() if v is not None})
    cfg['alphas'] = [a for a in number_list(str(cfg['alphas']), '--alphas', minimum=0, sort=True) if a > 0]
    cfg['steps'] = number_list(str(cfg['steps']), '--steps', kind=int, minimum=1, sort=True)
    cfg['bits'] = number_list(str(cfg['bits']), '--bits', kind=int, minimum=quantize.MIN_BITS['symmetric'],
                              maximum=quantize.MAX_BITS, sort=True)
    models = trained_models(os.path.abspath(model_set))
    aug_dims = sorted({m['D'] for m in models}, key=lambda D: math.inf if D is None else D)
    if None not in aug_dims or len(aug_dims) < 2:
        raise click.ClickException(f'{model_set}: the study needs D = inf and at least one finite D in the set')
    seeds = sorted({m['seed'] for m in models if m['D'] is None})
    models = [m for m in models if m['seed'] in seeds]
    for D in aug_dims:
        have = sorted(m['seed'] for m in models if m['D'] == D)
        if have != seeds:
            raise click.ClickException(f'{model_set}: {model_label(D)} has training seeds {have} but D = inf has '
                                       f'{seeds}; the paired comparison needs the same seeds for every D')
    clean_steps = models[0]['settings']['steps']
    if any(m['settings']['steps'] != clean_steps for m in models):
        raise click.ClickException(f'{model_set}: the models were scored with different Heun steps')
    outdir = os.path.abspath(outdir)
    dataset = make_digits_dataset(outdir)
    scorer = Scorer(dataset, dict(num=cfg['num'], steps=clean_steps, bootstrap=cfg['bootstrap']))
    store = FeatureStore(os.path.join(outdir, 'features'))
    points = settings_of(cfg, clean_steps)
    feats = {D: [model_features(store, scorer, m, points, cfg['num']) for m in models if m['D'] == D]
             for D in aug_dims}
    table = compare_all(feats, points, scorer, cfg['bootstrap'])
    claims = verdicts(table, points, aug_dims, feats, scorer, cfg['bootstrap'])
    write_results(results, table, claims, points, aug_dims, real_floor(scorer, cfg['num']), cfg, models,
                  started, load)
    for study in (*STUDIES, 'sweet_spot'):
        shown = claims[study].get('by_D') or {'': claims[study]['verdict']}
        print(f'{study}: ' + ', '.join(f'{k} {v}'.strip() for k, v in shown.items()))


if __name__ == '__main__':
    main()
