"""The synthetic dataset: MRI-like properties that the demo relies on, and nnU-Net's raw layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_diffcl.datasets.raw_layout import RawDatasetWriter
from nnunetv2_diffcl.datasets.synthetic import SyntheticConfig, make_case, write_synthetic_dataset


@pytest.mark.parametrize("shape", [(32, 32, 32), (24, 40, 36)])
def test_case_shapes_and_types(shape):
    image, label = make_case(np.random.default_rng(0), SyntheticConfig(shape=shape))
    assert image.shape == label.shape == shape
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert set(np.unique(label)) == {0, 1}
    assert np.isfinite(image).all() and image.min() >= 0  # Rician magnitudes are non-negative


def test_appearance_is_mri_like():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    fractions, contrasts, distractor_bright = [], [], []
    for _ in range(6):
        image, label = make_case(rng)
        fractions.append(label.mean())
        contrasts.append(np.median(image[label == 1]) / np.median(image[label == 0]))
        # distractors: voxels as bright as the target, away from it
        far = ~ndimage.binary_dilation(label, iterations=3)
        distractor_bright.append(np.mean(image[far] > 0.8 * np.median(image[label == 1])))
    assert 0.005 < min(fractions) and max(fractions) < 0.3
    assert min(contrasts) > 1.3  # the bias field can halve the nominal 2.5
    assert max(distractor_bright) > 0.002


def test_partial_volume_at_boundaries():
    """Without noise and bias, boundary voxels take values between background and target."""
    from scipy import ndimage

    config = SyntheticConfig(noise_sigma=0.0, bias_strength=0.0)
    image, label = make_case(np.random.default_rng(5), config)
    mask = label.astype(bool)
    boundary = ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)
    low, high = 1000 * (config.background_intensity + 0.17), 1000 * (config.target_intensity - 0.13)
    between = (image > low) & (image < high)
    at_boundary, elsewhere = between[boundary].mean(), between[~ndimage.binary_dilation(boundary, iterations=2)].mean()
    assert at_boundary > 0.1 and elsewhere < 0.02 and at_boundary > 10 * elsewhere


def test_seeded_and_varied():
    a1, l1 = make_case(np.random.default_rng(7))
    a2, l2 = make_case(np.random.default_rng(7))
    b, lb = make_case(np.random.default_rng(8))
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(l1, lb)


def test_dataset_layout(tmp_path):
    folder = write_synthetic_dataset(tmp_path, 990, num_labeled=2, num_unlabeled=3, num_test=1, seed=1,
                                     config=SyntheticConfig(shape=(16, 16, 16)))
    root = tmp_path / "Dataset990_DiffCLSynthetic"
    assert folder == str(root)
    counts = {sub: len(list((root / sub).iterdir())) for sub in ("imagesTr", "labelsTr", "imagesTu", "imagesTs",
                                                                   "labelsTs")}
    assert counts == {"imagesTr": 2, "labelsTr": 2, "imagesTu": 3, "imagesTs": 1, "labelsTs": 1}
    dataset_json = json.loads((root / "dataset.json").read_text())
    assert dataset_json["numTraining"] == 2 and dataset_json["file_ending"] == ".nii.gz"
    split = json.loads((root / "split.json").read_text())
    assert split["seed"] == 1 and len(split["unlabeled"]) == 3
    assert sitk.ReadImage(str(root / "imagesTu" / f"{split['unlabeled'][0]}_0000.nii.gz")).GetSize() == (16, 16, 16)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_synthetic_dataset(tmp_path, 990, num_labeled=1, num_unlabeled=0, num_test=0)


def test_interrupted_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with RawDatasetWriter(tmp_path, 5, "Broken", {0: "CT"}, {"background": 0, "x": 1}) as writer:
            writer.add_case("labeled", "a", [np.zeros((4, 4, 4), np.float32)], np.zeros((4, 4, 4), np.uint8))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_cases(tmp_path):
    writer = RawDatasetWriter(tmp_path, 6, "Checks", {0: "CT"}, {"background": 0, "x": 1})
    with pytest.raises(ValueError, match="needs a label"):
        writer.add_case("labeled", "a", [np.zeros((4, 4, 4), np.float32)])
    with pytest.raises(ValueError, match="carry no label"):
        writer.add_case("unlabeled", "b", [np.zeros((4, 4, 4))], np.zeros((4, 4, 4), np.uint8))
    writer.add_case("unlabeled", "c", [np.zeros((4, 4, 4))])
    with pytest.raises(ValueError, match="added twice"):
        writer.add_case("test", "c", [np.zeros((4, 4, 4))], np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="no labeled case"):
        writer.finish()
    writer.abort()
