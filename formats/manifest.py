"""What made a folder of generated images: the manifest ``generate.py`` writes beside its PNGs.

A folder is resumed (existing PNGs kept) only when its manifest records exactly the settings of the new command,
and ``fid.py calc`` refuses to pool images whose folders record different settings. The settings are derived from
what generation actually uses, not from a list of flags:

* ``network_sha256``: SHA-256 of what decides the network's outputs (:func:`network_content_sha256`: its class
  source, constructor keywords and tensors), so a snapshot and the weights-only file exported from it are one
  network; folders recorded with the SHA-256 of the file's bytes, as earlier versions did, still resume
  (:func:`check_resumable`'s ``legacy_settings``);
* ``sampler``: every keyword argument handed to ``training.sampler.sample_batch`` (solver, steps, sigma range, rho,
  S_*, class, PFGM++ D, noise injection, and whatever later options add), modules among them named by a hash of
  their tensors;
* ``net_class`` and the network options applied after loading (precision, memory layout, compile, quantization,
  device type), which change the arithmetic and so the pixels.

Manifest layout (JSON): ``format``, ``settings`` (compared), and informational entries (``seeds``, ``complete``,
``nfe_per_image``, ...). Image files a generator names ``{seed:06d}.png`` (optionally inside ``{thousands:06d}/``)
are the ones ``--force`` clears.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from typing import Any, Callable, Optional, Sequence

import torch

import dnnlib
from formats import export

MANIFEST_NAME = 'manifest.json'
#: Written into every manifest; bump when the meaning of ``settings`` changes, so old folders are not resumed.
MANIFEST_FORMAT = 'pfgmpp-generate/1'

_SEED_PNG = re.compile(r'\d+\.png')
_SEED_DIR = re.compile(r'\d+')
#: Differences listed in one error line before "and N more".
MAX_LISTED = 4


class ManifestError(ValueError):
    """A folder whose recorded settings forbid what was asked; the message is one line naming the folder.

    ``origins`` lists the subfolders (relative, '.' for the top) whose images would have been pooled, if any.
    """

    def __init__(self, message: str, origins: Optional[list[str]] = None):
        super().__init__(message)
        self.origins = origins or []


# ----------------------------------------------------------------------------
# Settings.


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``tensors`` (order-independent)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to('cpu').contiguous()
        digest.update(f'{name}|{t.dtype}|{list(t.shape)}|'.encode())
        # Flattened first: a contiguous tensor with a size-1 last dimension may keep a stride that view() refuses.
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return digest.hexdigest()


def fingerprint(value: Any) -> Any:
    """A JSON value standing for ``value`` such that different values give different fingerprints.

    Plain values as :func:`dnnlib.util.json_safe` writes them (non-finite floats as strings, dict keys sorted);
    modules become their class and a hash of their state dict; tensors a hash of their bytes; callables their
    qualified name; anything else its ``repr``.
    """
    return dnnlib.util.json_safe(value, leaf=_leaf_fingerprint, sort_keys=True)


def _leaf_fingerprint(value: Any) -> Any:
    if isinstance(value, (torch.nn.Module, torch.Tensor)):
        return _torch_fingerprint(value)
    if isinstance(value, torch.device):
        return value.type
    if callable(value):
        return f'{getattr(value, "__module__", "")}.{getattr(value, "__qualname__", repr(value))}'
    return repr(value)


def _torch_fingerprint(value: torch.nn.Module | torch.Tensor) -> dict[str, str]:
    """Modules: class and a hash of every parameter and buffer; tensors: a hash of their bytes."""
    if isinstance(value, torch.Tensor):
        return dict(tensor_sha256=tensor_sha256({'': value}))
    return dict(module=class_label(value), sha256=tensor_sha256(value.state_dict()))


def compact_seeds(seeds: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (manifests stay small for 50k seeds)."""
    parts, start, prev = [], None, None
    for s in seeds:
        if start is not None and s == prev + 1:
            prev = s
            continue
        if start is not None:
            parts.append(f'{start}-{prev}' if prev != start else f'{start}')
        start = prev = s
    if start is not None:
        parts.append(f'{start}-{prev}' if prev != start else f'{start}')
    return ','.join(parts)


#: ``--subdirs`` groups seeds by thousands, as EDM does.
IMAGES_PER_SUBDIR = 1000


def image_path(outdir: str, seed: int, subdirs: bool) -> str:
    """Where a generator writes the image of ``seed``: ``{seed:06d}.png``, inside ``{thousands:06d}/`` with
    ``subdirs``."""
    folder = os.path.join(outdir, f'{seed // IMAGES_PER_SUBDIR * IMAGES_PER_SUBDIR:06d}') if subdirs else outdir
    return os.path.join(folder, f'{seed:06d}.png')


def class_label(net: Any) -> str:
    """``module.Class`` of a network, stable across processes.

    A class unpickled by ``torch_utils.persistence`` lives in a module named at random when it is imported, so it is
    named by the SHA-256 of the source it was pickled with instead.
    """
    cls = type(net)
    source = getattr(cls, '_orig_module_src', None)
    if source is not None:
        digest = hashlib.sha256(source.encode('utf-8')).hexdigest()
        return f'persistent-source-{digest}.{cls._orig_class_name}'
    return f'{cls.__module__}.{cls.__qualname__}'


def network_content_sha256(net: torch.nn.Module) -> str:
    """SHA-256 (hex) of what decides a loaded network's outputs, whatever file it came from.

    Covers :func:`class_label` (the SHA-256 of the class source for persistent classes), the constructor keywords
    it records (as :func:`formats.export.constructor_kwargs_of` names them) and :func:`tensor_sha256` of its state
    dict. A snapshot ``x.pkl`` and the ``x.weights.pt`` exported from it give the same value; call it before
    options that change the tensors (precision, quantization).
    """
    try:
        kwargs: Any = export.constructor_kwargs_of(net)
    except ValueError:  # a module that records no constructor keywords: its class and tensors decide
        kwargs = None
    digest = hashlib.sha256()
    digest.update(class_label(net).encode())
    digest.update(json.dumps(fingerprint(kwargs), sort_keys=True).encode())
    digest.update(tensor_sha256(net.state_dict()).encode())
    return digest.hexdigest()


def describe_settings(network_sha256: str, net: torch.nn.Module, sampler_call: dict[str, Any],
                      **options: Any) -> dict[str, Any]:
    """The settings that decide the pixels of a folder, as a JSON-ready dict.

    ``network_sha256`` names the network (:func:`network_content_sha256`; earlier versions recorded the file's
    SHA-256). ``sampler_call`` is exactly the keyword dict passed to ``sampling.pipeline.sample_batch`` (without the
    seeds and the device); ``options`` are the network options applied after loading (precision, quantization, ...).
    """
    # The original's pfgmpp flag is recorded beside D, derived from it, as folders written before the kernel became
    # one value D record it: those folders keep resuming.
    sampler = dict(sampler_call, pfgmpp=sampler_call.get('D') is not None)
    return json.loads(json.dumps(dict(network_sha256=network_sha256,
                                      net_class=class_label(net),
                                      sampler=fingerprint(sampler), **fingerprint(options))))


def _flatten(value: Any, prefix: str = '') -> dict[str, Any]:
    if isinstance(value, dict) and value and not ({'sha256', 'tensor_sha256'} & set(value)):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f'{prefix}{key}.'))
        return flat
    return {prefix[:-1]: value}


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    if isinstance(value, dict):
        text = next((v for k, v in value.items() if k.endswith('sha256')), text)
    if re.fullmatch(r'[0-9a-f]{64}', text):
        return f'sha256 {text[:12]}...'
    return text if len(text) <= 40 else text[:37] + '...'


def settings_differences(recorded: dict[str, Any], wanted: dict[str, Any],
                         labels: tuple[str, str] = ('in the folder', 'now')) -> list[str]:
    """``['num_steps: 18 in the folder, 10 now', ...]``; empty when the settings agree exactly."""
    old, new = _flatten(recorded), _flatten(wanted)
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, '<unset>') != new.get(key, '<unset>'):
            name = key.removeprefix('sampler.')
            lines.append(f'{name}: {_short(old.get(key, "unset"))} {labels[0]}, {_short(new.get(key, "unset"))} '
                         f'{labels[1]}')
    return lines


def summarize(differences: list[str]) -> str:
    listed = '; '.join(differences[:MAX_LISTED])
    return listed + (f'; and {len(differences) - MAX_LISTED} more' if len(differences) > MAX_LISTED else '')


# ----------------------------------------------------------------------------
# Output folders.


def read_manifest(folder: str) -> Optional[dict[str, Any]]:
    """The folder's manifest, or None when it has none. Raises ManifestError when it exists but is unusable."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise ManifestError(f'{path}: cannot read it ({err}); expected the JSON manifest generate.py writes') \
            from None
    if not isinstance(manifest, dict) or manifest.get('format') != MANIFEST_FORMAT \
            or not isinstance(manifest.get('settings'), dict):
        found = manifest.get('format', 'no format entry') if isinstance(manifest, dict) else type(manifest).__name__
        raise ManifestError(f'{path}: written by another version of generate.py ({found}; expected '
                            f'{MANIFEST_FORMAT}), so its settings cannot be compared')
    return manifest


def write_manifest(folder: str, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` (format entry added) under a temporary name, then rename it into place."""
    os.makedirs(folder, exist_ok=True)
    with dnnlib.util.atomic_write(os.path.join(folder, MANIFEST_NAME), 'w') as f:
        json.dump(dict(format=MANIFEST_FORMAT, **manifest), f, indent=2)
        f.write('\n')


def generated_pngs(folder: str) -> list[str]:
    """Paths of the PNGs a generator names by seed in ``folder`` and its numeric subfolders."""
    found = []
    if not os.path.isdir(folder):
        return found
    for entry in os.scandir(folder):
        if entry.is_file() and _SEED_PNG.fullmatch(entry.name):
            found.append(entry.path)
        elif entry.is_dir() and _SEED_DIR.fullmatch(entry.name):
            found.extend(sub.path for sub in os.scandir(entry.path)
                         if sub.is_file() and _SEED_PNG.fullmatch(sub.name))
    return sorted(found)


def clear_generated(folder: str) -> int:
    """Delete the seed-named PNGs, emptied numeric subfolders and the manifest of ``folder``; returns the count."""
    pngs = generated_pngs(folder)
    for path in pngs:
        os.remove(path)
    for entry in list(os.scandir(folder)) if os.path.isdir(folder) else []:
        if entry.is_dir() and _SEED_DIR.fullmatch(entry.name) and not os.listdir(entry.path):
            os.rmdir(entry.path)
    manifest = os.path.join(folder, MANIFEST_NAME)
    if os.path.isfile(manifest):
        os.remove(manifest)
    return len(pngs)


LegacySettings = Callable[[], list[dict[str, Any]]]


def check_resumable(folder: str, settings: dict[str, Any],
                    legacy_settings: Optional[LegacySettings] = None) -> Optional[dict[str, Any]]:
    """Decide whether new images may join ``folder``; returns its manifest (None for a new folder).

    A folder whose manifest records other settings but that holds no generated PNG (a run that stopped before its
    first image) is treated as new: nothing made with those settings would be mixed in. ``legacy_settings``, when
    given, returns the same settings as earlier versions recorded them (the network named by a file's bytes), one
    dict per file that holds this network; a folder matching any of them is accepted. Raises ManifestError when the folder holds images made with other settings, or
    seed-named PNGs without a manifest.
    """
    pngs = generated_pngs(folder)
    manifest = read_manifest(folder) if pngs else None
    if manifest is None:
        if pngs:
            raise ManifestError(f'{folder} holds {len(pngs)} PNG(s) but no {MANIFEST_NAME} saying how they were '
                                f'made (e.g. {os.path.relpath(pngs[0], folder)})')
        return None
    differences = settings_differences(manifest['settings'], settings)
    if differences and legacy_settings is not None and any(
            not settings_differences(manifest['settings'], legacy) for legacy in legacy_settings()):
        differences = []
    if differences:
        raise ManifestError(f'{folder} holds images made with other settings ({summarize(differences)})')
    return manifest


# ----------------------------------------------------------------------------
# Folders of images for FID.


def _image_extensions() -> set[str]:
    import PIL.Image
    PIL.Image.init()
    return {ext.lower() for ext in PIL.Image.EXTENSION}


def _list_files(path: str) -> list[str]:
    """Relative '/'-separated names of the files in a folder or ZIP."""
    if os.path.isdir(path):
        names = []
        for root, _dirs, files in os.walk(path):
            rel_root = os.path.relpath(root, path).replace(os.sep, '/')
            names.extend(name if rel_root == '.' else f'{rel_root}/{name}' for name in files)
        return names
    with zipfile.ZipFile(path) as archive:
        return [name for name in archive.namelist() if not name.endswith('/')]


def _read_member(path: str, name: str) -> bytes:
    if os.path.isdir(path):
        with open(os.path.join(path, name), 'rb') as f:
            return f.read()
    with zipfile.ZipFile(path) as archive:
        return archive.read(name)


def image_origins(path: str) -> dict[str, Optional[dict[str, Any]]]:
    """Where the images of a folder or ZIP come from: origin -> its recorded settings (None: no manifest).

    An image's origin is the nearest folder above it holding a manifest; images without one are grouped by their
    folder with all-digit folder names left out (generate.py's --subdirs and dataset_tool.py's numbered folders
    split one set of images, not several).
    """
    extensions = _image_extensions()
    files = _list_files(path)
    manifest_dirs = {name.rpartition('/')[0] for name in files
                     if name == MANIFEST_NAME or name.endswith('/' + MANIFEST_NAME)}
    origins: dict[str, Optional[dict[str, Any]]] = {}
    for name in files:
        if os.path.splitext(name)[1].lower() not in extensions:
            continue
        parts = name.split('/')[:-1]
        origin = None
        for depth in range(len(parts), -1, -1):
            if '/'.join(parts[:depth]) in manifest_dirs:
                origin = '/'.join(parts[:depth])
                break
        if origin is None:
            origins.setdefault('/'.join(p for p in parts if not _SEED_DIR.fullmatch(p)) + '\0', None)
        elif origin not in origins:
            member = f'{origin}/{MANIFEST_NAME}' if origin else MANIFEST_NAME
            try:
                manifest = json.loads(_read_member(path, member))
                settings = manifest['settings'] if isinstance(manifest, dict) else None
            except (OSError, ValueError, KeyError):
                settings = None
            origins[origin] = settings if isinstance(settings, dict) else None
    return origins


def check_single_origin(path: str) -> None:
    """Raise ManifestError when the images under ``path`` were made by different runs or settings.

    Several origins are fine only when every one has a manifest and all record the same settings (e.g. seed
    ranges generated into separate folders with one command line).
    """
    origins = image_origins(path)
    if len(origins) <= 1:
        return
    names = sorted(origins)
    shown = [(n.rstrip('\0') or '.') for n in names]
    recorded = [origins[n] for n in names]
    if all(r is not None for r in recorded):
        for name, settings in zip(shown[1:], recorded[1:]):
            differences = settings_differences(recorded[0], settings, (f'in {shown[0]}', f'in {name}'))
            if differences:
                raise ManifestError(f'{path}: holds images made with different settings ({shown[0]} and {name} '
                                    f'differ: {summarize(differences)})', origins=shown)
        return
    listed = ', '.join(shown[:MAX_LISTED]) + (f' and {len(shown) - MAX_LISTED} more' if len(shown) > MAX_LISTED
                                              else '')
    unrecorded = [s for s, r in zip(shown, recorded) if r is None]
    raise ManifestError(f'{path}: holds images of {len(shown)} different origins ({listed}), '
                        f'{len(unrecorded)} without a {MANIFEST_NAME} recording how they were made', origins=shown)
