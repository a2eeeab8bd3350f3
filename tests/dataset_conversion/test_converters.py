"""Converters on tiny synthetic releases built in the formats the datasets are distributed in."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import ModuleType

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_diffcl.dataset_conversion.converters import brats, la, pancreas
from nnunetv2_diffcl.dataset_conversion.converters.common import (
    ConverterError,
    list_entry_name,
    select_labeled,
)

RNG = np.random.default_rng(0)
SHAPE_XYZ = (6, 7, 5)  # distinct extents so a wrong transpose shows up in the sizes


def _args(module: ModuleType, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.configure_parser(parser)
    return parser.parse_args([str(a) for a in argv])


def _run(module: ModuleType, *argv: str | Path) -> int:
    """The converter's command as a user runs it (``nnUNetv2_diffcl convert_<name>``): its exit code."""
    from nnunetv2_diffcl.cli import main

    return main([f"convert_{module.__name__.rsplit('.', 1)[1]}", *[str(a) for a in argv]])


def _label_xyz(value: int = 1) -> np.ndarray:
    label = np.zeros(SHAPE_XYZ, dtype=np.uint8)
    label[1:4, 2:5, 1:3] = value
    return label


def _counts(dataset: Path) -> dict[str, int]:
    return {d: len(list((dataset / d).glob("*.nii.gz")))
            for d in ("imagesTr", "labelsTr", "imagesTu", "imagesTs", "labelsTs")}


def _write_list(path: Path, names: list[str]) -> None:
    path.write_text("".join(f"{n}\n" for n in names))


# ---------------------------------------------------------------- split logic


def test_select_labeled_is_reproducible_and_order_independent() -> None:
    train = [f"case{i:02d}" for i in range(20)]
    first = select_labeled(train, 4, seed=3)
    assert first == select_labeled(list(reversed(train)), 4, seed=3)
    assert len(set(first)) == 4 and set(first) <= set(train)
    assert any(select_labeled(train, 4, seed=s) != first for s in range(4, 10))
    assert select_labeled(train, 3, seed=0, mode="first") == ["case00", "case01", "case02"]
    with pytest.raises(ConverterError, match="between 1 and the 20"):
        select_labeled(train, 21, seed=0)


def test_list_entry_names() -> None:
    assert list_entry_name("0RZDK210BSMWAA6467LU\n") == "0RZDK210BSMWAA6467LU"
    assert list_entry_name("a/CASE1/mri_norm2.h5", ["mri_norm2"]) == "CASE1"
    assert list_entry_name("BraTS19_2013_0_1,1") == "BraTS19_2013_0_1"
    assert list_entry_name("image0001_norm.h5") == "image0001_norm"


# ---------------------------------------------------------------- LA


def _la_h5_release(root: Path, n_train: int = 8, n_test: int = 2) -> tuple[Path, list[str], list[str]]:
    data = root / "data"
    folder = data / "2018LA_Seg_Training Set"
    names = [f"LA{i:03d}XYZ" for i in range(n_train + n_test)]
    for name in names:
        (folder / name).mkdir(parents=True)
        with h5py.File(folder / name / "mri_norm2.h5", "w") as f:
            f["image"] = RNG.normal(size=SHAPE_XYZ).astype(np.float32)
            f["label"] = _label_xyz()
    _write_list(data / "train.list", names[:n_train])
    _write_list(data / "test.list", names[n_train:])
    return folder, names[:n_train], names[n_train:]


def test_la_h5_release(tmp_path: Path) -> None:
    folder, train, test = _la_h5_release(tmp_path)
    raw = tmp_path / "raw"
    assert _run(la, folder, "-d", "11", "--labeled", "3", "--seed", "5", "-o", raw) == 0
    dataset = raw / "Dataset011_LA"
    assert _counts(dataset) == {"imagesTr": 3, "labelsTr": 3, "imagesTu": 5, "imagesTs": 2, "labelsTs": 2}
    split = json.loads((dataset / "split.json").read_text())
    assert split["labeled"] == select_labeled(train, 3, seed=5)
    assert sorted(split["labeled"] + split["unlabeled"]) == sorted(train)
    assert split["test"] == sorted(test) and split["seed"] == 5
    assert split["spacing_xyz_mm"] == [0.625, 0.625, 0.625] and split["h5_axis_order"] == "xyz"
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 3

    case = split["labeled"][0]
    image = sitk.ReadImage(str(dataset / "imagesTr" / f"{case}_0000.nii.gz"))
    assert image.GetSize() == SHAPE_XYZ and image.GetSpacing() == pytest.approx((0.625,) * 3)
    with h5py.File(folder / case / "mri_norm2.h5", "r") as f:
        stored = f["image"][()]
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), stored.transpose(2, 1, 0))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / "labelsTr" / f"{case}.nii.gz")))
    np.testing.assert_array_equal(label, _label_xyz().transpose(2, 1, 0))
    assert (dataset / "imagesTu" / f"{split['unlabeled'][0]}_0000.nii.gz").is_file()
    assert not list(raw.glob(".*partial"))

    # same seed -> same choice; 'first' takes the list's head; an existing dataset needs --overwrite
    assert _run(la, folder, "-d", "12", "--labeled", "3", "--seed", "5", "-o", raw) == 0
    assert json.loads((raw / "Dataset012_LA" / "split.json").read_text())["labeled"] == split["labeled"]
    assert _run(la, folder, "-d", "11", "--labeled", "2", "-o", raw) == 2
    assert _run(la, folder, "-d", "11", "--labeled", "2", "--labeled-selection", "first", "-o", raw,
                "--overwrite") == 0
    assert json.loads((dataset / "split.json").read_text())["labeled"] == train[:2]


def _la_challenge(root: Path, names: list[str]) -> Path:
    for name in names:
        (root / name).mkdir(parents=True)
        image = sitk.GetImageFromArray(RNG.integers(0, 255, size=SHAPE_XYZ[::-1]).astype(np.uint8))
        image.SetSpacing((0.625, 0.625, 1.25))
        image.SetOrigin((-10.0, 5.0, 3.0))
        sitk.WriteImage(image, str(root / name / "lgemri.nrrd"))
        label = sitk.GetImageFromArray(_label_xyz(255).transpose(2, 1, 0))
        label.CopyInformation(image)
        sitk.WriteImage(label, str(root / name / "laendo.nrrd"))
    return root


def test_la_challenge_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = [f"C{i}" for i in range(6)]
    folder = _la_challenge(tmp_path / "Training Set", names)
    raw = tmp_path / "raw"
    assert _run(la, folder, "-d", "3", "--labeled", "2", "-o", raw) == 2
    assert "train.list" in capsys.readouterr().err

    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": names[:4], "test": names[4:]}))
    assert _run(la, folder, "-d", "3", "--labeled", "2", "-o", raw, "--split-file", split_file) == 0
    dataset = raw / "Dataset003_LA"
    assert _counts(dataset) == {"imagesTr": 2, "labelsTr": 2, "imagesTu": 2, "imagesTs": 2, "labelsTs": 2}
    label = sitk.ReadImage(str(dataset / "labelsTs" / "C4.nii.gz"))
    assert set(np.unique(sitk.GetArrayFromImage(label))) == {0, 1}  # 255 -> 1
    image = sitk.ReadImage(str(dataset / "imagesTs" / "C4_0000.nii.gz"))
    assert image.GetSpacing() == pytest.approx((0.625, 0.625, 1.25))
    assert image.GetOrigin() == pytest.approx((-10.0, 5.0, 3.0))
    assert label.GetSpacing() == pytest.approx((0.625, 0.625, 1.25))

    # list files given on the command line; a listed case that does not exist is named
    _write_list(tmp_path / "tr.list", names[:3] + ["NOPE"])
    _write_list(tmp_path / "ts.list", names[4:])
    assert _run(la, folder, "-d", "4", "--labeled", "1", "-o", raw, "--train-list", tmp_path / "tr.list",
                "--test-list", tmp_path / "ts.list") == 2
    assert "NOPE" in capsys.readouterr().err


def test_wrong_folder_says_what_was_expected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing here")
    expectations = {la: ["mri_norm2.h5", "lgemri.nrrd"], pancreas: ["PANCREAS_XXXX", "labelXXXX", ".h5"],
                    brats: ["_flair.nii.gz", ".h5"]}
    for module, words in expectations.items():
        assert _run(module, tmp_path / "empty", "-d", "1", "--labeled", "1", "-o", tmp_path / "raw") == 2
        err = capsys.readouterr().err
        assert str(tmp_path / "empty") in err and all(w in err for w in words), err
    assert not (tmp_path / "raw").exists() or not list((tmp_path / "raw").iterdir())


def test_raw_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    folder, _, _ = _la_h5_release(tmp_path, n_train=3, n_test=1)
    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert _run(la, folder, "-d", "7", "--labeled", "1") == 2
    assert "nnUNet_raw" in capsys.readouterr().err
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "envraw"))
    assert _run(la, folder, "-d", "7", "--labeled", "1") == 0
    assert (tmp_path / "envraw" / "Dataset007_LA" / "split.json").is_file()


# ---------------------------------------------------------------- pancreas


def test_pancreas_nifti_release(tmp_path: Path) -> None:
    src = tmp_path / "pancreas"
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir()
    for i in range(1, 7):
        image = sitk.GetImageFromArray(RNG.integers(-1000, 1000, size=SHAPE_XYZ[::-1]).astype(np.int16))
        image.SetSpacing((0.7, 0.7, 1.5))
        sitk.WriteImage(image, str(src / "images" / f"PANCREAS_{i:04d}.nii.gz"))
        label = sitk.GetImageFromArray(_label_xyz().transpose(2, 1, 0))
        label.CopyInformation(image)
        sitk.WriteImage(label, str(src / "labels" / f"label{i:04d}.nii.gz"))
    _write_list(src / "train.list", [f"image{i:04d}" for i in range(1, 5)])
    _write_list(src / "test.list", ["image0005", "image0006"])
    raw = tmp_path / "raw"
    assert _run(pancreas, src, "-d", "20", "--labeled", "2", "-o", raw, "--seed", "1") == 0
    dataset = raw / "Dataset020_Pancreas"
    assert _counts(dataset) == {"imagesTr": 2, "labelsTr": 2, "imagesTu": 2, "imagesTs": 2, "labelsTs": 2}
    split = json.loads((dataset / "split.json").read_text())
    assert split["test"] == ["pancreas_0005", "pancreas_0006"]
    assert split["labeled"] == select_labeled([f"pancreas_{i:04d}" for i in range(1, 5)], 2, seed=1)
    image = sitk.ReadImage(str(dataset / "imagesTs" / "pancreas_0005_0000.nii.gz"))
    assert image.GetSpacing() == pytest.approx((0.7, 0.7, 1.5))
    assert json.loads((dataset / "dataset.json").read_text())["channel_names"] == {"0": "CT"}


@pytest.mark.parametrize("file_name, extra, note", [
    ("image{:04d}_norm.h5", [], False),  # MC-Net's release: 1 mm, (x, y, z), as assumed
    ("{:04d}.h5", [], True),  # CoraNet/BCP's release: its z spacing is not 1 mm, so the user is told
    ("{:04d}.h5", ["--h5-spacing", "0.8", "0.8", "1.25"], False),  # ... unless a spacing is given
])
def test_pancreas_h5_release(tmp_path: Path, capsys, file_name: str, extra: list[str], note: bool) -> None:
    src = tmp_path / "Pancreas"
    (src / "Pancreas_h5").mkdir(parents=True)
    for i in range(1, 6):
        with h5py.File(src / "Pancreas_h5" / file_name.format(i), "w") as f:
            f["image"] = RNG.random(SHAPE_XYZ).astype(np.float32)
            f["label"] = _label_xyz()
    _write_list(src / "train.list", ["image0001", "image0002", "image0003"])
    _write_list(src / "test.list", ["image0004", "image0005"])
    raw = tmp_path / "raw"
    assert _run(pancreas, src / "Pancreas_h5", "-d", "21", "--labeled", "1", "-o", raw, *extra) == 0
    assert ("look like the CoraNet/BCP release" in capsys.readouterr().err) == note
    dataset = raw / "Dataset021_Pancreas"
    assert _counts(dataset) == {"imagesTr": 1, "labelsTr": 1, "imagesTu": 2, "imagesTs": 2, "labelsTs": 2}
    spacing = [float(v) for v in extra[1:]] or [1.0, 1.0, 1.0]
    image = sitk.ReadImage(str(dataset / "imagesTs" / "pancreas_0004_0000.nii.gz"))
    assert image.GetSize() == SHAPE_XYZ and image.GetSpacing() == pytest.approx(spacing)
    split = json.loads((dataset / "split.json").read_text())
    assert split["source_format"] == "h5" and split["spacing_xyz_mm"] == spacing


def test_pancreas_dicom_series(tmp_path: Path) -> None:
    src = tmp_path / "Pancreas-CT"
    volume = RNG.integers(-500, 500, size=SHAPE_XYZ[::-1]).astype(np.int16)  # (z, y, x)
    for i in (1, 2):
        series = src / f"PANCREAS_{i:04d}" / "study" / "series"
        series.mkdir(parents=True)
        for z in range(volume.shape[0]):
            slice_image = sitk.GetImageFromArray(volume[z:z + 1])
            slice_image.SetSpacing((0.8, 0.8, 2.0))
            slice_image.SetOrigin((0.0, 0.0, 2.0 * z))
            for tag, value in (("0020|000e", f"1.2.3.{i}"), ("0020|0013", str(z + 1)),
                               ("0020|0032", f"0\\0\\{2.0 * z}"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                               ("0008|0060", "CT"), ("0028|0030", "0.8\\0.8"), ("0018|0050", "2.0")):
                slice_image.SetMetaData(tag, value)
            writer = sitk.ImageFileWriter()
            writer.KeepOriginalImageUIDOn()
            writer.SetFileName(str(series / f"{z:03d}.dcm"))
            writer.Execute(slice_image)
        label = sitk.GetImageFromArray(_label_xyz().transpose(2, 1, 0))
        label.SetSpacing((0.8, 0.8, 2.0))
        sitk.WriteImage(label, str(src / f"label{i:04d}.nii.gz"))
    _write_list(tmp_path / "train.list", ["1"])
    _write_list(tmp_path / "test.list", ["2"])
    raw = tmp_path / "raw"
    assert _run(pancreas, src, "-d", "22", "--labeled", "1", "-o", raw,
                "--train-list", tmp_path / "train.list", "--test-list", tmp_path / "test.list") == 0
    dataset = raw / "Dataset022_Pancreas"
    image = sitk.ReadImage(str(dataset / "imagesTr" / "pancreas_0001_0000.nii.gz"))
    assert image.GetSize() == SHAPE_XYZ
    assert image.GetSpacing() == pytest.approx((0.8, 0.8, 2.0))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume)
    assert (dataset / "labelsTs" / "pancreas_0002.nii.gz").is_file()


# ---------------------------------------------------------------- BraTS


def _brats_names(n: int) -> list[str]:
    return [f"BraTS19_TST_{i}_1" for i in range(n)]


def test_brats_challenge_folders_and_validation_placement(tmp_path: Path) -> None:
    src = tmp_path / "MICCAI_BraTS_2019_Data_Training"
    names = _brats_names(7)
    for k, name in enumerate(names):
        case = src / ("HGG" if k % 2 else "LGG") / name
        case.mkdir(parents=True)
        flair = sitk.GetImageFromArray(RNG.integers(0, 500, size=SHAPE_XYZ[::-1]).astype(np.int16))
        flair.SetOrigin((0.0, -239.0, 0.0))
        sitk.WriteImage(flair, str(case / f"{name}_flair.nii.gz"))
        seg = np.zeros(SHAPE_XYZ[::-1], dtype=np.uint8)
        seg[1, 1:3, 1:3], seg[2, 2, 2], seg[3, 3:5, 3] = 1, 2, 4
        seg_image = sitk.GetImageFromArray(seg)
        seg_image.CopyInformation(flair)
        sitk.WriteImage(seg_image, str(case / f"{name}_seg.nii.gz"))
    _write_list(src / "train.txt", names[:4])
    _write_list(src / "val.txt", names[4:5])
    _write_list(src / "test.txt", names[5:])
    raw = tmp_path / "raw"
    assert _run(brats, src, "-d", "30", "--labeled", "2", "-o", raw) == 0
    dataset = raw / "Dataset030_BraTS2019"
    assert _counts(dataset) == {"imagesTr": 2, "labelsTr": 2, "imagesTu": 2, "imagesTs": 2, "labelsTs": 2}
    split = json.loads((dataset / "split.json").read_text())
    assert split["validation"] == [names[4]] and split["validation_placement"] == "skip"
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / "labelsTs" / f"{names[5]}.nii.gz")))
    assert set(np.unique(label)) == {0, 1} and int(label.sum()) == 4 + 1 + 2  # whole tumour: 1, 2, 4 -> 1
    image = sitk.ReadImage(str(dataset / "imagesTs" / f"{names[5]}_0000.nii.gz"))
    assert image.GetOrigin() == pytest.approx((0.0, -239.0, 0.0))

    assert _run(brats, src, "-d", "31", "--labeled", "2", "-o", raw, "--validation", "unlabeled") == 0
    assert _counts(raw / "Dataset031_BraTS2019")["imagesTu"] == 3
    assert _run(brats, src, "-d", "32", "--labeled", "2", "-o", raw, "--validation", "test") == 0
    assert _counts(raw / "Dataset032_BraTS2019")["labelsTs"] == 3


def test_brats_h5_release(tmp_path: Path) -> None:
    src = tmp_path / "BraTS2019"
    (src / "data").mkdir(parents=True)
    names = _brats_names(5)
    arrays = {}
    for name in names:
        arrays[name] = RNG.normal(size=SHAPE_XYZ[::-1]).astype(np.float32)  # stored (z, y, x)
        with h5py.File(src / "data" / f"{name}.h5", "w") as f:
            f["image"] = arrays[name]
            f["label"] = _label_xyz(2).transpose(2, 1, 0)
    _write_list(src / "train.txt", names[:3])
    _write_list(src / "val.txt", names[3:4])
    _write_list(src / "test.txt", names[4:])
    raw = tmp_path / "raw"
    assert _run(brats, src, "-d", "33", "--labeled", "1", "-o", raw) == 0
    dataset = raw / "Dataset033_BraTS2019"
    assert _counts(dataset) == {"imagesTr": 1, "labelsTr": 1, "imagesTu": 2, "imagesTs": 1, "labelsTs": 1}
    image = sitk.ReadImage(str(dataset / "imagesTs" / f"{names[4]}_0000.nii.gz"))
    assert image.GetSize() == SHAPE_XYZ and image.GetSpacing() == pytest.approx((1.0, 1.0, 1.0))
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), arrays[names[4]])
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / "labelsTs" / f"{names[4]}.nii.gz")))
    assert set(np.unique(label)) == {0, 1}
    split = json.loads((dataset / "split.json").read_text())
    assert split["h5_axis_order"] == "zyx" and split["validation"] == [names[3]]


def test_h5_without_label_dataset_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, train, _ = _la_h5_release(tmp_path, n_train=2, n_test=1)
    with h5py.File(folder / train[0] / "mri_norm2.h5", "a") as f:
        del f["label"]
    assert _run(la, folder, "-d", "8", "--labeled", "2", "-o", tmp_path / "raw") == 2
    err = capsys.readouterr().err
    assert "mri_norm2.h5" in err and train[0] in err and "'label'" in err
    assert not (tmp_path / "raw" / "Dataset008_LA").exists()
    assert not list((tmp_path / "raw").glob(".*partial"))  # the writer cleaned up after the failure
