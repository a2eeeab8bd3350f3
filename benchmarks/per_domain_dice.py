"""Dice per class and per appearance domain of every prediction folder under a benchmark's output folder.

The domain-shift dataset (``nnUNetv2_diffcl synthetic --domains``) names each case ``..._d{domain}``; this
groups the per-case Dice of each ``summary.json`` that ``nnUNetv2_diffcl benchmark`` wrote by that suffix, so
a mean Dice can be read as "where did it gain or lose". With ``--errors`` it prints, per domain and class, the
false positives and false negatives per reference voxel (summed over the domain's cases; from each case's
voxel counts and Dice: TP = Dice (n_reference + n_prediction) / 2), which says whether a model under- or
over-segments. With ``--cases DOMAIN`` it prints each case of that domain (e.g. ``d3``): organ / lesion Dice of every
model, a case per column, which says whether a domain is lost evenly or by some cases entirely. Usage:

    python benchmarks/per_domain_dice.py BENCHMARK_OUTPUT_FOLDER [--errors | --cases d3]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

DOMAIN = re.compile(r"_d(\d+)$")


def domain_of(case: str) -> str:
    """"d<k>" for a case named ..._d<k>, "all" for any other name."""
    match = DOMAIN.search(case)
    return f"d{match.group(1)}" if match else "all"


def per_domain(summary: dict) -> dict[str, dict[str, float]]:
    """{domain: {class: mean Dice over that domain's cases}} of one evaluation summary."""
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for case in summary["per_case"]:
        domain = domain_of(case["case"])
        for label, metrics in case["metrics"].items():
            scores[domain][label].append(metrics["dice"])
    return {d: {c: float(np.mean(v)) for c, v in sorted(classes.items())} for d, classes in sorted(scores.items())}


def per_domain_errors(summary: dict) -> dict[str, dict[str, tuple[float, float]]]:
    """{domain: {class: (false positives, false negatives) per reference voxel}} of one evaluation summary."""
    counts: dict[str, dict[str, np.ndarray]] = defaultdict(lambda: defaultdict(lambda: np.zeros(3)))
    for case in summary["per_case"]:
        domain = domain_of(case["case"])
        for label, m in case["metrics"].items():
            reference, prediction = m["n_reference"], m["n_prediction"]
            # nnU-Net's Dice is NaN when both are empty: nothing true, false or missed then
            true = 0.0 if reference + prediction == 0 else m["dice"] * (reference + prediction) / 2
            counts[domain][label] += (prediction - true, reference - true, reference)
    return {d: {c: (v[0] / v[2], v[1] / v[2]) if v[2] else (float("nan"),) * 2 for c, v in sorted(classes.items())}
            for d, classes in sorted(counts.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--errors", action="store_true", help="false positives / negatives per reference voxel")
    parser.add_argument("--cases", metavar="DOMAIN", help="per case of this domain (e.g. d3): Dice per class")
    args = parser.parse_args()
    if args.cases:
        for path in sorted(args.folder.glob("**/predictions*/*/summary.json")):
            cases = [c for c in json.loads(path.read_text(encoding="utf-8"))["per_case"]
                     if domain_of(c["case"]) == args.cases]
            cells = [f"{Path(c['case']).name.split('.')[0]} " + "/".join(f"{m['dice']:.2f}" for _, m in
                                                                     sorted(c["metrics"].items())) for c in cases]
            reference = " (reference)" if "reference" in path.parent.parent.name else ""
            print(f"| {path.parent.parent.parent.name}/{path.parent.name}{reference} | " + " | ".join(cells) + " |")
        return
    if args.errors:
        for path in sorted(args.folder.glob("**/predictions*/*/summary.json")):
            table = per_domain_errors(json.loads(path.read_text(encoding="utf-8")))
            cells = [f"{d} " + " ".join(f"c{c} {fp:.2f}/{fn:.2f}" for c, (fp, fn) in classes.items())
                     for d, classes in table.items()]
            reference = " (reference)" if "reference" in path.parent.parent.name else ""
            name = f"{path.parent.parent.parent.name}/{path.parent.name}{reference}"
            print(f"| {name} FP/FN | " + " | ".join(cells) + " |")
        return
    rows: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(args.folder.glob("**/predictions*/*/summary.json")):
        rows[path.parent.name + (" (reference)" if "reference" in path.parent.parent.name else "")].append(
            per_domain(json.loads(path.read_text(encoding="utf-8"))))
    for trainer, repeats in rows.items():
        domains = repeats[0].keys()
        cells = []
        for d in domains:
            classes = repeats[0][d].keys()
            cells.append(f"{d} " + "/".join(f"{np.mean([r[d][c] for r in repeats]):.3f}" for c in classes))
        print(f"| {trainer} ({len(repeats)} runs) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
