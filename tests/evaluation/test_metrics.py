"""Metrics on hand-built volumes whose answers were worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nnunetv2_diffcl.evaluation.metrics import (
    METRIC_NAMES,
    binary_metrics,
    case_metrics,
    mean_std,
    summarize,
)

# Spacing in array order (z, y, x): strongly anisotropic so a wrong axis order changes every answer.
SPACING = (3.0, 2.0, 0.5)


def _slabs(axis: int, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: a 2-voxel-thick slab spanning the whole volume across ``axis``; prediction: shifted.

    Every voxel of a 2-thick slab is a surface voxel and its nearest surface voxel of the other slab
    lies straight along ``axis``, so the surface distances are exactly ``shift - 1`` and ``shift``
    voxels, half each (for a shift of 2: distances 1 and 2).
    """
    ref = np.zeros((12, 10, 9), dtype=bool)
    pred = np.zeros_like(ref)
    index = [slice(None)] * 3
    index[axis] = slice(2, 4)
    ref[tuple(index)] = True
    index[axis] = slice(2 + shift, 4 + shift)
    pred[tuple(index)] = True
    return pred, ref


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slab_shift_surface_distances_voxels_and_mm(axis: int) -> None:
    pred, ref = _slabs(axis, shift=2)
    m = binary_metrics(pred, ref, SPACING)
    # no overlap
    assert m["dice"] == 0.0 and m["jaccard"] == 0.0
    # distances {1, 2} half each: 95th percentile = 2, mean = 1.5 (voxels), times the axis spacing in mm
    assert m["hd95_vox"] == pytest.approx(2.0)
    assert m["asd_vox"] == pytest.approx(1.5)
    assert m["hd95_mm"] == pytest.approx(2.0 * SPACING[axis])
    assert m["asd_mm"] == pytest.approx(1.5 * SPACING[axis])


def test_shifted_slab_with_overlap() -> None:
    pred, ref = _slabs(axis=0, shift=1)
    m = binary_metrics(pred, ref, SPACING)
    # one of two layers shared: Dice = 2*1/(2+2), Jaccard = 1/3; distances {0, 1} half each
    assert m["dice"] == pytest.approx(0.5)
    assert m["jaccard"] == pytest.approx(1 / 3)
    assert m["hd95_vox"] == pytest.approx(1.0)
    assert m["asd_vox"] == pytest.approx(0.5)
    assert m["asd_mm"] == pytest.approx(0.5 * SPACING[0])


def test_cube_shifted_by_two_voxels() -> None:
    """10^3 cube shifted by k=2 along x (last array axis), worked out face by face.

    Dice = (n-k)/n = 0.8, Jaccard = (n-k)/(n+k) = 2/3. Surface: n^3 - (n-2)^3 = 488 voxels per cube.
    Directed distances prediction -> reference (voxels): moved front face 100 x 2; back face: its
    outer ring (36) lies on the reference's side faces (0), the 8x8 inside is min(in-plane distance
    to a side, 2): 28 x 1 + 36 x 2; side rings: 7 slices inside the reference (0), 1 slice outside
    (36 x 1). Sum 200 + 100 + 36 = 336 -> ASD = 336/488 voxels. In mm (x spacing 0.5, in-plane >= 2):
    100 x 1.0 + 64 x 1.0 + 36 x 0.5 = 182 -> 182/488 mm. The symmetric multiset has 576 zeros, then
    ones (or 0.5 mm) and 272 twos (328 of 1.0 mm), so the 95th percentile is 2 voxels and 1.0 mm.
    """
    ref = np.zeros((20, 20, 20), dtype=bool)
    pred = np.zeros_like(ref)
    ref[4:14, 4:14, 4:14] = True
    pred[4:14, 4:14, 6:16] = True
    m = binary_metrics(pred, ref, SPACING)
    assert m["dice"] == pytest.approx(0.8)
    assert m["jaccard"] == pytest.approx(2 / 3)
    assert m["asd_vox"] == pytest.approx(336 / 488)
    assert m["asd_mm"] == pytest.approx(182 / 488)
    assert m["hd95_vox"] == pytest.approx(2.0)
    assert m["hd95_mm"] == pytest.approx(1.0)
    assert m["n_reference"] == 1000 and m["n_prediction"] == 1000


def test_identical_masks_are_perfect() -> None:
    ref = np.zeros((8, 8, 8), dtype=bool)
    ref[2:6, 3:7, 1:5] = True
    m = binary_metrics(ref, ref, SPACING)
    assert [m[k] for k in METRIC_NAMES] == [1, 1, 0, 0, 0, 0]


def test_object_touching_the_border_is_not_cropped_wrongly() -> None:
    ref = np.zeros((6, 6, 6), dtype=bool)
    pred = np.zeros_like(ref)
    ref[0:2] = True
    pred[2:4] = True
    m = binary_metrics(pred, ref)
    assert m["hd95_vox"] == pytest.approx(2.0) and m["asd_vox"] == pytest.approx(1.5)


def test_both_empty_convention() -> None:
    empty = np.zeros((5, 5, 5), dtype=bool)
    m = binary_metrics(empty, empty, SPACING)
    assert [m[k] for k in METRIC_NAMES] == [1, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("empty_side", ["prediction", "reference"])
def test_one_empty_convention(empty_side: str) -> None:
    full = np.zeros((5, 5, 5), dtype=bool)
    full[1:3, 1:3, 1:3] = True
    empty = np.zeros_like(full)
    pred, ref = (empty, full) if empty_side == "prediction" else (full, empty)
    m = binary_metrics(pred, ref, SPACING)
    assert m["dice"] == 0.0 and m["jaccard"] == 0.0
    assert all(math.isnan(m[k]) for k in ("hd95_mm", "asd_mm", "hd95_vox", "asd_vox"))


def test_shape_and_spacing_mismatch_raise() -> None:
    with pytest.raises(ValueError):
        binary_metrics(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError):
        binary_metrics(np.ones((3, 3)), np.ones((3, 3)), spacing=(1.0, 1.0, 1.0))


def test_case_metrics_multiclass_and_summary_counts_missing_distances() -> None:
    ref = np.zeros((10, 10, 10), dtype=np.uint8)
    ref[1:4, 1:4, 1:4] = 1
    ref[6:9, 6:9, 6:9] = 2
    pred_good = ref.copy()
    pred_miss = ref.copy()
    pred_miss[pred_miss == 2] = 0  # class 2 missed entirely
    per_case = {"a": case_metrics(pred_good, ref, [1, 2]), "b": case_metrics(pred_miss, ref, [1, 2])}
    assert per_case["a"][2]["dice"] == 1.0 and per_case["b"][2]["dice"] == 0.0
    stats = summarize(per_case, [1, 2])
    c2 = stats["per_class"]["2"]
    assert c2["dice"]["mean"] == pytest.approx(0.5) and c2["dice"]["std"] == pytest.approx(0.5)
    assert c2["n_missing_distance"] == 1
    assert c2["hd95_mm"] == {"mean": 0.0, "std": 0.0, "n": 1, "n_missing": 1}
    # class average per case: a -> 1.0, b -> 0.5; mean 0.75, std 0.25
    assert stats["mean_over_classes"]["dice"]["mean"] == pytest.approx(0.75)
    assert stats["mean_over_classes"]["dice"]["std"] == pytest.approx(0.25)


def test_mean_std_all_missing_is_none() -> None:
    assert mean_std([math.nan, math.nan]) == {"mean": None, "std": None, "n": 0, "n_missing": 2}
