"""Evaluate a folder of predicted segmentations against a folder of reference labels.

Files are matched by case name (nnU-Net naming ``CASE{file_ending}``; the ending is taken from the
reference files). Every problem with a file (missing or extra case, geometry mismatch, unreadable
file) is recorded by name in the summary's ``errors`` list while the remaining cases are still
evaluated, so one bad file never hides the result of the others; the CLI then exits non-zero. Only
when no case at all can be evaluated does :func:`evaluate_folders` raise.

Spacing is read from the files (millimetres); see :mod:`nnunetv2_diffcl.evaluation.metrics` for the
metrics and the empty-mask convention.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from nnunetv2_diffcl.errors import UserInputError
from nnunetv2_diffcl.evaluation.metrics import (
    METRIC_NAMES,
    case_metrics,
    empty_pair_metrics,
    summarize,
)
from nnunetv2_diffcl.file_io import write_json_atomic

KNOWN_ENDINGS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".tif", ".tiff", ".png")
DEFAULT_TOLERANCE = 1e-3


class EvaluationError(UserInputError):
    """Not a single case could be evaluated (the message says why); exit code 2."""


def _ending_of(name: str) -> str | None:
    for ending in KNOWN_ENDINGS:
        if name.endswith(ending):
            return ending
    return None


def detect_file_ending(folder: Path) -> str:
    """The image file ending shared by the files of a folder (the most common one if mixed)."""
    endings = Counter(e for p in folder.iterdir() if p.is_file() and (e := _ending_of(p.name)))
    if not endings:
        raise EvaluationError(f"no image files ({', '.join(KNOWN_ENDINGS)}) found in {folder}")
    return endings.most_common(1)[0][0]


def _cases(folder: Path, file_ending: str) -> dict[str, Path]:
    return {p.name[: -len(file_ending)]: p for p in sorted(folder.iterdir())
            if p.is_file() and p.name.endswith(file_ending) and not p.name.startswith(".")}


def _geometry_problem(ref: sitk.Image, pred: sitk.Image, tolerance: float) -> str | None:
    """Describe how the prediction's grid differs from the reference's, or None if they agree."""
    if ref.GetSize() != pred.GetSize():
        return f"size {pred.GetSize()} != reference {ref.GetSize()}"
    for what in ("Spacing", "Origin", "Direction"):
        a = np.array(getattr(ref, f"Get{what}")())
        b = np.array(getattr(pred, f"Get{what}")())
        if not np.allclose(a, b, rtol=0.0, atol=tolerance):
            return (f"{what.lower()} {tuple(b.round(6))} != reference {tuple(a.round(6))} "
                    f"(tolerance {tolerance})")
    return None


def evaluate_case(case: str, ref_file: str, pred_file: str, classes: Sequence[int] | None,
                  tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """Metrics of one case; problems are returned as an error entry instead of raised.

    With ``classes`` None, every label present in the reference or the prediction is evaluated so
    the caller can pick the classes afterwards without reading the files twice.
    """
    images: dict[str, sitk.Image] = {}
    for role, file in (("reference", ref_file), ("prediction", pred_file)):
        try:
            images[role] = sitk.ReadImage(file)
        except Exception as exc:  # noqa: BLE001 - SimpleITK raises plain RuntimeErrors
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return {"case": case, "error": {"case": case, "file": file, "kind": "unreadable",
                                            "message": f"cannot read {role} {file}: {message}"}}
    ref_img, pred_img = images["reference"], images["prediction"]
    problem = _geometry_problem(ref_img, pred_img, tolerance)
    if problem is not None:
        return {"case": case, "error": {"case": case, "file": pred_file, "kind": "geometry_mismatch",
                                        "message": f"{pred_file}: {problem} ({ref_file})"}}
    ref = sitk.GetArrayFromImage(ref_img)
    pred = sitk.GetArrayFromImage(pred_img)
    if classes is None:
        present = np.union1d(np.unique(ref), np.unique(pred))
        eval_classes = [int(c) for c in present if c != 0]
    else:
        eval_classes = list(classes)
    spacing = tuple(reversed(ref_img.GetSpacing()))
    return {"case": case, "reference_file": ref_file, "prediction_file": pred_file,
            "spacing_mm_xyz": list(ref_img.GetSpacing()),
            "reference_labels": [int(c) for c in np.unique(ref) if c != 0],
            "metrics": case_metrics(pred, ref, eval_classes, spacing)}


def _run_case(job: tuple[str, str, str, Sequence[int] | None, float]) -> dict[str, Any]:
    return evaluate_case(*job)


def _json_safe(value: Any) -> Any:
    """NaN is not JSON; missing distances become null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def evaluate_folders(reference_folder: str | os.PathLike, prediction_folder: str | os.PathLike,
                     output_file: str | os.PathLike | None = None, labels: Sequence[int] | None = None,
                     num_processes: int = 1, file_ending: str | None = None,
                     tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """Evaluate every reference case that has a prediction; return (and optionally write) the summary.

    Classes are ``labels`` if given, else every non-zero value found in any reference file.
    Raises :class:`EvaluationError` (after writing the summary) when no case could be evaluated.
    """
    ref_dir, pred_dir = Path(reference_folder), Path(prediction_folder)
    for name, folder in (("reference", ref_dir), ("prediction", pred_dir)):
        if not folder.is_dir():
            raise EvaluationError(f"{name} folder {folder} does not exist")
    ending = file_ending or detect_file_ending(ref_dir)
    refs, preds = _cases(ref_dir, ending), _cases(pred_dir, ending)
    errors: list[dict[str, str]] = []
    for case in sorted(set(refs) - set(preds)):
        errors.append({"case": case, "file": str(pred_dir / f"{case}{ending}"), "kind": "missing_prediction",
                       "message": f"no prediction {pred_dir / f'{case}{ending}'} for reference {refs[case]}"})
    for case in sorted(set(preds) - set(refs)):
        errors.append({"case": case, "file": str(preds[case]), "kind": "extra_prediction",
                       "message": f"prediction {preds[case]} has no reference {ref_dir / f'{case}{ending}'}"})

    jobs = [(case, str(refs[case]), str(preds[case]), list(labels) if labels is not None else None, tolerance)
            for case in sorted(set(refs) & set(preds))]
    if num_processes > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(num_processes, len(jobs))) as pool:
            results = list(pool.map(_run_case, jobs))
    else:
        results = [_run_case(job) for job in jobs]

    good = [r for r in results if "error" not in r]
    errors.extend(r["error"] for r in results if "error" in r)
    if labels is not None:
        classes = sorted(int(c) for c in labels)
    else:
        classes = sorted({c for r in good for c in r["reference_labels"]})
    filler = empty_pair_metrics()
    per_case_metrics = {r["case"]: {c: r["metrics"].get(c, filler) for c in classes} for r in good}
    stats = summarize(per_case_metrics, classes)
    summary: dict[str, Any] = {
        "reference_folder": str(ref_dir), "prediction_folder": str(pred_dir), "file_ending": ending,
        "classes": classes, "metrics": list(METRIC_NAMES),
        "units": {"dice": "fraction", "jaccard": "fraction", "hd95_mm": "mm", "asd_mm": "mm",
                  "hd95_vox": "voxels", "asd_vox": "voxels"},
        "conventions": ("both empty: dice=jaccard=1, hd95=asd=0; one empty: dice=jaccard=0, hd95/asd "
                        "missing (null), excluded from means and counted in n_missing_distance; "
                        "asd is directed prediction->reference (medpy); std is population (ddof=0)"),
        "n_cases_evaluated": len(good), "n_errors": len(errors), "ok": not errors and bool(good),
        "errors": sorted(errors, key=lambda e: (e["case"], e["kind"])),
        "per_case": [{"case": r["case"], "reference_file": r["reference_file"],
                      "prediction_file": r["prediction_file"], "spacing_mm_xyz": r["spacing_mm_xyz"],
                      "metrics": {str(c): per_case_metrics[r["case"]][c] for c in classes}}
                     for r in sorted(good, key=lambda r: r["case"])],
        **stats,
    }
    summary = _json_safe(summary)
    if output_file is not None:
        write_json_atomic(summary, output_file)
    if not good:
        named = "; ".join(e["message"] for e in summary["errors"]) or f"no {ending} files in {ref_dir}"
        raise EvaluationError(f"no case could be evaluated: {named}")
    return summary


def _fmt(stat: dict[str, Any], scale: float = 1.0) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean'] * scale:.2f} ± {stat['std'] * scale:.2f}"


def format_table(summary: dict[str, Any]) -> str:
    """A readable table: Dice/Jaccard in %, distances in mm and voxels, mean ± std over cases."""
    header = ["class", "n", "Dice %", "Jaccard %", "HD95 mm", "ASD mm", "HD95 vox", "ASD vox", "no dist"]
    rows = []
    groups = [(c, s) for c, s in summary["per_class"].items()] + [("mean", summary["mean_over_classes"])]
    for name, stat in groups:
        rows.append([name, str(stat["dice"]["n"]), _fmt(stat["dice"], 100), _fmt(stat["jaccard"], 100),
                     _fmt(stat["hd95_mm"]), _fmt(stat["asd_mm"]), _fmt(stat["hd95_vox"]),
                     _fmt(stat["asd_vox"]), str(stat["hd95_mm"]["n_missing"])])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``nnUNetv2_diffcl evaluate``."""
    parser.add_argument("-ref", "--reference", required=True, help="folder with the reference label files")
    parser.add_argument("-pred", "--prediction", required=True, help="folder with the predicted label files")
    parser.add_argument("-o", "--output", default=None,
                        help="summary JSON to write (default: summary.json in the prediction folder)")
    parser.add_argument("-l", "--labels", type=int, nargs="+", default=None,
                        help="label values to evaluate (default: every non-zero value in the references)")
    parser.add_argument("-np", "--num-processes", type=int, default=1, help="parallel worker processes")
    parser.add_argument("--file-ending", default=None,
                        help="e.g. .nii.gz (default: from the reference files)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="allowed absolute difference of spacing/origin (mm) and direction")


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the table and errors; exit 0 if all went well, 1 on file errors, 2 if none."""
    output = args.output if args.output is not None else str(Path(args.prediction) / "summary.json")
    summary = evaluate_folders(args.reference, args.prediction, output, args.labels, args.num_processes,
                               args.file_ending, args.tolerance)  # EvaluationError: nothing to evaluate, exit 2
    print(format_table(summary))
    print(f"{summary['n_cases_evaluated']} case(s) evaluated; summary written to {output}")
    for error in summary["errors"]:
        print(f"error [{error['kind']}] {error['message']}", file=sys.stderr)
    if summary["errors"]:
        print(f"{len(summary['errors'])} file problem(s), see 'errors' in {output}", file=sys.stderr)
        return 1
    return 0
