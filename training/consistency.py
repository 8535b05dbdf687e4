"""Consistency tuning for any PFGM++ D: the consistency parameterisation and the ECT loss.

A consistency model f(x, sigma) maps every point of a probability-flow ODE trajectory to the trajectory's end at
sigma_min (Song et al. 2023, "Consistency Models"). Easy Consistency Tuning (ECT; Geng et al. 2024, "Consistency
Models Made Easy") obtains one by fine-tuning a trained diffusion model: it minimises

    w(t, r) * d(f(x_t, t), stopgrad f(x_r, r)),    x_t and x_r on the same perturbation of one image y,

over pairs r < t whose gap t - r shrinks in stages towards 0, so that the first stage is close to the diffusion
model's own denoising task and the last ones approach the consistency condition. iCT (Song & Dhariwal 2023,
"Improved Techniques for Training Consistency Models") supplies the pseudo-Huber distance.

PFGM++ (Xu et al. 2023) for finite D. Its probability-flow ODE in the EDM alignment sigma = r / sqrt(D) reads
dx/dsigma = (x - D_theta(x, sigma)) / sigma, exactly as the diffusion ODE, so the consistency function and its
boundary condition carry over unchanged; only the perturbation differs. A pair shares one draw of the PFGM++
kernel: n = sample_perturbation(shape, t, D), x_t = y + n and x_r = y + (r / t) n. This is exact: the kernel's
length is ``sigma * sqrt(D) * sqrt(B / (1 - B))`` along a uniform direction, so for a fixed (B, direction) the
perturbation is linear in sigma, and (r / t) n is the kernel's draw at r for the same (B, direction). D = inf gives
ECT's shared Gaussian noise n = t * eps.

This module is pickled with the snapshots that hold a :class:`ConsistencyModel` (``torch_utils.persistence``), so
at load time it imports only torch and torch_utils and fetches ``training.pfgmpp`` / ``training.networks`` on use.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from torch_utils import persistence

#: Default end of the consistency trajectory (EDM's and the consistency-model papers' sigma_min).
DEFAULT_SIGMA_MIN = 0.002
#: Preconditioners a consistency model may wrap (in ``training.networks``; the weights-only format allows them).
DENOISER_CLASSES = ('EDMPrecond', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond')
DENOISER_MODULE = 'training.networks'
#: ECT's CIFAR-10 settings (Geng et al. 2024): log-normal t, shrinking schedule n(t) = 1 + k * sigmoid(-b t) with
#: ratio q per stage, squared L2 distance (c = 0).
ECT_P_MEAN, ECT_P_STD, ECT_Q, ECT_K, ECT_B = -1.1, 2.0, 2.0, 8.0, 1.0
#: Stage length (images) of the shrinking schedule when not given: 10,000 steps of 128 images.
DEFAULT_STAGE_KIMG = 1280.0


def _networks() -> Any:
    from training import networks
    return networks


def _pfgmpp() -> Any:
    from training import pfgmpp
    return pfgmpp


def is_consistency_model(net: Any) -> bool:
    """True for a network that records being a consistency model (``consistency`` attribute true), also through
    ``torch.compile`` and DDP wrappers."""
    inner = getattr(net, 'module', None)
    if isinstance(inner, torch.nn.Module) and not hasattr(net, 'consistency'):
        net = inner
    return bool(getattr(net, 'consistency', False))


def denoiser_class_name(name: str) -> str:
    """The full class name for a preconditioner (``EDMPrecond`` or ``training.networks.EDMPrecond``).

    Raises:
        ValueError: not one of :data:`DENOISER_CLASSES`.
    """
    short = str(name).rsplit('.', 1)[-1]
    if short not in DENOISER_CLASSES or (name != short and str(name) != f'{DENOISER_MODULE}.{short}'):
        raise ValueError(f'a consistency model wraps one of the preconditioners {", ".join(DENOISER_CLASSES)}, '
                         f'not {name!r}')
    return f'{DENOISER_MODULE}.{short}'


@persistence.persistent_class
class ConsistencyModel(torch.nn.Module):
    """f(x, sigma) = D(x, sigma) + (sigma_min / sigma) * (x - D(x, sigma)) for sigma > sigma_min, and x below.

    ``denoiser`` is a preconditioned denoiser D_theta of ``training.networks`` (any of the four preconditioners,
    diffusion or PFGM++), built from ``denoiser_class`` and ``denoiser_kwargs``; ``interface`` (img_resolution,
    img_channels, label_dim, pfgmpp, D: what the training loop passes to every network) must agree with
    ``denoiser_kwargs`` where both name a keyword (ValueError otherwise).

    Why this parameterisation: f is one exact Euler step of the probability-flow ODE dx/dsigma = (x - D) / sigma
    (the same for every PFGM++ D in the sigma alignment) from sigma to sigma_min. It meets the boundary condition
    f(x, sigma_min) = x by construction for every preconditioner, including EDM's whose own c_skip is not 1 at
    sigma_min, and the freshly wrapped teacher already is a (first-order) consistency function, so tuning starts
    from the teacher's one-step Euler sample rather than from its denoiser. At and below sigma_min the output is
    the input itself, selected exactly (no rounding of sigma_min / sigma), and the denoiser's value there is
    discarded even when it is not finite.

    ``sigma_min`` None takes max(:data:`DEFAULT_SIGMA_MIN`, the denoiser's own sigma_min). Attributes read by the
    samplers: ``consistency`` (True), ``sigma_min``, ``sigma_max``, ``img_resolution``, ``img_channels``,
    ``label_dim``, ``pfgmpp``, ``D`` (the teacher's kernel).
    """

    def __init__(self, *, denoiser_class: str, denoiser_kwargs: dict, sigma_min: Optional[float] = None,
                 **interface: Any) -> None:
        super().__init__()
        class_name = denoiser_class_name(denoiser_class)
        kwargs = dict(denoiser_kwargs)
        for key, value in interface.items():
            if key in kwargs and kwargs[key] != value and not (key == 'D' and not interface.get('pfgmpp')):
                raise ValueError(f'ConsistencyModel: {key}={value!r} does not match the denoiser\'s '
                                 f'{key}={kwargs[key]!r}')
        kwargs.update(interface)
        self.denoiser = getattr(_networks(), class_name.rsplit('.', 1)[1])(**kwargs)
        own_min = float(getattr(self.denoiser, 'sigma_min', 0) or 0)
        self.sigma_min = float(max(DEFAULT_SIGMA_MIN, own_min) if sigma_min is None else sigma_min)
        if not (math.isfinite(self.sigma_min) and self.sigma_min > 0):
            raise ValueError(f'ConsistencyModel: sigma_min must be a positive number, got {sigma_min!r}')
        self.sigma_max = float(self.denoiser.sigma_max)
        self.consistency = True
        self.img_resolution, self.img_channels = self.denoiser.img_resolution, self.denoiser.img_channels
        self.label_dim, self.pfgmpp, self.D = self.denoiser.label_dim, self.denoiser.pfgmpp, self.denoiser.D
        self.N = self.img_channels * self.img_resolution ** 2

    # Precision switches live on the denoiser; generate.py's --precision sets them through these.
    use_fp16 = property(lambda self: self.denoiser.use_fp16,
                        lambda self, value: setattr(self.denoiser, 'use_fp16', value))
    use_bf16 = property(lambda self: self.denoiser.use_bf16,
                        lambda self, value: setattr(self.denoiser, 'use_bf16', value))
    reduced_precision_on_cpu = property(lambda self: self.denoiser.reduced_precision_on_cpu,
                                        lambda self, value: setattr(self.denoiser, 'reduced_precision_on_cpu', value))

    def unet_dtype(self, device: Any, force_fp32: bool = False) -> torch.dtype:
        """The dtype the denoiser's U-Net runs in on ``device``."""
        return self.denoiser.unet_dtype(device, force_fp32)

    def round_sigma(self, sigma: Any) -> torch.Tensor:
        """Noise levels the denoiser supports (iDDPM's grid; the others return ``sigma``)."""
        return self.denoiser.round_sigma(sigma)

    def forward(self, x: torch.Tensor, sigma: Any, class_labels: Optional[torch.Tensor] = None,
                force_fp32: bool = False, **model_kwargs: Any) -> torch.Tensor:
        """f(x, sigma), float32 shaped like ``x`` [B, C, H, W]; ``sigma`` a scalar or B values (data units)."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        denoised = self.denoiser(x, sigma, class_labels, force_fp32=force_fp32, **model_kwargs)
        euler = denoised + (self.sigma_min / sigma) * (x - denoised)
        return torch.where(sigma > self.sigma_min, euler, x)


def teacher_description(net: Any) -> tuple[str, dict[str, Any], Optional[float]]:
    """(denoiser class name, its constructor keywords, sigma_min or None) for wrapping ``net`` in a
    :class:`ConsistencyModel`: a preconditioner of ours or of the original EDM / PFGM++ code, or a consistency
    model (whose denoiser and sigma_min are taken, to continue tuning it).

    Raises:
        ValueError: ``net`` is neither (one line).
    """
    from formats import export
    if is_consistency_model(net):
        inner = net.denoiser
        return export.class_name_of(inner), export.constructor_kwargs_of(inner), float(net.sigma_min)
    name = export.class_name_of(net)
    return denoiser_class_name(name), export.constructor_kwargs_of(net), None


def copy_teacher_weights(source: torch.nn.Module, model: torch.nn.Module) -> None:
    """Copy every parameter and buffer of ``source`` (a teacher denoiser or a consistency model) into the
    :class:`ConsistencyModel` ``model``; every tensor of the destination must be found, with its shape.

    Raises:
        ValueError: a tensor is missing or has another shape (one line naming it).
    """
    from torch_utils import misc
    destination = model if is_consistency_model(source) else model.denoiser
    misc.copy_params_and_buffers(src_module=source, dst_module=destination, require_all=True)


# ----------------------------------------------------------------------------
# The loss.


@persistence.persistent_class
class ConsistencyLoss:
    """ECT's loss (Geng et al. 2024) for any PFGM++ D; call like the losses of ``training/loss.py``.

    Per image: t ~ exp(N(P_mean, P_std^2)) clipped to >= sigma_min, and r = t * (1 - n(t) / q^(s + 1)) with
    n(t) = 1 + k * sigmoid(-b t), clipped to [sigma_min, t], at stage s = floor(images seen / stage images); the
    pair shares one PFGM++ perturbation (module docstring). The per-element loss is

        d(f(x_t, t), f(x_r, r)) / (t - r)                       (0 where r = t)

    with d the squared difference (``huber_c`` None or 0, ECT's CIFAR-10 choice) or iCT's pseudo-Huber
    sqrt(|a - b|^2 + c^2) - c over the whole image, spread evenly over its N elements so that the training loop's
    sum over elements is the per-image distance. The target f(x_r, r) is computed without gradient by the same
    network in training mode with the same dropout masks (torch's generator is rewound to where it was before
    the target evaluation, as ECT does).

    ``D``: the kernel (None or inf: diffusion); ``beta_clip``: the Beta clip of the PFGM++ draw during training
    (``training.loss.DEFAULT_BETA_CLIP`` by default); ``sigma_min`` must equal the model's.
    """

    def __init__(self, D: Optional[float] = None, P_mean: float = ECT_P_MEAN, P_std: float = ECT_P_STD,
                 q: float = ECT_Q, k: float = ECT_K, b: float = ECT_B, stage_kimg: float = DEFAULT_STAGE_KIMG,
                 huber_c: Optional[float] = None, sigma_min: float = DEFAULT_SIGMA_MIN,
                 beta_clip: Optional[float] = 1e-3) -> None:
        self.D = _pfgmpp().check_D(D)
        if not q > 1:
            raise ValueError(f'the stage ratio q must be greater than 1, got {q}')
        if not stage_kimg > 0:
            raise ValueError(f'the stage length must be positive, got {stage_kimg} kimg')
        if huber_c is not None and huber_c < 0:
            raise ValueError(f'the pseudo-Huber c must be >= 0, got {huber_c}')
        self.P_mean, self.P_std, self.q, self.k, self.b = P_mean, P_std, q, k, b
        self.stage_kimg, self.huber_c, self.sigma_min, self.beta_clip = stage_kimg, huber_c, sigma_min, beta_clip
        self.nimg = 0

    def set_progress(self, nimg: int) -> None:
        """Tell the loss how many images training has seen (the stage is a function of it alone)."""
        self.nimg = int(nimg)

    @property
    def stage(self) -> int:
        """Current stage s of the shrinking schedule (0 first)."""
        return int(self.nimg // round(self.stage_kimg * 1000))

    def sample_t(self, batch_size: int, device: Any = None, generator: Optional[torch.Generator] = None,
                 ndim: int = 4) -> torch.Tensor:
        """Per-image t, float32 [batch_size, 1, ..., 1], log-normal (EDM/ECT) and at least sigma_min."""
        shape = [batch_size] + [1] * (ndim - 1)
        log_t = torch.randn(shape, device=torch.device(device or 'cpu'), generator=generator) * self.P_std
        return (log_t + self.P_mean).exp().clamp(min=self.sigma_min)

    def r_for(self, t: torch.Tensor, stage: Optional[int] = None) -> torch.Tensor:
        """ECT's r(t) = t * (1 - n(t) / q^(stage + 1)), n(t) = 1 + k sigmoid(-b t), clipped to [sigma_min, t]."""
        stage = self.stage if stage is None else stage
        shrink = (1 + self.k * torch.sigmoid(-self.b * t)) * float(self.q) ** -(stage + 1)  # underflows to 0
        return (t * (1 - shrink)).clamp(min=self.sigma_min).minimum(t)

    def pair(self, y: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
             generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, x_r) sharing one perturbation: n from the kernel at t, x_t = y + n, x_r = y + (r / t) n."""
        noise = _pfgmpp().sample_perturbation(y.shape, t, D=self.D, generator=generator, device=y.device,
                                              dtype=y.dtype, clip_beta=self.beta_clip)
        return y + noise, y + (r / t) * noise

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-element distance [B, C, H, W] (see the class docstring)."""
        diff = a - b
        if not self.huber_c:
            return diff.square()
        per_image = diff.flatten(1).square().sum(1).add(self.huber_c ** 2).sqrt() - self.huber_c
        count = diff[0].numel()
        return (per_image / count).reshape(-1, *([1] * (diff.ndim - 1))).expand_as(diff)

    def __call__(self, net: Callable, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 augment_pipe: Optional[Callable] = None, generator: Optional[torch.Generator] = None,
                 reference_images: Optional[torch.Tensor] = None) -> torch.Tensor:
        if reference_images is not None:
            raise ValueError('consistency tuning does not use a stable target field (--stf)')
        t = self.sample_t(images.shape[0], images.device, generator, ndim=images.ndim)
        r = self.r_for(t)
        y, augment_labels = (images, None) if augment_pipe is None else augment_pipe(images)
        x_t, x_r = self.pair(y, t, r, generator)
        devices = [images.device] if images.device.type == 'cuda' else []
        # The target first, on a rewound generator, so that the online pass draws the same dropout masks.
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            target = net(x_r, r, labels, augment_labels=augment_labels)
        online = net(x_t, t, labels, augment_labels=augment_labels)
        gap = t - r
        weight = torch.where(gap > 0, 1 / torch.where(gap > 0, gap, torch.ones_like(gap)), torch.zeros_like(gap))
        return weight * self.distance(online, target)
