"""What the plugin's networks need of nnU-Net's planned U-Net: its encoder and decoder, checked once.

Both the CNN branch (CS) and the diffusion denoiser (DS) reuse the planned network's parts; this module is
their one shared dependency, so neither imports the other.
"""

from __future__ import annotations

from torch import nn


def encoder_and_decoder(planned_network: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The encoder (with ``stages`` and ``output_channels``) and the decoder of a planned U-Net.

    The networks nnU-Net plans (dynamic_network_architectures' U-Nets) have this shape; the plugin's
    networks reuse these parts, so anything else is refused with a TypeError.
    """
    encoder = getattr(planned_network, "encoder", None)
    decoder = getattr(planned_network, "decoder", None)
    if encoder is None or decoder is None or not hasattr(encoder, "output_channels") or not hasattr(encoder, "stages"):
        raise TypeError(
            f"{type(planned_network).__name__} is not an encoder/decoder U-Net from dynamic_network_architectures"
        )
    return encoder, decoder
