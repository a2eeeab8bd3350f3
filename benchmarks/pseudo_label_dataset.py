"""A second round of self-training on the domain-shift benchmark, from a prediction folder at hand: a raw dataset
whose training cases are the source dataset's labeled cases plus its unlabeled cases (imagesTu) labelled by a finished
model's predictions (``self_training.build_pseudo_labelled_dataset``; ``nnUNetv2_diffcl self_training_round`` does
the prediction, this and the preprocessing in one command).

    nnUNetv2_predict -i $nnUNet_raw/Dataset993_DiffCLDomains/imagesTu -o PRED -d 993 -c 2d -f all -tr DiffCLTrainer
    python benchmarks/pseudo_label_dataset.py $nnUNet_raw/Dataset993_DiffCLDomains PRED \
        $nnUNet_raw/Dataset996_DiffCLDomainsPseudo [--threshold 0.9]

then plan it with the source's plans (``nnUNetv2_extract_fingerprint``, ``nnUNetv2_move_plans_between_datasets``,
``nnUNetv2_preprocess``, ``nnUNetv2_diffcl preprocess_unlabeled``) and train on it (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunetv2_diffcl.self_training import build_pseudo_labelled_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="raw folder of the dataset with imagesTu")
    parser.add_argument("predictions", type=Path, help="nnUNetv2_predict's output folder for imagesTu")
    parser.add_argument("target", type=Path, help="raw folder to create, DatasetXXX_Name")
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="top probability under which a voxel is ignored (0: every voxel keeps its label)")
    args = parser.parse_args()
    kept = build_pseudo_labelled_dataset(args.source, args.predictions, args.target, args.threshold)
    print(f"{args.target.name}: share of pseudo-labelled voxels kept {kept:.4f}")


if __name__ == "__main__":
    main()
