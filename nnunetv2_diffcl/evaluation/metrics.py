"""Overlap and surface metrics per case and class, as the semi-supervised segmentation papers report them.

Metrics (per foreground class, on binary masks ``prediction == c`` and ``reference == c``):

- ``dice`` = 2|P∩R| / (|P| + |R|) and ``jaccard`` = |P∩R| / |P∪R|, both in [0, 1];
- ``hd95`` = 95th percentile of the symmetric surface distances (``medpy.metric.binary.hd95``);
- ``asd`` = mean surface distance from the prediction's surface to the reference's surface
  (``medpy.metric.binary.asd``, which is directed, exactly as the UA-MT / SS-Net / BCP evaluation
  scripts call it).

Surface distances come from medpy because that is what the published numbers were computed with;
they are reported twice: ``*_mm`` with the image spacing (anisotropic spacing supported) and
``*_vox`` with unit spacing, which is how the left atrium literature reports them.

Spacing convention: arrays are in SimpleITK's array order (z, y, x) and ``spacing`` is given in the
same order (i.e. ``reversed(image.GetSpacing())``).

Empty-mask convention (never raises):

- reference and prediction both empty: Dice = Jaccard = 1, HD95 = ASD = 0 (a perfect answer);
- exactly one of them empty: Dice = Jaccard = 0, HD95 = ASD = NaN. A surface distance to nothing is
  undefined, so it is reported as missing (``null`` in JSON), left out of means and standard
  deviations, and counted separately (``n_missing_distance``) so that a summary shows how many
  cases the distance averages do not cover.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from medpy.metric import binary as medpy_binary

METRIC_NAMES: tuple[str, ...] = ("dice", "jaccard", "hd95_mm", "asd_mm", "hd95_vox", "asd_vox")
DISTANCE_METRICS: tuple[str, ...] = ("hd95_mm", "asd_mm", "hd95_vox", "asd_vox")


def _crop_to_union(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to their joint bounding box plus one voxel.

    medpy erodes and runs a distance transform over the whole array; all surface voxels lie inside
    this box and the one-voxel margin keeps the erosion identical, so the distances do not change
    while the work shrinks from the full volume to the object.
    """
    union = pred | ref
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        present = np.flatnonzero(union.any(axis=other))
        start = max(int(present[0]) - 1, 0)
        stop = min(int(present[-1]) + 2, union.shape[axis])
        slices.append(slice(start, stop))
    box = tuple(slices)
    return pred[box], ref[box]


def binary_metrics(prediction: np.ndarray, reference: np.ndarray,
                   spacing: Sequence[float] | None = None) -> dict[str, float]:
    """All metrics for one binary mask pair; ``spacing`` in array axis order, None means 1 mm."""
    pred = np.asarray(prediction).astype(bool)
    ref = np.asarray(reference).astype(bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if spacing is None:
        spacing = (1.0,) * ref.ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ref.ndim:
        raise ValueError(f"spacing {spacing} does not match the array dimensionality {ref.ndim}")

    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    result: dict[str, float] = {"n_reference": float(n_ref), "n_prediction": float(n_pred)}
    if n_pred == 0 and n_ref == 0:
        result.update(dice=1.0, jaccard=1.0, hd95_mm=0.0, asd_mm=0.0, hd95_vox=0.0, asd_vox=0.0)
        return result
    if n_pred == 0 or n_ref == 0:
        result.update(dice=0.0, jaccard=0.0, hd95_mm=math.nan, asd_mm=math.nan,
                      hd95_vox=math.nan, asd_vox=math.nan)
        return result

    intersection = int(np.logical_and(pred, ref).sum())
    result["dice"] = 2.0 * intersection / (n_pred + n_ref)
    result["jaccard"] = intersection / (n_pred + n_ref - intersection)
    pred_c, ref_c = _crop_to_union(pred, ref)
    result["hd95_mm"] = float(medpy_binary.hd95(pred_c, ref_c, voxelspacing=spacing))
    result["asd_mm"] = float(medpy_binary.asd(pred_c, ref_c, voxelspacing=spacing))
    if all(s == 1.0 for s in spacing):
        result["hd95_vox"], result["asd_vox"] = result["hd95_mm"], result["asd_mm"]
    else:
        result["hd95_vox"] = float(medpy_binary.hd95(pred_c, ref_c, voxelspacing=None))
        result["asd_vox"] = float(medpy_binary.asd(pred_c, ref_c, voxelspacing=None))
    return result


def case_metrics(prediction: np.ndarray, reference: np.ndarray, classes: Iterable[int],
                 spacing: Sequence[float] | None = None) -> dict[int, dict[str, float]]:
    """Metrics of one case for every requested label value (one-vs-rest masks)."""
    pred = np.asarray(prediction)
    ref = np.asarray(reference)
    return {int(c): binary_metrics(pred == c, ref == c, spacing) for c in classes}


def empty_pair_metrics() -> dict[str, float]:
    """Values for a class absent from both prediction and reference (the 'both empty' convention)."""
    return binary_metrics(np.zeros((1,), dtype=bool), np.zeros((1,), dtype=bool))


def mean_std(values: Iterable[float]) -> dict[str, float | int | None]:
    """Mean and population standard deviation (ddof=0, as numpy's default) over the non-NaN values.

    NaN entries (undefined surface distances) are counted in ``n_missing``; with no valid value the
    mean and std are None rather than NaN so the JSON stays standard.
    """
    array = np.asarray(list(values), dtype=float)
    valid = array[~np.isnan(array)]
    if valid.size == 0:
        return {"mean": None, "std": None, "n": 0, "n_missing": int(array.size)}
    return {"mean": float(valid.mean()), "std": float(valid.std()), "n": int(valid.size),
            "n_missing": int(array.size - valid.size)}


def summarize(per_case: Mapping[str, Mapping[int, Mapping[str, float]]],
              classes: Sequence[int]) -> dict[str, dict]:
    """Mean and std over cases per class, and over cases of each case's class average.

    The class average of a case ignores classes whose distance is undefined (NaN); a case whose
    distances are undefined for every class counts as missing for that metric.
    """
    per_class: dict[str, dict] = {}
    for c in classes:
        per_class[str(c)] = {m: mean_std(per_case[case][c][m] for case in per_case) for m in METRIC_NAMES}
        per_class[str(c)]["n_missing_distance"] = int(sum(
            math.isnan(per_case[case][c]["hd95_mm"]) for case in per_case))
    over_classes: dict[str, dict] = {}
    for m in METRIC_NAMES:
        case_means = []
        for case in per_case:
            values = np.array([per_case[case][c][m] for c in classes], dtype=float)
            case_means.append(float(np.nanmean(values)) if np.any(~np.isnan(values)) else math.nan)
        over_classes[m] = mean_std(case_means)
    return {"per_class": per_class, "mean_over_classes": over_classes}
