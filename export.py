"""Convert a network snapshot or training state into a weights-only file that is safe to share.

A thin command line over ``formats/export.py`` (the weights-only format: constructor keywords plus tensors,
nothing that runs code when loaded) and ``formats/network_io.py`` (reading every network format)::

    python export.py --input network-snapshot-000200.pkl            # -> network-snapshot-000200.weights.pt
    python export.py --input training-state-000200.pt --output net.weights.pt
    python export.py --check --input net.weights.pt                  # load it and print a summary
    python export.py --format=diffusers --input network-snapshot-000200.pkl   # -> network-snapshot-000200.diffusers/

"""

from __future__ import annotations

import json
import os
from typing import Any, NoReturn, Optional

import click
import torch

import dnnlib
from cli import common as cli
from formats.export import (FORMAT, WEIGHTS_SUFFIX, WeightsFormatError, constructor_kwargs_of, export_weights,
                             load_weights, looks_like_weights_file, weights_path_for)
from formats.network_io import NetworkLoadError, load_network, network_summary


def summary(net: torch.nn.Module) -> dict[str, Any]:
    """What a user wants to know about a network before generating with it."""
    info = network_summary(net)
    info['parameters'] = sum(p.numel() for p in net.parameters())
    info['tensors'] = len(net.state_dict())
    return info


def _fail(message: str) -> NoReturn:
    raise click.ClickException(message)


def _load_input(source: str) -> tuple[torch.nn.Module, str]:
    """The network in ``source`` (exactly that file, no sibling preference) and the name of its format."""
    try:
        with dnnlib.util.open_url(source, verbose=False) as f:
            kind = FORMAT if looks_like_weights_file(f.read()) else 'pickle'
        return load_network(source, device='cpu', prefer_weights=False), kind
    except NetworkLoadError as err:
        _fail(f'--input {err}')
    except OSError as err:
        _fail(f'--input {source}: cannot read it ({err.strerror or err})')


def _default_output(input_path: str, suffix: str) -> str:
    """X.pkl / X.pt / X.weights.pt -> X + suffix beside the input (``weights_path_for`` names X.weights.pt)."""
    if dnnlib.util.is_url(input_path, allow_file_urls=True):
        raise click.UsageError('--output is needed when --input is a URL')
    return os.path.splitext(weights_path_for(input_path))[0].removesuffix('.weights') + suffix


def _refuse_existing(output_path: str, force: bool) -> None:
    if os.path.exists(output_path) and not force:
        _fail(f'--output {output_path}: already exists (pass --force to replace it)')


def _export_diffusers(input_path: str, output_path: Optional[str], force: bool) -> None:
    """--format=diffusers: a pipeline folder that PFGMPPPipeline.from_pretrained(folder) loads offline."""
    from integrations import MissingExtraError, require_diffusers
    from integrations.diffusers_export import DiffusersExportError, export_diffusers
    try:
        require_diffusers()
    except MissingExtraError as err:
        _fail(f'--format=diffusers: {err}')
    if output_path is None:
        output_path = _default_output(input_path, '.diffusers')
    if os.path.isfile(output_path):
        _fail(f'--output {output_path}: is a file; expected a folder name')
    _refuse_existing(output_path, force)
    net, _kind = _load_input(input_path)
    try:
        export_diffusers(net, output_path, force=force)
    except DiffusersExportError as err:
        _fail(f'--output {err}')
    except OSError as err:
        _fail(f'--output {output_path}: cannot write it ({err.strerror or err}); nothing was written')
    print(f'Wrote {output_path}/: diffusers pipeline ({summary(net)["class"]}); load it with '
          f'PFGMPPPipeline.from_pretrained({output_path!r})')


@click.command(context_settings=dict(max_content_width=120))
@click.option('--input', 'input_path', help='Network snapshot .pkl, training state .pt or weights file',
              metavar='PATH|URL', type=str, required=True)
@click.option('--output', 'output_path', help=f'Weights-only file  [default: input name with {WEIGHTS_SUFFIX}]',
              metavar='PATH', type=str, default=None)
@click.option('--force', help='Replace an existing --output', is_flag=True)
@click.option('--check', help='Only load --input and print a summary (nothing is written)', is_flag=True)
@click.option('--format', 'output_format', type=click.Choice(['weights', 'diffusers']), default='weights',
              show_default=True, help='weights: one weights-only file; diffusers: a diffusers pipeline folder '
              '(needs requirements-diffusers.txt)')
def main(input_path: str, output_path: Optional[str], force: bool, check: bool, output_format: str) -> None:
    """Convert a network snapshot or training state into a weights-only file that is safe to share.

    The output holds the network's constructor keywords (JSON) and its tensors and loads with
    torch.load(weights_only=True). Reading --input itself unpickles it: only convert files you trust.
    generate.py and fid.py load weights-only files directly, and prefer X.weights.pt to X.pkl / X.pt
    when both lie side by side.

    \b
    python export.py --input network-snapshot-000200.pkl
    python export.py --input training-state-000200.pt --output net.weights.pt
    python export.py --check --input net.weights.pt
    python export.py --format=diffusers --input network-snapshot-000200.pkl --output my-pipeline
    """
    if check:
        if output_format != 'weights':
            raise click.UsageError('--check reads a network file and writes nothing; drop --format')
        if output_path is not None:
            raise click.UsageError('--check writes nothing; drop --output')
        net, kind = _load_input(input_path)
        info = summary(net)
        print(f'{input_path}: {kind}, {info.pop("class")} with {info.pop("parameters"):,} parameters')
        print(json.dumps(info, sort_keys=True))
        print(json.dumps(constructor_kwargs_of(net, input_path), sort_keys=True))
        return

    if output_format == 'diffusers':
        _export_diffusers(input_path, output_path, force)
        return
    if output_path is None:
        output_path = _default_output(input_path, WEIGHTS_SUFFIX)
        if output_path == input_path:
            raise click.UsageError(f'--input {input_path} already has the {WEIGHTS_SUFFIX} name; give --output')
    if os.path.abspath(output_path) == os.path.abspath(input_path):
        raise click.UsageError('--output must differ from --input')
    if os.path.isdir(output_path):
        _fail(f'--output {output_path}: is a directory; expected a file name')
    _refuse_existing(output_path, force)

    net, _kind = _load_input(input_path)
    try:
        dnnlib.util.check_writable_dir(os.path.dirname(os.path.abspath(output_path)), '--output')
    except OSError as err:
        _fail(str(err))

    try:
        export_weights(net, output_path, metadata=dict(source=os.path.basename(input_path)))
    except WeightsFormatError as err:
        _fail(f'--input {err}')
    except OSError as err:
        _fail(f'--output {output_path}: cannot write it ({err.strerror or err}); nothing was written')

    # Read the file back exactly as generate.py will, so a bad export is caught here and not later.
    try:
        reloaded = load_weights(output_path)
        original = net.state_dict()
        differing = [k for k, v in reloaded.state_dict().items() if not torch.equal(v, original[k])]
        if differing:
            raise WeightsFormatError(f'{len(differing)} tensor(s) changed in the round trip (first: {differing[0]})')
    except WeightsFormatError as err:
        os.remove(output_path)
        _fail(f'--output {output_path}: the written file does not read back ({err}); it was removed')
    info = summary(reloaded)
    size_mb = os.path.getsize(output_path) / 2 ** 20
    print(f'Wrote {output_path} ({size_mb:.1f} MiB): {info["class"]} with {info["parameters"]:,} parameters, '
          f'{info["tensors"]} tensors')


if __name__ == '__main__':
    cli.run_click_command(main)
