"""Post-hoc EMA: build network snapshots for any EMA length from the power-function EMAs a run tracked.

A thin command line over ``training/phema.py`` (EDM2, Karras et al. 2024, section 3). The run must have been
trained with ``train.py --phema=STD,...``, which writes ``network-snapshot-{kimg:07d}-{std:.3f}.pkl`` files; each
requested ``--outstd`` becomes ``phema-{kimg:07d}-{std:.3f}.pkl`` in ``--outdir``, a network snapshot that
``generate.py`` and ``fid.py`` load like any other.

Examples::

    # The EMA lengths 0.05, 0.075, ..., 0.2 at the end of the run
    python reconstruct_phema.py --indir=runs/00000-mnist-cond-ddpmpp-edm-gpus1-batch64-fp32 --outdir=phema \\
        --outstd=0.05,0.075,0.1,0.125,0.15,0.175,0.2

    # One EMA length at an earlier snapshot time
    python reconstruct_phema.py --indir=RUN --outdir=phema --outstd=0.1 --outkimg=2000
"""

from __future__ import annotations

import os
import pickle
from typing import Optional

import click

import dnnlib
from training import phema


def _std_list(_ctx: click.Context, _param: click.Parameter, value: str) -> list[float]:
    try:
        numbers = [float(item) for item in value.split(',') if item.strip()]
    except ValueError:
        raise click.BadParameter(f'{value}: expected comma-separated numbers such as 0.05,0.1') from None
    if not numbers:
        raise click.BadParameter('no numbers given')
    try:
        return sorted({phema.check_sigma_rel(std, '--outstd') for std in numbers})
    except phema.PhemaError as err:
        raise click.BadParameter(str(err)) from None


@click.command(context_settings=dict(max_content_width=120))
@click.option('--indir', type=str, required=True, metavar='DIR',
              help='Run directory with the tracked network-snapshot-KKKKKKK-S.SSS.pkl files')
@click.option('--outdir', type=str, required=True, metavar='DIR', help='Where the phema-*.pkl snapshots go')
@click.option('--outstd', 'out_std', type=str, required=True, metavar='LIST', callback=_std_list,
              help='Relative standard deviations (sigma_rel) to reconstruct, e.g. 0.05,0.1')
@click.option('--outkimg', 'out_kimg', type=click.IntRange(min=0), default=None, metavar='KIMG',
              help='Training time of a tracked snapshot to reconstruct at  [default: the latest]')
def main(indir: str, outdir: str, out_std: list[float], out_kimg: Optional[int]) -> None:
    """Reconstruct post-hoc EMA snapshots (EDM2) from a run trained with --phema."""
    try:
        snapshots = phema.list_tracked_snapshots(indir)
        out_nimg = None
        if out_kimg is not None:
            matching = sorted({s.nimg for s in snapshots if s.nimg // 1000 == out_kimg})
            if len(matching) != 1:
                available = ', '.join(str(k) for k in sorted({s.nimg // 1000 for s in snapshots})) or 'none'
                raise click.BadParameter(f'{out_kimg}: no tracked snapshot has this kimg (available: {available})',
                                         param_hint='--outkimg')
            out_nimg = matching[0]
        try:
            dnnlib.util.check_writable_dir(outdir, '--outdir')
        except OSError as err:
            raise click.ClickException(str(err)) from None
        used = [s for s in snapshots if out_nimg is None or s.nimg <= out_nimg]
        print(f'Combining {len(used)} tracked snapshots from {indir} ...')
        for std, data in phema.reconstruct(snapshots, out_std, out_nimg):
            path = os.path.join(outdir, phema.snapshot_name(phema.OUTPUT_PREFIX, data[phema.RECORD_KEY]['nimg'], std))
            with dnnlib.util.atomic_write(path, 'wb') as f:
                pickle.dump(data, f)
            print(f'Wrote {path}')
    except phema.PhemaError as err:
        raise click.ClickException(str(err)) from None
    except OSError as err:
        raise click.ClickException(f'--outdir {outdir}: cannot write ({err.strerror or err})') from None


if __name__ == '__main__':
    main()
