"""What makes a shifted domain of the domain-shift benchmark hard for a model trained on domain 0, and how much of
it a restyling of labeled patches reproduces. Diagnosis only: the trainers never see the generator's styles.

Two measurements with one trained 2d model (e.g. labeled-only nnU-Net of a benchmark repeat), slice by slice at
the full 64 x 64 slice (the 2d configuration's patch), each image z-scored as nnU-Net normalises it:

- ``restyle``: the model's Dice on each domain's test cases, and on domain 0's test cases restyled by
  ``amplitude_mix`` with test cases of that domain at weight 0.5 and 1 (what ``labeled_appearance = "fourier"``
  trains on), or by another ``--appearance`` (``fourier_clutter`` adds ``spectrum_clutter``'s field). When
  restyled domain-0 cases score like the real domain, the restyling reproduces the shift.
- ``factors``: the model's Dice on freshly drawn cases of domain 0 and of domain 3 with one style parameter
  swapped between them (``DOMAIN_STYLES``): which property of the shifted domain costs the Dice.
- ``views``: per domain, the model's Dice (organ / lesion) on each test case as scanned, smoothed (a Gaussian of
  sigma 1 or 2 voxels in plane, then z-scored again: less noise), and restyled towards a domain-0 test case
  (``amplitude_mix`` at weight 0.5 and 1: the labeled scanner's look), alone and averaged with the scanned view's
  probabilities: whether a teacher that saw an easier view of an unlabeled patch would label it better.
- ``confidence``: per domain, how sure the model is of the background it predicts, on the foreground voxels it
  misses and on the true background: the share of each at p(background) >= 0.9, 0.99 and 0.999, i.e. what a
  pseudo-label threshold on background (``background_threshold``) would keep of each; and the share of the missed
  voxels that lie in slices where the model predicts no foreground at all (the structure not found, rather than
  its border missed).

    python benchmarks/domain_shift_probe.py restyle MODEL_FOLDER RAW_DATASET_FOLDER [--appearance fourier_clutter]
    python benchmarks/domain_shift_probe.py factors MODEL_FOLDER
    python benchmarks/domain_shift_probe.py confidence MODEL_FOLDER RAW_DATASET_FOLDER
    python benchmarks/domain_shift_probe.py views MODEL_FOLDER RAW_DATASET_FOLDER
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from scipy import ndimage

from nnunetv2_diffcl.dataset_conversion.synthetic import DOMAIN_STYLES, make_domain_case
from nnunetv2_diffcl.trainers.semi_supervised import RESTYLES
from nnunetv2_diffcl.unlabeled.perturbations import restyle


def zscore(image: np.ndarray) -> np.ndarray:
    return ((image - image.mean()) / image.std()).astype(np.float32)


def dice(a: np.ndarray, b: np.ndarray, c: int) -> float:
    a, b = a == c, b == c
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


class SliceModel:
    """A trained 2d nnU-Net model applied to whole slices (no sliding window: slice = patch here)."""

    def __init__(self, model_folder: Path, network: str | None = None) -> None:
        predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False)
        predictor.initialize_from_trained_model_folder(str(model_folder), ("all",), "checkpoint_final.pth")
        self.network = predictor.network.eval()
        if network is not None:  # another network of a semi-supervised checkpoint, e.g. CS's EMA teacher
            checkpoint = torch.load(model_folder / "fold_all" / "checkpoint_final.pth", map_location="cpu",
                                    weights_only=False)
            self.network.load_state_dict(checkpoint["semi_supervised"]["networks"][network])

    @torch.no_grad()
    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """Softmax probabilities (z, K, y, x) of the (z, y, x) ``image``'s slices."""
        out = self.network(torch.from_numpy(image)[:, None])
        return torch.softmax(out[0] if isinstance(out, (list, tuple)) else out, 1).numpy()

    def mean_dice(self, image: np.ndarray, label: np.ndarray) -> float:
        """Mean Dice over the two foreground classes of the (z, y, x) ``image``'s slice-wise segmentation."""
        seg = self.probabilities(image).argmax(1)
        return float(np.mean([dice(seg, label, c) for c in (1, 2)]))


def restyled(x: np.ndarray, style: np.ndarray, weight: float, appearance: str) -> np.ndarray:
    """Slices of ``x`` (z, y, x) in the appearance of ``style``'s as the trainers' ``labeled_appearance`` does it."""
    return restyle(torch.from_numpy(x)[:, None], torch.from_numpy(style)[:, None], appearance,
                   torch.full((x.shape[0],), weight), torch.Generator().manual_seed(0)).numpy()[:, 0]


def restyle_table(model: SliceModel, raw: Path, appearance: str = "fourier") -> None:
    domain0 = domain_test_cases(raw, 0)
    print("| test cases of | real | domain 0 restyled, weight 0.5 | domain 0 restyled, weight 1 |\n|---|---|---|---|")
    for d in range(len(DOMAIN_STYLES)):
        cases = domain_test_cases(raw, d)
        cells = [np.mean([model.mean_dice(x, y) for x, y in cases])]
        for weight in (0.5, 1.0):
            cells.append(np.mean([model.mean_dice(restyled(x, s, weight, appearance), y)
                                  for (x, y), (s, _) in zip(domain0, cases)]))
        print(f"| domain {d} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


def load_test_case(raw: Path, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A test image (z-scored) and its label."""
    label = raw / "labelsTs" / path.name.replace("_0000", "")
    return zscore(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))), sitk.GetArrayFromImage(sitk.ReadImage(str(label)))


def domain_test_cases(raw: Path, domain: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every test case of one appearance domain (case ids end in ``_d{domain}``), as ``load_test_case`` gives it."""
    return [load_test_case(raw, p) for p in sorted((raw / "imagesTs").glob(f"*_d{domain}_0000.nii.gz"))]


def confidence_table(model: SliceModel, raw: Path, thresholds: tuple[float, ...] = (0.9, 0.99, 0.999)) -> None:
    head = " | ".join(f">= {t}" for t in thresholds)
    print(f"| test cases of | missed foreground voxels | of them in slices with no foreground predicted | "
          f"p(background) of them: {head} | true background: {head} |\n|---|---|---|{'---|' * 2 * len(thresholds)}")
    for d in range(len(DOMAIN_STYLES)):
        missed, background, in_empty = [], [], 0
        for image, label in domain_test_cases(raw, d):
            probabilities = model.probabilities(image)
            predicted_background = probabilities.argmax(1) == 0
            missed.append(probabilities[:, 0][(label > 0) & predicted_background])
            background.append(probabilities[:, 0][(label == 0) & predicted_background])
            empty_slices = predicted_background.all(axis=(1, 2))  # the model finds nothing in these slices
            in_empty += int(((label > 0) & predicted_background)[empty_slices].sum())
        missed_all, background_all = np.concatenate(missed), np.concatenate(background)
        cells = [f"{in_empty / max(missed_all.size, 1):.2f}"]
        cells += [f"{(missed_all >= t).mean():.2f}" for t in thresholds]
        cells += [f"{(background_all >= t).mean():.3f}" for t in thresholds]
        print(f"| domain {d} | {missed_all.size} | " + " | ".join(cells) + " |")


def views_table(model: SliceModel, raw: Path) -> None:
    domain0 = [x for x, _ in domain_test_cases(raw, 0)]
    views = {}
    for sigma in (1.0, 2.0):
        views[f"smoothed, sigma {sigma:g}"] = lambda x, k, s=sigma: zscore(ndimage.gaussian_filter(x, (0, s, s)))
    for weight in (0.5, 1.0):  # towards another domain-0 case than the case's own index
        views[f"domain-0 look, weight {weight:g}"] = (
            lambda x, k, w=weight: zscore(restyled(x, domain0[(k + 1) % len(domain0)], w, "fourier")))
    cases = [domain_test_cases(raw, d) for d in range(len(DOMAIN_STYLES))]
    scanned = [[model.probabilities(x) for x, _ in domain] for domain in cases]

    def row(label: str, probabilities: list[list[np.ndarray]]) -> None:
        """One table row: organ / lesion Dice per domain of the segmentations ``probabilities[d][k].argmax(1)``."""
        cells, values = [], []
        for domain, domain_probabilities in zip(cases, probabilities):
            segs = [p.argmax(1) for p in domain_probabilities]
            organ, lesion = (float(np.mean([dice(seg, y, c) for seg, (_, y) in zip(segs, domain)])) for c in (1, 2))
            cells.append(f"{organ:.3f} / {lesion:.3f}")
            values += [organ, lesion]
        print(f"| {label} | " + " | ".join(cells) + f" | {np.mean(values):.3f} |")

    head = " | ".join(f"domain {d}" for d in range(len(cases)))
    print(f"| view | {head} | mean |\n|---|" + "---|" * (len(cases) + 1))
    row("as scanned", scanned)
    for name, view in views.items():
        seen = [[model.probabilities(view(x, k)) for k, (x, _) in enumerate(domain)] for domain in cases]
        row(name, seen)
        row(f"{name}, averaged with as scanned",
            [[(q + p) / 2 for q, p in zip(*pair)] for pair in zip(seen, scanned)])


def factors(model: SliceModel, cases: int = 8) -> None:
    def score(style) -> float:
        values = []
        for k in range(cases):
            image, label = make_domain_case(np.random.default_rng(1000 + k), (16, 64, 64), style)
            values.append(model.mean_dice(zscore(image), label))
        return float(np.mean(values))

    first, last = DOMAIN_STYLES[0], DOMAIN_STYLES[-1]
    print(f"domain 0: {score(first):.3f}, domain {len(DOMAIN_STYLES) - 1}: {score(last):.3f} ({cases} new cases each)")
    print("| style parameter | domain 0 with the last domain's | last domain with domain 0's |\n|---|---|---|")
    for field in dataclasses.fields(first):
        swapped_in = score(dataclasses.replace(first, **{field.name: getattr(last, field.name)}))
        swapped_out = score(dataclasses.replace(last, **{field.name: getattr(first, field.name)}))
        print(f"| {field.name} | {swapped_in:.3f} | {swapped_out:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measurement", choices=("restyle", "factors", "confidence", "views"))
    parser.add_argument("model_folder", type=Path, help="a trained 2d model's folder (holding fold_all)")
    parser.add_argument("raw", type=Path, nargs="?",
                        help="the benchmark's raw dataset folder (restyle, confidence, views)")
    parser.add_argument("--appearance", choices=RESTYLES, default="fourier",
                        help="how domain-0 cases are restyled (restyle)")
    parser.add_argument("--network", default=None,
                        help="measure another network of a semi-supervised checkpoint instead of the trained one "
                             "(e.g. DiffCL's EMA teacher cs_ema; CPS's ema_a, ema_b, network_b)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = SliceModel(args.model_folder, args.network)
    if args.measurement in ("restyle", "confidence", "views"):
        if args.raw is None:
            parser.error(f"{args.measurement} needs the raw dataset folder")
        {"restyle": lambda: restyle_table(model, args.raw, args.appearance),
         "confidence": lambda: confidence_table(model, args.raw),
         "views": lambda: views_table(model, args.raw)}[args.measurement]()
    else:
        factors(model)


if __name__ == "__main__":
    main()
