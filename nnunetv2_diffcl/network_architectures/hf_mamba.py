"""HF-Mamba: high-frequency attention computed by Mamba over the spectral high-pass of a feature map.

Diff-CL uses it to give the CNN branch a global view of boundaries and fine detail: the low
frequencies (smooth content) are removed by an FFT high-pass, Mamba scans the remaining detail over
the whole volume in both directions, and the result gates the input as ``X + X * sigmoid(...)``.
Works for any number of spatial axes (2D and 3D feature maps).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nnunetv2_diffcl.network_architectures.mamba import Mamba


def low_frequency_box(
    shape: Sequence[int], cutoff_ratio: float, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean mask (in fftshift-ed order) of the centred low-frequency box to remove.

    Along an axis of length n the box holds the frequencies |f| <= floor(cutoff_ratio * n / 2), i.e.
    about ``cutoff_ratio * n`` bins centred on DC. It always contains DC, so a constant field is
    removed; it is symmetric in f, so a real input stays real after filtering; and for
    cutoff_ratio < 1 it never reaches the Nyquist bin, so the finest detail (a checkerboard) is kept.
    """
    masks = []
    for n in shape:
        # after fftshift, index i holds frequency i - n // 2
        freq = torch.arange(n, device=device) - n // 2
        masks.append(freq.abs() <= int(cutoff_ratio * n / 2))
    box = masks[0]
    for m in masks[1:]:
        box = box[..., None] & m
    return box


def high_pass(x: torch.Tensor, cutoff_ratio: float) -> torch.Tensor:
    """Remove the centred low-frequency box from x (batch, channels, *spatial) by FFT, in float32."""
    if not 0.0 < cutoff_ratio < 1.0:
        raise ValueError(f"cutoff_ratio must be in (0, 1), got {cutoff_ratio}")
    dims = tuple(range(2, x.dim()))
    if all(int(cutoff_ratio * n / 2) == 0 for n in x.shape[2:]):
        # the box is the DC bin alone (every axis shorter than 2 / cutoff_ratio, as at a 4 x 4 bottleneck):
        # removing it is subtracting the mean, the same result without the two transforms
        x = x.float()
        return x - x.mean(dim=dims, keepdim=True)
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=dims), dim=dims)
    box = low_frequency_box(x.shape[2:], cutoff_ratio, device=x.device)
    spectrum = spectrum.masked_fill(box, 0)
    return torch.fft.ifftn(torch.fft.ifftshift(spectrum, dim=dims), dim=dims).real


class HFMamba(nn.Module):
    """High-frequency Mamba attention: (batch, C, *spatial) -> same shape and dtype.

    Two Mamba layers, one per scan direction, rather than one shared layer: a causal scan only sees
    the tokens before it, so each direction needs its own dynamics (decay rates, input and output
    maps) to model "what lies behind" versus "what lies ahead"; a shared layer would force the two
    views of the volume to be mirror images. The cost is parameters only (about 3 * expand *
    channels^2 each, small next to the U-Net); the compute is the same as a shared layer.
    Computed in float32 even under autocast; the output has the input's dtype.
    """

    def __init__(
        self,
        channels: int,
        cutoff_ratio: float = 0.25,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
    ) -> None:
        super().__init__()
        if not 0.0 < cutoff_ratio < 1.0:
            raise ValueError(f"cutoff_ratio must be in (0, 1), got {cutoff_ratio}")
        self.channels = channels
        self.cutoff_ratio = cutoff_ratio
        self.expand = expand
        self.norm = nn.LayerNorm(channels)
        self.mamba_forward = Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand)
        self.mamba_backward = Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand)
        self.proj = nn.Linear(channels, channels)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid attention map (batch, C, *spatial) in float32."""
        high = high_pass(x.float(), self.cutoff_ratio)
        tokens = self.norm(high.flatten(2).transpose(1, 2))  # (batch, L, C)
        seq = self.mamba_forward(tokens) + self.mamba_backward(tokens.flip(1)).flip(1)
        att = torch.sigmoid(self.proj(seq))
        return att.transpose(1, 2).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[1] != self.channels:
            raise ValueError(f"expected (batch, {self.channels}, *spatial), got {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32 = x.float()
            out = x32 + x32 * self.attention(x32)
        return out.to(x.dtype)
