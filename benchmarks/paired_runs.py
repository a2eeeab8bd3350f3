"""Mean Dice, gap closed and paired wins of every prediction folder in a benchmark's repeat folders, against that
repeat's labeled-only model and all-labeled reference: the benchmark command's comparison, for models trained
beside it by hand (single runs of variants in ``repeat_k/nnUNet_results``, predicted into ``repeat_k/predictions``
and evaluated with ``nnUNetv2_diffcl evaluate``).

    python benchmarks/paired_runs.py BENCHMARK_OUTPUT_FOLDER
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nnunetv2_diffcl.benchmark import LOWER_REFERENCE, case_dice, gap_closed, wins_against


def per_case(summary: Path) -> dict[str, dict[str, dict]]:
    return {case["case"]: case["metrics"] for case in json.loads(summary.read_text(encoding="utf-8"))["per_case"]}


def mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    print("| repeat | trainer | Dice | labeled-only | reference | gap closed | wins vs labeled-only |\n"
          "|---|---|---|---|---|---|---|")
    for repeat in sorted(args.folder.glob("repeat_*")):
        lower_file = repeat / "predictions" / LOWER_REFERENCE / "summary.json"
        upper_file = repeat / "predictions_reference" / LOWER_REFERENCE / "summary.json"
        if not lower_file.exists():
            continue
        lower_row = {"per_case_dice": per_case(lower_file)}
        lower = case_dice(lower_row["per_case_dice"])
        upper = mean(case_dice(per_case(upper_file))) if upper_file.exists() else None
        for summary in sorted((repeat / "predictions").glob("*/summary.json")):
            trainer = summary.parent.name
            if trainer == LOWER_REFERENCE:
                continue
            row = {"per_case_dice": per_case(summary)}
            ours = case_dice(row["per_case_dice"])
            wins, n_cases = wins_against(row, lower_row)
            closed = gap_closed(mean(ours), mean(lower), upper)
            print(f"| {repeat.name} | {trainer} | {mean(ours):.4f} | {mean(lower):.4f} | "
                  f"{'n/a' if upper is None else f'{upper:.4f}'} | "
                  f"{'n/a' if closed is None else f'{closed:+.2f}'} | {wins}/{n_cases} |")


if __name__ == "__main__":
    main()
