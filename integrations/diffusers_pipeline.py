"""A diffusers pipeline for PFGM++ and diffusion models, and our networks as diffusers models.

* :class:`PFGMPPNetwork` -- any preconditioner of ``training.networks`` (ours or the original's, every kernel D)
  as a diffusers ``ModelMixin``: ``save_pretrained`` writes its constructor keywords (config.json) and its tensors
  (safetensors); ``from_pretrained`` rebuilds it without unpickling anything.
* :class:`PFGMPPPipeline` -- seeds -> PFGM++ prior -> :class:`PFGMPPScheduler` -> images, from a diffusers
  ``UNet2DModel``-like denoiser or a :class:`PFGMPPNetwork`. With our networks and ``generator=[Generator()
  .manual_seed(s) for s in seeds]`` it reproduces ``generate.py --seeds``: same time steps (clamped to and rounded by
  the network), same prior, same class labels, same solver arithmetic.

Needs diffusers (``pip install -r requirements-diffusers.txt``).
"""

from __future__ import annotations

import importlib
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from integrations import require_diffusers

require_diffusers()

from diffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: E402
from diffusers.models.modeling_utils import ModelMixin  # noqa: E402
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput  # noqa: E402
from PIL import Image  # noqa: E402

from formats.export import ALLOWED_CLASSES, DETECTOR_CLASSES, class_name_of, constructor_kwargs_of  # noqa: E402
from sampling.pipeline import BatchPadded, draw_class_labels, to_uint8  # noqa: E402
from sampling.schedules import edm_time_steps  # noqa: E402
from training import pfgmpp as pfgmpp_lib  # noqa: E402
from integrations.diffusers_scheduler import PFGMPPScheduler  # noqa: E402

OUTPUT_TYPES = ('pil', 'np', 'pt')
NETWORK_CLASSES = tuple(name for name in ALLOWED_CLASSES if name not in DETECTOR_CLASSES)


class PFGMPPNetwork(ModelMixin, ConfigMixin):
    """A preconditioned network of ``training.networks`` (``class_name``, built from ``init_kwargs``).

    ``forward(sample, sigma, class_labels)`` is the network's denoiser D(x; sigma): float32 [B, C, H, W] from
    samples of any float dtype and sigma a number or per-sample tensor. The network itself is ``self.net``.
    Raises ValueError for a class outside the allow-list of ``formats.export``.
    """

    @register_to_config
    def __init__(self, class_name: str, init_kwargs: dict) -> None:
        super().__init__()
        if class_name not in NETWORK_CLASSES:
            raise ValueError(f'class_name {class_name!r} is not a network this pipeline can build; expected one of '
                             f'{", ".join(NETWORK_CLASSES)}')
        module_name, _, name = class_name.rpartition('.')
        cls = getattr(importlib.import_module(module_name), name)
        # Construction draws initial weights from the global generator; the loaded ones replace them.
        with torch.random.fork_rng(devices=[]):
            self.net = cls(**init_kwargs)

    @classmethod
    def from_network(cls, net: torch.nn.Module) -> 'PFGMPPNetwork':
        """Wrap a copy of ``net`` (our preconditioner or the original EDM / PFGM++ code's same-named class)."""
        wrapped = cls(class_name=class_name_of(net), init_kwargs=constructor_kwargs_of(net))
        wrapped.net.load_state_dict(net.state_dict(), strict=True)
        return wrapped.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> 'PFGMPPNetwork':
        """diffusers' loader, then every tensor copied into memory of its own.

        safetensors hands out views of the (memory-mapped) file at arbitrary alignment, and CPU kernels pick other
        vectorised paths for unaligned data, whose float32 rounding differs from the exported network's; fresh
        copies make the loaded network compute exactly what the original does.
        """
        # Empty-weight initialisation needs accelerate (not a dependency); the tensors are copied anyway.
        kwargs['low_cpu_mem_usage'] = False
        model = super().from_pretrained(*args, **kwargs)
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.data = tensor.data.clone()
        return model

    @property
    def kernel_D(self) -> Optional[float]:
        """The network's kernel: PFGM++ augmented dimensions, None for diffusion."""
        return pfgmpp_lib.network_D(self.net)

    def forward(self, sample: torch.Tensor, sigma: Union[float, torch.Tensor],
                class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.net(sample, sigma, class_labels)


class _GeneratorDraws:
    """The per-sample generators in the shape ``sampling.pipeline.draw_class_labels`` draws labels from."""

    def __init__(self, generators: Sequence[torch.Generator], device: torch.device) -> None:
        self.generators, self.device = list(generators), device

    def __len__(self) -> int:
        return len(self.generators)

    def randint(self, high: int) -> torch.Tensor:
        return torch.stack([torch.randint(high, size=[], generator=g, device=g.device)
                            for g in self.generators]).to(self.device)


class PFGMPPPipeline(DiffusionPipeline):
    """Unconditional or class-conditional image generation with a PFGM++ or diffusion model.

    unet: a :class:`PFGMPPNetwork` (the scheduler's ``prediction_type`` must then be 'sample') or a model with
        diffusers' ``UNet2DModel`` interface (``unet(c_in * x, c_noise).sample``, EDM preconditioning by the
        scheduler, ``prediction_type`` 'epsilon').
    scheduler: a :class:`PFGMPPScheduler`; its ``D`` must match a :class:`PFGMPPNetwork`'s kernel.
    """

    model_cpu_offload_seq = 'unet'

    def __init__(self, unet: torch.nn.Module, scheduler: PFGMPPScheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> 'PFGMPPPipeline':
        """diffusers' loader (a local folder loads offline), without its accelerate-only memory saving."""
        kwargs['low_cpu_mem_usage'] = False
        return super().from_pretrained(*args, **kwargs)

    def _check(self) -> None:
        if isinstance(self.unet, PFGMPPNetwork):
            if self.scheduler.config.prediction_type != 'sample':
                raise ValueError("the network returns denoised images: the scheduler needs prediction_type='sample'")
            if self.unet.kernel_D != self.scheduler.D:
                raise ValueError(f'the scheduler has D={self.scheduler.D} but the network was trained with '
                                 f'D={self.unet.kernel_D} (None = diffusion)')

    @torch.no_grad()
    def __call__(self, batch_size: Optional[int] = None,
                 generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
                 num_inference_steps: int = 18, class_labels: Optional[int] = None, output_type: str = 'pil',
                 return_dict: bool = True) -> Union[ImagePipelineOutput, tuple]:
        """Generate ``batch_size`` images (default: one per generator of a list, else 1).

        generator: one ``torch.Generator`` per image (each image then depends on its seed alone, as in
            ``generate.py``), a single generator for the batch, or None. Finite D draws the prior as
            :meth:`PFGMPPScheduler.prior_sample` says.
        num_inference_steps: noise levels (``generate.py --steps``); Heun makes 2N - 1 model evaluations.
        class_labels: a class index for conditional networks (None draws one per image from the generators).
        output_type: 'pil' (list of PIL images, the uint8 values ``generate.py`` writes), 'np' (float32 NHWC in
            [0, 1], diffusers' convention) or 'pt' (the float64 samples, NCHW in about [-1, 1]).
        Raises ValueError for a generator list of another length, an unknown output type or a scheduler that does
        not fit the network.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f'output_type must be one of {"|".join(OUTPUT_TYPES)}, got {output_type!r}')
        self._check()
        generators = list(generator) if isinstance(generator, (list, tuple)) else None
        if batch_size is None:
            batch_size = len(generators) if generators is not None else 1
        if generators is not None and len(generators) != batch_size:
            raise ValueError(f'got {len(generators)} generators for batch_size={batch_size}')
        param = next(self.unet.parameters())
        device = param.device
        scheduler = self.scheduler
        config = scheduler.config

        ours = isinstance(self.unet, PFGMPPNetwork)
        labels = None
        if ours:
            net = self.unet.net
            shape = [batch_size, net.img_channels, net.img_resolution, net.img_resolution]
            # The network's range and noise-level grid, exactly as generate.py's samplers use them.
            scheduler.set_timesteps(sigmas=edm_time_steps(net, num_inference_steps, config.sigma_min,
                                                          config.sigma_max, config.rho, device=device))
            prior_sigma = min(config.sigma_max, net.sigma_max)
        else:
            unet_config = self.unet.config
            size = unet_config.sample_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            shape = [batch_size, unet_config.in_channels, *size]
            scheduler.set_timesteps(num_inference_steps, device=device)
            prior_sigma = config.sigma_max
        x = scheduler.prior_sample(shape, generator, device=device, sigma_max=prior_sigma)
        if ours and net.label_dim:
            draws = generators if generators is not None else [generator or torch.Generator(device)] * batch_size
            labels = draw_class_labels(net, _GeneratorDraws(draws, device), class_labels)
        elif class_labels is not None and ours:
            raise ValueError(f'class_labels={class_labels} given, but the network is unconditional')
        denoiser = BatchPadded(net) if ours else None

        for t in self.progress_bar(scheduler.timesteps):
            if ours:
                output = denoiser(x, scheduler.current_sigma(device), labels)
            else:
                model_in = scheduler.scale_model_input(x, t).to(self.unet.dtype)
                kwargs = {} if class_labels is None else dict(class_labels=torch.full([batch_size], class_labels,
                                                                                      device=device))
                output = self.unet(model_in, t.to(device), **kwargs).sample
            x = scheduler.step(output, t, x).prev_sample

        images = self.images_from_samples(x, output_type)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    @staticmethod
    def images_from_samples(samples: torch.Tensor, output_type: str = 'pil') -> Any:
        """Samples NCHW in [-1, 1] as ``output_type`` (see :meth:`__call__`); PIL images use ``generate.py``'s
        uint8 conversion (x * 127.5 + 128, clipped, truncated)."""
        if output_type == 'pt':
            return samples
        if output_type == 'np':
            return (samples / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).to(torch.float32).cpu().numpy()
        pixels = to_uint8(samples).permute(0, 2, 3, 1).cpu().numpy()
        if pixels.shape[-1] == 1:
            return [Image.fromarray(p[:, :, 0], 'L') for p in pixels]
        return [Image.fromarray(np.ascontiguousarray(p), 'RGB') for p in pixels]

