"""The README's main job (the demo) and the benchmark command, end to end on a tiny schedule."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import CPU_ENV, command, run_captured

TRAINERS = ["LabeledOnlyTrainer", "CPSTrainer"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update({k: v for k, v in CPU_ENV.items() if k == "OMP_NUM_THREADS"})
    result = run_captured([command("nnUNetv2_diffcl"), "demo", "--out", str(out), "--epochs", "1", "--iterations",
                           "1", "--labeled", "2", "--unlabeled", "2", "--test", "2", "--trainers", *TRAINERS],
                          timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_demo_runs_the_workflow_and_prints_a_table(demo):
    out, stdout = demo
    assert "| trainer | Dice | Jaccard |" in stdout and "total time:" in stdout
    for step in ("plan_and_preprocess", "preprocess_unlabeled", "train_CPSTrainer", "predict_LabeledOnlyTrainer"):
        assert f"] {step}: " in stdout
    results = json.loads((out / "results.json").read_text())
    assert [r["trainer"] for r in results["rows"]] == TRAINERS
    assert all(0.0 <= r["dice"] <= 1.0 and r["n_cases"] == 2 for r in results["rows"])
    assert Path(results["overlay"]).stat().st_size > 10_000
    # its own folders only
    assert {p.name for p in (out / "nnUNet_raw").iterdir()} == {"Dataset990_DiffCLSynthetic"}


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("user data")
    result = run_captured([command("nnUNetv2_diffcl"), "demo", "--out", str(tmp_path)], timeout=120)
    assert result.returncode == 2 and "nnUNetv2_diffcl demo: error: --out" in result.stderr
    assert "was not made by the demo" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "user data"


def benchmark_env(out: Path) -> dict:
    return {**os.environ, **CPU_ENV, "nnUNet_raw": str(out / "nnUNet_raw"),
            "nnUNet_preprocessed": str(out / "nnUNet_preprocessed"), "nnUNet_results": str(out / "nnUNet_results")}


DEMO_SCHEDULE = ["--epochs", "1", "--iterations", "1", "--val-iterations", "2"]  # what the demo fixture trained
ONE_PROCESS = ["-npp", "0", "-nps", "0"]  # nnUNetv2_predict without worker processes: 2 small cases


def test_benchmark_reuses_finished_trainings_and_writes_its_report(demo, tmp_path):
    out, _ = demo
    report = tmp_path / "bench"
    result = run_captured([command("nnUNetv2_diffcl"), "benchmark", "-d", "990", "--trainers", *TRAINERS,
                           *DEMO_SCHEDULE, "-device", "cpu", "--disable_tta", *ONE_PROCESS, "-o", str(report)],
                          timeout=900, env=benchmark_env(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("exists, not retrained") == 2  # resumable: finished trainers are reused
    assert result.stdout.count("-npp 0 -nps 0") == len(TRAINERS)  # -npp / -nps reach nnUNetv2_predict
    data = json.loads((report / "benchmark.json").read_text())
    assert [r["trainer"] for r in data["rows"]] == TRAINERS
    demo_rows = json.loads((out / "results.json").read_text())["rows"]
    for row, demo_row in zip(data["rows"], demo_rows):
        assert 0.0 <= row["dice"] <= 1.0 and 0.0 <= row["jaccard"] <= row["dice"] + 1e-9
        # the training time recorded beside the model when the demo trained it, not "unknown"
        assert row["train_seconds"] == pytest.approx(demo_row["train_seconds"])
    assert "| LabeledOnlyTrainer |" in (report / "benchmark.md").read_text(encoding="utf-8")
    assert (report / "benchmark.png").stat().st_size > 5_000


@pytest.mark.parametrize("schedule, extra_env", [
    (["--epochs", "3", "--iterations", "1", "--val-iterations", "2"], {}),
    (DEMO_SCHEDULE, {"nnUNet_diffcl_rampup_fraction": "0.5"}),  # same schedule, another training option
])
def test_benchmark_refuses_to_reuse_a_model_trained_with_another_schedule(demo, tmp_path, schedule, extra_env):
    """Refused before anything trains: HFMambaTrainer (not trained by the demo) comes first in the list."""
    out, _ = demo
    result = run_captured([command("nnUNetv2_diffcl"), "benchmark", "-d", "990", "--trainers", "HFMambaTrainer",
                           "LabeledOnlyTrainer", *schedule, "-device", "cpu", "-o", str(tmp_path / "bench")],
                          timeout=300, env={**benchmark_env(out), **extra_env})
    assert result.returncode == 2 and "nnUNetv2_diffcl benchmark: error:" in result.stderr
    assert "was trained with schedule" in result.stderr and "LabeledOnlyTrainer__nnUNetPlans__3d_fullres" in \
        result.stderr and "--epochs" in result.stderr
    assert "train_HFMambaTrainer" not in result.stdout
    assert not list((out / "nnUNet_results").glob("*/HFMambaTrainer__*"))


def interrupted_copy(demo_out: Path, results: Path, trainer: str = "LabeledOnlyTrainer") -> Path:
    """The demo's trained model, copied into ``results`` as an interruption after its last epoch leaves it: a
    latest checkpoint (nnU-Net's --c loads it), no final one."""
    name = f"{trainer}__nnUNetPlans__3d_fullres"
    dataset = "Dataset990_DiffCLSynthetic"
    shutil.copytree(demo_out / "nnUNet_results" / dataset / name, results / dataset / name)
    fold = results / dataset / name / "fold_all"
    (fold / "checkpoint_final.pth").rename(fold / "checkpoint_latest.pth")
    return fold


def test_benchmark_resumes_an_interrupted_training_with_c(demo, tmp_path):
    """The demo trained 1 epoch; recorded as a 2-epoch benchmark run cut off after epoch 1, it is continued."""
    import torch

    from nnunetv2_diffcl.benchmark import RUN_RECORD, schedule_of

    out, _ = demo
    fold = interrupted_copy(out, tmp_path / "results")
    env = {**benchmark_env(out), "nnUNet_results": str(tmp_path / "results")}
    schedule = ["--epochs", "2", "--iterations", "1", "--val-iterations", "2"]
    recorded = schedule_of({**env, "nnUNet_diffcl_epochs": "2", "nnUNet_diffcl_iterations": "1",
                            "nnUNet_diffcl_val_iterations": "2"})
    (fold / RUN_RECORD).write_text(json.dumps({"schedule": recorded, "train_seconds": None}))
    first_epoch = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)["logging"][
        "epoch_start_timestamps"]
    result = run_captured([command("nnUNetv2_diffcl"), "benchmark", "-d", "990", "--trainers", "LabeledOnlyTrainer",
                           *schedule, "-device", "cpu", "--disable_tta", *ONE_PROCESS, "-o", str(tmp_path / "bench")],
                          timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "LabeledOnlyTrainer: resuming the unfinished training in" in result.stdout
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 2
    started = final["logging"]["epoch_start_timestamps"]
    assert len(started) == 2 and started[0] == first_epoch[0]  # epoch 1 kept from the checkpoint, not retrained
    assert not (fold / "checkpoint_latest.pth").exists()
    record = json.loads((fold / RUN_RECORD).read_text())
    assert record["resumed"] is True and record["train_seconds"] is None  # the cut-off part's time is unknown
    assert "| LabeledOnlyTrainer |" in (tmp_path / "bench" / "benchmark.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("record_schedule, message", [
    (None, "holds an unfinished training (checkpoint_latest.pth) that this benchmark did not start"),
    ({"epochs": "5", "iterations": "1", "val_iterations": "2"}, "holds an unfinished training started with schedule"),
])
def test_benchmark_does_not_overwrite_an_unfinished_training_it_cannot_resume(demo, tmp_path, record_schedule,
                                                                             message):
    from nnunetv2_diffcl.benchmark import RUN_RECORD

    out, _ = demo
    fold = interrupted_copy(out, tmp_path / "results")
    if record_schedule is None:  # trained by hand, say: no record of the demo's benchmark steps
        (fold / RUN_RECORD).unlink()
    else:
        (fold / RUN_RECORD).write_text(json.dumps({"schedule": record_schedule, "train_seconds": None}))
    before = (fold / "checkpoint_latest.pth").read_bytes()
    result = run_captured([command("nnUNetv2_diffcl"), "benchmark", "-d", "990", "--trainers", "LabeledOnlyTrainer",
                           *DEMO_SCHEDULE, "-device", "cpu", "-o", str(tmp_path / "bench")], timeout=300,
                          env={**benchmark_env(out), "nnUNet_results": str(tmp_path / "results")})
    assert result.returncode == 2 and message in result.stderr and str(fold) in result.stderr
    assert "train_LabeledOnlyTrainer" not in result.stdout
    assert (fold / "checkpoint_latest.pth").read_bytes() == before and not (fold / "checkpoint_final.pth").exists()


def test_run_record_holds_what_changes_the_model_and_nothing_else():
    from nnunetv2_diffcl.benchmark import schedule_of

    env = {"nnUNet_diffcl_epochs": "2", "nnUNet_diffcl_rampup_fraction": "0.5", "nnUNet_diffcl_scan": "torch",
           "nnUNet_diffcl_no_autoregister": "1", "nnUNet_diffcl_diagnostic_ddim_steps": "1,10",
           "nnUNet_raw": "/somewhere"}
    assert schedule_of(env) == {"epochs": "2", "iterations": None, "val_iterations": None,
                                "nnUNet_diffcl_rampup_fraction": "0.5"}


def test_benchmark_repeats_train_from_scratch_and_report_the_spread(demo, tmp_path):
    out, _ = demo
    report = tmp_path / "bench"
    args = [command("nnUNetv2_diffcl"), "benchmark", "-d", "990", "--trainers", "LabeledOnlyTrainer",
            *DEMO_SCHEDULE, "--repeats", "2", "-device", "cpu", "--disable_tta", *ONE_PROCESS, "-o", str(report)]
    result = run_captured(args, timeout=900, env=benchmark_env(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for k in (1, 2):  # each repeat trained its own model, not the demo's
        assert f"] train_LabeledOnlyTrainer_repeat{k}: " in result.stdout
        assert (report / f"repeat_{k}" / "nnUNet_results" / "Dataset990_DiffCLSynthetic" /
                "LabeledOnlyTrainer__nnUNetPlans__3d_fullres" / "fold_all" / "checkpoint_final.pth").exists()
    data = json.loads((report / "benchmark.json").read_text())
    runs, (row,) = data["runs"], data["rows"]
    assert [r["repeat"] for r in runs] == [1, 2] and row["repeats"] == 2
    dice = [r["dice"] for r in runs]
    assert row["per_repeat_dice"] == dice
    assert row["dice"] == pytest.approx(sum(dice) / 2)
    assert row["dice_sd"] == pytest.approx(abs(dice[0] - dice[1]) / 2 ** 0.5)  # sd over repeats, ddof 1
    assert "standard deviation over repeats" in (report / "benchmark.md").read_text(encoding="utf-8")
    # run again: both repeats are reused, nothing retrained
    again = run_captured(args, timeout=900, env=benchmark_env(out))
    assert again.returncode == 0 and again.stdout.count("exists, not retrained") == 2


@pytest.mark.parametrize("npp, nps", [("0", "1"), ("2", "0"), ("-1", "-1")])
def test_benchmark_refuses_predict_processes_nnunet_cannot_run(npp, nps, monkeypatch, capsys):
    """nnUNetv2_predict runs in one process only when both are 0; 0 and 1 would fail after every training."""
    from nnunetv2_diffcl.cli import main

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, "/nonexistent")
    assert main(["benchmark", "-d", "990", "-npp", npp, "-nps", nps]) == 2
    assert f"nnUNetv2_diffcl benchmark: error: -npp {npp} -nps {nps}: give both 0" in capsys.readouterr().err


def test_benchmark_needs_test_labels(demo, tmp_path):
    out, _ = demo
    raw = tmp_path / "raw"
    (raw / "Dataset990_DiffCLSynthetic" / "imagesTs").mkdir(parents=True)
    (raw / "Dataset990_DiffCLSynthetic" / "imagesTs" / "case_0000.nii.gz").write_bytes(b"")
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(out / "nnUNet_preprocessed"),
           "nnUNet_results": str(tmp_path / "results")}
    result = run_captured([command("nnUNetv2_diffcl"), "benchmark", "-d", "990"], timeout=120, env=env)
    assert result.returncode == 2 and "labelsTs is missing or empty" in result.stderr


@pytest.mark.parametrize("trainers, schedule, message", [
    (["nnUNetTrainer"], {"epochs": "2"}, "use LabeledOnlyTrainer"),  # would train 1000 epochs beside 2
    (["LabeledOnlyTrainer", "DiffCLTrainre"], {}, "'DiffCLTrainre' not found"),  # a typo, caught before training
])
def test_benchmark_checks_its_trainers_before_training(trainers, schedule, message):
    from nnunetv2_diffcl.benchmark import check_trainers, schedule_of
    from nnunetv2_diffcl.errors import UserInputError

    with pytest.raises(UserInputError, match=message):
        check_trainers(trainers, schedule_of({f"nnUNet_diffcl_{k}": v for k, v in schedule.items()}))


def test_benchmark_accepts_nnunet_trainers_without_a_schedule_and_plugin_trainers_with_one():
    from nnunetv2_diffcl.benchmark import check_trainers

    check_trainers(["nnUNetTrainer", "DiffCLTrainer_noHFMamba"], {"epochs": None, "iterations": None})
    check_trainers(["LabeledOnlyTrainer", "CPSTrainer", "DiffCLTrainer_DDIM3"], {"epochs": "2", "iterations": "1"})


def test_demo_says_plainly_how_the_trainers_compare():
    from nnunetv2_diffcl.demo import BENCHMARK_SUMMARY, compare_with_baseline

    rows = [{"trainer": "LabeledOnlyTrainer", "dice": 0.80}, {"trainer": "DiffCLTrainer", "dice": 0.75},
            {"trainer": "CPSTrainer", "dice": 0.85}]
    text = compare_with_baseline(rows, 64)
    assert "DiffCLTrainer scored 0.750, below LabeledOnlyTrainer's 0.800" in text
    assert "CPSTrainer scored 0.850, above" in text
    assert "64 training steps" in text and BENCHMARK_SUMMARY in text  # a loss is never shown without the why
    won = compare_with_baseline(rows[:1] + [{"trainer": "DiffCLTrainer", "dice": 0.9}], 64)
    assert "above" in won and "docs/benchmarks.md" not in won
    assert compare_with_baseline([{"trainer": "DiffCLTrainer", "dice": 0.9}], 64) == ""
