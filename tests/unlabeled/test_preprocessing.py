"""preprocess_unlabeled against nnU-Net's own preprocessing, idempotency, manifest checks, bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import blosc2
import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_diffcl.unlabeled.preprocessing import (
    UnlabeledDataError,
    check_unlabeled_data,
    find_unlabeled_cases,
    manifest_file,
    preprocess_unlabeled,
    unlabeled_folder,
)
from tests.conftest import COPY_OF_LABELED, DATASET_ID, command, run_command

IDENTIFIER = "nnUNetPlans_3d_fullres"


def _load(folder: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
    data = blosc2.open(str(folder / f"{case}.b2nd"), mode="r")[:]
    seg = blosc2.open(str(folder / f"{case}_seg.b2nd"), mode="r")[:]
    return data, seg


def _plans_and_json(dataset) -> tuple[dict, dict]:
    return (json.loads((dataset.preprocessed / "nnUNetPlans.json").read_text()),
            json.loads((dataset.preprocessed / "dataset.json").read_text()))


def test_same_result_as_nnunet_preprocessing_of_the_same_image(planned_dataset):
    labeled_case, copy = COPY_OF_LABELED
    labeled, _ = _load(planned_dataset.preprocessed / IDENTIFIER, labeled_case)
    unlabeled, seg = _load(planned_dataset.preprocessed / f"{IDENTIFIER}_unlabeled", copy)
    assert unlabeled.dtype == np.float32 and unlabeled.shape == labeled.shape
    np.testing.assert_array_equal(unlabeled, labeled)
    # image-only cases get no label: background inside the non-zero region, -1 outside, nothing else
    assert set(np.unique(seg)) <= {-1, 0}


def test_properties_carry_empty_class_locations(planned_dataset):
    import pickle

    props = pickle.loads((planned_dataset.preprocessed / f"{IDENTIFIER}_unlabeled" / "syn_003.pkl").read_bytes())
    assert props["class_locations"] == {}
    assert list(props["spacing"]) == [1.0, 1.0, 1.0]


def test_manifest_and_separate_folder(planned_dataset):
    manifest = json.loads(Path(manifest_file(str(planned_dataset.preprocessed), IDENTIFIER)).read_text())
    assert manifest["plans_name"] == "nnUNetPlans" and manifest["configuration"] == "3d_fullres"
    assert sorted(manifest["cases"]) == sorted([COPY_OF_LABELED[1], "syn_003", "syn_004", "syn_005"])
    assert len(manifest["fingerprint"]) == 64 and manifest["nnunetv2_version"].startswith("2.8")
    # nnU-Net's labeled folder holds only the labeled cases (its folds are built from that folder)
    labeled = {f.split(".")[0] for f in os.listdir(planned_dataset.preprocessed / IDENTIFIER) if f.endswith(".pkl")}
    assert labeled == {"syn_000", "syn_001", "syn_002"}
    plans, dataset_json = _plans_and_json(planned_dataset)
    cases = check_unlabeled_data(str(planned_dataset.preprocessed), plans, "3d_fullres",
                                 plans["configurations"]["3d_fullres"], dataset_json, None)
    assert cases == sorted(manifest["cases"])


def test_idempotent_and_incremental(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    out = Path(unlabeled_folder(str(dataset_copy.preprocessed), IDENTIFIER))
    before = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}
    messages: list[str] = []
    preprocess_unlabeled(DATASET_ID, num_processes=1, progress=messages.append)
    assert "0 to do" in messages[0]
    assert {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)} == before

    # a new case is added, one is removed: only the new one is processed, the removed one disappears
    tu = dataset_copy.raw / "imagesTu"
    shutil.copy(tu / "syn_003_0000.nii.gz", tu / "added_0000.nii.gz")
    os.remove(tu / "syn_004_0000.nii.gz")
    messages.clear()
    preprocess_unlabeled(DATASET_ID, num_processes=1, progress=messages.append)
    assert "1 to do" in messages[0]
    assert (out / "added.b2nd").exists() and not (out / "syn_004.b2nd").exists()
    assert os.stat(out / "syn_003.b2nd").st_mtime_ns == before["syn_003.b2nd"]
    assert not (out / ".partial").exists()


def test_plans_change_redoes_everything_and_training_refuses_old_data(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    plans, dataset_json = _plans_and_json(dataset_copy)
    changed = json.loads(json.dumps(plans))
    changed["configurations"]["3d_fullres"]["normalization_schemes"] = ["RescaleTo01Normalization"]
    with pytest.raises(UnlabeledDataError, match=r"preprocessed with other plans.*preprocess_unlabeled -d 991"):
        check_unlabeled_data(str(dataset_copy.preprocessed), changed, "3d_fullres",
                             changed["configurations"]["3d_fullres"], dataset_json, None)
    other = dict(changed, plans_name="nnUNetResEncUNetMPlans")
    with pytest.raises(UnlabeledDataError, match="-p nnUNetResEncUNetMPlans"):
        check_unlabeled_data(str(dataset_copy.preprocessed), other, "3d_fullres",
                             changed["configurations"]["3d_fullres"], dataset_json, None)
    (dataset_copy.preprocessed / "nnUNetPlans.json").write_text(json.dumps(changed))
    messages: list[str] = []
    preprocess_unlabeled(DATASET_ID, num_processes=1, progress=messages.append)
    assert "0 already preprocessed, 4 to do" in messages[0]
    check_unlabeled_data(str(dataset_copy.preprocessed), changed, "3d_fullres",
                         changed["configurations"]["3d_fullres"], dataset_json, None)


def test_parallel_workers_give_the_same_result(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    out = Path(unlabeled_folder(str(dataset_copy.preprocessed), IDENTIFIER))
    reference = {c: _load(out, c)[0] for c in ("syn_003", "syn_005")}
    os.remove(manifest_file(str(dataset_copy.preprocessed), IDENTIFIER))
    preprocess_unlabeled(DATASET_ID, num_processes=2, progress=lambda m: None)
    for case, data in reference.items():
        np.testing.assert_array_equal(_load(out, case)[0], data)


# ------------------------------------------------------------------------------------------------ bad input
def _expect_failure(dataset, match: str) -> None:
    """Preprocessing fails naming the problem, and no manifest (so no usable data) is left behind."""
    with pytest.raises(UnlabeledDataError, match=match):
        preprocess_unlabeled(DATASET_ID, num_processes=1, progress=lambda m: None)
    assert not Path(manifest_file(str(dataset.preprocessed), IDENTIFIER)).exists()
    assert not (Path(unlabeled_folder(str(dataset.preprocessed), IDENTIFIER)) / ".partial").exists()


def test_missing_imagesTu(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    shutil.rmtree(dataset_copy.raw / "imagesTu")
    with pytest.raises(UnlabeledDataError, match=r"imagesTu does not exist.*Put the unlabeled scans"):
        preprocess_unlabeled(DATASET_ID, num_processes=1, progress=lambda m: None)


def test_empty_imagesTu(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    shutil.rmtree(dataset_copy.raw / "imagesTu")
    (dataset_copy.raw / "imagesTu").mkdir()
    with pytest.raises(UnlabeledDataError, match="imagesTu is empty"):
        preprocess_unlabeled(DATASET_ID, num_processes=1, progress=lambda m: None)


def test_other_file_ending(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    (dataset_copy.raw / "imagesTu" / "scan_0000.nrrd").write_bytes(b"x")
    with pytest.raises(UnlabeledDataError, match=r"file ending '\.nii\.gz'.*scan_0000\.nrrd"):
        preprocess_unlabeled(DATASET_ID, num_processes=1, progress=lambda m: None)


def test_badly_named_file(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    shutil.copy(dataset_copy.raw / "imagesTu" / "syn_003_0000.nii.gz", dataset_copy.raw / "imagesTu" / "scan.nii.gz")
    with pytest.raises(UnlabeledDataError, match=r"scan\.nii\.gz is not named CASE_XXXX"):
        preprocess_unlabeled(DATASET_ID, num_processes=1, progress=lambda m: None)


def test_wrong_number_of_channels(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    tu = dataset_copy.raw / "imagesTu"
    shutil.copy(tu / "syn_003_0000.nii.gz", tu / "syn_003_0001.nii.gz")
    with pytest.raises(UnlabeledDataError, match=r"'syn_003'.*\[0, 1\].*1 channel"):
        preprocess_unlabeled(DATASET_ID, num_processes=1, progress=lambda m: None)


def test_unreadable_image(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    (dataset_copy.raw / "imagesTu" / "broken_0000.nii.gz").write_bytes(b"not an image at all")
    _expect_failure(dataset_copy, r"'broken' could not be read or preprocessed .*broken_0000\.nii\.gz")
    assert not any(f.startswith("broken") for f in os.listdir(unlabeled_folder(str(dataset_copy.preprocessed),
                                                                                IDENTIFIER)))


def test_non_finite_image(dataset_copy, in_process_env):
    # ITK's NIfTI reader (nnU-Net's default SimpleITKIO) turns NaN into 0 by itself; nibabel keeps it,
    # so the dataset is switched to nnU-Net's NibabelIO reader for this test
    import nibabel

    in_process_env(dataset_copy)
    plans_file = dataset_copy.preprocessed / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans_file.write_text(json.dumps(dict(plans, image_reader_writer="NibabelIO")))
    image = nibabel.load(str(dataset_copy.raw / "imagesTu" / "syn_003_0000.nii.gz"))
    array = np.asarray(image.dataobj, dtype=np.float32)
    array[5, 5, 5] = np.nan
    nibabel.save(nibabel.Nifti1Image(array, image.affine), str(dataset_copy.raw / "imagesTu" / "nan_0000.nii.gz"))
    _expect_failure(dataset_copy, r"'nan': non-finite values .*nan_0000\.nii\.gz")


def test_geometry_the_reader_rejects(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    four_d = sitk.GetImageFromArray(np.zeros((2, 8, 8, 8), np.float32), isVector=False)
    sitk.WriteImage(four_d, str(dataset_copy.raw / "imagesTu" / "fourd_0000.nii.gz"))
    _expect_failure(dataset_copy, r"'fourd' could not be read or preprocessed")


def test_before_planning_says_which_command_to_run(tmp_path, in_process_env):
    from nnunetv2_diffcl.dataset_conversion.synthetic import SyntheticConfig, write_synthetic_dataset
    from tests.conftest import PlannedDataset, nnunet_env

    dataset = in_process_env(PlannedDataset(tmp_path, nnunet_env(tmp_path)))
    write_synthetic_dataset(tmp_path / "raw", 992, "Unplanned", 1, 1, 0, config=SyntheticConfig(shape=(16, 16, 16)))
    os.makedirs(tmp_path / "preprocessed" / "Dataset992_Unplanned")
    with pytest.raises(UnlabeledDataError, match=r"Run `nnUNetv2_plan_and_preprocess -d 992 -c 3d_fullres` first"):
        preprocess_unlabeled(992, num_processes=1, progress=lambda m: None)
    result = run_command([command("nnUNetv2_diffcl"), "preprocess_unlabeled", "-d", "992"], dataset.env, check=False)
    assert result.returncode == 2 and "nnUNetv2_plan_and_preprocess -d 992" in result.stderr
    assert "nnUNetv2_diffcl preprocess_unlabeled: error:" in result.stderr and "Traceback" not in result.stderr


def test_find_unlabeled_cases_groups_channels(tmp_path):
    tu = tmp_path / "imagesTu"
    tu.mkdir()
    for name in ("b_0001.nii.gz", "b_0000.nii.gz", "a_0000.nii.gz", "a_0001.nii.gz"):
        (tu / name).write_bytes(b"")
    cases = find_unlabeled_cases(str(tmp_path), {"file_ending": ".nii.gz", "channel_names": {"0": "T1", "1": "T2"}})
    assert list(cases) == ["a", "b"]
    assert [os.path.basename(f) for f in cases["b"]] == ["b_0000.nii.gz", "b_0001.nii.gz"]
