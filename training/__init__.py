"""What trains: the networks and their preconditioning, the loss, the PFGM++ perturbation kernel, augmentation, the
dataset, the training loop with its training states, and post-hoc EMA.

Modules that lived in this package before the project was laid out by concern keep loading under their old names,
because files users already have name them: the exact denoiser's pickled source imports ``training.sampler``, and
weights files of the digits classifier record ``training.digits_classifier.DigitsClassifier``. :data:`MOVED` maps
each old name to its home; importing an old name returns the module at its home (the same object), or, for the
sampler that was split by solver family, a module holding the public names of its four successors.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Optional, Sequence

#: Old module name -> the module(s) that hold its contents now.
MOVED: dict[str, tuple[str, ...]] = {
    'training.sampler': ('sampling.schedules', 'sampling.edm', 'sampling.fast_solvers', 'sampling.pipeline'),
    'training.guidance': ('sampling.guidance',),
    'training.quantize': ('sampling.quantize',),
    'training.exact_denoiser': ('sampling.exact_denoiser',),
    'training.features': ('evaluation.features',),
    'training.metrics': ('evaluation.metrics',),
    'training.digits_classifier': ('evaluation.digits_classifier',),
    'training.network_io': ('formats.network_io',),
    'training.export': ('formats.export',),
    'training.manifest': ('formats.manifest',),
    'training.dataset_files': ('formats.dataset_files',),
    'training.cli': ('cli.common',),
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import hook that answers the old names of :data:`MOVED` (and nothing else)."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None,
                  target: Optional[types.ModuleType] = None) -> Optional[importlib.machinery.ModuleSpec]:
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        homes = [importlib.import_module(name) for name in MOVED[spec.name]]
        if len(homes) == 1:
            return homes[0]
        merged = types.ModuleType(spec.name, f'Old name of {", ".join(MOVED[spec.name])}.')
        for home in homes:
            merged.__dict__.update({key: value for key, value in vars(home).items() if not key.startswith('__')})
        return merged

    def exec_module(self, module: types.ModuleType) -> None:
        pass  # the homes were executed when create_module imported them


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())
