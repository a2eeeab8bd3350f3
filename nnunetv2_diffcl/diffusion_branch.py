"""DS, the diffusion segmentation branch of Diff-CL: its denoiser, noise schedule and DDIM sampler in one object.

DiffCLTrainer trains it and ``predict_ensemble`` samples from it; both build it here from the plans and the
trainer's settings (:meth:`DiffCLTrainer.diffusion_settings`), so the two cannot drift apart. The denoiser
stays a plain module that the trainer registers as its auxiliary network ``"ds"``: the checkpoint's keys do
not depend on this wrapper.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import Tensor, nn

from nnunetv2_diffcl.diffusion import DDIMSampler, NoiseSchedule, label_map_to_signal, q_sample, sample_timesteps
from nnunetv2_diffcl.losses.pseudo_labels import hard_pseudo_label
from nnunetv2_diffcl.network_architectures.denoiser import build_denoiser


def scaled_configuration(configuration_manager: ConfigurationManager, width_fraction: float) -> ConfigurationManager:
    """The configuration with every stage's feature count scaled by ``width_fraction`` (at least 1 feature)."""
    if not 0.0 < width_fraction <= 1.0:
        raise ValueError(f"width_fraction must lie in (0, 1], got {width_fraction}")
    if width_fraction == 1.0:
        return configuration_manager
    scaled = copy.deepcopy(configuration_manager.configuration)
    kwargs = scaled["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [max(1, round(width_fraction * f)) for f in kwargs["features_per_stage"]]
    return ConfigurationManager(scaled)


class DiffusionBranch:
    """A label denoiser with the schedule it was trained on and the sampler that draws labels from it.

    ``denoise`` is DS's training forward (a label noised at random timesteps, recovered from the image);
    ``sample_logits`` / ``sample_label`` draw a label by DDIM from pure noise, without gradient.
    """

    def __init__(self, denoiser: nn.Module, num_classes: int, timesteps: int = 1000, schedule: str = "linear",
                 ddim_steps: int = 10, signal_scale: float = 1.0, device: torch.device | str = "cpu") -> None:
        self.denoiser = denoiser
        self.num_classes = int(num_classes)
        self.schedule = NoiseSchedule(timesteps, schedule).to(device)
        self.sampler = DDIMSampler(self.schedule, ddim_steps, signal_scale=signal_scale)  # checks the scale
        self.signal_scale = self.sampler.signal_scale
        self._other_samplers: dict[int, DDIMSampler] = {}

    @classmethod
    def from_plans(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                   image_channels: int, num_classes: int, deep_supervision: bool, device: torch.device | str,
                   width_fraction: float = 1.0, **settings: Any) -> DiffusionBranch:
        """DS with the planned topology (features scaled by ``width_fraction``) on ``device``; ``settings`` are
        this class's keyword arguments (timesteps, schedule, ddim_steps, signal_scale)."""
        denoiser = build_denoiser(plans_manager, scaled_configuration(configuration_manager, width_fraction),
                                  image_channels, num_classes, deep_supervision).to(device)
        return cls(denoiser, num_classes, device=device, **settings)

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    @property
    def ddim_steps(self) -> int:
        return self.sampler.num_steps

    def use_ddim_steps(self, steps: int) -> None:
        """Sample with ``steps`` DDIM steps from now on (the schedule is unchanged)."""
        self.sampler = DDIMSampler(self.schedule, steps, signal_scale=self.signal_scale)

    def noised(self, label: Tensor, t: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """A label map (B, 1, ...) as the denoiser's noisy input at timesteps ``t`` (uniform if None)."""
        if t is None:
            t = sample_timesteps(label.shape[0], self.num_timesteps, device=label.device)
        signal = self.signal_scale * label_map_to_signal(label, self.num_classes)
        return q_sample(self.schedule, signal, t), t

    def denoise(self, images: Tensor, labels: Tensor) -> Tensor | list[Tensor]:
        """The denoiser's clean-label logits for ``images``, each given its label noised at a random timestep."""
        x_t, t = self.noised(labels)
        return self.denoiser(images, x_t, t)

    def sample_logits(self, images: Tensor, generator: torch.Generator | None = None, steps: int | None = None
                      ) -> Tensor:
        """Clean-label logits (B, K, ...) for ``images`` by DDIM sampling from pure noise (no gradient), with
        the branch's number of DDIM steps or ``steps``."""
        sampler = self.sampler
        if steps is not None and steps != sampler.num_steps:
            if steps not in self._other_samplers:
                self._other_samplers[steps] = DDIMSampler(self.schedule, steps, signal_scale=self.signal_scale)
            sampler = self._other_samplers[steps]
        denoiser = self.denoiser
        return sampler.sample(lambda img, x_t, t: denoiser(img, x_t, t), images, self.num_classes, generator)

    def sample_label(self, images: Tensor, generator: torch.Generator | None = None, steps: int | None = None
                     ) -> Tensor:
        """A sampled hard label (B, 1, ...) for ``images`` (no gradient), as ``sample_logits``."""
        return hard_pseudo_label(self.sample_logits(images, generator, steps), has_regions=False)
