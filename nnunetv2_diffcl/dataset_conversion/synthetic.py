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
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from nnunetv2_diffcl.dataset_conversion.raw_layout import RawDatasetWriter


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
        folder = writer.finish(seed=seed, license="synthetic, CC0", source=__name__,
                               shape=list(config.shape), spacing=list(config.spacing))
    return str(folder)


# ------------------------------------------------------------------------------------------------------------
# The domain-shift benchmark: two foreground classes, four scanner-like appearance domains
# ------------------------------------------------------------------------------------------------------------
DOMAIN_LABELS = {"background": 0, "organ": 1, "lesion": 2}


@dataclass(frozen=True)
class DomainStyle:
    """How one "scanner" renders the same anatomy: tissue intensities, contrast curve, bias, noise, blur.

    The intensities are before the contrast curve ``x -> x ** gamma``; ``bias_strength`` scales the log of a
    smooth multiplicative field, ``noise_sigma`` is the Rician noise level, ``blur_sigma`` (voxels) the
    point-spread function's Gaussian width.
    """

    background: float
    organ: float
    lesion: float
    gamma: float
    bias_strength: float
    noise_sigma: float
    blur_sigma: float

    def contrast(self) -> float:
        """Organ-to-background intensity difference after the contrast curve (no bias, noise or blur)."""
        return self.organ ** self.gamma - self.background ** self.gamma


# Domain 0 is the labeled scanner: clean and high-contrast. Each further domain is further away from it, in
# every respect at once and beyond the ranges nnU-Net's augmentation draws (gamma 0.7-1.5, noise variance
# up to 0.1 of the normalised image, blur sigma 0.5-1): lower contrast, another contrast curve, stronger
# bias, more noise, more blur.
DOMAIN_STYLES: tuple[DomainStyle, ...] = (
    DomainStyle(background=0.25, organ=0.70, lesion=0.95, gamma=1.0, bias_strength=0.10, noise_sigma=0.03,
                blur_sigma=0.0),
    DomainStyle(background=0.30, organ=0.65, lesion=0.90, gamma=0.75, bias_strength=0.20, noise_sigma=0.06,
                blur_sigma=0.7),
    DomainStyle(background=0.30, organ=0.62, lesion=0.85, gamma=1.6, bias_strength=0.25, noise_sigma=0.08,
                blur_sigma=1.0),
    DomainStyle(background=0.35, organ=0.62, lesion=0.85, gamma=0.7, bias_strength=0.25, noise_sigma=0.09,
                blur_sigma=1.2),
)


def make_domain_case(rng: np.random.Generator, shape: tuple[int, int, int], style: DomainStyle
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One (image, label) pair in array order (z, y, x): label 1 an organ, label 2 a small lesion inside it.

    The anatomy (organ, lesion, vessel-like distractors of organ brightness) is drawn from ``rng``
    independently of the style, so every domain shows the same distribution of shapes.
    """
    shape_a = np.array(shape)
    fine_shape = tuple(int(s) * 2 for s in shape_a)
    grid = list(np.meshgrid(*[np.arange(s, dtype=np.float32) / 2 for s in fine_shape], indexing="ij"))

    radii = shape_a * rng.uniform(0.18, 0.3, size=3)
    center = shape_a * rng.uniform(0.4, 0.6, size=3)
    organ = _blob(grid, center, radii, 0.2 * _smooth_field(rng, fine_shape, sigma=6.0))
    # the lesion: 2-4 voxels in radius, centred inside the organ, half-way to its boundary
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    lesion_center = center + 0.45 * radii * direction
    lesion = _blob(grid, lesion_center, rng.uniform(2.0, 4.0, size=3), 0.0) & organ

    distractors = np.zeros(fine_shape, dtype=bool)
    for _ in range(rng.integers(1, 4)):
        tube_dir = rng.standard_normal(3)
        tube_dir /= np.linalg.norm(tube_dir)
        distractors |= _tube(grid, shape_a * rng.uniform(0.1, 0.9, 3), tube_dir, rng.uniform(1.0, 2.0))
    distractors &= ~organ
    texture = _smooth_field(rng, fine_shape, sigma=2.0)
    bias_field = _smooth_field(rng, tuple(shape_a), sigma=float(shape_a.max()) / 3)
    noise = rng.standard_normal((2, *shape_a))

    fine = np.full(fine_shape, style.background, dtype=np.float32)
    fine[distractors] = style.organ
    fine[organ] = style.organ
    fine[lesion] = style.lesion
    fine += 0.03 * texture
    fine = np.clip(fine, 0.0, None) ** style.gamma
    image = fine.reshape(shape_a[0], 2, shape_a[1], 2, shape_a[2], 2).mean(axis=(1, 3, 5))
    if style.blur_sigma > 0:
        image = ndimage.gaussian_filter(image, style.blur_sigma)
    label = np.zeros(tuple(shape_a), dtype=np.uint8)
    label[organ.reshape(shape_a[0], 2, shape_a[1], 2, shape_a[2], 2).mean(axis=(1, 3, 5)) >= 0.5] = 1
    label[lesion.reshape(shape_a[0], 2, shape_a[1], 2, shape_a[2], 2).mean(axis=(1, 3, 5)) >= 0.5] = 2
    image = image * np.exp(style.bias_strength * bias_field)
    image = np.sqrt((image + style.noise_sigma * noise[0]) ** 2 + (style.noise_sigma * noise[1]) ** 2)
    return (image * 1000).astype(np.float32), label


def write_domain_shift_dataset(raw_root: str | os.PathLike, dataset_id: int, name: str = "DiffCLDomains",
                               num_labeled: int = 4, num_unlabeled: int = 48, num_test: int = 24, seed: int = 0,
                               shape: tuple[int, int, int] = (16, 64, 64), all_labeled_id: int | None = None,
                               overwrite: bool = False) -> list[str]:
    """The domain-shift benchmark in nnU-Net raw format; returns the folder(s) written.

    Labeled cases come from domain 0 only; unlabeled and test cases cycle through all domains (case ids end
    in ``_d{domain}``). With ``all_labeled_id`` a second dataset ``{name}AllLabeled`` holds the same cases
    with every training case labeled (imagesTu moved into imagesTr): the upper reference of the benchmark.
    """
    for what, count in (("num_labeled", num_labeled), ("num_unlabeled", num_unlabeled), ("num_test", num_test)):
        if count < 0:
            raise ValueError(f"{what} must be >= 0, got {count}")
    if num_labeled < 1:
        raise ValueError(f"num_labeled must be >= 1 (nnU-Net plans and trains on labeled cases), got {num_labeled}")
    if all_labeled_id is not None and all_labeled_id == dataset_id:
        raise ValueError(f"the all-labeled reference needs a dataset id of its own, got {dataset_id} for both")
    rng = np.random.default_rng(seed)
    cases = []  # (subset, case id, image, label)
    for subset, count in (("labeled", num_labeled), ("unlabeled", num_unlabeled), ("test", num_test)):
        for k in range(count):
            domain = 0 if subset == "labeled" else k % len(DOMAIN_STYLES)
            image, label = make_domain_case(rng, shape, DOMAIN_STYLES[domain])
            cases.append((subset, f"dom_{len(cases):03d}_d{domain}", image, label))
    targets = [(dataset_id, name, False)]
    if all_labeled_id is not None:
        targets.append((all_labeled_id, f"{name}AllLabeled", True))
    writers = []
    try:  # every target folder is checked before anything is written
        for target_id, target_name, _ in targets:
            writers.append(RawDatasetWriter(raw_root, target_id, target_name, {0: "MRI"}, DOMAIN_LABELS,
                                            overwrite=overwrite))
    except Exception:
        for writer in writers:
            writer.abort()
        raise
    folders = []
    for writer, (_, _, all_labeled) in zip(writers, targets):
        with writer:
            for subset, case_id, image, label in cases:
                if subset == "unlabeled" and all_labeled:
                    subset = "labeled"
                writer.add_case(subset, case_id, [image], None if subset == "unlabeled" else label)
            folders.append(str(writer.finish(
                seed=seed, license="synthetic, CC0", source=f"{__name__} (domain shift)",
                shape=list(shape), domains=[asdict(s) for s in DOMAIN_STYLES],
                labeled_domains=[0], all_labeled_reference=all_labeled)))
    return folders
