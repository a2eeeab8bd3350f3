"""Hard pseudo-labels in the form nnU-Net's losses take as targets."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def hard_pseudo_label(logits: torch.Tensor, has_regions: bool) -> torch.Tensor:
    """Argmax label map (B, 1, ...) for softmax training; thresholded region maps for region training."""
    if has_regions:
        return (torch.sigmoid(logits.float()) > 0.5).to(logits.dtype)
    return logits.argmax(1, keepdim=True).to(torch.int16)


@torch.no_grad()
def targets_like(label: torch.Tensor, outputs: torch.Tensor | Sequence[torch.Tensor]
                 ) -> torch.Tensor | list[torch.Tensor]:
    """A full-resolution label shaped as the target of ``outputs`` (one tensor or one per DS output).

    Lower resolutions are nearest-neighbour downsamplings ('nearest-exact'), as nnU-Net makes its own
    deep-supervision targets from the ground truth.
    """
    if isinstance(outputs, torch.Tensor):
        return label
    return [label] + [F.interpolate(label.float(), size=out.shape[2:], mode="nearest-exact").to(label.dtype)
                      for out in outputs[1:]]


@torch.no_grad()
def pseudo_label_targets(outputs: torch.Tensor | Sequence[torch.Tensor], has_regions: bool
                         ) -> torch.Tensor | list[torch.Tensor]:
    """Hard pseudo-label of the highest-resolution output, as targets for ``outputs``' structure."""
    full = outputs if isinstance(outputs, torch.Tensor) else outputs[0]
    return targets_like(hard_pseudo_label(full, has_regions), outputs)


def split_batch(outputs: torch.Tensor | Sequence[torch.Tensor], n_first: int):
    """Split a forward pass over ``cat([a, b])`` back into the outputs for a and for b."""
    if isinstance(outputs, torch.Tensor):
        return outputs[:n_first], outputs[n_first:]
    return [o[:n_first] for o in outputs], [o[n_first:] for o in outputs]
