"""``nnUNetv2_diffcl benchmark``: train, predict and evaluate a list of trainers with one schedule.

For a dataset in the plugin's layout (imagesTr/labelsTr, imagesTu, imagesTs + labelsTs), fold
``all``: each trainer is trained with ``nnUNetv2_train`` (a trainer whose ``checkpoint_final.pth``
exists is not retrained), predicts ``imagesTs`` with ``nnUNetv2_predict`` and is evaluated against
``labelsTs`` (Dice, Jaccard, HD95, ASD; mm and voxels). Writes ``benchmark.md`` (table),
``benchmark.json`` and ``benchmark.png`` (bar plot) into the output folder. The demo runs the same
steps through :func:`run_trainers`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_TRAINERS = ["LabeledOnlyTrainer", "CPSTrainer", "DiffCLTrainer"]
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

    def say(self, message: str) -> None:
        elapsed = int(time.time() - self.start)
        print(f"[{elapsed // 60:2d}:{elapsed % 60:02d}] {message}", flush=True)

    def run(self, name: str, args: list[str], env: dict | None = None) -> float:
        self.say(f"{name}: {' '.join(Path(args[0]).name if i == 0 else a for i, a in enumerate(args))}")
        started = time.time()
        log = self.logs / f"{name}.log"
        with open(log, "w") as f:
            result = subprocess.run(args, env=env or self.env, stdout=f, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-25:])
            raise RuntimeError(f"step '{name}' failed (exit {result.returncode}); last lines of {log}:\n{tail}")
        return time.time() - started


def tool(name: str) -> str:
    """Console scripts of the environment running this command."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


SCHEDULE_VARIABLES = {"epochs": "nnUNet_diffcl_epochs", "iterations": "nnUNet_diffcl_iterations",
                      "val_iterations": "nnUNet_diffcl_val_iterations"}
RUN_RECORD = "diffcl_benchmark_run.json"  # beside checkpoint_final.pth: the schedule it was trained with
NOT_TRAINING_OPTIONS = ("nnUNet_diffcl_scan", "nnUNet_diffcl_no_autoregister")  # same model either way


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
        raise RuntimeError(f"{fold_dir} holds an unfinished training ({present[0]}) that this benchmark did not "
                           f"start; finish it with `nnUNetv2_train ... --c` or delete {fold_dir.parent}")
    recorded = json.loads(record.read_text(encoding="utf-8"))
    if recorded["schedule"] != schedule:
        what = "was trained" if finished else "holds an unfinished training started"
        raise RuntimeError(f"{fold_dir} {what} with schedule {recorded['schedule']}, but this benchmark asks "
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
            raise RuntimeError(f"trainer {name!r} not found by nnU-Net (nor in nnUNet_extTrainer); "
                               f"`nnUNetv2_diffcl doctor` lists the plugin's trainers")
        if any(schedule.get(key) is not None for key in SCHEDULE_VARIABLES) and \
                not issubclass(cls, tuple(PLUGIN_TRAINERS)):
            raise RuntimeError(f"{name} does not read nnUNet_diffcl_epochs/_iterations/_val_iterations, so it would "
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


def run_trainers(flow: Workflow, dataset_name: str, trainers: list[str], configuration: str, device: str,
                 predictions_root: Path, training_env: dict, predict_args: list[str] | None = None,
                 step_suffix: str = "", predict_processes: tuple[int, int] = (1, 1)) -> list[dict]:
    """Train (unless finished; an interrupted training is resumed with ``--c``), predict imagesTs and evaluate
    against labelsTs, for each trainer. ``predict_processes`` are nnUNetv2_predict's ``-npp`` and ``-nps``."""
    from nnunetv2_diffcl.evaluation.evaluate import evaluate_folders
    from nnunetv2_diffcl.file_io import write_json_atomic

    raw = Path(training_env["nnUNet_raw"]) / dataset_name
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
                *(["--c"] if state == "unfinished" else [])], training_env)
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
                     "per_case_dice": {c["case"]: c["metrics"] for c in summary["per_case"]}})
        flow.say(f"{trainer}{step_suffix}: test Dice {rows[-1]['dice']:.4f}")
    return rows


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
        combined.append(row)
    return combined


def _fmt(value: float | None, sd: float | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if sd is None else f"{value:.4f} ± {sd:.4f}"


def format_table(rows: list[dict]) -> str:
    """Markdown table; with repeats, ± is the sd over repeats and each repeat's Dice gets a column."""
    repeated = _repeated(rows)
    header = "| trainer | " + " | ".join(label for _, label, _ in METRICS)
    header += " | Dice of each repeat | train time (mean) |" if repeated else " | train time |"
    lines = [header, "|" + "---|" * (len(METRICS) + 2 + repeated)]
    for r in rows:
        cells = [_fmt(r[m], r[f"{m}_sd"]) for m, _, _ in METRICS]
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
                 runs: list[dict] | None = None) -> str:
    """benchmark.md, benchmark.json (rows, every single run, settings) and benchmark.png, each written whole or
    not at all."""
    from nnunetv2_diffcl.file_io import write_json_atomic, write_text_atomic

    table = format_table(rows)
    spread = ("± is the standard deviation over repeats of each repeat's mean over test cases" if _repeated(rows)
              else "± is the standard deviation over test cases")
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


def run(args: argparse.Namespace) -> int:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    missing = [v for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results") if not os.environ.get(v)]
    if missing:
        print(f"ERROR: set {', '.join(missing)} (see nnU-Net's documentation/setting_up_paths.md)", file=sys.stderr)
        return 1
    if args.repeats < 1:
        print("ERROR: --repeats must be at least 1", file=sys.stderr)
        return 1
    if args.npp < 0 or args.nps < 0 or (args.npp == 0) != (args.nps == 0):
        print(f"ERROR: -npp {args.npp} -nps {args.nps}: give both 0 (predict in one process) or both at least 1 "
              f"(nnUNetv2_predict runs sequentially only when both are 0)", file=sys.stderr)
        return 1
    try:
        dataset = str(maybe_convert_to_dataset_name(args.d))  # numpy string otherwise
    except RuntimeError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    raw = Path(os.environ["nnUNet_raw"]) / dataset
    for sub in ("imagesTs", "labelsTs"):
        if not (raw / sub).is_dir() or not any((raw / sub).iterdir()):
            print(f"ERROR: {raw / sub} is missing or empty: the benchmark predicts imagesTs and evaluates against "
                  f"labelsTs (the converters and `nnUNetv2_diffcl synthetic` write both)", file=sys.stderr)
            return 1
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
    try:
        check_trainers(args.trainers, schedule_of(env))
        check_reusable_runs([Path(e["nnUNet_results"]) for _, e, _, _ in repeats], dataset, args.trainers, args.c,
                            schedule_of(env))
    except RuntimeError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    flow = Workflow(out, env)
    flow.say(f"benchmark of {', '.join(args.trainers)} on {dataset} ({args.c}, fold all, {args.repeats} repeat(s)) "
             f"-> {out}")
    runs = []
    try:
        for k, repeat_env, predictions, suffix in repeats:
            for row in run_trainers(flow, dataset, args.trainers, args.c, args.device, predictions, repeat_env,
                                    ["--disable_tta"] if args.disable_tta else [], suffix, (args.npp, args.nps)):
                runs.append({**row, "repeat": k})
    except RuntimeError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    rows = combine_repeats(runs) if args.repeats > 1 else runs
    settings = {"dataset": dataset, "configuration": args.c, "trainers": args.trainers, "repeats": args.repeats,
                **{key: env.get(var, "trainer default") for key, var in SCHEDULE_VARIABLES.items()},
                "device": args.device, "tta": not args.disable_tta}
    table = write_report(out, rows, settings, time.time() - flow.start, runs)
    print(f"\n{table}\n\nreport: {out / 'benchmark.md'}, {out / 'benchmark.json'}, {out / 'benchmark.png'}")
    return 0
