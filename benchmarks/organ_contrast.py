"""How far the organ stands out of the background on each domain of the domain-shift benchmark, and on domain-0
slices restyled as the trainers restyle the labeled batch. Diagnosis of the data only: no model is involved.

Per slice with at least 50 organ voxels of each test case (z-scored as nnU-Net normalises the case), in units of
the z-scored image: organ mean minus background mean, organ mean minus the mean of a ring 2-4 voxels around the
foreground (the local contrast), and the first divided by the background's sd (how far the organ stands out of
the background's own variation: bias field and noise). Rows "domain 0 restyled" take each domain-0 slice four
times, each time with a random domain-3 test slice as the style and weights drawn as the trainers draw them after
the ramp (``labeled_bias_field``'s sd of the log field, then the Fourier amplitude and the clutter field of
``labeled_appearance = "fourier_clutter"``); the last row lets the clutter field's weight reach 2.

With ``--cases`` it prints, per test case instead, the organ's mean and the ring's mean in the case's z-scores
(over the whole volume): where the organ stands against the image as a whole.

    python benchmarks/organ_contrast.py RAW_DATASET_FOLDER [--cases]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from domain_shift_probe import domain_test_cases, load_test_case
from scipy import ndimage

from nnunetv2_diffcl.dataset_conversion.synthetic import DOMAIN_STYLES
from nnunetv2_diffcl.unlabeled.perturbations import amplitude_mix, bias_field, spectrum_clutter


def organ_slices(raw: Path, domain: int, min_organ: int = 50) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, label) of every test slice of ``domain`` with at least ``min_organ`` organ voxels."""
    return [(image[k], label[k]) for image, label in domain_test_cases(raw, domain)
            for k in range(image.shape[0]) if (label[k] == 1).sum() >= min_organ]


def ring_around(label: np.ndarray) -> np.ndarray:
    """The voxels 2-4 voxels outside the foreground (any dimension)."""
    return ndimage.binary_dilation(label > 0, iterations=4) & ~ndimage.binary_dilation(label > 0, iterations=1)


def contrasts(image: np.ndarray, label: np.ndarray) -> tuple[float, float, float]:
    """Organ - background, organ - ring around the foreground, and the first over the background's sd."""
    organ, background = image[label == 1], image[label == 0]
    ring = ring_around(label)
    difference = organ.mean() - background.mean()
    return float(difference), float(organ.mean() - image[ring].mean()), float(difference / background.std())


def restyled_slices(domain0: list, styles: list, rng: np.random.Generator, bias: float,
                    mix: tuple[float, float], clutter: tuple[float, float] | None, draws: int = 4
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each domain-0 slice ``draws`` times: a bias field of log-sd U(0, ``bias``), then the Fourier amplitude of a
    random style slice at weight w ~ U(*``mix``) and its clutter field at w, or at U(*``clutter``) if given."""
    out = []
    for image, label in domain0:
        for _ in range(draws):
            x = torch.from_numpy(image)[None, None]
            style = torch.from_numpy(styles[rng.integers(len(styles))][0])[None, None]
            seed = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
            if bias > 0:
                x = bias_field(x, torch.tensor([rng.uniform(0, bias)]), seed)
            weight = torch.tensor([rng.uniform(*mix)])
            x = amplitude_mix(x, style, weight)
            field_weight = weight if clutter is None else torch.tensor([rng.uniform(*clutter)])
            out.append((spectrum_clutter(x, style, field_weight, seed)[0, 0].numpy(), label))
    return out


def row(name: str, slices: list[tuple[np.ndarray, np.ndarray]]) -> str:
    values = np.array([contrasts(image, label) for image, label in slices])
    ratio = values[:, 2]
    return (f"| {name} | {len(values)} | {values[:, 0].mean():.2f} | {values[:, 1].mean():.2f} | {ratio.mean():.2f} | "
            f"{np.percentile(ratio, 10):.2f} / {np.median(ratio):.2f} | {(values[:, 0] < 0.5).mean():.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path, help="the benchmark's raw dataset folder")
    parser.add_argument("--cases", action="store_true", help="per test case: organ and ring means in z-scores")
    args = parser.parse_args()
    if args.cases:
        print("| case | domain | organ mean (z) | ring mean (z) | organ - ring (z) |\n|---|---|---|---|---|")
        for d in range(len(DOMAIN_STYLES)):
            for path in sorted((args.raw / "imagesTs").glob(f"*_d{d}_0000.nii.gz")):
                image, label = load_test_case(args.raw, path)
                organ = image[label == 1].mean()
                ring = image[ring_around(label)].mean()
                case = path.name.replace("_0000.nii.gz", "")
                print(f"| {case} | {d} | {organ:.2f} | {ring:.2f} | {organ - ring:.2f} |")
        return
    rng = np.random.default_rng(0)
    slices = {d: organ_slices(args.raw, d) for d in range(len(DOMAIN_STYLES))}
    hardest = len(DOMAIN_STYLES) - 1
    print("| slices | n | organ - background | organ - ring | (organ - background) / background sd: mean | "
          "p10 / median | share with organ - background < 0.5 |\n|---|---|---|---|---|---|---|")
    for d, domain_slices in slices.items():
        print(row(f"domain {d}, as scanned", domain_slices))
    for name, bias, mix, clutter in (("restyle w ~ U(0, 1) (DiffCL's default)", 0.0, (0.0, 1.0), None),
                                     ("restyle w = 1", 0.0, (1.0, 1.0), None),
                                     ("bias field U(0, 1), then restyle U(0, 1)", 1.0, (0.0, 1.0), None),
                                     ("restyle U(0, 1), clutter field U(0, 2)", 0.0, (0.0, 1.0), (0.0, 2.0))):
        styled = restyled_slices(slices[0], slices[hardest], rng, bias, mix, clutter)
        print(row(f"domain 0 restyled by domain {hardest}: {name}", styled))


if __name__ == "__main__":
    main()
