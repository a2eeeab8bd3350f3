"""``nnUNetv2_diffcl self_training_round``: a finished model labels imagesTu, and the labeled cases plus those scans
become a new dataset, planned with the source's plans and preprocessed, ready for ``nnUNetv2_train``."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from nnunetv2_diffcl.errors import UserInputError
from nnunetv2_diffcl.self_training import build_pseudo_labelled_dataset

# the trainer measured for the new round (docs/benchmarks.md, "A second self-training round")
NEXT_ROUND_TRAINER = "LabeledOnlyTrainer_clutterRestyle"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", required=True, help="source dataset id or name: its labeled cases and imagesTu")
    parser.add_argument("-t", type=int, required=True, help="id of the new dataset (must not exist yet)")
    parser.add_argument("-c", default="3d_fullres", help="configuration of the model, and of the new dataset's "
                                                         "preprocessing (default: 3d_fullres)")
    parser.add_argument("-tr", default="DiffCLTrainer", help="trainer of the model that labels imagesTu")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("-f", nargs="+", default=["all"], help="folds of the model (default: all)")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name")
    parser.add_argument("--name", default=None, help="the new dataset's name after DatasetXXX_ (default: the "
                                                     "source's name + SelfTrained)")
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="top probability under which a predicted voxel gets the ignore label (default 0: every "
                             "voxel keeps its predicted label; measured worse at 0.9 on the benchmark)")
    parser.add_argument("-np", type=int, default=None, help="processes for fingerprint and preprocessing "
                                                            "(default: nnU-Net's default_num_processes)")
    parser.add_argument("-device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device of the prediction (default: cuda if available)")


def run(args: argparse.Namespace) -> int:
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, preprocess
    from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import (
        move_plans_between_datasets,
    )
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import find_candidate_datasets, maybe_convert_to_dataset_name

    from nnunetv2_diffcl.ensemble import trained_model_folder
    from nnunetv2_diffcl.unlabeled.preprocessing import preprocess_unlabeled

    if not 1 <= args.t <= 999:
        raise UserInputError(f"-t {args.t}: nnU-Net dataset ids lie in 1..999")
    if not 0.0 <= args.threshold < 1.0:
        raise UserInputError(f"--threshold {args.threshold}: give a probability in [0, 1)")
    taken = find_candidate_datasets(args.t)  # in nnUNet_raw, nnUNet_preprocessed or nnUNet_results
    if len(taken):
        raise UserInputError(f"-t {args.t}: dataset id taken ({', '.join(taken)}): choose a free id")
    try:
        source = maybe_convert_to_dataset_name(args.d)
    except RuntimeError as e:
        raise UserInputError(f"-d {args.d}: {e}") from e
    name = args.name or f"{source.split('_', 1)[1]}SelfTrained"
    if not name or "/" in name or name.startswith("."):
        raise UserInputError(f"--name {args.name!r}: give a plain folder name (DatasetXXX_ is added)")
    target = f"Dataset{args.t:03d}_{name}"
    model, folds = trained_model_folder(args)
    source_raw, target_raw = Path(nnUNet_raw) / source, Path(nnUNet_raw) / target
    target_preprocessed = Path(nnUNet_preprocessed) / target
    num_processes = args.np or default_num_processes

    device = torch.device(args.device)
    predictor = nnUNetPredictor(device=device, perform_everything_on_device=device.type == "cuda", allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model, folds, args.chk)
    with tempfile.TemporaryDirectory(dir=nnUNet_raw, prefix=f".{target}.predictions.") as predictions:
        print(f"{args.tr} ({args.c}, folds {args.f}) labels {source_raw / 'imagesTu'}")
        predictor.predict_from_files_sequential(str(source_raw / "imagesTu"), predictions,
                                                save_probabilities=args.threshold > 0, overwrite=True)
        kept = build_pseudo_labelled_dataset(source_raw, Path(predictions), target_raw, args.threshold)
    print(f"{target_raw}: labeled cases + imagesTu with {args.tr}'s labels"
          + (f" ({kept:.1%} of their voxels kept, the rest ignored)" if args.threshold > 0 else ""))
    try:
        extract_fingerprints([args.t], num_processes=num_processes, verbose=False, show_progress_bar=False)
        move_plans_between_datasets(source, target, args.p, args.p)
        shutil.copy(target_raw / "dataset.json", target_preprocessed / "dataset.json")
        preprocess([args.t], args.p, [args.c], [num_processes], show_progress_bar=False)
        preprocess_unlabeled(args.t, [args.c], args.p, num_processes)
    except BaseException:  # nothing half-made stays behind: the new dataset is built whole or not at all
        shutil.rmtree(target_preprocessed, ignore_errors=True)
        shutil.rmtree(target_raw, ignore_errors=True)
        raise
    print(f"{target}: planned with {source}'s {args.p} and preprocessed ({args.c}). Train the next round with\n"
          f"  nnUNetv2_train {args.t} {args.c} all -tr {NEXT_ROUND_TRAINER}")
    return 0
