"""Convert image collections into the dataset layout that training/dataset.py reads.

The result is a ZIP archive (members stored, not deflated) or a directory holding uncompressed PNGs named
``{i // 1000:05d}/img{i:08d}.png`` and a ``dataset.json`` of the form ``{"labels": [[name, label], ...]}``
or ``{"labels": null}``. For the same source and flags the names, labels and pixels equal those written by
NVlabs/edm's dataset_tool.py, so datasets made by either tool are interchangeable. The readers live in
formats/dataset_sources.py, the transforms and writers in formats/dataset_writer.py.

Both ``python dataset_tool.py --source=... --dest=...`` (the original's form) and
``python dataset_tool.py convert --source=... --dest=...`` work.
"""

from __future__ import annotations

import re
from typing import Optional

import click

from formats.dataset_files import DatasetError
from formats.dataset_sources import CLASS_ORDERS, DatasetUsageError
from formats.dataset_writer import TRANSFORMS, convert_dataset


def parse_resolution(text: str) -> tuple[int, int]:
    """'512x384' or '512,384' -> (width, height)."""
    match = re.fullmatch(r'\s*(\d+)\s*[x,]\s*(\d+)\s*', text)
    if match is None or min(int(match[1]), int(match[2])) < 1:
        raise click.BadParameter(f'expected WxH with positive integers (e.g. 64x64), got {text!r}',
                                 param_hint='--resolution')
    return int(match[1]), int(match[2])


# ----------------------------------------------------------------------------
# Command line.


def _resolution_option(_ctx: click.Context, _param: click.Parameter, value: Optional[str]) -> Optional[tuple[int, int]]:
    return None if value is None else parse_resolution(value)


class _ConvertWhenNoCommand(click.Group):
    """A group that treats ``dataset_tool.py --source ...`` as ``dataset_tool.py convert --source ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ['convert', *args]
        return super().parse_args(ctx, args)


@click.group(cls=_ConvertWhenNoCommand)
def main() -> None:
    """Make datasets for training. `dataset_tool.py --source=... --dest=...` means `convert` (see convert --help)."""


@main.command()
@click.option('--source', help='Input folder, archive or file (see below)', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Output folder, or a path ending in .zip', metavar='PATH', type=str, required=True)
@click.option('--max-images', help='Convert at most this many input images', metavar='INT', type=click.IntRange(min=1))
@click.option('--transform', help='Crop mode before resizing', type=click.Choice(TRANSFORMS))
@click.option('--resolution', help='Output size, e.g. 64x64', metavar='WxH', callback=_resolution_option)
@click.option('--overwrite', help='Replace an existing non-empty --dest', is_flag=True)
@click.option('--class-order', help='Class numbers of label folders: text order of their names (the original\'s) or '
              'numeric order  [default: text]', type=click.Choice(CLASS_ORDERS))
def convert(source: str, dest: str, max_images: Optional[int], transform: Optional[str],
            resolution: Optional[tuple[int, int]], overwrite: bool, class_order: Optional[str]) -> None:
    """Convert images into a dataset folder or ZIP of uncompressed PNGs plus dataset.json.

    \b
    --source kinds:
      path/                         images found recursively under path/, in sorted order
      archive.zip                   images in the ZIP, in sorted order (macOS's __MACOSX/ is skipped)
      cifar-10-python.tar.gz        the 50,000 CIFAR-10 training images, labelled
      train-images-idx3-ubyte.gz    MNIST (labels read from train-labels-idx1-ubyte.gz), padded to 32x32
      name_lmdb/                    LSUN LMDB folder (needs `pip install lmdb`)

    Labels come from a dataset.json at the dataset root: the root of a folder or ZIP source, or the one
    folder that holds everything in it (a zipped folder) ({"labels": [[name, label], ...]}, names relative to
    that root; "./a.png", "a\\b.png" and names relative to another folder are matched when unambiguous; a
    Dataset.json spelled in another letter case is read with a note). Every image needs a label and every
    entry an image, else nothing is written. A dataset.json elsewhere (in a sub-folder) is an error unless the
    root has one; nested archives are not read and are named. A source without a dataset.json is labelled by
    the top-level subfolders of its dataset root when there are at least two, numbered in text order of the
    folder names ("10" before "2", as the original tool) or, with --class-order=numeric, by the numbers they
    are named by; the folder -> class mapping is printed.

    Image modes: 1-bit, palette, CMYK/YCbCr/HSV/LAB become grayscale or RGB; alpha is composited over black;
    16-bit grayscale (I;16, and I from older Pillow) keeps its high byte (v >> 8); 32-bit float (F) is refused.
    Grayscale images among colour ones are stored as RGB. All headers are checked before anything is written.

    Output images must be square with a power-of-two side and all of one size: use --resolution to resize,
    and --transform=center-crop (square crop) or center-crop-wide (crop to the WxH aspect ratio and letterbox
    into a WxW square; narrower images are skipped) to crop first.

    The output is written under a temporary name and renamed at the end, so an interrupted run leaves no
    partial dataset; an existing non-empty --dest is only replaced with --overwrite.
    """
    try:
        convert_dataset(source, dest, max_images=max_images, transform=transform, resolution=resolution,
                        overwrite=overwrite, class_order=class_order, log=click.echo)
    except DatasetUsageError as err:
        raise click.UsageError(str(err)) from None
    except DatasetError as err:
        raise click.ClickException(str(err)) from None


if __name__ == '__main__':
    main()
