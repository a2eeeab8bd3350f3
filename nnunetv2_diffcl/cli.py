"""``nnUNetv2_diffcl``: the plugin's own commands, next to nnU-Net's.

Each command lives in its own module with ``configure_parser(parser)`` and ``run(args) -> int``; the
module is imported only when its command runs, so ``--help`` and ``doctor`` start fast. A command raises
:class:`~nnunetv2_diffcl.errors.UserInputError` for bad input; it is printed here, with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nnunetv2_diffcl.errors import UserInputError, error_line

COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("nnunetv2_diffcl.doctor", "check that nnU-Net finds the plugin's trainers and what runs where"),
    "preprocess_unlabeled": ("nnunetv2_diffcl.unlabeled.preprocess_unlabeled_command",
                             "preprocess imagesTu/ with the dataset's own plans"),
    "synthetic": ("nnunetv2_diffcl.dataset_conversion.synthetic_command",
                  "write the synthetic demo dataset into nnUNet_raw"),
    "demo": ("nnunetv2_diffcl.demo", "run the whole workflow on synthetic data (CPU, a few minutes)"),
    "predict_ensemble": ("nnunetv2_diffcl.ensemble",
                         "predict with Diff-CL's DS + CS ensemble (optional; nnUNetv2_predict runs CS alone)"),
    "benchmark": ("nnunetv2_diffcl.benchmark",
                  "train, predict and evaluate several trainers with one schedule; table, JSON and bar plot"),
    "self_training_round": ("nnunetv2_diffcl.self_training_command",
                            "label imagesTu with a trained model and make labeled + those scans a new, preprocessed "
                            "dataset for a further round"),
    "evaluate": ("nnunetv2_diffcl.evaluation.evaluate",
                 "Dice, Jaccard, HD95 and ASD (mm and voxels) of a prediction folder against references"),
    "convert_la": ("nnunetv2_diffcl.dataset_conversion.converters.la",
                   "left atrium (LA 2018 challenge folders or h5 release) -> nnU-Net raw, semi-supervised split"),
    "convert_pancreas": ("nnunetv2_diffcl.dataset_conversion.converters.pancreas",
                         "NIH pancreas CT (NIfTI, DICOM or h5 release) -> nnU-Net raw, semi-supervised split"),
    "convert_brats": ("nnunetv2_diffcl.dataset_conversion.converters.brats",
                      "BraTS 2019 FLAIR whole tumour (challenge folders or h5) -> nnU-Net raw, semi-supervised split"),
}


def _usage() -> str:
    lines = ["usage: nnUNetv2_diffcl COMMAND [options]   (nnUNetv2_diffcl COMMAND -h for its options)", "",
             "commands:"]
    lines += [f"  {name:<22}{help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"{_usage()}\n\nnnUNetv2_diffcl: unknown command '{argv[0]}'", file=sys.stderr)
        return 2
    module_name, help_text = COMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"nnUNetv2_diffcl {argv[0]}", description=help_text)
    module.configure_parser(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except UserInputError as e:  # bad input: its message, never a traceback
        print(error_line(argv[0], e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
