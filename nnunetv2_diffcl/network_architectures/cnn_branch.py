"""The CNN branch (CS) of Diff-CL: nnU-Net's planned network with HF-Mamba on its deepest skips.

The planned network (PlainConvUNet, ResidualEncoderUNet, ... whatever the plans name) is built by
nnU-Net's own ``get_network_from_plans``, so its topology, weight init and deep supervision are
exactly nnU-Net's. ``HFMambaUNet`` registers the planned network's ``encoder`` and ``decoder`` as its
own direct children: ``network.decoder.deep_supervision = ...`` (what nnU-Net's trainer does) works
unchanged, and the state-dict keys are the planned network's keys plus ``hf_mamba.*``. With
``hf_mamba_stages=0`` the keys, the weights and the output are those of the plain nnU-Net network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunetv2_diffcl.network_architectures.hf_mamba import HFMamba
from nnunetv2_diffcl.network_architectures.planned_unet import encoder_and_decoder

NetworkOutput = torch.Tensor | list[torch.Tensor]


def forward_capturing_features(network: nn.Module, decoder: nn.Module, x: torch.Tensor
                               ) -> tuple[NetworkOutput, torch.Tensor]:
    """``network(x)`` plus the input of ``decoder``'s last segmentation layer (highest resolution).

    The features are captured by a hook, so the decoder's own forward (deep supervision included)
    runs unchanged; ``network`` is called itself, so a DDP wrapper keeps its gradient synchronisation.
    """
    captured: list[torch.Tensor] = []

    def grab(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        captured.append(inputs[0])

    handle = decoder.seg_layers[-1].register_forward_pre_hook(grab)
    try:
        out = network(x)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the last segmentation layer ran {len(captured)} times instead of once")
    return out, captured[0]


def saved_hf_mamba_expand(state_dict: Mapping[str, Any], index: int, channels: int) -> int | None:
    """The inner width, as a multiple of ``channels``, of HF-Mamba ``index`` in an HFMambaUNet's state dict (read
    from its in_proj, which maps the channels to twice the inner width); None where the dict has no such layer."""
    weight = state_dict.get(f"hf_mamba.{index}.mamba_forward.in_proj.weight")
    return None if weight is None else int(weight.shape[0]) // (2 * channels)


class HFMambaUNet(nn.Module):
    """Planned encoder-decoder U-Net with HF-Mamba applied to the ``hf_mamba_stages`` deepest skips.

    ``hf_mamba[0]`` acts on the bottleneck (deepest encoder output), ``hf_mamba[1]`` on the skip one
    stage above. The planned network must be an encoder/decoder pair as in
    dynamic_network_architectures (``encoder(x)`` returns the skips, ``decoder(skips)`` the output);
    this holds for the U-Nets nnU-Net plans. Create it after nnU-Net's weight init (as
    :func:`build_hf_mamba_network` does): nnU-Net's He init would otherwise overwrite Mamba's init.
    """

    def __init__(
        self,
        planned_network: nn.Module,
        hf_mamba_stages: int = 1,
        cutoff_ratio: float = 0.25,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
    ) -> None:
        super().__init__()
        encoder, decoder = encoder_and_decoder(planned_network)
        channels: Sequence[int] = list(encoder.output_channels)
        if not 0 <= hf_mamba_stages <= min(2, len(channels)):
            raise ValueError(
                f"hf_mamba_stages must be 0, 1 or 2 (and <= number of stages), got {hf_mamba_stages}"
            )
        self.planned_class_name = type(planned_network).__name__
        self.encoder = encoder
        self.decoder = decoder
        self.hf_mamba_stages = hf_mamba_stages
        self.cutoff_ratio = cutoff_ratio
        # Deepest stage first: hf_mamba[i] acts on skips[-1 - i].
        mamba_opts = {"d_state": d_state, "d_conv": d_conv, "expand": expand}
        self.hf_mamba = nn.ModuleList(
            HFMamba(channels[-1 - i], cutoff_ratio=cutoff_ratio, **mamba_opts) for i in range(hf_mamba_stages)
        )

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """nn.Module's, except that HF-Mamba layers saved at another inner width (``hf_mamba_expand``) are rebuilt
        at the saved width first: a model trained before a trainer's default width changed still predicts as it
        was trained (``nnUNetv2_predict`` builds the network from the trainer class, then loads). Resuming a
        training never gets here with another width: ``HFMambaTrainer.load_checkpoint`` refuses it, since the
        optimizer holds the parameters built at the trainer's width."""
        for i, module in enumerate(self.hf_mamba):
            saved = saved_hf_mamba_expand(state_dict, i, module.channels)
            if saved is not None and saved != module.expand:
                reference = module.mamba_forward.in_proj.weight
                self.hf_mamba[i] = HFMamba(module.channels, cutoff_ratio=module.cutoff_ratio,
                                           d_state=module.mamba_forward.d_state, d_conv=module.mamba_forward.d_conv,
                                           expand=saved).to(device=reference.device, dtype=reference.dtype)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _skips(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = list(self.encoder(x))
        for i, module in enumerate(self.hf_mamba):
            skips[-1 - i] = module(skips[-1 - i])
        return skips

    def forward(self, x: torch.Tensor) -> NetworkOutput:
        """Exactly what the planned network returns: one tensor, or a list with deep supervision."""
        return self.decoder(self._skips(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[NetworkOutput, torch.Tensor]:
        """Output plus the highest-resolution decoder features (input of the final 1x1 seg conv)."""
        return forward_capturing_features(self, self.decoder, x)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """nnU-Net's VRAM estimate of the planned network (HF-Mamba at the bottleneck adds little)."""
        encoder_size = self.encoder.compute_conv_feature_map_size(input_size)
        return encoder_size + self.decoder.compute_conv_feature_map_size(input_size)


def build_hf_mamba_network_from_arch(
    architecture_class_name: str,
    arch_init_kwargs: dict,
    arch_init_kwargs_req_import: list[str] | tuple[str, ...],
    num_input_channels: int,
    num_output_channels: int,
    enable_deep_supervision: bool = True,
    hf_mamba_stages: int = 1,
    cutoff_ratio: float = 0.25,
    mamba_kwargs: dict | None = None,
) -> HFMambaUNet:
    """Build from the plans' architecture entry (nnU-Net's old build_network_architecture inputs)."""
    planned = get_network_from_plans(
        architecture_class_name,
        arch_init_kwargs,
        arch_init_kwargs_req_import,
        num_input_channels,
        num_output_channels,
        allow_init=True,
        deep_supervision=enable_deep_supervision,
    )
    # HF-Mamba modules are created only now, after nnU-Net's init, so they keep Mamba's own init.
    return HFMambaUNet(
        planned, hf_mamba_stages=hf_mamba_stages, cutoff_ratio=cutoff_ratio, **(mamba_kwargs or {})
    )


def build_hf_mamba_network(
    plans_manager: PlansManager,
    configuration_manager: ConfigurationManager,
    num_input_channels: int,
    num_output_channels: int,
    enable_deep_supervision: bool = True,
    hf_mamba_stages: int = 1,
    cutoff_ratio: float = 0.25,
    mamba_kwargs: dict | None = None,
) -> HFMambaUNet:
    """Same inputs as nnunetv2 2.8's static ``nnUNetTrainer.build_network_architecture`` plus options."""
    del plans_manager  # part of nnU-Net's signature; the configuration holds all the network needs
    return build_hf_mamba_network_from_arch(
        configuration_manager.network_arch_class_name,
        configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import,
        num_input_channels,
        num_output_channels,
        enable_deep_supervision=enable_deep_supervision,
        hf_mamba_stages=hf_mamba_stages,
        cutoff_ratio=cutoff_ratio,
        mamba_kwargs=mamba_kwargs,
    )
