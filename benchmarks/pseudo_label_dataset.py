"""A second round of self-training on the domain-shift benchmark: a raw dataset whose training cases are the source
dataset's labeled cases plus its unlabeled cases (imagesTu) labelled by a finished model's predictions, so that
nnU-Net trains a fresh network on them as if they were ground truth.

The predictions come from ``nnUNetv2_predict`` on imagesTu (``--save_probabilities`` when ``--threshold`` > 0: a
voxel whose top probability is under it gets the ignore label, which is added to dataset.json). imagesTu,
imagesTs and labelsTs are copied, so the new dataset still has unlabeled scans for the restyle and the same test
set. The folder is built beside its final name and renamed into place, so a failure leaves nothing half-written.

    nnUNetv2_predict -i $nnUNet_raw/Dataset993_DiffCLDomains/imagesTu -o PRED -d 993 -c 2d -f all -tr DiffCLTrainer
    python benchmarks/pseudo_label_dataset.py $nnUNet_raw/Dataset993_DiffCLDomains PRED \
        $nnUNet_raw/Dataset996_DiffCLDomainsPseudo [--threshold 0.9]

then plan it with the source's plans (``nnUNetv2_extract_fingerprint``, ``nnUNetv2_move_plans_between_datasets``,
``nnUNetv2_preprocess``, ``nnUNetv2_diffcl preprocess_unlabeled``) and train on it (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunetv2_diffcl.unlabeled.preprocessing import find_unlabeled_cases


def build(source: Path, predictions: Path, target: Path, threshold: float) -> float:
    """Write the dataset to ``target``; returns the share of pseudo-labelled voxels kept (not ignored)."""
    if target.exists():
        raise FileExistsError(f"{target} exists: remove it or choose another dataset id")
    dataset = json.loads((source / "dataset.json").read_text(encoding="utf-8"))
    if dataset.get("file_ending") != ".nii.gz" or len(dataset["channel_names"]) != 1:
        raise ValueError(f"{source}: this script handles one-channel .nii.gz datasets (the benchmark's)")
    channel_files = find_unlabeled_cases(str(source), dataset)  # case -> its imagesTu files, names checked
    unlabeled = sorted(channel_files)
    missing = [c for c in unlabeled if not (predictions / f"{c}.nii.gz").exists()]
    if missing:
        raise FileNotFoundError(f"{predictions} lacks the prediction of {missing[:5]}: predict imagesTu first")
    ignore = max(dataset["labels"].values()) + 1 if threshold > 0 else None
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for sub in ("imagesTu", "imagesTs", "labelsTs", "imagesTr", "labelsTr"):
        if (source / sub).is_dir():
            shutil.copytree(source / sub, partial / sub)
    kept = total = 0
    for case in unlabeled:
        for file in channel_files[case]:
            shutil.copy(file, partial / "imagesTr" / Path(file).name)
        image = sitk.ReadImage(str(predictions / f"{case}.nii.gz"))
        label = sitk.GetArrayFromImage(image).astype(np.uint8)
        if ignore is not None:
            low = np.load(predictions / f"{case}.npz")["probabilities"].max(0) < threshold
            label[low] = ignore
            kept, total = kept + int((~low).sum()), total + low.size
        out = sitk.GetImageFromArray(label)
        out.CopyInformation(image)
        sitk.WriteImage(out, str(partial / "labelsTr" / f"{case}.nii.gz"))
    if ignore is not None:
        dataset["labels"] = {**dataset["labels"], "ignore": ignore}
    dataset.update(name=target.name, numTraining=len(list((partial / "labelsTr").glob("*.nii.gz"))),
                   pseudo_labels={"from": str(predictions), "cases": unlabeled, "threshold": threshold})
    (partial / "dataset.json").write_text(json.dumps(dataset, indent=4), encoding="utf-8")
    partial.rename(target)
    return 1.0 if total == 0 else kept / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="raw folder of the dataset with imagesTu")
    parser.add_argument("predictions", type=Path, help="nnUNetv2_predict's output folder for imagesTu")
    parser.add_argument("target", type=Path, help="raw folder to create, DatasetXXX_Name")
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="top probability under which a voxel is ignored (0: every voxel keeps its label)")
    args = parser.parse_args()
    if not 0.0 <= args.threshold < 1.0:
        parser.error(f"--threshold must lie in [0, 1), got {args.threshold}")
    print(f"{args.target.name}: share of pseudo-labelled voxels kept "
          f"{build(args.source, args.predictions, args.target, args.threshold):.4f}")


if __name__ == "__main__":
    main()
