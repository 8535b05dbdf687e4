"""The reference model set: the demo's DDPM++ on the 16x16 digits for each D (default 16, 128, 2048 and inf =
diffusion) and several training seeds, each trained until its FD-digits stops improving.

Every model trains in doubling stages (``--first-kimg``, then twice that, four times...), ``train.py`` continuing
the same run with ``--resume=auto`` at each stage. After each stage its last snapshot generates the same fixed seeds
(``--num`` images, Heun with ``--steps`` steps) in memory, scored with FD-digits (the Frechet distance in the
features of ``demo/digits-classifier.weights.pt`` against all 1,797 real digits; not FID). The gain of a stage is the
paired difference FD(previous stage) - FD(this stage) on those seeds, and its standard error the standard deviation
of its paired bootstrap (:func:`evaluation.paired.paired_fd_difference`; Efron & Tibshirani 1993). A model stops when
the last doubling of kimg gained less than its own standard error, or after ``--max-stages`` stages.

Everything is resumable: each stage is recorded beside its run (``runs/<model>.json``, with the features of its
images in ``runs/<model>-features/``), and a rerun continues where the records end; a model whose training settings
changed starts over. The training curves go to ``--results`` as ``model-set.json`` (with the machine, wall time and
CPU time) and ``model-set.png``.

Usage: python -m demo.model_set [--quick] [--outdir=model-set-out] [--results=docs/model-set]
"""

from __future__ import annotations

import io
import math
import os
import platform
import re
import resource
import shutil
import sys
import time
from typing import Any, Callable, Optional, Sequence

import click
import numpy as np
import torch

import dnnlib
from dnnlib.util import file_sha256
from demo import digits
from demo.digits import (launcher, load_digits_dataset, make_digits_dataset, model_label, model_name, number_list,
                         parse_aug_dims, run_tool)
from demo.plots import line_chart
from demo.run import DIGITS_DETECTOR, TRAIN_FLAGS
from evaluation import features, metrics, paired
from formats import network_io

RECORD_FORMAT = 1   # bump when the meaning of a record changes, so old records are not reused
METRICS_SEED = 0    # seed of the bootstrap resamples: the records are reproducible
PHEMA_TRACKED = '0.05,0.1'   # the power-function EMAs tracked with --phema (EDM2's pair)

# Sizes of the two modes; every entry can be overridden by the option of the same name.
FULL = dict(aug_dims='16,128,2048,inf', train_seeds='0,1', first_kimg=10.0, max_stages=8, num=500, steps=18,
            bootstrap=200, nproc=2, phema=None)
QUICK = dict(aug_dims='16,inf', train_seeds='0,1', first_kimg=0.064, max_stages=2, num=24, steps=3, bootstrap=20,
             nproc=1, phema=None)


# ----------------------------------------------------------------------------
# Records.


def read_record(path: str) -> Optional[dict]:
    return digits.read_record(path, RECORD_FORMAT)


def write_json(path: str, record: dict) -> None:
    digits.write_record(path, dnnlib.util.json_safe(record), RECORD_FORMAT)


def save_features(path: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with dnnlib.util.atomic_write(path) as f:
        f.write(buffer.getvalue())


# ----------------------------------------------------------------------------
# Scoring: FD-digits of a snapshot's images for the fixed seeds.


class Scorer:
    """Features of the images a snapshot generates for seeds 0..num-1, and their FD-digits against all real
    digits (the moments ``fid.py ref`` would write for the dataset)."""

    def __init__(self, dataset: str, cfg: dict):
        self.device = torch.device('cpu')
        self.detector = features.load_detector(DIGITS_DETECTOR, device=self.device)
        real, _ = load_digits_dataset(dataset)
        # float64 [1797, F] features of every real digit, kept for studies that score subsets of them.
        self.real_features = features.extract_features(self.detector, real).numpy().astype(np.float64)
        self.mu_ref, self.sigma_ref = metrics.feature_moments(self.real_features)
        self.seeds = list(range(cfg['num']))
        self.sampling = dict(num_steps=cfg['steps'])
        self.identity = dict(detector_sha256=file_sha256(DIGITS_DETECTOR), num=cfg['num'], steps=cfg['steps'],
                             bootstrap=cfg['bootstrap'])

    def features_of(self, snapshot: str, D: Optional[float]) -> np.ndarray:
        """float64 [num, F] detector features of the snapshot's images, in seed order."""
        return self.features(network_io.load_network(snapshot, self.device), D, self.seeds, **self.sampling)

    def features(self, net: torch.nn.Module, D: Optional[float], seeds: Sequence[int],
                 **sampler_kwargs: Any) -> np.ndarray:
        """float64 [len(seeds), F] detector features of the images ``net`` generates for ``seeds`` (sorted) with
        these sampler options (:func:`sampling.pipeline.sample_batch`'s keywords), made in memory."""
        found = features.calculate_features_for_network(net, seeds, {metrics.INCEPTION: self.detector},
                                                        keep={metrics.INCEPTION}, max_batch_size=100,
                                                        device=self.device, D=D, **sampler_kwargs)
        return found[metrics.INCEPTION].features.astype(np.float64)

    def fd(self, feats: np.ndarray) -> float:
        return paired.frechet_of(feats, self.mu_ref, self.sigma_ref)


# ----------------------------------------------------------------------------
# Training in doubling stages.


def train_flags(D: Optional[float], seed: int, cfg: dict) -> list[str]:
    """train.py's flags of a model but its duration: the demo's recipe with this training seed and kernel."""
    kernel = ['--pfgmpp=0'] if D is None else ['--pfgmpp=1', f'--aug_dim={D:g}']
    if cfg.get('phema'):
        kernel.append(f'--phema={PHEMA_TRACKED}')
    tick = max(cfg['first_kimg'] / 5, 0.064)
    # A state every five ticks besides the one at each stage's end: an interruption loses little training.
    return [*(f for f in TRAIN_FLAGS if not f.startswith('--seed=')), f'--seed={seed}', *kernel, f'--tick={tick:g}',
            '--snap=1000', '--dump=5']


def newest_snapshot(run_dir: str) -> str:
    """The network snapshot written last (stage ends below 1 kimg share a file name, so by time, then name); not
    the power-function EMAs of ``--phema`` (``network-snapshot-KKKKKKK-S.SSS.pkl``)."""
    found = [os.path.join(run_dir, n) for n in os.listdir(run_dir) if re.fullmatch(r'network-snapshot-\d+\.pkl', n)]
    if not found:
        raise click.ClickException(f'{run_dir}: train.py wrote no network snapshot')
    return max(found, key=lambda path: (os.path.getmtime(path), path))


def train_model(workdir: str, dataset: str, scorer: Scorer, D: Optional[float], seed: int, cfg: dict) -> dict:
    """Train the model (D, seed) stage by stage until it stops; returns its record (stages and why it stopped).

    Stage k trains to first_kimg * 2^k kimg; each finished stage is recorded with its FD-digits and its gain, so a
    rerun resumes after the last recorded stage (train.py continues from the newest training state).
    """
    name = f'{model_name(D)}-seed{seed}'
    runs = os.path.join(workdir, 'runs')
    run_dir, record_path = os.path.join(runs, name), os.path.join(runs, f'{name}.json')
    feature_dir = os.path.join(runs, f'{name}-features')
    flags = train_flags(D, seed, cfg)
    settings = dict(flags=flags, nproc=cfg['nproc'], first_kimg=cfg['first_kimg'],
                    dataset_sha256=file_sha256(dataset), **scorer.identity)
    record = read_record(record_path)
    if record is None or record['settings'] != settings:
        for path in (run_dir, feature_dir):
            if os.path.isdir(path):
                print(f'{name}: {path} was made with other settings (or has no record); starting it over')
                shutil.rmtree(path)
        record = dict(name=name, D=D, seed=seed, settings=settings, stages=[], stopped=None)
        write_json(record_path, record)
    if record['stages']:
        print(f'{name}: reusing {len(record["stages"])} recorded stage(s)')
    while record['stopped'] != 'converged':
        stage = len(record['stages'])
        if stage >= cfg['max_stages']:
            record['stopped'] = 'max_stages'
            break
        kimg = cfg['first_kimg'] * 2 ** stage
        started = time.time()
        # One thread per rank: the ranks already fill the cores, and more threads would only contend.
        run_tool([*launcher(cfg['nproc']), 'train.py', f'--outdir={runs}', f'--name={name}', f'--data={dataset}',
                  *flags, f'--duration={kimg / 1000:g}', '--resume=auto'], env={'OMP_NUM_THREADS': '1'})
        snapshot = newest_snapshot(run_dir)
        feats = scorer.features_of(snapshot, D)
        save_features(os.path.join(feature_dir, f'stage{stage}.npy'), feats)
        entry = dict(stage=stage, kimg=kimg, fd=scorer.fd(feats), snapshot=os.path.relpath(snapshot, runs),
                     snapshot_sha256=file_sha256(snapshot), seconds=round(time.time() - started, 1))
        if stage > 0:
            previous = np.load(os.path.join(feature_dir, f'stage{stage - 1}.npy'))
            gain = paired.paired_fd_difference(previous, feats, scorer.mu_ref, scorer.sigma_ref,
                                               np.random.default_rng(METRICS_SEED), cfg['bootstrap'])
            entry.update(gain=gain.diff, gain_se=gain.diff_se, gain_ci=[gain.ci_low, gain.ci_high])
        record['stages'].append(entry)
        print(f'{name}: {kimg:g} kimg, FD-digits {entry["fd"]:.2f}'
              + (f', gain {entry["gain"]:.2f} +- {entry["gain_se"]:.2f}' if stage > 0 else ''))
        if stage > 0 and entry['gain'] < entry['gain_se']:
            record['stopped'] = 'converged'
        write_json(record_path, record)
    if cfg.get('phema'):
        pick_phema(runs, scorer, record, cfg)
    write_json(record_path, record)
    return record


def pick_phema(runs: str, scorer: Scorer, record: dict, cfg: dict) -> None:
    """Post-hoc EMA (EDM2) at the model's last stage: reconstruct each sigma_rel of ``--phema`` with
    reconstruct_phema.py, score it on the same seeds, and record every FD-digits and the best sigma_rel."""
    stage = len(record['stages']) - 1
    stds = sorted(float(v) for v in number_list(cfg['phema'], '--phema', minimum=0))
    done = record.get('phema')
    if done and done['stage'] == stage and done['sigma_rel'] == stds:
        return
    run_dir = os.path.join(runs, record['name'])
    outdir = os.path.join(run_dir, f'phema-stage{stage}')
    run_tool([sys.executable, 'reconstruct_phema.py', f'--indir={run_dir}', f'--outdir={outdir}',
              '--outstd=' + ','.join(f'{v:g}' for v in stds)])
    fds = {}
    for name in sorted(os.listdir(outdir)):
        if name.startswith('phema-') and name.endswith('.pkl'):
            std = float(name[:-4].rsplit('-', 1)[1])
            fds[f'{std:g}'] = scorer.fd(scorer.features_of(os.path.join(outdir, name), record['D']))
    best = min(fds, key=fds.get)
    record['phema'] = dict(stage=stage, sigma_rel=stds, fd=fds, best_sigma_rel=float(best), best_fd=fds[best])
    print(f'{record["name"]}: post-hoc EMA FD-digits ' + ', '.join(f'{k}: {v:.2f}' for k, v in fds.items())
          + f'; best sigma_rel {best}')


# ----------------------------------------------------------------------------
# The finished set, as the studies built on it read it.


def trained_models(outdir: str) -> list[dict]:
    """The models of the set under ``outdir`` (``python -m demo.model_set --outdir``) at their last recorded stage:
    dicts with name, D (None = diffusion), seed, kimg, fd, stopped, snapshot (absolute path) and features (the
    float64 [num, F] array of that stage, seeds 0..num-1, Heun with the set's steps), sorted by D then seed.
    Raises click.ClickException when ``outdir`` is not a folder, holds no recorded stage, or is unfinished: a model
    that has not converged stands at fewer kimg than another model (an interrupted run), which would compare
    models of different training lengths."""
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.ClickException(f'{outdir}: is a file; expected the --outdir folder of python -m demo.model_set')
    runs = os.path.join(outdir, 'runs')
    models = []
    for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        record = read_record(os.path.join(runs, name)) if name.endswith('.json') else None
        if record is None or not record.get('stages'):
            continue
        last = record['stages'][-1]
        models.append(dict(name=record['name'], D=record['D'], seed=record['seed'], kimg=last['kimg'],
                           fd=last['fd'], stopped=record['stopped'],
                           snapshot=os.path.join(runs, last['snapshot']), settings=record['settings'],
                           features=np.load(os.path.join(runs, f'{record["name"]}-features',
                                                         f'stage{last["stage"]}.npy'))))
    if not models:
        raise click.ClickException(f'{outdir}: no trained model recorded; run python -m demo.model_set '
                                   f'--outdir={outdir} first')
    longest = max(m['kimg'] for m in models)
    behind = [m['name'] for m in models if m['stopped'] != 'converged' and m['kimg'] < longest]
    if behind:
        raise click.ClickException(f'{outdir}: {", ".join(behind)} not converged and short of {longest:g} kimg; '
                                   f'finish the set first (rerun python -m demo.model_set with the flags that made it)')
    return sorted(models, key=lambda m: (math.inf if m['D'] is None else m['D'], m['seed']))


class FeatureStore:
    """Features of generated images kept on disk, one ``<key>.npy`` per setting with its settings in
    ``<key>.json``: :meth:`get` returns the stored array when the recorded settings equal the given ones and makes
    (and stores) it otherwise, so a study resumes where it stopped and redoes only what changed."""

    def __init__(self, folder: str):
        self.folder = folder

    def get(self, key: str, settings: dict, make: Callable[[], np.ndarray]) -> np.ndarray:
        path = os.path.join(self.folder, key)
        settings = dnnlib.util.json_safe(settings)
        record = read_record(path + '.json')
        if record is not None and record.get('settings') == settings and os.path.isfile(path + '.npy'):
            return np.load(path + '.npy')
        started = time.time()
        array = make()
        save_features(path + '.npy', array)
        write_json(path + '.json', dict(settings=settings, seconds=round(time.time() - started, 1)))
        return array


def machine_record(started: float, load_at_start: tuple[float, float, float]) -> dict:
    """The machine and this process's wall and CPU time (its own and its children's), for a study's JSON."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return dict(machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                             cpu_capability=torch.backends.cpu.get_cpu_capability(), torch=torch.__version__,
                             threads=torch.get_num_threads(), load_average_at_start=list(load_at_start)),
                wall_s=round(time.time() - started, 1),
                cpu_s=round(sum(u.ru_utime + u.ru_stime for u in usage), 1))


# ----------------------------------------------------------------------------
# Results.


def compare_with_diffusion(workdir: str, scorer: Scorer, records: list[dict], cfg: dict) -> dict[str, dict]:
    """Each finite D against D = inf at each model's last stage: the two-level paired bootstrap over training seeds
    and image seeds (the same seeds for every model), where both D have the same training seeds."""
    last = {}
    for record in records:
        path = os.path.join(workdir, 'runs', f'{record["name"]}-features', f'stage{len(record["stages"]) - 1}.npy')
        last.setdefault(model_name(record['D']), {})[record['seed']] = np.load(path)
    result = {}
    base = last.get(model_name(None), {})
    for name, by_seed in last.items():
        if name == model_name(None) or not base or sorted(by_seed) != sorted(base):
            continue
        seeds = sorted(by_seed)
        comparison = paired.paired_fd_difference([by_seed[s] for s in seeds], [base[s] for s in seeds],
                                                 scorer.mu_ref, scorer.sigma_ref,
                                                 np.random.default_rng(METRICS_SEED), cfg['bootstrap'])
        result[name] = comparison.as_dict()
    return result


def write_results(results: str, records: list[dict], versus_inf: dict, cfg: dict, started: float,
                  load_at_start: tuple[float, float, float]) -> None:
    """``model-set.json`` (every model's stages, D against D = inf, the machine, this invocation's wall and CPU time,
    the load average when it started and the seconds of every recorded stage over all invocations) and the PNG."""
    summary = dict(
        config={k: v for k, v in cfg.items()},
        models=[dict(name=r['name'], D=r['D'], seed=r['seed'], stopped=r['stopped'], phema=r.get('phema'),
                     stages=[{k: v for k, v in s.items() if k != 'snapshot'} for s in r['stages']]) for r in records],
        versus_inf=versus_inf,
        stage_seconds_total=round(sum(s['seconds'] for r in records for s in r['stages']), 1),
        **machine_record(started, load_at_start))
    write_json(os.path.join(results, 'model-set.json'), summary)
    series = {f'{model_label(r["D"])}, seed {r["seed"]}': ([s['kimg'] for s in r['stages']],
                                                           [s['fd'] for s in r['stages']]) for r in records}
    line_chart(series, os.path.join(results, 'model-set.png'), title='Training curves of the reference model set',
               xlabel='kimg', ylabel=f'FD-digits ({cfg["num"]} images, Heun {cfg["steps"]} steps)', log_x=True)
    print(f'Wrote {results}/model-set.json and {results}/model-set.png')


@click.command()
@click.option('--quick', is_flag=True, help='Tiny budget (a test of the pipeline, not a result)')
@click.option('--outdir', metavar='DIR', default='model-set-out', show_default=True,
              help='Working folder (runs, records)')
@click.option('--results', metavar='DIR', default='docs/model-set', show_default=True,
              help='Where the curves (JSON, PNG) go')
@click.option('--aug-dims', metavar='LIST', default=None,
              help=f'D values, "inf" = diffusion  [default: {FULL["aug_dims"]}]')
@click.option('--train-seeds', metavar='LIST', default=None,
              help=f'Training seeds per D  [default: {FULL["train_seeds"]}]')
@click.option('--first-kimg', metavar='KIMG', type=float, default=None,
              help=f'First stage  [default: {FULL["first_kimg"]:g}]')
@click.option('--max-stages', metavar='INT', type=click.IntRange(min=1), default=None,
              help=f'Most doubling stages per model  [default: {FULL["max_stages"]}]')
@click.option('--num', metavar='INT', type=click.IntRange(min=2), default=None,
              help=f'Images scored  [default: {FULL["num"]}]')
@click.option('--steps', metavar='INT', type=click.IntRange(min=1), default=None,
              help=f'Heun steps  [default: {FULL["steps"]}]')
@click.option('--bootstrap', metavar='INT', type=click.IntRange(min=2), default=None,
              help=f'Resamples of the gain  [default: {FULL["bootstrap"]}]')
@click.option('--nproc', metavar='INT', type=click.IntRange(min=1), default=None, help=f'torchrun processes  [default: '
              f'{FULL["nproc"]}]')
@click.option('--phema', default=None, metavar='LIST', help='Post-hoc EMA: train tracking EDM2\'s power EMAs and '
              'pick the best of these sigma_rel (e.g. 0.05,0.1,0.15) per model  [default: off]')
def main(quick: bool, outdir: str, results: str, **overrides: Any) -> None:
    """Train (or continue) the reference model set and publish its training curves."""
    started, load_at_start = time.time(), os.getloadavg()
    cfg = dict(QUICK if quick else FULL, **{k: v for k, v in overrides.items() if v is not None})
    if cfg['first_kimg'] <= 0:
        raise click.BadParameter('expected a positive number of kimg', param_hint='--first-kimg')
    aug_dims = parse_aug_dims(cfg['aug_dims'])
    seeds = number_list(cfg['train_seeds'], '--train-seeds', kind=int, minimum=0)
    outdir = os.path.abspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    dataset = make_digits_dataset(outdir)
    scorer = Scorer(dataset, cfg)
    records = [train_model(outdir, dataset, scorer, D, seed, cfg) for D in aug_dims for seed in seeds]
    write_results(results, records, compare_with_diffusion(outdir, scorer, records, cfg), cfg, started,
                  load_at_start)


if __name__ == '__main__':
    main()
