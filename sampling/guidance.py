"""Guidance: a denoiser that extrapolates from a guiding network towards the main one.

    D_guided(x; sigma) = D_gnet(x; sigma) + w * (D_net(x; sigma) - D_gnet(x; sigma))

the form of EDM2's autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself",
eq. 1). With an unconditional guide (or the same conditional network with its label dropped, trained with
``train.py --label-dropout``) this is classifier-free guidance (Ho & Salimans 2022); with a smaller or less trained
version of the network it is autoguidance. Guidance can be limited to noise levels in [sigma_lo, sigma_hi]
(Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval"); outside it the main network alone is used.

The guided denoiser has the network interface (:class:`training.sampler.Denoiser`), so every sampler uses it
unchanged, and so do PFGM++ networks: their ODE is driven by the same denoiser output, so only the kernel (D) of the
two networks has to agree. :func:`guided_denoiser` returns the main network itself when w = 1, so unguided images
stay bit for bit.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import torch

import dnnlib
from training import pfgmpp as pfgmpp_lib

#: The reserved ``--gnet`` value that guides with the main network itself, its class label dropped (zero vector).
DROPPED_LABEL = 'uncond'


class GuidanceError(ValueError):
    """A guiding network or setting that cannot guide the main network; the message says which and why."""


def _describe_kernel(D: Optional[float]) -> str:
    return 'a diffusion model' if D is None else f'PFGM++ with D={D:g}'


def check_guide(net: Any, gnet: Any, D: Optional[float] = None) -> None:
    """Raise :class:`GuidanceError` unless ``gnet`` can guide ``net``.

    Both must make images of the same resolution and channel count, ``gnet`` must take the same class labels or
    none (label_dim 0: an unconditional guide), and both must denoise under the same kernel: ``D`` is the main
    network's (None = diffusion; the caller may have resolved it from flags), compared with what ``gnet`` records
    (when neither network records a kernel, as EDM's do not, ``D`` holds for both).
    """
    for name in ('img_resolution', 'img_channels'):
        mine, theirs = getattr(net, name), getattr(gnet, name)
        if mine != theirs:
            raise GuidanceError(f'the guiding network has {name}={theirs}, the network {name}={mine}; '
                                f'they must be equal')
    if gnet.label_dim not in (0, net.label_dim):
        raise GuidanceError(f'the guiding network has {gnet.label_dim} classes, the network {net.label_dim}; a guide '
                            f'must use the same label space or be unconditional')
    # EDM's networks record no kernel; the flags that decided the main network's kernel then speak for both.
    try:
        guide_D = pfgmpp_lib.network_D(gnet, undeclared=None if pfgmpp_lib.declares_kernel(net) else D)
    except ValueError as err:
        raise GuidanceError(f'the guiding network records an invalid kernel: {err}') from None
    if guide_D != D:
        raise GuidanceError(f'the guiding network is {_describe_kernel(guide_D)}, the network '
                            f'{_describe_kernel(D)}; both must use the same perturbation kernel')


def check_interval(interval: Optional[tuple[float, float]]) -> Optional[tuple[float, float]]:
    """``(sigma_lo, sigma_hi)`` with 0 <= lo <= hi, or None; :class:`GuidanceError` otherwise."""
    if interval is None:
        return None
    lo, hi = (float(v) for v in interval)
    if not (0 <= lo <= hi) or math.isnan(hi):
        raise GuidanceError(f'guidance interval {lo:g},{hi:g}: expected 0 <= SIGMA_LO <= SIGMA_HI')
    return lo, hi


class GuidedDenoiser(torch.nn.Module):
    """``net`` guided by ``gnet`` with weight ``guidance`` (see the module docstring); use :func:`guided_denoiser`.

    Called like a network: ``(x [B, C, H, W], sigma (scalar or [B] / [B, 1, 1, 1]), class_labels [B, label_dim] or
    None)``. Returns float64 [B, C, H, W] where guidance applies (the combination is formed in float64 from the
    networks' outputs) and the main network's output, untouched, for samples whose sigma lies outside the interval.
    The guide gets the class labels when it is conditional (``drop_labels`` False) and zero labels otherwise,
    which a network trained with label dropout reads as "no class". The guide is evaluated only when some sample of
    the batch lies inside the interval. Interval edges are inclusive.
    """

    def __init__(self, net: torch.nn.Module, gnet: torch.nn.Module, guidance: float,
                 interval: Optional[tuple[float, float]] = None, drop_labels: bool = False) -> None:
        super().__init__()
        self.net, self.gnet = net, gnet
        self.guidance = float(guidance)
        self.interval = check_interval(interval)
        self.drop_labels = drop_labels or not gnet.label_dim

    def __getattr__(self, attribute: str) -> Any:
        try:
            return super().__getattr__(attribute)
        except AttributeError:
            # The network interface (resolution, labels, sigma range, D, N, ...) is the main network's.
            return getattr(super().__getattr__('net'), attribute)

    def round_sigma(self, sigma: Any) -> torch.Tensor:
        return self.net.round_sigma(sigma)

    def _inside(self, sigma: torch.Tensor, batch: int) -> Optional[torch.Tensor]:
        """Boolean mask [B, 1, 1, 1] of the samples that get guidance; None when all do."""
        if self.interval is None:
            return None
        per_sample = sigma.to(torch.float64).reshape(-1)
        if per_sample.numel() == 1:
            per_sample = per_sample.expand(batch)
        lo, hi = self.interval
        return ((per_sample >= lo) & (per_sample <= hi)).reshape(-1, 1, 1, 1)

    def forward(self, x: torch.Tensor, sigma: Any, class_labels: Optional[torch.Tensor] = None,
                **kwargs: Any) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device)
        denoised = self.net(x, sigma, class_labels, **kwargs)
        inside = self._inside(sigma, x.shape[0])
        if inside is not None and not inside.any():
            return denoised
        guide_labels = class_labels
        if self.drop_labels and class_labels is not None:
            guide_labels = torch.zeros_like(class_labels) if self.gnet.label_dim else None
        guide = self.gnet(x, sigma, guide_labels, **kwargs).to(torch.float64)
        guided = guide + self.guidance * (denoised.to(torch.float64) - guide)
        if inside is None or inside.all():
            return guided
        return torch.where(inside, guided, denoised.to(torch.float64))


def guided_denoiser(net: torch.nn.Module, gnet: Optional[torch.nn.Module], guidance: float,
                    interval: Optional[tuple[float, float]] = None, drop_labels: bool = False,
                    D: Optional[float] = None) -> torch.nn.Module:
    """``net`` guided by ``gnet`` (a :class:`GuidedDenoiser`), or ``net`` itself when nothing changes its output.

    ``gnet`` None with ``drop_labels`` guides the conditional ``net`` with itself without labels (classifier-free
    guidance from one network). Returns ``net`` unchanged for ``guidance`` = 1, so that its samples are bit-identical
    to unguided ones. ``D`` is the main network's kernel (None = diffusion). Raises :class:`GuidanceError` for a
    guide that does not fit (:func:`check_guide`), a missing guide, a non-finite weight or a bad interval.
    """
    if not math.isfinite(guidance):
        raise GuidanceError(f'guidance weight {guidance}: expected a finite number')
    interval = check_interval(interval)
    if gnet is None:
        if not drop_labels:
            raise GuidanceError('guidance needs a guiding network (or the dropped-label network for CFG)')
        if not net.label_dim:
            raise GuidanceError('the network is unconditional; guiding it with its dropped label changes nothing '
                                '(classifier-free guidance needs a class-conditional network)')
        gnet = net
    check_guide(net, gnet, D)
    if guidance == 1:
        return net
    return GuidedDenoiser(net, gnet, guidance, interval, drop_labels=drop_labels)


def label_dropout_of(net: Any) -> Optional[float]:
    """The label dropout probability ``net`` was trained with, as its U-Net records it (``train.py
    --label-dropout``); None when the network does not record it (EDM's and the PFGM++ fork's networks)."""
    for module in (getattr(net, 'model', None), net):
        value = getattr(module, 'label_dropout', None) if module is not None else None
        if isinstance(value, (int, float)):
            return float(value)
    return None


def check_label_dropout(net: Any) -> Optional[str]:
    """Whether ``net`` itself can guide with its label dropped (classifier-free guidance from one network).

    Raises :class:`GuidanceError` when the network records that it was trained without label dropout: its output
    for the zero label was never trained, so guiding by it extrapolates towards noise, not away from "no class".
    Returns a one-line note when the network does not record it, else None.
    """
    dropout = label_dropout_of(net)
    if dropout is None:
        return (f'the network does not record whether it was trained with label dropout; --gnet={DROPPED_LABEL} '
                f'assumes it was (train.py --label-dropout), or guidance has no unconditional model to work with')
    if dropout <= 0:
        raise GuidanceError('the network was trained without label dropout (label_dropout=0), so it has no '
                            'unconditional mode to guide with; train with --label-dropout, or give an '
                            'unconditional network as --gnet')
    return None


def guidance_record(gnet_source: Optional[str], guidance: float,
                    interval: Optional[tuple[float, float]]) -> Optional[dict]:
    """The guidance settings for manifests and result lines (None when unguided); a --gnet path made absolute."""
    if gnet_source is None or guidance == 1:
        return None
    network = gnet_source
    if gnet_source != DROPPED_LABEL and not dnnlib.util.is_url(gnet_source, allow_file_urls=True):
        network = os.path.abspath(gnet_source)
    return dict(gnet=network, weight=guidance, interval=list(interval) if interval else None)
