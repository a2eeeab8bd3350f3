"""A further round of self-training: a dataset whose unlabeled scans carry a finished model's predictions as labels.

The dataset is a plain nnU-Net dataset: imagesTr/labelsTr hold the source's labeled cases and its imagesTu scans
with the model's predictions as labels; imagesTu, imagesTs and labelsTs are copied, so the unlabeled scans stay
available to the trainers that restyle with them. dataset.json lists the pseudo-labelled cases under
``"pseudo_labels": {"cases": [...]}``, so that a trainer can give the ground-truth cases a fixed share of the
training patches however few of them there are (``ground_truth_share``).
"""

from __future__ import annotations

import json
import shutil
from os.path import join
from pathlib import Path

import numpy as np

from nnunetv2_diffcl.errors import UserInputError
from nnunetv2_diffcl.unlabeled.preprocessing import find_unlabeled_cases

PSEUDO_LABELS_KEY = "pseudo_labels"


def pseudo_labelled_cases(dataset_json: dict) -> set[str]:
    """The cases whose labels are a model's predictions (empty for a dataset not built for self-training)."""
    entry = dataset_json.get(PSEUDO_LABELS_KEY)
    if entry is None:
        return set()
    cases = entry.get("cases") if isinstance(entry, dict) else None
    if not isinstance(cases, list) or not all(isinstance(c, str) for c in cases):
        raise ValueError(f"dataset.json: '{PSEUDO_LABELS_KEY}' must be {{\"cases\": [case identifiers]}} (the "
                         f"pseudo-labelled training cases), got {entry!r}")
    return set(cases)


def ground_truth_weighted(identifiers: list[str], pseudo: set[str], share: float) -> tuple[list[str], float]:
    """``identifiers`` with each ground-truth case repeated so that a uniform draw from the list picks a
    ground-truth case with probability close to ``share`` (nnU-Net's loader draws uniformly from its dataset's
    identifiers); returns the list and the share it gives. Nothing changes where either kind is missing or
    where the ground truth already has at least ``share``."""
    truth = [i for i in identifiers if i not in pseudo]
    labelled = [i for i in identifiers if i in pseudo]
    if not truth or not labelled:
        return list(identifiers), len(truth) / max(1, len(identifiers))
    copies = max(1, round(share * len(labelled) / ((1.0 - share) * len(truth))))
    weighted = sorted(truth * copies + labelled)
    return weighted, copies * len(truth) / len(weighted)


def build_pseudo_labelled_dataset(source: Path, predictions: Path, target: Path, threshold: float = 0.0) -> float:
    """Write the dataset to ``target`` (a raw dataset folder); returns the share of pseudo-labelled voxels kept.

    ``predictions`` is ``nnUNetv2_predict``'s output for the source's imagesTu (with ``--save_probabilities`` when
    ``threshold`` > 0: a voxel whose top probability is under it gets a new ignore label). Built beside its name and
    renamed into place, so a failure leaves nothing half-written.
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    if target.exists():
        raise UserInputError(f"{target} exists: remove it or choose another dataset id")
    if not 0.0 <= threshold < 1.0:
        raise UserInputError(f"threshold {threshold}: give a probability in [0, 1) (0 keeps every predicted voxel)")
    dataset = json.loads((source / "dataset.json").read_text(encoding="utf-8"))
    if "ignore" in dataset["labels"] and threshold > 0:
        raise UserInputError(f"{source / 'dataset.json'} already has an ignore label: build with threshold 0")
    ending = dataset["file_ending"]
    channel_files = find_unlabeled_cases(str(source), dataset)  # case -> its imagesTu files, names checked
    unlabeled = sorted(channel_files)
    missing = [c for c in unlabeled if not (predictions / f"{c}{ending}").exists()
               or (threshold > 0 and not (predictions / f"{c}.npz").exists())]
    if missing:
        raise UserInputError(f"{predictions} lacks the prediction{' (with probabilities)' if threshold > 0 else ''} "
                             f"of {missing[:5]}: predict {source / 'imagesTu'} first")
    ignore = max(dataset["labels"].values()) + 1 if threshold > 0 else None
    reader_writer = None if ignore is None else determine_reader_writer_from_dataset_json(
        dataset, join(str(predictions), f"{unlabeled[0]}{ending}"))()
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for sub in ("imagesTu", "imagesTs", "labelsTs", "imagesTr", "labelsTr"):
            if (source / sub).is_dir():
                shutil.copytree(source / sub, partial / sub)
        kept = total = 0
        for case in unlabeled:
            for file in channel_files[case]:
                shutil.copy(file, partial / "imagesTr" / Path(file).name)
            label_file = partial / "labelsTr" / f"{case}{ending}"
            if ignore is None:
                shutil.copy(predictions / f"{case}{ending}", label_file)
                continue
            label, properties = reader_writer.read_seg(str(predictions / f"{case}{ending}"))
            low = np.load(predictions / f"{case}.npz")["probabilities"].max(0) < threshold
            if low.shape != label.shape[1:]:
                raise UserInputError(f"{predictions / f'{case}.npz'}: probabilities of shape {low.shape} for a "
                                     f"label of shape {label.shape[1:]}: predict again with --save_probabilities")
            label = label[0].astype(np.uint8)
            label[low] = ignore
            kept, total = kept + int((~low).sum()), total + low.size
            reader_writer.write_seg(label, str(label_file), properties)
        if ignore is not None:
            dataset["labels"] = {**dataset["labels"], "ignore": ignore}
        dataset.update(name=target.name, numTraining=len(list((partial / "labelsTr").glob(f"*{ending}"))),
                       **{PSEUDO_LABELS_KEY: {"from": str(predictions), "cases": unlabeled, "threshold": threshold}})
        (partial / "dataset.json").write_text(json.dumps(dataset, indent=4), encoding="utf-8")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(target)
    return 1.0 if total == 0 else kept / total
