"""The main job's closing table: one row per model from its `sgfused eval --json` file and training log.

Usage: python scripts/demo_summary.py --row LABEL EVAL_JSON [LOG_CSV] [--row ...]

Each row shows the test rSum, R@1 both ways, the twin accuracies (how often the model prefers the
true caption / image over its hard-distractor twin, chance 50 %) and the training time read from
``log.csv`` (every `sgfused train` run of the folder added up, resumed ones included). A row without
a log (an ensemble) shows no training time.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

TWIN_KINDS = ("relation twins", "attribute twins")
HEADER = ("model", "rSum", "R@1 i2t", "R@1 t2i", "relation twins i2t / t2i", "attribute twins i2t / t2i", "training")


def training_seconds(log_csv: Path) -> float:
    """Wall time of all training runs in ``log_csv``: each run's ``seconds`` count from its own start."""
    total, previous = 0.0, 0.0
    with open(log_csv, newline="") as f:
        for row in csv.DictReader(f):
            seconds = float(row["seconds"])
            if seconds < previous:  # a resumed run started counting again
                total += previous
            previous = seconds
    return total + previous


def _twin_cell(accuracy: dict, kind: str) -> str:
    if kind not in accuracy:
        return "—"
    return f"{accuracy[kind]['i2t']:.1f} / {accuracy[kind]['t2i']:.1f}"


def table_row(label: str, eval_json: Path, log_csv: Path | None) -> tuple[str, ...]:
    results = json.loads(eval_json.read_text())
    full, accuracy = results["full"], results.get("twin_accuracy", {})
    seconds = f"{training_seconds(log_csv):.0f} s" if log_csv is not None else "—"
    return (label, f"{full['rsum']:.1f}", f"{full['i2t_r1']:.1f}", f"{full['t2i_r1']:.1f}",
            *(_twin_cell(accuracy, kind) for kind in TWIN_KINDS), seconds)


def format_table(rows: list[tuple[str, ...]]) -> str:
    """A plain-text table with aligned columns (the first left-aligned, the others right-aligned)."""
    widths = [max(len(cells[i]) for cells in (HEADER, *rows)) for i in range(len(HEADER))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(HEADER), "  ".join("-" * w for w in widths), *map(line, rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", nargs="+", action="append", required=True, metavar="LABEL EVAL_JSON [LOG_CSV]",
                        help="a model's label, its `sgfused eval --json` file and (optional) its training log.csv")
    args = parser.parse_args(argv)
    rows = []
    for spec in args.row:
        if len(spec) not in (2, 3):
            parser.error(f"--row takes LABEL EVAL_JSON [LOG_CSV], got {len(spec)} values: {spec}")
        paths = [Path(p) for p in spec[1:]]
        for path in paths:
            if not path.is_file():
                parser.error(f"--row {spec[0]}: {path} does not exist")
        rows.append(table_row(spec[0], paths[0], paths[1] if len(paths) == 2 else None))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
