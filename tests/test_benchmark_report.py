"""The benchmark's comparisons and reference checks, on hand-made rows and plans: in-process, nothing trains."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from nnunetv2_diffcl.benchmark import (
    LOWER_REFERENCE,
    METRICS,
    REFERENCE_ROW,
    add_comparisons,
    check_reference,
    check_reference_plans,
    check_reference_trainers,
    class_names,
    combine_repeats,
    format_table,
    gap_closed,
    wins_against,
    write_report,
)
from nnunetv2_diffcl.errors import UserInputError

CLASSES = {"1": "organ", "2": "lesion"}


def run_row(trainer: str, repeat: int, dice: float, cases: dict[str, tuple[float, float]] | None = None) -> dict:
    """A run as run_trainers returns it: ``cases`` maps a case to its (organ, lesion) Dice."""
    cases = cases or {"c1": (dice, dice)}
    per_case = {case: {"1": {"dice": organ}, "2": {"dice": lesion}} for case, (organ, lesion) in cases.items()}
    organ = sum(o for o, _ in cases.values()) / len(cases)
    lesion = sum(la for _, la in cases.values()) / len(cases)
    return {"trainer": trainer, "repeat": repeat, "train_seconds": 10.0, "n_cases": len(cases),
            **{m: dice for m, _, _ in METRICS}, **{f"{m}_sd": 0.01 for m, _, _ in METRICS},
            "class_dice": {"1": organ, "2": lesion}, "class_dice_sd": {"1": 0.0, "2": 0.0},
            "per_case_dice": per_case}


# (LabeledOnlyTrainer, all-labeled reference, CPSTrainer) mean Dice of three repeats; CPS's gap closed by hand:
# (0.7 - 0.5) / (0.9 - 0.5) = 0.5, (0.75 - 0.6) / (0.8 - 0.6) = 0.75, (0.4 - 0.4) / (0.9 - 0.4) = 0
REPEATS = [(0.5, 0.9, 0.7), (0.6, 0.8, 0.75), (0.4, 0.9, 0.4)]


def repeated_runs() -> list[dict]:
    runs = []
    for k, (lower, upper, cps) in enumerate(REPEATS, start=1):
        runs += [run_row(LOWER_REFERENCE, k, lower), run_row("CPSTrainer", k, cps), run_row(REFERENCE_ROW, k, upper)]
    return runs


def test_gap_closed_is_computed_per_repeat_then_averaged():
    runs = repeated_runs()
    add_comparisons(runs)
    assert [r["gap_closed"] for r in runs if r["trainer"] == "CPSTrainer"] == pytest.approx([0.5, 0.75, 0.0])
    assert all(r["gap_closed"] is None for r in runs if r["trainer"] != "CPSTrainer")  # n/a for both references
    rows = {r["trainer"]: r for r in combine_repeats(runs)}
    cps = rows["CPSTrainer"]
    # mean 0.41667; deviations 0.08333, 0.33333, -0.41667: sd = sqrt(0.29167 / 2) = 0.38188 (ddof 1)
    assert cps["gap_closed"] == pytest.approx(1.25 / 3)
    assert cps["gap_closed_sd"] == pytest.approx(0.381881, abs=1e-6)
    assert cps["per_repeat_gap_closed"] == pytest.approx([0.5, 0.75, 0.0])
    # not the gap of the mean Dice: (0.6167 - 0.5) / (0.8667 - 0.5) = 0.318
    assert cps["gap_closed"] != pytest.approx((cps["dice"] - 0.5) / (rows[REFERENCE_ROW]["dice"] - 0.5), abs=0.05)
    assert rows[LOWER_REFERENCE]["gap_closed"] is None and rows[REFERENCE_ROW]["gap_closed"] is None
    table = format_table(list(rows.values()), CLASSES)
    line = next(x for x in table.splitlines() if x.startswith("| CPSTrainer |"))
    assert "0.4167 ± 0.3819" in line
    header = table.splitlines()[0].split(" | ")
    gap = header.index("gap closed")
    assert next(x for x in table.splitlines() if x.startswith(f"| {LOWER_REFERENCE} |")).split(" | ")[gap] == "n/a"


def test_gap_closed_of_a_single_repeat_is_its_value_and_undefined_without_a_gap():
    runs = [run_row(LOWER_REFERENCE, 1, 0.5), run_row("DiffCLTrainer", 1, 0.6), run_row(REFERENCE_ROW, 1, 0.9)]
    add_comparisons(runs)
    assert runs[1]["gap_closed"] == pytest.approx(0.25) and runs[1]["gap_closed_sd"] is None
    assert "| DiffCLTrainer |" in format_table(runs) and "0.2500 |" in format_table(runs)
    assert gap_closed(0.6, 0.5, 0.5) is None and gap_closed(None, 0.5, 0.9) is None
    assert gap_closed(0.3, 0.5, 0.9) == pytest.approx(-0.5)  # worse than labeled-only: negative, not hidden


def test_wins_count_cases_whose_mean_dice_beats_labeled_only():
    # per case (organ, lesion); the case's Dice is their mean
    lower = run_row(LOWER_REFERENCE, 1, 0.5, {"a": (0.8, 0.2), "b": (0.9, 0.5), "c": (0.6, 0.6), "d": (0.5, 0.0)})
    cps = run_row("CPSTrainer", 1, 0.5, {
        "a": (0.7, 0.4),  # 0.55 > 0.5: a win, though the organ is worse
        "b": (0.9, 0.5),  # 0.7 = 0.7: a tie is no win
        "c": (0.7, 0.4),  # 0.55 < 0.6
        "d": (0.6, 0.1),  # 0.35 > 0.25
        "only_here": (1.0, 1.0),  # not evaluated for LabeledOnlyTrainer: not counted
    })
    assert wins_against(cps, lower) == (2, 4)
    second = [run_row(LOWER_REFERENCE, 2, 0.5, {k: (0.0, 0.0) for k in "abcd"}),
              run_row("CPSTrainer", 2, 0.5, {"a": (0.1, 0.0), "b": (0.2, 0.0), "c": (0.3, 0.0), "d": (0.0, 0.0)})]
    runs = [lower, cps, *second]
    add_comparisons(runs)
    assert (cps["wins_vs_labeled_only"], cps["wins_n_cases"]) == (2, 4)
    assert lower["wins_vs_labeled_only"] is None
    assert format_table([lower, cps]).splitlines()[0].endswith("| wins vs labeled-only | train time |")
    assert "| 2/4 | 10 s |" in format_table([lower, cps])
    rows = {r["trainer"]: r for r in combine_repeats(runs)}
    assert rows["CPSTrainer"]["per_repeat_wins_vs_labeled_only"] == [2, 3]
    line = next(x for x in format_table(list(rows.values())).splitlines() if x.startswith("| CPSTrainer |"))
    assert "| 2/4, 3/4 |" in line
    assert "gap closed" not in format_table(list(rows.values()))  # no all-labeled reference here


def test_per_class_dice_columns_only_with_several_classes():
    runs = [run_row(LOWER_REFERENCE, 1, 0.5, {"a": (0.8, 0.2), "b": (0.6, 0.4)})]
    header = format_table(runs, CLASSES).splitlines()[0]
    assert header.startswith("| trainer | Dice | Jaccard | HD95 mm | ASD mm | HD95 vox | ASD vox | Dice organ | "
                             "Dice lesion |")
    assert "| 0.7000 ± 0.0000 | 0.3000 ± 0.0000 |" in format_table(runs, CLASSES)
    assert "Dice target" not in format_table(runs, {"1": "target"})
    assert class_names({"labels": {"background": 0, "organ": 1, "lesion": 2}}) == CLASSES
    assert class_names({"labels": {"background": 0, "whole": [1, 2], "core": 2}}) == {"2": "core"}
    combined = combine_repeats([run_row("CPSTrainer", 1, 0.5, {"a": (0.8, 0.2)}),
                                run_row("CPSTrainer", 2, 0.5, {"a": (0.6, 0.4)})])[0]
    assert combined["class_dice"] == pytest.approx({"1": 0.7, "2": 0.3})
    assert combined["class_dice_sd"]["1"] == pytest.approx(0.2 / 2 ** 0.5)  # over repeats, ddof 1


def test_report_json_holds_the_comparisons_per_run_and_combined(tmp_path):
    runs = repeated_runs()
    add_comparisons(runs)
    rows = combine_repeats(runs)
    write_report(tmp_path, rows, {"dataset": "Dataset993_DiffCLDomains",
                                  "reference": "Dataset994_DiffCLDomainsAllLabeled"}, 1.0, runs, CLASSES)
    data = json.loads((tmp_path / "benchmark.json").read_text())
    cps_runs = [r for r in data["runs"] if r["trainer"] == "CPSTrainer"]
    assert [r["gap_closed"] for r in cps_runs] == pytest.approx([0.5, 0.75, 0.0])
    assert [r["wins_vs_labeled_only"] for r in cps_runs] == [1, 1, 0]  # one case each: 0.7 > 0.5, ...
    cps = next(r for r in data["rows"] if r["trainer"] == "CPSTrainer")
    assert cps["gap_closed"] == pytest.approx(1.25 / 3) and cps["per_repeat_wins_vs_labeled_only"] == [1, 1, 0]
    markdown = (tmp_path / "benchmark.md").read_text(encoding="utf-8")
    assert "| Dice organ | Dice lesion | gap closed | wins vs labeled-only |" in markdown
    assert "LabeledOnlyTrainer trained on Dataset994_DiffCLDomainsAllLabeled" in markdown


PLANS_2D = {"data_identifier": "nnUNetPlans_2d", "batch_size": 12, "patch_size": [64, 64]}


def plans(**changes) -> dict:
    return {"configurations": {"2d": {**PLANS_2D, **changes},
                               "2d_small": {"inherits_from": "2d", "patch_size": [32, 32]}}}


def test_reference_with_other_plans_is_refused_naming_both_values_and_the_fix():
    check_reference_plans(plans(), plans(), "2d", "Dataset993_A", "Dataset994_B")
    check_reference_plans(plans(), plans(), "2d_small", "Dataset993_A", "Dataset994_B")  # inheritance resolved
    with pytest.raises(UserInputError) as info:
        check_reference_plans(plans(), plans(batch_size=40), "2d", "Dataset993_A", "Dataset994_B")
    message = str(info.value)
    assert "batch_size 40" in message and "batch_size 12" in message and "Dataset994_B" in message
    assert "nnUNetv2_move_plans_between_datasets -s 993 -t 994 -sp nnUNetPlans -tp nnUNetPlans" in message
    assert "nnUNetv2_preprocess -d 994 -c 2d" in message
    with pytest.raises(UserInputError, match=r"patch_size \[32, 32\].*patch_size \[64, 64\]"):
        check_reference_plans(plans(), plans(patch_size=[32, 32]), "2d", "Dataset993_A", "Dataset994_B")
    with pytest.raises(UserInputError, match="has no configuration '3d_fullres'"):
        check_reference_plans(plans(), plans(), "3d_fullres", "Dataset993_A", "Dataset994_B")


def preprocessed_pair(root: Path) -> tuple[Path, Path]:
    """nnUNet_raw and nnUNet_preprocessed with a planned main dataset and a reference ready to train."""
    labels = {"labels": {"background": 0, "organ": 1, "lesion": 2}}
    raw, pre = root / "raw", root / "preprocessed"
    for name in ("Dataset993_A", "Dataset994_B"):
        (raw / name).mkdir(parents=True)
        (raw / name / "dataset.json").write_text(json.dumps(labels))
        (pre / name / "nnUNetPlans_2d").mkdir(parents=True)
        (pre / name / "nnUNetPlans_2d" / "case.npz").write_bytes(b"")
        (pre / name / "nnUNetPlans.json").write_text(json.dumps(plans()))
        (pre / name / "dataset.json").write_text(json.dumps(labels))
        (pre / name / "dataset_fingerprint.json").write_text("{}")
    return raw, pre


@pytest.mark.parametrize("remove, message", [
    ("dataset.json", "dataset.json not found (nnUNetv2_preprocess and nnUNetv2_train read it there): copy"),
    ("dataset_fingerprint.json", "run `nnUNetv2_extract_fingerprint -d 994`"),
    ("nnUNetPlans_2d/case.npz", "is missing or empty: Dataset994_B is not preprocessed for 2d; run "
                                "`nnUNetv2_preprocess -d 994 -c 2d`"),
    ("nnUNetPlans.json", "the reference is not planned"),
])
def test_reference_must_be_ready_to_train(tmp_path, remove, message):
    raw, pre = preprocessed_pair(tmp_path)
    check_reference(pre, raw, "Dataset993_A", "Dataset994_B", "2d")
    (pre / "Dataset994_B" / remove).unlink()
    with pytest.raises(UserInputError, match="Dataset994_B") as info:
        check_reference(pre, raw, "Dataset993_A", "Dataset994_B", "2d")
    assert message in str(info.value)


def test_reference_must_label_as_the_dataset_and_not_be_it(tmp_path):
    raw, pre = preprocessed_pair(tmp_path)
    (pre / "Dataset994_B" / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1}}))
    with pytest.raises(UserInputError, match="its labels must be the same"):
        check_reference(pre, raw, "Dataset993_A", "Dataset994_B", "2d")
    with pytest.raises(UserInputError, match="is the benchmarked dataset itself"):
        check_reference(pre, raw, "Dataset993_A", "Dataset993_A", "2d")


def test_reference_without_labeled_only_trainer_is_refused(monkeypatch, capsys):
    from nnunetv2_diffcl.benchmark import configure_parser

    check_reference_trainers(["CPSTrainer", LOWER_REFERENCE])
    with pytest.raises(UserInputError, match="--reference needs LabeledOnlyTrainer among --trainers"):
        check_reference_trainers(["CPSTrainer", "DiffCLTrainer"])
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, "/nonexistent")
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    from nnunetv2_diffcl.cli import main

    assert main(["benchmark", "-d", "993", "--reference", "994", "--trainers", "CPSTrainer"]) == 2
    assert "nnUNetv2_diffcl benchmark: error: --reference needs LabeledOnlyTrainer" in capsys.readouterr().err


def test_per_domain_errors_from_voxel_counts_and_dice():
    """Known values: reference 10 voxels, prediction 6, Dice 0.75 -> TP = 0.75 x 16 / 2 = 6, FP 0, FN 4; a second
    case of the same domain with 10 / 14 / Dice 5/6 -> TP 10, FP 4, FN 0; summed: FP 4 / 20, FN 4 / 20."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("per_domain_dice", Path(__file__).parents[1] / "benchmarks" /
                                                  "per_domain_dice.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = {"per_case": [
        {"case": "c_000_d1", "metrics": {"1": {"n_reference": 10, "n_prediction": 6, "dice": 0.75}}},
        {"case": "c_001_d1", "metrics": {"1": {"n_reference": 10, "n_prediction": 14, "dice": 5 / 6}}},
        {"case": "c_002_d2", "metrics": {"1": {"n_reference": 0, "n_prediction": 0, "dice": float("nan")}}},
    ]}
    errors = module.per_domain_errors(summary)
    assert errors["d1"]["1"] == pytest.approx((0.2, 0.2))
    assert set(errors) == {"d1", "d2"} and np.isnan(errors["d2"]["1"][0])  # no reference voxel: undefined
