"""Left atrium (2018 Atrial Segmentation Challenge) to nnU-Net raw format.

Accepted inputs (searched recursively under the input folder):

- the preprocessed h5 release of the UA-MT / SS-Net line of work: ``<case>/mri_norm2.h5`` with the
  datasets ``image`` and ``label``, and ``train.list`` (80 cases) / ``test.list`` (20 cases) in the
  input folder or its parent. The arrays carry no spacing: 0.625 mm isotropic is assumed (the
  challenge's resolution, which that release kept) and they are read as stored in (x, y, z) order
  (pynrrd's order, which the release's preprocessing used); both are settable and recorded in
  split.json.
- the challenge folders: ``<case>/lgemri.nrrd`` and ``<case>/laendo.nrrd`` (label 255 -> 1),
  geometry from the nrrd headers. The challenge ships no train/test split, so a split file or the
  train/test lists (e.g. those of the h5 release) are required.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import SimpleITK as sitk

from nnunetv2_diffcl.dataset_conversion.converters.common import (
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

H5_NAME = "mri_norm2.h5"
LIST_NAMES = {"train": ("train.list",), "test": ("test.list",)}
DEFAULT_H5_SPACING = (0.625, 0.625, 0.625)


def _discover(folder: Path) -> tuple[str, dict[str, Path]]:
    """('h5' | 'nrrd', case -> case folder), or an error that says what was expected."""
    h5 = {p.parent.name: p.parent for p in sorted(folder.rglob(H5_NAME))}
    if h5:
        return "h5", h5
    nrrd = {p.parent.name: p.parent for p in sorted(folder.rglob("lgemri.nrrd"))}
    if nrrd:
        return "nrrd", nrrd
    raise ConverterError(
        f"no */{H5_NAME} and no */lgemri.nrrd found in {folder}: expected the LA h5 release "
        f"(<case>/{H5_NAME} with 'image' and 'label', train.list/test.list beside or one level up) or the "
        f"2018 challenge folders (<case>/lgemri.nrrd + <case>/laendo.nrrd)")


def convert(args: argparse.Namespace) -> Path:
    """Convert and return the written dataset folder."""
    folder = Path(args.input_folder)
    if not folder.is_dir():
        raise ConverterError(f"input folder {folder} does not exist")
    kind, cases = _discover(folder)
    lists = find_split(args, folder, LIST_NAMES, generic_stems=(H5_NAME[:-3],))
    if lists is None:
        raise ConverterError(
            f"no train/test split for the LA cases in {folder}: put train.list and test.list (one case "
            f"folder name per line, e.g. from the h5 release) in {folder} or its parent, or pass "
            f"--train-list/--test-list or --split-file")
    plan = make_plan(lists, cases, args.labeled, args.seed, args.labeled_selection,
                     source_hint=f" in {folder}")
    spacing = tuple(args.h5_spacing)

    def load(case: str, need_label: bool) -> CaseData:
        if kind == "h5":
            return load_h5_case(cases[case] / H5_NAME, args.h5_axes, spacing, need_label)
        image = sitk.ReadImage(str(cases[case] / "lgemri.nrrd"))
        if not need_label:
            return image, None
        label_file = cases[case] / "laendo.nrrd"
        if not label_file.is_file():
            raise ConverterError(f"case {case}: {label_file} is missing")
        return image, label_on_image_grid(sitk.ReadImage(str(label_file)), image, case, str(label_file))

    provenance: dict[str, object] = {
        "source": "LA 2018 Atrial Segmentation Challenge",
        "source_format": "h5 release (<case>/mri_norm2.h5)" if kind == "h5" else "challenge folders (nrrd)",
        "input_folder": str(folder.resolve()), "lists": lists.sources,
        "label_mapping": "non-zero (255 in laendo.nrrd) -> 1 (left_atrium)",
    }
    complete_provenance(provenance, kind, args, cases, plan)
    return write_dataset(args, plan, load, "LGE-MRI", "left_atrium", provenance)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``nnUNetv2_diffcl convert_la``."""
    add_common_arguments(parser, default_name="LA")
    add_h5_arguments(parser, DEFAULT_H5_SPACING, "xyz", "axis order of the h5 arrays (the LA release stores x, y, z)")


def run(args: argparse.Namespace) -> int:
    """CLI entry: 0 on success, 1 with a message on bad input."""
    return run_converter(convert, args)
