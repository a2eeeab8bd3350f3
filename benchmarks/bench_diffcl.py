"""DiffCLTrainer's costs against nnU-Net's, measured side by side in one run, on a finished demo.

    nnUNetv2_diffcl demo --out diffcl_demo                      # plans, data and trained models
    python benchmarks/bench_diffcl.py --demo-dir diffcl_demo

1. Training step: ``nnUNetTrainer.train_step`` vs ``DiffCLTrainer.train_step`` on the same plans and the
   same labeled batch (DiffCL also gets its unlabeled batch), for each DDIM step count S in
   ``--ddim-steps``; interleaved, median of ``--repeats`` after a warm-up.
2. Peak memory (VmHWM) of a fresh process taking three steps with each trainer.
3. ``nnUNetv2_predict`` wall time on the demo's test images with the demo's LabeledOnlyTrainer model
   vs its DiffCLTrainer model (alternating runs, medians).
4. Dice of DS's DDIM pseudo-labels against S on the test images (the demo's DiffCL model, seeded),
   with CS's Dice beside it: the data for choosing the default S.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _measure import peak_rss_mib

DATASET = "Dataset990_DiffCLSynthetic"


def set_paths(demo: Path, results: Path) -> None:
    os.environ.update(nnUNet_raw=str(demo / "nnUNet_raw"), nnUNet_preprocessed=str(demo / "nnUNet_preprocessed"),
                      nnUNet_results=str(results), nnUNet_n_proc_DA="0", nnUNet_compile="false")


def make_trainer(name: str, device: torch.device):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2_diffcl.trainers.diffcl import DiffCLTrainer

    cls = {"nnUNetTrainer": nnUNetTrainer, "DiffCLTrainer": DiffCLTrainer}[name]
    base = Path(os.environ["nnUNet_preprocessed"]) / DATASET
    plans = json.loads((base / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    trainer = cls(plans, "3d_fullres", "all", json.loads((base / "dataset.json").read_text()), device)
    trainer.initialize()
    return trainer


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


def step_times(device: torch.device, ddim_steps: list[int], repeats: int) -> dict:
    from nnunetv2_diffcl.diffusion import DDIMSampler

    torch.manual_seed(0)
    diffcl = make_trainer("DiffCLTrainer", device)
    plain = make_trainer("nnUNetTrainer", device)
    batch = batch_for(diffcl)  # labeled + unlabeled; nnUNetTrainer reads only the labeled part
    for t in (diffcl, plain):
        t.on_train_epoch_start()
    candidates = {"nnUNetTrainer": plain.train_step}
    samplers = {s: DDIMSampler(diffcl.schedule, s) for s in ddim_steps}

    def diffcl_step(s: int):
        def run(b: dict) -> dict:
            diffcl.sampler = samplers[s]
            return diffcl.train_step(b)
        return run

    for s in ddim_steps:
        candidates[f"DiffCLTrainer S={s}"] = diffcl_step(s)
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for step in candidates.values():  # warm-up
        step(batch)
    for _ in range(repeats):
        for k, step in candidates.items():
            synchronized(device)
            start = time.perf_counter()
            step(batch)
            synchronized(device)
            times[k].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds": medians, "ratio_to_nnunet": {k: v / medians["nnUNetTrainer"] for k, v in medians.items()},
            "patch_size": list(diffcl.configuration_manager.patch_size), "batch_size": diffcl.batch_size}


def memory_child(name: str, device: str) -> None:
    trainer = make_trainer(name, torch.device(device))
    batch = batch_for(trainer)
    trainer.on_train_epoch_start()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        trainer.train_step(batch)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mib()
    print(json.dumps({"peak_mib": peak}))


def peak_memory(name: str, device: str, demo: Path) -> float:
    out = subprocess.run([sys.executable, __file__, "--demo-dir", str(demo), "--device", device,
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
                subprocess.run([tool, "-i", str(demo / "nnUNet_raw" / DATASET / "imagesTs"), "-o",
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
    from nnunetv2_diffcl.diffusion import DDIMSampler

    trainer = make_trainer("DiffCLTrainer", device)
    checkpoint = demo / "nnUNet_results" / DATASET / "DiffCLTrainer__nnUNetPlans__3d_fullres" / "fold_all" / \
        "checkpoint_final.pth"
    trainer.load_checkpoint(str(checkpoint))
    raw = demo / "nnUNet_raw" / DATASET
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
            trainer.sampler = DDIMSampler(trainer.schedule, s)
            for seed in range(seeds):
                generator = torch.Generator(device="cpu").manual_seed(seed)
                label = trainer.sample_ds_pseudo_label(image, generator)[0, 0].cpu().numpy() > 0
                result[f"S={s}"].append(dice(label, reference))
    return {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for k, v in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", required=True, type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ddim-steps", type=int, nargs="+", default=[10, 1, 3])
    parser.add_argument("--dice-steps", type=int, nargs="+", default=[1, 2, 3, 5, 10, 20])
    parser.add_argument("--seeds", type=int, default=3, help="DDIM seeds per case for the Dice-vs-S table")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=["step", "memory", "predict", "dice"])
    parser.add_argument("--memory-child", choices=["nnUNetTrainer", "DiffCLTrainer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    demo = args.demo_dir.resolve()
    with tempfile.TemporaryDirectory() as results:
        set_paths(demo, Path(results))
        if args.memory_child:
            memory_child(args.memory_child, args.device)
            return
        device = torch.device(args.device)
        report: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                   f"device {args.device}, torch {torch.__version__}, threads {args.threads}"}
        if "step" not in args.skip:
            report["train_step"] = step_times(device, args.ddim_steps, args.repeats)
        if "memory" not in args.skip:
            report["peak_memory_mib"] = {n: peak_memory(n, args.device, demo)
                                         for n in ("nnUNetTrainer", "DiffCLTrainer")}
        if "predict" not in args.skip:
            report["predict"] = predict_times(demo, args.device, max(1, args.repeats // 2))
        if "dice" not in args.skip:
            report["ds_pseudo_label_dice"] = pseudo_label_dice(demo, device, args.dice_steps, args.seeds)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
