"""General helpers: attribute dicts, logging, name lookup, URL access with a cache,
integer-range parsing, JSON-safe values and atomic file writes.

Everything here is free of torch so that the CLIs can report bad input before
paying for the torch import.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import math
import os
import re
import sys
import tempfile
import threading
import time
import types
import urllib.parse
import urllib.request
from typing import Any, Callable, Iterator, Optional

# ----------------------------------------------------------------------------
# Attribute-style dictionary.


class EasyDict(dict):
    """A dict whose keys can also be read and written as attributes."""

    def __getattr__(self, key: str) -> Any:
        if key in self:
            return self[key]
        raise AttributeError(key)

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __delattr__(self, key: str) -> None:
        if key not in self:
            raise AttributeError(key)
        del self[key]


# ----------------------------------------------------------------------------
# Console logging that also lands in a file.


class Logger:
    """Duplicates everything written to stdout/stderr into a log file.

    Used as a context manager by the training loop so that ``log.txt`` holds
    exactly what the user saw on the console.
    """

    def __init__(self, file_name: Optional[str] = None, file_mode: str = 'a', should_flush: bool = True):
        self.file = open(file_name, file_mode, encoding='utf-8') if file_name is not None else None
        self.should_flush = bool(should_flush)
        self.stdout = sys.stdout
        self.stderr = sys.stderr
        sys.stdout = self
        sys.stderr = self

    def __enter__(self) -> 'Logger':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def write(self, text: str) -> None:
        if not text:
            return
        if self.file is not None:
            self.file.write(text)
        self.stdout.write(text)
        if self.should_flush:
            self.flush()

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()
        self.stdout.flush()

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        self.flush()
        # Restore the streams only if they still point at us (nested loggers).
        if sys.stdout is self:
            sys.stdout = self.stdout
        if sys.stderr is self:
            sys.stderr = self.stderr
        if self.file is not None:
            self.file.close()
            self.file = None


# ----------------------------------------------------------------------------
# Formatting and parsing.


def format_time(seconds: float) -> str:
    """Human-readable duration: ``42s``, ``3m 05s``, ``2h 07m 09s``, ``1d 04h 10m``."""
    s = int(round(seconds))
    if s < 60:
        return f'{s}s'
    if s < 3600:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 86400:
        return f'{s // 3600}h {(s // 60) % 60:02d}m {s % 60:02d}s'
    return f'{s // 86400}d {(s // 3600) % 24:02d}h {(s // 60) % 60:02d}m'


_RANGE_ITEM = re.compile(r'^\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?$')


def parse_int_list(text: Any, name: str = 'value') -> list[int]:
    """Parse ``'0-63,100,200-210'`` into a list of integers (ranges inclusive).

    Lists and ints pass through. ``name`` is used in the error message, so a CLI
    can say which flag was malformed.
    """
    if isinstance(text, int):
        return [text]
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    result: list[int] = []
    for item in str(text).split(','):
        if not item.strip():
            continue
        m = _RANGE_ITEM.match(item)
        if m is None:
            raise ValueError(f'{name}: cannot parse {item.strip()!r}; expected integers or ranges like "0-63,100"')
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f'{name}: range {item.strip()!r} is empty; write the smaller number first')
        result.extend(range(lo, hi + 1))
    if not result:
        raise ValueError(f'{name}: no integers given')
    return result


def file_sha256(path_or_url: str, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 (hex) of the bytes of a file, or of a URL through :func:`open_url`'s download cache, read in pieces of
    ``chunk_bytes`` so that large files are never held in memory. Raises OSError when it cannot be read."""
    digest = hashlib.sha256()
    with open_url(path_or_url, verbose=False) as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b''):
            digest.update(chunk)
    return digest.hexdigest()


def json_safe(value: Any, leaf: Callable[[Any], Any] = str, sort_keys: bool = False) -> Any:
    """``value`` as plain JSON data: what ``json.dumps`` writes as strict JSON, and what reads back equal.

    None, booleans, integers and strings stay; finite floats stay, non-finite ones become ``'inf'``, ``'-inf'``,
    ``'nan'`` (strict JSON has no such numbers); tuples become lists; dict keys become strings (sorted with
    ``sort_keys``); any other value becomes ``leaf(value)`` (its ``str`` by default), which must be JSON data.
    The one JSON sanitiser of the project: manifests, result lines and the training options use it.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: str(kv[0])) if sort_keys else value.items()
        return {str(k): json_safe(v, leaf, sort_keys) for k, v in items}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, leaf, sort_keys) for v in value]
    return leaf(value)


# ----------------------------------------------------------------------------
# Looking up objects by dotted name.


def get_module_from_obj_name(obj_name: str) -> tuple[types.ModuleType, str]:
    """Split ``'pkg.mod.Class.attr'`` into the longest importable module and the rest."""
    parts = obj_name.split('.')
    for cut in range(len(parts), 0, -1):
        module_name = '.'.join(parts[:cut])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # Only swallow "this prefix is not a module"; a real import error inside it must surface.
            if err.name is None or not module_name.startswith(err.name):
                raise
            continue
        rest = '.'.join(parts[cut:])
        try:
            get_obj_from_module(module, rest)
        except AttributeError:
            continue
        return module, rest
    raise ImportError(f'cannot find an object named {obj_name!r}')


def get_obj_from_module(module: types.ModuleType, attr_path: str) -> Any:
    """Follow a dotted attribute path (possibly empty) starting at ``module``."""
    target: Any = module
    for part in filter(None, attr_path.split('.')):
        target = getattr(target, part)
    return target


def get_obj_by_name(dotted_name: str) -> Any:
    """Resolve ``'package.module.Object'`` to the object."""
    module, rest = get_module_from_obj_name(dotted_name)
    return get_obj_from_module(module, rest)


def call_func_by_name(*args: Any, func_name: Optional[str] = None, **kwargs: Any) -> Any:
    if func_name is None:
        raise ValueError('call_func_by_name needs func_name')
    func = get_obj_by_name(func_name)
    if not callable(func):
        raise TypeError(f'{func_name} is not callable')
    return func(*args, **kwargs)


def construct_class_by_name(*args: Any, class_name: Optional[str] = None, **kwargs: Any) -> Any:
    """Instantiate ``class_name`` (a dotted path) with the remaining arguments."""
    return call_func_by_name(*args, **kwargs, func_name=class_name)


# ----------------------------------------------------------------------------
# Atomic writes.


NEW_FILE_MODE = 0o666  # what open() asks for; the umask then takes bits away
NEW_DIR_MODE = 0o777   # what os.mkdir() asks for
_PROC_STATUS = '/proc/self/status'
_umask_lock = threading.Lock()


def process_umask() -> int:
    """The process's file-creation mask (e.g. ``0o022``), as permission bits.

    Read from ``/proc/self/status`` where the kernel reports it (Linux 4.7+): that read changes nothing, so
    other threads creating files meanwhile are unaffected. Elsewhere the only portable query is to set a mask
    and put the old one back; that flip is done under a lock so that two readers here cannot leave the wrong
    mask behind, and sets the private ``0o077`` for that instant, so that a file another thread creates
    meanwhile errs towards fewer permissions, never more. It is read on every call rather than cached, because
    a caller may change the umask.
    """
    try:
        with open(_PROC_STATUS, encoding='ascii', errors='replace') as status:
            for line in status:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def creation_mode(folder: bool = False) -> int:
    """Permission bits a plain ``open(path, 'w')`` (``0o666``) or ``os.mkdir`` (``0o777``) would give a new
    file or folder under the current umask; ``tempfile`` creates owner-only (``0o600``/``0o700``) entries."""
    return (NEW_DIR_MODE if folder else NEW_FILE_MODE) & ~process_umask()


def temporary_file(directory: str, prefix: str, suffix: str) -> tuple[int, str]:
    """``tempfile.mkstemp`` in ``directory`` with the permissions of a plain create (:func:`creation_mode`), so
    that renaming it into place gives teammates the access the umask grants. Returns (fd, path).

    Raises:
        OSError: the file cannot be created (no such folder, read-only, full).
    """
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    try:
        os.chmod(path, creation_mode())
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.remove(path)
        raise
    return fd, path


def temporary_folder(directory: str, prefix: str, suffix: str) -> str:
    """``tempfile.mkdtemp`` in ``directory`` with the permissions of ``os.mkdir`` under the umask
    (:func:`creation_mode`); returns its path. Raises OSError as :func:`temporary_file`."""
    path = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=directory)
    try:
        os.chmod(path, creation_mode(folder=True))
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(path)
        raise
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = 'wb') -> Iterator[Any]:
    """Open a temporary file next to ``path`` and rename it over ``path`` on success.

    A crash or exception inside the block leaves ``path`` untouched and removes the
    temporary file, so readers never see a truncated file under the final name. The file
    gets the permissions a plain ``open(path, 'w')`` would: ``0o666 & ~umask``.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = temporary_file(directory, '.' + os.path.basename(path) + '.', '.tmp')
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


# ----------------------------------------------------------------------------
# URL access with a download cache.

_cache_dir: Optional[str] = None
DOWNLOAD_SUBDIR = 'downloads'


def set_cache_dir(path: Optional[str]) -> None:
    global _cache_dir
    _cache_dir = path


def make_cache_dir_path(*parts: str) -> str:
    """Location of dnnlib's download cache: set_cache_dir(), else $DNNLIB_CACHE_DIR, else ~/.cache/dnnlib."""
    root = _cache_dir or os.environ.get('DNNLIB_CACHE_DIR')
    if not root:
        home = os.environ.get('HOME') or os.environ.get('USERPROFILE') or tempfile.gettempdir()
        root = os.path.join(home, '.cache', 'dnnlib')
    return os.path.join(root, *parts)


def is_url(text: Any, allow_file_urls: bool = False) -> bool:
    """True for http(s) URLs, and for file:// URLs when ``allow_file_urls``."""
    if not isinstance(text, str) or '://' not in text:
        return False
    if text.startswith('file://'):
        return allow_file_urls
    try:
        parsed = urllib.parse.urlparse(text)
    except ValueError:
        return False
    return parsed.scheme in ('http', 'https') and bool(parsed.netloc)


def _file_url_to_path(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    path = urllib.request.url2pathname(parsed.path)
    if parsed.netloc and parsed.netloc != 'localhost':
        path = '//' + parsed.netloc + path
    return path


def open_url(url: str, cache_dir: Optional[str] = None, num_attempts: int = 3, verbose: bool = True,
             return_filename: bool = False, cache: bool = True, timeout: float = 30.0) -> Any:
    """Open a local path, a ``file://`` URL or an ``http(s)://`` URL as a binary file.

    Downloads are cached under :func:`make_cache_dir_path` ('downloads'), written to a
    temporary name first. Failure raises ``OSError`` naming the URL and the cause.
    """
    if not is_url(url, allow_file_urls=True):
        path = os.fspath(url)
        if os.path.isdir(path):   # a folder is not "missing": say what it is
            raise IsADirectoryError(f'{path}: is a directory, not a file')
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{path}: no such file')
        return path if return_filename else open(path, 'rb')
    if url.startswith('file://'):
        path = _file_url_to_path(url)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{url}: no such file ({path})')
        return path if return_filename else open(path, 'rb')
    if return_filename and not cache:
        raise ValueError('open_url: return_filename needs cache=True for remote URLs')

    if cache_dir is None:
        cache_dir = make_cache_dir_path(DOWNLOAD_SUBDIR)
    url_md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    if cache:
        hits = [name for name in (os.listdir(cache_dir) if os.path.isdir(cache_dir) else [])
                if name.startswith(url_md5 + '_') and not name.endswith('.tmp')]
        if hits:
            path = os.path.join(cache_dir, hits[0])
            return path if return_filename else open(path, 'rb')

    data = None
    last_error: Optional[BaseException] = None
    for attempt in range(num_attempts):
        if verbose:
            print(f'Downloading {url} ...', end='', file=sys.stderr, flush=True)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                data = response.read()
            if verbose:
                print(' done', file=sys.stderr, flush=True)
            break
        except (OSError, ValueError) as err:  # URLError and socket errors are OSErrors
            last_error = err
            if verbose:
                print(' failed', file=sys.stderr, flush=True)
            if attempt + 1 < num_attempts:
                time.sleep(min(2 ** attempt, 5))
    if data is None:
        raise OSError(f'{url}: download failed after {num_attempts} attempt(s): {last_error}')

    if cache:
        name = os.path.basename(urllib.parse.urlparse(url).path) or 'download'
        name = re.sub(r'[^0-9a-zA-Z._-]+', '_', name)
        path = os.path.join(cache_dir, f'{url_md5}_{name}')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_write(path) as f:
            f.write(data)
        if return_filename:
            return path
    return io.BytesIO(data)


def check_writable_dir(path: str, flag: str = '--outdir') -> None:
    """Create ``path`` if needed and fail with a one-line message if it cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix='.probe-', delete=True)
        probe.close()
    except OSError as err:
        raise OSError(f'{flag} {path}: directory is not writable ({err.strerror or err})') from None



def launch_rank() -> int:
    """This process's rank as torchrun announced it in the environment (0 without torchrun); usable before any
    process group exists."""
    try:
        return int(os.environ.get('RANK', '0'))
    except ValueError:
        return 0
