"""Dice per class and per appearance domain of every prediction folder under a benchmark's output folder.

The domain-shift dataset (``nnUNetv2_diffcl synthetic --domains``) names each case ``..._d{domain}``; this
groups the per-case Dice of each ``summary.json`` that ``nnUNetv2_diffcl benchmark`` wrote by that suffix, so
a mean Dice can be read as "where did it gain or lose". Usage:

    python benchmarks/per_domain_dice.py BENCHMARK_OUTPUT_FOLDER
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

DOMAIN = re.compile(r"_d(\d+)$")


def per_domain(summary: dict) -> dict[str, dict[str, float]]:
    """{domain: {class: mean Dice over that domain's cases}} of one evaluation summary."""
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for case in summary["per_case"]:
        match = DOMAIN.search(case["case"])
        domain = f"d{match.group(1)}" if match else "all"
        for label, metrics in case["metrics"].items():
            scores[domain][label].append(metrics["dice"])
    return {d: {c: float(np.mean(v)) for c, v in sorted(classes.items())} for d, classes in sorted(scores.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
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
