"""A further self-training round: the dataset built from a model's predictions of imagesTu, the command that makes
it ready to train, which cases are pseudo-labelled, and the ground-truth share of the draws."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

from nnunetv2_diffcl.errors import UserInputError
from nnunetv2_diffcl.self_training import build_pseudo_labelled_dataset, ground_truth_weighted, pseudo_labelled_cases
from nnunetv2_diffcl.self_training_command import NEXT_ROUND_TRAINER
from nnunetv2_diffcl.trainers import labeled_only
from tests.conftest import DATASET_ID, command, run_command
from tests.trainers.test_dynamics import unbuilt

TRUTH = [f"case_{i:03d}" for i in range(4)]
PSEUDO = [f"unl_{i:03d}" for i in range(48)]


@pytest.mark.parametrize("share, copies", [
    (0.25, 4),  # 0.25 x 48 / (0.75 x 4) = 4 copies: 16 of 64 draws
    (0.5, 12),  # 0.5 x 48 / (0.5 x 4) = 12: 48 of 96
    (0.05, 1),  # the truth already has 4 / 52 = 0.077: unchanged
])
def test_ground_truth_weighted_repeats_the_truth(share, copies):
    weighted, got = ground_truth_weighted(TRUTH + PSEUDO, set(PSEUDO), share)
    assert all(weighted.count(c) == copies for c in TRUTH) and all(weighted.count(c) == 1 for c in PSEUDO)
    assert got == pytest.approx(4 * copies / (4 * copies + 48))
    assert weighted == sorted(weighted)  # nnU-Net's datasets keep their identifiers sorted


def test_uniform_draw_from_the_weighted_list_gives_the_share():
    weighted, got = ground_truth_weighted(TRUTH + PSEUDO, set(PSEUDO), 0.25)
    draws = np.random.default_rng(0).choice(weighted, 20000)
    assert np.isin(draws, TRUTH).mean() == pytest.approx(got, abs=0.01)


@pytest.mark.parametrize("pseudo", [set(), set(TRUTH + PSEUDO)])
def test_nothing_to_weigh_leaves_the_list(pseudo):
    weighted, _ = ground_truth_weighted(TRUTH + PSEUDO, pseudo, 0.5)
    assert weighted == TRUTH + PSEUDO


def test_pseudo_labelled_cases_from_dataset_json():
    assert pseudo_labelled_cases({"labels": {}}) == set()
    assert pseudo_labelled_cases({"pseudo_labels": {"cases": ["a", "b"], "threshold": 0}}) == {"a", "b"}
    with pytest.raises(ValueError, match="'pseudo_labels' must be"):
        pseudo_labelled_cases({"pseudo_labels": ["a"]})


def test_trainer_draws_the_ground_truth_share(dataset_copy, in_process_env):
    in_process_env(dataset_copy)
    trainer = unbuilt(dataset_copy, labeled_only.LabeledOnlyTrainer_clutterGroundTruth)
    trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    plain, _ = trainer.get_tr_and_val_datasets()  # no pseudo-labelled case listed: nnU-Net's list
    cases = sorted(set(plain.identifiers))
    assert plain.identifiers == cases
    trainer.dataset_json["pseudo_labels"] = {"cases": cases[1:]}
    train, val = trainer.get_tr_and_val_datasets()
    copies = max(1, round(0.25 * (len(cases) - 1) / 0.75))
    assert train.identifiers.count(cases[0]) == copies and val.identifiers == cases
    assert "Ground-truth share of the training draws" in open(trainer.log_file).read()


@pytest.mark.parametrize("value", [0.0, 1.0, 1.5])
def test_bad_ground_truth_share_is_refused(dataset_copy, in_process_env, value):
    in_process_env(dataset_copy)
    bad = type("Bad", (labeled_only.LabeledOnlyTrainer_clutterRestyle,), {"ground_truth_share": value})
    with pytest.raises(ValueError, match="ground_truth_share must lie strictly between 0 and 1"):
        unbuilt(dataset_copy, bad)


# ------------------------------------------------------------------------------------ the dataset from predictions
def fake_predictions(raw: Path, out: Path, low_voxels: int) -> list[str]:
    """A "prediction" per imagesTu case: label 1 on the first z-slice, else 0, in the scan's geometry; with
    probabilities whose top value is 0.6 on the first ``low_voxels`` voxels (C order) and 0.95 elsewhere."""
    out.mkdir()
    cases = sorted(f.name[: -len("_0000.nii.gz")] for f in (raw / "imagesTu").glob("*_0000.nii.gz"))
    for case in cases:
        image = sitk.ReadImage(str(raw / "imagesTu" / f"{case}_0000.nii.gz"))
        label = np.zeros(sitk.GetArrayFromImage(image).shape, dtype=np.uint8)
        label[0] = 1
        written = sitk.GetImageFromArray(label)
        written.CopyInformation(image)
        sitk.WriteImage(written, str(out / f"{case}.nii.gz"))
        top = np.full(label.size, 0.95, dtype=np.float32)
        top[:low_voxels] = 0.6
        np.savez_compressed(out / f"{case}.npz", probabilities=np.stack([top, 1 - top]).reshape(2, *label.shape))
    return cases


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_pseudo_labelled_dataset_from_predictions(dataset_copy, tmp_path):
    cases = fake_predictions(dataset_copy.raw, tmp_path / "pred", low_voxels=100)
    target = tmp_path / "Dataset992_Round2"
    assert build_pseudo_labelled_dataset(dataset_copy.raw, tmp_path / "pred", target) == 1.0
    dataset = json.loads((target / "dataset.json").read_text())
    labeled = sorted(f.name for f in (dataset_copy.raw / "labelsTr").iterdir())
    assert dataset["numTraining"] == len(labeled) + len(cases) and dataset["name"] == target.name
    assert dataset["pseudo_labels"]["cases"] == cases and pseudo_labelled_cases(dataset) == set(cases)
    assert "ignore" not in dataset["labels"]
    for case in cases:  # the prediction is the label, the scan is a training image, and still an unlabeled one
        assert np.array_equal(read(target / "labelsTr" / f"{case}.nii.gz"), read(tmp_path / "pred" / f"{case}.nii.gz"))
        assert all((target / sub / f"{case}_0000.nii.gz").exists() for sub in ("imagesTr", "imagesTu"))
    for name in labeled:  # ground truth untouched
        assert np.array_equal(read(target / "labelsTr" / name), read(dataset_copy.raw / "labelsTr" / name))
    assert not target.with_name(target.name + ".partial").exists()
    with pytest.raises(UserInputError, match="exists: remove it or choose another dataset id"):
        build_pseudo_labelled_dataset(dataset_copy.raw, tmp_path / "pred", target)


def test_uncertain_voxels_get_the_ignore_label(dataset_copy, tmp_path):
    cases = fake_predictions(dataset_copy.raw, tmp_path / "pred", low_voxels=100)
    target = tmp_path / "Dataset992_Round2"
    kept = build_pseudo_labelled_dataset(dataset_copy.raw, tmp_path / "pred", target, threshold=0.9)
    labels = json.loads((target / "dataset.json").read_text())["labels"]
    ignore = max(json.loads((dataset_copy.raw / "dataset.json").read_text())["labels"].values()) + 1
    assert labels["ignore"] == ignore
    label = read(target / "labelsTr" / f"{cases[0]}.nii.gz")
    assert (label.ravel()[:100] == ignore).all() and (label.ravel()[100:] != ignore).all()
    assert kept == pytest.approx(1 - 100 / label.size)  # the same 100 voxels in every case


def test_a_failed_build_leaves_nothing(dataset_copy, tmp_path):
    cases = fake_predictions(dataset_copy.raw, tmp_path / "pred", low_voxels=0)
    np.savez_compressed(tmp_path / "pred" / f"{cases[-1]}.npz", probabilities=np.ones((2, 3, 3, 3)))
    target = tmp_path / "Dataset992_Round2"
    with pytest.raises(UserInputError, match="predict again with --save_probabilities"):
        build_pseudo_labelled_dataset(dataset_copy.raw, tmp_path / "pred", target, threshold=0.5)
    assert not target.exists() and not target.with_name(target.name + ".partial").exists()
    os.remove(tmp_path / "pred" / f"{cases[0]}.nii.gz")
    with pytest.raises(UserInputError, match=f"lacks the prediction of \\['{cases[0]}'\\]"):
        build_pseudo_labelled_dataset(dataset_copy.raw, tmp_path / "pred", target)


# ------------------------------------------------------------------------------------------------ the command
def test_self_training_round_command(dataset_copy):
    """Train a model, label imagesTu with it, and get a planned, preprocessed dataset; a taken id is refused."""
    env = {**dataset_copy.env, "nnUNet_diffcl_epochs": "1"}
    run_command([command("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "all", "-tr", "LabeledOnlyTrainer",
                 "-device", "cpu"], env)
    round_cmd = [command("nnUNetv2_diffcl"), "self_training_round", "-d", str(DATASET_ID), "-t", "992", "-c",
                 "3d_fullres", "-tr", "LabeledOnlyTrainer", "-np", "1", "-device", "cpu"]
    done = run_command(round_cmd, env)
    assert f"nnUNetv2_train 992 3d_fullres all -tr {NEXT_ROUND_TRAINER}" in done.stdout
    name = "Dataset992_DiffCLSyntheticSelfTrained"
    raw, preprocessed = dataset_copy.root / "raw", dataset_copy.root / "preprocessed"
    dataset = json.loads((preprocessed / name / "dataset.json").read_text())
    unlabeled = sorted(f.name[: -len("_0000.nii.gz")] for f in (dataset_copy.raw / "imagesTu").iterdir())
    assert dataset["pseudo_labels"]["cases"] == unlabeled
    for case in unlabeled:
        label = read(raw / name / "labelsTr" / f"{case}.nii.gz")
        assert label.shape == read(dataset_copy.raw / "imagesTu" / f"{case}_0000.nii.gz").shape
        assert set(np.unique(label)) <= {0, 1}
    source_plans = json.loads((dataset_copy.preprocessed / "nnUNetPlans.json").read_text())
    plans = json.loads((preprocessed / name / "nnUNetPlans.json").read_text())
    assert plans["dataset_name"] == name and plans["configurations"] == source_plans["configurations"]
    identifiers = set(infer_dataset_class(str(preprocessed / name / "nnUNetPlans_3d_fullres")).get_identifiers(
        str(preprocessed / name / "nnUNetPlans_3d_fullres")))
    assert set(unlabeled) <= identifiers and len(identifiers) == dataset["numTraining"]
    assert (preprocessed / name / "nnUNetPlans_3d_fullres_unlabeled").is_dir()
    assert [f for f in os.listdir(raw) if f.startswith(".")] == []  # the predictions' temporary folder is gone
    taken = run_command(round_cmd, env, check=False)
    assert taken.returncode == 2 and "dataset id taken" in taken.stderr


@pytest.mark.parametrize("arguments, message", [
    (["-t", "992", "--threshold", "1.5"], r"--threshold 1.5: give a probability in \[0, 1\)"),
    (["-t", "1000"], "nnU-Net dataset ids lie in 1..999"),
    (["-t", "992", "-tr", "CPSTrainer"], "checkpoint_final.pth not found: train the model first"),
])
def test_self_training_round_refuses_bad_input(dataset_copy, arguments, message):
    done = run_command([command("nnUNetv2_diffcl"), "self_training_round", "-d", str(DATASET_ID), "-c",
                        "3d_fullres", *arguments], dataset_copy.env, check=False)
    assert done.returncode == 2 and re.search(message, done.stderr), done.stderr
