"""Post-hoc EMA: power-function EMA profiles, their tracking during training and their reconstruction afterwards.

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2), section 3 and
appendix C. A power-function EMA with exponent gamma averages the weights seen up to time T (here: images seen)
with the density

    p(t; T, gamma) = (gamma + 1) t^gamma / T^(gamma + 1)        for 0 <= t <= T, 0 after T,

whose standard deviation relative to T is

    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))        (EDM2 eq. 123).

During training each tracked profile is updated after every optimiser step with
beta = (1 - batch / nimg)^(gamma + 1), nimg counted after the step (EDM2 eq. 127). That discrete average is exactly
the continuous profile integrated over each step's interval of images: step k of n gets the weight
(k^(gamma+1) - (k-1)^(gamma+1)) / n^(gamma+1). Any profile that is a linear combination of the tracked snapshots'
profiles can therefore be built afterwards as the same combination of their weights; the least-squares
combination minimises the L2 distance between profiles, whose inner products have a closed form (EDM2 eq. 151).

Times are image counts. Every function here takes the exact counts the snapshots store (their names round them to
kimg); only ratios of times matter, so any common unit gives the same coefficients.

Snapshot files (EDM2's names): ``network-snapshot-{kimg:07d}-{std:.3f}.pkl`` written by the training loop for each
tracked sigma_rel, ``phema-{kimg:07d}-{std:.3f}.pkl`` written by the reconstruction; both are EDM network snapshots
(``ema`` plus ``loss_fn``, ``augment_pipe``, ``dataset_kwargs``) with an extra ``phema`` entry, a dict with ``nimg``
(exact images seen) and ``std`` (sigma_rel), and for reconstructions also ``sources`` and ``coefficients``.
"""

from __future__ import annotations

import copy
import os
import pickle
import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

#: sigma_rel of gamma = 0 (uniform average over all of training), sqrt(1/12): the largest sigma_rel whose profile
#: puts non-decreasing weight on later training (gamma >= 0).
MAX_SIGMA_REL = float(np.sqrt(1.0 / 12.0))
#: Newton steps that polish the cubic's eigenvalue root to float64 precision.
NEWTON_STEPS = 3
#: File name prefixes and the pattern both kinds of post-hoc EMA file share.
TRACKED_PREFIX = 'network-snapshot'
OUTPUT_PREFIX = 'phema'
NAME_PATTERN = re.compile(r'(?P<prefix>.+)-(?P<kimg>\d{7,})-(?P<std>\d+\.\d{3})\.pkl')
#: Key of the post-hoc EMA record inside a snapshot dict.
RECORD_KEY = 'phema'


class PhemaError(ValueError):
    """Unusable post-hoc EMA input (a file, a sigma_rel, a time); the message names it and the expectation."""


# ----------------------------------------------------------------------------
# sigma_rel <-> gamma.


def check_sigma_rel(sigma_rel: Any, what: str = 'sigma_rel') -> float:
    """``sigma_rel`` as a float, or :class:`PhemaError` unless 0 < sigma_rel <= sqrt(1/12)."""
    value = float(sigma_rel)
    if not 0 < value <= MAX_SIGMA_REL:
        raise PhemaError(f'{what} {sigma_rel} is out of range; expected 0 < sigma_rel <= {MAX_SIGMA_REL:.4f} '
                         f'(relative standard deviations such as 0.05 or 0.1)')
    return value


def check_sigma_rel_list(values: Iterable[Any], what: str = '--phema') -> list[float]:
    """Checked sigma_rel values for tracking; :class:`PhemaError` when one is out of range or two share a file name."""
    stds = [check_sigma_rel(value, what) for value in values]
    if not stds:
        raise PhemaError(f'{what}: no sigma_rel values given')
    if len({f'{std:.3f}' for std in stds}) != len(stds):
        raise PhemaError(f'{what} {",".join(f"{std:g}" for std in stds)}: two values share a file name '
                         f'(3 decimals); give distinct values')
    return stds


def gamma_to_sigma_rel(gamma: Any) -> np.ndarray:
    """Relative standard deviation of the power-function profile with exponent ``gamma`` (EDM2 eq. 123); float64."""
    g = np.asarray(gamma, dtype=np.float64)
    return np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def sigma_rel_to_gamma(sigma_rel: Any) -> np.ndarray:
    """The exponent gamma >= 0 whose profile has relative standard deviation ``sigma_rel`` (float64, same shape).

    Multiplying eq. 123 out gives the cubic gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0 with
    s = sigma_rel^-2 (EDM2 eq. 126); the wanted solution is its largest real root, found as a companion-matrix
    eigenvalue and polished by Newton's method. Raises :class:`PhemaError` outside 0 < sigma_rel <= sqrt(1/12).
    """
    values = np.asarray(sigma_rel, dtype=np.float64)
    gammas = []
    for value in values.reshape(-1):
        check_sigma_rel(value)
        s = value ** -2
        coefficients = [1.0, 7.0, 16.0 - s, 12.0 - s]
        gamma = max(root.real for root in np.roots(coefficients) if abs(root.imag) <= 1e-9 * max(1, abs(root)))
        slope_coefficients = np.polyder(coefficients)
        for _ in range(NEWTON_STEPS):
            slope = np.polyval(slope_coefficients, gamma)
            if slope == 0:
                break
            gamma -= np.polyval(coefficients, gamma) / slope
        gammas.append(gamma)
    return np.asarray(gammas, dtype=np.float64).reshape(values.shape)


# ----------------------------------------------------------------------------
# Profiles.


def ema_beta(sigma_rel: float, nimg: int, batch_size: int, gamma: Optional[float] = None) -> float:
    """Decay of the tracked average after the step that brings the count to ``nimg`` images (EDM2 eq. 127).

    beta = (1 - batch_size / nimg)^(gamma + 1); 0 on the first step, so the average starts at the weights.
    ``gamma`` may be passed when known (it is ``sigma_rel_to_gamma(sigma_rel)``), sparing the root finding.
    """
    gamma = float(sigma_rel_to_gamma(sigma_rel)) if gamma is None else gamma
    return (1.0 - batch_size / nimg) ** (gamma + 1.0)


def profile_inner_product(t_a: Any, sigma_a: Any, t_b: Any, sigma_b: Any) -> np.ndarray:
    """<p(.; t_a, gamma_a), p(.; t_b, gamma_b)> = integral of the product of two power-function profiles.

    With m = min(t_a, t_b): (g_a + 1)(g_b + 1) m^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1))
    (EDM2 eq. 151), written with the ratio m / max(t_a, t_b) so that large counts cannot overflow. Broadcasts
    its arguments like numpy; times > 0 in any common unit; float64.
    """
    t_a, t_b = np.asarray(t_a, dtype=np.float64), np.asarray(t_b, dtype=np.float64)
    g_a, g_b = sigma_rel_to_gamma(sigma_a), sigma_rel_to_gamma(sigma_b)
    a_ends_first = t_a <= t_b
    ratio = np.where(a_ends_first, t_a / t_b, t_b / t_a)
    # The profile that ends later contributes its density up to the earlier end: ratio^(its gamma) / later end.
    later_gamma = np.where(a_ends_first, g_b, g_a)
    later_end = np.maximum(t_a, t_b)
    return (g_a + 1) * (g_b + 1) * ratio ** later_gamma / ((g_a + g_b + 1) * later_end)


def step_weights(nimg: int, sigma_rel: float, batch_size: int) -> np.ndarray:
    """Weights the tracked average after ``nimg`` images gives the network of each step (float64, sums to 1).

    Entry k-1 belongs to the weights after step k (k = 1 .. nimg / batch_size): the profile's mass on that step's
    interval of images, which is what the beta recursion of :func:`ema_beta` produces.
    """
    if nimg % batch_size:
        raise PhemaError(f'{nimg} images is not a whole number of steps of {batch_size}')
    gamma = float(sigma_rel_to_gamma(sigma_rel))
    edges = np.arange(nimg // batch_size + 1, dtype=np.float64) / (nimg // batch_size)
    return np.diff(edges ** (gamma + 1))


def _gram_and_cross(in_nimg: np.ndarray, in_std: np.ndarray, out_nimg: np.ndarray,
                    out_std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inner products of the input profiles with each other [in, in] and with the output profiles [in, out]."""
    column, row = (lambda v: v.reshape(-1, 1)), (lambda v: v.reshape(1, -1))
    return (profile_inner_product(column(in_nimg), column(in_std), row(in_nimg), row(in_std)),
            profile_inner_product(column(in_nimg), column(in_std), row(out_nimg), row(out_std)))


def solve_coefficients(in_nimg: Sequence[float], in_std: Sequence[float], out_nimg: Sequence[float],
                       out_std: Sequence[float]) -> np.ndarray:
    """Least-squares coefficients [len(in), len(out)] that combine input profiles into each output profile.

    Minimises the L2 distance between sum_i c_ij p(.; in_nimg_i, in_std_i) and p(.; out_nimg_j, out_std_j): the
    normal equations A c = b with A the Gram matrix of the inputs and b their inner products with the outputs
    (EDM2 Algorithm 3). Each column is then scaled to sum to 1, so that the result is an average of weights.
    ``out_nimg`` broadcasts against ``out_std``. Raises :class:`PhemaError` when the inputs repeat a profile
    (singular Gram matrix) or a sigma_rel is out of range.
    """
    in_nimg, in_std = np.broadcast_arrays(np.asarray(in_nimg, np.float64), np.asarray(in_std, np.float64))
    out_nimg, out_std = np.broadcast_arrays(np.asarray(out_nimg, np.float64), np.asarray(out_std, np.float64))
    if in_nimg.size == 0:
        raise PhemaError('no input profiles to combine')
    if (in_nimg <= 0).any() or (out_nimg <= 0).any():
        raise PhemaError('profile times must be positive image counts')
    gram, rhs = _gram_and_cross(in_nimg, in_std, out_nimg, out_std)
    try:
        coefficients = np.linalg.solve(gram, rhs)
    except np.linalg.LinAlgError:
        raise PhemaError('the input snapshots repeat a profile (same time and sigma_rel); remove the duplicate'
                         ) from None
    return coefficients / coefficients.sum(axis=0, keepdims=True)


def profile_error(in_nimg: Sequence[float], in_std: Sequence[float], coefficients: np.ndarray,
                  out_nimg: Sequence[float], out_std: Sequence[float]) -> np.ndarray:
    """Relative L2 error ||sum_i c_ij p_i - p_j|| / ||p_j|| of each combined profile against its target, [len(out)].

    ``coefficients`` [len(in), len(out)] as :func:`solve_coefficients` returns them; ``out_nimg`` broadcasts
    against ``out_std``. The squared distance c^T A c - 2 c^T b + <p_j, p_j> uses the profile inner products of
    EDM2 eq. 151 (:func:`profile_inner_product`); float64. It bounds how far a reconstructed average can lie from
    the one tracking that profile would have given (Cauchy-Schwarz, weight by weight).
    """
    in_nimg, in_std = np.broadcast_arrays(np.asarray(in_nimg, np.float64), np.asarray(in_std, np.float64))
    out_nimg, out_std = np.broadcast_arrays(np.asarray(out_nimg, np.float64), np.asarray(out_std, np.float64))
    c = np.asarray(coefficients, dtype=np.float64).reshape(in_nimg.size, out_nimg.size)
    gram, cross = _gram_and_cross(in_nimg, in_std, out_nimg, out_std)
    target = profile_inner_product(out_nimg, out_std, out_nimg, out_std).reshape(-1)
    squared = np.einsum('ij,ik,kj->j', c, gram, c) - 2 * np.einsum('ij,ij->j', c, cross) + target
    return np.sqrt(np.maximum(squared, 0) / target)


# ----------------------------------------------------------------------------
# Tracking during training.


class PowerFunctionEMA:
    """The networks averaged with power-function profiles of the given sigma_rel values, updated after each step.

    ``update(net, nimg, batch_size)`` lerps every tracked copy towards ``net`` with weight 1 - beta (parameters
    only; buffers are copied when a snapshot is taken, as they are not trained). :meth:`state_dict` /
    :meth:`load_state_dict` carry everything exact resumption needs.
    """

    def __init__(self, net: torch.nn.Module, stds: Iterable[float]) -> None:
        self.stds = check_sigma_rel_list(stds)
        self.gammas = [float(gamma) for gamma in sigma_rel_to_gamma(self.stds)]
        self.emas = [copy.deepcopy(net).requires_grad_(False).eval() for _ in self.stds]
        self._ema_params = [list(ema.parameters()) for ema in self.emas]

    @torch.no_grad()
    def update(self, net_params: Sequence[torch.Tensor], nimg: int, batch_size: int) -> None:
        """One step: ``net_params`` are the trained network's (detached) parameters, ``nimg`` the count after it."""
        for std, gamma, params in zip(self.stds, self.gammas, self._ema_params):
            torch._foreach_lerp_(params, list(net_params), 1.0 - ema_beta(std, nimg, batch_size, gamma))

    @torch.no_grad()
    def networks(self, net: torch.nn.Module) -> list[tuple[float, torch.nn.Module]]:
        """(sigma_rel, averaged network) pairs, with the buffers of ``net`` copied in."""
        for ema in self.emas:
            for source, target in zip(net.buffers(), ema.buffers()):
                target.copy_(source)
        return list(zip(self.stds, self.emas))

    def state_dict(self) -> dict:
        return dict(stds=list(self.stds), emas=[ema.state_dict() for ema in self.emas])

    def load_state_dict(self, state: dict, source: str = 'training state') -> None:
        """Restore the averages; :class:`PhemaError` when ``state`` tracks other sigma_rel values."""
        saved = [float(std) for std in state.get('stds', [])]
        if saved != self.stds:
            raise PhemaError(f'--phema {",".join(f"{s:g}" for s in self.stds)} differs from the values '
                             f'{",".join(f"{s:g}" for s in saved) or "(none)"} that {source} tracks; resume with '
                             f'the same --phema')
        for ema, ema_state in zip(self.emas, state['emas']):
            ema.load_state_dict(ema_state)


def snapshot_name(prefix: str, nimg: int, std: float) -> str:
    """``{prefix}-{kimg:07d}-{std:.3f}.pkl`` with kimg = nimg // 1000 (EDM2's naming)."""
    return f'{prefix}-{int(nimg) // 1000:07d}-{std:.3f}.pkl'


def snapshot_record(nimg: int, std: float, **extra: Any) -> dict:
    """The ``phema`` entry of a snapshot dict: exact image count and sigma_rel (plus ``extra``)."""
    return dict(nimg=int(nimg), std=float(std), **extra)


# ----------------------------------------------------------------------------
# Reconstruction.


@dataclass
class TrackedSnapshot:
    """One input of a reconstruction: its file, exact image count and sigma_rel."""

    path: str
    nimg: int
    std: float


def _load_snapshot(path: str) -> dict:
    try:
        with open(path, 'rb') as f:
            data = pickle.load(f)
    except Exception as err:  # truncated or foreign pickles all mean "not a usable snapshot"
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PhemaError(f'{path}: cannot unpickle it as a network snapshot ({first})') from None
    if not isinstance(data, dict) or not isinstance(data.get('ema'), torch.nn.Module):
        raise PhemaError(f'{path}: expected a network snapshot dict with an "ema" network')
    return data


def list_tracked_snapshots(indir: str, prefix: str = TRACKED_PREFIX) -> list[TrackedSnapshot]:
    """The tracked snapshots in ``indir`` (by name), each with the exact count and sigma_rel it stores.

    Reads every file once (pickles hold the counts). A file whose ``phema`` record is missing or contradicts its
    name raises :class:`PhemaError` naming the file.
    """
    if not os.path.isdir(indir):
        raise PhemaError(f'{indir}: no such directory (expected a training run directory)')
    found = []
    for name in sorted(os.listdir(indir)):
        match = NAME_PATTERN.fullmatch(name)
        if not match or match['prefix'] != prefix:
            continue
        path = os.path.join(indir, name)
        record = _load_snapshot(path).get(RECORD_KEY)
        if not isinstance(record, dict) or 'nimg' not in record or 'std' not in record:
            raise PhemaError(f'{path}: no post-hoc EMA record (nimg, std); was it written with train.py --phema?')
        nimg, std = int(record['nimg']), float(record['std'])
        if nimg // 1000 != int(match['kimg']) or f'{std:.3f}' != match['std']:
            raise PhemaError(f'{path}: its record (nimg={nimg}, std={std}) contradicts its name')
        found.append(TrackedSnapshot(path, nimg, std))
    return sorted(found, key=lambda s: (s.nimg, s.std))


def reconstruct(snapshots: Sequence[TrackedSnapshot], out_std: Sequence[float],
                out_nimg: Optional[int] = None) -> Iterable[tuple[float, dict]]:
    """Yield ``(std, snapshot dict)`` for each requested sigma_rel: the least-squares post-hoc EMA at ``out_nimg``.

    ``out_nimg`` (exact images) defaults to the latest input's count and must equal one input's count; inputs made
    after it are not used. The weights are accumulated in float64 and stored in each parameter's own dtype;
    buffers, ``loss_fn``, ``augment_pipe`` and ``dataset_kwargs`` are those of the latest input used. Memory: one
    input network plus the outputs. Raises :class:`PhemaError` for an unusable input or request.
    """
    if not snapshots:
        raise PhemaError('no tracked snapshots (network-snapshot-KKKKKKK-S.SSS.pkl); train with --phema')
    if out_nimg is None:
        out_nimg = max(s.nimg for s in snapshots)
    elif not any(s.nimg == out_nimg for s in snapshots):
        times = sorted({s.nimg for s in snapshots})
        raise PhemaError(f'no tracked snapshot at {out_nimg} images; available: '
                         f'{", ".join(str(t // 1000) for t in times)} kimg')
    used = [s for s in snapshots if 0 < s.nimg <= out_nimg]
    out_std = [check_sigma_rel(std, '--outstd') for std in out_std]
    coefficients = solve_coefficients([s.nimg for s in used], [s.std for s in used], out_nimg, out_std)

    sums: Optional[list[list[torch.Tensor]]] = None
    template: Optional[dict] = None
    for index, snapshot in enumerate(used):
        data = _load_snapshot(snapshot.path)
        params = [p.detach() for p in data['ema'].parameters()]
        if sums is None:
            sums = [[torch.zeros_like(p, dtype=torch.float64) for p in params] for _ in out_std]
        elif len(params) != len(sums[0]) or any(p.shape != s.shape for p, s in zip(params, sums[0])):
            raise PhemaError(f'{snapshot.path}: its network differs in shape from the other snapshots')
        for column, accumulators in enumerate(sums):
            torch._foreach_add_(accumulators, [p.to(torch.float64) for p in params],
                                alpha=float(coefficients[index, column]))
        template = data
    sources = [os.path.basename(s.path) for s in used]
    for column, std in enumerate(out_std):
        result = copy.deepcopy(template)
        with torch.no_grad():
            for param, total in zip(result['ema'].parameters(), sums[column]):
                param.copy_(total.to(param.dtype))
        result[RECORD_KEY] = snapshot_record(out_nimg, std, sources=sources,
                                             coefficients=[float(c) for c in coefficients[:, column]])
        yield std, result
