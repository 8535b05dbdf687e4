"""Train a diffusion model (EDM, VP, VE) or a PFGM++ model.

The flags are those of NVIDIA's EDM ``train.py`` with the same meanings and defaults, plus PFGM++'s
``--pfgmpp --aug_dim --stf --rbatch --lsun --nblock --name``, and a few of our own (``--device --precision
--channels-last --compile``, ``--resume=auto``). The options become one configuration dict, saved as
``training_options.json`` in the run directory and passed to ``training.training_loop.training_loop``.

Examples::

    # PFGM++ (D=128) on CIFAR-10 with the DDPM++ network, 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --outdir=runs --data=datasets/cifar10-32x32.zip \\
        --cond=0 --arch=ddpmpp --pfgmpp=1 --aug_dim=128

    # Continue the newest training state of the matching run in training-runs (or start one)
    python train.py --outdir=runs --data=... --resume=auto
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Optional

import click

import dnnlib
from cli import common as cli
from training.config import ARCH_PRESETS, PRECOND_CLASSES

# DDP on recent PyTorch warns about bucket view strides for channels-last parameters; the warning is harmless.
warnings.filterwarnings('ignore', 'Grad strides do not match bucket view strides')


def _int_list(value: Any) -> Optional[list[int]]:
    if value is None:
        return None
    try:
        return dnnlib.util.parse_int_list(value, name='--cres')
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


def _attn_list(value: Optional[str]) -> Optional[list[int]]:
    """--attn: resolutions that get self-attention, or "none" (small images, where attention at full resolution
    is the costliest layer of the U-Net)."""
    if value is None:
        return None
    if value.strip().lower() == 'none':
        return []
    try:
        return dnnlib.util.parse_int_list(value, name='--attn')
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


@click.command()
# Main options.
@click.option('--outdir', help='Parent directory of the run directories', metavar='DIR', type=str, required=True)
@click.option('--data', help='Training set (dataset_tool ZIP or folder)', metavar='ZIP|DIR', type=str, required=True)
@click.option('--cond', help='Train class-conditional model', metavar='BOOL', type=bool, default=False,
              show_default=True)
@click.option('--arch', help='Network architecture', type=click.Choice(list(ARCH_PRESETS)), default='ddpmpp',
              show_default=True)
@click.option('--precond', help='Preconditioning & loss function', type=click.Choice(list(PRECOND_CLASSES)),
              default='edm', show_default=True)
@click.option('--pfgmpp', '--pfgmv2', 'pfgmpp', help='Train PFGM++ instead of a diffusion model (--pfgmv2: the '
              'PFGM++ fork\'s early name)', metavar='BOOL', type=bool, default=False, show_default=True)
@cli.refused_option('--align', type=bool, script='train.py', advice=(
    '--align=1 scaled sigma by sqrt(1+N/D), an early alignment its release dropped; this train.py trains the '
    'released r = sigma*sqrt(D) alignment: drop the flag and give --pfgmpp=1 --aug_dim=D'))
@cli.refused_option('--align_precond', type=bool, script='train.py', advice=(
    '--align_precond=1 is an early preconditioning variant its release dropped: drop the flag (the released '
    'PFGM++ uses EDM\'s preconditioning with sigma = r/sqrt(D))'))
@click.option('--aug_dim', help='PFGM++ augmented dimensions D', metavar='INT', type=int, default=128,
              show_default=True)
@click.option('--stf', help='Stable target field (reference-batch targets)', metavar='BOOL', type=bool,
              default=False, show_default=True)
@click.option('--rbatch', help='STF reference batch per process', metavar='INT', type=click.IntRange(min=1),
              default=4096, show_default=True)
@click.option('--lsun', help='Scale noise levels for LSUN 256x256 (PFGM++)', metavar='BOOL', type=bool,
              default=False, show_default=True)
# Consistency tuning (training/consistency.py: ECT on any D).
@click.option('--consistency', help='Tune the --init snapshot into a consistency model (1, 2 or 4-step sampling)',
              metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--init', help='Snapshot to tune: its network, architecture and weights', metavar='PKL|URL', type=str)
@click.option('--cm-stage', 'cm_stage', help='Consistency: images per stage of the shrinking t-r gap',
              metavar='KIMG', type=cli.float_range(min=0, min_open=True), default=1280, show_default=True)
@click.option('--cm-q', 'cm_q', help='Consistency: gap shrink factor per stage', metavar='FLOAT',
              type=cli.float_range(min=1, min_open=True), default=2, show_default=True)
@click.option('--cm-k', 'cm_k', help='Consistency: n(t) = 1 + k sigmoid(-b t)', metavar='FLOAT',
              type=cli.float_range(min=0), default=8, show_default=True)
@click.option('--cm-b', 'cm_b', help='Consistency: n(t) = 1 + k sigmoid(-b t)', metavar='FLOAT', type=float,
              default=1, show_default=True)
@click.option('--cm-huber', 'cm_huber', help='Consistency: pseudo-Huber c (0 = squared L2)', metavar='FLOAT',
              type=cli.float_range(min=0), default=0, show_default=True)
@click.option('--cm-pmean', 'cm_pmean', help='Consistency: mean of ln t', metavar='FLOAT', type=float,
              default=-1.1, show_default=True)
@click.option('--cm-pstd', 'cm_pstd', help='Consistency: std of ln t', metavar='FLOAT',
              type=cli.float_range(min=0, min_open=True), default=2.0, show_default=True)
# Hyperparameters.
@click.option('--duration', help='Training duration', metavar='MIMG',
              type=cli.float_range(min=0, min_open=True),
              default=200, show_default=True)
@click.option('--batch', help='Total batch size', metavar='INT', type=click.IntRange(min=1), default=512,
              show_default=True)
@click.option('--batch-gpu', help='Limit batch size per process', metavar='INT', type=click.IntRange(min=1))
@click.option('--cbase', help='Channel multiplier  [default: varies]', metavar='INT', type=click.IntRange(min=1))
@click.option('--cres', help='Channels per resolution  [default: varies]', metavar='LIST',
              callback=lambda _ctx, _param, value: _int_list(value))
@click.option('--nblock', help='Residual blocks per resolution  [default: varies]', metavar='INT',
              type=click.IntRange(min=1))
@click.option('--attn', help='Resolutions with self-attention, or none  [default: varies]', metavar='LIST|none',
              callback=lambda _ctx, _param, value: _attn_list(value))
@click.option('--lr', help='Learning rate', metavar='FLOAT', type=cli.float_range(min=0, min_open=True),
              default=10e-4, show_default=True)
@click.option('--lr-rampup', help='Learning-rate warm-up length', metavar='KIMG', type=cli.float_range(min=0),
              default=10000, show_default=True)
@click.option('--ema', help='EMA half-life', metavar='MIMG', type=cli.float_range(min=0), default=0.5,
              show_default=True)
@click.option('--phema', help='Also track power-function EMAs for post-hoc EMA (reconstruct_phema.py)',
              metavar='STD,...', type=str, default=None)
@click.option('--label-dropout', 'label_dropout', help='Drop class labels with this probability (for CFG)',
              metavar='FLOAT', type=cli.float_range(min=0, max=1, max_open=True), default=0, show_default=True)
@click.option('--dropout', help='Dropout probability', metavar='FLOAT', type=cli.float_range(min=0, max=1),
              default=0.13, show_default=True)
@click.option('--augment', help='Augment probability', metavar='FLOAT', type=cli.float_range(min=0, max=1),
              default=0.12, show_default=True)
@click.option('--xflip', help='Enable dataset x-flips', metavar='BOOL', type=bool, default=False,
              show_default=True)
# Performance-related.
@click.option('--fp16', help='Enable mixed-precision training', metavar='BOOL', type=bool, default=False,
              show_default=True)
@click.option('--precision', help='U-Net precision (fp16 = --fp16=1)  [default: fp32]',
              type=click.Choice(['fp32', 'fp16', 'bf16']))
@click.option('--ls', help='Loss scaling', metavar='FLOAT', type=cli.float_range(min=0, min_open=True),
              default=1,
              show_default=True)
@click.option('--bench', help='Enable cuDNN benchmarking', metavar='BOOL', type=bool, default=True,
              show_default=True)
@click.option('--cache', help='Cache dataset in CPU memory', metavar='BOOL', type=bool, default=True,
              show_default=True)
@click.option('--workers', help='DataLoader worker processes (0 = load in the main process)', metavar='INT',
              type=click.IntRange(min=0), default=1, show_default=True)
@click.option('--device', help='Training device  [default: cuda if available]', type=click.Choice(['cpu', 'cuda']))
@click.option('--channels-last', help='Channels-last memory layout', metavar='BOOL', type=bool, default=False,
              show_default=True)
@click.option('--tensorboard', help='Also write the stats.jsonl scalars as TensorBoard events (optional extra)',
              is_flag=True)
@click.option('--compile', help='torch.compile the network', metavar='BOOL', type=bool, default=False,
              show_default=True)
# I/O-related.
@click.option('--desc', help='Suffix for the run directory name', metavar='STR', type=str)
@click.option('--nosubdir', help='Write into --outdir itself, no numbered run directory', is_flag=True)
@click.option('--name', help='Run directory name under --outdir (instead of a numbered one)', metavar='STR',
              type=str)
@click.option('--tick', help='How often to print progress', metavar='KIMG',
              type=cli.float_range(min=0, min_open=True), default=50, show_default=True)
@click.option('--snap', help='How often to save snapshots', metavar='TICKS', type=click.IntRange(min=1), default=50,
              show_default=True)
@click.option('--snap-format', 'snap_format', help='Snapshot files: pickle, weights-only (.weights.pt) or both',
              type=click.Choice(['pkl', 'weights', 'both']), default='pkl', show_default=True)
@click.option('--dump', help='How often to dump state (EDM\'s default holds; the PFGM++ fork\'s train.py used 50)',
              metavar='TICKS', type=click.IntRange(min=1), default=500, show_default=True)
@click.option('--seed', help='Seed of every random stream  [default: random]', metavar='INT', type=int)
@click.option('--transfer', help='Start from the weights of a network snapshot', metavar='PKL|URL', type=str)
@click.option('--resume', help='Resume from previous training state ("auto": newest in the run dir)',
              metavar='PT|auto', type=str)
@click.option('-n', '--dry-run', help='Validate, print the options and stop', is_flag=True)
def main(**kwargs: Any) -> int:
    """Train a diffusion-based or PFGM++ generative model.

    \b
    # DDPM++ with PFGM++ (D=128) on CIFAR-10, 8 GPUs:
    torchrun --standalone --nproc_per_node=8 train.py --outdir=runs --data=datasets/cifar10-32x32.zip \\
        --arch=ddpmpp --pfgmpp=1 --aug_dim=128

    \b
    # Tune a trained snapshot (EDM or PFGM++, any D) into a consistency model (ECT), then sample it in 2 steps:
    python train.py --outdir=runs --data=datasets/cifar10-32x32.zip --consistency=1 \\
        --init=network-snapshot-200000.pkl --lr=1e-4 --lr-rampup=0 --duration=10
    python generate.py --network=runs/.../network-snapshot-010000.pkl --steps=2 --seeds=0-63 --outdir=out

    Exit codes: 0 finished, 3 stopped on request (SIGTERM/Ctrl-C) with the state saved, 1 error, 2 bad flag.
    """
    from torch_utils import distributed as dist
    from training import config, launch, run_dir
    from formats.dataset_files import DatasetError
    from training.training_state import TrainingError
    try:
        return launch.train(dnnlib.EasyDict(kwargs))
    except config.OptionError as err:
        raise click.UsageError(str(err)) from None
    except (config.InputError, run_dir.RunDirError, TrainingError, dist.ProcessGroupError) as err:
        raise click.ClickException(str(err)) from None
    except DatasetError as err:  # an image that fails while training (headers were checked before the start)
        raise click.ClickException(f'--data: {err.one_line()}') from None
    except dist.PeerLostError as err:
        # Every surviving rank says it once: rank 0 may be the process that ended.
        click.echo(f'Error: {err}', err=True)
        sys.exit(1)


if __name__ == '__main__':
    cli.run_click_command(main)  # under torchrun, errors are printed by rank 0 only
