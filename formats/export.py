"""Weights-only network files: constructor keywords plus tensors, nothing that runs code when loaded.

Network snapshots (``.pkl``) and training states (``.pt``) are pickles: loading one executes whatever code it
carries, so they should only be loaded from people you trust. The weights-only format is safe to share:

    python export.py --input network-snapshot-000200.pkl            # -> network-snapshot-000200.weights.pt
    python export.py --input training-state-000200.pt --output net.weights.pt
    python export.py --check --input net.weights.pt                  # load it and print a summary

(``export.py`` is the command line over this module.)

File layout (``torch.save`` of plain values only, read back with ``torch.load(weights_only=True)``)::

    {'format': 'pfgmpp-weights', 'version': 1,
     'class_name': 'training.networks.EDMPrecond',           # one of ALLOWED_CLASSES, nothing else
                                                              # (a preconditioner, a consistency model wrapping
                                                              # one, or a feature detector of ours)
     'init_kwargs': '{"img_resolution": 32, ...}',            # constructor keywords as a JSON string
     'state_dict': {name: tensor, ...},                       # every parameter and persistent buffer
     'metadata': {...}}                                        # informational (source file, torch version)

Loading builds the named class from ``init_kwargs`` and checks every tensor's name, shape and dtype against the
freshly constructed network before copying it in; the file never names code to run. Snapshots written by the
original EDM / PFGM++ code export too: their modules record their constructor keywords, which our
preconditioners accept (PFGM++'s ``pfgmpp`` and ``D`` included).

Naming: ``X.pkl`` and ``X.pt`` export to ``X.weights.pt`` by default, and :func:`formats.network_io.load_network`
(used by generate.py and fid.py) loads ``X.weights.pt`` instead of ``X.pkl`` / ``X.pt`` when it lies beside it.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import zipfile
from typing import Any, Optional, Union

import torch

import dnnlib

FORMAT = 'pfgmpp-weights'
VERSION = 1
WEIGHTS_SUFFIX = '.weights.pt'
NETWORKS_MODULE = 'training.networks'
ALLOWED_CLASSES = tuple(f'{NETWORKS_MODULE}.{name}' for name in ('EDMPrecond', 'VPPrecond', 'VEPrecond',
                                                                 'iDDPMPrecond'))
# Feature detectors of our own that ship as weights-only files (fid.py --detector accepts them). Files written before
# the classifier moved to evaluation/ name it by its old module (training.MOVED resolves it).
DETECTOR_CLASSES = ('evaluation.digits_classifier.DigitsClassifier', 'training.digits_classifier.DigitsClassifier')
ALLOWED_CLASSES += DETECTOR_CLASSES
# Consistency models wrap one of the preconditioners above; their constructor builds only those
# (training.consistency.denoiser_class_name), so the file still names no other code.
CONSISTENCY_CLASSES = ('training.consistency.ConsistencyModel',)
ALLOWED_CLASSES += CONSISTENCY_CLASSES
# The four preconditioners of EDM (and the PFGM++ fork) share these leading positional parameters; anything
# else must have been passed by keyword (the training loops always do).
POSITIONAL_PARAMS = ('img_resolution', 'img_channels', 'label_dim', 'use_fp16')
MAX_LISTED_MISMATCHES = 8
MARKER_WINDOW = 64  # bytes at the start of the archive's data.pkl that must hold the format marker
EXPECTED = f'a {FORMAT} file written by export.py'


class NetworkLoadError(ValueError):
    """A network file that cannot be used; the message names the file and what was expected.

    Defined here, below :mod:`formats.network_io` (which reads every network format, this one included, and
    re-exports the class), so that neither module imports the other late.
    """


class WeightsFormatError(NetworkLoadError):
    """A weights-only file (or a network to export) that does not fit the format; the message names the file."""


# ----------------------------------------------------------------------------
# Naming.


def weights_path_for(path: Union[str, os.PathLike]) -> str:
    """``X.pkl`` / ``X.pt`` -> ``X.weights.pt`` (a name that already ends in .weights.pt is kept)."""
    path = os.fspath(path)
    if path.endswith(WEIGHTS_SUFFIX):
        return path
    stem, ext = os.path.splitext(path)
    return (stem if ext.lower() in ('.pkl', '.pt', '.pth', '.pickle') else path) + WEIGHTS_SUFFIX


def preferred_sibling(source: str) -> Optional[str]:
    """The weights-only file next to a local snapshot or training state, if there is one."""
    if dnnlib.util.is_url(source, allow_file_urls=True) or source.endswith(WEIGHTS_SUFFIX):
        return None
    candidate = weights_path_for(source)
    if candidate != source and os.path.isfile(candidate):
        return candidate
    return None


# ----------------------------------------------------------------------------
# Building a record from a module.


def _plain(value: Any, where: str) -> Any:
    """``value`` as JSON-compatible Python (tuples become lists); anything else is an error naming ``where``."""
    # Subclasses (torch's TorchVersion is a str, numpy scalars are not ints) become the builtin types the
    # weights-only unpickler accepts.
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, f'{where}[{i}]') for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise WeightsFormatError(f'{where}: dict keys must be strings to be stored as JSON')
        return {k: _plain(v, f'{where}.{k}') for k, v in value.items()}
    raise WeightsFormatError(f'{where}: a {type(value).__name__} cannot be stored as JSON; '
                             f'expected numbers, strings, booleans, None, lists or dicts')


def class_name_of(module: torch.nn.Module, source: str = 'network') -> str:
    """Our allow-listed class for ``module`` (an instance of ours or of the original code's same-named class)."""
    name = f'{type(module).__module__}.{type(module).__name__}'
    consistency = {n.rsplit('.', 1)[1]: n for n in CONSISTENCY_CLASSES}
    if type(module).__name__ in consistency:
        name = consistency[type(module).__name__]  # ours, also when unpickled from a snapshot's own source
    elif name not in DETECTOR_CLASSES:
        name = f'{NETWORKS_MODULE}.{type(module).__name__}'  # ours, or the original code's same-named class
    if name not in ALLOWED_CLASSES:
        raise WeightsFormatError(f'{source}: cannot export a {type(module).__name__}; expected one of the '
                                 f'preconditioners {", ".join(n.rsplit(".", 1)[1] for n in ALLOWED_CLASSES)}')
    return name


def constructor_kwargs_of(module: torch.nn.Module, source: str = 'network') -> dict[str, Any]:
    """The keywords ``module`` was built with, as JSON-compatible values.

    Persistent classes (ours and the original's) record their constructor arguments; leading positional
    arguments are named after the parameters the four preconditioners share.
    """
    if not hasattr(module, 'init_kwargs'):
        raise WeightsFormatError(f'{source}: the {type(module).__name__} does not record its constructor arguments '
                                 f'(not built from a persistent class); cannot export it')
    args = tuple(getattr(module, 'init_args', ()))
    kwargs = dict(module.init_kwargs)
    if len(args) > len(POSITIONAL_PARAMS):
        raise WeightsFormatError(f'{source}: the network was built with {len(args)} positional arguments; only '
                                 f'{", ".join(POSITIONAL_PARAMS)} can be named safely')
    for name, value in zip(POSITIONAL_PARAMS, args):
        if name in kwargs:
            raise WeightsFormatError(f'{source}: constructor argument {name} given twice')
        kwargs[name] = value
    return _plain(kwargs, f'{source}: init_kwargs')


def _tensor_text(t: torch.Tensor) -> str:
    return f'{list(t.shape)} {str(t.dtype).removeprefix("torch.")}'


def _build(class_name: str, init_kwargs: dict[str, Any], source: str, shapes_only: bool = False) -> torch.nn.Module:
    """Construct an allow-listed class without disturbing the caller's global random state.

    ``shapes_only`` builds it on the meta device: tensor names, shapes and dtypes without memory or init cost.
    """
    if class_name not in ALLOWED_CLASSES:
        raise WeightsFormatError(f'{source}: class_name {class_name!r} is not allowed; expected one of '
                                 f'{", ".join(ALLOWED_CLASSES)}')
    # Imported late (the CLIs validate flags before paying for it), and only from the allow-list above.
    module_name, _, name = class_name.rpartition('.')
    cls = getattr(importlib.import_module(module_name), name)
    try:
        # Construction draws initial weights from the global generator; they are overwritten right after.
        with torch.random.fork_rng(devices=[]), torch.device('meta' if shapes_only else 'cpu'):
            return cls(**init_kwargs)
    except Exception as err:  # a bad keyword or value surfaces as TypeError/ValueError/KeyError/...
        first_line = str(err).splitlines()[0] if str(err) else ''
        raise WeightsFormatError(f'{source}: init_kwargs rejected by {class_name.rsplit(".", 1)[1]} '
                                 f'({type(err).__name__}: {first_line})') from None


def state_dict_mismatches(expected: dict[str, torch.Tensor], given: dict[str, Any]) -> list[str]:
    """One description per tensor that is missing, unexpected, or of the wrong type, shape or dtype."""
    problems = []
    for name, want in expected.items():
        if name not in given:
            problems.append(f'missing {name} (expected {_tensor_text(want)})')
            continue
        have = given[name]
        if type(have) is not torch.Tensor:  # subclasses (Parameter included) are not plain data
            problems.append(f'{name} is a {type(have).__name__}, expected a tensor')
        elif have.layout != torch.strided:
            problems.append(f'{name} has layout {have.layout}, expected a dense tensor')
        elif have.shape != want.shape or have.dtype != want.dtype:
            problems.append(f'{name} is {_tensor_text(have)}, expected {_tensor_text(want)}')
    problems += [f'unexpected {name}' for name in given if name not in expected]
    return problems


def _mismatch_error(source: str, class_name: str, problems: list[str]) -> WeightsFormatError:
    shown = '; '.join(problems[:MAX_LISTED_MISMATCHES])
    more = f'; and {len(problems) - MAX_LISTED_MISMATCHES} more' if len(problems) > MAX_LISTED_MISMATCHES else ''
    return WeightsFormatError(f'{source}: {len(problems)} tensor(s) do not match {class_name.rsplit(".", 1)[1]} '
                              f'built from init_kwargs: {shown}{more}')


def network_record(module: torch.nn.Module, metadata: Optional[dict[str, Any]] = None,
                   source: str = 'network') -> dict[str, Any]:
    """The weights-only record of ``module``, checked against a fresh construction of our class."""
    class_name = class_name_of(module, source)
    init_kwargs = constructor_kwargs_of(module, source)
    state = {name: t.detach().to('cpu', copy=True).contiguous() for name, t in module.state_dict().items()}
    # Building our class now means a file that cannot be loaded is never written.
    reference = _build(class_name, init_kwargs, source, shapes_only=True).state_dict()
    problems = state_dict_mismatches(reference, state)
    if problems:
        raise _mismatch_error(source, class_name, problems)
    meta = dict(exported_by='formats.export', torch_version=torch.__version__)
    meta.update(metadata or {})
    return dict(format=FORMAT, version=VERSION, class_name=class_name,
                init_kwargs=json.dumps(init_kwargs, sort_keys=True),
                state_dict=state, metadata=_plain(meta, f'{source}: metadata'))


def export_weights(module: torch.nn.Module, path: Union[str, os.PathLike],
                   metadata: Optional[dict[str, Any]] = None) -> str:
    """Write ``module`` as a weights-only file at ``path`` (temporary name, then rename); returns the path.

    The training loop calls this beside each snapshot (``--snap-format``).
    """
    path = os.fspath(path)
    record = network_record(module, metadata, source=path)
    with dnnlib.util.atomic_write(path, 'wb') as f:  # 0o666 & ~umask, as a plain create
        torch.save(record, f)
    return path


# ----------------------------------------------------------------------------
# Loading.


def looks_like_weights_file(data: bytes) -> bool:
    """Whether ``data`` is a torch archive whose pickle names our format (decided without unpickling)."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return False
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            pickles = [n for n in archive.namelist() if n == 'data.pkl' or n.endswith('/data.pkl')]
            # The record's first entry is format=FORMAT, so the marker sits at the very start of the pickle;
            # looking only there keeps a training state that merely mentions the word from matching.
            return len(pickles) == 1 and FORMAT.encode() in archive.read(pickles[0])[:MARKER_WINDOW]
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False


def _check_record(record: Any, source: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Validate the top level of a loaded record; returns (class_name, init_kwargs, state_dict)."""
    if not isinstance(record, dict) or record.get('format') != FORMAT:
        raise WeightsFormatError(f'{source}: not a weights-only network file; expected {EXPECTED}')
    version = record.get('version')
    if type(version) is not int or not 1 <= version <= VERSION:
        raise WeightsFormatError(f'{source}: format version {version!r}; this code reads versions 1..{VERSION}')
    class_name = record.get('class_name')
    if class_name not in ALLOWED_CLASSES:
        raise WeightsFormatError(f'{source}: class_name {class_name!r} is not allowed; expected one of '
                                 f'{", ".join(ALLOWED_CLASSES)}')
    text = record.get('init_kwargs')
    if not isinstance(text, str):
        raise WeightsFormatError(f'{source}: init_kwargs must be a JSON string, got {type(text).__name__}')
    try:
        init_kwargs = json.loads(text)
    except ValueError as err:
        raise WeightsFormatError(f'{source}: init_kwargs is not valid JSON ({err})') from None
    if not isinstance(init_kwargs, dict):
        raise WeightsFormatError(f'{source}: init_kwargs must be a JSON object of constructor keywords, '
                                 f'got a {type(init_kwargs).__name__}')
    state = record.get('state_dict')
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise WeightsFormatError(f'{source}: state_dict must map tensor names to tensors')
    return class_name, init_kwargs, state


def network_from_record(record: Any, source: str) -> torch.nn.Module:
    """Build the network a loaded record describes, with every tensor checked before it is copied in."""
    class_name, init_kwargs, state = _check_record(record, source)
    net = _build(class_name, init_kwargs, source)
    problems = state_dict_mismatches(net.state_dict(), state)
    if problems:
        raise _mismatch_error(source, class_name, problems)
    with torch.no_grad():
        net.load_state_dict(state, strict=True)
    return net


def _load_error_text(err: Exception) -> str:
    """A short, single-line reason from torch.load's (often multi-paragraph) exception text."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    refused = [line for line in lines if 'Unsupported global' in line or 'Unsupported operand' in line]
    if refused:
        return f'the file holds more than tensors and plain values: {refused[0][:160]}'
    return f'{type(err).__name__}: {lines[0][:160]}' if lines else type(err).__name__


def load_weights_bytes(data: bytes, source: str) -> torch.nn.Module:
    """Decode a weights-only file already read into memory (``source`` names it in errors)."""
    if not data:
        raise WeightsFormatError(f'{source}: file is empty (0 bytes); expected {EXPECTED}')
    try:
        record = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    except Exception as err:  # truncated archives, foreign globals refused by the weights-only unpickler, ...
        raise WeightsFormatError(f'{source}: cannot be read as weights only ({_load_error_text(err)}); '
                                 f'expected {EXPECTED}') from None
    return network_from_record(record, source)


def load_weights(path_or_url: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = 'cpu',
                 eval_mode: bool = True) -> torch.nn.Module:
    """Load a weights-only file by path or URL, never unpickling code."""
    source = os.fspath(path_or_url)
    try:
        with dnnlib.util.open_url(source, verbose=False) as f:
            data = f.read()
    except OSError as err:
        raise WeightsFormatError(f'{source}: cannot read it ({err.strerror or err}); expected {EXPECTED}') from None
    net = load_weights_bytes(data, source)
    if device is not None:
        net = net.to(device)
    if eval_mode:
        net.eval().requires_grad_(False)
    return net
