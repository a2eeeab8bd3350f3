"""``nnUNetv2_diffcl synthetic``: write the synthetic dataset into nnUNet_raw."""

from __future__ import annotations

import argparse
import os
import sys

from nnunetv2_diffcl.datasets.synthetic import SyntheticConfig, write_synthetic_dataset


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", type=int, default=990, help="dataset id (default 990)")
    parser.add_argument("--name", default="DiffCLSynthetic")
    parser.add_argument("--labeled", type=int, default=4)
    parser.add_argument("--unlabeled", type=int, default=16)
    parser.add_argument("--test", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=[40, 40, 40], help="volume size (z y x)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", default=None, help="raw data root (default: $nnUNet_raw)")
    parser.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    raw = args.raw or os.environ.get("nnUNet_raw")
    if not raw:
        print("ERROR: nnUNet_raw is not set; set it or pass --raw FOLDER", file=sys.stderr)
        return 1
    try:
        folder = write_synthetic_dataset(raw, args.d, args.name, args.labeled, args.unlabeled, args.test, args.seed,
                                         SyntheticConfig(shape=tuple(args.shape)), overwrite=args.overwrite)
    except FileExistsError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    print(f"wrote {folder}")
    return 0
