"""DiffCLTrainer's costs against nnU-Net's, measured side by side in one run.

    nnUNetv2_diffcl demo --out diffcl_demo                      # plans, data and trained models
    python benchmarks/bench_diffcl.py --demo-dir diffcl_demo

or, on any planned dataset with preprocessed unlabeled cases (the nnUNet_* variables set):

    python benchmarks/bench_diffcl.py -d 993 -c 2d --skip predict dice

1. Training step after the warm-up (unsupervised weight 1): nnUNetTrainer, CPSTrainer, DiffCLTrainer and the
   DiffCLTrainer_uncut (the step before the cost cuts) and the cost settings in ``SETTINGS`` (each the default
   DiffCLTrainer with some attributes changed), on the same plans and the same batch; interleaved, median, fastest
   and mean of ``--repeats`` after a warm-up (the mean for a setting that samples DS on one step in k).
2. The step's breakdown for DiffCLTrainer_uncut and the default: teacher forward, DDIM sampling, CS and DS forward and
   backward, the projection head, and the rest (losses, masks, optimiser steps, EMA, diagnostics).
3. Peak memory (VmHWM) of a fresh process taking three steps after the warm-up with each trainer.
4. ``nnUNetv2_predict`` wall time on the demo's test images with the demo's LabeledOnlyTrainer model
   vs its DiffCLTrainer model (alternating runs, medians); demo only.
5. Dice of DS's DDIM pseudo-labels against S on the test images (the demo's DiffCL model, seeded),
   with CS's Dice beside it; demo only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _measure import peak_rss_mib

DEMO_DATASET = "Dataset990_DiffCLSynthetic"

# DiffCLTrainer with these attributes changed: each cost setting against the default
SETTINGS: dict[str, dict] = {
    "S=1": {"ddim_steps": 1},
    "S=10": {"ddim_steps": 10},
    "DS full width": {"ds_width_fraction": 1.0},
    "head on every voxel": {"head_on_sampled_voxels": False},
    "DS on unlabeled": {"ds_on_unlabeled": True},
    "DS learns every 2 steps": {"ds_train_every": 2},
    "unlabeled batch 0.5": {"unlabeled_batch_ratio": 0.5},
    "unlabeled batch 1/3": {"unlabeled_batch_ratio": 1 / 3},
    "S=1, unlabeled batch 1/3": {"ddim_steps": 1, "unlabeled_batch_ratio": 1 / 3},
    "no EMA, no copy-paste": {"ema_teacher": False, "student_perturbation": "none"},
    "DS width 1/4": {"ds_width_fraction": 0.25},
    "DS width 1/4, labeled only": {"ds_width_fraction": 0.25, "ds_on_unlabeled": False},
    "unlabeled batch 2/3": {"unlabeled_batch_ratio": 2 / 3},
    "S=1, DS width 1/4, labeled only, unlabeled batch 2/3": {"ddim_steps": 1, "ds_width_fraction": 0.25,
                                                              "ds_on_unlabeled": False,
                                                              "unlabeled_batch_ratio": 2 / 3},
    "DS width 1/4, labeled only, unlabeled batch 2/3": {"ds_width_fraction": 0.25, "ds_on_unlabeled": False,
                                                         "unlabeled_batch_ratio": 2 / 3},
    "DS width 1/8, labeled only, unlabeled batch 2/3": {"ds_width_fraction": 0.125, "ds_on_unlabeled": False,
                                                         "unlabeled_batch_ratio": 2 / 3},
    "DS width 1/4, labeled only, unlabeled batch 1/3": {"ds_width_fraction": 0.25, "ds_on_unlabeled": False,
                                                         "unlabeled_batch_ratio": 1 / 3},
    "DS sampled every step": {"ds_refresh_every": 1},
    "DS sampled every 2 steps": {"ds_refresh_every": 2},
    "teacher on every step": {"teacher_refresh_with_ds": False},
    "unlabeled batch 2/3, DS labeled only": {"unlabeled_batch_ratio": 2 / 3, "ds_on_unlabeled": False},
    "DS sampled every 8 steps": {"ds_refresh_every": 8},
    "DS learns every 2 steps, sampled every 8": {"ds_train_every": 2, "ds_refresh_every": 8},
    "bank 1024 per class": {"bank_capacity": 1024},
    "128 queries per class": {"query_samples_per_class": 128},
    "HF-Mamba expand 1": {"hf_mamba_expand": 1},
    "DS learns every 2 steps, HF-Mamba expand 1": {"ds_train_every": 2, "hf_mamba_expand": 1},
    "DS learns every 3 steps": {"ds_train_every": 3},
    "bank 1024 per class, 128 queries per class": {"bank_capacity": 1024, "query_samples_per_class": 128},
}


def set_paths(demo: Path | None, results: Path) -> None:
    if demo is not None:
        os.environ.update(nnUNet_raw=str(demo / "nnUNet_raw"), nnUNet_preprocessed=str(demo / "nnUNet_preprocessed"))
    os.environ.update(nnUNet_results=str(results), nnUNet_n_proc_DA="0", nnUNet_compile="false")


def trainer_class(name: str) -> type:
    """A trainer class by name, or DiffCLTrainer with the attributes of ``SETTINGS[name]``."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2_diffcl.trainers.diffcl import DiffCLTrainer

    if name in SETTINGS:
        return type(f"DiffCLTrainer_{name}", (DiffCLTrainer,), dict(SETTINGS[name]))
    return recursive_find_trainer_class_by_name(name)


WARMUP = "@warmup"  # a trainer name with this suffix is measured in its supervised warm-up (weight 0)


def make_trainer(name: str, dataset: str, configuration: str, device: torch.device):
    """The trainer, initialised, with its semi-supervised weight past the warm-up and ramp (weight 1), or in the
    warm-up for a name ending in ``@warmup``."""
    warmup = name.endswith(WARMUP)
    name = name.removesuffix(WARMUP)
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    base = Path(os.environ["nnUNet_preprocessed"]) / maybe_convert_to_dataset_name(dataset)
    plans = json.loads((base / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # what nnUNetv2_train's get_trainer adds
    trainer = trainer_class(name)(plans, configuration, "all", json.loads((base / "dataset.json").read_text()),
                                  device)
    trainer.initialize()
    if hasattr(trainer, "ssl_step") and not warmup:
        total = trainer.num_epochs * trainer.num_iterations_per_epoch
        trainer.ssl_step = int(total * (trainer.unsupervised_warmup_fraction + trainer.unsupervised_rampup_fraction))
        trainer.ssl_step += 1  # not a diagnostics step: those are measured apart
        if trainer.unsupervised_weight() < 0.99:
            raise RuntimeError(f"{name}: the unsupervised weight is {trainer.unsupervised_weight()} after the ramp")
        fill_memory_bank(trainer)
    return trainer


def fill_memory_bank(trainer) -> None:
    """Every class's memory bank entries filled, as after the first steps of a training (``bank_samples_per_class``
    entries per class and step up to ``bank_capacity``): a fresh trainer's bank is empty and its CS predicts few voxels
    right, which would make the contrastive term, a product of queries and all entries, look cheaper than it is for
    the rest of a training."""
    aux = getattr(trainer, "auxiliary", {})
    if "memory_bank" not in aux:
        return
    bank = aux["memory_bank"].module
    generator = torch.Generator().manual_seed(0)
    entries = torch.randn(bank.num_classes * bank.capacity, bank.features.shape[-1], generator=generator)
    labels = torch.arange(bank.num_classes).repeat_interleave(bank.capacity)
    bank.push(torch.nn.functional.normalize(entries, dim=1).to(bank.features.device), labels.to(bank.features.device))


def batch_for(trainer) -> dict:
    loaders, val = trainer.get_dataloaders()
    batch = next(loaders)
    for loader in (loaders, val):
        if hasattr(loader, "_finish"):
            loader._finish()
    return batch


def synchronized(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    synchronized(device)
    start = time.perf_counter()
    fn()
    synchronized(device)
    return time.perf_counter() - start


def step_times(device: torch.device, dataset: str, configuration: str, names: list[str], repeats: int) -> dict:
    """Interleaved post-warm-up steps of every trainer on one batch (nnU-Net's trainer reads its labeled part;
    a smaller unlabeled batch is its first patches)."""
    torch.manual_seed(0)
    trainers = {n: make_trainer(n, dataset, configuration, device) for n in names}
    batch = batch_for(next(t for t in trainers.values() if hasattr(t, "ssl_step")))
    for t in trainers.values():
        t.on_train_epoch_start()

    def batch_of(trainer) -> dict:
        if not hasattr(trainer, "unlabeled_batch_size"):
            return batch
        from nnunetv2_diffcl.unlabeled.semi_supervised_loader import UNLABELED_KEY
        unlabeled = {k: v[: trainer.unlabeled_batch_size] for k, v in batch[UNLABELED_KEY].items()
                     if isinstance(v, torch.Tensor)}
        return {**batch, UNLABELED_KEY: unlabeled}

    times: dict[str, list[float]] = {n: [] for n in trainers}
    for t in trainers.values():  # warm-up
        t.train_step(batch_of(t))
    for _ in range(repeats):
        for n, t in trainers.items():
            b = batch_of(t)
            if hasattr(t, "ssl_step") and t.ssl_step % getattr(t, "diagnostics_every", 1) == 0:
                t.ssl_step += 1  # keep diagnostics steps out of the medians (1 in diagnostics_every steps)
            times[n].append(timed(device, lambda t=t, b=b: t.train_step(b)))
    medians = {n: statistics.median(v) for n, v in times.items()}
    fastest = {n: min(v) for n, v in times.items()}  # least disturbed by other work on a shared machine
    # a setting that samples or trains DS on one step in k (ds_refresh_every, ds_train_every) has two kinds of step:
    # its cost per step is the mean over a multiple of k repeats, not the median
    means = {n: statistics.fmean(v) for n, v in times.items()}
    first = next(iter(trainers.values()))
    return {"seconds": medians, f"ratio_to_{names[0]}": {n: v / medians[names[0]] for n, v in medians.items()},
            "fastest_seconds": fastest,
            f"fastest_ratio_to_{names[0]}": {n: v / fastest[names[0]] for n, v in fastest.items()},
            "mean_seconds": means, f"mean_ratio_to_{names[0]}": {n: v / means[names[0]] for n, v in means.items()},
            "patch_size": list(first.configuration_manager.patch_size), "batch_size": first.batch_size,
            "repeats": repeats}


def step_breakdown(device: torch.device, dataset: str, configuration: str, name: str, repeats: int) -> dict:
    """Fastest seconds of each part of one DiffCL step, each run on its own on the same batch, and the whole."""
    from nnunetv2_diffcl.losses.pseudo_labels import full_resolution, split_batch
    from nnunetv2_diffcl.network_architectures.cnn_branch import forward_capturing_features
    from nnunetv2_diffcl.unlabeled.semi_supervised_loader import UNLABELED_KEY

    torch.manual_seed(0)
    trainer = make_trainer(name, dataset, configuration, device)
    batch = batch_for(trainer)
    trainer.on_train_epoch_start()
    data = batch["data"].to(device)
    target = [t.to(device) for t in batch["target"]] if isinstance(batch["target"], list) else \
        batch["target"].to(device)
    target_full = target[0] if isinstance(target, list) else target
    data_u = batch[UNLABELED_KEY]["data"][: trainer.unlabeled_batch_size].to(device)
    n = data.shape[0]
    both = torch.cat([data, data_u])

    def teacher() -> None:
        with torch.no_grad():
            trainer.teacher(trainer.primary_name)(data_u)

    def cs() -> None:
        out, _ = forward_capturing_features(trainer.network, trainer._bare(trainer.network).decoder, both)
        trainer.loss(split_batch(out, n)[0], target).backward()
        trainer.network.zero_grad(set_to_none=True)

    query_target = target_full[: data_u.shape[0]]  # a label map of the unlabeled batch's shape

    def cs_with_head() -> None:
        out, features = forward_capturing_features(trainer.network, trainer._bare(trainer.network).decoder, both)
        cs_l = split_batch(out, n)[0]
        contrast, _ = trainer.contrastive_loss(*split_batch(features, n), target_full, full_resolution(cs_l),
                                               query_target)
        (trainer.loss(cs_l, target) + contrast).backward()
        trainer.network.zero_grad(set_to_none=True)

    ds_images = both if trainer.ds_on_unlabeled else data
    ds_labels = torch.cat([target_full, query_target]) if trainer.ds_on_unlabeled else target_full

    def ds() -> None:
        out = trainer.ds_train_forward(ds_images, ds_labels)
        trainer.loss(split_batch(out, n)[0], target).backward()
        trainer.auxiliary["ds"].module.zero_grad(set_to_none=True)

    k, k_ds = trainer.ds_refresh_every, trainer.ds_train_every
    whole = math.lcm(k, k_ds)
    # the parts that run once per k steps (DDIM sampling; the teacher when cached with it; DS's training with
    # ds_train_every) and the whole step are reported per step: one in k of the part, lcm whole steps divided by lcm
    teacher_every = k if trainer.caches_teacher_logits else 1
    teacher_name = "teacher forward" + (f" (1 step in {k})" if teacher_every > 1 else "")
    ddim_name = f"DDIM sampling (S={trainer.ddim_steps}, 1 step in {k})"
    ds_name = "DS forward + backward" + (f" (1 step in {k_ds})" if k_ds > 1 else "")
    per_step = {teacher_name: teacher_every, ddim_name: k, ds_name: k_ds, "whole step": whole}
    parts = {teacher_name: teacher, ddim_name: lambda: trainer.ds_pseudo_logits(data_u),
             "CS forward + backward": cs, ds_name: ds}
    if trainer.use_contrastive:
        parts["projection head + contrastive loss"] = cs_with_head
    batch_for_step = {**batch, UNLABELED_KEY: {**batch[UNLABELED_KEY], "data": batch[UNLABELED_KEY]["data"][
        : trainer.unlabeled_batch_size]}}

    def whole_steps() -> None:
        for _ in range(whole):
            if trainer.ssl_step % trainer.diagnostics_every == 0:
                trainer.ssl_step += 1
            trainer.train_step(batch_for_step)

    parts["whole step"] = whole_steps
    times: dict[str, list[float]] = {name: [] for name in parts}
    for fn in parts.values():
        fn()
    for _ in range(repeats):
        for name, fn in parts.items():
            times[name].append(timed(device, fn) / per_step.get(name, 1))
    medians = {name: min(v) for name, v in times.items()}  # least disturbed by other work on a shared machine
    if "projection head + contrastive loss" in medians:  # measured as CS with the head; the head alone:
        medians["projection head + contrastive loss"] -= medians["CS forward + backward"]
    medians["rest (losses, masks, optimiser steps, EMA)"] = medians["whole step"] - sum(
        v for k, v in medians.items() if k != "whole step")
    return medians


def memory_child(name: str, dataset: str, configuration: str, device: str) -> None:
    trainer = make_trainer(name, dataset, configuration, torch.device(device))
    batch = batch_for(trainer)
    trainer.on_train_epoch_start()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        trainer.train_step(batch)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mib()
    print(json.dumps({"peak_mib": peak}))


def peak_memory(name: str, args: argparse.Namespace) -> float:
    demo = ["--demo-dir", str(args.demo_dir)] if args.demo_dir else []
    out = subprocess.run([sys.executable, __file__, *demo, "-d", args.d, "-c", args.c, "--device", args.device,
                          "--memory-child", name], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def predict_times(demo: Path, device: str, repeats: int) -> dict:
    tool = str(Path(sys.executable).parent / "nnUNetv2_predict")
    env = {**os.environ, "nnUNet_results": str(demo / "nnUNet_results")}
    times: dict[str, list[float]] = {"LabeledOnlyTrainer": [], "DiffCLTrainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for trainer in times:
                start = time.perf_counter()
                subprocess.run([tool, "-i", str(demo / "nnUNet_raw" / DEMO_DATASET / "imagesTs"), "-o",
                                f"{tmp}/{trainer}", "-d", "990", "-c", "3d_fullres", "-f", "all", "-tr", trainer,
                                "-device", device, "-npp", "1", "-nps", "1"], env=env, check=True,
                               capture_output=True)
                times[trainer].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds": medians, "ratio": medians["DiffCLTrainer"] / medians["LabeledOnlyTrainer"]}


def to_patch(array: np.ndarray, patch: list[int]) -> np.ndarray:
    """Centre-crop or zero-pad the spatial axes (last len(patch)) to the patch size."""
    out = array
    for axis, size in zip(range(array.ndim - len(patch), array.ndim), patch):
        n = out.shape[axis]
        if n > size:
            start = (n - size) // 2
            out = np.take(out, range(start, start + size), axis=axis)
        elif n < size:
            pad = [(0, 0)] * out.ndim
            pad[axis] = ((size - n) // 2, size - n - (size - n) // 2)
            out = np.pad(out, pad)
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2 * (a & b).sum() / denom)


def pseudo_label_dice(demo: Path, device: torch.device, ddim_steps: list[int], seeds: int) -> dict:
    trainer = make_trainer("DiffCLTrainer", DEMO_DATASET, "3d_fullres", device)
    checkpoint = demo / "nnUNet_results" / DEMO_DATASET / "DiffCLTrainer__nnUNetPlans__3d_fullres" / "fold_all" / \
        "checkpoint_final.pth"
    trainer.load_checkpoint(str(checkpoint))
    raw = demo / "nnUNet_raw" / DEMO_DATASET
    preprocessor = trainer.configuration_manager.preprocessor_class(verbose=False)
    patch = list(trainer.configuration_manager.patch_size)
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    result: dict[str, list[float]] = {"CS": []} | {f"S={s}": [] for s in ddim_steps}
    for label_file in sorted((raw / "labelsTs").glob("*.nii.gz")):
        case = label_file.name[: -len(".nii.gz")]
        data, seg, _ = preprocessor.run_case([str(raw / "imagesTs" / f"{case}_0000.nii.gz")], str(label_file),
                                             trainer.plans_manager, trainer.configuration_manager,
                                             trainer.dataset_json)
        image = torch.from_numpy(to_patch(data, patch)[None]).float().to(device)
        reference = to_patch(seg[0], patch) > 0
        with torch.no_grad():
            result["CS"].append(dice(trainer.network(image).argmax(1)[0].cpu().numpy() > 0, reference))
        for s in ddim_steps:
            for seed in range(seeds):
                generator = torch.Generator(device="cpu").manual_seed(seed)
                logits = trainer.diffusion.sample_logits(image, generator, steps=s)
                label = logits.argmax(1)[0].cpu().numpy() > 0
                result[f"S={s}"].append(dice(label, reference))
    return {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for k, v in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", type=Path, help="a finished demo's folder (its data and models); without "
                        "it the nnUNet_* variables say where -d is")
    parser.add_argument("-d", default=DEMO_DATASET, help="dataset (default: the demo's)")
    parser.add_argument("-c", default="3d_fullres", help="configuration")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trainers", nargs="+", default=["nnUNetTrainer", "CPSTrainer", "DiffCLTrainer",
                                                                 "DiffCLTrainer_uncut", f"DiffCLTrainer{WARMUP}",
                                                                 f"CPSTrainer{WARMUP}", *SETTINGS],
                        help=f"trainer class names or DiffCL settings ({', '.join(SETTINGS)}), each measured after "
                             f"the warm-up, or in it with the suffix {WARMUP}; the first is the reference of the "
                             "ratios")
    parser.add_argument("--breakdown", nargs="*", default=["DiffCLTrainer_uncut", "DiffCLTrainer"],
                        help="trainers whose step is broken down")
    parser.add_argument("--dice-steps", type=int, nargs="+", default=[1, 2, 3, 5, 10, 20])
    parser.add_argument("--seeds", type=int, default=3, help="DDIM seeds per case for the Dice-vs-S table")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=["step", "breakdown", "memory", "predict", "dice"])
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    demo = args.demo_dir.resolve() if args.demo_dir else None
    skip = set(args.skip) | ({"predict", "dice"} if demo is None else set())
    with tempfile.TemporaryDirectory() as results:
        set_paths(demo, Path(results))
        if args.memory_child:
            memory_child(args.memory_child, args.d, args.c, args.device)
            return
        device = torch.device(args.device)
        report: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                   f"device {args.device}, torch {torch.__version__}, threads {args.threads}",
                        "dataset": args.d, "configuration": args.c}
        if "step" not in skip:
            report["train_step"] = step_times(device, args.d, args.c, args.trainers, args.repeats)
            print(json.dumps(report["train_step"], indent=2), flush=True)
        if "breakdown" not in skip:
            report["breakdown_seconds"] = {n: step_breakdown(device, args.d, args.c, n, args.repeats)
                                           for n in args.breakdown}
            print(json.dumps(report["breakdown_seconds"], indent=2), flush=True)
        if "memory" not in skip:
            report["peak_memory_mib"] = {n: peak_memory(n, args) for n in (args.trainers[0], "DiffCLTrainer")}
        if "predict" not in skip:
            report["predict"] = predict_times(demo, args.device, max(1, args.repeats // 2))
        if "dice" not in skip:
            report["ds_pseudo_label_dice"] = pseudo_label_dice(demo, device, args.dice_steps, args.seeds)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
