"""Shared fixtures: one tiny synthetic dataset, planned and preprocessed by nnU-Net itself once per run.

Tests that change data work on a copy (``dataset_copy``). Everything runs on the CPU with one worker
process; the real nnU-Net commands run as subprocesses of this interpreter's environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
DATASET_ID = 991
DATASET_NAME = "Dataset991_DiffCLSynthetic"
# a copy of a labeled image, placed among the unlabeled ones: its preprocessing must equal nnU-Net's
COPY_OF_LABELED = ("syn_000", "copy_of_syn_000")

# a loss term as SemiSupervisedTrainer logs it ("train terms: ...", 4 decimals); nnU-Net's Dice + CE is CE minus
# the soft Dice, so any term can be negative (cs_pseudo -0.2128 was seen in CI)
LOGGED_TERM = r"-?\d+\.\d{4}"

CPU_ENV = {
    "nnUNet_n_proc_DA": "0",
    "nnUNet_def_n_proc": "1",
    "nnUNet_compile": "false",
    "OMP_NUM_THREADS": "2",
    "nnUNet_diffcl_epochs": "2",
    "nnUNet_diffcl_iterations": "2",
    "nnUNet_diffcl_val_iterations": "1",
}


def command(name: str) -> str:
    """A console script of the environment running the tests (not whatever is first on PATH)."""
    path = BIN / name
    return str(path) if path.exists() else name


def run_captured(args: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run and capture output as UTF-8 whatever the locale (nnU-Net prints UTF-8 progress bars)."""
    return subprocess.run(args, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout, **kwargs)


def run_command(args: list[str], env: dict, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = run_captured(args, timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result


@dataclass(frozen=True)
class PlannedDataset:
    root: Path
    env: dict

    @property
    def raw(self) -> Path:
        return self.root / "raw" / DATASET_NAME

    @property
    def preprocessed(self) -> Path:
        return self.root / "preprocessed" / DATASET_NAME

    @property
    def results(self) -> Path:
        return self.root / "results" / DATASET_NAME

    def predict_test_set(self, trainer: str, env: dict) -> Path:
        """``nnUNetv2_predict`` of imagesTs with ``trainer``'s fold ``all`` (CPU, no mirroring); the output folder."""
        out = self.root / "predictions"
        run_command([command("nnUNetv2_predict"), "-i", str(self.raw / "imagesTs"), "-o", str(out), "-d",
                     str(DATASET_ID), "-c", "3d_fullres", "-f", "all", "-tr", trainer, "-device", "cpu",
                     "--disable_tta", "-npp", "0", "-nps", "0"], env)  # one process: no workers to start
        return out


def nnunet_env(root: Path) -> dict:
    env = {**os.environ, **CPU_ENV, "nnUNet_raw": str(root / "raw"),
           "nnUNet_preprocessed": str(root / "preprocessed"), "nnUNet_results": str(root / "results")}
    for folder in ("raw", "preprocessed", "results"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    return env


@pytest.fixture(scope="session")
def planned_dataset(tmp_path_factory: pytest.TempPathFactory) -> PlannedDataset:
    from nnunetv2_diffcl.dataset_conversion.synthetic import SyntheticConfig, write_synthetic_dataset

    root = tmp_path_factory.mktemp("nnunet")
    env = nnunet_env(root)
    write_synthetic_dataset(root / "raw", DATASET_ID, "DiffCLSynthetic", num_labeled=3, num_unlabeled=3, num_test=2,
                            seed=0, config=SyntheticConfig(shape=(32, 32, 32)))
    dataset = PlannedDataset(root, env)
    source, copy = COPY_OF_LABELED
    shutil.copy(dataset.raw / "imagesTr" / f"{source}_0000.nii.gz", dataset.raw / "imagesTu" / f"{copy}_0000.nii.gz")
    # nnUNet_n_proc_DA=0 makes nnU-Net's planner call torch.set_num_threads(0): leave it out here
    planning_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
    run_command([command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1",
                 "-npfp", "1"], planning_env)
    run_command([command("nnUNetv2_diffcl"), "preprocess_unlabeled", "-d", str(DATASET_ID), "-np", "1"], env)
    return dataset


@pytest.fixture
def dataset_copy(planned_dataset: PlannedDataset, tmp_path: Path) -> PlannedDataset:
    """A private copy (raw + preprocessed, no results) for tests that change or train on the data."""
    for folder in ("raw", "preprocessed"):
        shutil.copytree(planned_dataset.root / folder, tmp_path / folder)
    return replace(planned_dataset, root=tmp_path, env=nnunet_env(tmp_path))


@pytest.fixture
def in_process_env(monkeypatch: pytest.MonkeyPatch):
    """Apply a dataset's environment to this process (nnU-Net reads its paths lazily)."""

    def apply(dataset: PlannedDataset) -> PlannedDataset:
        for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", *CPU_ENV):
            monkeypatch.setenv(key, dataset.env[key])
        return dataset

    return apply
