"""Folder evaluation: matching by case name, problems named in the summary, good cases still evaluated."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_diffcl.evaluation.evaluate import (
    EvaluationError,
    configure_parser,
    evaluate_folders,
    run,
)

SPACING_XYZ = (0.5, 2.0, 3.0)


def _write(path: Path, array: np.ndarray, spacing_xyz: tuple[float, ...] = SPACING_XYZ) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing_xyz)
    image.SetOrigin((10.0, -5.0, 2.0))
    sitk.WriteImage(image, str(path))


def _label(shift: int = 0) -> np.ndarray:
    """Class 1: a slab 2 voxels thick across x (last axis); class 2 a small box."""
    seg = np.zeros((10, 8, 12), dtype=np.uint8)
    seg[:, :, 2 + shift:4 + shift] = 1
    seg[6:8, 5:7, 8:10] = 2
    return seg


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path]:
    ref, pred = tmp_path / "labelsTs", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    for case in ("good_a", "good_b", "missing", "badgeom", "broken"):
        _write(ref / f"{case}.nii.gz", _label())
    _write(pred / "good_a.nii.gz", _label())
    _write(pred / "good_b.nii.gz", _label(shift=2))
    _write(pred / "extra.nii.gz", _label())
    _write(pred / "badgeom.nii.gz", _label(), spacing_xyz=(0.5, 2.0, 2.5))
    (pred / "broken.nii.gz").write_bytes(b"this is not a nifti file")
    (pred / "plans.json").write_text("{}")  # nnU-Net writes such files next to predictions
    return ref, pred


def test_errors_named_and_good_cases_evaluated(folders: tuple[Path, Path], tmp_path: Path) -> None:
    ref, pred = folders
    out = tmp_path / "out" / "summary.json"
    summary = evaluate_folders(ref, pred, out)
    assert summary["file_ending"] == ".nii.gz"
    assert summary["classes"] == [1, 2]
    assert [c["case"] for c in summary["per_case"]] == ["good_a", "good_b"]
    kinds = {e["case"]: e["kind"] for e in summary["errors"]}
    assert kinds == {"missing": "missing_prediction", "extra": "extra_prediction",
                     "badgeom": "geometry_mismatch", "broken": "unreadable"}
    for error in summary["errors"]:
        assert error["case"] in error["message"] and error["case"] in error["file"]
    assert summary["ok"] is False and summary["n_cases_evaluated"] == 2

    # good_a is perfect; good_b's slab moved by 2 voxels along x: distances 1 and 2 voxels, x spacing 0.5 mm
    b = summary["per_case"][1]["metrics"]["1"]
    assert b["dice"] == 0.0 and b["hd95_vox"] == pytest.approx(2.0) and b["asd_vox"] == pytest.approx(1.5)
    assert b["hd95_mm"] == pytest.approx(1.0) and b["asd_mm"] == pytest.approx(0.75)
    c1 = summary["per_class"]["1"]
    assert c1["dice"]["mean"] == pytest.approx(0.5) and c1["dice"]["std"] == pytest.approx(0.5)
    assert c1["asd_mm"]["mean"] == pytest.approx(0.375)
    assert summary["per_class"]["2"]["dice"]["mean"] == 1.0

    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert not [p for p in out.parent.iterdir() if p.name != "summary.json"]  # no temp file left


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(list(argv))


def test_cli_exits_nonzero_and_names_files(folders: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    ref, pred = folders
    out = tmp_path / "s.json"
    code = run(_args("-ref", str(ref), "-pred", str(pred), "-o", str(out), "-np", "2"))
    captured = capsys.readouterr()
    assert code == 1
    for name in ("missing.nii.gz", "extra.nii.gz", "badgeom.nii.gz", "broken.nii.gz"):
        assert name in captured.err
    assert "Dice %" in captured.out and "mean" in captured.out
    assert json.loads(out.read_text())["n_cases_evaluated"] == 2


def test_cli_clean_run_and_given_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    empty = np.zeros((10, 8, 12), dtype=np.uint8)
    _write(ref / "a.nii.gz", _label())
    _write(pred / "a.nii.gz", _label())
    _write(ref / "b.nii.gz", empty)
    _write(pred / "b.nii.gz", _label())
    out = tmp_path / "s.json"
    assert run(_args("-ref", str(ref), "-pred", str(pred), "-o", str(out), "-l", "1", "3")) == 0
    summary = json.loads(out.read_text())
    assert summary["classes"] == [1, 3] and summary["ok"] is True
    # class 3 is absent everywhere: both-empty convention; class 1 is empty in b's reference only
    assert summary["per_class"]["3"]["dice"]["mean"] == 1.0
    assert summary["per_class"]["3"]["hd95_mm"]["mean"] == 0.0
    b1 = summary["per_case"][1]["metrics"]["1"]
    assert b1["dice"] == 0.0 and b1["hd95_mm"] is None
    assert summary["per_class"]["1"]["n_missing_distance"] == 1
    assert "a.nii.gz" not in capsys.readouterr().err


def test_nothing_evaluable_raises_with_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    _write(ref / "only.nii.gz", _label())
    with pytest.raises(EvaluationError, match="only.nii.gz"):
        evaluate_folders(ref, pred)
    from nnunetv2_diffcl.cli import main

    assert main(["evaluate", "-ref", str(ref), "-pred", str(pred), "-o", str(tmp_path / "s.json")]) == 2
    assert "nnUNetv2_diffcl evaluate: error:" in capsys.readouterr().err
    assert json.loads((tmp_path / "s.json").read_text())["errors"][0]["kind"] == "missing_prediction"
