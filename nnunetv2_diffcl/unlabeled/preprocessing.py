"""Unlabeled cases: find them in ``imagesTu/``, preprocess them with the dataset's own plans, check them.

Layout (beside nnU-Net's own preprocessed data, never inside it, because nnU-Net builds its
cross-validation folds from every case in the labeled folder)::

    nnUNet_preprocessed/DatasetXXX_Name/
        nnUNetPlans_3d_fullres/                     nnU-Net's labeled cases
        nnUNetPlans_3d_fullres_unlabeled/           the unlabeled cases, same file format
        nnUNetPlans_3d_fullres_unlabeled.json       the manifest

The manifest sits next to the folder, not inside it: nnU-Net infers a folder's dataset format from
the file endings in it and refuses a folder with a foreign one.

A case is written into a staging folder and moved into place with its data file last (that file is
what nnU-Net's dataset classes list), so an interrupted run never leaves a half-written case behind.
The manifest is written (atomically) only when every case is done; trainers refuse to start without
a manifest that matches the current plans.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from os.path import isdir, isfile, join

import numpy as np

from nnunetv2_diffcl.errors import UserInputError
from nnunetv2_diffcl.file_io import write_json_atomic

MANIFEST_VERSION = 1
UNLABELED_RAW_FOLDER = "imagesTu"


class UnlabeledDataError(UserInputError):
    """Bad or missing unlabeled data; the message names the file or case and the fix."""


def unlabeled_folder(preprocessed_dataset_folder_base: str, data_identifier: str) -> str:
    return join(preprocessed_dataset_folder_base, f"{data_identifier}_unlabeled")


def manifest_file(preprocessed_dataset_folder_base: str, data_identifier: str) -> str:
    return unlabeled_folder(preprocessed_dataset_folder_base, data_identifier) + ".json"


def preprocess_command(dataset_name: str, configuration: str, plans_identifier: str) -> str:
    """The command that (re)creates the unlabeled data, quoted in error messages."""
    dataset_id = int(dataset_name[len("Dataset"):len("Dataset") + 3])
    return f"nnUNetv2_diffcl preprocess_unlabeled -d {dataset_id} -c {configuration} -p {plans_identifier}"


def preprocessing_fingerprint(plans: dict, configuration: dict, dataset_json: dict) -> str:
    """Hash of everything the image preprocessing depends on.

    ``configuration`` is the resolved configuration dict (ConfigurationManager.configuration): target
    spacing, normalisation, resampling, preprocessor class, data identifier, patch size (which sets the
    storage chunking). From the plans: axis transposition, intensity statistics and the image reader.
    From dataset.json: channels and file ending.
    """
    relevant = {
        "configuration": configuration,
        "transpose_forward": plans.get("transpose_forward"),
        "foreground_intensity_properties_per_channel": plans.get("foreground_intensity_properties_per_channel"),
        "image_reader_writer": plans.get("image_reader_writer"),
        "channel_names": dataset_json.get("channel_names", dataset_json.get("modality")),
        "file_ending": dataset_json.get("file_ending"),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


def _source_signature(files: Sequence[str]) -> list[list]:
    """Name, size and modification time of each source file: enough to notice a replaced image."""
    return [[os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]


def find_unlabeled_cases(raw_dataset_folder: str, dataset_json: dict) -> dict[str, list[str]]:
    """Map case id -> channel files for ``imagesTu/``, checking names, endings and channel counts."""
    folder = join(raw_dataset_folder, UNLABELED_RAW_FOLDER)
    fix = (f"Put the unlabeled scans into {folder}/ named like imagesTr "
           f"(CASE_0000{dataset_json['file_ending']}, one file per channel).")
    if not isdir(folder):
        raise UnlabeledDataError(f"No unlabeled data: {folder} does not exist. {fix}")
    file_ending = dataset_json["file_ending"]
    names = sorted(f for f in os.listdir(folder) if not f.startswith("."))
    if not names:
        raise UnlabeledDataError(f"No unlabeled data: {folder} is empty. {fix}")
    wrong_ending = [n for n in names if not n.endswith(file_ending)]
    if wrong_ending:
        raise UnlabeledDataError(
            f"{len(wrong_ending)} file(s) in {folder} do not end with the dataset's file ending "
            f"'{file_ending}' (dataset.json): {', '.join(wrong_ending[:5])}. Convert them to {file_ending} "
            f"or move them out of {UNLABELED_RAW_FOLDER}/.")
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(file_ending) + "$")
    cases: dict[str, dict[int, str]] = {}
    for name in names:
        match = pattern.match(name)
        if match is None:
            raise UnlabeledDataError(
                f"{join(folder, name)} is not named CASE_XXXX{file_ending} (XXXX = 4-digit channel index, "
                f"as in imagesTr). Rename it.")
        cases.setdefault(match.group(1), {})[int(match.group(2))] = join(folder, name)
    num_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    expected = list(range(num_channels))
    result = {}
    for case, channels in sorted(cases.items()):
        if sorted(channels) != expected:
            raise UnlabeledDataError(
                f"Unlabeled case '{case}' in {folder} has channel files {sorted(channels)} but the dataset has "
                f"{num_channels} channel(s) {expected} (dataset.json channel_names). Provide exactly "
                f"{', '.join(f'{case}_{c:04d}{file_ending}' for c in expected)}.")
        result[case] = [channels[c] for c in expected]
    return result


@dataclass
class _CaseJob:
    case: str
    files: list[str]
    staging: str
    output_folder: str
    plans: dict
    configuration_name: str
    dataset_json: dict


def _move_case_into_place(staging_prefix: str, output_folder: str) -> None:
    """Move a staged case's files; the data file (what nnU-Net lists as the case) goes last."""
    stage_dir, case = os.path.split(staging_prefix)
    files = sorted(f for f in os.listdir(stage_dir) if f.startswith(case + ".") or f.startswith(case + "_seg."))
    data_files = [f for f in files if not f.endswith(".pkl") and not f.startswith(case + "_seg.")]
    for name in [f for f in files if f not in data_files] + data_files:
        os.replace(join(stage_dir, name), join(output_folder, name))


def _preprocess_case(job: _CaseJob) -> str:
    """Preprocess one image-only case with the plans' preprocessor class (runs in a worker process)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(job.plans)
    configuration_manager = plans_manager.get_configuration(job.configuration_name)
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    run_case = preprocessor.run_case

    def checked_run_case(*args, **kwargs):  # noqa: ANN002, ANN003 - forwards nnU-Net's own arguments
        # Wraps the preprocessor's own run_case so that a custom preprocessor's run_case_save still
        # writes the case: we only check the result and add the (empty) foreground locations that
        # nnU-Net's data loader reads but that image-only cases do not get.
        data, seg, properties = run_case(*args, **kwargs)
        bad = [c for c in range(data.shape[0]) if not np.isfinite(data[c]).all()]
        if bad:
            raise UnlabeledDataError(
                f"Unlabeled case '{job.case}': non-finite values (NaN or inf) in "
                f"{', '.join(job.files[c] for c in bad)}. Fix or remove the image.")
        properties["class_locations"] = {}
        return data, seg, properties

    preprocessor.run_case = checked_run_case
    staging_prefix = join(job.staging, job.case)
    try:
        preprocessor.run_case_save(staging_prefix, job.files, None, plans_manager, configuration_manager,
                                   job.dataset_json)
    except UnlabeledDataError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the case and files named
        raise UnlabeledDataError(
            f"Unlabeled case '{job.case}' could not be read or preprocessed ({', '.join(job.files)}): "
            f"{type(e).__name__}: {e}. Check that the files are readable images with the same geometry as "
            f"imagesTr (channels of one case must share size, spacing, origin and direction).") from e
    _move_case_into_place(staging_prefix, job.output_folder)
    return job.case


def _remove_case(output_folder: str, case: str) -> None:
    for name in os.listdir(output_folder):
        if name.startswith(case + ".") or name.startswith(case + "_seg."):
            os.remove(join(output_folder, name))


def preprocess_unlabeled(dataset_name_or_id: int | str, configurations: Sequence[str] = ("3d_fullres",),
                         plans_identifier: str = "nnUNetPlans", num_processes: int | Sequence[int] | None = None,
                         progress: Callable[[str], None] = print) -> dict[str, str]:
    """Preprocess ``imagesTu/`` for each configuration. Idempotent: unchanged cases are not redone.

    Returns configuration -> output folder.
    """
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    for var, value in (("nnUNet_raw", nnUNet_raw), ("nnUNet_preprocessed", nnUNet_preprocessed)):
        if not value.is_set():
            raise UnlabeledDataError(f"The environment variable {var} is not set (see nnU-Net's "
                                     f"documentation/setting_up_paths.md).")
    try:
        dataset_name = maybe_convert_to_dataset_name(dataset_name_or_id)
    except RuntimeError as e:
        raise UnlabeledDataError(f"Dataset {dataset_name_or_id} not found in nnUNet_raw or nnUNet_preprocessed "
                                 f"({e}).") from e
    base = join(str(nnUNet_preprocessed), dataset_name)
    plans_file = join(base, plans_identifier + ".json")
    first = (f"nnUNetv2_plan_and_preprocess -d {dataset_name_or_id} -c {' '.join(configurations)}"
             + ("" if plans_identifier == "nnUNetPlans" else f" (with the planner that writes {plans_identifier})"))
    if not isfile(plans_file) or not isfile(join(base, "dataset.json")):
        raise UnlabeledDataError(f"{plans_file} not found: the dataset has not been planned yet. Run `{first}` "
                                 f"first, then this command.")
    with open(plans_file) as f:
        plans = json.load(f)
    with open(join(base, "dataset.json")) as f:
        dataset_json = json.load(f)
    plans_manager = PlansManager(plans)
    raw_folder = join(str(nnUNet_raw), dataset_name)
    cases = find_unlabeled_cases(raw_folder, dataset_json)
    if isinstance(num_processes, int) or num_processes is None:
        num_processes = [default_num_processes if num_processes is None else num_processes] * len(configurations)
    if len(num_processes) != len(configurations):
        raise UnlabeledDataError(f"-np {' '.join(map(str, num_processes))}: give one value, or one per configuration "
                                 f"({len(configurations)}: {' '.join(configurations)})")

    outputs = {}
    for configuration_name, nproc in zip(configurations, num_processes):
        if configuration_name not in plans_manager.available_configurations:
            raise UnlabeledDataError(
                f"Configuration '{configuration_name}' is not in {plans_file} (available: "
                f"{plans_manager.available_configurations}). Run `{first}` first.")
        configuration_manager = plans_manager.get_configuration(configuration_name)
        identifier = configuration_manager.data_identifier
        output_folder = unlabeled_folder(base, identifier)
        manifest_path = manifest_file(base, identifier)
        fingerprint = preprocessing_fingerprint(plans, configuration_manager.configuration, dataset_json)
        manifest = None
        if isfile(manifest_path):
            with open(manifest_path) as f:
                manifest = json.load(f)
        if manifest is None or manifest.get("fingerprint") != fingerprint or not isdir(output_folder):
            # plans changed (or first run): nothing old can be reused
            if isfile(manifest_path):
                os.remove(manifest_path)
            shutil.rmtree(output_folder, ignore_errors=True)
            done: dict[str, list] = {}
        else:
            done = manifest.get("cases", {})
            os.remove(manifest_path)  # invalid until this run has finished
        os.makedirs(output_folder, exist_ok=True)
        staging = join(output_folder, ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)

        signatures = {case: _source_signature(files) for case, files in cases.items()}
        for case in set(done) - set(cases):
            _remove_case(output_folder, case)
        todo = [case for case in cases if done.get(case) != signatures[case]]
        progress(f"{configuration_name}: {len(cases)} unlabeled case(s), {len(cases) - len(todo)} already "
                 f"preprocessed, {len(todo)} to do -> {output_folder}")
        jobs = [_CaseJob(case, cases[case], staging, output_folder, plans, configuration_name, dataset_json)
                for case in todo]
        try:
            if nproc <= 1 or len(jobs) <= 1:
                results = map(_preprocess_case, jobs)
                for i, case in enumerate(results, 1):
                    progress(f"  [{i}/{len(jobs)}] {case}")
            else:
                with multiprocessing.get_context("spawn").Pool(min(nproc, len(jobs))) as pool:
                    for i, case in enumerate(pool.imap_unordered(_preprocess_case, jobs), 1):
                        progress(f"  [{i}/{len(jobs)}] {case}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        write_json_atomic({
            "manifest_version": MANIFEST_VERSION,
            "dataset_name": dataset_name,
            "plans_name": plans_manager.plans_name,
            "configuration": configuration_name,
            "data_identifier": identifier,
            "fingerprint": fingerprint,
            "nnunetv2_version": version("nnunetv2"),
            "nnunetv2_diffcl_version": version("nnunetv2-diffcl"),
            "raw_folder": join(raw_folder, UNLABELED_RAW_FOLDER),
            "cases": {case: signatures[case] for case in sorted(cases)},
        }, manifest_path)
        outputs[configuration_name] = output_folder
    return outputs


def check_unlabeled_data(preprocessed_dataset_folder_base: str, plans: dict, configuration_name: str,
                         configuration: dict, dataset_json: dict, raw_dataset_folder: str | None) -> list[str]:
    """Validate the manifest against the plans a trainer runs with; returns the unlabeled case ids.

    Raises UnlabeledDataError with the command that (re)creates the data when anything is off.
    """
    dataset_name = os.path.basename(os.path.normpath(preprocessed_dataset_folder_base))
    identifier = configuration["data_identifier"]
    path = manifest_file(preprocessed_dataset_folder_base, identifier)
    command = preprocess_command(dataset_name, configuration_name, plans["plans_name"])
    if not isfile(path):
        if raw_dataset_folder is not None:
            find_unlabeled_cases(raw_dataset_folder, dataset_json)  # raises if imagesTu is missing or empty
        raise UnlabeledDataError(
            f"No preprocessed unlabeled data for {dataset_name} / {configuration_name} (expected {path}). "
            f"A semi-supervised trainer needs it: run `{command}` first.")
    with open(path) as f:
        manifest = json.load(f)
    expected = preprocessing_fingerprint(plans, configuration, dataset_json)
    if (manifest.get("plans_name") != plans["plans_name"] or manifest.get("configuration") != configuration_name
            or manifest.get("fingerprint") != expected):
        raise UnlabeledDataError(
            f"The unlabeled data in {unlabeled_folder(preprocessed_dataset_folder_base, identifier)} was "
            f"preprocessed with other plans or another configuration (manifest: plans "
            f"'{manifest.get('plans_name')}', configuration '{manifest.get('configuration')}') than this training "
            f"uses ('{plans['plans_name']}', '{configuration_name}'). Redo it: `{command}`.")
    cases = sorted(manifest.get("cases", {}))
    if not cases:
        raise UnlabeledDataError(f"{path} lists no unlabeled case. Add images to imagesTu/ and run `{command}`.")
    return cases
