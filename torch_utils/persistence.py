"""Pickles that carry their own source code.

A class decorated with :func:`persistent_class` pickles its instances together with
the full source text of the module that defines it. Unpickling executes that
source in a fresh, private module and rebuilds the object from it, so a snapshot
keeps loading after the code in the repository has changed or moved.

The on-disk layout is the one NVIDIA's EDM (and PFGM++) write: the pickle calls
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with
``meta = {'type': 'class', 'version': 6, 'module_src': str, 'class_name': str,
'state': dict}``. Files in either direction load with either implementation.

Security: unpickling runs arbitrary code embedded in the file. Load only
snapshots you trust; share models with the weights-only format instead.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle
import sys
import types
import uuid
from typing import Any, Callable

import dnnlib

#: Format version written into ``meta['version']``; the original writes 6 as well.
_version = 6

_decorator_classes: set[type] = set()
_import_hooks: list[Callable[[dnnlib.EasyDict], Any]] = []
_source_of_module: dict[types.ModuleType, str] = {}
_module_of_source: dict[str, types.ModuleType] = {}


def persistent_class(orig_class: type) -> type:
    """Class decorator: instances pickle with the source of ``orig_class``'s module.

    The returned subclass also records the constructor arguments, available as
    ``obj.init_args`` and ``obj.init_kwargs``, so an object can be rebuilt from its
    configuration (the weights-only export relies on this).
    """
    if not isinstance(orig_class, type):
        raise TypeError('persistent_class() expects a class')
    if is_persistent(orig_class):
        return orig_class

    class_name = orig_class.__name__
    module_src = _module_to_src(sys.modules[orig_class.__module__])

    class Decorator(orig_class):  # type: ignore[misc, valid-type]
        _orig_module_src = module_src
        _orig_class_name = class_name

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            orig_class.__init__(self, *args, **kwargs)
            # Deep copies so that later mutation of the caller's lists cannot change the record.
            self._init_args, self._init_kwargs = copy.deepcopy((args, kwargs))
            _check_pickleable(self._init_args, self._init_kwargs, where=class_name)

        @property
        def init_args(self) -> tuple:
            """Positional constructor arguments (a copy)."""
            return tuple(copy.deepcopy(self._init_args))

        @property
        def init_kwargs(self) -> dnnlib.EasyDict:
            """Keyword constructor arguments (a copy)."""
            kwargs = copy.deepcopy(self._init_kwargs)
            return dnnlib.EasyDict(kwargs)

        def __reduce__(self) -> tuple:
            parts = list(super().__reduce__())
            parts += [None] * max(3 - len(parts), 0)
            if parts[0] is not _reconstruct_persistent_obj:
                meta = dict(type='class', version=_version, module_src=self._orig_module_src,
                            class_name=self._orig_class_name, state=parts[2])
                parts[0] = _reconstruct_persistent_obj
                parts[1] = (meta,)
                parts[2] = None
            return tuple(parts)

    # Present the wrapper under the original's identity (repr, error messages, isinstance checks by name).
    for attribute in ('__name__', '__qualname__', '__module__', '__doc__'):
        setattr(Decorator, attribute, getattr(orig_class, attribute))
    _decorator_classes.add(Decorator)
    return Decorator


def is_persistent(obj: Any) -> bool:
    """True for a decorated class or an instance of one."""
    try:
        if obj in _decorator_classes:
            return True
    except TypeError:  # unhashable instance
        pass
    return type(obj) in _decorator_classes


def import_hook(hook: Callable[[dnnlib.EasyDict], Any]) -> Callable:
    """Register ``hook(meta) -> meta | None`` to run before a persistent object is rebuilt.

    Hooks may edit ``meta.module_src`` (for example to patch an old snapshot's
    source) or ``meta.state``. Returning ``None`` keeps the (possibly mutated) meta.
    """
    if not callable(hook):
        raise TypeError('import_hook() expects a callable')
    _import_hooks.append(hook)
    return hook


def _reconstruct_persistent_obj(meta: dict) -> Any:
    """Rebuild an object from the meta record written by ``__reduce__`` (called by pickle)."""
    meta = dnnlib.EasyDict(meta)
    meta.state = dnnlib.EasyDict(meta.state) if meta.state is not None else None
    for hook in _import_hooks:
        replaced = hook(meta)
        if replaced is not None:
            meta = replaced
    if meta.get('type') != 'class':
        raise pickle.UnpicklingError(f'persistent object of unknown type {meta.get("type")!r}')
    if meta.get('version') != _version:
        raise pickle.UnpicklingError(f'persistent object has format version {meta.get("version")!r}; '
                                     f'this code reads version {_version}')

    namespace = vars(_src_to_module(meta.module_src))
    if meta.class_name not in namespace:
        raise pickle.UnpicklingError(f'embedded source defines no class named {meta.class_name!r}')
    cls = persistent_class(namespace[meta.class_name])
    obj = cls.__new__(cls)
    if callable(getattr(obj, '__setstate__', None)):
        obj.__setstate__(meta.state)
    elif meta.state is not None:
        vars(obj).update(meta.state)
    return obj


def _module_to_src(module: types.ModuleType) -> str:
    """Source text of a module, including modules that were themselves created from a pickle."""
    src = _source_of_module.get(module)
    if src is None:
        src = inspect.getsource(module)
        _source_of_module[module] = src
        _module_of_source[src] = module
    return src


def _src_to_module(module_src: str) -> types.ModuleType:
    """Execute embedded source once per distinct text and return the resulting module."""
    module = _module_of_source.get(module_src)
    if module is not None:
        return module
    name = '_imported_module_' + uuid.uuid4().hex
    module = types.ModuleType(name)
    sys.modules[name] = module
    _source_of_module[module] = module_src
    _module_of_source[module_src] = module
    try:
        exec(compile(module_src, f'<persistent source {name}>', 'exec'), module.__dict__)  # noqa: S102
    except Exception as err:
        del _module_of_source[module_src]
        del sys.modules[name]
        raise pickle.UnpicklingError(f'the source embedded in the pickle failed to import: '
                                     f'{type(err).__name__}: {err}') from err
    return module


def _check_pickleable(*objs: Any, where: str = 'object') -> None:
    """Fail early, at construction, if constructor arguments could not be pickled later."""
    def visit(obj: Any) -> Any:
        if isinstance(obj, (tuple, list, set)):
            return [visit(x) for x in obj]
        if isinstance(obj, dict):
            return [[visit(k), visit(v)] for k, v in obj.items()]
        if isinstance(obj, (str, int, float, bool, bytes, bytearray, type(None))):
            return None
        if f'{type(obj).__module__}.{type(obj).__name__}' in ('numpy.ndarray', 'torch.Tensor', 'torch.nn.parameter.Parameter'):
            return None
        if is_persistent(obj):
            return None
        return obj

    leftover = visit(objs)
    try:
        pickle.dump(leftover, io.BytesIO())
    except Exception as err:
        raise TypeError(f'{where}: constructor arguments must be pickleable ({err})') from err
