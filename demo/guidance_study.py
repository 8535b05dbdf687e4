"""Guidance and post-hoc EMA on a trained class-conditional digits model, for D = 128 and D = infinity.

The study behind the README's "Guidance and post-hoc EMA" results. For each D it

1. trains, with the same recipe, budget and seed, a class-conditional DDPM++ on the 16x16 digits of the demo
   (``train.py --cond=1 --label-dropout=0.1 --phema=...``), so that one network serves classifier-free guidance
   through its own dropped label (``--gnet=uncond``) and tracks power-function EMAs besides the classic ``--ema``;
2. trains the autoguidance guide the way EDM2 builds one: the same recipe with fewer channels for a shorter time;
3. measures FD-digits (``fid.py gen`` with the digits classifier shipped in ``demo/``, against all real digits)
   over a sweep of the guidance weight W for CFG and for autoguidance, several disjoint seed ranges per point;
4. reconstructs post-hoc EMA snapshots for a grid of sigma_rel (``reconstruct_phema.py``) and measures them
   unguided, with the classic-EMA snapshot as the reference;
5. writes ``results.json``, ``results.md`` (the tables) and the charts into ``--results``.

Every step runs the project's command-line tools as a user would. The study resumes: a run whose recorded
settings match is reused (continued from its last training state when unfinished), and a measured point is
reused when its settings, including the content hashes of the networks and of the reference statistics, match.

    python -m demo.guidance_study --outdir=guidance-out --results=docs/guidance
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
import shutil
import sys
import time
from typing import Any, Callable, Optional, Sequence

import click
import numpy as np

import dnnlib
from cli import common as cli
from dnnlib.util import file_sha256
from demo.digits import make_digits_dataset, number_list, run_tool
from demo.plots import line_chart
from demo.run import DIGITS_DETECTOR, TRAIN_FLAGS
from evaluation import paired
from training import phema

# The demo's recipe, class-conditional; only the flags below differ between the runs of the study.
COND_FLAGS = [flag for flag in TRAIN_FLAGS if not flag.startswith(('--cond=', '--cbase='))] + ['--cond=1']
MAIN_CBASE = 32            # the demo's network
RUN_MARKER = 'study-run.json'    # written into a run directory: the flags it was trained with, and when it finished
POINT_PREFIX = 'fd-'
FD_NAME = 'FD-digits'
INF_LABEL = 'inf'


def parse_floats(text: str, flag: str) -> list[float]:
    """``"1,1.5,2"`` as finite floats, in the order given (the measurement order); a click error naming ``flag``."""
    return number_list(text, flag)


def d_label(D: Optional[int]) -> str:
    """``128`` or ``inf``: the kernel as it appears in names and tables."""
    return INF_LABEL if D is None else str(D)


def d_caption(label: str) -> str:
    """A kernel label as tables and legends show it: ``128`` or ``∞``."""
    return '∞' if label == INF_LABEL else label


def kernel_flags(D: Optional[int]) -> list[str]:
    return ['--pfgmpp=0'] if D is None else ['--pfgmpp=1', f'--aug_dim={D}']


def read_json(path: str) -> Optional[Any]:
    """The JSON in ``path``, or None when it does not exist or is not valid JSON (an interrupted writer)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with dnnlib.util.atomic_write(path, 'w') as f:
        json.dump(data, f, indent=2)
        f.write('\n')


# ----------------------------------------------------------------------------
# Training runs.

def torchrun(nproc: int) -> list[str]:
    """The launcher of every heavy step; the callers run it with one thread per rank (the ranks fill the cores,
    more threads would only contend)."""
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']


def train_flags(D: Optional[int], cbase: int, kimg: float, label_dropout: float, phema_stds: Sequence[float],
                ticks: int) -> list[str]:
    """The train.py flags of one run of the study (dataset and output paths aside)."""
    flags = [*COND_FLAGS, f'--cbase={cbase}', f'--label-dropout={label_dropout:g}', *kernel_flags(D),
             f'--duration={kimg / 1000:g}', f'--tick={kimg / ticks:g}', '--snap=1', f'--dump={max(ticks // 4, 1)}']
    if phema_stds:
        flags.append('--phema=' + ','.join(f'{s:g}' for s in phema_stds))
    return flags


def classic_snapshots(run_dir: str) -> list[str]:
    """The classic-EMA snapshots ``network-snapshot-KKKKKK.pkl`` of a run, oldest first."""
    pattern = re.compile(r'network-snapshot-\d{6}\.pkl')
    return sorted(p for p in glob.glob(os.path.join(run_dir, 'network-snapshot-*.pkl'))
                  if pattern.fullmatch(os.path.basename(p)))


def run_state(run_dir: str, flags: list[str]) -> str:
    """What to do with ``run_dir`` for a run with ``flags``: 'new', 'resume' or 'done'.

    Raises click.ClickException when the directory holds a run of other settings (never overwritten).
    """
    if not os.path.isdir(run_dir):
        return 'new'
    marker = read_json(os.path.join(run_dir, RUN_MARKER))
    if marker is None:
        raise click.ClickException(f'{run_dir}: exists but was not made by this study ({RUN_MARKER} missing); '
                                   'move it away or choose another --outdir')
    if marker.get('flags') != flags:
        raise click.ClickException(f'{run_dir}: trained with other settings ({RUN_MARKER}); move it away or '
                                   'choose another --outdir')
    if marker.get('finished') and classic_snapshots(run_dir):
        return 'done'
    return 'resume' if glob.glob(os.path.join(run_dir, 'training-state-*.pt')) else 'new'


def train(runs_dir: str, name: str, dataset: str, flags: list[str], nproc: int,
          runner: Callable[..., str] = run_tool) -> str:
    """Train (or continue, or reuse) the run ``name``; returns the path of its final classic-EMA snapshot."""
    run_dir = os.path.join(runs_dir, name)
    state = run_state(run_dir, flags)
    if state != 'done':
        resume = []
        if state == 'new':
            shutil.rmtree(run_dir, ignore_errors=True)
            write_json(os.path.join(run_dir, RUN_MARKER), dict(flags=flags, finished=False))
        else:
            resume = ['--resume=auto']
        started = time.time()
        runner([*torchrun(nproc), 'train.py', f'--outdir={runs_dir}', f'--name={name}', f'--data={dataset}', *flags,
                *resume], env={'OMP_NUM_THREADS': '1'})
        write_json(os.path.join(run_dir, RUN_MARKER),
                   dict(flags=flags, finished=True, wall_s=round(time.time() - started, 1)))
    return classic_snapshots(run_dir)[-1]


def reconstruct(run_dir: str, outdir: str, stds: Sequence[float], runner: Callable[..., str] = run_tool) -> dict:
    """Post-hoc EMA snapshots ``{sigma_rel: path}`` at the end of ``run_dir`` (reused when present and newer than
    the run's last tracked snapshot)."""
    tracked = sorted(glob.glob(os.path.join(run_dir, 'network-snapshot-???????-?.???.pkl')))
    if not tracked:
        raise click.ClickException(f'{run_dir}: no tracked power-function EMA snapshots (trained without --phema?)')
    kimg = os.path.basename(tracked[-1]).split('-')[2]
    paths = {std: os.path.join(outdir, phema.snapshot_name(phema.OUTPUT_PREFIX, int(kimg) * 1000, std))
             for std in stds}
    newest_input = max(os.path.getmtime(p) for p in tracked)
    if not all(os.path.exists(p) and os.path.getmtime(p) >= newest_input for p in paths.values()):
        runner([sys.executable, 'reconstruct_phema.py', f'--indir={run_dir}', f'--outdir={outdir}',
                '--outstd=' + ','.join(f'{s:g}' for s in stds), f'--outkimg={int(kimg)}'])
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        raise click.ClickException(f'reconstruct_phema.py did not write {missing[0]}')
    return paths


def reconstruction_errors(run_dir: str, stds: Sequence[float]) -> dict[str, float]:
    """``{sigma_rel: relative profile error}`` of the reconstructions at the end of ``run_dir``: how far the
    least-squares combination of the tracked profiles lies from each requested one (0 for a tracked sigma_rel)."""
    snapshots = phema.list_tracked_snapshots(run_dir)
    end = max(s.nimg for s in snapshots)
    used = [s for s in snapshots if 0 < s.nimg <= end]
    in_nimg, in_std = [s.nimg for s in used], [s.std for s in used]
    coefficients = phema.solve_coefficients(in_nimg, in_std, end, list(stds))
    errors = phema.profile_error(in_nimg, in_std, coefficients, end, list(stds))
    return {f'{std:g}': float(error) for std, error in zip(stds, errors)}


# ----------------------------------------------------------------------------
# Measurements: one fid.py gen call per point, several disjoint seed ranges.

def point_settings(network: str, gnet: Optional[str], weight: float, num: int, repeat: int, sampler: list[str],
                   ref: str) -> dict:
    """Everything that decides a point's FD values, networks and reference statistics by content."""
    return dict(network=os.path.basename(network), network_sha256=file_sha256(network),
                gnet=None if gnet is None or weight == 1 else
                ('uncond' if gnet == 'uncond' else dict(name=os.path.basename(gnet), sha256=file_sha256(gnet))),
                guidance=weight if gnet is not None else 1.0, seeds=f'0-{num - 1}', repeat=repeat,
                sampler=sampler, ref_sha256=file_sha256(ref), detector_sha256=file_sha256(DIGITS_DETECTOR))


def stored_point(path: str, settings: dict) -> Optional[dict]:
    """The stored result at ``path`` when it was measured with exactly ``settings``, else None."""
    stored = read_json(path)
    if isinstance(stored, dict) and stored.get('settings') == settings and stored.get('fd'):
        return stored
    return None


def fd_values_from_jsonl(path: str, repeat: int) -> list[float]:
    """The per-seed-range FDs of one fid.py gen call, from its --jsonl lines (one per range, then a summary)."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    values = [r.get('fd_digits', r.get('fid')) for r in records  # fid.py names the digits classifier's FD fd_digits
              if 'repeat' in r and {'fd_digits', 'fid'} & set(r) and not isinstance(r['repeat'], list)]
    if len(values) != repeat:
        raise click.ClickException(f'{path}: expected {repeat} FD lines from fid.py gen, found {len(values)}')
    return [float(v) for v in values]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def measure_point(points_dir: str, key: str, network: str, gnet: Optional[str], weight: float, num: int,
                  repeat: int, sampler: list[str], ref: str, nproc: int,
                  runner: Callable[..., str] = run_tool) -> dict:
    """FD-digits of one setting over ``repeat`` disjoint ranges of ``num`` seeds; reused when already measured."""
    settings = point_settings(network, gnet, weight, num, repeat, sampler, ref)
    path = os.path.join(points_dir, f'{POINT_PREFIX}{key}.json')
    stored = stored_point(path, settings)
    if stored is not None:
        print(f'Reusing {path}: {FD_NAME} {stored["mean"]:.2f} ± {stored["std"]:.2f}')
        return stored
    os.makedirs(points_dir, exist_ok=True)
    jsonl = path + '.jsonl.tmp'
    if os.path.exists(jsonl):
        os.remove(jsonl)
    guidance = [] if gnet is None or weight == 1 else [f'--gnet={gnet}', f'--guidance={weight:g}']
    started = time.time()
    runner([*torchrun(nproc), 'fid.py', 'gen', f'--network={network}', *guidance, f'--seeds=0-{num - 1}',
            f'--repeat={repeat}', *sampler, f'--ref={ref}', f'--detector={DIGITS_DETECTOR}', '--device=cpu',
            f'--jsonl={jsonl}'], env={'OMP_NUM_THREADS': '1'})
    values = fd_values_from_jsonl(jsonl, repeat)
    os.remove(jsonl)
    mean, std = mean_std(values)
    result = dict(settings=settings, fd=values, mean=mean, std=std, wall_s=round(time.time() - started, 1))
    write_json(path, result)
    return result


# ----------------------------------------------------------------------------
# Report.

def _signed(value: float) -> str:
    """``+4.9`` or ``−10.8`` (a true minus sign, as in the docs)."""
    return f'{value:+.1f}'.replace('-', '−')


def paired_by_range(point: dict, base: dict) -> Optional[paired.PairedResult]:
    """FD(point) - FD(base) paired by seed range with Student's t interval over the ranges
    (:func:`evaluation.paired.paired_t_interval`), or None when the two were not scored on the same number of
    ranges or on fewer than 2."""
    if len(point['fd']) != len(base['fd']) or len(point['fd']) < 2:
        return None
    return paired.paired_t_interval(point['fd'], base['fd'])


def verdict(result: paired.PairedResult) -> str:
    """'worse' (higher FD) or 'better' when the interval excludes 0, else 'undecided'."""
    return 'worse' if result.ci_low > 0 else 'better' if result.ci_high < 0 else 'undecided'


def _difference(result: paired.PairedResult) -> str:
    """``Δ +4.9, 95% CI −10.8 to +20.6, undecided``."""
    return (f'Δ {_signed(result.diff)}, {result.confidence:.0%} CI {_signed(result.ci_low)} to '
            f'{_signed(result.ci_high)}, {verdict(result)}')


def _cell(point: Optional[dict], base: Optional[dict] = None) -> str:
    """``mean ± std`` of a reference point; with ``base`` the mean and the difference to ``base`` paired by seed
    range (same seeds, so much of the sampling noise cancels) with its t interval over the ranges and a verdict."""
    if point is None:
        return '–'
    result = None if base is None else paired_by_range(point, base)
    if result is None:
        return f'{point["mean"]:.1f} ± {point["std"]:.1f}'
    return f'{point["mean"]:.1f} ({_difference(result)})'


def _kernel_cell(first: Optional[dict], second: Optional[dict]) -> str:
    """FD(first) - FD(second) paired by seed range, without the values: two kernels at one setting or two guidance
    methods at one W (the same seeds throughout the study)."""
    result = None if first is None or second is None else paired_by_range(first, second)
    return '–' if result is None else _difference(result)


def markdown_tables(results: dict) -> str:
    """The study's two tables (FD against W; FD against sigma_rel) as Markdown, from ``results.json``'s dict.

    Every non-reference cell shows the paired difference to its reference with Student's t interval over the
    seed ranges and a verdict. Further rows compare, paired by seed range as well, CFG with autoguidance at each W
    and D, and (with two kernels) the two kernels setting by setting."""
    weights, kernels, repeat = results['weights'], results['kernels'], results['repeat']
    first, second = kernels[0], kernels[-1]
    compare_kernels = len(kernels) == 2
    kernel_row = f'{d_caption(first)} − {d_caption(second)}'

    def note(reference: str, extra: str = '') -> str:
        if repeat < 2:
            return 'one seed range per point: no paired interval'
        text = (f'Δ: difference to {reference} paired by seed range (the same seeds for every setting), mean over '
                f'the {repeat} ranges with its {paired.DEFAULT_CONFIDENCE:.0%} Student-t interval ({repeat - 1} '
                f'degree{"s" if repeat > 2 else ""} of freedom) and a verdict: "worse"/"better" when the interval '
                'excludes 0 (FD higher/lower), else "undecided"')
        if compare_kernels:
            text += (f'. Rows "{kernel_row}": FD at D = {d_caption(first)} minus FD at D = {d_caption(second)} at the '
                     f'same setting and seeds, "worse" meaning D = {d_caption(first)} is worse')
        return text + extra

    methods_note = ('. Rows "CFG − autoguidance": FD with CFG minus FD with autoguidance at the same W, D and '
                    'seeds, "worse" meaning CFG is worse') if repeat >= 2 else ''
    lines = [f'{FD_NAME} against the guidance weight W (mean over {repeat} disjoint sets of {results["num"]} '
             'images; ± std at W = 1, the unguided network and the reference of both methods; '
             f'{note("W = 1", methods_note)}):', '',
             '| method | D | ' + ' | '.join(f'W = {w:g}' for w in weights) + ' |',
             '|---|---|' + '---|' * len(weights)]
    for method, caption in (('cfg', 'CFG'), ('autoguidance', 'autoguidance')):
        for D in kernels:
            row, base = results['guidance'][D][method], results['classic_ema'].get(D)
            cells = [_cell(row.get(f'{w:g}'), None if w == 1 else base) for w in weights]
            lines.append(f'| {caption} | {d_caption(D)} | ' + ' | '.join(cells) + ' |')
        if compare_kernels:
            rows = [results['guidance'][D][method] for D in (first, second)]
            lines.append(f'| {caption} | {kernel_row} | '
                         + ' | '.join(_kernel_cell(rows[0].get(f'{w:g}'), rows[1].get(f'{w:g}')) for w in weights)
                         + ' |')
    for D in kernels:
        rows = [results['guidance'][D][method] for method in ('cfg', 'autoguidance')]
        lines.append(f'| CFG − autoguidance | {d_caption(D)} | '
                     + ' | '.join('–' if w == 1 else _kernel_cell(rows[0].get(f'{w:g}'), rows[1].get(f'{w:g}'))
                                  for w in weights) + ' |')
    stds = results['phema_grid']
    lines += ['', f'{FD_NAME} against the post-hoc EMA length σ_rel (unguided; mean, ± std for the classic EMA, the '
              f'reference; {note("the classic EMA of the same D")}):', '',
              '| D | ' + ' | '.join(f'σ_rel = {s:g}' for s in stds) + ' | classic EMA |',
              '|---|' + '---|' * (len(stds) + 1)]
    for D in kernels:
        row = results['phema'][D]
        lines.append(f'| {d_caption(D)} | ' + ' | '.join(_cell(row.get(f'{s:g}'), results['classic_ema'].get(D))
                                                         for s in stds)
                     + f' | {_cell(results["classic_ema"].get(D))} |')
    if compare_kernels:
        rows = [results['phema'][D] for D in (first, second)]
        lines.append(f'| {kernel_row} | '
                     + ' | '.join(_kernel_cell(rows[0].get(f'{s:g}'), rows[1].get(f'{s:g}')) for s in stds)
                     + f' | {_kernel_cell(results["classic_ema"].get(first), results["classic_ema"].get(second))} |')
    errors = results.get('phema_profile_error', {}).get(kernels[0])
    if errors:
        lines.append('| profile error | ' + ' | '.join(f'{errors[f"{s:g}"]:.2f}' for s in stds) + ' | |')
        lines += ['', 'Profile error: relative L2 distance between the least-squares combination of the tracked '
                  f'profiles (σ_rel {", ".join(f"{t:g}" for t in results["tracked"])}) and the requested one.']
    return '\n'.join(lines) + '\n'


def charts(results: dict, outdir: str) -> list[str]:
    """FD against W (both methods, both D) and FD against sigma_rel, with the std as error bars."""
    def series(row: dict, xs: Sequence[float]) -> tuple[list[float], list[float], list[float]]:
        keys = [x for x in xs if f'{x:g}' in row]
        keys = sorted(keys)
        return keys, [row[f'{x:g}']['mean'] for x in keys], [row[f'{x:g}']['std'] for x in keys]

    n = f'mean ± std over {results["repeat"]} sets of {results["num"]} images'
    by_weight = {}
    for method, caption in (('cfg', 'CFG'), ('autoguidance', 'autoguidance')):
        for D in results['kernels']:
            by_weight[f'{caption}, D={d_caption(D)}'] = series(results['guidance'][D][method],
                                                                               results['weights'])
    paths = [line_chart(by_weight, os.path.join(outdir, 'fd-vs-guidance.png'),
                        title=f'{FD_NAME} against guidance weight ({n})', xlabel='W', ylabel=FD_NAME)]
    by_std = {}
    stds = results['phema_grid']
    for D in results['kernels']:
        by_std[f'post-hoc EMA, D={d_caption(D)}'] = series(results['phema'][D], stds)
    for D in results['kernels']:
        classic = results['classic_ema'].get(D)
        if classic is not None:
            by_std[f'classic EMA, D={d_caption(D)}'] = ([min(stds), max(stds)], [classic['mean']] * 2)
    paths.append(line_chart(by_std, os.path.join(outdir, 'fd-vs-sigma-rel.png'),
                            title=f'{FD_NAME} against post-hoc EMA length ({n})', xlabel='σ_rel', ylabel=FD_NAME))
    return paths


def summary_row(point: dict) -> dict:
    return dict(mean=point['mean'], std=point['std'], fd=point['fd'], wall_s=point.get('wall_s'))


def measurement_plan(nets: dict, weights: Sequence[float], stds: Sequence[float]) \
        -> list[tuple[str, str, str, Optional[str], float]]:
    """The points (key, D label, network, gnet, W) in the order they are measured: the unguided networks first,
    then guided weights and post-hoc EMA lengths alternately, each in the order given, every one for each D; so a
    study cut short has the whole picture at a coarser grid."""
    first = [(f'D{label}-unguided', label, net['main'], None, 1.0) for label, net in nets.items()]
    guided = [[(f'D{label}-{method}-W{w:g}', label, net['main'], gnet, w)
               for label, net in nets.items() for method, gnet in (('cfg', 'uncond'), ('autoguidance', net['guide']))]
              for w in weights if w != 1]
    averaged = [[(f'D{label}-phema-{std:.3f}', label, net['phema'][std], None, 1.0) for label, net in nets.items()]
                for std in stds]
    rounds = [group for pair in itertools.zip_longest(guided, averaged, fillvalue=[]) for group in pair]
    return first + [point for group in rounds for point in group]


def collect(results: dict, points: dict, weights: Sequence[float], stds: Sequence[float]) -> None:
    """Fill ``results``' tables from the points measured so far (W = 1 is the unguided point of both methods)."""
    for label in results['kernels']:
        base = points.get(f'D{label}-unguided')
        if base is not None:
            results['classic_ema'][label] = summary_row(base)
        results['guidance'][label] = {
            method: {f'{w:g}': summary_row(point) for w in weights
                     for point in [base if w == 1 else points.get(f'D{label}-{method}-W{w:g}')] if point is not None}
            for method in ('cfg', 'autoguidance')}
        results['phema'][label] = {f'{std:g}': summary_row(points[f'D{label}-phema-{std:.3f}']) for std in stds
                                   if f'D{label}-phema-{std:.3f}' in points}
    # A resumed study spent its time over several invocations: the steps' own wall times add up to the total.
    results['steps_wall_s'] = round(sum(t or 0 for t in results['train_wall_s'].values())
                                    + sum(p.get('wall_s') or 0 for p in points.values()), 1)


def write_report(results: dict, points: dict, results_dir: str) -> None:
    """results.json, results.md (command, time, tables) and the two charts."""
    os.makedirs(results_dir, exist_ok=True)
    write_json(os.path.join(results_dir, 'results.json'), results)
    with dnnlib.util.atomic_write(os.path.join(results_dir, 'results.md'), 'w') as f:
        f.write(f'Command: `{results["command"]}`. Wall time: {results["steps_wall_s"]:.0f} s summed over the '
                f'steps (training and {len(points)} measured points; this invocation {results["wall_s"]:.0f} s).\n\n'
                + markdown_tables(results))
    charts(results, results_dir)


# ----------------------------------------------------------------------------

@click.command()
@click.option('--outdir', default='guidance-out', show_default=True, help='Work folder: runs, snapshots, points')
@click.option('--results', 'results_dir', default=os.path.join('docs', 'guidance'), show_default=True,
              help='Where results.json, results.md and the charts go')
@click.option('--kimg', default=32.0, show_default=True, type=cli.float_range(min=0.1),
              help='Training length of the main models, in thousands of images')
@click.option('--guide-kimg', default=8.0, show_default=True, type=cli.float_range(min=0.1),
              help='Training length of the autoguidance guides')
@click.option('--guide-cbase', default=16, show_default=True, type=click.IntRange(min=1),
              help='Channel multiplier of the guides (the main models have 32)')
@click.option('--aug-dim', default=128, show_default=True, type=click.IntRange(min=1), help='PFGM++ D')
@click.option('--label-dropout', default=0.1, show_default=True, type=cli.float_range(min=0, max=1))
@click.option('--track', default='0.05,0.1', show_default=True, help='sigma_rel of the tracked power EMAs')
@click.option('--weights', default='2,3,1.5,1.25', show_default=True,
              help='Guidance weights W to sweep besides 1, measured in this order')
@click.option('--stds', default='0.03,0.1,0.25,0.05,0.15', show_default=True,
              help='sigma_rel of the post-hoc EMA reconstructions, measured in this order')
@click.option('--num', default=200, show_default=True, type=click.IntRange(min=2), help='Images per set')
@click.option('--repeat', default=3, show_default=True, type=click.IntRange(min=1),
              help='Disjoint seed ranges (sets of images) per point')
@click.option('--steps', default=8, show_default=True, type=click.IntRange(min=3),
              help='DPM-Solver++(2M) steps (log-SNR spacing; = NFE of the unguided network)')
@click.option('--ticks', default=8, show_default=True, type=click.IntRange(min=1),
              help='Ticks (= snapshots) per training run')
@click.option('--nproc', default=2, show_default=True, type=click.IntRange(min=1), help='torchrun processes')
def main(outdir: str, results_dir: str, kimg: float, guide_kimg: float, guide_cbase: int, aug_dim: int,
         label_dropout: float, track: str, weights: str, stds: str, num: int, repeat: int, steps: int, ticks: int,
         nproc: int) -> None:
    """Measure FD-digits against the guidance weight (CFG, autoguidance) and the post-hoc EMA length, D=128 and
    D=inf; write the tables and charts into --results."""
    start = time.time()
    weight_list = parse_floats(weights, '--weights')
    if 1.0 not in weight_list:
        weight_list = [1.0, *weight_list]  # the unguided network, the reference of both methods
    try:
        std_list = [phema.check_sigma_rel(std, '--stds') for std in parse_floats(stds, '--stds')]
        track_list = phema.check_sigma_rel_list(parse_floats(track, '--track'), '--track')
    except phema.PhemaError as err:
        raise click.ClickException(str(err)) from None
    outdir = os.path.abspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    runs_dir = os.path.join(outdir, 'runs')
    points_dir = os.path.join(outdir, 'points')
    sampler = ['--solver=dpmpp2m', f'--steps={steps}', '--spacing=logsnr', '--batch=125']

    dataset = make_digits_dataset(outdir)
    ref = os.path.join(outdir, 'digits-ref-fd-digits.npz')
    if not os.path.exists(ref):
        run_tool([sys.executable, 'fid.py', 'ref', f'--data={dataset}', f'--dest={ref}',
                  f'--detector={DIGITS_DETECTOR}', '--device=cpu', '--workers=0'])

    kernels: list[Optional[int]] = [aug_dim, None]
    results: dict[str, Any] = dict(
        command=' '.join(['python -m demo.guidance_study', *sys.argv[1:]]), kimg=kimg, guide_kimg=guide_kimg,
        main_cbase=MAIN_CBASE, guide_cbase=guide_cbase, label_dropout=label_dropout, tracked=track_list,
        weights=sorted(weight_list), phema_grid=sorted(std_list), num=num, repeat=repeat, sampler=sampler,
        kernels=[d_label(D) for D in kernels], guidance={}, phema={}, phema_profile_error={}, classic_ema={},
        train_wall_s={})
    # Train everything first, so that a failure in training shows before hours of measuring.
    nets = {}
    for D in kernels:
        label = d_label(D)
        main_name, guide_name = f'main-D{label}', f'guide-D{label}'
        main_flags = train_flags(D, MAIN_CBASE, kimg, label_dropout, track_list, ticks)
        guide_flags = train_flags(D, guide_cbase, guide_kimg, label_dropout, [], ticks)
        nets[label] = dict(main=train(runs_dir, main_name, dataset, main_flags, nproc),
                           guide=train(runs_dir, guide_name, dataset, guide_flags, nproc))
        nets[label]['phema'] = reconstruct(os.path.join(runs_dir, main_name), os.path.join(outdir, 'phema', label),
                                           std_list)
        results['phema_profile_error'][label] = reconstruction_errors(os.path.join(runs_dir, main_name), std_list)
        for name in (main_name, guide_name):
            results['train_wall_s'][name] = (read_json(os.path.join(runs_dir, name, RUN_MARKER)) or {}).get('wall_s')

    points: dict[str, dict] = {}
    for key, label, network, gnet, weight in measurement_plan(nets, weight_list, std_list):
        points[key] = measure_point(points_dir, key, network, gnet, weight, num, repeat, sampler, ref, nproc)
        # Tables and charts after every point: an interrupted study still leaves what it measured.
        collect(results, points, weight_list, std_list)
        results['wall_s'] = round(time.time() - start, 1)
        write_report(results, points, results_dir)
    print('\n' + markdown_tables(results))
    print(f'Done in {results["wall_s"]:.0f}s. Results in {results_dir}')

if __name__ == '__main__':
    main()
