"""A synthetic 3D segmentation dataset with MRI-like appearance, made on the fly (no downloads).

Each case holds one target structure (label 1): a smooth, irregular blob of varying size, shape and
position. What makes it hard enough to show the value of unlabeled data:

- distractors of similar brightness: tubes ("vessels") and small round blobs that are not labelled,
  some of them touching the target;
- a smooth multiplicative intensity inhomogeneity (bias field) that differs per case;
- Rician noise, as in magnitude MRI;
- partial volume: shapes are rendered at twice the resolution and averaged down, so boundary voxels
  have intermediate intensities (the label is the majority of the fine voxels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nnunetv2_diffcl.datasets.raw_layout import RawDatasetWriter


@dataclass
class SyntheticConfig:
    shape: tuple[int, int, int] = (40, 40, 40)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    target_intensity: float = 0.75
    background_intensity: float = 0.3
    noise_sigma: float = 0.06
    bias_strength: float = 0.35
    max_distractors: int = 4


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std random field with correlation length ``sigma`` (in voxels)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-8)


def _blob(grid: list[np.ndarray], center: np.ndarray, radii: np.ndarray, wobble: np.ndarray) -> np.ndarray:
    """Occupancy of an ellipsoid whose surface is displaced by a smooth field."""
    dist = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)))
    return dist + wobble < 1.0


def _tube(grid: list[np.ndarray], point: np.ndarray, direction: np.ndarray, radius: float) -> np.ndarray:
    """Occupancy of an infinite cylinder (a vessel crossing the field of view)."""
    rel = [g - p for g, p in zip(grid, point)]
    along = sum(r * d for r, d in zip(rel, direction))
    perp2 = sum((r - along * d) ** 2 for r, d in zip(rel, direction))
    return perp2 < radius ** 2


def make_case(rng: np.random.Generator, config: SyntheticConfig = SyntheticConfig()) -> tuple[np.ndarray, np.ndarray]:
    """One (image, label) pair in array order (z, y, x); image float32, label uint8 in {0, 1}."""
    shape = np.array(config.shape)
    fine_shape = tuple(int(s) * 2 for s in shape)
    grid = list(np.meshgrid(*[np.arange(s, dtype=np.float32) / 2 for s in fine_shape], indexing="ij"))

    # target: irregular blob, somewhere in the central region, 15-30 % of the field of view per axis
    radii = shape * rng.uniform(0.15, 0.3, size=3)
    center = shape * rng.uniform(0.38, 0.62, size=3)
    wobble = 0.25 * _smooth_field(rng, fine_shape, sigma=6.0)
    target = _blob(grid, center, radii, wobble)

    distractors = np.zeros(fine_shape, dtype=bool)
    for _ in range(rng.integers(1, config.max_distractors + 1)):
        if rng.random() < 0.5:
            direction = rng.standard_normal(3)
            direction /= np.linalg.norm(direction)
            distractors |= _tube(grid, shape * rng.uniform(0.1, 0.9, 3), direction, rng.uniform(1.0, 2.5))
        else:
            small = shape * rng.uniform(0.05, 0.11, size=3)
            distractors |= _blob(grid, shape * rng.uniform(0.1, 0.9, 3), small, 0.0)
    distractors &= ~target

    fine = np.full(fine_shape, config.background_intensity, dtype=np.float32)
    fine += 0.05 * _smooth_field(rng, fine_shape, sigma=2.0)  # tissue texture
    fine[distractors] = config.target_intensity * rng.uniform(0.9, 1.1)
    fine[target] = config.target_intensity
    # average 2x2x2 blocks: partial volume at every boundary
    image = fine.reshape(shape[0], 2, shape[1], 2, shape[2], 2).mean(axis=(1, 3, 5))
    label = target.reshape(shape[0], 2, shape[1], 2, shape[2], 2).mean(axis=(1, 3, 5)) >= 0.5

    bias = np.exp(config.bias_strength * _smooth_field(rng, tuple(shape), sigma=float(shape.max()) / 3))
    image = image * bias
    noise_a = rng.normal(0.0, config.noise_sigma, image.shape)
    noise_b = rng.normal(0.0, config.noise_sigma, image.shape)
    image = np.sqrt((image + noise_a) ** 2 + noise_b ** 2)  # Rician magnitude noise
    return (image * 1000).astype(np.float32), label.astype(np.uint8)


def write_synthetic_dataset(raw_root: str | os.PathLike, dataset_id: int = 990, name: str = "DiffCLSynthetic",
                            num_labeled: int = 4, num_unlabeled: int = 16, num_test: int = 6, seed: int = 0,
                            config: SyntheticConfig = SyntheticConfig(), overwrite: bool = False) -> str:
    """Write a dataset in nnU-Net raw format: imagesTr/labelsTr, imagesTu, imagesTs + labelsTs."""
    rng = np.random.default_rng(seed)
    writer = RawDatasetWriter(raw_root, dataset_id, name, {0: "MRI"}, {"background": 0, "target": 1},
                              overwrite=overwrite)
    with writer:
        index = 0
        for subset, count in (("labeled", num_labeled), ("unlabeled", num_unlabeled), ("test", num_test)):
            for _ in range(count):
                image, label = make_case(rng, config)
                writer.add_case(subset, f"syn_{index:03d}", [image], None if subset == "unlabeled" else label,
                                spacing=config.spacing)
                index += 1
        folder = writer.finish(seed=seed, license="synthetic, CC0", source="nnunetv2_diffcl.datasets.synthetic",
                               shape=list(config.shape), spacing=list(config.spacing))
    return str(folder)
