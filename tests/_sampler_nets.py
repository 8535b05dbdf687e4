"""Small networks and golden-network builders shared by test_sampler.py and test_generate.py."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Optional

import torch

from tests.conftest import randomize_parameters_

# A DDPM++-style U-Net small enough for CPU tests: 8x8 RGB, two resolutions, attention at 4x4.
TINY_KWARGS = dict(img_resolution=8, img_channels=3, model_type='SongUNet', embedding_type='positional',
                   encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                   model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])


def make_tiny_net(label_dim: int = 0, pfgmpp: bool = False, D: int = 128, seed: int = 0,
                  **overrides: Any) -> torch.nn.Module:
    from training.networks import EDMPrecond
    torch.manual_seed(seed)  # construction draws initial weights from the global generator
    kwargs = dict(TINY_KWARGS, label_dim=label_dim, pfgmpp=pfgmpp, D=D, **overrides)
    net = EDMPrecond(**kwargs)
    return randomize_parameters_(net, seed + 1000).eval().requires_grad_(False)


def save_snapshot(net: torch.nn.Module, path: Path) -> Path:
    """A network-snapshot pickle in the EDM layout (dict with 'ema' and other keys readers ignore)."""
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={}), f)
    return path


def save_training_state(net: torch.nn.Module, path: Path) -> Path:
    """A training-state .pt as the PFGM++ loop writes it (modules pickled by torch.save)."""
    torch.save(dict(net=net, ema=net, optimizer_state={}, step=0), path)
    return path


def golden_network(golden_dir: Path, network_file: str, extra_kwargs: Optional[dict] = None) -> torch.nn.Module:
    """Rebuild a golden network from its MANIFEST constructor kwargs and stored state dict."""
    from training import networks
    manifest = json.loads((golden_dir / 'MANIFEST.json').read_text())
    entry = manifest['files'][network_file]
    cls = getattr(networks, entry['precond_class'])
    net = cls(**entry['constructor_kwargs'], **(extra_kwargs or {}))
    data = torch.load(golden_dir / network_file, weights_only=True)
    net.load_state_dict(data['state_dict'], strict=True)
    return net.eval().requires_grad_(False)
