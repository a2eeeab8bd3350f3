"""Forward+backward time of the own selective scans (chunked; sequential with its own backward) against the
step-by-step loop.

Mamba's shapes inside HF-Mamba at the bottleneck: batch 2, d_inner 256 (d_model 128), d_state 16,
with 216 (6^3), 1728 (12^3) and 4096 (16^3) tokens. Runs on CPU or CUDA. The 2d benchmark's bottleneck
(64 x 64 patch, 512 features, 3 + 3 patches):

    python benchmarks/bench_selective_scan.py --threads 2
    python benchmarks/bench_selective_scan.py --threads 2 --batch 6 --d-inner 1024 --lengths 16 32 64
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from nnunetv2_diffcl.network_architectures.selective_scan import (
    describe_scan_backend,
    mamba_ssm_scan_fn,
    selective_scan_loop,
    selective_scan_sequential,
    selective_scan_torch,
)


def make_inputs(batch: int, d_inner: int, d_state: int, length: int, device: torch.device) -> list:
    g = torch.Generator().manual_seed(0)
    shapes = {
        "u": (batch, d_inner, length),
        "delta": (batch, d_inner, length),
        "A": (d_inner, d_state),
        "B": (batch, d_state, length),
        "C": (batch, d_state, length),
        "D": (d_inner,),
        "z": (batch, d_inner, length),
        "delta_bias": (d_inner,),
    }
    t = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    t["A"] = -torch.exp(t["A"])
    return [v.to(device).requires_grad_(True) for v in t.values()]


def step_time(fn: Callable, inputs: list, device: torch.device) -> float:
    """Seconds for one forward + backward, Mamba's options (D, z, delta_bias, softplus)."""
    u, delta, a, b, c, d, z, delta_bias = inputs
    for x in inputs:
        x.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(u, delta, a, b, c, d, z=z, delta_bias=delta_bias, delta_softplus=True)
    out.sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[216, 1728, 4096])
    parser.add_argument("--d-inner", type=int, default=256)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per backend (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    backends: dict[str, Callable] = {"chunked": selective_scan_torch, "sequential": selective_scan_sequential,
                                     "loop": selective_scan_loop}
    fn, _ = mamba_ssm_scan_fn()
    if fn is not None and device.type == "cuda":
        backends["mamba_ssm"] = fn
    print(f"device {device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; scan backend: {describe_scan_backend()}")
    print(f"batch {args.batch}, d_inner {args.d_inner}, d_state {args.d_state}, forward+backward, "
          f"median of {args.repeats} (interleaved, after one warm-up)")
    header = "| tokens | " + " | ".join(f"{k} (s)" for k in backends) + " | loop / chunked |"
    print(header)
    print("|" + "---|" * (len(backends) + 2))
    for length in args.lengths:
        inputs = make_inputs(args.batch, args.d_inner, args.d_state, length, device)
        times: dict[str, list] = {k: [] for k in backends}
        for f in backends.values():  # warm-up
            step_time(f, inputs, device)
        for _ in range(args.repeats):
            for name, f in backends.items():
                times[name].append(step_time(f, inputs, device))
        med = {k: statistics.median(v) for k, v in times.items()}
        cells = " | ".join(f"{med[k]:.3f}" for k in backends)
        print(f"| {length} | {cells} | {med['loop'] / med['chunked']:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
