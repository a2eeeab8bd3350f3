"""One training step of the HF-Mamba CNN branch against nnU-Net's plain planned network.

Both networks come from the same 3D fullres-like PlainConvUNet plan (as nnU-Net's planner makes it
for the patch: 32 features doubling to at most 320, pooling down to a 4-8 voxel bottleneck), batch 2,
one input channel, 3 classes, deep supervision on, nnU-Net's Dice + CE loss with its deep
supervision weights, SGD with nnU-Net's momentum. Times are medians of interleaved repeats (plain,
HF-Mamba, plain, ...) after warm-up. Peak memory: on CUDA torch.cuda.max_memory_allocated; on CPU
each network runs two steps in fresh subprocesses that report their peak resident set size
(VmHWM, which includes about 0.8 GiB of imported libraries; median of --memory-runs).

    python benchmarks/bench_hf_mamba_step.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from _measure import peak_rss_mib
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunetv2_diffcl.network_architectures.cnn_branch import build_hf_mamba_network_from_arch
from nnunetv2_diffcl.network_architectures.selective_scan import describe_scan_backend

NUM_CLASSES = 3
PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
REQ_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def plan(patch: int) -> dict:
    """nnU-Net-like 3D fullres PlainConvUNet kwargs for an isotropic patch."""
    n_pool = 0
    size = patch
    while size % 2 == 0 and size // 2 >= 4 and n_pool < 5:
        size //= 2
        n_pool += 1
    n_stages = n_pool + 1
    return {
        "n_stages": n_stages,
        "features_per_stage": [min(32 * 2**i, 320) for i in range(n_stages)],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * n_stages,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * n_pool,
        "n_conv_per_stage": [2] * n_stages,
        "n_conv_per_stage_decoder": [2] * (n_stages - 1),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }


def build(kind: str, patch: int, stages: int) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = plan(patch)
    if kind == "plain":
        return get_network_from_plans(PLAIN, kwargs, REQ_IMPORT, 1, NUM_CLASSES, deep_supervision=True)
    return build_hf_mamba_network_from_arch(PLAIN, kwargs, REQ_IMPORT, 1, NUM_CLASSES,
                                            enable_deep_supervision=True, hf_mamba_stages=stages)


class Stepper:
    """Network, optimizer, loss and a fixed batch: ``step()`` is one nnU-Net-style training step."""

    def __init__(self, kind: str, patch: int, stages: int, device: torch.device) -> None:
        self.device = device
        self.net = build(kind, patch, stages).to(device)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
        n_out = plan(patch)["n_stages"] - 1
        weights = np.array([1 / 2**i for i in range(n_out)])
        weights[-1] = 0
        self.loss = DeepSupervisionWrapper(
            DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                           weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss),
            weights / weights.sum(),
        )
        g = torch.Generator().manual_seed(1)
        self.data = torch.randn(2, 1, patch, patch, patch, generator=g).to(device)
        label = torch.randint(0, NUM_CLASSES, (2, 1, patch, patch, patch), generator=g).float()
        self.target = [torch.nn.functional.interpolate(label, scale_factor=0.5**i, mode="nearest").to(device)
                       for i in range(n_out)]

    def step(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            loss = self.loss(self.net(self.data), self.target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 12)
        self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def memory_child(kind: str, patch: int, stages: int, steps: int) -> None:
    """Subprocess entry: run a few steps on the CPU and print the peak RSS in MiB."""
    stepper = Stepper(kind, patch, stages, torch.device("cpu"))
    for _ in range(steps):
        stepper.step()
    print(json.dumps({"max_rss_mib": peak_rss_mib()}))


def cpu_peak_mib(kind: str, patch: int, stages: int, threads: int | None, runs: int) -> float:
    """Median over ``runs`` fresh subprocesses: max RSS varies by ~100 MiB from run to run."""
    cmd = [sys.executable, __file__, "--memory-child", kind, "--patches", str(patch), "--stages", str(stages)]
    if threads:
        cmd += ["--threads", str(threads)]
    peaks = []
    for _ in range(runs):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        peaks.append(json.loads(out.strip().splitlines()[-1])["max_rss_mib"])
    return statistics.median(peaks)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--patches", type=int, nargs="+", default=[48, 64], help="isotropic patch edge")
    parser.add_argument("--stages", type=int, default=1, help="hf_mamba_stages (1 = bottleneck only)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--memory-runs", type=int, default=3, help="CPU: subprocesses per network (median)")
    parser.add_argument("--skip-timing", action="store_true", help="only measure peak memory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-child", choices=["plain", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.patches[0], args.stages, steps=2)
        return
    device = torch.device(args.device)
    print(f"device {device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; scan backend: {describe_scan_backend()}")
    print(f"batch 2, PlainConvUNet 3D, hf_mamba_stages {args.stages}, median of {args.repeats} interleaved "
          f"steps after {args.warmup} warm-up steps each")
    print("| patch | bottleneck tokens | plain step (s) | HF-Mamba step (s) | ratio | plain peak (MiB) | "
          "HF-Mamba peak (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for patch in args.patches:
        kw = plan(patch)
        tokens = (patch // 2 ** (kw["n_stages"] - 1)) ** 3
        steppers = {"plain": Stepper("plain", patch, args.stages, device),
                    "hf": Stepper("hf", patch, args.stages, device)}
        for s in steppers.values():
            for _ in range(0 if args.skip_timing else args.warmup):
                s.step()
        times: dict[str, list] = {k: [float("nan")] for k in steppers}
        for _ in range(0 if args.skip_timing else args.repeats):
            for k, s in steppers.items():
                times[k].append(s.step())
        med = {k: statistics.median(v[1:] or v) for k, v in times.items()}
        if device.type == "cuda":
            peaks = {}
            for k in steppers:
                del steppers[k].opt
            steppers.clear()
            torch.cuda.empty_cache()
            for k in ("plain", "hf"):
                torch.cuda.reset_peak_memory_stats()
                stepper = Stepper(k, patch, args.stages, device)
                stepper.step()
                stepper.step()
                peaks[k] = torch.cuda.max_memory_allocated() / 2**20
                del stepper
                torch.cuda.empty_cache()
        else:
            del steppers
            peaks = {k: cpu_peak_mib(k, patch, args.stages, args.threads, args.memory_runs)
                     for k in ("plain", "hf")}
        ratio = med["hf"] / med["plain"]
        print(f"| {patch}^3 | {tokens} | {med['plain']:.2f} | {med['hf']:.2f} | {ratio:.3f} | "
              f"{peaks['plain']:.0f} | {peaks['hf']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
