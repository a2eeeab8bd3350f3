"""``nnUNetv2_diffcl benchmark``: train, predict and evaluate a list of trainers with one schedule.

For a dataset in the plugin's layout (imagesTr/labelsTr, imagesTu, imagesTs + labelsTs), fold
``all``: each trainer is trained with ``nnUNetv2_train`` (a trainer whose ``checkpoint_final.pth``
exists is not retrained), predicts ``imagesTs`` with ``nnUNetv2_predict`` and is evaluated against
``labelsTs`` (Dice, Jaccard, HD95, ASD; mm and voxels). Writes ``benchmark.md`` (table),
``benchmark.json`` and ``benchmark.png`` (bar plot) into the output folder. The demo runs the same
steps through :func:`run_trainers`.

With ``--reference`` an all-labeled copy of the dataset (``nnUNetv2_diffcl synthetic --domains
--all-labeled-id``) is the upper reference: LabeledOnlyTrainer trained on it predicts the main
dataset's test set, and every trainer's "gap closed" between LabeledOnlyTrainer (0) and it (1) is
reported. Whenever LabeledOnlyTrainer is benchmarked, the table counts each trainer's test cases
that beat it ("wins vs labeled-only"), since a mean Dice can hide a method that helps a few cases
and harms most.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

from nnunetv2_diffcl.errors import UserInputError, error_line

DEFAULT_TRAINERS = ["LabeledOnlyTrainer", "CPSTrainer", "DiffCLTrainer"]
LOWER_REFERENCE = "LabeledOnlyTrainer"  # trained on the labeled cases only: what every other trainer must beat
REFERENCE_ROW = "all-labeled reference"  # LOWER_REFERENCE trained on --reference: every training case labeled
PLANS = "nnUNetPlans"  # the benchmark trains with nnU-Net's default plans
METRICS = [("dice", "Dice", 1.0), ("jaccard", "Jaccard", 1.0), ("hd95_mm", "HD95 mm", 1.0),
           ("asd_mm", "ASD mm", 1.0), ("hd95_vox", "HD95 vox", 1.0), ("asd_vox", "ASD vox", 1.0)]


class Workflow:
    """Runs steps as subprocesses, logs each to its own file, prints one progress line per step."""

    def __init__(self, out: Path, env: dict) -> None:
        self.out = out
        self.env = env
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.start = time.time()
        self.poll_seconds = 2.0

    def say(self, message: str) -> None:
        elapsed = int(time.time() - self.start)
        print(f"[{elapsed // 60:2d}:{elapsed % 60:02d}] {message}", flush=True)

    def run(self, name: str, args: list[str], env: dict | None = None, epochs: int | None = None) -> float:
        """Run one step, its output in ``logs/<name>.log``; a training step (``epochs`` given, None when the
        trainer's own schedule is unknown here: pass 0) shows its progress on the terminal while it runs."""
        self.say(f"{name}: {' '.join(Path(args[0]).name if i == 0 else a for i, a in enumerate(args))}")
        started = time.time()
        log = self.logs / f"{name}.log"
        progress = TrainingProgress(log, epochs or None, sys.stdout) if epochs is not None else None
        with open(log, "w") as f:
            process = subprocess.Popen(args, env=env or self.env, stdout=f, stderr=subprocess.STDOUT)
            while process.poll() is None:
                time.sleep(self.poll_seconds)
                if progress is not None:
                    progress.update()
        if progress is not None:
            progress.update(final=True)
        if process.returncode != 0:
            tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-25:])
            raise RuntimeError(f"step '{name}' failed (exit {process.returncode}); last lines of {log}:\n{tail}")
        return time.time() - started


class TrainingProgress:
    """Epoch n of N, the latest training loss and the time left, read from nnU-Net's training output as it is
    written. On a terminal one line is redrawn with a bar; otherwise a line is printed at most every
    ``interval`` seconds (a log file stays short)."""

    EPOCH = re.compile(r": Epoch (\d+)\s*$")
    LOSS = re.compile(r": train_loss (-?\d+(?:\.\d+)?(?:e-?\d+)?)")
    EPOCH_TIME = re.compile(r": Epoch time: (\d+(?:\.\d+)?) s")

    def __init__(self, log: Path, total_epochs: int | None, stream: TextIO, interval: float = 60.0) -> None:
        self.log, self.total, self.stream, self.interval = log, total_epochs, stream, interval
        self.offset = 0
        self.epoch: int | None = None
        self.done = 0
        self.loss: float | None = None
        self.epoch_seconds: list[float] = []
        self.last_print = time.time()
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.shown = ""

    def read(self) -> None:
        """Parse what nnU-Net wrote since the last call (whole lines only)."""
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                f.seek(self.offset)
                text = f.read()
        except FileNotFoundError:
            return
        complete = text[: text.rfind("\n") + 1]
        self.offset += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            if m := self.EPOCH.search(line):
                self.epoch = int(m.group(1))
            elif m := self.LOSS.search(line):
                self.loss = float(m.group(1))
            elif m := self.EPOCH_TIME.search(line):
                self.epoch_seconds.append(float(m.group(1)))
                self.done = (self.epoch if self.epoch is not None else self.done) + 1

    def line(self) -> str:
        """``epoch 12/40 [#######.............] loss -0.4123, ~5 min left`` (parts unknown yet are left out)."""
        if not self.epoch_seconds:
            return ""
        parts = [f"epoch {self.done}" + (f"/{self.total}" if self.total else "")]
        if self.total:
            filled = round(20 * min(self.done / self.total, 1.0))
            parts[0] += f" [{'#' * filled}{'.' * (20 - filled)}]"
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.total and self.done < self.total:
            recent = self.epoch_seconds[-10:]
            left = sum(recent) / len(recent) * (self.total - self.done)
            parts.append(f"~{left / 60:.0f} min left" if left >= 90 else f"~{left:.0f} s left")
        return "    " + ", ".join(parts)

    def update(self, final: bool = False) -> None:
        self.read()
        text = self.line()
        if not text or text == self.shown:
            if final and self.tty and self.shown:
                self.stream.write("\n")
                self.stream.flush()
            return
        if self.tty:
            self.stream.write("\r" + text.ljust(len(self.shown)) + ("\n" if final else ""))
        elif final or time.time() - self.last_print >= self.interval:
            self.stream.write(text + "\n")
            self.last_print = time.time()
        else:
            return
        self.shown = text
        self.stream.flush()


def tool(name: str) -> str:
    """Console scripts of the environment running this command."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


SCHEDULE_VARIABLES = {"epochs": "nnUNet_diffcl_epochs", "iterations": "nnUNet_diffcl_iterations",
                      "val_iterations": "nnUNet_diffcl_val_iterations"}
RUN_RECORD = "diffcl_benchmark_run.json"  # beside checkpoint_final.pth: the schedule it was trained with
# same model either way (the diagnostic DDIM steps only add logged terms)
NOT_TRAINING_OPTIONS = ("nnUNet_diffcl_scan", "nnUNet_diffcl_no_autoregister", "nnUNet_diffcl_diagnostic_ddim_steps")


def schedule_of(env: dict) -> dict:
    """What a training run gets from the environment: the schedule (None: the trainer's own default), and
    any other ``nnUNet_diffcl_*`` option that changes the model (e.g. ``nnUNet_diffcl_rampup_fraction``)."""
    schedule = {key: env.get(var) for key, var in SCHEDULE_VARIABLES.items()}
    schedule.update({var: value for var, value in sorted(env.items()) if var.startswith("nnUNet_diffcl_")
                     and var not in NOT_TRAINING_OPTIONS and var not in SCHEDULE_VARIABLES.values()})
    return schedule


def _repeated(rows: list[dict]) -> bool:
    return any(r.get("repeats", 1) > 1 for r in rows)


CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")  # nnU-Net's, in --c's order


def dataset_name(dataset: str) -> str:
    """nnU-Net's folder name of a dataset given by id or name; a UserInputError naming it when nnU-Net has none."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return str(maybe_convert_to_dataset_name(dataset))  # a numpy string otherwise
    except RuntimeError as e:
        raise UserInputError(f"dataset {dataset}: {e}") from None


def check_run(fold_dir: Path, schedule: dict) -> tuple[str, float | None]:
    """State of a trainer's fold folder: ``"new"``, ``"unfinished"`` (resume with ``--c``) or ``"finished"``
    (reuse), and the recorded training time of a finished run.

    Raises when what is there cannot be used as it is: a model trained or started with another schedule, or an
    unfinished training the benchmark did not start (its schedule is unknown, and training anew would overwrite
    the user's checkpoints).
    """
    present = [name for name in CHECKPOINTS if (fold_dir / name).exists()]
    if not present:
        return "new", None
    finished = present[0] == "checkpoint_final.pth"
    record = fold_dir / RUN_RECORD
    if not record.exists():
        if finished:
            return "finished", None  # trained outside the benchmark (e.g. by hand): its schedule is the user's business
        raise UserInputError(f"{fold_dir} holds an unfinished training ({present[0]}) that this benchmark did not "
                             f"start; finish it with `nnUNetv2_train ... --c` or delete {fold_dir.parent}")
    recorded = json.loads(record.read_text(encoding="utf-8"))
    if recorded["schedule"] != schedule:
        what = "was trained" if finished else "holds an unfinished training started"
        raise UserInputError(f"{fold_dir} {what} with schedule {recorded['schedule']}, but this benchmark asks "
                             f"for {schedule}; rerun with the same --epochs/--iterations/--val-iterations (and "
                             f"nnUNet_diffcl_* variables), or delete {fold_dir.parent} to retrain it")
    return ("finished" if finished else "unfinished"), recorded.get("train_seconds")


def check_trainers(trainers: list[str], schedule: dict) -> None:
    """Before hours of training: every trainer exists, and each one follows the schedule asked for.

    nnU-Net's own trainers ignore ``nnUNet_diffcl_*``: with a schedule set, ``nnUNetTrainer`` would
    train its 1000 epochs beside plugin trainers that train a few, and the table would compare unlike runs.
    """
    import contextlib
    import io

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2_diffcl.trainers import PLUGIN_TRAINERS

    for name in trainers:
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's lookup prints every folder it searches
            try:
                cls = recursive_find_trainer_class_by_name(name)
            except RuntimeError:
                cls = None
        if cls is None:
            raise UserInputError(f"trainer {name!r} not found by nnU-Net (nor in nnUNet_extTrainer); "
                                 f"`nnUNetv2_diffcl doctor` lists the plugin's trainers")
        if any(schedule.get(key) is not None for key in SCHEDULE_VARIABLES) and \
                not issubclass(cls, tuple(PLUGIN_TRAINERS)):
            raise UserInputError(f"{name} does not read nnUNet_diffcl_epochs/_iterations/_val_iterations, so it would "
                                 f"not train with the schedule given to the other trainers; use LabeledOnlyTrainer "
                                 f"(nnUNetTrainer that follows the schedule) or a plugin trainer")


def fold_dir_of(results_root: Path, dataset_name: str, trainer: str, configuration: str) -> Path:
    """Where nnU-Net puts a trainer's fold ``all`` (the benchmark trains with the default plans)."""
    return results_root / dataset_name / f"{trainer}__nnUNetPlans__{configuration}" / "fold_all"


def check_reusable_runs(results_roots: list[Path], dataset_name: str, trainers: list[str], configuration: str,
                        schedule: dict) -> None:
    """Before any training: every model that would be reused or resumed was trained with this schedule. Found
    only when its turn comes, a mismatch would stop the benchmark after the trainers before it had trained."""
    for root in results_roots:
        for trainer in trainers:
            check_run(fold_dir_of(root, dataset_name, trainer, configuration), schedule)


def check_reference_trainers(trainers: list[str]) -> None:
    """The all-labeled reference is only read against the lower one: both must be in the benchmark."""
    if LOWER_REFERENCE not in trainers:
        raise UserInputError(f"--reference needs {LOWER_REFERENCE} among --trainers (it is the lower reference: "
                             f"'gap closed' runs from it, 0, to the all-labeled reference, 1); add {LOWER_REFERENCE} "
                             f"to --trainers {' '.join(trainers)}")


def _dataset_id(dataset_name: str) -> str:
    """``Dataset994_Name`` -> ``994`` for the commands printed in messages (the name if it is not nnU-Net's form)."""
    return str(int(dataset_name[7:10])) if dataset_name[:7] == "Dataset" and dataset_name[7:10].isdigit() \
        else dataset_name


def _configuration(plans: dict, configuration: str, what: str) -> dict:
    """A configuration of a plans dict with its ``inherits_from`` chain resolved, as nnU-Net's PlansManager does."""
    configurations = plans.get("configurations", {})
    resolved: dict = {}
    chain = [configuration]
    while True:
        if chain[-1] not in configurations:
            raise UserInputError(f"{what} has no configuration {chain[-1]!r} (it has {sorted(configurations)})")
        parent = configurations[chain[-1]].get("inherits_from")
        if parent is None:
            break
        if parent in chain:
            raise UserInputError(f"{what}: configuration {configuration!r} inherits from itself ({' -> '.join(chain)})")
        chain.append(parent)
    for name in reversed(chain):
        resolved.update(configurations[name])
    return resolved


def reference_fix(main: str, reference: str, configuration: str) -> str:
    """The commands that give the reference the main dataset's plans and preprocess it with them."""
    m, r = _dataset_id(main), _dataset_id(reference)
    return (f"`nnUNetv2_move_plans_between_datasets -s {m} -t {r} -sp {PLANS} -tp {PLANS}`, then "
            f"`nnUNetv2_preprocess -d {r} -c {configuration}`")


def check_reference_plans(main_plans: dict, reference_plans: dict, configuration: str, main: str,
                          reference: str) -> None:
    """The reference trains with the main dataset's batch and patch size, or the gap it spans would partly be the
    gap between two plans, not between labeled fractions."""
    ours = _configuration(main_plans, configuration, f"{PLANS}.json of {main}")
    theirs = _configuration(reference_plans, configuration, f"{PLANS}.json of {reference}")
    for key in ("batch_size", "patch_size"):
        if ours.get(key) != theirs.get(key):
            raise UserInputError(
                f"configuration {configuration}: {reference} is planned with {key} {theirs.get(key)}, {main} with "
                f"{key} {ours.get(key)}; the all-labeled reference must train with the main dataset's plans. Run "
                f"{reference_fix(main, reference, configuration)}")


def check_reference(preprocessed_root: Path, raw_root: Path, main: str, reference: str, configuration: str) -> None:
    """Before anything trains: the reference dataset is preprocessed for ``configuration`` with the main dataset's
    batch and patch size, has what ``nnUNetv2_train`` reads, and labels its classes as the main dataset does."""
    if reference == main:
        raise UserInputError(f"--reference {reference} is the benchmarked dataset itself; give its all-labeled copy "
                             f"(`nnUNetv2_diffcl synthetic --domains --all-labeled-id ID` writes one)")
    main_plans_file = preprocessed_root / main / f"{PLANS}.json"
    if not main_plans_file.is_file():
        raise UserInputError(f"{main_plans_file} not found: plan {main} first (`nnUNetv2_plan_and_preprocess -d "
                             f"{_dataset_id(main)} -c {configuration}`)")
    base = preprocessed_root / reference
    r = _dataset_id(reference)
    plans_file = base / f"{PLANS}.json"
    if not plans_file.is_file():
        raise UserInputError(f"{plans_file} not found: the reference is not planned. Run `nnUNetv2_extract_fingerprint "
                             f"-d {r}`, {reference_fix(main, reference, configuration)} (copy "
                             f"{raw_root / reference / 'dataset.json'} into {base} before preprocessing)")
    check_reference_plans(json.loads(main_plans_file.read_text(encoding="utf-8")),
                          json.loads(plans_file.read_text(encoding="utf-8")), configuration, main, reference)
    if not (base / "dataset.json").is_file():  # nnU-Net's planner copies it there; moving plans does not
        raise UserInputError(f"{base / 'dataset.json'} not found (nnUNetv2_preprocess and nnUNetv2_train read it "
                             f"there): copy {raw_root / reference / 'dataset.json'} to {base / 'dataset.json'}, then "
                             f"run `nnUNetv2_preprocess -d {r} -c {configuration}`")
    if not (base / "dataset_fingerprint.json").is_file():  # nnUNetv2_train copies it beside the model
        raise UserInputError(f"{base / 'dataset_fingerprint.json'} not found (nnUNetv2_train copies it): run "
                             f"`nnUNetv2_extract_fingerprint -d {r}`")
    data = base / _configuration(json.loads(plans_file.read_text(encoding="utf-8")), configuration,
                                 str(plans_file)).get("data_identifier", f"{PLANS}_{configuration}")
    if not data.is_dir() or not any(data.iterdir()):
        raise UserInputError(f"{data} is missing or empty: {reference} is not preprocessed for {configuration}; run "
                             f"`nnUNetv2_preprocess -d {r} -c {configuration}`")
    main_json = raw_root / main / "dataset.json"
    if not main_json.is_file():
        main_json = preprocessed_root / main / "dataset.json"
    labels = [json.loads(file.read_text(encoding="utf-8"))["labels"] for file in (main_json, base / "dataset.json")]
    if labels[0] != labels[1]:
        raise UserInputError(f"{reference} labels {labels[1]}, {main} labels {labels[0]}: the reference predicts "
                             f"{main}'s test cases, so its labels must be the same")


def run_trainers(flow: Workflow, dataset_name: str, trainers: list[str], configuration: str, device: str,
                 predictions_root: Path, training_env: dict, predict_args: list[str] | None = None,
                 step_suffix: str = "", predict_processes: tuple[int, int] = (1, 1),
                 test_dataset: str | None = None) -> list[dict]:
    """Train (unless finished; an interrupted training is resumed with ``--c``), predict imagesTs and evaluate
    against labelsTs, for each trainer. ``predict_processes`` are nnUNetv2_predict's ``-npp`` and ``-nps``.

    The models are trained on ``dataset_name``; the test set is ``test_dataset``'s (default: the same), so that a
    model trained on an all-labeled copy of a dataset is measured on the very cases the others are.
    """
    from nnunetv2_diffcl.evaluation.evaluate import evaluate_folders
    from nnunetv2_diffcl.file_io import write_json_atomic

    raw = Path(training_env["nnUNet_raw"]) / (test_dataset or dataset_name)
    schedule = schedule_of(training_env)
    rows = []
    for trainer in trainers:
        fold_dir = fold_dir_of(Path(training_env["nnUNet_results"]), dataset_name, trainer, configuration)
        state, seconds = check_run(fold_dir, schedule)
        if state == "finished":
            flow.say(f"{trainer}{step_suffix}: {fold_dir / 'checkpoint_final.pth'} exists, not retrained")
        else:
            if state == "unfinished":
                flow.say(f"{trainer}{step_suffix}: resuming the unfinished training in {fold_dir} (--c)")
            else:  # recorded before training, so that an interrupted run is known to be ours and resumable
                write_json_atomic({"schedule": schedule, "train_seconds": None}, fold_dir / RUN_RECORD)
            seconds = flow.run(f"train_{trainer}{step_suffix}", [
                tool("nnUNetv2_train"), dataset_name, configuration, "all", "-tr", trainer, "-device", device,
                *(["--c"] if state == "unfinished" else [])], training_env,
                epochs=int(training_env.get("nnUNet_diffcl_epochs", 0)))
            # a resumed run's wall time leaves out the interrupted part: not a training time to compare
            write_json_atomic({"schedule": schedule, "train_seconds": seconds if state == "new" else None,
                               "resumed": state == "unfinished"}, fold_dir / RUN_RECORD)
        out = predictions_root / trainer
        flow.run(f"predict_{trainer}{step_suffix}", [
            tool("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(out), "-d", dataset_name,
            "-c", configuration, "-f", "all", "-tr", trainer, "-device", device,
            "-npp", str(predict_processes[0]), "-nps", str(predict_processes[1]), *(predict_args or [])], training_env)
        summary = evaluate_folders(raw / "labelsTs", out, output_file=out / "summary.json")
        stats = summary["mean_over_classes"]
        rows.append({"trainer": trainer, "train_seconds": seconds, "n_cases": summary["n_cases_evaluated"],
                     **{m: stats[m]["mean"] for m, _, _ in METRICS},
                     **{f"{m}_sd": stats[m]["std"] for m, _, _ in METRICS},
                     "class_dice": {c: s["dice"]["mean"] for c, s in summary["per_class"].items()},
                     "class_dice_sd": {c: s["dice"]["std"] for c, s in summary["per_class"].items()},
                     "per_case_dice": {c["case"]: c["metrics"] for c in summary["per_case"]}})
        flow.say(f"{trainer}{step_suffix}: test Dice {rows[-1]['dice']:.4f}")
    return rows


def case_dice(per_case: dict[str, dict[str, dict]]) -> dict[str, float]:
    """Each case's Dice, averaged over its classes (the "Dice" column's per-case values)."""
    return {case: sum(m["dice"] for m in classes.values()) / len(classes)
            for case, classes in per_case.items() if classes}


def wins_against(row: dict, baseline: dict) -> tuple[int, int]:
    """(test cases where ``row``'s Dice beats ``baseline``'s, cases both evaluated); a tie is not a win."""
    ours, theirs = case_dice(row["per_case_dice"]), case_dice(baseline["per_case_dice"])
    common = sorted(set(ours) & set(theirs))
    return sum(ours[c] > theirs[c] for c in common), len(common)


def gap_closed(dice: float | None, lower: float | None, upper: float | None) -> float | None:
    """Where ``dice`` lies between the labeled-only model (0) and the all-labeled reference (1); None when
    undefined (a missing value, or a reference no better or worse than labeled-only: no gap to close)."""
    if dice is None or lower is None or upper is None or abs(upper - lower) < 1e-12:
        return None
    return (dice - lower) / (upper - lower)


def add_comparisons(runs: list[dict]) -> None:
    """Per repeat, against that repeat's own LabeledOnlyTrainer (and all-labeled reference, if run): each run gets
    ``wins_vs_labeled_only`` / ``wins_n_cases`` and ``gap_closed`` (None where not applicable)."""
    for repeat in dict.fromkeys(r.get("repeat", 1) for r in runs):
        mine = [r for r in runs if r.get("repeat", 1) == repeat]
        lower = next((r for r in mine if r["trainer"] == LOWER_REFERENCE), None)
        upper = next((r for r in mine if r["trainer"] == REFERENCE_ROW), None)
        for r in mine:
            wins = wins_against(r, lower) if lower is not None and r is not lower else (None, None)
            r["wins_vs_labeled_only"], r["wins_n_cases"] = wins
            applies = lower is not None and upper is not None and r is not lower and r is not upper
            r["gap_closed"] = gap_closed(r["dice"], lower["dice"], upper["dice"]) if applies else None
            r["gap_closed_sd"] = None


def _mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sd (ddof 1) over repeats of the defined values."""
    import numpy as np

    defined = [v for v in values if v is not None]
    return (float(np.mean(defined)) if defined else None,
            float(np.std(defined, ddof=1)) if len(defined) > 1 else None)


def combine_repeats(rows: list[dict]) -> list[dict]:
    """One row per trainer: each metric's mean over repeats, and its sd over repeats (not over cases)."""
    import numpy as np

    combined = []
    for trainer in dict.fromkeys(r["trainer"] for r in rows):
        mine = [r for r in rows if r["trainer"] == trainer]
        row = {"trainer": trainer, "repeats": len(mine), "n_cases": mine[0]["n_cases"],
               "per_repeat_dice": [r["dice"] for r in mine]}
        for m, _, _ in METRICS:
            values = [r[m] for r in mine if r[m] is not None]
            row[m] = float(np.mean(values)) if values else None
            row[f"{m}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        seconds = [r["train_seconds"] for r in mine if r["train_seconds"] is not None]
        row["train_seconds"] = float(np.mean(seconds)) if seconds else None
        classes = list(dict.fromkeys(c for r in mine for c in r.get("class_dice", {})))
        spread = {c: _mean_sd([r.get("class_dice", {}).get(c) for r in mine]) for c in classes}
        row["class_dice"] = {c: mean for c, (mean, _) in spread.items()}
        row["class_dice_sd"] = {c: sd for c, (_, sd) in spread.items()}
        if any("gap_closed" in r for r in mine):
            row["per_repeat_gap_closed"] = [r.get("gap_closed") for r in mine]
            row["gap_closed"], row["gap_closed_sd"] = _mean_sd(row["per_repeat_gap_closed"])
        if any(r.get("wins_vs_labeled_only") is not None for r in mine):
            row["per_repeat_wins_vs_labeled_only"] = [r.get("wins_vs_labeled_only") for r in mine]
            row["per_repeat_wins_n_cases"] = [r.get("wins_n_cases") for r in mine]
        for key in ("trained_on", "trainer_class"):
            if key in mine[0]:
                row[key] = mine[0][key]
        combined.append(row)
    return combined


def _fmt(value: float | None, sd: float | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if sd is None else f"{value:.4f} ± {sd:.4f}"


def class_names(dataset_json: dict) -> dict[str, str]:
    """Foreground classes of a dataset.json as the evaluation keys them (``"1"``) -> their names; region-based
    labels (lists of values) are left out, the evaluation reports label values."""
    return {str(value): name for name, value in dataset_json.get("labels", {}).items()
            if isinstance(value, int) and value != 0}


def _wins_cell(r: dict) -> str:
    wins = r.get("per_repeat_wins_vs_labeled_only", [r.get("wins_vs_labeled_only")])
    totals = r.get("per_repeat_wins_n_cases", [r.get("wins_n_cases")])
    return ", ".join("n/a" if w is None else f"{w}/{n}" for w, n in zip(wins, totals))


def format_table(rows: list[dict], classes: dict[str, str] | None = None) -> str:
    """Markdown table; with repeats, ± is the sd over repeats and each repeat's Dice gets a column.

    Extra columns where they apply: each class's Dice (``classes``: key -> name, more than one class), "gap closed"
    (rows with the all-labeled reference) and "wins vs labeled-only" (rows compared by :func:`add_comparisons`).
    """
    repeated = _repeated(rows)
    names = [r["trainer"] for r in rows]
    per_class = dict(classes or {}) if len(classes or {}) > 1 else {}
    gap = REFERENCE_ROW in names and LOWER_REFERENCE in names
    wins = LOWER_REFERENCE in names and any("wins_n_cases" in r or "per_repeat_wins_n_cases" in r for r in rows)
    extra = [f"Dice {name}" for name in per_class.values()] + ["gap closed"] * gap + ["wins vs labeled-only"] * wins
    header = "| trainer | " + " | ".join([label for _, label, _ in METRICS] + extra)
    header += " | Dice of each repeat | train time (mean) |" if repeated else " | train time |"
    lines = [header, "|" + "---|" * (len(METRICS) + len(extra) + 2 + repeated)]
    for r in rows:
        cells = [_fmt(r[m], r[f"{m}_sd"]) for m, _, _ in METRICS]
        cells += [_fmt(r.get("class_dice", {}).get(c), r.get("class_dice_sd", {}).get(c)) for c in per_class]
        if gap:
            cells.append(_fmt(r.get("gap_closed"), r.get("gap_closed_sd")))
        if wins:
            cells.append(_wins_cell(r))
        if repeated:
            cells.append(", ".join(f"{d:.3f}" for d in r["per_repeat_dice"]))
        train = "not recorded" if r["train_seconds"] is None else f"{r['train_seconds']:.0f} s"
        lines.append(f"| {r['trainer']} | " + " | ".join(cells) + f" | {train} |")
    return "\n".join(lines)


def bar_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["trainer"] for r in rows]
    for ax, group in zip(axes, (["dice", "jaccard"], ["hd95_mm", "asd_mm"])):
        width = 0.8 / len(group)
        for i, metric in enumerate(group):
            values = [r[metric] if r[metric] is not None else 0.0 for r in rows]
            errors = [r[f"{metric}_sd"] or 0.0 for r in rows]
            positions = [k + (i - (len(group) - 1) / 2) * width for k in range(len(rows))]
            ax.bar(positions, values, width, yerr=errors, capsize=3, label=metric)
        ax.set_xticks(range(len(rows)), names, rotation=20, ha="right")
        ax.legend()
    axes[0].set_ylim(0, 1)
    axes[0].set_title("overlap (higher is better)")
    axes[1].set_title("surface distance in mm (lower is better)")
    fig.tight_layout()
    partial = path.with_name(f".{path.name}.tmp")  # renamed when complete, as the other report files
    fig.savefig(partial, dpi=90, format="png")
    plt.close(fig)
    os.replace(partial, path)


def write_report(out: Path, rows: list[dict], settings: dict, total_seconds: float,
                 runs: list[dict] | None = None, classes: dict[str, str] | None = None) -> str:
    """benchmark.md, benchmark.json (rows, every single run, settings) and benchmark.png, each written whole or
    not at all."""
    from nnunetv2_diffcl.file_io import write_json_atomic, write_text_atomic

    table = format_table(rows, classes)
    spread = ("± is the standard deviation over repeats of each repeat's mean over test cases" if _repeated(rows)
              else "± is the standard deviation over test cases")
    names = [r["trainer"] for r in rows]
    if REFERENCE_ROW in names:
        spread += (f". {REFERENCE_ROW}: {LOWER_REFERENCE} trained on {settings.get('reference')} (every training "
                   f"case labeled), tested on {settings.get('dataset')}'s test cases. gap closed: (Dice - Dice of "
                   f"{LOWER_REFERENCE}) / (Dice of the {REFERENCE_ROW} - Dice of {LOWER_REFERENCE}), each repeat's "
                   f"models against each other; 0 is no better than labeled-only, 1 as good as every case labeled"
                   + (", mean ± sd over repeats" if _repeated(rows) else ""))
    if LOWER_REFERENCE in names and any("wins_n_cases" in r or "per_repeat_wins_n_cases" in r for r in rows):
        spread += (f". wins vs labeled-only: test cases whose Dice (mean over classes) is higher than "
                   f"{LOWER_REFERENCE}'s of the same repeat (ties are no win), each repeat")
    write_json_atomic({"rows": rows, "runs": runs or rows, "settings": settings, "total_seconds": total_seconds},
                      out / "benchmark.json")
    listed = "\n".join(f"- {key}: {', '.join(map(str, v)) if isinstance(v, list) else v}"
                        for key, v in settings.items())
    write_text_atomic(f"# nnUNetv2_diffcl benchmark\n\n{listed}\n\n{table}\n\n{spread}.\n\n"
                      f"Total run time: {total_seconds:.0f} s\n", out / "benchmark.md")
    bar_plot(rows, out / "benchmark.png")
    return table


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", required=True, help="dataset id or name")
    parser.add_argument("-c", default="3d_fullres", help="configuration")
    parser.add_argument("--trainers", nargs="+", default=DEFAULT_TRAINERS)
    parser.add_argument("--epochs", type=int, default=None, help="nnUNet_diffcl_epochs for every trainer")
    parser.add_argument("--iterations", type=int, default=None, help="nnUNet_diffcl_iterations for every trainer")
    parser.add_argument("--val-iterations", type=int, default=None,
                        help="nnUNet_diffcl_val_iterations for every trainer")
    parser.add_argument("--repeats", type=int, default=1,
                        help="train every trainer this many times from scratch (repeat k in OUT/repeat_k/); "
                             "the table then gives mean ± sd over repeats")
    parser.add_argument("-o", default=None, help="output folder (default: $nnUNet_results/DATASET/diffcl_benchmark)")
    parser.add_argument("-device", default="cuda", help="cuda or cpu")
    parser.add_argument("--disable_tta", action="store_true")
    parser.add_argument("-npp", type=int, default=1, help="nnUNetv2_predict's preprocessing processes (default 1)")
    parser.add_argument("-nps", type=int, default=1,
                        help="nnUNetv2_predict's export processes (default 1). -npp 0 -nps 0 predicts in one "
                             "process (nnU-Net's sequential mode): faster for a few small test cases, as on a CPU")
    parser.add_argument("--reference", default=None, metavar="DATASET",
                        help="id or name of an all-labeled copy of the dataset (`synthetic --domains "
                             "--all-labeled-id`), preprocessed with the dataset's plans: LabeledOnlyTrainer trained "
                             "on it is the upper reference, tested on this dataset's test set; adds 'gap closed'")


def run(args: argparse.Namespace) -> int:
    missing = [v for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results") if not os.environ.get(v)]
    if missing:
        raise UserInputError(f"set {', '.join(missing)} (see nnU-Net's documentation/setting_up_paths.md)")
    for option in ("epochs", "iterations", "val_iterations"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise UserInputError(f"--{option.replace('_', '-')} {getattr(args, option)}: give at least 1")
    if args.repeats < 1:
        raise UserInputError(f"--repeats {args.repeats}: give at least 1")
    if args.npp < 0 or args.nps < 0 or (args.npp == 0) != (args.nps == 0):
        raise UserInputError(f"-npp {args.npp} -nps {args.nps}: give both 0 (predict in one process) or both at "
                             f"least 1 (nnUNetv2_predict runs sequentially only when both are 0)")
    if args.reference is not None:
        check_reference_trainers(args.trainers)
    dataset, reference = (None if d is None else dataset_name(d) for d in (args.d, args.reference))
    raw = Path(os.environ["nnUNet_raw"]) / dataset
    for sub in ("imagesTs", "labelsTs"):
        if not (raw / sub).is_dir() or not any((raw / sub).iterdir()):
            raise UserInputError(f"{raw / sub} is missing or empty: the benchmark predicts imagesTs and evaluates "
                                 f"against labelsTs (the converters and `nnUNetv2_diffcl synthetic` write both)")
    out = (Path(args.o) if args.o else Path(os.environ["nnUNet_results"]) / dataset / "diffcl_benchmark").resolve()
    env = dict(os.environ)
    for key, var in SCHEDULE_VARIABLES.items():
        if getattr(args, key) is not None:
            env[var] = str(getattr(args, key))
    repeats = []  # (k, environment, predictions folder, step suffix)
    for k in range(1, args.repeats + 1):
        if args.repeats == 1:  # the models land where nnU-Net puts them, usable as any other
            repeats.append((k, env, out / "predictions", ""))
        else:  # every repeat needs its own results folder: nnU-Net's fold_all folder holds one model
            repeats.append((k, {**env, "nnUNet_results": str(out / f"repeat_{k}" / "nnUNet_results")},
                            out / f"repeat_{k}" / "predictions", f"_repeat{k}"))
    check_trainers(args.trainers, schedule_of(env))
    results_roots = [Path(e["nnUNet_results"]) for _, e, _, _ in repeats]
    check_reusable_runs(results_roots, dataset, args.trainers, args.c, schedule_of(env))
    if reference is not None:
        check_reference(Path(os.environ["nnUNet_preprocessed"]), Path(os.environ["nnUNet_raw"]), dataset,
                        reference, args.c)
        check_reusable_runs(results_roots, reference, [LOWER_REFERENCE], args.c, schedule_of(env))
    flow = Workflow(out, env)
    flow.say(f"benchmark of {', '.join(args.trainers)} on {dataset} ({args.c}, fold all, {args.repeats} repeat(s)) "
             f"-> {out}" + ("" if reference is None else f"; {REFERENCE_ROW}: {LOWER_REFERENCE} on {reference}"))
    runs = []
    predict_args = ["--disable_tta"] if args.disable_tta else []
    try:
        for k, repeat_env, predictions, suffix in repeats:
            for row in run_trainers(flow, dataset, args.trainers, args.c, args.device, predictions, repeat_env,
                                    predict_args, suffix, (args.npp, args.nps)):
                runs.append({**row, "repeat": k})
            if reference is not None:  # same schedule and results root; this dataset's test set
                (row,) = run_trainers(flow, reference, [LOWER_REFERENCE], args.c, args.device,
                                      predictions.with_name("predictions_reference"), repeat_env, predict_args,
                                      f"_reference{suffix}", (args.npp, args.nps), test_dataset=dataset)
                runs.append({**row, "trainer": REFERENCE_ROW, "trainer_class": LOWER_REFERENCE,
                             "trained_on": reference, "repeat": k})
    except RuntimeError as e:  # a step failed: its log's last lines say why
        print(error_line("benchmark", e), file=sys.stderr)
        return 1
    add_comparisons(runs)
    rows = combine_repeats(runs) if args.repeats > 1 else runs
    settings = {"dataset": dataset, "configuration": args.c, "trainers": args.trainers, "repeats": args.repeats,
                **{key: env.get(var, "trainer default") for key, var in SCHEDULE_VARIABLES.items()},
                "device": args.device, "tta": not args.disable_tta,
                **({} if reference is None else {"reference": reference})}
    dataset_json = Path(os.environ["nnUNet_raw"]) / dataset / "dataset.json"
    classes = class_names(json.loads(dataset_json.read_text(encoding="utf-8"))) if dataset_json.is_file() else {}
    table = write_report(out, rows, settings, time.time() - flow.start, runs, classes)
    print(f"\n{table}\n\nreport: {out / 'benchmark.md'}, {out / 'benchmark.json'}, {out / 'benchmark.png'}")
    return 0
