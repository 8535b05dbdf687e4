"""Loading trained networks for generation and evaluation.

:func:`load_network` accepts, by local path, ``file://`` or ``http(s)://`` URL
(downloads are cached by ``dnnlib.util.open_url``):

* a network snapshot ``network-snapshot-*.pkl`` -- a pickle of a dict whose
  ``ema`` entry is the network (EDM, PFGM++ and this project write them);
* a training state ``training-state-*.pt`` -- a ``torch.save`` dict with an
  ``ema`` module (the PFGM++ code and our training loop write them);
* a pickled module on its own;
* a weights-only file ``*.weights.pt`` written by ``python export.py`` (format: :mod:`formats.export`)
  (recognised by its content, loaded with ``torch.load(weights_only=True)``).

Pickles and training states execute code while loading (pickle,
``torch.load(weights_only=False)``): only load files you trust. Weights-only files run
no code, and a local ``X.weights.pt`` beside a requested ``X.pkl`` / ``X.pt`` is loaded
in its place (one line says so).
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from typing import Any, Optional, Union

import torch

import dnnlib
from torch_utils import cpu_support, misc
from torch_utils.distributed import print0
from formats import export
from formats.export import NetworkLoadError  # noqa: F401  (the error of every network format; defined there)
from training import cpu_speed
# Imported for unpickling: torch_utils.persistence maps an embedded source equal to that of an imported module onto
# that module, so snapshots written by this checkout load as training.networks classes rather than as a private copy
# of the module executed anew in each process.
from training import networks  # noqa: F401

EXPECTED_FORMATS = 'a network snapshot (.pkl with an "ema" network) or a training state (.pt with an "ema" network)'
PICKLE_PROTOCOL_MARK = 0x80  # first byte of pickles written with protocol 2 or later
HASH_CHUNK_BYTES = 1 << 20  # network files are hashed in pieces of this size, never held twice in memory


def _read_source(source: str) -> bytes:
    try:
        with dnnlib.util.open_url(source, verbose=False) as f:
            return f.read()
    except FileNotFoundError:
        raise NetworkLoadError(f'{source}: no such file; expected {EXPECTED_FORMATS}') from None
    except IsADirectoryError:
        raise NetworkLoadError(f'{source}: is a directory; expected {EXPECTED_FORMATS}') from None
    except OSError as err:
        raise NetworkLoadError(f'{source}: cannot read it ({err}); expected {EXPECTED_FORMATS}') from None


def _unpickle(source: str, data: bytes) -> Any:
    """Decode a torch.save archive or a plain pickle, with errors that name ``source``."""
    if not data:
        raise NetworkLoadError(f'{source}: file is empty (0 bytes); expected {EXPECTED_FORMATS}')
    if zipfile.is_zipfile(io.BytesIO(data)):
        try:
            return torch.load(io.BytesIO(data), map_location='cpu', weights_only=False)
        except Exception as err:  # a ZIP that is not a torch archive (dataset, .npz) lands here
            raise NetworkLoadError(f'{source}: ZIP archive that torch.load cannot read ({type(err).__name__}: '
                                   f'{str(err).splitlines()[0] if str(err) else ""}); expected {EXPECTED_FORMATS}'
                                   ) from None
    if data[0] != PICKLE_PROTOCOL_MARK:
        raise NetworkLoadError(f'{source}: not a pickle or torch archive; expected {EXPECTED_FORMATS}')
    try:
        obj = pickle.loads(data)
        if isinstance(obj, int):
            # torch.save's legacy (pre-1.6, non-ZIP) format opens with a pickled magic number.
            obj = torch.load(io.BytesIO(data), map_location='cpu', weights_only=False)
        return obj
    except Exception as err:
        first_line = str(err).splitlines()[0] if str(err) else ''
        raise NetworkLoadError(f'{source}: cannot unpickle ({type(err).__name__}: {first_line}); '
                               f'expected {EXPECTED_FORMATS}') from None


def _pick_network(source: str, obj: Any) -> torch.nn.Module:
    if isinstance(obj, torch.nn.Module):
        return obj
    if isinstance(obj, dict):
        net = obj.get('ema')
        if isinstance(net, torch.nn.Module):
            return net
        keys = ', '.join(sorted(map(str, obj.keys()))[:8]) or 'none'
        raise NetworkLoadError(f'{source}: holds a dict without an "ema" network (keys: {keys}); '
                               f'expected {EXPECTED_FORMATS}')
    raise NetworkLoadError(f'{source}: holds a {type(obj).__name__}, not a network; expected {EXPECTED_FORMATS}')


def load_network(path_or_url: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = 'cpu',
                 eval_mode: bool = True, prefer_weights: bool = True) -> torch.nn.Module:
    """Load the (EMA) network from a snapshot, a training state, a pickled module or a weights-only file.

    Returns the module on ``device``, in eval mode and without gradients (unless
    ``eval_mode=False``). Raises :class:`NetworkLoadError` with a one-line message
    naming the file for anything that is not such a file. With ``prefer_weights``, a
    weights-only sibling (``X.weights.pt`` for ``X.pkl``) is loaded instead.
    """
    source = os.fspath(path_or_url)
    sibling = export.preferred_sibling(source) if prefer_weights else None
    if sibling is not None:
        print0(f'Using the weights-only file "{sibling}" found beside "{source}".')
        source = sibling
    data = _read_source(source)
    if export.looks_like_weights_file(data):
        # Never falls back to unpickling: a file that claims to be weights-only is read as nothing else.
        net = export.load_weights_bytes(data, source)
    else:
        net = _pick_network(source, _unpickle(source, data))
    problem = misc.non_finite_summary(net)
    if problem:  # a diverged or damaged snapshot samples NaN everywhere and cannot be trained from
        raise NetworkLoadError(f'{source}: {problem}; it cannot make images or be trained from (a diverged or '
                               f'damaged snapshot: use an earlier one)')
    if device is not None:
        net = net.to(device)
    if eval_mode:
        net.eval().requires_grad_(False)
    return net


def network_file_sha256(path_or_url: Union[str, os.PathLike], prefer_weights: bool = True) -> str:
    """SHA-256 (hex) of the bytes :func:`load_network` reads for ``path_or_url``: the weights-only sibling when it
    would be preferred, the download cache's copy for a URL. Names the network by content, not by path.

    Raises :class:`NetworkLoadError` when the file cannot be read.
    """
    source = os.fspath(path_or_url)
    source = (export.preferred_sibling(source) if prefer_weights else None) or source
    try:
        return dnnlib.util.file_sha256(source, HASH_CHUNK_BYTES)
    except OSError as err:
        raise NetworkLoadError(f'{source}: cannot read it ({err}); expected {EXPECTED_FORMATS}') from None


def network_summary(net: Any) -> dict[str, Any]:
    """The attributes generation relies on, as plain values (for manifests and messages)."""
    fields = ('img_resolution', 'img_channels', 'label_dim', 'sigma_min', 'sigma_max', 'pfgmpp', 'D')
    summary = {}
    for name in fields:
        value = getattr(net, name, None)
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, float) and value == float('inf'):
            value = 'inf'
        summary[name] = value
    summary['class'] = type(net).__name__
    return summary


PRECISIONS = ('fp32', 'fp16', 'bf16')


def apply_speed_options(net: torch.nn.Module, precision: Optional[str] = None,
                        channels_last: bool = False) -> torch.nn.Module:
    """Set up a loaded network for fast inference in place; returns ``net``.

    ``precision`` None keeps what the network was built with; 'fp32' turns reduced precision off; 'fp16' and
    'bf16' run the U-Net in that type (also on CPU, where the original would stay in fp32). Preconditioning stays
    float32. ``channels_last`` stores 4-D weights as NHWC, which oneDNN and cuDNN often run faster; outputs stay
    within float32 rounding of the default layout (about 1e-6 relative on the golden networks).

    The layers also get ``training.cpu_speed.accelerate`` for the life of ``net``. In float32 with the default
    layout that changes no output bit; with ``channels_last`` or bf16 it adds prepacked convolution weights and the
    faster up-sampling and GroupNorm of that module. Raises ValueError for an unknown ``precision`` or a network
    without precision switches.
    """
    if precision is not None:
        if precision not in PRECISIONS:
            raise ValueError(f'precision must be one of {", ".join(PRECISIONS)}, got {precision!r}')
        if not hasattr(net, 'use_fp16'):
            raise ValueError(f'{type(net).__name__} has no use_fp16/use_bf16 switches; cannot set precision')
        net.use_fp16 = precision == 'fp16'
        net.use_bf16 = precision == 'bf16'
        net.reduced_precision_on_cpu = precision != 'fp32'
    if channels_last:
        net.to(memory_format=torch.channels_last)
    cpu_speed.accelerate(net)
    return net


def precision_for_device(net: torch.nn.Module, precision: Optional[str],
                         device: Union[str, torch.device]) -> tuple[Optional[str], Optional[str]]:
    """The ``precision`` argument for :func:`apply_speed_options` that ``device`` can run, and why it changed.

    ``precision`` None means as the network was built. A bfloat16 request (explicit, or a network built to run
    bfloat16 on CPU) on a CPU without oneDNN bfloat16 kernels becomes 'fp32' (see
    ``torch_utils.cpu_support.supported_precision``); the second value is then the one line to print, else None.
    """
    built_bf16 = getattr(net, 'use_bf16', False) and getattr(net, 'reduced_precision_on_cpu', False)
    wanted = precision if precision is not None else ('bf16' if built_bf16 else None)
    used, reason = cpu_support.supported_precision(wanted, device)
    return (precision if reason is None else used), reason
