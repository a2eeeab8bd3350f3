"""Mean Dice, gap closed and paired wins of every prediction folder in a benchmark's repeat folders, against that
repeat's labeled-only model and all-labeled reference: the benchmark command's comparison, for models trained
beside it by hand (single runs of variants in ``repeat_k/nnUNet_results``, predicted into ``repeat_k/predictions``
and evaluated with ``nnUNetv2_diffcl evaluate``). A second table gives each trainer's mean +- sd over the repeats
it was run in (Dice, Dice per class, gap closed).

    python benchmarks/paired_runs.py BENCHMARK_OUTPUT_FOLDER
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from nnunetv2_diffcl.benchmark import LOWER_REFERENCE, _mean_sd, case_dice, gap_closed, wins_against


def read(summary: Path) -> dict:
    return json.loads(summary.read_text(encoding="utf-8"))


def per_case(summary: dict) -> dict[str, dict[str, dict]]:
    return {case["case"]: case["metrics"] for case in summary["per_case"]}


def mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    print("| repeat | trainer | Dice | labeled-only | reference | gap closed | wins vs labeled-only |\n"
          "|---|---|---|---|---|---|---|")
    over_repeats: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for repeat in sorted(args.folder.glob("repeat_*")):
        lower_file = repeat / "predictions" / LOWER_REFERENCE / "summary.json"
        upper_file = repeat / "predictions_reference" / LOWER_REFERENCE / "summary.json"
        if not lower_file.exists():
            continue
        lower_row = {"per_case_dice": per_case(read(lower_file))}
        lower = case_dice(lower_row["per_case_dice"])
        upper = mean(case_dice(per_case(read(upper_file)))) if upper_file.exists() else None
        for path in sorted((repeat / "predictions").glob("*/summary.json")):
            trainer, summary = path.parent.name, read(path)
            record = over_repeats[trainer]
            for c, stats in summary["per_class"].items():
                record[f"Dice {c}"].append(stats["dice"]["mean"])
            if trainer == LOWER_REFERENCE:
                record["Dice"].append(mean(lower))
                continue
            row = {"per_case_dice": per_case(summary)}
            ours = case_dice(row["per_case_dice"])
            wins, n_cases = wins_against(row, lower_row)
            closed = gap_closed(mean(ours), mean(lower), upper)
            record["Dice"].append(mean(ours))
            record["gap closed"].append(closed)
            print(f"| {repeat.name} | {trainer} | {mean(ours):.4f} | {mean(lower):.4f} | "
                  f"{'n/a' if upper is None else f'{upper:.4f}'} | "
                  f"{'n/a' if closed is None else f'{closed:+.2f}'} | {wins}/{n_cases} |")
    print()
    print("| trainer | repeats | Dice | Dice per class | gap closed |\n|---|---|---|---|---|")
    for trainer, record in sorted(over_repeats.items()):
        cells = []
        for key in ["Dice"] + sorted(k for k in record if k.startswith("Dice ")) + ["gap closed"]:
            value, sd = _mean_sd(record.get(key, []))
            cells.append("n/a" if value is None else f"{value:.3f}" + ("" if sd is None else f" ± {sd:.3f}"))
        print(f"| {trainer} | {len(record['Dice'])} | {cells[0]} | {' / '.join(cells[1:-1])} | {cells[-1]} |")


if __name__ == "__main__":
    main()
