"""The diffusion segmentation branch (DS) of Diff-CL: nnU-Net's planned U-Net conditioned on the timestep.

The planned network is built by nnU-Net's ``get_network_from_plans`` with ``image channels + K`` inputs
(image and noisy one-hot label side by side) and K outputs (logits of the clean label). The timestep
enters through a sinusoidal embedding and an MLP, and every encoder stage output is modulated by a
FiLM layer (per-channel scale and shift). The FiLM layers start at zero, so a freshly built denoiser
computes exactly what the planned network computes; the time conditioning is learned from there.

As in the CNN branch, the planned ``encoder`` and ``decoder`` are registered as direct children:
``network.decoder.deep_supervision = ...`` (what nnU-Net's trainer toggles) works unchanged.
"""

from __future__ import annotations

import math

import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import Tensor, nn

from nnunetv2_diffcl.network_architectures.planned_unet import encoder_and_decoder

NetworkOutput = Tensor | list[Tensor]


class SinusoidalTimestepEmbedding(nn.Module):
    """Transformer-style sin/cos features of a (possibly fractional) timestep; no parameters.

    Frequencies are geometric from 1 down to 1/``max_period``, so both neighbouring and distant
    timesteps are distinguishable.
    """

    def __init__(self, dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"embedding dim must be even and >= 2, got {dim}")
        self.dim = dim
        self.max_period = max_period

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        exponents = torch.arange(half, dtype=torch.float32, device=t.device) / half
        freqs = torch.exp(-math.log(self.max_period) * exponents)
        angles = t.float().reshape(-1, 1) * freqs.reshape(1, -1)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class TimestepMLP(nn.Module):
    """Sinusoidal features followed by Linear-SiLU-Linear: the learned timestep embedding."""

    def __init__(self, sinusoidal_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.sinusoidal = SinusoidalTimestepEmbedding(sinusoidal_dim)
        self.mlp = nn.Sequential(nn.Linear(sinusoidal_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.sinusoidal(t))


class FiLM(nn.Module):
    """Per-channel scale and shift from the time embedding: ``x * (1 + scale) + shift``.

    The projection is zero-initialised so the layer starts as the identity and leaves the planned
    network's behaviour (and nnU-Net's init) untouched until training moves it.
    """

    def __init__(self, embed_dim: int, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.act = nn.SiLU()
        self.proj = nn.Linear(embed_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.proj(self.act(emb)).chunk(2, dim=1)
        view = (*scale.shape, *([1] * (x.ndim - 2)))
        return x * (1 + scale.reshape(view).to(x.dtype)) + shift.reshape(view).to(x.dtype)


class TimeConditionedDenoiser(nn.Module):
    """Planned encoder/decoder U-Net whose encoder stages are FiLM-modulated by the timestep.

    ``forward(image, x_t, t)`` returns what the planned network returns for the concatenated input
    (one tensor, or a list with deep supervision): logits of the clean label. Create it after
    nnU-Net's weight init of ``planned_network`` (as :func:`build_denoiser` does), so that init does
    not touch the FiLM and time-MLP layers.
    """

    def __init__(
        self,
        planned_network: nn.Module,
        image_channels: int,
        num_classes: int,
        embed_dim: int | None = None,
        sinusoidal_dim: int | None = None,
    ) -> None:
        super().__init__()
        encoder, decoder = encoder_and_decoder(planned_network)
        channels = [int(c) for c in encoder.output_channels]
        if len(channels) != len(encoder.stages):
            raise TypeError("encoder.output_channels must list one feature count per encoder stage")
        self.planned_class_name = type(planned_network).__name__
        self.image_channels = int(image_channels)
        self.num_classes = int(num_classes)
        if sinusoidal_dim is None:
            sinusoidal_dim = channels[0] + channels[0] % 2
        if embed_dim is None:
            embed_dim = 4 * channels[0]
        self.embed_dim = int(embed_dim)
        self.encoder = encoder
        self.decoder = decoder
        self.time_embed = TimestepMLP(sinusoidal_dim, self.embed_dim)
        self.film = nn.ModuleList(FiLM(self.embed_dim, c) for c in channels)

    def encode(self, image: Tensor, x_t: Tensor, t: Tensor) -> list[Tensor]:
        """Skips of the time-modulated encoder, highest resolution first (what the decoder expects)."""
        if image.shape[1] != self.image_channels or x_t.shape[1] != self.num_classes:
            raise ValueError(
                f"expected {self.image_channels} image and {self.num_classes} label channels, "
                f"got {image.shape[1]} and {x_t.shape[1]}"
            )
        if t.ndim == 0:
            t = t.expand(image.shape[0])
        emb = self.time_embed(t.to(image.device))
        x = torch.cat([image, x_t.to(image.dtype)], dim=1)
        stem = getattr(self.encoder, "stem", None)
        if stem is not None:
            x = stem(x)
        skips = []
        for stage, film in zip(self.encoder.stages, self.film):
            x = film(stage(x), emb)
            skips.append(x)
        return skips

    def forward(self, image: Tensor, x_t: Tensor, t: Tensor) -> NetworkOutput:
        return self.decoder(self.encode(image, x_t, t))

    def compute_conv_feature_map_size(self, input_size: list[int] | tuple[int, ...]) -> int:
        """Same VRAM estimate as the planned network (FiLM adds no feature maps worth counting)."""
        return self.encoder.compute_conv_feature_map_size(input_size) + self.decoder.compute_conv_feature_map_size(
            input_size
        )


def build_denoiser(
    plans_manager: PlansManager,
    configuration_manager: ConfigurationManager,
    num_input_channels: int,
    num_classes: int,
    enable_deep_supervision: bool = True,
    embed_dim: int | None = None,
) -> TimeConditionedDenoiser:
    """Build DS with the planned topology, mirroring nnU-Net's ``build_network_architecture`` arguments.

    ``num_input_channels`` is the number of image channels (as for nnU-Net); the label channels are
    added here. ``plans_manager`` is accepted for signature parity; the configuration holds all
    that is needed. ``embed_dim`` defaults to 4x the first stage's features (guided-diffusion's ratio).
    """
    del plans_manager  # the configuration carries the architecture
    planned = get_network_from_plans(
        configuration_manager.network_arch_class_name,
        configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import,
        num_input_channels + num_classes,
        num_classes,
        allow_init=True,
        deep_supervision=enable_deep_supervision,
    )
    return TimeConditionedDenoiser(planned, num_input_channels, num_classes, embed_dim=embed_dim)
