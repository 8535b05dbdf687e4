"""Which run directory a launch of train.py writes into, what it resumes, and the record of its segments.

``--resume=auto`` continues the newest run under ``--outdir`` whose identity (:func:`training.config.run_identity`:
dataset, architecture, preconditioner and loss, PFGM++ D, conditioning) equals this launch's; the batch, process
count, learning rate, durations and precision may differ and are reported as changes. A run directory is matched
by the ``training_options.json`` it holds; one without it (written by other code) by its name, whatever process
count and batch the name records. In the chosen run the newest training state that is complete is resumed; newer
ones that are truncated or unreadable are skipped and named.

Files (written atomically by rank 0 through :func:`dnnlib.util.atomic_write`):
    ``training_options.json``   the configuration of the run's first segment (the keys of EDM's train.py); a
                                resumed segment leaves it as it is
    ``training_segments.json``  a list with one entry per launch: ``segment`` (0, 1, ...), ``started`` (UTC,
                                ISO 8601), ``world_size``, ``resumed_from`` (training-state path or null),
                                ``changes`` (``{dotted option: [before, now]}`` against the previous segment) and
                                ``options`` (that launch's whole configuration)
"""

from __future__ import annotations

import datetime
import json
import os
import re
import zipfile
from typing import Any, Mapping, Optional

import dnnlib
from training import config as config_lib
from training import training_state

OPTIONS_FILE = 'training_options.json'
SEGMENTS_FILE = 'training_segments.json'
#: The process count and batch in a run directory's name, which a continuing launch may change.
_LAUNCH_PARTS_IN_DESC = ((re.compile(r'-gpus\d+-'), '-gpus*-'), (re.compile(r'-batch\d+-'), '-batch*-'))


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (another run's identity, not writable); one line."""


class Choice:
    """The outcome of :func:`choose_run_dir`: ``run_dir``; ``state`` to resume (or None); ``skipped``, the newer
    training states of that run that do not load (newest first, each ``(path, reason)``)."""

    def __init__(self, run_dir: str, state: Optional[str], skipped: list[tuple[str, str]]) -> None:
        self.run_dir, self.state, self.skipped = run_dir, state, skipped

    def as_tuple(self) -> tuple[str, Optional[str], list[tuple[str, str]]]:
        return self.run_dir, self.state, self.skipped


def read_options(run_dir: str) -> Optional[dict[str, Any]]:
    """The ``training_options.json`` of ``run_dir`` as a dict, or None when it is absent or not a JSON object."""
    try:
        with open(os.path.join(run_dir, OPTIONS_FILE), encoding='utf-8') as f:
            options = json.load(f)
    except (OSError, ValueError):
        return None
    return options if isinstance(options, dict) else None


def read_segments(run_dir: str) -> list[dict[str, Any]]:
    """The segment records of ``run_dir`` (an empty list when there are none or the file is unreadable)."""
    try:
        with open(os.path.join(run_dir, SEGMENTS_FILE), encoding='utf-8') as f:
            segments = json.load(f)
    except (OSError, ValueError):
        return []
    return segments if isinstance(segments, list) else []


def previous_options(run_dir: str) -> Optional[dict[str, Any]]:
    """The configuration of the latest launch recorded in ``run_dir`` (its last segment, else its
    ``training_options.json``), or None."""
    segments = read_segments(run_dir)
    if segments and isinstance(segments[-1].get('options'), dict):
        return segments[-1]['options']
    return read_options(run_dir)


def next_run_dir(outdir: str, desc: str) -> str:
    """``{outdir}/{id:05d}-{desc}`` with an id one above every numbered directory under ``outdir``."""
    ids = []
    if os.path.isdir(outdir):
        for name in os.listdir(outdir):
            match = re.match(r'\d+', name)
            if match and os.path.isdir(os.path.join(outdir, name)):
                ids.append(int(match.group()))
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')


def _name_kind(desc: str) -> str:
    for pattern, wildcard in _LAUNCH_PARTS_IN_DESC:
        desc = pattern.sub(wildcard, desc, count=1)
    return desc


def matching_runs(outdir: str, identity: Mapping[str, Any], desc: str) -> list[str]:
    """Numbered run directories under ``outdir`` that belong to the run ``identity`` names, newest id first.

    A directory with a ``training_options.json`` matches by identity; one without it by its name (``desc`` with
    any process count and batch).
    """
    found = []
    if os.path.isdir(outdir):
        for name in os.listdir(outdir):
            path = os.path.join(outdir, name)
            match = re.fullmatch(r'(\d+)-(.*)', name)
            if not match or not os.path.isdir(path):
                continue
            options = read_options(path)
            if options is not None:
                same = config_lib.run_identity(options) == dict(identity)
            else:
                same = _name_kind(match.group(2)) == _name_kind(desc)
            if same:
                found.append((int(match.group(1)), path))
    return [path for _id, path in sorted(found, reverse=True)]


def state_problem(path: str) -> Optional[str]:
    """Why the training state ``path`` cannot be resumed (truncated, not a torch.save archive), or None.

    Checks the archive's structure and the CRC of every member without unpickling it, so a large state costs one
    read.
    """
    try:
        if not zipfile.is_zipfile(path):
            return 'not a complete torch.save archive (truncated or another file)'
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as err:
        return f'cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__})'
    return f'member {bad} is damaged' if bad is not None else None


def newest_loadable_state(run_dir: str) -> tuple[Optional[str], list[tuple[str, str]]]:
    """The newest complete training state of ``run_dir`` (highest kimg, then newest file) and the newer ones
    skipped as ``(path, reason)``."""
    candidates = sorted(((kimg, os.path.getmtime(path), path) for kimg, path in training_state.list_states(run_dir)),
                        reverse=True)
    skipped = []
    for _kimg, _mtime, path in candidates:
        problem = state_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def choose_run_dir(outdir: str, desc: str, identity: Mapping[str, Any], resume: Optional[str],
                   nosubdir: bool = False, name: Optional[str] = None) -> Choice:
    """Where this launch writes and what it resumes, following --outdir, --nosubdir, --name and --resume.

    ``resume``: None (a new run), a training-state path (continued in a new run directory, as EDM does) or
    ``'auto'`` (the newest matching run's newest complete state, else a new run).

    Raises:
        RunDirError: --resume=auto with --nosubdir/--name names a directory holding a run of another identity, or
            the matching run has training states but none of them is complete.
    """
    fixed = outdir if nosubdir else (os.path.join(outdir, name) if name else None)
    if resume != 'auto':
        return Choice(fixed or next_run_dir(outdir, desc), resume, [])
    if fixed is not None:
        options = read_options(fixed)
        if options is not None:
            differences = config_lib.identity_differences(config_lib.run_identity(options), identity)
            if differences:
                raise RunDirError(f'--resume=auto: {fixed} holds another run ({"; ".join(differences)}); these '
                                  f'must stay as they were, or choose another --name/--outdir')
        candidates = [fixed]
    else:
        candidates = matching_runs(outdir, identity, desc)
    for run_dir in candidates:
        state, skipped = newest_loadable_state(run_dir)
        if state is not None:
            return Choice(run_dir, state, skipped)
        if skipped:
            # Starting over in that directory would mix a new run with the old one's files.
            newest, reason = skipped[0]
            raise RunDirError(f'--resume=auto: no training state of {run_dir} is complete ({len(skipped)} '
                              f'skipped; the newest, {newest}: {reason}); give --resume=<training-state file> or '
                              f'move the run away to start a new one')
    return Choice(fixed or next_run_dir(outdir, desc), None, [])


def record_segment(run_dir: str, config: Mapping[str, Any], world_size: int, resumed_from: Optional[str],
                   now: Optional[datetime.datetime] = None) -> dict[str, Any]:
    """Create ``run_dir`` if needed and record this launch: ``training_options.json`` when the run starts here
    (kept when it continues), and one more entry in ``training_segments.json``. Returns that entry.

    A launch continues the run when ``resumed_from`` is a state inside ``run_dir``; otherwise it starts it and the
    earlier records (of a fresh start into the same --name/--nosubdir directory) are replaced.

    Raises:
        RunDirError: the directory or a record cannot be written (one line naming --outdir).
    """
    try:
        dnnlib.util.check_writable_dir(run_dir, flag='--outdir')
    except OSError as err:
        raise RunDirError(str(err)) from None
    options = dnnlib.util.json_safe(dict(config))  # the segment record; training_options.json stays EDM's dump
    continues = resumed_from is not None and \
        os.path.abspath(os.path.dirname(resumed_from)) == os.path.abspath(run_dir)
    segments = read_segments(run_dir) if continues else []
    before = previous_options(run_dir) if continues else None
    if continues and not segments and before is not None:
        segments = [dict(segment=0, started=None, world_size=None, resumed_from=None, changes={}, options=before)]
    entry = dict(segment=len(segments), started=(now or datetime.datetime.now(datetime.timezone.utc)).isoformat(),
                 world_size=world_size, resumed_from=resumed_from,
                 changes=config_lib.option_changes(before, options) if before is not None else {}, options=options)
    if segments and segments[-1].get('world_size') not in (None, world_size):
        entry['changes']['world_size'] = [segments[-1]['world_size'], world_size]
    try:
        if not continues or read_options(run_dir) is None:
            with dnnlib.util.atomic_write(os.path.join(run_dir, OPTIONS_FILE), 'w') as f:
                json.dump(config, f, indent=2)
        with dnnlib.util.atomic_write(os.path.join(run_dir, SEGMENTS_FILE), 'w') as f:
            json.dump([*segments, entry], f, indent=2)
    except OSError as err:
        raise RunDirError(f'--outdir {run_dir}: cannot write the run records ({err.strerror or err})') from None
    return entry
