"""Pseudo-label targets have the form nnU-Net's losses expect and carry no gradient."""

from __future__ import annotations

import pytest
import torch

from nnunetv2_diffcl.losses.pseudo_labels import (
    hard_pseudo_label,
    pseudo_label_targets,
    rare_class_first,
    split_batch,
)


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


def test_rare_class_first_known_patches():
    # six 4 x 4 patches; class 2 (the rarer: 1 + 3 voxels against class 1's 20) lies in patches 1 and 4, most in 4
    labels = torch.zeros(6, 1, 4, 4, dtype=torch.long)
    labels[0, 0, :2] = 1
    labels[1, 0, 0, 0] = 2
    labels[2, 0, 2:] = 1
    labels[4, 0, 3, :3] = 2
    labels[5, 0, 1:2] = 1
    generator = torch.Generator().manual_seed(0)
    chosen = rare_class_first(labels, 3, 2, 3, generator)
    assert chosen[:2].tolist() == [4, 1]  # most voxels of class 2 first, then the other patch that holds it
    assert len(set(chosen.tolist())) == 3  # the third drawn from the rest, no patch twice
    only_one = labels.clone()
    only_one[1] = 0
    chosen = rare_class_first(only_one, 3, 2, 3, generator)
    assert chosen[0] == 4 and 4 not in chosen[1:].tolist()  # a patch without the class is not forced
    assert sorted(rare_class_first(torch.zeros(5, 1, 2, 2), 5, 1, 3).tolist()) == list(range(5))  # no foreground


def test_rare_class_first_refuses_impossible_counts():
    with pytest.raises(ValueError, match=r"0 <= forced \(4\) <= n \(3\) <= patches \(6\)"):
        rare_class_first(torch.zeros(6, 1, 2, 2), 3, 4, 3)
