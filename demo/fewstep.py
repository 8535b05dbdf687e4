"""Few-step generation measured on the reference model set: consistency tuning and the training-free solvers, each
against its teacher's Heun at 35 NFE on the same seeds.

For each chosen model of the set (``python -m demo.model_set``; by default D = 128 and D = inf, training seed 0):

1. **Consistency tuning.** ``train.py --consistency=1 --init=<teacher>`` (ECT, :mod:`training.consistency`) for
   ``--tune-kimg`` kimg with the gap t - r halving every ``--tune-kimg``/8 kimg, a snapshot every eighth of the run.
   Every snapshot is sampled in 1 and 2 steps: the curve FD vs tuning kimg.
2. **The table.** On ``--sets`` disjoint sets of ``--num`` seeds (seeds 0..sets*num-1): the teacher with Heun at
   ``--teacher-steps`` steps (35 NFE), Heun at fewer steps, each training-free solver of ``--solvers`` at every NFE of
   ``--nfe`` (its default order and spacing unless the entry names them, e.g. ``unipc:3:logsnr``), and the tuned
   model in 1, 2 and 4 steps. Each entry is compared with the teacher
   on the same seeds: the paired FD difference per set and over all sets, with its bootstrap interval
   (:func:`evaluation.paired.paired_fd_difference`).
3. **The verdicts**, as paired contrasts FD(method) - margin * FD(teacher) over all seeds
   (:func:`evaluation.paired.paired_fd_contrast`): "met" when the interval lies below 0, "missed" when above,
   "undecided" otherwise. Margins: 1.15 for 2 consistency steps, 1.5 for one; for the training-free solvers "Heun-35
   quality" is taken as within 5% (margin 1.05), at <= 10 NFE for finite D and <= 12 NFE for D = inf.

FD-digits throughout: the Frechet distance in the features of ``demo/digits-classifier.weights.pt`` against all 1,797
real digits (not FID). Everything is resumable: features are stored per setting with the settings beside them
(:class:`demo.model_set.FeatureStore`), tuning continues with ``--resume=auto``. Results: ``fewstep.json`` (with the
machine, wall and CPU time), ``fewstep.md`` and the figures in ``--results``.

Usage: python -m demo.fewstep [--quick] [--model-set=model-set-out] [--outdir=fewstep-out] [--results=docs/fewstep]
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import time
from typing import Any

import click
import numpy as np
import torch

from cli import common as cli
from dnnlib.util import file_sha256
from demo.digits import launcher, make_digits_dataset, model_label, model_name, number_list, parse_aug_dims, run_tool
from demo.model_set import (METRICS_SEED, FeatureStore, Scorer, machine_record, read_record, trained_models,
                            write_json)
from demo.plots import line_chart
from evaluation import paired
from formats import network_io
from sampling import consistency as cm_sampling
from sampling import fast_solvers, schedules

CONSISTENCY_STEPS = tuple(sorted(cm_sampling.STEP_SIGMAS))     # 1, 2, 4
#: Goal margins (FD ratio to the teacher) of the verdicts; the training-free NFE limit per kind of model.
CONSISTENCY_MARGINS = {2: 1.15, 1: 1.5}
TRAINING_FREE_MARGIN = 1.05
TRAINING_FREE_NFE = {'finite': 10, 'inf': 12}
#: Fine-tuning recipe besides the duration (the demo's network trained with --lr=2e-3; ECT tunes at a tenth of it).
TUNE_FLAGS = ['--batch=64', '--lr-rampup=0', '--dropout=0', '--augment=0', '--xflip=0', '--workers=0',
              '--device=cpu', '--channels-last=1', '--seed=0']
TUNE_STAGES = 8       # halvings of the gap t - r over the tuning run (ECT's staged schedule)
SNAPSHOTS = 8         # points of the FD vs tuning kimg curve, besides kimg 0

FULL = dict(aug_dims='128,inf', train_seed=0, num=500, sets=3, teacher_steps=18, heun_steps='3,4,5,6',
            solvers='dpmpp2m,ipndm,unipc,unipc:3:logsnr', nfe='4,6,8,10,12', tune_kimg=40.0, lr=2e-4, ema=0.005, bootstrap=500,
            nproc=2)
QUICK = dict(aug_dims='16,inf', train_seed=0, num=16, sets=2, teacher_steps=3, heun_steps='2',
             solvers='dpmpp2m,ipndm,unipc', nfe='3', tune_kimg=0.128, lr=2e-4, ema=0.005, bootstrap=20, nproc=1)


# ----------------------------------------------------------------------------
# Consistency tuning.


def tune(outdir: str, dataset: str, teacher: dict, cfg: dict) -> str:
    """Tune the teacher into a consistency model (or continue an interrupted run); returns its run folder."""
    name = f'cm-{teacher["name"]}'
    run_dir = os.path.join(outdir, 'runs', name)
    kimg = cfg['tune_kimg']
    tick = kimg / SNAPSHOTS
    flags = [*TUNE_FLAGS, f'--lr={cfg["lr"]:g}', f'--ema={cfg["ema"]:g}', '--consistency=1',
             f'--init={teacher["snapshot"]}', f'--cm-stage={kimg / TUNE_STAGES:g}', f'--tick={tick:g}', '--snap=1',
             '--dump=1']
    settings = dict(flags=flags, teacher_sha256=file_sha256(teacher['snapshot']), nproc=cfg['nproc'], kimg=kimg)
    record_path = os.path.join(outdir, 'runs', f'{name}.json')
    record = read_record(record_path)
    if record is not None and record['settings'] == settings and record.get('done'):
        return run_dir
    if (record is None or record['settings'] != settings) and os.path.isdir(run_dir):
        print(f'{name}: {run_dir} was made with other settings; starting it over')
        shutil.rmtree(run_dir)
    write_json(record_path, dict(settings=settings, done=False))
    started = time.time()
    # One thread per rank: the ranks already fill the cores. --resume=auto continues an interrupted run.
    run_tool([*launcher(cfg['nproc']), 'train.py', f'--outdir={os.path.join(outdir, "runs")}', f'--name={name}',
              f'--data={dataset}', *flags, f'--duration={kimg / 1000:g}', '--resume=auto'],
             env={'OMP_NUM_THREADS': '1'})
    write_json(record_path, dict(settings=settings, done=True, seconds=round(time.time() - started, 1)))
    return run_dir


def tuning_snapshots(run_dir: str) -> list[tuple[float, str]]:
    """(kimg, path) of the run's network snapshots in training order (not the power-function EMA files)."""
    found = []
    for path in glob.glob(os.path.join(run_dir, 'network-snapshot-*.pkl')):
        match = re.fullmatch(r'network-snapshot-(\d+)\.pkl', os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


# ----------------------------------------------------------------------------
# The table.


#: The solvers an entry of --solvers may name (those with one network evaluation per step).
MULTISTEP_SOLVERS = tuple(fast_solvers.MULTISTEP_ORDER)


def solver_options(entry: str) -> dict:
    """An entry of --solvers, ``NAME[:ORDER[:SPACING]]`` (e.g. ``dpmpp2m``, ``unipc:3:logsnr``), as sampler keywords
    with the spacing and order spelled out, so that stored features follow a change of a solver's defaults.
    Raises click.BadParameter naming --solvers."""
    name, *rest = entry.split(':')
    if name not in MULTISTEP_SOLVERS or len(rest) > 2:
        raise click.BadParameter(f'"{entry}": expected NAME[:ORDER[:SPACING]] with NAME one of '
                                 f'{"|".join(MULTISTEP_SOLVERS)}', param_hint='--solvers')
    order = fast_solvers.DEFAULT_SOLVER_ORDER.get(name)
    spacing = fast_solvers.DEFAULT_SPACING[name]
    try:
        if rest and rest[0]:
            if not re.fullmatch(r'[+-]?[0-9]+', rest[0]):
                raise ValueError(f'order "{rest[0]}": expected an integer')
            order = int(rest[0])
            fast_solvers.check_solver_order(name, order)
        if len(rest) == 2:
            spacing = rest[1]
            if spacing not in schedules.SPACINGS:
                raise ValueError(f'spacing "{spacing}": expected one of {"|".join(schedules.SPACINGS)}')
    except ValueError as err:
        raise click.BadParameter(f'"{entry}": {err}', param_hint='--solvers') from None
    return dict(solver=name, spacing=spacing, solver_order=order)


def entries(cfg: dict) -> list[tuple[str, int, dict]]:
    """(method, NFE, sampler keywords) of every training-free entry; the teacher is ('heun', 2 * steps - 1)."""
    rows = [('heun', 2 * s - 1, dict(num_steps=s)) for s in [*cfg['heun_steps'], cfg['teacher_steps']]]
    rows += [(entry, n, dict(solver_options(entry), num_steps=n)) for entry in cfg['solvers'] for n in cfg['nfe']]
    return rows


def compare(feats: np.ndarray, teacher: np.ndarray, scorer: Scorer, cfg: dict) -> dict:
    """The entry against the teacher on the same seeds: FD and paired difference per set, then over all seeds."""
    rng = np.random.default_rng(METRICS_SEED)
    per_set = []
    for k in range(cfg['sets']):
        part = slice(k * cfg['num'], (k + 1) * cfg['num'])
        result = paired.paired_fd_difference(feats[part], teacher[part], scorer.mu_ref, scorer.sigma_ref, rng,
                                             cfg['bootstrap'])
        per_set.append(dict(fd=result.fd_a, teacher_fd=result.fd_b, diff=result.diff, ci=[result.ci_low,
                                                                                         result.ci_high]))
    pooled = paired.paired_fd_difference(feats, teacher, scorer.mu_ref, scorer.sigma_ref, rng, cfg['bootstrap'])
    return dict(sets=per_set, fd=pooled.fd_a, teacher_fd=pooled.fd_b, ratio=pooled.fd_a / pooled.fd_b,
                diff=pooled.diff, diff_se=pooled.diff_se, ci=[pooled.ci_low, pooled.ci_high])


def verdict(feats: np.ndarray, teacher: np.ndarray, margin: float, scorer: Scorer, cfg: dict) -> dict:
    """FD(entry) - margin * FD(teacher) over all seeds, paired: 'met' below 0, 'missed' above, else 'undecided'.
    ``power_ok``: the interval's standard error is below a third of the margin's FD (margin - 1) * FD(teacher)."""
    result = paired.paired_fd_contrast([feats, teacher], [1.0, -margin], scorer.mu_ref, scorer.sigma_ref,
                                       np.random.default_rng(METRICS_SEED), cfg['bootstrap'])
    outcome = 'met' if result.ci_high < 0 else 'missed' if result.ci_low > 0 else 'undecided'
    return dict(margin=margin, contrast=result.diff, ci=[result.ci_low, result.ci_high], outcome=outcome,
                power_ok=bool(result.diff_se < (margin - 1) * result.fd_b / margin / 3))


def measure_model(outdir: str, dataset: str, scorer: Scorer, teacher: dict, cfg: dict) -> dict:
    """Tuning, curve, table and verdicts of one teacher."""
    D = teacher['D']
    label = model_name(D)
    store = FeatureStore(os.path.join(outdir, 'features', label))
    seeds = list(range(cfg['num'] * cfg['sets']))
    teacher_net = network_io.load_network(teacher['snapshot'], scorer.device)

    def features_for(net: torch.nn.Module, snapshot_sha: str, key: str, kwargs: dict, count: int) -> np.ndarray:
        settings = dict(scorer.identity, snapshot_sha256=snapshot_sha, sampler=kwargs, seeds=count)
        return store.get(key, settings, lambda: scorer.features(net, D, seeds[:count], **kwargs))

    teacher_sha = file_sha256(teacher['snapshot'])
    rows = []
    feats_of = {}
    for method, nfe, kwargs in entries(cfg):
        key = f'{method.replace(":", "-")}-{nfe:03d}'
        feats_of[(method, nfe)] = features_for(teacher_net, teacher_sha, key, kwargs, len(seeds))
    teacher_key = ('heun', 2 * cfg['teacher_steps'] - 1)
    reference = feats_of[teacher_key]

    run_dir = tune(outdir, dataset, teacher, cfg)
    snapshots = tuning_snapshots(run_dir)
    curve = []
    for kimg, path in snapshots:
        net, sha = network_io.load_network(path, scorer.device), file_sha256(path)
        point = dict(kimg=kimg)
        for steps in (1, 2):
            feats = features_for(net, sha, f'cm{kimg:06d}-{steps}', dict(num_steps=steps), cfg['num'])
            point[f'fd_{steps}'] = scorer.fd(feats)
        curve.append(point)
    final_kimg, final_path = snapshots[-1]
    cm_net, cm_sha = network_io.load_network(final_path, scorer.device), file_sha256(final_path)
    for steps in CONSISTENCY_STEPS:
        feats_of[('consistency', steps)] = features_for(cm_net, cm_sha, f'consistency-{steps}',
                                                        dict(num_steps=steps), len(seeds))
    for (method, nfe), feats in feats_of.items():
        if (method, nfe) != teacher_key:
            rows.append(dict(method=method, nfe=nfe, **compare(feats, reference, scorer, cfg)))
    verdicts = {f'consistency-{steps}': verdict(feats_of[('consistency', steps)], reference, margin, scorer, cfg)
                for steps, margin in CONSISTENCY_MARGINS.items()}
    limit = TRAINING_FREE_NFE['inf' if D is None else 'finite']
    free = {f'{method}-{nfe}': verdict(feats, reference, TRAINING_FREE_MARGIN, scorer, cfg)
            for (method, nfe), feats in feats_of.items()
            if method not in ('consistency',) and (method, nfe) != teacher_key and nfe <= limit}
    outcomes = [v['outcome'] for v in free.values()]
    best = min(free, key=lambda k: free[k]['contrast']) if free else None
    verdicts['training-free'] = dict(
        nfe_limit=limit, margin=TRAINING_FREE_MARGIN, best=best, entries=free,
        outcome='met' if 'met' in outcomes else 'missed' if outcomes and set(outcomes) == {'missed'} else 'undecided')
    teacher_fd = paired.frechet_of(reference, scorer.mu_ref, scorer.sigma_ref)
    teacher_sets = [paired.frechet_of(reference[k * cfg['num']:(k + 1) * cfg['num']], scorer.mu_ref,
                                      scorer.sigma_ref) for k in range(cfg['sets'])]
    print(f'{label}: teacher Heun-{teacher_key[1]} FD-digits {teacher_fd:.2f}; ' +
          ', '.join(f'{k}: {v["outcome"]}' for k, v in verdicts.items()))
    return dict(model=teacher['name'], D=D, train_seed=teacher['seed'], teacher_kimg=teacher['kimg'],
                tune_kimg=final_kimg, teacher=dict(nfe=teacher_key[1], fd=teacher_fd, sets=teacher_sets),
                rows=rows, curve=curve, verdicts=verdicts)


# ----------------------------------------------------------------------------
# Results.


def write_results(results: str, measured: list[dict], cfg: dict, started: float, load: tuple) -> None:
    os.makedirs(results, exist_ok=True)
    write_json(os.path.join(results, 'fewstep.json'), dict(config=cfg, models=measured,
                                                            **machine_record(started, load)))
    lines = ['| D | method | NFE | FD-digits | ratio to Heun-35 | paired diff (95% CI), all seeds | per set |',
             '|---|---|---|---|---|---|---|']
    for m in measured:
        lines.append(f'| {model_label(m["D"])} | Heun (teacher) | {m["teacher"]["nfe"]} | {m["teacher"]["fd"]:.2f} '
                     f'| 1 | 0 | ' + ', '.join(f'{v:.1f}' for v in m['teacher']['sets']) + ' |')
        for row in sorted(m['rows'], key=lambda r: (r['method'] != 'consistency', r['method'], r['nfe'])):
            lines.append(f'| {model_label(m["D"])} | {row["method"]} | {row["nfe"]} | {row["fd"]:.2f} '
                         f'| {row["ratio"]:.2f} | {row["diff"]:+.2f} ({row["ci"][0]:+.2f}, {row["ci"][1]:+.2f}) | '
                         + ', '.join(f'{s["diff"]:+.1f}' for s in row['sets']) + ' |')
    lines += ['', '| D | goal | margin | FD - margin x FD(teacher) (95% CI) | outcome |', '|---|---|---|---|---|']
    for m in measured:
        for goal, v in m['verdicts'].items():
            if goal == 'training-free':
                shown = v['entries'].get(v['best']) if v['best'] else None
                detail = (f'best {v["best"]}: {shown["contrast"]:+.2f} ({shown["ci"][0]:+.2f}, {shown["ci"][1]:+.2f})'
                          if shown else 'no entry')
                lines.append(f'| {model_label(m["D"])} | training-free, NFE <= {v["nfe_limit"]} | {v["margin"]} | '
                             f'{detail} | {v["outcome"]} |')
            else:
                lines.append(f'| {model_label(m["D"])} | {goal} | {v["margin"]} | {v["contrast"]:+.2f} '
                             f'({v["ci"][0]:+.2f}, {v["ci"][1]:+.2f}) | {v["outcome"]} |')
    with open(os.path.join(results, 'fewstep.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    for m in measured:
        series = {}
        for method in sorted({r['method'] for r in m['rows']}):
            rows = sorted((r for r in m['rows'] if r['method'] == method), key=lambda r: r['nfe'])
            series[method] = ([r['nfe'] for r in rows], [r['fd'] for r in rows])
        series['Heun (teacher)'] = ([m['teacher']['nfe']], [m['teacher']['fd']])
        line_chart(series, os.path.join(results, f'fewstep-{model_name(m["D"])}.png'),
                   title=f'FD-digits vs NFE, {model_label(m["D"])}', xlabel='NFE',
                   ylabel=f'FD-digits ({cfg["num"] * cfg["sets"]} images)', log_x=True, log_y=True)
    curves = {}
    for m in measured:
        for steps in (1, 2):
            curves[f'{model_label(m["D"])}, {steps} step{"s" if steps > 1 else ""}'] = (
                [p['kimg'] for p in m['curve']], [p[f'fd_{steps}'] for p in m['curve']])
    line_chart(curves, os.path.join(results, 'consistency-curve.png'), title='Consistency tuning',
               xlabel='tuning kimg', ylabel=f'FD-digits ({cfg["num"]} images)', log_y=True)
    print(f'Wrote {results}/fewstep.json, fewstep.md and the figures')


@click.command()
@click.option('--quick', is_flag=True, help='Tiny budget (a test of the pipeline, not a result)')
@click.option('--model-set', 'model_set', metavar='DIR', default='model-set-out', show_default=True,
              help='The trained model set (python -m demo.model_set --outdir)')
@click.option('--outdir', metavar='DIR', default='fewstep-out', show_default=True, help='Working folder')
@click.option('--results', metavar='DIR', default='docs/fewstep', show_default=True, help='Tables and figures')
@click.option('--aug-dims', metavar='LIST', default=None,
              help=f'Teachers\' D  [default: {FULL["aug_dims"]}; --quick {QUICK["aug_dims"]}]')
@click.option('--train-seed', type=click.IntRange(min=0), default=None, help='Teachers\' training seed  [default: 0]')
@click.option('--num', type=click.IntRange(min=2), default=None, help=f'Images per set  [default: {FULL["num"]}]')
@click.option('--sets', type=click.IntRange(min=1), default=None, help=f'Disjoint seed sets  [default: {FULL["sets"]}]')
@click.option('--solvers', metavar='LIST', default=None,
              help=f'Training-free solvers, each NAME[:ORDER[:SPACING]]  [default: {FULL["solvers"]}]')
@click.option('--nfe', metavar='LIST', default=None,
              help=f'NFE of the multistep solvers, each >= 3  [default: {FULL["nfe"]}]')
@click.option('--tune-kimg', type=cli.float_range(min=0, min_open=True), default=None,
              help=f'Consistency tuning length  [default: {FULL["tune_kimg"]:g}]')
@click.option('--lr', type=cli.float_range(min=0, min_open=True), default=None,
              help=f'Tuning learning rate  [default: {FULL["lr"]:g}]')
@click.option('--ema', type=cli.float_range(min=0), default=None,
              help=f'Tuning EMA half-life, Mimg  [default: {FULL["ema"]:g}]')
@click.option('--nproc', type=click.IntRange(min=1), default=None, help='torchrun processes  [default: 2]')
def main(quick: bool, model_set: str, outdir: str, results: str, **overrides: Any) -> None:
    """Measure consistency tuning and the training-free few-step solvers against each teacher's Heun-35."""
    started, load = time.time(), os.getloadavg()
    cfg = dict(QUICK if quick else FULL, **{k: v for k, v in overrides.items() if v is not None})
    cfg['nfe'] = number_list(str(cfg['nfe']), '--nfe', kind=int, minimum=3, sort=True)   # multistep solvers need 3
    cfg['heun_steps'] = number_list(str(cfg['heun_steps']), '--heun-steps', kind=int, minimum=1, sort=True)
    cfg['solvers'] = [s for s in str(cfg['solvers']).split(',') if s]
    resolved = [solver_options(entry) for entry in cfg['solvers']]   # refuse a bad entry before any work
    if not resolved:
        raise click.BadParameter('no solver given; expected NAME[:ORDER[:SPACING]],...', param_hint='--solvers')
    if len({tuple(sorted(o.items(), key=str)) for o in resolved}) != len(resolved):
        raise click.BadParameter(f'"{",".join(cfg["solvers"])}" names one setting twice', param_hint='--solvers')
    aug_dims = parse_aug_dims(cfg['aug_dims'])
    models = trained_models(os.path.abspath(model_set))
    teachers = []
    for D in aug_dims:
        found = [m for m in models if m['D'] == D and m['seed'] == cfg['train_seed']]
        if not found:
            raise click.ClickException(f'{model_set}: no {model_label(D)} model with training seed '
                                       f'{cfg["train_seed"]}; train it with python -m demo.model_set')
        teachers.append(found[0])
    outdir = os.path.abspath(outdir)
    dataset = make_digits_dataset(outdir)
    scorer = Scorer(dataset, dict(num=cfg['num'], steps=cfg['teacher_steps'], bootstrap=cfg['bootstrap']))
    measured = [measure_model(outdir, dataset, scorer, teacher, cfg) for teacher in teachers]
    write_results(results, measured, cfg, started, load)


if __name__ == '__main__':
    main()
