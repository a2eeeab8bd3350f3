"""BraTS 2019 (FLAIR, whole tumour) to nnU-Net raw format.

Accepted inputs (searched recursively, so HGG/ and LGG/ subfolders are fine):

- the challenge folders: ``<case>/<case>_flair.nii.gz`` and ``<case>/<case>_seg.nii.gz``; only FLAIR
  is used and the whole tumour (seg > 0) becomes label 1; geometry from the files;
- the h5 release (SSL4MIS and followers): ``<case>.h5`` (often in ``data/``) with ``image`` (FLAIR)
  and ``label``. It was made from SimpleITK arrays, so the stored order is taken as (z, y, x) and
  the spacing as BraTS' 1 mm isotropic (both settable, recorded in split.json).

Split: ``train.txt`` / ``val.txt`` / ``test.txt`` (250 / 25 / 60 in the h5 release) in the input
folder or its parent, or --train-list/--val-list/--test-list, or --split-file. The validation list
is optional.

Validation cases: nnU-Net trains the benchmark with fold ``all`` and selects no checkpoint, so they
have no role in training. The default (``--validation skip``) leaves them out, keeping the
unlabeled pool exactly the 250 - N training cases the literature uses; they are listed in
split.json under ``validation``. ``--validation unlabeled`` adds their images to imagesTu and
``--validation test`` adds them (with labels) to imagesTs/labelsTs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import SimpleITK as sitk

from nnunetv2_diffcl.dataset_conversion.converters.common import (
    VALIDATION_PLACEMENTS,
    CaseData,
    ConverterError,
    add_common_arguments,
    add_h5_arguments,
    complete_provenance,
    find_split,
    label_on_image_grid,
    load_h5_case,
    make_plan,
    run_converter,
    write_dataset,
)

LIST_NAMES = {"train": ("train.txt", "train.list"), "val": ("val.txt", "val.list"),
              "test": ("test.txt", "test.list")}
DEFAULT_H5_SPACING = (1.0, 1.0, 1.0)


def _discover(folder: Path) -> tuple[str, dict[str, Path]]:
    """('nifti' | 'h5', case -> FLAIR file or h5 file), or an error saying what was expected."""
    flair = {p.name[: -len("_flair.nii.gz")]: p for p in sorted(folder.rglob("*_flair.nii.gz"))}
    if flair:
        return "nifti", flair
    h5 = {p.stem: p for p in sorted(folder.rglob("*.h5"))}
    if h5:
        return "h5", h5
    raise ConverterError(
        f"no */*_flair.nii.gz and no *.h5 found in {folder}: expected the BraTS 2019 challenge folders "
        f"(<case>/<case>_flair.nii.gz + <case>_seg.nii.gz) or the h5 release (<case>.h5 with 'image' and "
        f"'label', train.txt/val.txt/test.txt)")


def convert(args: argparse.Namespace) -> Path:
    """Convert and return the written dataset folder."""
    folder = Path(args.input_folder)
    if not folder.is_dir():
        raise ConverterError(f"input folder {folder} does not exist")
    kind, cases = _discover(folder)
    lists = find_split(args, folder, LIST_NAMES)
    if lists is None:
        raise ConverterError(
            f"no split for the BraTS cases in {folder}: put train.txt and test.txt (and optionally val.txt; "
            f"one case per line) in {folder} or its parent, or pass --train-list/--test-list "
            f"(--val-list) or --split-file")
    plan = make_plan(lists, cases, args.labeled, args.seed, args.labeled_selection, args.validation,
                     source_hint=f" in {folder}")
    spacing = tuple(args.h5_spacing)

    def load(case: str, need_label: bool) -> CaseData:
        if kind == "h5":
            return load_h5_case(cases[case], args.h5_axes, spacing, need_label)
        image = sitk.ReadImage(str(cases[case]))
        if not need_label:
            return image, None
        seg = cases[case].with_name(f"{case}_seg.nii.gz")
        if not seg.is_file():
            raise ConverterError(f"case {case}: {seg} is missing")
        return image, label_on_image_grid(sitk.ReadImage(str(seg)), image, case, str(seg))

    provenance: dict[str, object] = {
        "source": "BraTS 2019", "source_format": kind, "input_folder": str(folder.resolve()),
        "lists": lists.sources, "modality": "FLAIR only",
        "label_mapping": "whole tumour: any label > 0 -> 1",
    }
    complete_provenance(provenance, kind, args, cases, plan)
    return write_dataset(args, plan, load, "FLAIR", "whole_tumor", provenance)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``nnUNetv2_diffcl convert_brats``."""
    add_common_arguments(parser, default_name="BraTS2019")
    parser.add_argument("--val-list", default=None, help="text file, one validation case per line")
    parser.add_argument("--validation", choices=VALIDATION_PLACEMENTS, default="skip",
                        help="where the validation cases go: skip (default, listed in split.json only), "
                             "unlabeled (imagesTu) or test (imagesTs + labelsTs)")
    add_h5_arguments(parser, DEFAULT_H5_SPACING, "zyx",
                     "axis order of the h5 arrays (the SSL4MIS release stores z, y, x)")


def run(args: argparse.Namespace) -> int:
    """CLI entry: 0 on success, 1 with a message on bad input."""
    return run_converter(convert, args)
