"""What every benchmark converter shares: arguments, split files, labeled-case selection, writing.

A converter only has to find the cases of its release and say how to load one; the split rules
(standard train/test lists, N labeled cases drawn reproducibly from the training list, the rest of
the training list unlabeled, the test list with its labels kept in labelsTs) live here, so the LA,
pancreas and BraTS protocols cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import h5py
import numpy as np
import SimpleITK as sitk

from nnunetv2_diffcl.dataset_conversion.raw_layout import RawDatasetWriter
from nnunetv2_diffcl.errors import UserInputError

# One case: (image, label or None). Labels are binarised by the converter before they get here.
CaseData = tuple[sitk.Image, sitk.Image | None]
VALIDATION_PLACEMENTS = ("skip", "unlabeled", "test")
GEOMETRY_TOLERANCE = 1e-3


class ConverterError(UserInputError):
    """A problem with the input the user has to fix; ``nnUNetv2_diffcl`` prints it and exits with 2."""


def add_common_arguments(parser: argparse.ArgumentParser, default_name: str, default_seed: int = 0) -> None:
    """Arguments every converter takes."""
    parser.add_argument("input_folder", help="folder holding the release as distributed")
    parser.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (1..999)")
    parser.add_argument("--labeled", type=int, required=True,
                        help="number of labeled training cases (the rest of the training list is unlabeled)")
    parser.add_argument("--seed", type=int, default=default_seed, help="seed for choosing the labeled cases")
    parser.add_argument("--labeled-selection", choices=("random", "first"), default="random",
                        help="'random': seeded draw from the sorted training list; 'first': the first N "
                             "entries of the training list in file order (what UA-MT/SS-Net/BCP code does)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    parser.add_argument("-o", "--raw-root", default=None,
                        help="nnU-Net raw folder to write into (default: $nnUNet_raw)")
    parser.add_argument("--name", default=default_name, help=f"dataset name (default {default_name})")
    parser.add_argument("--split-file", default=None,
                        help="JSON file with case lists {'train': [...], 'test': [...]} (BraTS also 'val')")
    parser.add_argument("--train-list", default=None, help="text file, one training case per line")
    parser.add_argument("--test-list", default=None, help="text file, one test case per line")


def resolve_raw_root(value: str | None) -> Path:
    """The output root: the argument, else $nnUNet_raw, else a clear error."""
    root = value or os.environ.get("nnUNet_raw")
    if not root:
        raise ConverterError(
            "no output folder: pass -o/--raw-root or set the nnUNet_raw environment variable")
    return Path(root)


def list_entry_name(entry: str, generic_stems: Iterable[str] = ()) -> str:
    """The case name in one line of a list file.

    Lines may carry extra comma-separated columns, a path, or a file name (``case.h5``,
    ``case/mri_norm2.h5``); a generic file stem is replaced by its parent folder's name.
    """
    text = entry.strip().split(",")[0].strip().replace("\\", "/").rstrip("/")
    path = PurePosixPath(text)
    name = path.name
    for suffix in (".nii.gz", ".nii", ".h5", ".nrrd"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            if name in set(generic_stems) and path.parent.name:
                name = path.parent.name
            break
    return name


def read_case_list(file: str | os.PathLike, generic_stems: Iterable[str] = ()) -> list[str]:
    """Case names of a list file in file order (blank lines and '#' comments skipped)."""
    lines = Path(file).read_text().splitlines()
    return [list_entry_name(line, generic_stems) for line in lines
            if line.strip() and not line.startswith("#")]


def digits_key(name: str) -> str:
    """The last group of digits of a name as a 4-digit string ('PANCREAS_0001', 'image1' -> '0001')."""
    groups = re.findall(r"\d+", name)
    return f"{int(groups[-1]):04d}" if groups else name


@dataclass
class SplitLists:
    """Case lists from a split file or list files, and where they came from."""

    groups: dict[str, list[str]]
    sources: dict[str, str]


def find_split(args: argparse.Namespace, input_folder: Path, list_names: Mapping[str, Sequence[str]],
               required: Sequence[str] = ("train", "test"),
               generic_stems: Iterable[str] = ()) -> SplitLists | None:
    """Case lists, by priority: --split-file, then --train-list/--test-list, then list files found in
    the input folder or its parent (the h5 releases keep them one level above the data folder).

    Returns None when nothing was found; raises if only part of the required lists exists.
    """
    generic_stems = tuple(generic_stems)
    if getattr(args, "split_file", None):
        data = json.loads(Path(args.split_file).read_text())
        aliases = {"validation": "val", "training": "train"}
        groups = {aliases.get(k, k): [list_entry_name(str(c), generic_stems) for c in v]
                  for k, v in data.items() if isinstance(v, list)}
        missing = [g for g in required if g not in groups]
        if missing:
            raise ConverterError(
                f"split file {args.split_file} lacks the list(s) {missing}; it needs {list(required)}")
        return SplitLists(groups, {g: str(args.split_file) for g in groups})
    given = {g: getattr(args, f"{g}_list", None) for g in list_names}
    if any(given.values()):
        missing = [g for g in required if not given.get(g)]
        if missing:
            raise ConverterError(f"--{missing[0]}-list is needed together with the other list file(s)")
        files = {g: Path(p) for g, p in given.items() if p}
    else:
        files = {}
        for folder in (input_folder, input_folder.parent):
            found = {g: folder / n for g, names in list_names.items() for n in names
                     if (folder / n).is_file()}
            if all(g in found for g in required):
                files = found
                break
        if not files:
            return None
    for group, file in files.items():
        if not file.is_file():
            raise ConverterError(f"{group} list {file} does not exist")
    return SplitLists({g: read_case_list(f, generic_stems) for g, f in files.items()},
                      {g: str(f) for g, f in files.items()})


def select_labeled(train: Sequence[str], n: int, seed: int, mode: str = "random") -> list[str]:
    """N labeled cases from the training list, reproducibly.

    'random' draws from the sorted list with numpy's PCG64 generator seeded by ``seed``, so the
    choice does not depend on the order of the list file; 'first' takes the first N entries in
    list order, the convention of the public UA-MT/SS-Net/BCP training scripts.
    """
    if not 1 <= n <= len(train):
        raise ConverterError(f"--labeled must be between 1 and the {len(train)} training cases, got {n}")
    if mode == "first":
        return list(train[:n])
    ordered = sorted(train)
    picks = np.random.default_rng(seed).permutation(len(ordered))[:n]
    return sorted(ordered[i] for i in picks)


@dataclass
class SplitPlan:
    """Which case goes where; ``validation`` is written according to ``validation_placement``."""

    labeled: list[str]
    unlabeled: list[str]
    test: list[str]
    validation: list[str] = field(default_factory=list)
    validation_placement: str = "skip"


def make_plan(lists: SplitLists, available: Iterable[str], n_labeled: int, seed: int, mode: str,
              validation_placement: str = "skip", source_hint: str = "") -> SplitPlan:
    """Check every listed case exists and no case sits in two lists, then draw the labeled cases."""
    available = set(available)
    train, test = list(dict.fromkeys(lists.groups["train"])), list(dict.fromkeys(lists.groups["test"]))
    validation = list(dict.fromkeys(lists.groups.get("val", [])))
    missing = [c for c in train + test + validation if c not in available]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ConverterError(f"{len(missing)} listed case(s) not found{source_hint}: {shown} "
                             f"(lists: {', '.join(sorted(set(lists.sources.values())))})")
    for a, b in (("train", "test"), ("train", "val"), ("test", "val")):
        overlap = set(lists.groups.get(a, [])) & set(lists.groups.get(b, []))
        if overlap:
            shown = ", ".join(sorted(overlap)[:10])
            raise ConverterError(f"case(s) in both the {a} and the {b} list: {shown}")
    labeled = select_labeled(train, n_labeled, seed, mode)
    unlabeled = sorted(set(train) - set(labeled))
    return SplitPlan(labeled, unlabeled, sorted(test), sorted(validation), validation_placement)


def add_h5_arguments(parser: argparse.ArgumentParser, default_spacing: Sequence[float], default_axes: str,
                     axes_help: str) -> None:
    """``--h5-spacing`` and ``--h5-axes``: what an h5 release does not store."""
    parser.add_argument("--h5-spacing", type=float, nargs=3, default=list(default_spacing),
                        metavar=("X", "Y", "Z"), help="voxel spacing (mm) assumed for the h5 release")
    parser.add_argument("--h5-axes", choices=("xyz", "zyx"), default=default_axes, help=axes_help)


def complete_provenance(provenance: dict[str, object], kind: str, args: argparse.Namespace,
                        available: Iterable[str], plan: SplitPlan) -> dict[str, object]:
    """Add what split.json must record beyond the source: h5 assumptions and cases in no list."""
    if kind == "h5":
        provenance.update(spacing_xyz_mm=list(args.h5_spacing), spacing_note="assumed: h5 arrays carry no spacing",
                          h5_axis_order=args.h5_axes,
                          axis_note="stored arrays transposed to SimpleITK's (z, y, x) array order")
    unlisted = sorted(set(available) - set(plan.labeled + plan.unlabeled + plan.test + plan.validation))
    if unlisted:
        provenance["unlisted_cases"] = unlisted
    return provenance


def array_to_image(array: np.ndarray, axes: str, spacing_xyz: Sequence[float]) -> sitk.Image:
    """An h5 array as an image; ``axes`` is the stored order, 'xyz' or 'zyx' (SimpleITK's array order)."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise ConverterError(f"expected a 3D array, got shape {array.shape}")
    if axes == "xyz":
        array = np.transpose(array, (2, 1, 0))
    elif axes != "zyx":
        raise ConverterError(f"axis order must be 'xyz' or 'zyx', got {axes!r}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing([float(s) for s in spacing_xyz])
    return image


def binarize(label: sitk.Image | np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Foreground = any non-zero value (LA 255 -> 1, BraTS whole tumour), on the image's grid."""
    array = sitk.GetArrayFromImage(label) if isinstance(label, sitk.Image) else np.asarray(label)
    out = sitk.GetImageFromArray((array > 0).astype(np.uint8))
    out.CopyInformation(reference)
    return out


def load_h5_case(file: Path, axes: str, spacing_xyz: Sequence[float], need_label: bool) -> CaseData:
    """One case of an h5 release (datasets ``image`` and ``label``), labels binarised."""
    with h5py.File(file, "r") as f:
        needed = ("image", "label") if need_label else ("image",)
        missing = [k for k in needed if k not in f]
        if missing:
            raise ConverterError(f"{file} lacks the dataset(s) {missing}; it has {sorted(f.keys())}")
        image = array_to_image(f["image"][()], axes, spacing_xyz)
        label = binarize(array_to_image(f["label"][()], axes, spacing_xyz), image) if need_label else None
    return image, label


def label_on_image_grid(label: sitk.Image, image: sitk.Image, case: str, label_file: str) -> sitk.Image:
    """Binarise a label read from its own file and make sure it lies on the image's voxel grid.

    Different sizes are an error; the same size with slightly different header geometry (common in
    hand-converted releases) takes the image's geometry, so nnU-Net's own geometry check passes.
    """
    if label.GetSize() != image.GetSize():
        raise ConverterError(f"case {case}: label {label_file} has size {label.GetSize()}, "
                             f"image has {image.GetSize()}")
    for what in ("Spacing", "Origin", "Direction"):
        a, b = np.array(getattr(image, f"Get{what}")()), np.array(getattr(label, f"Get{what}")())
        if not np.allclose(a, b, rtol=0.0, atol=GEOMETRY_TOLERANCE):
            print(f"note: case {case}: label {what.lower()} differs from the image's; the label keeps its "
                  f"voxels and takes the image geometry", file=sys.stderr)
            break
    return binarize(label, image)


def write_dataset(args: argparse.Namespace, plan: SplitPlan, load: Callable[[str, bool], CaseData],
                  channel_name: str, label_name: str, provenance: dict[str, object]) -> Path:
    """Write the plan with :class:`RawDatasetWriter`; ``load(case, need_label)`` reads one case."""
    root = resolve_raw_root(args.raw_root)
    root.mkdir(parents=True, exist_ok=True)
    subsets: list[tuple[str, list[str]]] = [("labeled", plan.labeled), ("unlabeled", plan.unlabeled),
                                            ("test", plan.test)]
    if plan.validation_placement != "skip":
        subsets.append((plan.validation_placement, plan.validation))
    with RawDatasetWriter(root, args.dataset_id, args.name, {0: channel_name},
                          {"background": 0, label_name: 1}, overwrite=args.overwrite) as writer:
        for subset, cases in subsets:
            for case in cases:
                image, label = load(case, subset != "unlabeled")
                if subset != "unlabeled" and label is None:
                    raise ConverterError(f"case {case} ({subset}) has no label")
                writer.add_case(subset, case, [image], label if subset != "unlabeled" else None)
        extra: dict[str, object] = {}
        if plan.validation:
            extra = {"validation": plan.validation, "validation_placement": plan.validation_placement}
        return writer.finish(seed=args.seed, labeled_selection=args.labeled_selection,
                             n_labeled=len(plan.labeled), **extra, **provenance)


def run_converter(convert: Callable[[argparse.Namespace], Path], args: argparse.Namespace) -> int:
    """Run a converter for the CLI; problems with the input raise a UserInputError (exit code 2)."""
    try:
        folder = convert(args)
    except FileExistsError as exc:
        raise ConverterError(str(exc)) from None
    split = json.loads((folder / "split.json").read_text())
    print(f"wrote {folder}: {len(split['labeled'])} labeled, {len(split['unlabeled'])} unlabeled, "
          f"{len(split['test'])} test case(s)")
    return 0
