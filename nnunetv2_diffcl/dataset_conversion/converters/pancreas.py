"""NIH Pancreas-CT (TCIA) to nnU-Net raw format.

Cases are identified by their 4-digit number and written as ``pancreas_XXXX``; list files may name
them in any form that ends in that number (``image0001``, ``PANCREAS_0001``, ``0001``,
``image0001_norm.h5``). Accepted inputs (searched recursively):

- NIfTI: images ``PANCREAS_XXXX.nii.gz`` or ``imageXXXX.nii.gz`` and labels ``labelXXXX.nii.gz``
  (TCIA's label release), geometry from the files;
- DICOM: one folder per case named ``PANCREAS_XXXX`` holding the series (anywhere below it), read
  with SimpleITK's ImageSeriesReader, with the ``labelXXXX.nii.gz`` files anywhere under the input;
- the h5 release: ``<case>.h5`` or ``<case>/<anything>.h5`` with ``image`` and ``label``. Spacing is
  not stored: 1.0 mm isotropic and (x, y, z) array order are assumed (settable, recorded in
  split.json). Both hold for MC-Net's ``imageXXXX_norm.h5`` release, whose notebook resamples to
  1 mm with SimpleITK and transposes the arrays to (x, y, z); CoraNet/BCP's ``XXXX.h5`` files are
  a different release with a per-case z spacing, and get a note.

Split: ``train.list``/``test.list`` (62/20 in the h5 release) found in the input folder or its
parent, or given with --train-list/--test-list or --split-file; there is no official split, so
without one the converter stops and says so.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import SimpleITK as sitk

from nnunetv2_diffcl.dataset_conversion.converters.common import (
    CaseData,
    ConverterError,
    SplitLists,
    add_common_arguments,
    add_h5_arguments,
    complete_provenance,
    digits_key,
    find_split,
    label_on_image_grid,
    load_h5_case,
    make_plan,
    run_converter,
    write_dataset,
)

LIST_NAMES = {"train": ("train.list", "train.txt"), "test": ("test.list", "test.txt")}
DEFAULT_H5_SPACING = (1.0, 1.0, 1.0)
IMAGE_PATTERN = re.compile(r"^(?:PANCREAS_|image)(\d+)\.nii(?:\.gz)?$", re.IGNORECASE)
LABEL_PATTERN = re.compile(r"^label(\d+)\.nii(?:\.gz)?$", re.IGNORECASE)
DICOM_FOLDER_PATTERN = re.compile(r"^PANCREAS_(\d+)$", re.IGNORECASE)


def case_id(name: str) -> str:
    """Output case name for any spelling of a case ('image0001' -> 'pancreas_0001')."""
    return f"pancreas_{digits_key(name)}"


def _read_dicom_series(folder: Path) -> sitk.Image:
    """The largest DICOM series below ``folder``."""
    best: list[str] = []
    for directory in sorted({folder, *(p for p in folder.rglob("*") if p.is_dir())}):
        for series in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(directory)) or ():
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), series)
            if len(files) > len(best):
                best = list(files)
    if not best:
        raise ConverterError(f"no DICOM series found below {folder}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(best)
    return reader.Execute()


def _discover(folder: Path) -> tuple[str, dict[str, Path], dict[str, Path]]:
    """(format, case -> image source, case -> label file) or an error saying what was expected."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    labels = {case_id(m.group(1)): p for p in files if (m := LABEL_PATTERN.match(p.name))}
    images = {case_id(m.group(1)): p for p in files if (m := IMAGE_PATTERN.match(p.name))}
    if images:
        return "nifti", images, labels
    dicom = {case_id(m.group(1)): p for p in sorted(folder.rglob("*"))
             if p.is_dir() and (m := DICOM_FOLDER_PATTERN.match(p.name))}
    if dicom:
        return "dicom", dicom, labels
    h5 = {}
    for p in files:
        if p.suffix == ".h5":
            name = p.stem if re.search(r"\d", p.stem) else p.parent.name
            h5[case_id(name)] = p
    if h5:
        return "h5", h5, {}
    raise ConverterError(
        f"no pancreas cases found in {folder}: expected the NIfTI release (PANCREAS_XXXX.nii.gz or "
        f"imageXXXX.nii.gz with labelXXXX.nii.gz), DICOM folders PANCREAS_XXXX/ with labelXXXX.nii.gz, "
        f"or the h5 release (<case>.h5 or <case>/*.h5 with 'image' and 'label', train.list/test.list)")


def convert(args: argparse.Namespace) -> Path:
    """Convert and return the written dataset folder."""
    folder = Path(args.input_folder)
    if not folder.is_dir():
        raise ConverterError(f"input folder {folder} does not exist")
    kind, images, labels = _discover(folder)
    lists = find_split(args, folder, LIST_NAMES)
    if lists is None:
        raise ConverterError(
            f"no train/test split for the pancreas cases in {folder}: put train.list and test.list (one "
            f"case per line, e.g. image0001) in {folder} or its parent, or pass --train-list/--test-list "
            f"or --split-file")
    lists = SplitLists({g: [case_id(c) for c in cases] for g, cases in lists.groups.items()}, lists.sources)
    plan = make_plan(lists, images, args.labeled, args.seed, args.labeled_selection,
                     source_hint=f" in {folder}")
    spacing = tuple(args.h5_spacing)
    if kind == "h5" and spacing == DEFAULT_H5_SPACING and any(p.stem.isdigit() for p in images.values()):
        print("note: h5 files named by number only (XXXX.h5) look like the CoraNet/BCP release, not MC-Net's "
              "imageXXXX_norm.h5 release: CoraNet/BCP resampled z by the in-plane spacing, so their z spacing is "
              "not 1 mm and differs per case; distances in mm will be off along z (voxel distances are not). "
              "Pass --h5-spacing X Y Z if you know it.", file=sys.stderr)

    def load(case: str, need_label: bool) -> CaseData:
        if kind == "h5":
            return load_h5_case(images[case], args.h5_axes, spacing, need_label)
        image = sitk.ReadImage(str(images[case])) if kind == "nifti" else _read_dicom_series(images[case])
        if not need_label:
            return image, None
        if case not in labels:
            raise ConverterError(f"case {case}: no label{case[-4:]}.nii.gz found in {folder}")
        return image, label_on_image_grid(sitk.ReadImage(str(labels[case])), image, case, str(labels[case]))

    provenance: dict[str, object] = {
        "source": "NIH Pancreas-CT (TCIA)", "source_format": kind, "input_folder": str(folder.resolve()),
        "lists": lists.sources, "label_mapping": "non-zero -> 1 (pancreas)",
        "case_naming": "pancreas_XXXX from the case number",
    }
    complete_provenance(provenance, kind, args, images, plan)
    return write_dataset(args, plan, load, "CT", "pancreas", provenance)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``nnUNetv2_diffcl convert_pancreas``."""
    add_common_arguments(parser, default_name="Pancreas")
    add_h5_arguments(parser, DEFAULT_H5_SPACING, "xyz", "axis order of the h5 arrays")


def run(args: argparse.Namespace) -> int:
    """CLI entry: 0 on success, 1 with a message on bad input."""
    return run_converter(convert, args)
