"""The synthetic dataset: MRI-like properties that the demo relies on, and nnU-Net's raw layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_diffcl.dataset_conversion.raw_layout import RawDatasetWriter
from nnunetv2_diffcl.dataset_conversion.synthetic import SyntheticConfig, make_case, write_synthetic_dataset


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


# ------------------------------------------------------------------------------------------------------------
# The domain-shift generator
# ------------------------------------------------------------------------------------------------------------
DEFAULT_DOMAIN_SHAPE = (16, 64, 64)  # write_domain_shift_dataset's default: the lesion's size is in voxels


@pytest.mark.parametrize("shape", [(8, 32, 32), (12, 40, 36)])
def test_domain_case_shapes_and_types(shape):
    from nnunetv2_diffcl.dataset_conversion.synthetic import DOMAIN_STYLES, make_domain_case

    for style in DOMAIN_STYLES:
        image, label = make_domain_case(np.random.default_rng(1), shape, style)
        assert image.shape == label.shape == shape
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert set(np.unique(label)) == {0, 1, 2}
        assert np.isfinite(image).all() and image.min() >= 0  # Rician magnitudes


def test_domain_case_anatomy_does_not_depend_on_the_style():
    from nnunetv2_diffcl.dataset_conversion.synthetic import DOMAIN_STYLES, make_domain_case

    labels = [make_domain_case(np.random.default_rng(4), (8, 32, 32), style)[1] for style in DOMAIN_STYLES]
    for label in labels[1:]:
        np.testing.assert_array_equal(label, labels[0])
    assert not np.array_equal(make_domain_case(np.random.default_rng(5), (8, 32, 32), DOMAIN_STYLES[0])[1],
                              labels[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lesion_is_small_and_sits_in_the_organ(seed):
    """At the default size; in an (8, 32, 32) volume the lesion (2-4 voxels in radius) can pass 1 %."""
    from scipy import ndimage

    from nnunetv2_diffcl.dataset_conversion.synthetic import DOMAIN_STYLES, make_domain_case

    _, label = make_domain_case(np.random.default_rng(seed), DEFAULT_DOMAIN_SHAPE, DOMAIN_STYLES[0])
    lesion = label == 2
    assert 0 < lesion.mean() < 0.01
    assert ndimage.label(lesion)[1] == 1
    # inside or at the edge of the organ: most of the voxels around it are organ, and it is not an island
    ring = ndimage.binary_dilation(lesion) & ~lesion
    assert (label[ring] == 1).mean() > 0.5
    organ_parts, _ = ndimage.label(label > 0)
    (part,) = np.unique(organ_parts[lesion])
    assert (label[organ_parts == part] == 1).sum() > 5 * lesion.sum()


@pytest.fixture(scope="module")
def domain_images():
    """Each domain's rendering of the same two cases (one rng seed each: same anatomy, bias field and noise draw),
    in the generator's intensity units (the written images are x1000)."""
    from nnunetv2_diffcl.dataset_conversion.synthetic import DOMAIN_STYLES, make_domain_case

    cases = {}
    for seed in (0, 1):
        for domain, style in enumerate(DOMAIN_STYLES):
            image, label = make_domain_case(np.random.default_rng(seed), DEFAULT_DOMAIN_SHAPE, style)
            cases[seed, domain] = image / 1000.0, label
    return cases


def _background(label: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ~ndimage.binary_dilation(label > 0, iterations=3)


def _noise_level(image: np.ndarray, label: np.ndarray) -> float:
    """Robust sd (MAD) of the image minus a smoothed copy, in the background: the high-pass part is the noise
    (the texture and bias are smooth; the median ignores the few vessel edges)."""
    from scipy import ndimage

    residual = (image - ndimage.gaussian_filter(image, 1.0))[_background(label)]
    return float(1.4826 * np.median(np.abs(residual - np.median(residual))))


def _boundary_profile(image: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    """(edge sharpness, local contrast) at the organ's boundary.

    The local contrast is the mean intensity 2-3 voxels inside the organ minus 3-4 voxels outside it. The
    sharpness is the mean derivative of the image along the boundary normal (towards the inside) over the voxels
    either side of the boundary, divided by that contrast: the slope of the step per unit step. Noise adds to the
    gradient's magnitude but not, on average, to a directional derivative, so the mean is not biased by the
    domains' different noise levels; dividing by the local contrast removes the different step heights.
    """
    from scipy import ndimage

    organ = label > 0
    inside, outside = ndimage.distance_transform_edt(organ), ndimage.distance_transform_edt(~organ)
    normal = np.gradient(ndimage.gaussian_filter(outside - inside, 1.0))  # points outwards
    length = np.sqrt(sum(n ** 2 for n in normal)) + 1e-8
    inward_slope = -sum(g * n for g, n in zip(np.gradient(image), normal)) / length
    step = image[(inside >= 2) & (inside <= 3) & (label == 1)].mean() - image[(outside >= 3) & (outside <= 4)].mean()
    boundary = (inside == 1) | (outside == 1)
    return float(inward_slope[boundary].mean() / step), float(step)


def test_domain_noise_follows_noise_sigma(domain_images):
    from nnunetv2_diffcl.dataset_conversion.synthetic import DOMAIN_STYLES

    sigmas = [style.noise_sigma for style in DOMAIN_STYLES]
    assert sigmas == sorted(sigmas) and len(set(sigmas)) == len(sigmas)
    for seed in (0, 1):
        measured = [_noise_level(*domain_images[seed, d]) for d in range(len(DOMAIN_STYLES))]
        # measured 0.032, 0.057, 0.068, 0.084 for sigma 0.03-0.09: the Rician magnitude of domain 2's dark
        # background (0.30 ** 1.6 = 0.15 at SNR ~2) is less noisy than sigma, still in order
        assert all(a < b for a, b in zip(measured, measured[1:])), measured
        assert measured[-1] > 2 * measured[0]


def test_domain_edges_soften_with_blur_sigma():
    """Measured with the bias field switched off: normalised to sd 1 over the volume, the field can change by a
    third of an sd across the 6 voxels between the shells of ``_boundary_profile``, which in domain 3 (bias 0.25,
    organ 0.72 over background 0.48 after its curve) moves the step by up to half (seed 7: 0.10 instead of 0.20)
    and the sharpness with it. Noise and blur stay as the style renders them."""
    from dataclasses import replace

    from nnunetv2_diffcl.dataset_conversion.synthetic import DOMAIN_STYLES, make_domain_case

    blurs = [style.blur_sigma for style in DOMAIN_STYLES]
    assert blurs == sorted(blurs) and len(set(blurs)) == len(blurs)
    sharpness = []
    for style in DOMAIN_STYLES:
        image, label = make_domain_case(np.random.default_rng(0), DEFAULT_DOMAIN_SHAPE,
                                        replace(style, bias_strength=0.0))
        sharpness.append(_boundary_profile(image / 1000.0, label)[0])
    # seed 0: 0.51, 0.38, 0.32, 0.29; over seeds 0-15 neighbours were always >= 0.022 apart
    assert all(a > b + 0.01 for a, b in zip(sharpness, sharpness[1:])), sharpness


def test_domain_contrast_is_ordered_as_promised(domain_images):
    """The local organ/background step, in the generator's units (image / 1000), orders the domains as
    ``DomainStyle.contrast()`` does, wherever the promised contrasts differ by more than 0.05.

    Why this statistic: a case's bias field f (smooth, sd 1 over the volume) is the same for every domain (same
    rng draws), so comparing domains on one case is a paired comparison. Near the boundary the step is about
    exp(b_d * f) * contrast_d, so for domains i, j the ratio of their steps is the promised ratio times
    exp((b_i - b_j) * f). With |f| <= 2 and the styles' b every pair promised more than 0.05 apart keeps its order
    (domains 0/1: 0.71 * e^0.2 = 0.87 < 1; 1/3: 0.74 * e^0.1 = 0.82; 2/3: 0.74; 0/3: 0.52 * e^0.3 = 0.71).
    Measured over seeds 0-15 the largest ratios were 0.88, 0.82, 0.85 and 0.73. Domains 1 and 2 are promised
    nearly equal contrast (0.319 and 0.320): measured, they must be close (at most 0.032 apart over the 16
    seeds), not ordered. Global medians of organ and background vary with where the organ lies in the bias field
    (sd 0.1-0.16 over cases), and nnU-Net's z-score normalisation divides the step by an sd that itself grows
    with the step, so neither orders the domains reliably.
    """
    from nnunetv2_diffcl.dataset_conversion.synthetic import DOMAIN_STYLES

    promised = [style.contrast() for style in DOMAIN_STYLES]
    for seed in (0, 1):
        measured = [_boundary_profile(*domain_images[seed, d])[1] for d in range(len(DOMAIN_STYLES))]
        for i in range(len(promised)):
            for j in range(len(promised)):
                if promised[i] > promised[j] + 0.05:
                    assert measured[i] > measured[j], (i, j, measured, promised)
                elif abs(promised[i] - promised[j]) <= 0.05:
                    assert abs(measured[i] - measured[j]) < 0.05, (i, j, measured, promised)


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else {}


def test_domain_shift_dataset_and_its_all_labeled_reference(tmp_path):
    from nnunetv2_diffcl.dataset_conversion.synthetic import DOMAIN_LABELS, write_domain_shift_dataset

    folders = write_domain_shift_dataset(tmp_path, 993, num_labeled=2, num_unlabeled=4, num_test=4, seed=3,
                                         shape=(8, 32, 32), all_labeled_id=994)
    main, reference = tmp_path / "Dataset993_DiffCLDomains", tmp_path / "Dataset994_DiffCLDomainsAllLabeled"
    assert folders == [str(main), str(reference)]
    split = json.loads((main / "split.json").read_text())
    assert len(split["labeled"]) == 2 and all(case.endswith("_d0") for case in split["labeled"])
    for subset in ("unlabeled", "test"):  # the domains cycle: 0, 1, 2, 3
        assert sorted(case[-1] for case in split[subset]) == ["0", "1", "2", "3"]
    main_json = json.loads((main / "dataset.json").read_text())
    assert main_json["labels"] == DOMAIN_LABELS and main_json["numTraining"] == 2
    assert len(_files(main / "labelsTr")) == 2 and len(_files(main / "imagesTu")) == 4

    training = {**_files(main / "imagesTr"), **_files(main / "imagesTu")}
    assert _files(reference / "imagesTr") == training  # the same cases, every one now a training case
    assert sorted(_files(reference / "labelsTr")) == sorted(n.replace("_0000.nii.gz", ".nii.gz") for n in training)
    assert _files(reference / "imagesTu") == {}
    assert _files(reference / "imagesTs") == _files(main / "imagesTs") and len(_files(main / "imagesTs")) == 4
    assert _files(reference / "labelsTs") == _files(main / "labelsTs")
    reference_json = json.loads((reference / "dataset.json").read_text())
    assert reference_json["numTraining"] == 6 and reference_json["numUnlabeled"] == 0
    assert json.loads((reference / "split.json").read_text())["all_labeled_reference"] is True


@pytest.mark.parametrize("existing", ["Dataset993_DiffCLDomains", "Dataset994_DiffCLDomainsAllLabeled"])
def test_domain_shift_dataset_refuses_an_existing_folder_and_writes_neither(tmp_path, existing):
    from nnunetv2_diffcl.dataset_conversion.synthetic import write_domain_shift_dataset

    (tmp_path / existing).mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        write_domain_shift_dataset(tmp_path, 993, num_labeled=1, num_unlabeled=1, num_test=1, shape=(8, 32, 32),
                                   all_labeled_id=994)
    assert [p.name for p in tmp_path.iterdir()] == [existing] and not any((tmp_path / existing).iterdir())
