"""Write a network as a diffusers pipeline folder that ``PFGMPPPipeline.from_pretrained(folder)`` loads offline.

Layout (diffusers' own, written by ``DiffusionPipeline.save_pretrained``)::

    FOLDER/model_index.json                      # pipeline class and where its two components come from
    FOLDER/unet/config.json                      # PFGMPPNetwork: class_name + constructor keywords (JSON)
    FOLDER/unet/diffusion_pytorch_model.safetensors
    FOLDER/scheduler/scheduler_config.json       # PFGMPPScheduler: D, sigma range, rho, sigma_data, solver

Nothing in the folder runs code when loaded: the network class comes from the allow-list of ``formats.export``
and the tensors from safetensors. The folder appears under its name only once complete (written beside it under a
temporary name, every file flushed to disk, then renamed).

Only this module imports diffusers lazily, so ``export.py`` works without it until ``--format=diffusers``.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Optional, Union

import torch

import dnnlib

from integrations import require_diffusers
from training import pfgmpp as pfgmpp_lib
from sampling.schedules import EDM_SIGMA_MAX, EDM_SIGMA_MIN

if TYPE_CHECKING:  # importing it needs diffusers, which this module only loads on use
    from integrations.diffusers_pipeline import PFGMPPPipeline

# The EDM sampler's defaults (generate.py without sampler flags): Heun, rho = 7, sigma in [0.002, 80] clamped to
# the network's range by the pipeline.
DEFAULT_SOLVER = 'heun'
DEFAULT_RHO = 7.0


class DiffusersExportError(ValueError):
    """A pipeline folder that cannot be written or read back; the message names the folder."""


def build_pipeline(net: torch.nn.Module, solver: str = DEFAULT_SOLVER) -> 'PFGMPPPipeline':
    """A :class:`PFGMPPPipeline` around a copy of ``net`` with the scheduler ``generate.py`` would use by default.

    The scheduler's D is the network's recorded kernel (:func:`training.pfgmpp.network_D`; NVIDIA's EDM networks,
    which record none, are diffusion). Raises MissingExtraError (an ImportError) without diffusers.
    """
    require_diffusers()
    from integrations.diffusers_pipeline import PFGMPPNetwork, PFGMPPPipeline
    from integrations.diffusers_scheduler import PFGMPPScheduler
    sigma_data = float(getattr(net, 'sigma_data', 0.5))
    scheduler = PFGMPPScheduler(D=pfgmpp_lib.network_D(net), sigma_min=EDM_SIGMA_MIN, sigma_max=EDM_SIGMA_MAX,
                                rho=DEFAULT_RHO, sigma_data=sigma_data, solver=solver, prediction_type='sample')
    return PFGMPPPipeline(unet=PFGMPPNetwork.from_network(net), scheduler=scheduler)


def _settle_tree(folder: str) -> None:
    """Flush every file of ``folder`` to disk and give files and folders the permissions a plain create would
    (diffusers and safetensors may write owner-only files; teammates must be able to read the pipeline)."""
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), dnnlib.util.creation_mode(folder=True))
        for name in files:
            path = os.path.join(root, name)
            os.chmod(path, dnnlib.util.creation_mode())
            with open(path, 'rb') as f:
                os.fsync(f.fileno())


def export_diffusers(net: torch.nn.Module, folder: Union[str, os.PathLike], force: bool = False,
                     solver: str = DEFAULT_SOLVER) -> str:
    """Write ``net`` as a pipeline folder at ``folder`` and check that it loads back bit for bit; returns the path.

    ``force`` replaces an existing folder (only once the new one is complete). Raises DiffusersExportError when
    ``folder`` exists without ``force`` or is a file, or when the folder does not read back identically;
    MissingExtraError without diffusers; OSError when it cannot be written.
    """
    folder = os.fspath(folder)
    if os.path.isfile(folder):
        raise DiffusersExportError(f'{folder}: is a file; expected a folder name for the diffusers pipeline')
    if os.path.exists(folder) and not force:
        raise DiffusersExportError(f'{folder}: already exists (pass --force to replace it)')
    if getattr(net, 'consistency', False):
        raise DiffusersExportError(f'{folder}: the network is a consistency model, which samples in 1, 2 or 4 steps '
                                   f'with its own sampler (generate.py --steps); the diffusers scheduler would '
                                   f'integrate it as an ODE and give other images. Export the weights-only format')
    pipeline = build_pipeline(net, solver=solver)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    staging = dnnlib.util.temporary_folder(parent, prefix='.' + os.path.basename(os.path.abspath(folder)) + '.',
                                           suffix='.tmp')
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        _settle_tree(staging)
        problem = reload_mismatch(staging, net)
        if problem:
            raise DiffusersExportError(f'{folder}: the written pipeline does not read back ({problem})')
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def reload_mismatch(folder: str, net: torch.nn.Module) -> Optional[str]:
    """Load ``folder`` offline and compare its network with ``net``: None when every tensor is equal, else why."""
    from integrations.diffusers_pipeline import PFGMPPPipeline
    loaded = PFGMPPPipeline.from_pretrained(folder, local_files_only=True)
    ours = loaded.unet.net.state_dict()
    theirs = net.state_dict()
    if set(ours) != set(theirs):
        return f'tensor names differ: {sorted(set(ours) ^ set(theirs))[:3]}'
    differing = [k for k, v in theirs.items() if not torch.equal(ours[k], v)]
    if differing:
        return f'{len(differing)} tensor(s) changed (first: {differing[0]})'
    if loaded.scheduler.D != pfgmpp_lib.network_D(net):
        return f'scheduler D={loaded.scheduler.D}, network D={pfgmpp_lib.network_D(net)}'
    return None
