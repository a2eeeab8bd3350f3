"""Write datasets in nnU-Net's raw format, extended by the plugin's unlabeled and test folders.

One writer serves the synthetic demo data and every benchmark converter, so they all produce the
same layout:

- labeled training cases: ``imagesTr/`` + ``labelsTr/`` (what nnU-Net plans and trains on),
- unlabeled training cases: ``imagesTu/`` (images only, named like imagesTr),
- test cases: ``imagesTs/`` with their labels kept apart in ``labelsTs/`` for evaluation,
- ``dataset.json`` (``numTraining`` counts the labeled cases only) and ``split.json`` (the case
  lists, the seed and where the data came from).

The dataset is written into a hidden sibling folder and renamed into place by ``finish``, so an
interrupted conversion never leaves a half-written dataset that nnU-Net would pick up.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

from nnunetv2_diffcl.errors import UserInputError

SUBSET_FOLDERS: dict[str, tuple[str, str | None]] = {
    "labeled": ("imagesTr", "labelsTr"),
    "unlabeled": ("imagesTu", None),
    "test": ("imagesTs", "labelsTs"),
}
SPLIT_FILE = "split.json"


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name for a dataset: ``Dataset{ID:03d}_{name}``."""
    if not 0 < dataset_id < 1000:
        raise UserInputError(f"dataset id {dataset_id}: nnU-Net dataset ids are 1..999")
    if not name or "/" in name or " " in name:
        raise UserInputError(f"dataset name {name!r}: give a non-empty name without '/' or spaces")
    return f"Dataset{dataset_id:03d}_{name}"


def _to_image(array_or_image: np.ndarray | sitk.Image, spacing: Sequence[float] | None,
              reference: sitk.Image | None) -> sitk.Image:
    """Arrays are in SimpleITK's array order (z, y, x) and so is ``spacing``."""
    if isinstance(array_or_image, sitk.Image):
        return array_or_image
    array = np.asarray(array_or_image)
    if array.ndim not in (2, 3):
        raise ValueError(f"expected a 2D or 3D array, got shape {array.shape}")
    image = sitk.GetImageFromArray(array)
    if reference is not None:
        image.CopyInformation(reference)
    elif spacing is not None:
        if len(spacing) != array.ndim:
            raise ValueError(f"spacing {spacing} does not match array shape {array.shape}")
        image.SetSpacing([float(s) for s in reversed(spacing)])
    return image


class RawDatasetWriter:
    """Collects cases into ``nnUNet_raw/DatasetXXX_Name`` with labeled, unlabeled and test subsets."""

    def __init__(self, raw_root: str | os.PathLike, dataset_id: int, name: str,
                 channel_names: dict[int, str], labels: dict[str, int], file_ending: str = ".nii.gz",
                 overwrite: bool = False) -> None:
        self.folder = Path(raw_root) / dataset_folder_name(dataset_id, name)
        if self.folder.exists() and not overwrite:
            raise FileExistsError(
                f"{self.folder} already exists. Remove it, choose another dataset id, or pass "
                f"overwrite=True (--overwrite on the command line) to replace it.")
        self.channel_names = {int(k): v for k, v in channel_names.items()}
        self.labels = dict(labels)
        self.file_ending = file_ending
        self.overwrite = overwrite
        self.cases: dict[str, list[str]] = {subset: [] for subset in SUBSET_FOLDERS}
        self._staging = self.folder.parent / f".{self.folder.name}.partial"
        if self._staging.exists():
            shutil.rmtree(self._staging)
        for image_dir, label_dir in SUBSET_FOLDERS.values():
            (self._staging / image_dir).mkdir(parents=True)
            if label_dir is not None:
                (self._staging / label_dir).mkdir()

    def add_case(self, subset: str, case_id: str, images: Sequence[np.ndarray | sitk.Image],
                 label: np.ndarray | sitk.Image | None = None,
                 spacing: Sequence[float] | None = None) -> None:
        """Write one case. ``images`` holds one entry per channel; test and labeled cases need a label."""
        if subset not in SUBSET_FOLDERS:
            raise ValueError(f"subset must be one of {list(SUBSET_FOLDERS)}, got {subset!r}")
        if len(images) != len(self.channel_names):
            raise ValueError(f"case {case_id}: {len(images)} channels given, dataset has {len(self.channel_names)}")
        if any(case_id in ids for ids in self.cases.values()):
            raise ValueError(f"case {case_id} was added twice")
        image_dir, label_dir = SUBSET_FOLDERS[subset]
        if label_dir is None and label is not None:
            raise ValueError(f"case {case_id}: unlabeled cases carry no label")
        if subset == "labeled" and label is None:
            raise ValueError(f"case {case_id}: a labeled case needs a label")
        first = _to_image(images[0], spacing, None)
        for channel, image in enumerate(images):
            image = first if channel == 0 else _to_image(image, spacing, first)
            sitk.WriteImage(image, str(self._staging / image_dir / f"{case_id}_{channel:04d}{self.file_ending}"),
                            True)
        if label is not None:
            seg = _to_image(label, spacing, first)
            if label_dir is not None:
                sitk.WriteImage(sitk.Cast(seg, sitk.sitkUInt8),
                                str(self._staging / label_dir / f"{case_id}{self.file_ending}"), True)
        self.cases[subset].append(case_id)

    def finish(self, seed: int | None = None, license: str = "see the source's terms", **provenance: object) -> Path:
        """Write dataset.json and split.json, then move the finished dataset into place."""
        if not self.cases["labeled"]:
            raise ValueError(f"{self.folder.name}: no labeled case was added; nnU-Net needs at least one")
        generate_dataset_json(str(self._staging), dict(self.channel_names), dict(self.labels),
                              num_training_cases=len(self.cases["labeled"]), file_ending=self.file_ending,
                              dataset_name=self.folder.name, license=license,
                              converted_by="nnunetv2-diffcl", **{"numUnlabeled": len(self.cases["unlabeled"]),
                                                                 "numTest": len(self.cases["test"])})
        split = {"labeled": sorted(self.cases["labeled"]), "unlabeled": sorted(self.cases["unlabeled"]),
                 "test": sorted(self.cases["test"]), "seed": seed, **provenance}
        (self._staging / SPLIT_FILE).write_text(json.dumps(split, indent=2, default=str))
        if self.folder.exists():
            shutil.rmtree(self.folder)
        os.replace(self._staging, self.folder)
        return self.folder

    def abort(self) -> None:
        """Remove what was written so far (the target folder is left untouched)."""
        shutil.rmtree(self._staging, ignore_errors=True)

    def __enter__(self) -> RawDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
