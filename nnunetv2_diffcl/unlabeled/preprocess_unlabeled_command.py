"""``nnUNetv2_diffcl preprocess_unlabeled``: command-line front of unlabeled/preprocessing.py."""

from __future__ import annotations

import argparse

from nnunetv2_diffcl.unlabeled.preprocessing import preprocess_unlabeled


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", required=True, help="dataset id or name (as for nnUNetv2_plan_and_preprocess)")
    parser.add_argument("-c", nargs="+", default=["3d_fullres"], help="configurations (default: 3d_fullres)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("-np", type=int, nargs="+", default=None,
                        help="worker processes, one value or one per configuration (default: nnU-Net's "
                             "default_num_processes, i.e. nnUNet_def_n_proc or 8)")


def run(args: argparse.Namespace) -> int:
    nproc = args.np[0] if args.np is not None and len(args.np) == 1 else args.np
    outputs = preprocess_unlabeled(args.d, args.c, args.p, nproc)  # UnlabeledDataError: bad input, exit 2
    for configuration, folder in outputs.items():
        print(f"{configuration}: unlabeled data ready in {folder}")
    return 0
