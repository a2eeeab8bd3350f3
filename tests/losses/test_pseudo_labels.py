"""Pseudo-label targets have the form nnU-Net's losses expect and carry no gradient."""

from __future__ import annotations

import pytest
import torch

from nnunetv2_diffcl.losses.pseudo_labels import hard_pseudo_label, pseudo_label_targets, split_batch


@pytest.mark.parametrize("spatial", [(8, 8), (8, 6, 4)])
def test_argmax_label_and_deep_supervision_scales(spatial):
    logits = torch.randn(2, 3, *spatial, requires_grad=True)
    half = tuple(s // 2 for s in spatial)
    outputs = [logits, torch.randn(2, 3, *half)]
    targets = pseudo_label_targets(outputs, has_regions=False)
    assert [tuple(t.shape) for t in targets] == [(2, 1, *spatial), (2, 1, *half)]
    assert not targets[0].requires_grad
    assert torch.equal(targets[0][:, 0].long(), logits.argmax(1))
    # the low-resolution target is the full-resolution label downsampled as nnU-Net does it for the ground
    # truth ('nearest-exact': voxel 2i+1 when halving), not the argmax of the low-resolution output
    odd = (slice(None), slice(None)) + tuple(slice(1, None, 2) for _ in spatial)
    assert torch.equal(targets[1].long(), targets[0][odd].long())


def test_single_output_and_regions():
    logits = torch.tensor([[[[2.0, -1.0]], [[-3.0, 0.5]]]])  # (1, 2, 1, 2)
    assert torch.equal(pseudo_label_targets(logits, has_regions=False), torch.tensor([[[[0, 1]]]], dtype=torch.int16))
    regions = hard_pseudo_label(logits, has_regions=True)
    assert regions.shape == logits.shape and torch.equal(regions, (logits > 0).float())


def test_split_batch():
    a, b = split_batch([torch.arange(5), torch.arange(5) * 2], 2)
    assert [t.tolist() for t in a] == [[0, 1], [0, 2]] and [t.tolist() for t in b] == [[2, 3, 4], [4, 6, 8]]
    x, y = split_batch(torch.arange(3), 1)
    assert x.tolist() == [0] and y.tolist() == [1, 2]
