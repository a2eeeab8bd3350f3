"""``nnUNetv2_diffcl synthetic``: write the synthetic dataset (or the domain-shift benchmark) into nnUNet_raw."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from nnunetv2_diffcl.dataset_conversion.synthetic import (
    SyntheticConfig,
    write_domain_shift_dataset,
    write_synthetic_dataset,
)
from nnunetv2_diffcl.errors import UserInputError

# (dataset id, name, labeled, unlabeled, test, shape) when the user gives none: the demo's single-domain set, or the
# domain-shift benchmark (ids apart, so that both can sit in one nnUNet_raw: nnU-Net refuses two folders of one id)
PLAIN_DEFAULTS = (990, "DiffCLSynthetic", 4, 16, 6, (40, 40, 40))
DOMAIN_DEFAULTS = (993, "DiffCLDomains", 4, 48, 24, (16, 64, 64))


@dataclass(frozen=True)
class SyntheticOptions:
    """The command's options with every default resolved (they depend on ``--domains``)."""

    domains: bool
    dataset_id: int
    name: str
    labeled: int
    unlabeled: int
    test: int
    shape: tuple[int, int, int]
    seed: int
    all_labeled_id: int | None
    overwrite: bool


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", type=int, default=None, help="dataset id (default 990; 993 with --domains)")
    parser.add_argument("--name", default=None, help="dataset name (default DiffCLSynthetic; DiffCLDomains with "
                                                     "--domains)")
    parser.add_argument("--labeled", type=int, default=None, help="labeled training cases (default 4)")
    parser.add_argument("--unlabeled", type=int, default=None,
                        help="unlabeled training cases (default 16; 48 with --domains)")
    parser.add_argument("--test", type=int, default=None, help="test cases (default 6; 24 with --domains)")
    parser.add_argument("--shape", type=int, nargs=3, default=None,
                        help="volume size (z y x; default 40 40 40; 16 64 64 with --domains)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", default=None, help="raw data root (default: $nnUNet_raw)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--domains", action="store_true",
                        help="write the domain-shift benchmark instead: organ + small lesion, labeled cases from "
                             "domain 0 only, unlabeled and test cases from 4 scanner-like domains")
    parser.add_argument("--all-labeled-id", type=int, default=None, metavar="ID",
                        help="with --domains: also write dataset ID, NAMEAllLabeled, with the same cases and every "
                             "training case labeled (the upper reference for `benchmark --reference`)")


def resolve_options(args: argparse.Namespace) -> SyntheticOptions:
    """Fill in the defaults of the chosen mode and check the input; raises :class:`UserInputError`."""
    dataset_id, name, labeled, unlabeled, test, shape = DOMAIN_DEFAULTS if args.domains else PLAIN_DEFAULTS
    options = SyntheticOptions(
        domains=args.domains, dataset_id=dataset_id if args.d is None else args.d,
        name=name if args.name is None else args.name, labeled=labeled if args.labeled is None else args.labeled,
        unlabeled=unlabeled if args.unlabeled is None else args.unlabeled,
        test=test if args.test is None else args.test, shape=shape if args.shape is None else tuple(args.shape),
        seed=args.seed, all_labeled_id=args.all_labeled_id, overwrite=args.overwrite)
    if options.all_labeled_id is not None and not options.domains:
        raise UserInputError(f"--all-labeled-id {options.all_labeled_id} needs --domains (the all-labeled reference "
                             f"belongs to the domain-shift benchmark); add --domains or leave --all-labeled-id out")
    for option, value in (("-d", options.dataset_id), ("--all-labeled-id", options.all_labeled_id)):
        if value is not None and not 0 < value < 1000:
            raise UserInputError(f"{option} {value}: nnU-Net dataset ids are 1 to 999; choose one in that range")
    if options.all_labeled_id is not None and options.all_labeled_id == options.dataset_id:
        raise UserInputError(f"--all-labeled-id {options.all_labeled_id} equals -d {options.dataset_id}: the "
                             f"all-labeled reference needs a dataset id of its own; give another --all-labeled-id "
                             f"(e.g. {options.dataset_id % 999 + 1})")
    if not options.name or "/" in options.name or " " in options.name:
        raise UserInputError(f"--name {options.name!r}: a dataset name must be non-empty, without '/' or spaces")
    for option, value in (("--labeled", options.labeled), ("--unlabeled", options.unlabeled),
                          ("--test", options.test)):
        if value < 0:
            raise UserInputError(f"{option} {value}: a number of cases cannot be negative; give 0 or more")
    if options.labeled < 1:
        raise UserInputError(f"--labeled {options.labeled}: nnU-Net plans and trains on the labeled cases; give at "
                             f"least 1")
    if min(options.shape) < 1:
        raise UserInputError(f"--shape {' '.join(map(str, options.shape))}: every size must be at least 1 voxel")
    return options


def run(args: argparse.Namespace) -> int:
    options = resolve_options(args)  # UserInputError before anything is written
    raw = args.raw or os.environ.get("nnUNet_raw")
    if not raw:
        raise UserInputError("nnUNet_raw is not set; set it or pass --raw FOLDER")
    try:
        if options.domains:
            folders = write_domain_shift_dataset(
                raw, options.dataset_id, options.name, options.labeled, options.unlabeled, options.test,
                options.seed, options.shape, all_labeled_id=options.all_labeled_id, overwrite=options.overwrite)
        else:
            folders = [write_synthetic_dataset(raw, options.dataset_id, options.name, options.labeled,
                                               options.unlabeled, options.test, options.seed,
                                               SyntheticConfig(shape=options.shape), overwrite=options.overwrite)]
    except FileExistsError as e:
        raise UserInputError(str(e)) from None
    for folder in folders:
        print(f"wrote {folder}")
    return 0
