"""Optional bridges to other libraries. Nothing here is imported by the rest of the project.

``integrations.diffusers_scheduler`` and ``integrations.diffusers_pipeline`` need Hugging Face diffusers
(``pip install -r requirements-diffusers.txt``); :func:`require_diffusers` says so in one line when it is missing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = 'pip install -r requirements-diffusers.txt'


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names it and the requirements file that installs it."""


def require_diffusers() -> ModuleType:
    """The ``diffusers`` module, or :class:`MissingExtraError` (one line naming what to install)."""
    try:
        return importlib.import_module('diffusers')
    except ImportError as err:
        raise MissingExtraError(f'diffusers is not installed ({err}); {INSTALL_HINT}') from None
